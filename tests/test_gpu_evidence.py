"""The packed CIFAR-10 subset (tools/pack.py) and the two prepared GPU commands
(tools/gpu_evidence.py), at a tiny scale on the CPU, so that a lent GPU never meets a broken script."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import molere_cli
import molere_io
from helpers import ROOT, write_cifar
from tools import pack

pytestmark = pytest.mark.slow  # runs the command line, subprocesses or whole trainings (README, Tests)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(str(root), "cifar10", 100, 200)
    path, size = pack.pack(str(root), str(root / "packed"), n_train=300, n_test=100)
    return root, path


def test_pack_is_balanced_reproducible_and_read_back_safely(packed):
    root, path = packed
    x, y, xt, yt, classes = molere_io.load_packed(os.path.dirname(path))
    assert x.dtype == torch.uint8 and x.shape == (300, 3, 32, 32) and xt.shape == (100, 3, 32, 32)
    assert torch.bincount(y, minlength=10).tolist() == [30] * 10 and torch.bincount(yt, minlength=10).tolist() == [10] * 10
    full_x, full_y, _, _, _ = molere_io.load_cifar(str(root), "cifar10", download=False)
    rows = {bytes(img.numpy().tobytes()): int(lbl) for img, lbl in zip(full_x, full_y)}
    assert all(rows[bytes(img.numpy().tobytes())] == int(lbl) for img, lbl in zip(x, y))  # real images, their labels
    with np.load(path, allow_pickle=False) as f:
        assert len(f["sources"]) == 6 and all(len(s.split()[0]) == 64 for s in f["sources"])  # SHA-256 of each file
    again, _ = pack.pack(str(root), str(root / "again"), n_train=300, n_test=100)
    assert open(again, "rb").read() == open(path, "rb").read()  # byte for byte


def test_packed_dataset_trains_through_the_cli(packed, tmp_path, capsys):
    _, path = packed
    molere_cli.main(["--dataset", "packed", "--data-root", os.path.dirname(path), "--method", "erm", "--epochs", "1",
                 "--depth", "10", "--width", "1", "--batch-size", "50", "--eval-every", "0", "--out", str(tmp_path)])
    assert "packed: 300 training / 100 test images" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["missing", "not a zip", "object array", "bad labels"])
def test_bad_packed_file_one_line_exit_2(tmp_path, capsys, damage):
    target = tmp_path / molere_io.PACKED
    if damage == "not a zip":
        target.write_bytes(b"garbage")
    elif damage == "object array":
        np.savez(target, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1), x_test=np.zeros(1), y_test=np.zeros(1),
                 classes=np.array(10))
    elif damage == "bad labels":
        np.savez(target, x=np.zeros((2, 3, 32, 32), np.uint8), y=np.array([0, 10]),
                 x_test=np.zeros((1, 3, 32, 32), np.uint8), y_test=np.array([0]), classes=np.array(10))
    with pytest.raises(SystemExit) as e:
        molere_cli.main(["--dataset", "packed", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and molere_io.PACKED in err, err
    assert {"missing": "tools.pack", "not a zip": "not a packed CIFAR file", "object array": "not a packed CIFAR file",
            "bad labels": "labels in [0, 10)"}[damage] in err


@pytest.mark.parametrize("study,runs", [("anchor", 5), ("paper-mini", 6)])
def test_gpu_command_smoke_on_the_cpu(packed, tmp_path, study, runs):
    """The whole command: probe, sizing, parallel runs, table; a rerun continues the same plan."""
    _, path = packed
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tools.gpu_evidence", study, "--smoke", "--cpu", "--data-root", os.path.dirname(path),
           "--out", str(out), "--deadline", "30", "--max-epochs", "2", "--max-seeds", "1", "--probe-steps", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    plan = json.load(open(out / "plan.json"))
    assert plan["seeds"] == 1 and plan["epochs"] == 2 and set(plan["probe"]) == set(
        molere_cli.plan_of(tools_study(study)["methods"]))
    rows = molere_io.read_results(str(out / "results.jsonl"))
    assert len(rows) == runs and all(len(r["log"]) == 2 for r in rows)
    table = open(out / "table.md").read()
    assert table in done.stdout and "| erm | 1 |" in table and f"{study} on CPU" in table
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "continuing the study sized earlier" in again.stdout
    assert len(molere_io.read_results(str(out / "results.jsonl"))) == runs


def tools_study(study):
    from tools import gpu_evidence
    return gpu_evidence.STUDIES[study]
