"""The frame around the method: CIFAR files, the command line and its one-line errors,
checkpoints and resume, result records, the scheduler, and two processes on one plan."""
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import molere
import molere_cli
import molere_data
import molere_io
from helpers import ROOT, TINY, fresh_seed, run_main, write_cifar

pytestmark = pytest.mark.slow  # runs the command line, subprocesses or whole trainings (README, Tests)

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_pickle_reader(tmp_path, name):
    _, written = write_cifar(str(tmp_path), name, 20 if name == "cifar10" else 200, 30, seed=fresh_seed())
    x, y, xt, yt, classes = molere_io.load_cifar(str(tmp_path), name, download=False)
    assert classes == (10 if name == "cifar10" else 100)
    src_x, src_y = written["train"]
    assert x.shape == (len(src_x), 3, 32, 32) and x.dtype == torch.uint8
    i = 7  # the first 1024 bytes of a row are the red plane, row-major
    assert np.array_equal(x[i, 0].numpy().ravel(), src_x[i, :1024])
    assert np.array_equal(x[i, 2, 31].numpy(), src_x[i, 2048 + 31 * 32:])
    assert np.array_equal(y.numpy(), src_y) and np.array_equal(yt.numpy(), written["test"][1])
    assert np.array_equal(xt.reshape(len(xt), -1).numpy(), written["test"][0])


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


