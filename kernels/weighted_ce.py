"""Fused per-sample weighted cross-entropy: loss and logits-gradient in one kernel.

    out = reduce_i  w_i * l_i,      l_i = logsumexp(x_i) - x_{i, y_i}
    d out / d x_i = s * w_i * (softmax(x_i) - onehot(y_i))
    d out / d w_i = s * l_i

with s = 1 for reduction "sum", s = 1 / (number of non-ignored rows) for "mean"
(a mean over an all-ignored batch is 0, not NaN), and per-row upstream gradients
for "none". Rows whose label is `ignore_index` have loss 0 and gradient 0.

The forward pass does all the work. Each program owns one row: pass 1 streams the
row through column blocks with an online (running max, running sum) softmax, so any
number of classes works; pass 2 writes the gradient into its own buffer (never into
the logits: an in-place write there corrupts anyone else who saved them). When the
row fits one block (up to 8192 classes) it is read exactly once. Backward is then a
no-op for the usual scalar upstream gradient of 1, or one multiply otherwise.

Dispatch: CUDA tensors run the Triton kernel. CPU tensors run the same kernel in the
Triton interpreter when TRITON_INTERPRET=1 was set before `import triton` (that is how
the tests check the kernel without a GPU), and otherwise a plain PyTorch path with the
same semantics and the same autograd.Function. float64 always takes the PyTorch path.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch path only
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SINGLE_BLOCK = 8192  # rows up to this many classes live in registers, read once
MULTI_BLOCK = 4096       # column block for longer rows
REDUCTIONS = ("none", "sum", "mean")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if triton is not None:

    @triton.jit
    def _weighted_ce_kernel(
        x_ptr, x_stride_row, x_stride_col,  # logits (N, C), any strides
        y_ptr, w_ptr,                       # labels (N,), weights (N,)
        loss_ptr,                           # out: unweighted loss l_i, fp32 (N,)
        g_ptr, g_stride_row,                # out: gradient (N, C), contiguous rows
        n_cols, ignore_index, scale,        # scale s (see module docstring)
        BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride_row
        g_row = g_ptr + row * g_stride_row
        y = tl.load(y_ptr + row)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)
        coef = tl.where(valid, tl.load(w_ptr + row).to(tl.float32) * scale, 0.0)
        cols = tl.arange(0, BLOCK)
        x_y = tl.load(x_row + y * x_stride_col).to(tl.float32)

        if SINGLE_BLOCK:
            mask = cols < n_cols
            x = tl.load(x_row + cols * x_stride_col, mask=mask, other=float("-inf")).to(tl.float32)
            m = tl.max(x, 0)
            e = tl.exp(x - m)
            d = tl.sum(e, 0)
            p = e / d
            g = coef * (p - tl.where(cols == y, 1.0, 0.0))
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
            lse = m + tl.log(d)
        else:
            # pass 1: online softmax statistics, m = running max, d = sum exp(x - m)
            m = float("-inf")
            d = 0.0
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                x = tl.load(x_row + offs * x_stride_col, mask=offs < n_cols,
                            other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
            lse = m + tl.log(d)
            # pass 2: gradient coef * (softmax - onehot)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(x_row + offs * x_stride_col, mask=mask, other=0.0).to(tl.float32)
                g = coef * (tl.exp(x - lse) - tl.where(offs == y, 1.0, 0.0))
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)

        tl.store(loss_ptr + row, tl.where(valid, lse - x_y, 0.0))


def _use_kernel(logits):
    if triton is None or logits.dtype not in KERNEL_DTYPES:
        return False
    return logits.is_cuda or (INTERPRET and logits.device.type == "cpu")


def _launch(logits, labels, weights, scale, ignore_index):
    n, c = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return loss, grad
    single = c <= MAX_SINGLE_BLOCK
    block = triton.next_power_of_2(c) if single else MULTI_BLOCK
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    _weighted_ce_kernel[(n,)](
        logits, logits.stride(0), logits.stride(1), labels, weights, loss,
        grad, grad.stride(0), c, ignore_index, scale,
        BLOCK=block, SINGLE_BLOCK=single, num_warps=num_warps)
    return loss, grad


def _torch_path(logits, labels, weights, scale, ignore_index):
    """Same buffers as the kernel, in PyTorch (CPU without the interpreter, float64)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(x, dim=1)
    loss = torch.where(valid, lse - x.gather(1, y[:, None]).squeeze(1), torch.zeros_like(lse))
    p = torch.exp(x - lse[:, None])
    p.scatter_add_(1, y[:, None], -torch.ones_like(lse)[:, None])
    coef = torch.where(valid, weights.to(acc) * scale, torch.zeros_like(lse))
    return loss.float() if acc == torch.float32 else loss, (p * coef[:, None]).to(logits.dtype)


