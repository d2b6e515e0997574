"""One run over several processes (torchrun, DDP; gloo on the CPU): two processes with B/2
images each must compute what one process computes with B, for every method, to float32
tolerance; and the command line under torchrun trains each run once, writes from one process,
and resumes."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import molere
import molere_data
import molere_io
import molere_world
from helpers import ROOT, TINY

pytestmark = pytest.mark.slow  # runs the command line, subprocesses or whole trainings (README, Tests)

METHODS = ["erm", "lrw-random", "molere", "mwn", "l2rw"]


class NoNormNet(nn.Module):
    """A classifier without BatchNorm (whose batch statistics are per process under DDP, so no
    exact comparison could hold with it): conv, softplus, mean pool, linear; (logits, h)."""

    def __init__(self, classes):
        super().__init__()
        self.conv, self.fc, self.features = nn.Conv2d(3, 8, 3, 2, 1), nn.Linear(8, classes), 8

    def forward(self, x):
        h = F.softplus(self.conv(x)).mean((2, 3))
        return self.fc(h), h


def train_all(out, batch_size):
    """Each method for 3 epochs (MOLERE: a warm-up epoch, then its hard split twice); rank 0
    saves every network it trained."""
    cfg = molere.Config(dataset="synthetic", train_subset=160, epochs=3, batch_size=batch_size, hidden=16,
                        augment=False, dropout=0.0, warmup_epochs=1, resplit_every=1, delta=0.25, K=2)
    data = molere_data.load_data(cfg, torch.device("cpu"))
    nets = {}
    for method in METHODS:
        run = molere.Run(cfg, method, 0, data, torch.device("cpu"))
        run.val_mask = molere.initial_split(method, data, cfg.delta, 0)
        molere.train(run, data, cfg)
        nets[method] = {k: getattr(run, k).state_dict() for k in ("model", "meta", "splitter")}
        nets[method]["val_mask"] = run.val_mask
    if molere_world.rank() == 0:
        torch.save(nets, out)


def process(rank, world, init, out, batch_size):
    torch.set_num_threads(1)
    molere.make_model = lambda cfg, classes: NoNormNet(classes)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    molere_world.spread_over()
    try:
        train_all(out, batch_size)
    finally:
        dist.destroy_process_group()


def test_two_processes_with_half_batches_compute_what_one_process_computes(tmp_path, monkeypatch):
    """G all-reduced by DDP, the meta step's v and L_val averaged, g_i local with the global B, the
    weight normalisation and L2RW's sum over the whole batch, the phi gradients summed, the
    splitter's step the same in every process: the networks after 3 epochs (about 20 classifier
    steps, 10 meta steps, MOLERE's hard split twice) agree with one process's."""
    mp.spawn(process, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt"), 24), nprocs=2)
    monkeypatch.setattr(molere, "make_model", lambda cfg, classes: NoNormNet(classes))
    train_all(str(tmp_path / "one.pt"), 24)  # one process, here
    two, one = (torch.load(tmp_path / f, weights_only=True) for f in ("two.pt", "one.pt"))
    for method in METHODS:
        assert torch.equal(two[method]["val_mask"], one[method]["val_mask"]), method
        for net in ("model", "meta", "splitter"):
            for k, v in one[method][net].items():
                torch.testing.assert_close(two[method][net][k], v, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{method} {net}.{k}: {m}")
    moved = (one["lrw-random"]["meta"]["net.0.weight"] - two["erm"]["meta"]["net.0.weight"]).abs().max()
    assert moved > 1e-3  # phi did learn: the comparison is not of untouched initial values


def own_group(rank, init, out):
    """A caller's own process group: molere stays in its process until asked to spread over it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        t = torch.tensor([float(rank + 1)], requires_grad=True)
        alone = (molere_world.world(), molere_world.rank(), molere_world.world_mean(t).item(), molere_world.my_share(torch.arange(4)).tolist())
        molere_world.spread_over()
        mean = molere_world.world_mean(t)
        mean.backward()  # d(mean over both)/dt_this, summed over both processes' means: 2 x 1/2
        spread = (molere_world.world(), molere_world.rank(), mean.item(), molere_world.my_share(torch.arange(4)).tolist(), t.grad.item())
        torch.save((alone, spread), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_callers_process_group_is_used_only_when_asked(tmp_path):
    mp.spawn(own_group, args=(str(tmp_path / "init"), str(tmp_path / "r")), nprocs=2)
    for rank in (0, 1):
        alone, spread = torch.load(f"{tmp_path / 'r'}.{rank}")
        assert alone == (1, 0, float(rank + 1), [0, 1, 2, 3])
        assert spread == (2, rank, 1.5, [[0, 1], [2, 3]][rank], 1.0)


def test_torchrun_trains_each_run_once_from_rank_0_and_resumes(tmp_path):
    """The command line under torchrun with 2 CPU processes (gloo): stopped after one epoch and
    resumed, every run of the plan ends with one record and one progress line per epoch."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "molere.py",
           "--dataset", "synthetic", "--train-subset", "200", "--method", "lrw-random,molere", "--epochs", "2",
           "--device", "cpu", "--threads", "1", "--out", str(tmp_path), "--resume"] + TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(run + ["--stop-after", "1"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("[lrw-random seed 0] epoch 1/2") == 1 and "stopped after 1 epoch" in first.stdout
    second = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "[lrw-random seed 0] resumed from" in second.stdout and second.stdout.count("[molere seed 0] epoch 2/2") == 1
    rows = molere_io.read_results(str(tmp_path / "results.jsonl"))
    assert sorted(r["method"] for r in rows) == ["lrw-random", "molere"]
    assert all(len(r["log"]) == 2 for r in rows)
    bad = subprocess.run(run[:6] + ["molere.py", "--dataset", "synthetic", "--batch-size", "25", "--out",
                                    str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and bad.stderr.count("must split evenly over the 2 torchrun processes") == 1
