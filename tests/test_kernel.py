"""The fused weighted cross-entropy against a float64 reference built from F.log_softmax."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import weighted_ce, weighted_cross_entropy

assert weighted_ce.INTERPRET, "tests must run the Triton kernel in the interpreter"


def reference(logits, labels, weights, reduction, ignore_index=-100):
    """float64: per-row w_i * (-log_softmax(x_i)[y_i]), ignored rows 0, mean over non-ignored."""
    x = logits.detach().double().requires_grad_()
    w = weights.detach().double().requires_grad_()
    valid = labels != ignore_index
    logp = F.log_softmax(x, dim=1)
    nll = -logp.gather(1, labels.clamp(min=0).long()[:, None]).squeeze(1) * valid
    rows = w * nll
    if reduction == "none":
        return rows, x, w
    total = rows.sum()
    return (total / max(int(valid.sum()), 1) if reduction == "mean" else total), x, w


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernel allocates starts as NaN, so an element it forgot to write shows."""
    real_empty = torch.empty

    def empty(*size, **kw):
        t = real_empty(*size, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)
    monkeypatch.setattr(torch, "empty", empty)


def make_case(n, c, dtype, weight_kind, contiguous, ignore_frac, gen):
    base = torch.randn(c, n, generator=gen) * 3 if not contiguous else torch.randn(n, c, generator=gen) * 3
    logits = (base.t() if not contiguous else base).to(dtype)  # transposed view: column stride != 1
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    weights = {"random": torch.rand(n, generator=gen), "zero": torch.zeros(n),
               "large": 1e3 * torch.rand(n, generator=gen)}[weight_kind]
    return logits, labels, weights


TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SHAPES = [(1, 1), (5, 2), (64, 7), (300, 100), (33, 1000), (4, 9000)]  # 9000 > one column block


