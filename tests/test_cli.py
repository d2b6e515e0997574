"""The command line and the scheduler: every method end to end, every bad flag in one line before any
work, the help, progress lines, TensorBoard, two CPU workers against a serial run, a worker killed
mid-run."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import molere
import molere_cli
import molere_data
import molere_io
from helpers import ROOT, TINY, run_main, write_cifar


@pytest.mark.slow
def test_every_method_runs_end_to_end_on_cifar100_layout(tmp_path, capsys):
    write_cifar(str(tmp_path / "data"), "cifar100", 300, 100)
    out = str(tmp_path / "out")
    text = run_main(["--dataset", "cifar100", "--data-root", str(tmp_path / "data"), "--method", "all",
                     "--epochs", "2", "--out", out] + TINY, capsys).out
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert [r["method"] for r in rows] == list(molere_cli.ALL)
    for r in rows:
        assert 0 <= r["test_acc"] <= 100 and len(r["test_margins"]) == 100 and len(r["log"]) == 2
        assert 0 <= r["train_acc"] <= 100 and len(r["train_margins"]) == 300
        assert all(math.isfinite(e["loss"]) for e in r["log"])
        assert r["val_size"] == len(r["val_mask"]) == (0 if r["method"] == "erm" else 100)  # 1 of 3 per class
        reweights = r["method"] not in ("erm", "erm-tr")
        assert (r["train_weights"] is not None) == reweights
        if reweights:
            assert all(0 < w < 1 for w in r["train_weights"])
            assert all(math.isfinite(e[k]) for e in r["log"] for k in ("w_spread", "w_loss_corr", "val_loss"))
    by = {r["method"]: r for r in rows}
    assert by["erm-tr"]["val_mask"] == by["lrw-random"]["val_mask"]  # the control holds out the same images
    assert "paper's CIFAR-100 gain" in text and "| molere | 1 |" in text and "| erm-tr (control) | 1 |" in text
    assert "new split" in text  # MOLERE re-split after its warm-up epoch


@pytest.mark.slow
def test_noisy_labels_with_a_clean_meta_set_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    text = run_main(["--dataset", "synthetic", "--train-subset", "200", "--noise", "uniform:0.4",
                     "--meta-set", "clean:20", "--method", "erm,lrw-random,mwn,molere",
                     "--epochs", "2", "--out", str(out)] + TINY, capsys).out
    rows = {r["method"]: r for r in molere_io.read_results(str(out / "results.jsonl"))}
    assert set(rows) == {"erm", "lrw-random", "mwn", "molere"} and "| mwn (baseline) | 1 |" in text
    data = molere_data.load_data(molere.Config(dataset="synthetic", train_subset=200, noise="uniform:0.4",
                                          meta_set="clean:20"), torch.device("cpu"))
    meta = data.meta_mask.nonzero().squeeze(1).tolist()
    assert rows["lrw-random"]["val_mask"] == rows["mwn"]["val_mask"] == meta  # the clean set is S_val
    assert rows["molere"]["val_mask"] != meta  # MOLERE splits the noisy pool itself
    assert rows["erm"]["noisy"] == (data.y != data.y_true).nonzero().squeeze(1).tolist()
    assert len(rows["mwn"]["train_weights"]) == 200 and rows["erm"]["train_weights"] is None
    mwn_log = rows["mwn"]["log"][0]
    assert mwn_log["steps"] == 9 and math.isfinite(mwn_log["val_loss"])  # 180 images, batch 20, K = 1


BAD = [
    (["--method", "lrw-medium"], "unknown --method"),
    (["--arch", "resnet18"], "--arch must be wrn, resnet32 or tv:NAME"),
    (["--arch", "tv:resnet9000"], "--arch must be wrn, resnet32 or tv:NAME"),
    (["--weights", "w.pt"], "--weights is for --arch tv:NAME only"),
    (["--arch", "tv:resnet18", "--weights", "/nonexistent/w.pt"], "no such file"),
    (["--noise", "instance:1.5"], "--noise must be none, uniform:p, pair:p or instance:p"),
    (["--meta-input", "loss"], "--meta-input must be features or features+loss"),
    (["--dataset", "mnist"], "unknown --dataset"),
    (["--delta", "0"], "--delta must be in (0, 0.5]"),
    (["--delta", "0.6"], "--delta must be in (0, 0.5]"),
    (["--K", "0"], "--K must be at least 1"),
    (["--K", "two"], "invalid int value"),
    (["--depth", "12"], "--depth must be 6n+4"),
    (["--batch-size", "1000"], "larger than a split"),
    (["--gamma", "-1"], "--gamma in (0, 1]"),
    (["--milestones", "0.5", "2"], "--milestones are fractions of --epochs, each in (0, 1]"),
    (["--meta-lr", "inf"], "--meta-lr must be a finite positive number"),
    (["--lr", "nan"], "--lr must be a finite positive number"),
    (["--lambda-size", "-1"], "--lambda-size and --lambda-bal must be finite and non-negative"),
    (["--hidden", "0"], "--hidden must be at least 1"),
    (["--weight-norm", "max"], "--weight-norm must be batch or none"),
    (["--splitter-data", "train"], "--splitter-data must be val or all"),
    (["--noise", "uniform:1.5"], "--noise must be none, uniform:p, pair:p or instance:p"),
    (["--noise", "gauss:0.2"], "--noise must be none, uniform:p, pair:p or instance:p"),
    (["--meta-set", "clean:x"], "--meta-set must be split, clean:N or outside:N with N >= 1, or folder:PATH"),
    (["--meta-set", "outside:5", "--dataset", "folder:x"], "--meta-set outside:N draws from a built-in set"),
    (["--meta-set", "clean:5", "--method", "erm,lrw-random"], "N must be between 10"),
    (["--meta-set", "clean:50", "--method", "lrw-hard"], "LRW-Easy and LRW-Hard have no split to choose"),
    (["--imbalance", "0.5"], "--imbalance is a ratio"),
    (["--arch", "vgg"], "--arch must be wrn, resnet32 or tv:NAME"),
    (["--arch", "tv:fasterrcnn_resnet50_fpn"], "NAME a torchvision classification model"),  # never downloads
    (["--arch", "tv:inception_v3"], "--arch tv:inception_v3 needs images of at least 75 x 75 pixels"),
    (["--arch", "tv:vit_b_16", "--weights", "vit.pt"], "needs images of at least 224 x 224 pixels"),
    (["--method", "erm,lrw-medium"], "unknown --method"),
    (["--seeds", "0", "-1"], "--seeds must be non-negative"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra,msg", BAD)
def test_bad_input_one_line_exit_2(tmp_path, capsys, extra, msg):
    argv = ["--dataset", "synthetic", "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path)] + extra
    with pytest.raises(SystemExit) as e:
        molere_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not os.listdir(tmp_path)  # nothing trained


@pytest.mark.slow
def test_config_refuses_bad_values_when_built_in_python():
    with pytest.raises(molere.ConfigError, match="--delta"):
        molere.Config(delta=0.7)
    cfg = molere.Config(milestones=[0.5, 0.75])
    assert cfg.milestones == (0.5, 0.75) and molere_cli.config_hash(cfg) == molere_cli.config_hash(molere.Config(milestones=(0.5, 0.75)))
    with pytest.raises(Exception):  # frozen: what defines a run cannot change under it
        cfg.lr = 1.0


@pytest.mark.slow
def test_out_that_cannot_be_created_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        molere_cli.main(["--dataset", "synthetic", "--train-subset", "100", "--epochs", "1", "--method", "erm",
                     "--out", str(tmp_path / "file" / "sub")] + TINY)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "cannot be created or written" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_cli_help_and_exit_code_in_a_real_process():
    env = dict(os.environ)
    help_text = subprocess.run([sys.executable, "molere.py", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--dataset", "--data-root", "--method", "--seeds", "--epochs", "--batch-size", "--lr",
                 "--depth", "--width", "--delta", "--K", "--out", "--resume", "--device"):
        assert flag in help_text
    bad = subprocess.run([sys.executable, "molere.py", "--method", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "molere.py: error: unknown --method 'nope': choose from erm, erm-tr, lrw-random, lrw-easy, lrw-hard, molere, "
        "mwn, l2rw, erm-cb, erm-hard, all, or a comma list of methods"]


@pytest.mark.slow
def test_progress_inside_an_epoch(tmp_path, capsys, monkeypatch):
    """Inside an epoch a progress line (steps done of the epoch's, images a second, the last
    step's loss, the epoch's ETA) is printed every PROGRESS_EVERY_S seconds when the output is not
    a terminal; each epoch's own line gives the run's ETA, and the whole plan's while more is to come."""
    import re
    monkeypatch.setattr(molere_cli, "PROGRESS_EVERY_S", 0)
    out = run_main(["--dataset", "synthetic", "--train-subset", "200", "--method", "erm,lrw-random", "--epochs", "2",
                    "--out", str(tmp_path)] + TINY, capsys).out
    steps = [line for line in out.splitlines() if " step " in line and "lrw-random" in line]
    pattern = r"\[lrw-random seed 0\] epoch (\d)/2 step (\d+)/9 \| \d+ img/s \| loss \d+\.\d{3} \| epoch ETA \d+:\d\d"
    assert all(re.fullmatch(pattern, line) for line in steps), steps
    assert [re.fullmatch(pattern, line).group(1, 2) for line in steps] == [(e, str(s)) for e in "12" for s in range(2, 9)]
    assert "[lrw-random seed 0] epoch 2/2 | lr" in out
    ends = [line for line in out.splitlines() if re.match(r"\[\S+ seed 0\] epoch \d/2 \| lr", line)]
    assert [bool(re.search(r"ETA \d+:\d\d:\d\d \(plan \d+:\d\d:\d\d\)$", e)) for e in ends] == \
        [True, True, False, False], ends  # the plan's ETA while another run is still to come


