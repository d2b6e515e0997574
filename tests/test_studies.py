"""What the studies of RESULTS.md section 9 add: a meta set from outside a long-tailed pool,
class-balanced ERM, early stopping on the meta set, the spurious set of the hard-samples known
answer, and the per-class and per-subpopulation numbers in each record."""
import json

import pytest
import torch
import torch.nn.functional as F

import molere
import molere_cli
import molere_data
from helpers import TINY, fresh_seed, run_main, small_run

CPU = torch.device("cpu")


def records_of(tmp_path, capsys, *flags):
    """Run molere.py's command line on TINY settings (the test set every epoch); its records, by method."""
    out = tmp_path / "out"
    run_main([*flags, "--out", str(out)] + TINY, capsys)
    return {r["method"]: r for r in map(json.loads, open(out / "results.jsonl"))}


def test_an_outside_meta_set_leaves_the_long_tailed_pool_whole():
    skew = dict(dataset="synthetic", train_subset=1000, imbalance=10.0)
    inside = molere_data.load_data(molere.Config(**skew), CPU)
    data = molere_data.load_data(molere.Config(**skew, meta_set="outside:50"), CPU)
    # the pool is the one without a meta set, every tail image kept and none marked as S_val
    assert torch.equal(data.x, inside.x) and torch.equal(data.y, inside.y) and not data.meta_mask.any()
    assert torch.bincount(data.y_meta, minlength=10).tolist() == [5] * 10
    # the meta images are training images of the source, none of them in the balanced subset
    x_all, y_all, *_ = molere_data.make_synthetic()
    subset = molere_data.balanced_subset(y_all, 1000, 10)
    flat = lambda t: {bytes(r.numpy().tobytes()) for r in t}
    assert flat(data.x_meta) <= flat(x_all) and not flat(data.x_meta) & flat(x_all[subset])
    for img, label in zip(data.x_meta[:10], data.y_meta[:10]):  # each keeps its true label
        assert label == y_all[(x_all == img).flatten(1).all(1)][0]
    # clean:N takes its images out of the pool instead (half the smallest class at most)
    with pytest.raises(molere_data.DataError, match="half the smallest class"):
        molere_data.load_data(molere.Config(**skew, meta_set="clean:60"), CPU)
    with pytest.raises(molere_data.DataError, match="give it"):
        molere_data.load_data(molere.Config(dataset="synthetic", meta_set="outside:50"), CPU)


@pytest.mark.slow
def test_an_outside_meta_set_is_every_fixed_methods_s_val(tmp_path, capsys):
    rows = records_of(tmp_path, capsys, "--dataset", "synthetic", "--train-subset", "300", "--imbalance", "2",
                      "--meta-set", "outside:20", "--delta", "0.25", "--method", "erm-tr,mwn,molere", "--epochs", "2")
    assert rows["erm-tr"]["val_mask"] == rows["mwn"]["val_mask"] == []  # S_tr = S: the meta set is outside
    assert rows["molere"]["val_size"] > 0  # MOLERE splits the pool itself
    assert all("meta_acc" in e for e in rows["mwn"]["log"])


def test_class_balanced_erm_weights_each_class_by_its_inverse_count():
    seed = fresh_seed()
    cfg, data, run = small_run("erm-cb", seed, imbalance=8.0, train_subset=600, augment=False)
    counts = torch.bincount(data.y, minlength=data.classes).double()
    idx = torch.randperm(len(data.y))[:cfg.batch_size]
    x = data.batch(idx, augment=False)
    got = [g.clone() for g in molere.classifier_step(run, cfg, x, data.y[idx]).G]
    # the reference: F.cross_entropy with class weights 1/n_c, which normalises by the batch's sum
    run.model.zero_grad()
    logits, _ = run.model(x)
    F.cross_entropy(logits.double(), data.y[idx], weight=1 / counts).backward()
    for g, p in zip(got, run.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_class_balanced_erm_is_erm_where_the_classes_are_balanced(tmp_path, capsys):
    rows = records_of(tmp_path, capsys, "--dataset", "synthetic", "--train-subset", "200", "--method", "erm,erm-cb",
                      "--epochs", "2")
    # w~ = w / mean w is 1 up to rounding (1/20 / mean of 1/20s), so the two agree to rounding
    assert rows["erm"]["test_margins"] == pytest.approx(rows["erm-cb"]["test_margins"], abs=2e-3)
    assert rows["erm"]["test_acc"] == pytest.approx(rows["erm-cb"]["test_acc"], abs=0.21)


def test_evaluation_draws_no_random_numbers():
    """The frame evaluates the meta set every epoch and the test set at each new best; neither may
    move the RNG, or adding a meta set would change the training it measures."""
    cfg, data, run = small_run("erm", 0)
    before = torch.get_rng_state()
    molere.predict(run.model, data, data.x)
    assert torch.equal(before, torch.get_rng_state())


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


def test_the_spurious_set_has_the_subpopulations_it_promises():
    x, y, xt, yt, classes, m, mt = molere_data.make_spurious()
    assert abs(float(m.float().mean()) - molere_data.SPURIOUS["minority"]) < 0.03
    assert int(mt.sum()) == len(yt) // 2  # the test set: half majority, half minority
    # the tint: the mean colour of a majority image is nearer its own class's mean colour than a
    # minority image's is
    colour = x.float().mean((2, 3))
    centre = torch.stack([colour[(y == c) & ~m].mean(0) for c in range(classes)])
    dist = (colour - centre[y]).norm(dim=1)
    assert dist[~m].mean() * 3 < dist[m].mean()
    # the pattern carries no colour: without noise and tint every image has the grey mean
    xs, *_ = molere_data.make_spurious(n_train=50, n_test=10, tint=0.0, noise=0.0)
    assert (xs.float().mean((1, 2, 3)) / 255 - 0.5).abs().max() < 0.01


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


def test_erm_hard_is_erm_on_lrw_hards_training_split():
    """RESULTS 9.2's control: the same per-class split of lowest ERM margin as LRW-Hard (any model
    gives margins), weights 1 (G is plain cross-entropy's), and not part of --method all."""
    seed = fresh_seed()
    cfg, data, run = small_run("erm-hard", seed, augment=False)
    erm = molere.WideResNet(10, 1, data.classes, 0.0)
    hard = molere.initial_split("lrw-hard", data, cfg.delta, seed, erm)
    run.val_mask = molere.initial_split("erm-hard", data, cfg.delta, seed, erm)
    assert torch.equal(run.val_mask, hard) and 0 < int(hard.sum()) < len(data.y)
    pm = molere.margins(molere.predict(erm, data, data.x)[0], data.y)
    for c in range(data.classes):  # within each class, every held-out image has a margin below every kept one
        in_c = data.y == c
        assert pm[in_c & hard].max() <= pm[in_c & ~hard].min() + 1e-6
    idx = molere.epoch_batches(run, cfg)[0]
    assert not hard[idx].any()
    x = data.batch(idx, augment=False)
    got = [g.clone() for g in molere.classifier_step(run, cfg, x, data.y[idx]).G]
    run.model.zero_grad()
    F.cross_entropy(run.model(x)[0].double(), data.y[idx]).backward()
    for g, p in zip(got, run.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert "erm-hard" not in molere_cli.ALL and "erm-tr" in molere_cli.ALL