@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(n, c, reduction, poisoned):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for weight_kind in ("random", "zero", "large"):
            contiguous = bool(torch.randint(0, 2, (1,), generator=gen))
            logits, labels, weights = make_case(n, c, dtype, weight_kind, contiguous, 0.2, gen)
            x = logits.detach().requires_grad_()
            w = weights.clone().requires_grad_()
            out, losses = weighted_cross_entropy(x, labels, w, reduction=reduction, return_losses=True)
            ref, x64, w64 = reference(logits, labels, weights, reduction)
            up = torch.randn(ref.shape, generator=gen, dtype=torch.float64)  # per-row for "none"
            (out.double() * up).sum().backward()
            (ref * up).sum().backward()
            rtol, atol = TOL[dtype]
            scale = max(1.0, float(weights.abs().max()))
            torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol * scale)
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol * scale)
            torch.testing.assert_close(w.grad.double(), w64.grad, rtol=rtol, atol=atol)
            valid = labels != -100
            nll = -F.log_softmax(logits.double(), 1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
            torch.testing.assert_close(losses.double(), nll * valid, rtol=rtol, atol=atol)
            assert x.grad.shape == logits.shape and torch.isfinite(x.grad).all()


def test_kernel_and_pytorch_path_agree():
    """The CPU fallback and the kernel give the same buffers (so CPU users get the same semantics)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits, labels, weights = make_case(50, 130, torch.float32, "random", True, 0.3, gen)
    for mean in (True, False):
        for k, t in zip(weighted_ce._launch(logits, labels, weights, mean, -100),
                        weighted_ce._torch_path(logits, labels, weights, mean, -100)):
            torch.testing.assert_close(k, t)


def test_float64_path_passes_gradcheck():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 2, 1])
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda a, b: weighted_cross_entropy(a, y, b, reduction=red), (x, w))


def test_all_rows_ignored_gives_zero_not_nan():
    x = torch.randn(4, 3, requires_grad=True)
    out = weighted_cross_entropy(x, torch.full((4,), -100), torch.rand(4))
    out.backward()
    assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_custom_ignore_index_and_int32_labels():
    x = torch.randn(8, 4)
    y = torch.tensor([0, 1, 2, 3, 7, 7, 1, 0], dtype=torch.int32)
    w = torch.rand(8)
    ref, _, _ = reference(x, y.long().where(y != 7, torch.tensor(-100)), w, "mean")
    out = weighted_cross_entropy(x, y, w, ignore_index=7)
    assert math.isclose(out.item(), ref.item(), rel_tol=1e-5)


def test_double_backward_raises():
    x = torch.randn(4, 3, requires_grad=True)
    loss = weighted_cross_entropy(x, torch.tensor([0, 1, 2, 0]), torch.rand(4))
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    (g,) = torch.autograd.grad(loss, x)  # first order still works after the refusal
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("args,err", [
    # the PyTorch path (here: float64) checks label ranges on the CPU, where it costs nothing
    ((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 3, 0]), torch.rand(4)), "out of range"),
    ((torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, -1, 0]), torch.rand(4)), "out of range"),
    ((torch.randn(4, 3), torch.tensor([0, 1, 2]), torch.rand(4)), "shape"),
    ((torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.rand(5)), "shape"),
    ((torch.randn(12), torch.tensor([0, 1, 2, 0]), torch.rand(4)), "2-D"),
    ((torch.randint(0, 3, (4, 3)), torch.tensor([0, 1, 2, 0]), torch.rand(4)), "floating"),
    ((torch.randn(4, 3), torch.tensor([0., 1., 2., 0.]), torch.rand(4)), "int64"),
    ((torch.randn(4, 3), torch.tensor([0, 1, 2, 0], device="meta"), torch.rand(4)), "one device"),
])
def test_clear_errors(args, err):
    with pytest.raises((ValueError, TypeError), match=err):
        weighted_cross_entropy(*args)
    with pytest.raises(ValueError, match="reduction"):
        weighted_cross_entropy(torch.randn(2, 2), torch.tensor([0, 1]), torch.rand(2), reduction="avg")


@pytest.mark.parametrize("bad_label", [3, -1])
def test_kernel_path_marks_a_bad_label_nan_and_keeps_the_other_rows(bad_label):
    """The kernel path does not check labels on the host (that would synchronise): the bad
    row's loss and gradient are NaN, so the loss shows it; every other row is exact."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(5, 3, generator=gen, requires_grad=True)
    y = torch.tensor([0, 1, bad_label, 2, -100])
    w = torch.rand(5, generator=gen)
    out, losses = weighted_cross_entropy(x, y, w, reduction="none", return_losses=True)
    out.sum().backward()
    assert torch.isnan(losses[2]) and torch.isnan(x.grad[2]).all()
    ok = torch.tensor([True, True, False, True, True])
    ref, x64, _ = reference(x[ok], y[ok], w[ok], "none")
    ref.sum().backward()
    torch.testing.assert_close(out[ok].double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad[ok].double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert torch.isnan(weighted_cross_entropy(x.detach(), y, w))  # the mean shows it


@pytest.mark.parametrize("n,c", [(128, 10), (128, 100), (300, 1000), (3, 9000)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kernel_path_never_synchronises_with_the_host(monkeypatch, n, c, reduction):
    """Forward and backward of the kernel path with every way of reading a tensor's value on
    the host disabled: .item(), .tolist(), bool(), and Python number conversions raise."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits, labels, weights = make_case(n, c, torch.float32, "random", True, 0.1, gen)
    x = logits.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    up = torch.randn(n if reduction == "none" else (), generator=gen)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation on the kernel path")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out, losses = weighted_cross_entropy(x, labels, w, reduction=reduction, return_losses=True)
    out.backward(up)
    monkeypatch.undo()
    ref, x64, w64 = reference(logits, labels, weights, reduction)
    (ref * up.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("c", [100, 32000])
def test_forward_and_backward_capture_in_a_cuda_graph(c):
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(64, c, device="cuda", requires_grad=True)
    y = torch.randint(0, c, (64,), device="cuda")
    w = torch.rand(64, device="cuda")
    for _ in range(2):  # warm-up on a side stream, as CUDA graphs require
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x.grad = None
            weighted_cross_entropy(x, y, w).backward()
        torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = weighted_cross_entropy(x, y, w)
        loss.backward()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    ref, x64, _ = reference(x.detach().cpu(), y.cpu(), w.cpu(), "mean")
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-5, atol=1e-6)
