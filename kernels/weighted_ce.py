"""Fused per-sample weighted cross-entropy: loss and logits-gradient in one kernel.

    out = reduce_i  w_i * l_i,      l_i = logsumexp(x_i) - x_{i, y_i}
    d out / d x_i = s * w_i * (softmax(x_i) - onehot(y_i))
    d out / d w_i = s * l_i

with s = 1 for reduction "sum", s = 1 / (number of non-ignored rows) for "mean"
(a mean over an all-ignored batch is 0, not NaN), and per-row upstream gradients
for "none". Rows whose label is `ignore_index` have loss 0 and gradient 0.

The forward pass does all the work, and never waits for the GPU: no .item(), no
data-dependent Python branch, so the CPU keeps queueing work and the pair is CUDA-graph
capturable. Each program owns ROWS rows. Narrow rows (up to 8192 classes) are read once
and held in registers; small class counts (10, 100) pack many rows into one program, so a
training batch is one or a few programs. Wider rows stream through column blocks with an
online (running max, running sum) softmax, then a second pass, which finds the row in L2,
writes the gradient into its own buffer (never into the logits: an in-place write there
corrupts anyone else who saved them). The row count for "mean" is computed on the device,
inside the kernel when the batch is small. Backward scales the saved gradient by the
upstream gradient in a tiny kernel that reads it on the device and does nothing when it is
1 (the usual case), so no host synchronisation decides anything.

Labels outside [0, C) (other than ignore_index): on the PyTorch path (CPU) a ValueError
before any work; on the kernel path, where checking would cost a synchronisation, the
row's loss and gradient are NaN, which surfaces in the loss, and with TRITON_DEBUG=1 a
device-side assert names the problem.

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
MAX_SINGLE_BLOCK = 8192     # rows up to this many classes live in registers, read once
MULTI_BLOCK = 4096          # column block for longer rows
TILE = 4096                 # elements one program holds for narrow rows: ROWS = TILE // BLOCK
COUNT_IN_KERNEL = 1 << 20   # programs x rows up to this: each program counts the valid rows itself
REDUCTIONS = ("none", "sum", "mean")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if triton is not None:

    @triton.jit
    def _weighted_ce_kernel(
        x_ptr, x_stride_row, x_stride_col,  # logits (N, C), any strides
        y_ptr, w_ptr, count_ptr,            # labels (N,), weights (N,), valid-row count (1,) for MEAN
        loss_ptr, wloss_ptr,                # out: l_i and s * w_i * l_i, fp32 (N,)
        g_ptr, g_stride_row,                # out: gradient (N, C), contiguous rows
        n_rows, n_cols, ignore_index,
        MEAN: tl.constexpr, COUNT_HERE: tl.constexpr,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (y != ignore_index)
        in_range = (y >= 0) & (y < n_cols)
        tl.device_assert(in_range | ~valid, "weighted_cross_entropy: label out of range [0, C)")
        bad = valid & ~in_range
        y = tl.where(valid & in_range, y, 0)
        scale = 1.0
        if MEAN:  # s = 1 / max(valid rows, 1), never through the host
            if COUNT_HERE:
                n_valid = 0.0
                for start in range(0, n_rows, 1024):
                    offs = start + tl.arange(0, 1024)
                    lab = tl.load(y_ptr + offs, mask=offs < n_rows, other=ignore_index)
                    n_valid += tl.sum((lab != ignore_index).to(tl.float32), 0)
            else:
                n_valid = tl.load(count_ptr).to(tl.float32)
            scale = 1.0 / tl.maximum(n_valid, 1.0)
        coef = tl.where(valid, tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * scale, 0.0)
        rows = rows.to(tl.int64)
        x_rows = x_ptr + rows[:, None] * x_stride_row
        g_rows = g_ptr + rows[:, None] * g_stride_row
        x_y = tl.load(x_ptr + rows * x_stride_row + y * x_stride_col, mask=row_ok, other=0.0).to(tl.float32)
        cols = tl.arange(0, BLOCK)[None, :]

        if SINGLE_BLOCK:
            col_ok = cols < n_cols
            x = tl.load(x_rows + cols * x_stride_col, mask=row_ok[:, None] & col_ok, other=0.0).to(tl.float32)
            x = tl.where(col_ok, x, float("-inf"))
            m = tl.max(x, 1)
            e = tl.exp(x - m[:, None])
            d = tl.sum(e, 1)
            g = coef[:, None] * (e / d[:, None] - tl.where(cols == y[:, None], 1.0, 0.0))
            g = tl.where(bad[:, None], float("nan"), g)
            tl.store(g_rows + cols, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)
            lse = m + tl.log(d)
        else:
            # pass 1: online softmax statistics, m = running max, d = sum exp(x - m); keep the row in L2
            m = tl.full([ROWS], float("-inf"), tl.float32)
            d = tl.zeros([ROWS], tl.float32)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                x = tl.load(x_rows + offs * x_stride_col, mask=row_ok[:, None] & (offs < n_cols), other=0.0,
                            eviction_policy="evict_last").to(tl.float32)
                x = tl.where(offs < n_cols, x, float("-inf"))
                m_new = tl.maximum(m, tl.max(x, 1))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
                m = m_new
            lse = m + tl.log(d)
            # pass 2: gradient coef * (softmax - onehot), the row read again (from L2) for the last time
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = row_ok[:, None] & (offs < n_cols)
                x = tl.load(x_rows + offs * x_stride_col, mask=mask, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                g = coef[:, None] * (tl.exp(x - lse[:, None]) - tl.where(offs == y[:, None], 1.0, 0.0))
                g = tl.where(bad[:, None], float("nan"), g)
                tl.store(g_rows + offs, g.to(g_ptr.dtype.element_ty), mask=mask)

        loss = tl.where(bad, float("nan"), tl.where(valid, lse - x_y, 0.0))
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(wloss_ptr + rows, coef * loss, mask=row_ok)

    @triton.jit
    def _scale_by_upstream_kernel(g_ptr, n, up_ptr, BLOCK: tl.constexpr):
        """g *= upstream gradient (a scalar on the device); nothing read or written when it is 1."""
        up = tl.load(up_ptr).to(tl.float32)
        if up != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            tl.store(g_ptr + offs, (g * up).to(g_ptr.dtype.element_ty), mask=offs < n)


def _use_kernel(logits):
    if triton is None or logits.dtype not in KERNEL_DTYPES:
        return False
    return logits.is_cuda or (INTERPRET and logits.device.type == "cpu")


def _launch(logits, labels, weights, mean, ignore_index):
    n, c = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    wloss = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return loss, wloss, grad
    single = c <= MAX_SINGLE_BLOCK
    block = triton.next_power_of_2(c) if single else MULTI_BLOCK
    rows = min(max(TILE // block, 1), triton.next_power_of_2(n)) if single else 1
    programs = triton.cdiv(n, rows)
    count_here = programs * n <= COUNT_IN_KERNEL
    count = loss if not mean or count_here else (labels != ignore_index).sum()  # loss: an unused placeholder
    num_warps = 4 if rows * block <= 2048 else (8 if rows * block <= 8192 else 16)
    _weighted_ce_kernel[(programs,)](
        logits, logits.stride(0), logits.stride(1), labels, weights, count, loss, wloss,
        grad, grad.stride(0), n, c, ignore_index,
        MEAN=mean, COUNT_HERE=count_here, ROWS=rows, BLOCK=block, SINGLE_BLOCK=single, num_warps=num_warps)
    return loss, wloss, grad


def _torch_path(logits, labels, weights, mean, ignore_index):
    """Same buffers as the kernel, in PyTorch (CPU without the interpreter, float64)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(x, dim=1)
    loss = torch.where(valid, lse - x.gather(1, y[:, None]).squeeze(1), torch.zeros_like(lse))
    p = torch.exp(x - lse[:, None])
    p.scatter_add_(1, y[:, None], -torch.ones_like(lse)[:, None])
    scale = 1.0 / valid.sum().clamp(min=1).to(acc) if mean else 1.0
    coef = torch.where(valid, weights.to(acc) * scale, torch.zeros_like(lse))
    loss = loss.float() if acc == torch.float32 else loss
    return loss, coef.to(loss.dtype) * loss, (p * coef[:, None]).to(logits.dtype)


