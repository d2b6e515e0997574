"""Fused weighted cross-entropy versus eager PyTorch and torch.compile, forward + backward.

    python -m tools.kernel_bench     # GPU: timings, GB/s and correctness; CPU: correctness only

Per shape and dtype: max error against a float64 reference (loss and logits gradient),
median times from triton.testing.do_bench, and the fused kernel's achieved bandwidth,
counting the minimum traffic (read the logits once, write the gradient once) against a
measured device-to-device copy of the same number of bytes. On a machine without a GPU
the kernel runs in the Triton interpreter on the first rows of each shape; timing needs a GPU.
"""
import os

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by kernels
from kernels import weighted_cross_entropy  # noqa: E402

SHAPES = [(128, 10), (128, 100), (1024, 100), (4096, 1000), (8192, 32000)]
DTYPES = [torch.float32, torch.bfloat16]


def eager(x, y, w):
    return (w * F.cross_entropy(x, y, reduction="none")).mean()


def max_errors(x, y, w):
    xr = x.detach().clone().requires_grad_()
    loss = weighted_cross_entropy(xr, y, w)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    ref = eager(x64, y, w.double())
    ref.backward()
    return abs(loss.item() - ref.item()), (xr.grad.double() - x64.grad).abs().max().item()


def main():
    device = "cuda" if CUDA else "cpu"
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'CPU (Triton interpreter, correctness only)'}, "
          f"torch {torch.__version__}")
    if CUDA:
        from triton.testing import do_bench
        compiled = torch.compile(eager)
    rows = []
    for n, c in SHAPES:
        for dtype in DTYPES:
            n_run = n if CUDA else 4  # the interpreter is slow: a few rows of the same width
            g = torch.Generator(device=device).manual_seed(0)
            x = (torch.randn(n_run, c, device=device, generator=g) * 2).to(dtype).requires_grad_()
            y = torch.randint(0, c, (n_run,), device=device, generator=g)
            w = torch.rand(n_run, device=device, generator=g)
            err_loss, err_grad = max_errors(x, y, w)
            row = [f"({n}, {c})", str(dtype).replace("torch.", ""), f"{err_loss:.1e}", f"{err_grad:.1e}"]
            if CUDA:
                def step(fn):
                    x.grad = None
                    fn(x, y, w).backward()
                t_fused = do_bench(lambda: step(weighted_cross_entropy))
                t_eager = do_bench(lambda: step(eager))
                t_comp = do_bench(lambda: step(compiled))
                nbytes = 2 * x.numel() * x.element_size()  # read logits + write gradient
                src = torch.empty(x.numel() * x.element_size(), dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                t_copy = do_bench(lambda: dst.copy_(src))  # also reads once and writes once
                gbs, copy_gbs = nbytes / t_fused / 1e6, 2 * src.numel() / t_copy / 1e6
                row += [f"{t_fused:.3f}", f"{t_eager:.3f}", f"{t_comp:.3f}", f"{t_eager / t_fused:.2f}x",
                        f"{t_comp / t_fused:.2f}x", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"]
                if (n, c) == (8192, 32000) and dtype == torch.bfloat16:
                    print(f"SUMMARY kernel (8192, 32000) bf16: {t_eager / t_fused:.2f}x eager, "
                          f"{100 * gbs / copy_gbs:.0f}% of copy bandwidth")
            rows.append(row)
    head = ["shape", "dtype", "loss err", "grad err"]
    if CUDA:
        head += ["fused ms", "eager ms", "compile ms", "vs eager", "vs compile", "fused GB/s", "of copy"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if not CUDA:
        print("timing needs a GPU: this machine has none, so only correctness was checked "
              f"(interpreter, {4} rows per shape)")


if __name__ == "__main__":
    main()