@pytest.mark.slow
def test_tensorboard_gets_the_metrics_files_numbers_or_one_line_without_the_package(tmp_path, capsys, monkeypatch):
    written = {}

    class Writer:  # torch.utils.tensorboard.SummaryWriter's calls, recorded
        def __init__(self, log_dir):
            self.log = written.setdefault(log_dir, {"closed": False, "scalars": []})

        def add_scalar(self, tag, value, step):
            self.log["scalars"].append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.log["closed"] = True

    monkeypatch.setattr(molere_cli, "tensorboard_writer", Writer)
    out = tmp_path / "out"
    run_main(["--dataset", "synthetic", "--train-subset", "100", "--method", "mwn", "--epochs", "2",
              "--noise", "uniform:0.3", "--meta-set", "clean:20", "--delta", "0.2", "--tensorboard", "--out", str(out)] + TINY,
             capsys)
    metrics = molere_io.read_results(str(out / "metrics.jsonl"))
    log = written[str(out / "tensorboard" / "mwn-seed0")]
    want = [(k, v, e["epoch"]) for e in metrics for k, v in e.items()
            if isinstance(v, (int, float)) and k not in ("epoch", "seed")]
    assert log["closed"] and sorted(log["scalars"]) == sorted(want)
    assert {"loss", "w_auc", "meta_acc", "test_acc"} <= {k for k, _, _ in want}
    monkeypatch.setattr(molere_cli, "tensorboard_writer", None)
    with pytest.raises(SystemExit) as e:
        run_main(["--dataset", "synthetic", "--tensorboard", "--out", str(tmp_path / "x")], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install tensorboard" in err


@pytest.mark.slow
def test_scheduler_with_two_cpu_workers_gives_the_serial_results(tmp_path):
    """tools/schedule.py runs each (method, seed) as its own molere.py process, two at a time;
    the records must equal those of one serial molere.py run of the same plan."""
    argv = ["--dataset", "synthetic", "--train-subset", "200", "--method", "all", "--epochs", "2",
            "--seeds", "0", "--device", "cpu", "--threads", "1"] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1")
    serial = subprocess.run([sys.executable, "molere.py"] + argv + ["--out", str(tmp_path / "serial")],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert serial.returncode == 0, serial.stderr
    par = subprocess.run([sys.executable, "-m", "tools.schedule", "--workers", "2", "--"] + argv +
                         ["--out", str(tmp_path / "par")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert par.returncode == 0, par.stdout + par.stderr
    lines = par.stdout.splitlines()
    assert all(line.startswith("[") for line in lines[1:] if line and not line.startswith(("|", "results on")))
    assert "| molere | 1 |" in par.stdout and par.stdout.count("results on ") == 1  # the table, once, at the end
    a, b = ({(r["method"], r["seed"]): r for r in molere_io.read_results(str(tmp_path / d / "results.jsonl"))}
            for d in ("serial", "par"))
    assert set(a) == set(b) == {(m, 0) for m in molere_cli.ALL}
    for k in a:
        assert a[k]["test_acc"] == b[k]["test_acc"] and a[k]["test_margins"] == b[k]["test_margins"], k
    erm_end = max(i for i, line in enumerate(lines) if line.startswith("[erm seed 0] epoch 2/2"))
    hard_start = min(i for i, line in enumerate(lines) if line.startswith("[lrw-hard seed 0]"))
    assert erm_end < hard_start  # ERM finished before the margins were taken


@pytest.mark.slow
def test_a_scheduler_worker_killed_mid_run_is_reported_and_resumed(tmp_path, capsys, monkeypatch):
    """A worker process killed (SIGKILL) after its first checkpoint: the scheduler says so in one
    line per run and ends with one line; rerunning the same command resumes that run from its
    checkpoint and finishes the plan, each run's record written once."""
    import threading
    import time

    from tools import schedule
    out = tmp_path / "out"
    argv = ["--dataset", "synthetic", "--train-subset", "200", "--method", "erm,lrw-random", "--epochs", "3",
            "--seeds", "0", "--device", "cpu", "--threads", "1", "--out", str(out), "--resume"] + TINY
    real = schedule.launch

    def launch(argv_, method, seed, *rest):
        proc = real(argv_, method, seed, *rest)
        if method == "lrw-random":
            ckpt = out / "synthetic-lrw-random-seed0.pt"

            def kill_after_first_checkpoint():
                while not ckpt.exists() and proc.poll() is None:
                    time.sleep(0.02)
                proc.kill()
            threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
        return proc

    monkeypatch.setattr(schedule, "launch", launch)
    monkeypatch.setattr(sys, "argv", ["schedule", "--workers", "2", "--"] + argv)
    with pytest.raises(SystemExit) as e:
        schedule.main()
    text = capsys.readouterr()
    assert e.value.code == 2 and "[lrw-random seed 0] killed by SIGKILL; its finished epochs are checkpointed" in text.out
    assert text.err.strip().splitlines() == [text.err.strip()] and "did not finish: [lrw-random seed 0]" in text.err
    monkeypatch.setattr(schedule, "launch", real)
    schedule.main()
    text = capsys.readouterr().out
    assert "1 runs on 2 CPU worker(s); 1 finished earlier" in text and "[lrw-random seed 0] resumed from" in text
    rows = molere_io.read_results(str(out / "results.jsonl"))
    assert sorted(r["method"] for r in rows) == ["erm", "lrw-random"]


@pytest.mark.slow
def test_flags_that_do_not_fit_the_data_are_named_together_with_a_command_that_fits(tmp_path, capsys):
    """The recipe's defaults on 90 images: a warm-up as long as the run and a batch larger than a split are
    named in one line, with the values that would fit; that command then runs. The same in Python: Config
    names every bad value at once, and a Run every value that does not fit its data."""
    argv = ["--dataset", "synthetic", "--train-subset", "90", "--depth", "10", "--width", "1", "--method", "molere",
            "--epochs", "3", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        molere_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--warmup-epochs 25" in err and "--batch-size 128 is larger than a split (train 80, validation 10 of 90 images)" in err, err
    fits = err.split("This would fit: python molere.py ", 1)[1].split()
    assert fits[-4:] == ["--warmup-epochs", "1", "--batch-size", "8"], fits
    run_main(fits + ["--stop-after", "1"], capsys)  # the suggestion runs
    assert (tmp_path / "o" / "metrics.jsonl").exists()
    with pytest.raises(molere.ConfigError) as e:
        molere.Config(delta=0.7, K=0, lr=-1.0)
    assert all(flag in str(e.value) for flag in ("--delta", "--K", "--lr")), e.value
    cfg = molere.Config(dataset="synthetic", train_subset=90, depth=10, width=1, epochs=3)
    data = molere_data.load_data(cfg, torch.device("cpu"))
    with pytest.raises(molere.ConfigError, match="this would fit: --warmup-epochs 1 --batch-size 8"):
        molere.Run(cfg, "molere", 0, data, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # lr 1e3's inf - inf in the kernel
def test_a_run_that_diverges_stops_in_one_line_and_keeps_its_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """At lr 1e3 the first epoch's loss is astronomical: one line naming the epoch, its steps, the value and
    "lower --lr", exit 2, no result. Where an epoch after a good one turns non-finite, the good epoch's
    checkpoint stays as it was and readable, and no record is written."""
    base = ["--dataset", "synthetic", "--train-subset", "200", "--method", "lrw-random", "--epochs", "3"] + TINY
    with pytest.raises(SystemExit) as e:
        molere_cli.main(base + ["--lr", "1e3", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "diverged at epoch 1 (steps 1-" in err and "lower --lr" in err and "training loss is" in err, err
    assert not (tmp_path / "a" / "results.jsonl").exists()

    steps = molere.train_steps
    def nan_in_epoch_2(run, *a, **k):
        stats, seen = steps(run, *a, **k)
        return ({**stats, "loss": float("nan")} if run.epoch == 1 else stats), seen
    monkeypatch.setattr(molere, "train_steps", nan_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        molere_cli.main(base + ["--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "diverged at epoch 2" in err and "is nan" in err, err
    cfg = molere.Config(dataset="synthetic", train_subset=200, epochs=3, depth=10, width=1, dropout=0.1, batch_size=20,
                        warmup_epochs=1, resplit_every=1, hidden=16)  # TINY's
    ckpt = molere_io.read_checkpoint(str(tmp_path / "b" / "synthetic-lrw-random-seed0.pt"), molere_cli.config_record(cfg))
    assert ckpt["epoch"] == 1 and not (tmp_path / "b" / "results.jsonl").exists()
    assert not list((tmp_path / "b").glob("*.lock"))
