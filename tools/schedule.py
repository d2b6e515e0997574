"""Spread the (method, seed) runs of one molere.py plan over several GPUs, or CPU processes.

    python -m tools.schedule --workers 4 -- --dataset cifar100 --method all --seeds 0 1 2 --out runs/cifar100
    bash reproduce.sh cifar100 --gpus 4                     # the same through reproduce.sh

Everything after `--` is a molere.py command line; it is checked once, here, before anything
starts (one line and exit 2 for bad input). Then each run is one `molere.py --method M
--seeds S --resume` process, at most one per worker at a time: on CUDA worker i is cuda:i
(with `--per-gpu N`, N workers share each GPU: worker i is cuda:(i mod GPUs), useful for small
models whose steps are launch-bound), and every worker gets an equal share of the cores this
process may use. A seed's ERM finishes before its
LRW-Easy and LRW-Hard start (they split S by its margins); the other runs need nothing.
Every line a run prints carries its tag. Records go to OUT/results.jsonl (appends are
locked, so workers never interleave), and the results table is printed at the end. Finished
runs are skipped; rerun the same command to continue after an interruption.
"""
import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import torch

import molere
import molere_cli
import molere_io
import molere_report as report

def jobs_of(args, cfg):
    """(method, seed) runs still to do, in plan order; a seed's ERM added where a train-twice
    run needs it and no finished record exists (as molere.py alone would train it too)."""
    done = {(r["method"], r["seed"]) for r in molere_io.read_results(os.path.join(args.out, "results.jsonl"), molere_cli.config_hash(cfg))}
    todo = []
    for seed in args.seeds:
        plan = molere_cli.plan_of(args.method)
        if any(m in molere.NEEDS_ERM for m in plan) and "erm" not in plan:
            plan = ["erm"] + plan
        todo += [(m, seed) for m in plan if (m, seed) not in done]
    return todo, done


def launch(argv, method, seed, worker, workers, device_type):
    extra = ["--method", method, "--seeds", str(seed), "--resume", "--no-table"]  # the table: once, at the end
    if "--threads" not in argv:  # an equal share of the cores, unless the plan names its threads
        extra += ["--threads", str(max(1, len(os.sched_getaffinity(0)) // workers))]
    extra += ["--device", f"cuda:{worker % torch.cuda.device_count()}" if device_type == "cuda" else "cpu"]
    return subprocess.Popen([sys.executable, "-u", os.path.join(os.path.dirname(molere.__file__), "molere.py")]
                            + argv + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pump(proc, tag, lock):
    """Print a run's output, each line with the run's tag."""
    for line in proc.stdout:
        line = line.rstrip("\n")
        with lock:
            print(line if line.startswith(tag) else f"{tag} {line}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage="python -m tools.schedule --workers N -- MOLERE_ARGS")
    p.add_argument("--workers", type=int, default=0,
                   help="parallel runs (default: the number of CUDA devices times --per-gpu, else 2)")
    p.add_argument("--per-gpu", type=int, default=1, help="runs sharing one GPU at a time (default: 1)")
    own, argv = sys.argv[1:], []
    if "--" in own:
        own, argv = own[:own.index("--")], own[own.index("--") + 1:]
    own = p.parse_args(own)
    args, cfg, rt, _ = molere_cli.setup(argv)
    slots = torch.cuda.device_count() * max(1, own.per_gpu)
    workers = own.workers or (slots if rt.device.type == "cuda" else 2)
    if workers < 1 or own.per_gpu < 1 or (rt.device.type == "cuda" and workers > slots):
        molere_cli.fail(f"--workers {workers}: need 1 to {slots} on this machine's GPUs "
                    f"({torch.cuda.device_count()} GPU(s) x --per-gpu {own.per_gpu})")
    todo, done = jobs_of(args, cfg)
    print(f"{len(todo)} runs on {workers} {'GPU' if rt.device.type == 'cuda' else 'CPU'} worker(s); "
          f"{len(done)} finished earlier; results -> {os.path.join(args.out, 'results.jsonl')}", flush=True)
    signal.signal(signal.SIGTERM, molere_cli.interrupt)  # `kill` stops the workers' runs too, checkpoints kept
    lock, running, failed = threading.Lock(), {}, []
    erm_done = {s for m, s in done if m == "erm"}
    try:
        while todo or running:
            for worker, (proc, tag, (method, seed), thread) in list(running.items()):
                if proc.poll() is None:
                    continue
                thread.join()
                del running[worker]
                if proc.returncode == 0 and method == "erm":
                    erm_done.add(seed)
                elif proc.returncode != 0:
                    failed.append(tag)
                    how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                           else f"failed (exit {proc.returncode})")
                    print(f"{tag} {how}; its finished epochs are checkpointed, a rerun continues it", flush=True)
                    if method == "erm":  # its train-twice runs cannot start
                        for job in [j for j in todo if j[0] in molere.NEEDS_ERM and j[1] == seed]:
                            todo.remove(job)
                            print(f"[{job[0]} seed {seed}] not started: its ERM failed", flush=True)
            for job in [j for j in todo if j[0] not in molere.NEEDS_ERM or j[1] in erm_done]:
                free = [w for w in range(workers) if w not in running]
                if not free:
                    break
                todo.remove(job)
                tag = f"[{job[0]} seed {job[1]}]"
                proc = launch(argv, *job, free[0], workers, rt.device.type)
                thread = threading.Thread(target=pump, args=(proc, tag, lock), daemon=True)
                thread.start()
                running[free[0]] = (proc, tag, job, thread)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc, *_ in running.values():
            proc.terminate()  # each run ends like Ctrl-C, its checkpoints kept
        for proc, *_ in running.values():
            proc.wait()
        print(f"\ninterrupted: rerun the same command to continue ({args.out} keeps every finished epoch)",
              file=sys.stderr)
        sys.exit(130)
    print(report.report_table(molere_io.read_results(os.path.join(args.out, "results.jsonl"), molere_cli.config_hash(cfg)), cfg.dataset))
    if failed:
        molere_cli.fail(f"{len(failed)} run(s) did not finish: {', '.join(failed)}; rerun the same command to "
                        f"continue them from their checkpoints")


if __name__ == "__main__":
    main()
