"""What a run leaves behind and reads back: checkpoints (resume bit-identical, another config or
data refused, unreadable or unsafe files), result records (strict JSON, torn lines, two writers,
the per-class and subpopulation numbers, early stopping on the meta set), locks, a full disk."""
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
from helpers import CPU, ROOT, TINY, Boom, records_of, run_main


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOOM_FILE", str(tmp_path / "ran"))
    common = ["--dataset", "synthetic", "--train-subset", "100", "--method", "erm", "--epochs", "2",
              "--out", str(tmp_path / "o")] + TINY
    os.makedirs(tmp_path / "o")
    torch.save({"epoch": 1, "evil": Boom()}, str(tmp_path / "o" / "synthetic-erm-seed0.pt"))
    with pytest.raises(SystemExit) as e:
        molere_cli.main(common + ["--resume"])
    assert e.value.code == 2 and "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_records_are_strict_json_with_nan_as_null(tmp_path):
    """A NaN or infinity in a record (corr(w, l) of constant weights) is written as null: every
    line parses with a strict JSON parser, and the tables still read it."""
    import molere_analyze as analyze

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_each_seed_of_a_run_has_its_own_lock(tmp_path, capsys, monkeypatch):
    """The lock that stops two processes training one run is keyed by method AND seed: two seeds
    of one method (two workers of a schedule) must not block each other."""
    taken = []
    real = molere_io.run_lock

    def spy(path, **how):
        taken.append(path)
        return real(path, **how)

    monkeypatch.setattr(molere_cli, "run_lock", spy)
    run_main(["--dataset", "synthetic", "--train-subset", "100", "--depth", "10", "--width", "1", "--epochs", "1",
              "--batch-size", "20", "--method", "erm", "--seeds", "0", "1", "--eval-every", "0",
              "--out", str(tmp_path)], capsys)
    assert len(taken) == 2 and len(set(taken)) == 2, taken
    with real(taken[0]) as mine0, real(taken[1]) as mine1:  # held at once: neither blocks the other
        assert mine0 and mine1


@pytest.mark.slow
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


@pytest.mark.slow
def test_records_carry_the_subpopulations_and_the_classes(tmp_path, capsys):
    rows = records_of(tmp_path, capsys, "--dataset", "spurious", "--train-subset", "300", "--method", "erm,lrw-hard",
                      "--epochs", "2")
    data = molere_data.load_data(molere.Config(dataset="spurious", train_subset=300), CPU)
    for r in rows.values():
        assert r["minority"] == data.minority.nonzero().squeeze(1).tolist()
        # the test set is half and half: the overall accuracy is the mean of the two halves
        assert abs(r["test_acc"] - (r["test_acc_majority"] + r["test_acc_minority"]) / 2) < 1e-3
        by_class = torch.tensor(r["test_acc_by_class"])
        counts = torch.bincount(data.y_test, minlength=10).float()
        assert abs(float((by_class * counts).sum() / counts.sum()) - r["test_acc"]) < 0.01
    hard = rows["lrw-hard"]
    assert hard["log"][-1]["val_minority"] == pytest.approx(
        sum(i in set(hard["minority"]) for i in hard["val_mask"]) / len(hard["val_mask"]), abs=1e-6)
    s_tr = sorted(set(range(300)) - set(hard["val_mask"]))
    w = torch.tensor(hard["train_weights"])[s_tr]
    ys = data.y[s_tr]
    assert hard["weight_by_class"] == pytest.approx([float(w[ys == c].mean()) for c in range(10)], abs=1e-4)
    assert hard["train_counts"] == torch.bincount(ys, minlength=10).tolist()
    margin = torch.tensor(hard["train_margins"])[s_tr]  # eval mode, as the record's train accuracy
    for c in range(10):  # a margin rounded to 0.0000 may be a fit or not: between the two counts
        sure, tied = float((margin[ys == c] > 0).float().mean()), float((margin[ys == c] == 0).float().mean())
        assert 100 * sure - 0.01 <= hard["train_acc_by_class"][c] <= 100 * (sure + tied) + 0.01


@pytest.mark.slow
def test_early_stopping_on_the_meta_set_reports_the_test_accuracy_of_its_best_epoch(tmp_path, capsys):
    r, = records_of(tmp_path, capsys, "--dataset", "synthetic", "--train-subset", "200", "--noise", "uniform:0.4",
                    "--meta-set", "clean:20", "--method", "erm-tr", "--epochs", "4").values()
    accs = [e["meta_acc"] for e in r["log"]]
    first_best = accs.index(max(accs))
    assert r["best_meta_epoch"] == first_best + 1 and r["best_meta_acc"] == max(accs)
    assert r["test_acc_best_meta"] == r["log"][first_best]["test_acc"]
    # meta_acc is the accuracy on the clean meta set: recomputed from a fresh model it is not
    data = molere_data.load_data(molere.Config(dataset="synthetic", train_subset=200, noise="uniform:0.4",
                                               meta_set="clean:20"), CPU)
    assert len(data.y[data.meta_mask]) == 20 and all(abs(a / 5 - round(a / 5)) < 1e-4 for a in accs)