def test_resume_gives_the_same_result(tmp_path, capsys):
    common = ["--dataset", "synthetic", "--train-subset", "200", "--method", "molere", "--epochs", "3",
              "--seeds", "3"] + TINY
    run_main(common + ["--out", str(tmp_path / "a")], capsys)
    run_main(common + ["--out", str(tmp_path / "b"), "--stop-after", "2"], capsys)
    assert not os.path.exists(tmp_path / "b" / "results.jsonl")  # really interrupted
    assert os.path.exists(tmp_path / "b" / "synthetic-molere-seed3.pt.prev")  # the spare, while it runs
    text = run_main(common + ["--out", str(tmp_path / "b"), "--resume"], capsys).out
    assert "resumed" in text
    a, b = (json.loads(open(tmp_path / d / "results.jsonl").read()) for d in "ab")
    assert a["test_acc"] == b["test_acc"] and a["test_margins"] == b["test_margins"]
    # the code each record ran: a commit of this repository, HEAD or (if one was made during the suite) before it
    commit = a["code"]["commit"]
    assert len(commit) == 40 and isinstance(a["code"]["dirty"], bool)
    assert subprocess.run(["git", "-C", ROOT, "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0
    ca, cb = (torch.load(tmp_path / d / "synthetic-molere-seed3.pt", weights_only=False) for d in "ab")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert torch.equal(ca["val_mask"], cb["val_mask"])
    assert ca["code"] == a["code"]
    metrics = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]  # as the run went
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and metrics[-1]["test_acc"] == b["test_acc"]
    assert [{k: v for k, v in m.items() if k not in ("method", "seed", "config_hash")} for m in metrics] == b["log"]
    for d in "ab":  # once the record is written, the previous epoch's spare checkpoint is removed
        assert not os.path.exists(tmp_path / d / "synthetic-molere-seed3.pt.prev")


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


@pytest.mark.parametrize("extra,msg", BAD)
def test_bad_input_one_line_exit_2(tmp_path, capsys, extra, msg):
    argv = ["--dataset", "synthetic", "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path)] + extra
    with pytest.raises(SystemExit) as e:
        molere_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not os.listdir(tmp_path)  # nothing trained


def test_config_refuses_bad_values_when_built_in_python():
    with pytest.raises(molere.ConfigError, match="--delta"):
        molere.Config(delta=0.7)
    cfg = molere.Config(milestones=[0.5, 0.75])
    assert cfg.milestones == (0.5, 0.75) and molere_cli.config_hash(cfg) == molere_cli.config_hash(molere.Config(milestones=(0.5, 0.75)))
    with pytest.raises(Exception):  # frozen: what defines a run cannot change under it
        cfg.lr = 1.0


def test_missing_and_corrupt_data_one_line_exit_2(tmp_path, capsys):
    base = ["--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        molere_cli.main(base)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "cifar10 not found" in err and "cifar-10-batches-py" in err
    assert len(err.splitlines()) == 1
    folder, _ = write_cifar(str(tmp_path), "cifar10", 10, 10)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"this is not a pickle")
    with pytest.raises(SystemExit) as e:
        molere_cli.main(base)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "data_batch_3 is not a readable CIFAR pickle" in err
    assert len(err.splitlines()) == 1


def test_checkpoint_from_another_config_is_refused(tmp_path, capsys):
    common = ["--dataset", "synthetic", "--train-subset", "100", "--method", "erm", "--epochs", "1",
              "--out", str(tmp_path)] + TINY
    run_main(common, capsys)
    with pytest.raises(SystemExit) as e:  # same checkpoint, no --resume
        molere_cli.main(common)
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        molere_cli.main(common + ["--resume", "--lr", "0.05"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "different config (differs in: lr)" in err and len(err.splitlines()) == 1


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


def test_torn_result_record_is_skipped_and_reported_again(tmp_path, capsys):
    common = ["--dataset", "synthetic", "--train-subset", "100", "--method", "erm", "--epochs", "1",
              "--seeds", "0", "1", "--out", str(tmp_path)] + TINY
    run_main(common, capsys)
    path = tmp_path / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][:len(lines[1]) // 2])  # killed while writing seed 1's record
    text = run_main(common + ["--resume"], capsys)
    assert "line 2 is a torn record" in text.err and len(text.err.strip().splitlines()) <= 3
    assert "[erm seed 0] finished earlier" in text.out and "[erm seed 1] resumed" in text.out
    rows = molere_io.read_results(str(path))  # the torn half line closed off, the record written anew
    assert sorted(r["seed"] for r in rows) == [0, 1]
    assert rows[1]["test_acc"] == json.loads(lines[1])["test_acc"]


def test_two_writers_never_interleave(tmp_path):
    path = str(tmp_path / "results.jsonl")
    code = ("import sys, molere_io\nfor i in range(40):\n"
            "    molere_io.append_result(sys.argv[1], dict(writer=sys.argv[2], i=i, pad='x' * 200_000))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, path, w], cwd=ROOT) for w in "ab"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = molere_io.read_results(path)
    assert len(rows) == 80
    for w in "ab":
        assert [r["i"] for r in rows if r["writer"] == w] == list(range(40))


def test_unreadable_checkpoint_falls_back_or_says_what_to_do(tmp_path, capsys):
    common = ["--dataset", "synthetic", "--train-subset", "100", "--method", "erm", "--epochs", "3",
              "--out", str(tmp_path)] + TINY
    run_main(common + ["--stop-after", "2"], capsys)
    ckpt = tmp_path / "synthetic-erm-seed0.pt"
    assert torch.load(str(ckpt) + ".prev", weights_only=True)["epoch"] == 1  # the previous epoch kept
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # truncated
    text = run_main(common + ["--resume"], capsys)
    assert "falling back to the previous epoch's checkpoint" in text.err and "resumed" in text.out
    assert "at epoch 1" in text.out and molere_io.read_results(str(tmp_path / "results.jsonl"))
    for f in tmp_path.glob("*.pt*"):
        f.write_bytes(b"garbage")
    (tmp_path / "results.jsonl").unlink()
    with pytest.raises(SystemExit) as e:
        molere_cli.main(common + ["--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "cannot be read" in err[-1] and "delete it" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo ran > " + os.environ["BOOM_FILE"],))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOOM_FILE", str(tmp_path / "ran"))
    common = ["--dataset", "synthetic", "--train-subset", "100", "--method", "erm", "--epochs", "2",
              "--out", str(tmp_path / "o")] + TINY
    os.makedirs(tmp_path / "o")
    torch.save({"epoch": 1, "evil": _Boom()}, str(tmp_path / "o" / "synthetic-erm-seed0.pt"))
    with pytest.raises(SystemExit) as e:
        molere_cli.main(common + ["--resume"])
    assert e.value.code == 2 and "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


def test_out_that_cannot_be_created_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        molere_cli.main(["--dataset", "synthetic", "--train-subset", "100", "--epochs", "1", "--method", "erm",
                     "--out", str(tmp_path / "file" / "sub")] + TINY)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "cannot be created or written" in err and len(err.splitlines()) == 1


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOOM_FILE", str(tmp_path / "ran"))
    folder, _ = write_cifar(str(tmp_path), "cifar10", 10, 10)
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        pickle.dump({"data": _Boom(), "labels": [0]}, f)
    with pytest.raises(SystemExit) as e:
        molere_cli.main(["--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "data_batch_2 is not a readable CIFAR pickle" in err and "refused to load posix.system" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ran").exists()
    with open(os.path.join(folder, "data_batch_2"), "rb") as f:  # the check can fail: plain pickle runs it
        pickle.load(f)
    assert (tmp_path / "ran").exists()


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
    assert "| molere | 1 |" in par.stdout  # the table at the end
    a, b = ({(r["method"], r["seed"]): r for r in molere_io.read_results(str(tmp_path / d / "results.jsonl"))}
            for d in ("serial", "par"))
    assert set(a) == set(b) == {(m, 0) for m in molere_cli.ALL}
    for k in a:
        assert a[k]["test_acc"] == b[k]["test_acc"] and a[k]["test_margins"] == b[k]["test_margins"], k
    erm_end = max(i for i, line in enumerate(lines) if line.startswith("[erm seed 0] epoch 2/2"))
    hard_start = min(i for i, line in enumerate(lines) if line.startswith("[lrw-hard seed 0]"))
    assert erm_end < hard_start  # ERM finished before the margins were taken


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


def test_fields_added_later_keep_earlier_configs_identity():
    """Records and checkpoints made before a field existed must still match while it has the value
    every earlier run had (a record without the key means that value, also after a default
    changed); any other value is part of the identity."""
    cfg = molere.Config(**{**molere_cli.LATER, "dataset": "synthetic", "depth": 10, "width": 1})
    stored = molere_cli.config_record(cfg)
    assert not set(molere_cli.LATER) & set(stored)  # all at what earlier runs had: left out
    assert molere_cli.config_hash(molere.Config(**{**molere_cli.LATER, **stored})) == molere_cli.config_hash(cfg)
    noisy = molere.Config(dataset="synthetic", depth=10, width=1, noise="pair:0.2")
    assert molere_cli.config_record(noisy)["noise"] == "pair:0.2"
    assert molere_cli.config_hash(noisy) != molere_cli.config_hash(cfg)
    default = molere.Config(dataset="synthetic", depth=10, width=1)  # a default changed since: in the identity
    assert molere_cli.config_record(default)["meta_input"] == "features+loss"
    assert molere_cli.config_record(default)["meta_steps_min"] == 540
    assert molere_cli.config_record(default)["meta_init"] == "loss-first"
    assert molere_cli.config_hash(default) != molere_cli.config_hash(cfg)


def test_a_plan_launched_twice_trains_each_run_once(tmp_path):
    """Two processes on the same plan and --out at once (a plan launched twice by mistake; with
    --resume, as every reproduce.sh command passes): each run is trained by exactly one of them
    (a lock per run), one record each, no traceback; the other process accounts for it in one
    line, as skipped (being or been trained by the other) or finished earlier, whatever the
    timing of the two."""
    cmd = [sys.executable, "molere.py", "--dataset", "synthetic", "--train-subset", "200", "--method",
           "erm,lrw-random,mwn", "--epochs", "2", "--seeds", "0", "--device", "cpu", "--threads", "1",
           "--out", str(tmp_path), "--resume"] + TINY
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in err for _, err in outs), outs
    rows = molere_io.read_results(str(tmp_path / "results.jsonl"))
    assert sorted(r["method"] for r in rows) == ["erm", "lrw-random", "mwn"]  # each once
    for method in ("erm", "lrw-random", "mwn"):
        tag = f"[{method} seed 0] "
        trained = [out.count(tag + "test accuracy") for out, _ in outs]
        accounted = [out.count(tag + "trained by another process") + out.count(tag + "finished earlier")
                     for out, _ in outs]
        assert sorted(trained) == [0, 1] and [t + a for t, a in zip(trained, accounted)] == [1, 1], (method, outs)
    assert not list(tmp_path.glob("*.tmp*"))



def test_pretrained_torchvision_weights_from_a_local_file(tmp_path, capsys):
    """--arch tv:resnet18 --weights FILE: the file's tensors are in the model that trains (its own
    head replaced for our classes), a run goes end to end, and a file made for another model is
    refused in one line before any training."""
    import torchvision
    torch.manual_seed(fresh_seed())
    good, bad = tmp_path / "r18.pt", tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    torch.save(torchvision.models.resnet34().state_dict(), bad)
    cfg = molere.Config(dataset="synthetic", arch="tv:resnet18", weights=str(good))
    model = molere.make_model(cfg, 10)
    saved = torch.load(good, weights_only=True)
    assert torch.equal(model.body.conv1.weight, saved["conv1.weight"]) and model.fc.out_features == 10
    assert isinstance(model.body.fc, torch.nn.Identity) and model.features == 512
    out = tmp_path / "out"
    argv = ["--dataset", "synthetic", "--train-subset", "200", "--arch", "tv:resnet18", "--epochs", "1",
            "--batch-size", "20", "--method", "lrw-random", "--out", str(out)]
    run_main(argv + ["--weights", str(good)], capsys)
    assert len(molere_io.read_results(str(out / "results.jsonl"))) == 1
    with pytest.raises(SystemExit) as e:
        molere_cli.main(argv + ["--weights", str(bad), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "does not fit tv:resnet18" in err, err


def test_records_are_strict_json_with_nan_as_null(tmp_path):
    """A NaN or infinity in a record (corr(w, l) of constant weights) is written as null: every
    line parses with a strict JSON parser, and the tables still read it."""
    import tools.analyze as analyze

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    path = str(tmp_path / "results.jsonl")
    log = [dict(epoch=1, w_spread=0.1, w_loss_corr=float("nan"), val_loss=2.0),
           dict(epoch=2, w_spread=0.2, w_loss_corr=-0.5, val_loss=float("inf"))]
    for seed in (0, 1):
        molere_io.append_result(path, dict(method="lrw-random", seed=seed, train_acc=90.0, log=log, extra=[1.5, -math.inf]))
    rows = [json.loads(line, parse_constant=refuse) for line in open(path)]
    assert rows[0]["log"][0]["w_loss_corr"] is None and rows[0]["log"][1]["val_loss"] is None
    assert rows[1]["extra"] == [1.5, None] and rows[1]["log"][1]["w_loss_corr"] == -0.5
    table = analyze.regime_table(rows)
    assert "| lrw-random | 90.00, 90.00 | 0.100 → 0.200 | — | — |" in table, table


def test_weights_in_the_formats_people_have(tmp_path):
    """--weights reads a state_dict, {'state_dict'}, {'model'} (torchvision's references),
    {'model_state_dict'}, DDP's `module.` prefix and a checkpoint of molere.py itself (its
    classifier's backbone); a file that would run code, a file torch cannot read and a dict of
    something else are each refused in one line that says which."""
    import torchvision
    torch.manual_seed(fresh_seed())
    sd = torchvision.models.resnet18().state_dict()
    ours = {"model": {**{"body." + k: v for k, v in sd.items() if not k.startswith("fc.")},
                      "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)},
            "config": {"arch": "tv:resnet18"}, "method": "erm", "epoch": 3}
    for name, obj in (("plain", sd), ("sd", {"state_dict": sd}), ("model", {"model": sd, "epoch": 90}),
                      ("msd", {"model_state_dict": sd}), ("ddp", {"module." + k: v for k, v in sd.items()}),
                      ("ours", ours)):
        torch.save(obj, tmp_path / f"{name}.pt")
        model = molere_io.load_torchvision("resnet18", str(tmp_path / f"{name}.pt"))
        assert torch.equal(model.conv1.weight, sd["conv1.weight"]), name
        assert torch.equal(model.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"]), name
    torch.save(torchvision.models.resnet18(), tmp_path / "pickled.pt")  # a whole module: runs code to load
    (tmp_path / "notes.txt").write_text("101 dalmatians\n")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pt")
    for name, says in (("pickled.pt", "would run code when loaded"), ("notes.txt", "is not a file torch.load can read"),
                       ("other.pt", "found a dict with keys ['epoch', 'lr'], not a state_dict")):
        with pytest.raises(molere_io.DataError) as e:
            molere_io.load_torchvision("resnet18", str(tmp_path / name))
        assert says in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


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


def test_a_full_disk_stops_a_run_in_one_line_and_resume_finishes_it(tmp_path, capsys, monkeypatch):
    """ENOSPC while a checkpoint is written (epoch 2), then while the record is appended: each
    stops the run with one line saying what happened, leaves no temporary file and the last
    complete checkpoint intact; --resume then finishes the run with the record an uninterrupted
    run writes."""
    import builtins
    import errno
    argv = ["--dataset", "synthetic", "--train-subset", "200", "--method", "erm", "--epochs", "3"] + TINY
    run_main(argv + ["--out", str(tmp_path / "ref")], capsys)
    out = tmp_path / "out"
    real_save, real_open, saves = torch.save, builtins.open, []

    def full_disk_on_second_save(obj, f):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f)

    def full_disk_for_records(path, *a, **k):
        if str(path).endswith("results.jsonl") and a and "a" in a[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    for patch, says in (((molere_io.torch, "save", full_disk_on_second_save), "could not write the checkpoint"),
                        ((molere_io, "open", full_disk_for_records), "could not append to")):
        monkeypatch.setattr(*patch, raising=False)
        with pytest.raises(SystemExit) as e:
            molere_cli.main(argv + ["--out", str(out), "--resume"])
        monkeypatch.undo()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err and "No space left" in err, err
        assert not [p for p in os.listdir(out) if ".tmp" in p], os.listdir(out)
    ckpt = torch.load(out / "synthetic-erm-seed0.pt", weights_only=True)
    assert ckpt["epoch"] == 3  # the record failed after the last epoch's checkpoint was in place
    run_main(argv + ["--out", str(out), "--resume"], capsys)
    a, b = (molere_io.read_results(str(d / "results.jsonl")) for d in (tmp_path / "ref", out))
    untimed = lambda log: [{k: v for k, v in e.items() if k != "time_s"} for e in log]
    assert len(b) == 1 and a[0]["test_margins"] == b[0]["test_margins"] and untimed(a[0]["log"]) == untimed(b[0]["log"])


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