def _check(logits, labels, weights, reduction, ignore_index, kernel):
    """Raises on bad input. Shapes, dtypes and devices only, except on the PyTorch path, where
    the labels are on the CPU and their range is checked too (free there)."""
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
    if not kernel and labels.device.type == "cpu":
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= c))
        if bad.any():
            raise ValueError(f"labels out of range [0, {c}) (ignore_index={ignore_index}): "
                             f"{labels[bad][:5].tolist()}")


class WeightedCrossEntropy(torch.autograd.Function):
    """autograd.Function around the fused forward; backward only rescales saved buffers."""

    @staticmethod
    def forward(ctx, logits, labels, weights, reduction, ignore_index):
        labels = labels.long().contiguous()
        w = weights.detach().contiguous()
        kernel = _use_kernel(logits)
        loss, wloss, grad = (_launch if kernel else _torch_path)(logits, labels, w, reduction == "mean", ignore_index)
        out = wloss if reduction == "none" else wloss.sum()
        ctx.save_for_backward(grad, loss, labels)
        ctx.reduction, ctx.ignore_index, ctx.kernel, ctx.w_dtype = reduction, ignore_index, kernel, weights.dtype
        ctx.used = False
        ctx.mark_non_differentiable(loss)
        return out, loss

    @staticmethod
    def backward(ctx, grad_out, _grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than return wrong numbers
            raise RuntimeError("weighted_cross_entropy does not support double backward "
                               "(create_graph=True); use F.cross_entropy for higher-order gradients")
        grad, loss, labels = ctx.saved_tensors
        g_logits = g_w = None
        if ctx.reduction == "none":
            if ctx.needs_input_grad[0]:
                g_logits = grad * grad_out[:, None].to(grad.dtype)
            row_scale = grad_out
        else:
            if ctx.needs_input_grad[0]:
                if ctx.kernel:  # in place: the saved gradient serves one backward
                    if ctx.used:
                        raise RuntimeError("weighted_cross_entropy: a second backward through the same call "
                                           "(retain_graph=True) is not supported; call it again instead")
                    ctx.used = True
                    block = 1024
                    _scale_by_upstream_kernel[(triton.cdiv(grad.numel(), block),)](
                        grad, grad.numel(), grad_out.reshape(1), BLOCK=block)
                    g_logits = grad
                else:
                    g_logits = grad * grad_out.to(grad.dtype)
            row_scale = grad_out
            if ctx.reduction == "mean":
                row_scale = grad_out / (labels != ctx.ignore_index).sum().clamp(min=1).to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            g_w = (loss * row_scale).to(ctx.w_dtype)
        return g_logits, None, g_w, None, None


def weighted_cross_entropy(logits, labels, weights, reduction="mean", ignore_index=-100,
                           return_losses=False):
    """Per-sample weighted cross-entropy, fused with its gradient.

    logits (N, C) fp32/fp16/bf16 (fp64 on the PyTorch path), any strides; labels (N,)
    int64/int32; weights (N,) float. reduction: "none" -> w_i * l_i per row (fp32),
    "sum" -> sum_i w_i l_i, "mean" -> sum_i w_i l_i / (number of non-ignored rows).
    With return_losses=True also returns the unweighted per-row losses l_i (fp32,
    detached, 0 on ignored rows), which the training loop needs anyway.
    If `weights` requires grad, its gradient is the unweighted loss l_i (times the
    reduction's scale). Double backward is not supported and raises. No host
    synchronisation on the kernel path (see the module docstring for bad labels there).
    """
    _check(logits, labels, weights, reduction, ignore_index, _use_kernel(logits))
    out, losses = WeightedCrossEntropy.apply(logits, labels, weights, reduction, ignore_index)
    return (out, losses) if return_losses else out
