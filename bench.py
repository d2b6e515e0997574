"""Step throughput of ERM versus MOLERE (same model, data and batch): images/s and the ratio.

    python bench.py                          # CPU: WRN-10-2, batch 64, synthetic CIFAR-shaped data
    python bench.py --depth 28 --width 10 --batch-size 128 --steps 50 --device cuda   # the paper's model

Both methods run the real `train_epoch` of molere.py for --warmup untimed steps, then --steps
timed ones (a multiple of K, so MOLERE's share of meta and splitter steps is exact), in
--repeats alternating rounds; the median round counts. Split
refreshes and evaluation are outside the timed region: they cost one eval pass over S every
R epochs, which this measures nowhere. With --check-nan N it also runs N MOLERE steps and
checks that the classifier, meta-network and splitter parameters stay finite.
The last line printed is `molere/erm time ratio: X.XX`.
"""
import argparse
import statistics
import time

import torch

import molere


def timed_steps(method, args, data, device, steps, warmup):
    run = molere.Run(args, method, 0, data, device)
    if method != "erm":
        run.val_mask = molere.per_class_topk(torch.rand(len(data.y), device=device), data.y,
                                             args.delta, data.classes)
    if warmup:
        molere.train_epoch(run, data, args, max_steps=warmup)
    sync(device)
    t = time.perf_counter()
    molere.train_epoch(run, data, args, max_steps=steps)
    sync(device)
    return time.perf_counter() - t, run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_meta_step(args, data, device, repeats=5):
    """Milliseconds of each part of one MOLERE meta step, on one training batch."""
    run = molere.Run(args, "molere", 0, data, device)
    model, idx = run.model, torch.arange(args.batch_size, device=device)
    x, y = molere.get_batch(data, idx, augment=True), data.y[idx]

    def classifier_step():
        logits, h = model(x)
        model.zero_grad(set_to_none=True)
        molere.weighted_cross_entropy(logits, y, torch.sigmoid(run.meta(h, y)).detach()).backward()
        return h.detach()

    h = classifier_step()
    grads, rng = [p.grad for p in model.parameters()], molere.rng_state(device)
    parts = {
        "classifier step (forward + backward)": classifier_step,
        "look-ahead validation forward + backward": lambda: molere.lookahead_val_grad(model, grads, 0.1, x, y),
        "whole fast meta-gradient (look-ahead + JVP + dw/dphi)":
            lambda: molere.meta_grad_fast(model, run.meta, x, y, h, grads, x, y, 0.1, rng),
        "splitter step": lambda: molere.splitter_step(run, data, args),
    }
    print("| part of a MOLERE step | ms |\n|---|---|")
    for name, fn in parts.items():
        fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        print(f"| {name} | {(time.perf_counter() - t) / repeats * 1000:.0f} |")


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
    p.add_argument("--compile", action="store_true")
    p.add_argument("--check-nan", type=int, default=0, help="also run this many MOLERE steps and check for NaN")
    p.add_argument("--profile", action="store_true", help="also time the parts of one meta step")
    b = p.parse_args()
    argv = ["--dataset", "synthetic", "--depth", str(b.depth), "--width", str(b.width),
            "--batch-size", str(b.batch_size), "--K", str(b.K), "--device", b.device, "--epochs", "200"]
    args = molere.build_parser().parse_args(argv + (["--compile"] if b.compile else []))
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = molere.load_data(args, device)
    steps = -(-b.steps // b.K) * b.K
    print(f"WRN-{b.depth}-{b.width}, batch {b.batch_size}, K={b.K}, {steps} timed steps, "
          f"{molere.device_name(device)}, torch {torch.__version__}")
    times = {"erm": [], "molere": []}
    for _ in range(b.repeats):  # alternate the two, so drifts of the machine hit both alike
        for method in times:
            times[method].append(timed_steps(method, args, data, device, steps, b.warmup)[0])
    rows = {m: statistics.median(t) for m, t in times.items()}
    print(f"| method | s/step (median of {b.repeats}) | images/s | all rounds (s/step) |\n|---|---|---|---|")
    for m, secs in rows.items():
        print(f"| {m} | {secs / steps:.4f} | {steps * b.batch_size / secs:.1f} | "
              f"{', '.join(f'{t / steps:.4f}' for t in times[m])} |")
    if b.check_nan:
        _, run = timed_steps("molere", args, data, device, b.check_nan, 0)
        finite = all(torch.isfinite(p).all() for net in (run.model, run.meta, run.splitter)
                     for p in net.parameters())
        print(f"{b.check_nan} MOLERE steps: parameters finite: {'yes' if finite else 'NO'}")
    if b.profile:
        profile_meta_step(args, data, device)
    print(f"molere/erm time ratio: {rows['molere'] / rows['erm']:.2f}")


if __name__ == "__main__":
    main()
