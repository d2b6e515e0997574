"""Step throughput of ERM versus MOLERE (same model, data and batch): images/s and the ratio.

    python -m tools.bench                    # CPU: WRN-10-2, batch 64, synthetic CIFAR-shaped data
    python -m tools.bench --depth 28 --width 10 --batch-size 128 --steps 50 --device cuda   # the paper's model

Both methods run molere.py's own `train_steps` (classifier step, meta step, splitter step)
for --warmup untimed steps, then --steps timed ones (a multiple of K, so MOLERE's share of
meta and splitter steps is exact), in --repeats alternating rounds; the median round counts.
Split refreshes and evaluation are outside the timed region: they cost one eval pass over S
every R epochs, which this measures nowhere. With --check-nan N it also runs N MOLERE steps
and checks that the classifier, meta-network and splitter parameters stay finite.
With --compile, as training's --compile: the classifier's plain steps and evaluation and the
meta step's look-ahead and JVP are compiled (compile time falls in the untimed warm-up steps).
The last line printed is `molere/erm time ratio: X.XX` (`... ratio (compiled): X.XX`).
"""
import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import molere
import molere_cli
import molere_data
import molere_io


def eager_weighted_ce(logits, labels, weights, reduction="mean", ignore_index=-100, return_losses=False):
    """What the fused kernel replaces: F.cross_entropy per row, weighted, averaged (eager)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=ignore_index)
    out = (weights * losses).sum() / (labels != ignore_index).sum().clamp(min=1)
    return (out, losses.detach()) if return_losses else out


@contextlib.contextmanager
def eager_ce():
    """The training loop with eager cross-entropy in place of the fused kernel."""
    fused = molere.weighted_cross_entropy
    molere.weighted_cross_entropy = eager_weighted_ce
    try:
        yield
    finally:
        molere.weighted_cross_entropy = fused


def batches(run, cfg, n):
    """n training batches: consecutive epochs of molere.epoch_batches, as training draws them."""
    out = []
    while sum(len(b) for b in out) < n:
        out.append(molere.epoch_batches(run, cfg))
    return torch.cat(out)[:n]


def timed_steps(method, cfg, rt, data, steps, warmup):
    if method == "erm, eager CE":
        with eager_ce():
            return timed_steps("erm", cfg, rt, data, steps, warmup)
    run = molere.Run(cfg, method, 0, data, rt.device, rt.compile)
    if method != "erm":
        run.val_mask = molere.random_split(data, cfg.delta, 0)
    todo = batches(run, cfg, warmup + steps)
    if warmup:
        molere.train_steps(run, data, cfg, todo[:warmup])
    sync(rt.device)
    t = time.perf_counter()
    molere.train_steps(run, data, cfg, todo[warmup:])
    sync(rt.device)
    return time.perf_counter() - t, run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_meta_step(cfg, rt, data, repeats=5):
    """Milliseconds of each part of one MOLERE step, on one training batch, through the same
    functions, autocast and memory format as training."""
    run = molere.Run(cfg, "molere", 0, data, rt.device, rt.compile)
    run.val_mask = molere.random_split(data, cfg.delta, 0)
    idx, val_idx = batches(run, cfg, 1)[0], run.val_mask.nonzero().squeeze(1)
    x, y = data.batch(idx, cfg.augment), data.y[idx]
    step = molere.classifier_step(run, cfg, x, y, replay=True)
    grads, rng, val = [g.clone() for g in step.G], step.rng, molere.validation_set(run, data)

    losses, loss_jvp = ((molere_io.Compiled(molere.per_sample_losses), molere_io.Compiled(molere.loss_jvp))
                        if rt.compile else (molere.per_sample_losses, molere.loss_jvp))

    def lookahead():  # what weight_grad_fast does before its JVP
        theta1 = {n: (p.detach() - cfg.lr * g).requires_grad_()
                  for (n, p), g in zip(run.model.named_parameters(), grads)}
        with molere.autocast(rt.device):
            torch.autograd.grad(losses(run.model, theta1, x, y).mean(), list(theta1.values()))

    def jvp():  # G stands in for v as the tangent: the same cost
        params = {n: p.detach() for n, p in run.model.named_parameters()}
        with molere.autocast(rt.device), molere.replay_rng(rng, rt.device):
            loss_jvp(run.model, params, dict(zip(params, grads)), x, y)

    def meta():
        molere.meta_step(run, cfg, step._replace(G=grads), *molere.validation_batch(data, val, cfg))

    parts = {
        "classifier step (forward + backward)": lambda: molere.classifier_step(run, cfg, x, y),
        "look-ahead validation forward + backward": lookahead,
        "JVP of the per-sample losses (dropout replayed)": jvp,
        "whole meta step (look-ahead + JVP + dw/dphi + Adam)": meta,
        "splitter step": lambda: molere.splitter_step(run, data, cfg, val_idx),
    }
    print(f"| part of a MOLERE step ({'bf16 autocast, channels_last' if rt.device.type == 'cuda' else 'fp32'}"
          f"{', compiled classifier and meta step' if rt.compile else ''}) | time |\n|---|---|")
    for name, fn in parts.items():
        fn()
        sync(rt.device)
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(rt.device)
        print(f"| {name}{', compiled' if rt.compile else ''} | {(time.perf_counter() - t) / repeats * 1000:.1f} ms |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="timed steps per method (rounded up to a multiple of K)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per method; the median counts")
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="as molere.py --compile")
    p.add_argument("--check-nan", type=int, default=0, help="also run this many MOLERE steps and check for NaN")
    p.add_argument("--profile", action="store_true", help="also time the parts of one meta step")
    b = p.parse_args()
    cfg = molere.Config(dataset="synthetic", depth=b.depth, width=b.width, batch_size=b.batch_size, K=b.K)
    device = torch.device(b.device if b.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rt = molere_cli.Runtime(device, compile=b.compile)
    data = molere_data.load_data(cfg, device)
    steps = -(-b.steps // b.K) * b.K
    print(f"WRN-{b.depth}-{b.width}, batch {b.batch_size}, K={b.K}, {steps} timed steps, "
          f"{molere_io.device_name(device)}, torch {torch.__version__}")
    times = {"erm": [], "erm, eager CE": [], "molere": []}
    for _ in range(b.repeats):  # alternate the two, so drifts of the machine hit both alike
        for method in times:
            times[method].append(timed_steps(method, cfg, rt, data, steps, b.warmup)[0])
    rows = {m: statistics.median(t) for m, t in times.items()}
    print(f"| method | s/step (median of {b.repeats}) | images/s | all rounds (s/step) |\n|---|---|---|---|")
    for m, secs in rows.items():
        print(f"| {m}{', compiled' if rt.compile else ''} | {secs / steps:.4f} | {steps * b.batch_size / secs:.1f} | "
              f"{', '.join(f'{t / steps:.4f}' for t in times[m])} |")
    if b.check_nan:
        _, run = timed_steps("molere", cfg, rt, data, b.check_nan, 0)
        finite = all(torch.isfinite(p).all() for net in (run.model, run.meta, run.splitter)
                     for p in net.parameters())
        print(f"{b.check_nan} MOLERE steps: parameters finite: {'yes' if finite else 'NO'}")
    if b.profile:
        profile_meta_step(cfg, rt, data)
    print(f"molere/erm time ratio{' (compiled)' if rt.compile else ''}: {rows['molere'] / rows['erm']:.2f}")


if __name__ == "__main__":
    main()
