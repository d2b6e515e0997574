"""Does the meta level learn, and has it collapsed? The per-epoch diagnostics (METHOD.md §8): the
weights' AUC, clean above flipped; the effective batch n_eff of the normalised weights and the
warning when it stays below B / 4; each against an independent reference or a closed form."""
import math

import numpy as np
import pytest
import torch

import molere
import molere_cli
import molere_data
import molere_io
import molere_report as report
from helpers import TINY, fresh_seed, run_main, small_run


def pairwise_auc(pos, neg):
    """P(a positive scores above a negative), ties counted half: every pair, no ranks."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def test_auc_counts_pairs_with_ties_half():
    seed = fresh_seed()
    for n, m in ((1, 1), (7, 5), (200, 300)):
        pos = torch.randint(0, 6, (n,)).double() / 5  # many ties, as L2RW's zero weights make
        neg = torch.randint(0, 6, (m,)).double() / 5
        assert report.auc(pos, neg).item() == pytest.approx(pairwise_auc(pos, neg), abs=1e-12), seed
    assert report.auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0


def test_epoch_auc_ranks_clean_above_flipped():
    """w_auc is the AUC of clean images' weights over flipped ones' (1 when every clean image
    weighs more), over the images the epoch's batches held only; a swapped order reads 1 - AUC."""
    fresh_seed()
    cfg, data, run = small_run("lrw-random", 0, noise="uniform:0.4", meta_set="clean:20")
    n = len(data.y)
    w = torch.rand(n) * 0.7 + 0.4 * (~data.noisy).float()  # clean images mostly above flipped ones
    w[data.meta_mask] = float("nan")  # never in a batch
    seen = dict(w=w, fitted=torch.rand(n) < 0.5, phi_start=torch.cat([p.detach().flatten() for p in run.meta.parameters()]))
    out = molere_cli.epoch_diagnostics(run, data, seen)
    batched = ~data.meta_mask
    want = pairwise_auc(w[batched & ~data.noisy], w[batched & data.noisy])
    assert 0.8 < want < 1.0 and math.isclose(out["w_auc"], want, abs_tol=1e-6), (out["w_auc"], want)


