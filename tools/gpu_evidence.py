"""GPU-scale evidence in one prepared call (`bash reproduce.sh gpu-evidence` / `gpu-paper-mini`).

    python -m tools.gpu_evidence anchor --data-root packed --out runs/gpu-evidence
    python -m tools.gpu_evidence paper-mini --data-root packed --out runs/gpu-paper-mini
    python -m tools.gpu_evidence anchor --smoke ...      # a few hundred images, 1-2 epochs, any device

Both read the packed CIFAR-10 subset (`python -m tools.pack`) and run every (method, seed) of
their study as parallel processes on the one GPU (tools/schedule.py --per-gpu), sized to end
inside the call:
  anchor      40% uniform label noise, a clean meta set of 2% of the pool, ResNet-32 with
              augmentation: ERM, LRW-Random (clean S_val), MOLERE, MW-Net and L2RW (METHOD.md §8)
  paper-mini  the paper's balanced comparison on clean labels, WRN-16-4 with augmentation:
              ERM, ERM-tr, LRW-Random, LRW-Easy, LRW-Hard and MOLERE (Easy and Hard after ERM)
Sizing is measured, not hoped: every run of the plan is started at once as a probe that times
a few steps of its method under that contention, and the epochs are the most that fit the
time left (`--deadline` from the start of the command, less a margin for evaluation), for 3
seeds if at least --min-epochs fit, else 2, else 1. The plan (seeds, epochs, the probe's
numbers) is written to OUT/plan.json first, so a rerun continues the same study (--resume)
instead of sizing a new one. Everything lands in OUT: plan.json, results.jsonl, run.log,
table.md (printed last) and the figures.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import molere
import molere_cli
import molere_io

STUDIES = {
    "anchor": dict(
        methods="erm,lrw-random,molere,mwn,l2rw", chains=[["erm"], ["lrw-random"], ["molere"], ["mwn"], ["l2rw"]],
        args=["--arch", "resnet32", "--noise", "uniform:0.4", "--meta-set", "clean:240", "--batch-size", "128"],
        smoke=["--train-subset", "200", "--meta-set", "clean:20", "--batch-size", "20"]),
    "paper-mini": dict(
        methods="all", chains=[["erm", "lrw-hard"], ["erm", "lrw-easy"], ["erm-tr"], ["lrw-random"], ["molere"]],
        args=["--depth", "16", "--width", "4", "--dropout", "0.3", "--batch-size", "128"],
        smoke=["--train-subset", "200", "--depth", "10", "--width", "1", "--batch-size", "20"]),
}


def study_args(study, data_root, out, epochs, seeds, smoke):
    """The molere.py command line of the study at a given size."""
    s = STUDIES[study]
    return (["--dataset", "packed", "--data-root", data_root, "--method", s["methods"], "--seeds", *map(str, range(seeds)),
             "--epochs", str(epochs), "--warmup-epochs", str(min(max(1, epochs // 4), epochs - 1)), "--resplit-every",
             str(max(1, epochs // 8)), "--eval-every", "0", "--out", out, "--resume"]
            + s["args"] + (s["smoke"] if smoke else []))


def probe(argv, steps):
    """Seconds per training step of one method under the contention of the whole plan (run in
    its own process): a few untimed steps, then `steps` timed ones through molere.train_steps."""
    args, cfg, rt, data = molere_cli.setup(argv)
    method = args.method
    run = molere.Run(cfg, method, 0, data, rt.device)
    # a margin split needs a finished ERM model; a random split of the same size costs the same
    run.val_mask = molere.initial_split("lrw-random" if method in molere.NEEDS_ERM else method, data, cfg.delta, 0)
    batches = molere.epoch_batches(run, cfg)
    batches = batches.repeat(math.ceil((steps + 3) / len(batches)), 1)
    molere.train_steps(run, data, cfg, batches[:3])
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    molere.train_steps(run, data, cfg, batches[3:3 + steps])
    sync()
    per_step = (time.perf_counter() - t0) / steps
    print(json.dumps(dict(method=method, per_step=per_step, steps_per_epoch=len(molere.epoch_batches(run, cfg)))))


def measure(study, data_root, out, seeds, smoke, steps, log, device):
    """Start every run of the plan at once as a probe; {method: (s per step, steps per epoch)}
    taken as the slowest seed's."""
    argv = study_args(study, data_root, os.path.join(out, "probe"), 4, 1, smoke) + ["--device", device]
    methods = molere_cli.plan_of(STUDIES[study]["methods"])
    threads = str(max(1, len(os.sched_getaffinity(0)) // (len(methods) * seeds)))
    procs = [subprocess.Popen([sys.executable, "-m", "tools.gpu_evidence", "probe", "--steps", str(steps), "--",
                               *argv, "--method", m, "--threads", threads],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m in methods for _ in range(seeds)]
    found = {}
    for p in procs:
        text = p.communicate()[0]
        log.write(text)
        line = text.strip().splitlines()[-1] if text.strip() else ""
        if p.returncode != 0 or not line.startswith("{"):
            sys.exit(f"gpu_evidence: error: a probe failed: {line or 'no output'} (details in {out}/run.log)")
        r = json.loads(line)
        old = found.get(r["method"], (0, 0))
        found[r["method"]] = (max(old[0], r["per_step"]), r["steps_per_epoch"])
    return found


def epochs_that_fit(study, speeds, seconds):
    """The most epochs whose slowest chain of runs (ERM then LRW-Hard, say) fits `seconds`."""
    per_epoch = max(sum(speeds[m][0] * speeds[m][1] for m in chain) for chain in STUDIES[study]["chains"])
    return int(seconds // per_epoch), per_epoch


def size(study, a, t_start, log):
    plan_path = os.path.join(a.out, "plan.json")
    if os.path.exists(plan_path):
        plan = json.load(open(plan_path))
        print(f"continuing the study sized earlier ({plan_path}): {plan['seeds']} seed(s), {plan['epochs']} epochs")
        return plan
    for seeds in range(a.max_seeds, 0, -1):
        speeds = measure(study, a.data_root, a.out, seeds, a.smoke, a.probe_steps, log, a.device)
        left = a.deadline - (time.time() - t_start) - a.margin
        epochs, per_epoch = epochs_that_fit(study, speeds, left)
        print(f"probe with {seeds} seed(s) in parallel: " + ", ".join(
            f"{m} {1000 * s:.1f} ms/step x {n}" for m, (s, n) in speeds.items())
            + f"; slowest chain {per_epoch:.1f} s/epoch; {left:.0f} s left -> {epochs} epochs", flush=True)
        if epochs >= a.min_epochs or seeds == 1:
            break
    epochs = min(max(epochs, 2), a.max_epochs)  # MOLERE needs an epoch after its warm-up
    plan = dict(study=study, seeds=seeds, epochs=epochs, seconds_left=round(left), probe={m: dict(
        ms_per_step=round(1000 * s, 2), steps_per_epoch=n) for m, (s, n) in speeds.items()},
        device=molere_io.device_name(torch.device(a.device)))
    os.makedirs(a.out, exist_ok=True)
    json.dump(plan, open(plan_path, "w"), indent=1)
    return plan


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:  # internal: one probe process
        sep = argv.index("--")
        return probe(argv[sep + 1:], int(argv[argv.index("--steps") + 1]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--data-root", default="packed", help="folder holding cifar10-packed.npz (default: packed)")
    p.add_argument("--out", help="folder for everything (default: runs/gpu-STUDY)")
    p.add_argument("--deadline", type=float, default=360, help="seconds from the start for sizing and training "
                   "(default: 360; evaluation and the table come after)")
    p.add_argument("--margin", type=float, default=40, help="seconds kept back for start-up and evaluation (default: 40)")
    p.add_argument("--min-epochs", type=int, default=15, help="fewest epochs worth running with 3 seeds (default: 15)")
    p.add_argument("--max-epochs", type=int, default=200, help="most epochs (default: 200)")
    p.add_argument("--max-seeds", type=int, default=3, help="most seeds (default: 3)")
    p.add_argument("--probe-steps", type=int, default=20, help="timed steps per probe (default: 20)")
    p.add_argument("--smoke", action="store_true", help="a few hundred images: checks the command, proves nothing")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join("runs", f"gpu-{a.study}")
    t_start = time.time()
    try:
        molere_io.load_packed(a.data_root)  # one line, before anything starts, if the data is missing
        molere_io.make_writable_folder(a.out, "--out")
    except molere_io.UserError as e:
        sys.exit(f"gpu_evidence: error: {e}")
    a.device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    with open(os.path.join(a.out, "run.log"), "a") as log:
        plan = size(a.study, a, t_start, log)
        cmd = study_args(a.study, a.data_root, a.out, plan["epochs"], plan["seeds"], a.smoke)
        cmd += ["--device", a.device]
        workers = len(molere_cli.plan_of(STUDIES[a.study]["methods"])) * plan["seeds"]
        print(f"{a.study}: {plan['seeds']} seed(s) x {plan['epochs']} epochs, {workers} parallel runs; "
              f"log in {a.out}/run.log", flush=True)
        schedule = [sys.executable, "-m", "tools.schedule", "--workers", str(workers),
                    "--per-gpu", str(workers), "--", *cmd]
        code = subprocess.run(schedule, stdout=log, stderr=subprocess.STDOUT).returncode
    results = os.path.join(a.out, "results.jsonl")
    analysis = subprocess.run([sys.executable, "-m", "molere_analyze", results, "--figures", a.out],
                              capture_output=True, text=True)
    table = (f"{a.study} on {plan['device']}: {plan['seeds']} seed(s), {plan['epochs']} epochs, sized from the "
             f"probe in {a.out}/plan.json; {time.time() - t_start:.0f} s in all\n\n" + analysis.stdout)
    open(os.path.join(a.out, "table.md"), "w").write(table)
    print(table + analysis.stderr)
    if code != 0:
        sys.exit(f"gpu_evidence: error: some runs failed (exit {code}); see {a.out}/run.log, rerun to continue")


if __name__ == "__main__":
    main()
