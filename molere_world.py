"""One run over several processes (torchrun; README, "Several GPUs"): the small wrapper molere.py
calls. In a plain run every function here is the identity (one process, rank 0), so a reader of
the method can read `world_mean(t)` as `t`.

Under torchrun every process draws the same batch indices and keeps its share (`my_share`); the
classifier's backward goes through DDP (`wrap`), which all-reduces G; the look-ahead's v, L_val
and the weights' normaliser are averaged with `world_mean`. Nothing is spread until `spread_over`
is called (the command line calls it under torchrun), so a caller's own process group is left
alone.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

PROCESSES = None  # the process group each run is spread over (`spread_over`); None: this process alone


def spread_over(group=None):
    """Spread every run of this process over a process group, torchrun's whole world by default:
    each process takes its share of every batch, and G, v, L_val and the weights' normaliser are
    reduced over the group."""
    global PROCESSES
    PROCESSES = dist.group.WORLD if group is None else group


def world():
    """How many processes share each batch: the size of `spread_over`'s group, else 1."""
    return 1 if PROCESSES is None else dist.get_world_size(PROCESSES)


def rank():
    return 0 if PROCESSES is None else dist.get_rank(PROCESSES)


class WorldSum(torch.autograd.Function):
    """t summed over the processes; the backward sums the incoming gradients the same way, since
    every process's sum depends on every process's t (torch.distributed.nn's all_reduce, which
    is deprecated, did the same)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=PROCESSES)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=PROCESSES)
        return grad


def world_mean(t):
    """t averaged over the processes, differentiably (its backward sums the gradients that
    reach it from every process); t itself in a plain run."""
    return t if world() == 1 else WorldSum.apply(t) / world()


def world_sum(t):
    return world_mean(t) * world()


def my_share(idx):
    """This process's contiguous 1/world of each batch of indices (the last axis) that every
    process drew alike."""
    if world() == 1:
        return idx
    return idx.view(*idx.shape[:-1], world(), idx.shape[-1] // world())[..., rank(), :]


def wrap(model, device):
    """The module the classifier's training steps run through: DDP over the group (its backward
    all-reduces G, so every process applies the whole batch's gradient), else `model` itself."""
    if world() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, process_group=PROCESSES)