def test_effective_batch_against_closed_forms():
    """n_eff = (sum w)^2 / sum w^2: k for k equal weights among zeros, whatever their value; 100 / 30 for
    1, 2, 3, 4; B / (1 + CV^2) with the population CV, in float64 numpy; the same for w and w / mean w."""
    seed = fresh_seed()
    for k, value in ((1, 0.3), (5, 0.01), (128, 0.9)):
        w = torch.zeros(128)
        w[torch.randperm(128)[:k]] = value
        assert molere.effective_batch(w).item() == pytest.approx(k, rel=1e-5), (seed, k)
    assert molere.effective_batch(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == pytest.approx(100 / 30, rel=1e-6)
    w = torch.rand(64, dtype=torch.float64) ** 3
    ref = 64 / (1 + (np.std(w.numpy()) / np.mean(w.numpy())) ** 2)
    assert molere.effective_batch(w).item() == pytest.approx(ref, rel=1e-12), seed
    assert molere.effective_batch(w / w.mean()).item() == pytest.approx(ref, rel=1e-12), seed
    assert molere.effective_batch(torch.zeros(8)).item() == 0.0  # L2RW's all-zero batch: no sample counts


def test_the_epoch_log_carries_n_eff_as_the_mean_over_its_batches(monkeypatch):
    """train_steps averages each batch's n_eff of the raw weights it gave the classifier step."""
    fresh_seed()
    cfg, data, run = small_run("lrw-random", 0)
    run.val_mask = molere.initial_split("lrw-random", data, cfg.delta, 0)
    seen_w = []
    weights = molere.sample_weights
    monkeypatch.setattr(molere, "sample_weights", lambda *a: seen_w.append(weights(*a)) or seen_w[-1])
    stats, _ = molere.train_epoch(run, data, cfg)
    want = np.mean([float(w.sum() ** 2 / (w * w).sum()) for w in seen_w])
    assert len(seen_w) == stats["steps"] > 1 and stats["n_eff"] == pytest.approx(want, rel=1e-5)


def test_collapse_warning_once_when_n_eff_stays_below_a_quarter_of_the_batch():
    log = lambda *n: [dict(epoch=i + 1, n_eff=v) for i, v in enumerate(n)]
    B = 128
    assert molere_cli.collapse_warning(log(100, 20, 20), B) is None  # two epochs low: not yet
    line = molere_cli.collapse_warning(log(100, 20, 20, 14.4), B)
    assert line is not None and "about 14 of 128 samples" in line and "\n" not in line
    assert molere_cli.collapse_warning(log(100, 20, 20, 14, 9), B) is None  # said once
    assert molere_cli.collapse_warning(log(20, 20, 20, 50, 20, 20, 20), B) is not None  # again after a recovery
    assert molere_cli.collapse_warning(log(32, 32, 32), B) is None  # B / 4 itself is not below
    assert molere_cli.collapse_warning([dict(epoch=e) for e in (1, 2, 3)], B) is None  # ERM: no weights


@pytest.mark.slow
def test_l2rw_and_diagnostics_end_to_end_under_noise(tmp_path, capsys):
    """L2RW and MW-Net on noisy labels with a clean meta set: the clean set is their S_val, every
    epoch logs the diagnostics, and the record's fit on flipped / clean labels is what its own
    training margins say (margin > 0 exactly where the prediction is the given label)."""
    out = tmp_path / "out"
    text = run_main(["--dataset", "synthetic", "--train-subset", "200", "--noise", "uniform:0.4",
                     "--meta-set", "clean:20", "--method", "erm,mwn,l2rw", "--epochs", "2",
                     "--out", str(out)] + TINY, capsys).out
    rows = {r["method"]: r for r in molere_io.read_results(str(out / "results.jsonl"))}
    assert "| l2rw (baseline) | 1 |" in text and "w_zero" in text
    data = molere_data.load_data(molere.Config(dataset="synthetic", train_subset=200, noise="uniform:0.4",
                                          meta_set="clean:20"), torch.device("cpu"))
    assert rows["l2rw"]["val_mask"] == data.meta_mask.nonzero().squeeze(1).tolist()
    assert rows["l2rw"]["log"][0]["steps"] == 9 and rows["l2rw"]["train_weights"] is None
    for m, keys in (("erm", {"fit_flipped", "fit_clean"}), ("mwn", {"w_sat", "w_auc", "dphi", "fit_flipped"}),
                    ("l2rw", {"w_zero", "w_auc", "fit_clean"})):
        for e in rows[m]["log"]:
            assert keys <= set(e) and all(0 <= e[k] <= 1 for k in keys - {"dphi"}), (m, e)
        margins, noisy = torch.tensor(rows[m]["train_margins"]), torch.zeros(200, dtype=torch.bool)
        noisy[rows[m]["noisy"]] = True
        for key, part in (("fit_flipped", noisy), ("fit_clean", ~noisy)):
            # the record's margins are rounded to 4 decimals: one within 5e-5 of 0 reads 0.0 either
            # way, so such a tie may count as fitted or not, and nothing else may differ
            sure, tied = (margins[part] > 0).float().mean(), (margins[part] == 0).float().mean()
            assert float(sure) - 1e-6 <= rows[m][key] <= float(sure + tied) + 1e-6, (m, key)
    assert rows["mwn"]["log"][-1]["dphi"] > 0


def test_divergence_is_a_non_finite_loss_or_one_past_100_uniform_guesses():
    """molere_cli.divergence: NaN or inf, or a loss above 100 x max(ln C, the first epoch's) diverged; a
    validation loss that rises twentyfold on a hard split (from 0.05 to 1.0, as MOLERE's can) did not."""
    first = dict(epoch=1, lr=0.1, loss=2.3, val_loss=0.05, steps=10)
    later = lambda **k: {**first, "epoch": 5, **k}
    assert molere_cli.divergence([first], later(val_loss=1.0), "41-50", 10) is None
    assert molere_cli.divergence([first], later(loss=200.0), "41-50", 10) is None  # 200 < 100 ln 10 = 230.3
    assert "training loss is 240" in molere_cli.divergence([first], later(loss=240.0), "41-50", 10)
    assert "validation loss L_val is nan" in molere_cli.divergence([first], later(val_loss=math.nan), "41-50", 10)
    line = molere_cli.divergence([], dict(first, loss=3.7e21), "1-10", 10)
    assert "epoch 1 (steps 1-10)" in line and "lower --lr (now 0.1)" in line and "\n" not in line
    assert molere_cli.divergence([], dict(first, loss=300.0), "1-10", 100) is None  # 100 ln 100 = 460.5