def _check(logits, labels, weights, reduction, ignore_index):
    """Raises on bad input; returns the number of non-ignored rows. One host sync in all."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if labels.shape != (n,) or weights.shape != (n,):
        raise ValueError(f"labels and weights must have shape ({n},), got "
                         f"{tuple(labels.shape)} and {tuple(weights.shape)}")
    if not logits.is_floating_point() or not weights.is_floating_point():
        raise TypeError(f"logits and weights must be floating point, got {logits.dtype} and {weights.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if not (logits.device == labels.device == weights.device):
        raise ValueError(f"logits, labels and weights must be on one device, got "
                         f"{logits.device}, {labels.device}, {weights.device}")
    if c == 0:
        raise ValueError("logits have no classes (C = 0)")
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= c))
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        raise ValueError(f"labels out of range [0, {c}) (ignore_index={ignore_index}): "
                         f"{labels[bad][:5].tolist()}")
    return n_valid


class WeightedCrossEntropy(torch.autograd.Function):
    """autograd.Function around the fused forward; backward only rescales saved buffers."""

    @staticmethod
    def forward(ctx, logits, labels, weights, reduction, ignore_index, n_valid):
        labels = labels.long().contiguous()
        w = weights.detach().contiguous()
        scale = 1.0 if reduction != "mean" else (1.0 / n_valid if n_valid > 0 else 0.0)
        run = _launch if _use_kernel(logits) else _torch_path
        loss, grad = run(logits, labels, w, scale, ignore_index)
        weighted = w.to(loss.dtype) * loss
        out = weighted if reduction == "none" else weighted.sum() * scale
        ctx.save_for_backward(grad, loss)
        ctx.reduction, ctx.scale, ctx.w_dtype = reduction, scale, weights.dtype
        ctx.mark_non_differentiable(loss)
        return out, loss

    @staticmethod
    def backward(ctx, grad_out, _grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than return wrong numbers
            raise RuntimeError("weighted_cross_entropy does not support double backward "
                               "(create_graph=True); use F.cross_entropy for higher-order gradients")
        grad, loss = ctx.saved_tensors
        g_logits = g_w = None
        if ctx.reduction == "none":
            if ctx.needs_input_grad[0]:
                g_logits = grad * grad_out[:, None].to(grad.dtype)
            row_scale = grad_out
        else:
            if ctx.needs_input_grad[0]:
                unit = grad_out.numel() == 1 and bool(grad_out == 1)
                g_logits = grad if unit else grad * grad_out.to(grad.dtype)
            row_scale = grad_out * ctx.scale
        if ctx.needs_input_grad[2]:
            g_w = (loss * row_scale).to(ctx.w_dtype)
        return g_logits, None, g_w, None, None, None


def weighted_cross_entropy(logits, labels, weights, reduction="mean", ignore_index=-100,
                           return_losses=False):
    """Per-sample weighted cross-entropy, fused with its gradient.

    logits (N, C) fp32/fp16/bf16 (fp64 on the PyTorch path), any strides; labels (N,)
    int64/int32; weights (N,) float. reduction: "none" -> w_i * l_i per row (fp32),
    "sum" -> sum_i w_i l_i, "mean" -> sum_i w_i l_i / (number of non-ignored rows).
    With return_losses=True also returns the unweighted per-row losses l_i (fp32,
    detached, 0 on ignored rows), which the training loop needs anyway.
    If `weights` requires grad, its gradient is the unweighted loss l_i (times the
    reduction's scale). Double backward is not supported and raises.
    """
    n_valid = _check(logits, labels, weights, reduction, ignore_index)
    out, losses = WeightedCrossEntropy.apply(logits, labels, weights, reduction, ignore_index, n_valid)
    return (out, losses) if return_losses else out
