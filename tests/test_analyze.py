"""tools/analyze.py: the paired t-test against closed forms, and its tables against the records."""
import math
import statistics

import pytest
import torch

import molere_cli
import molere_io
import molere_report as report
import molere_analyze as analyze


def closed_form_p(t, df):
    """Two-sided Student-t p-values in closed form for df = 1, 2 and 5."""
    if df == 1:
        return 1 - 2 * math.atan(t) / math.pi
    if df == 2:
        return 1 - t / math.sqrt(t * t + 2)
    th = math.atan(t / math.sqrt(5))
    return 1 - 2 / math.pi * (th + math.sin(th) * math.cos(th) * (1 + 2 / 3 * math.cos(th) ** 2))


@pytest.mark.parametrize("n", [2, 3, 6])
def test_paired_t_test_matches_closed_forms(n):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for _ in range(5):
        diffs = (torch.randn(n, generator=gen) + torch.rand(1, generator=gen) * 2).tolist()
        t = abs(statistics.mean(diffs)) / (statistics.stdev(diffs) / math.sqrt(n))
        assert analyze.t_test_p(diffs) == pytest.approx(closed_form_p(t, n - 1), abs=1e-7)


@pytest.mark.slow
def test_tables_follow_the_records(tmp_path, capsys):
    out = tmp_path / "out"
    molere_cli.main(["--dataset", "synthetic", "--train-subset", "200", "--depth", "10", "--width", "1",
                 "--dropout", "0", "--batch-size", "20", "--epochs", "2", "--warmup-epochs", "1",
                 "--resplit-every", "1", "--hidden", "8", "--seeds", "0", "1", "--out", str(out), "--eval-every", "1"])
    capsys.readouterr()
    rows = molere_io.read_results(str(out / "results.jsonl"))
    by = report.accuracy_by_seed(rows)
    table = analyze.comparison_table(rows)
    pairs = [(a, b) for a, b, _ in analyze.COMPARISONS if a in by and b in by]
    assert len(pairs) == 5  # every comparison of the paper's methods and the control
    for a, b in pairs:  # each row's per-seed differences, recomputed here
        per_seed = ", ".join(f"{by[a][s] - by[b][s]:+.2f}" for s in (0, 1))
        assert f"| {a} − {b} |" in table and per_seed in table
    gains = analyze.paired_margin_gains(rows)
    base, diff, pairs = gains["erm (other seed)"]
    assert pairs == 2 and len(diff) == 2 * 1000
    erm = {r["seed"]: torch.tensor(r["test_margins"]) for r in rows if r["method"] == "erm"}
    torch.testing.assert_close(diff[:1000], erm[1] - erm[0])
    curves = analyze.weight_vs_margin(rows)
    assert set(curves) == {"lrw-random", "lrw-easy", "lrw-hard", "molere"}
    for x, w, n in curves.values():  # weights divided by their mean over S_tr: the average is 1
        assert sum(n) == 2 * 180 and sum(a * b for a, b in zip(w, n)) / sum(n) == pytest.approx(1, abs=1e-3)
    assert analyze.regime_table(rows) and analyze.resplit_table(rows)


@pytest.mark.slow
def test_compare_names_what_each_pilot_changes_and_reads_its_own_record(tmp_path):
    def record(method, seed, config, val_losses, aucs, acc):
        log = [dict(epoch=e + 1, val_loss=v, w_auc=a, w_sat=0.1 * e) for e, (v, a) in enumerate(zip(val_losses, aucs))]
        # on S_tr (images 0-3 and 6-7) 1 of 4 flipped and 1 of 2 clean labels fitted; the two
        # clean images of S_val (4, 5), never trained on, must not count (with them: 3 of 4)
        return dict(method=method, seed=seed, config=config, log=log, noisy=[0, 1, 2, 3], val_mask=[4, 5],
                    train_margins=[0.2, -0.1, -0.3, 0.0, 0.9, 0.9, 0.4, -0.2], test_acc=acc, config_hash="x")
    study, pilot = tmp_path / "study.jsonl", tmp_path / "pilot.jsonl"
    base = {"K": 5, "weight_norm": "batch"}
    for path, rows in ((study, [record("erm", 0, base, [1.0], [0.5], 30.0),
                                record("lrw-random", 0, base, [2.0, 2.5], [0.6, 0.55], 29.0),
                                record("l2rw", 0, base, [1.7, 1.8], [0.6, 0.5], 31.0)]),
                       (pilot, [record("lrw-random", 0, {**base, "K": 1, "meta_input": "features+loss"},
                                       [2.2, 1.9], [0.7, 0.81], 33.5)])):
        for r in rows:
            molere_io.append_result(str(path), r)
    lines = analyze.compare_table([str(study), str(pilot)]).splitlines()[2:]
    assert len(lines) == 2  # only the method the pilots vary; ERM and L2RW are not repeated
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][2] == "the study's" and cells[1][2] == "K 1, meta_input features+loss"
    assert cells[0][3] == "2.500" and cells[1][3] == "1.900"  # the last epoch's clean meta-set loss
    assert cells[1][4] == "0.81 (2) / 0.81" and cells[1][5] == "0.10 (2)"
    assert cells[1][6] == "25.0 / 50.0" and cells[1][8] == "+3.50" and cells[0][8] == "-1.00"


@pytest.mark.slow
def test_meta_signal_measures_each_weight_net(tmp_path, capsys, monkeypatch):
    """tools/meta_signal on a tiny noisy run: one row per weight net and epoch; with one batch
    pair the consistency ||mean d|| / mean ||d|| is exactly 1, and the AUC and alignment are
    proper fractions and cosines."""
    from tools import meta_signal
    monkeypatch.setattr("sys.argv", ["meta_signal", "--at-epochs", "1", "--batches", "1", "--", "--dataset",
                                     "synthetic", "--train-subset", "200", "--depth", "10", "--width", "1",
                                     "--epochs", "2", "--batch-size", "20", "--noise", "uniform:0.4",
                                     "--meta-set", "clean:20", "--hidden", "8", "--out", str(tmp_path)])
    meta_signal.main()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[3] for r in rows] == list(meta_signal.NETS)
    for r in rows:
        assert float(r[4]) == 1.0 and 0 <= float(r[2]) <= 1 and -1 <= float(r[5]) <= 1


@pytest.mark.slow
def test_meta_signal_measure_against_the_reference_and_a_real_step(tmp_path):
    """meta_signal.measure on a tiny noisy run: each pair's meta-gradient equals the create_graph
    reference written out in helpers (same batch, dropout masks and validation batch), and the
    sign of its alignment is what a small step of phi along -mean d does to the flipped-minus-
    clean weight gap (above 0: the gap falls)."""
    import molere
    from helpers import fresh_seed, meta_grad_reference
    from tools import meta_signal
    torch.manual_seed(fresh_seed())
    _, cfg, rt, data = molere_cli.setup(["--dataset", "synthetic", "--train-subset", "200", "--depth", "10",
                                         "--width", "1", "--dropout", "0", "--epochs", "2", "--batch-size", "20",
                                         "--noise", "uniform:0.4", "--meta-set", "clean:20", "--hidden", "8",
                                         "--meta-init", "uniform",  # every input column live from the start
                                         "--method", "lrw-random", "--device", "cpu", "--out", str(tmp_path)])
    run = molere.Run(cfg, "lrw-random", 0, data, rt.device)
    run.val_mask = molere.initial_split("lrw-random", data, cfg.delta, 0)
    val_idx = run.val_mask.nonzero().squeeze(1)
    pairs = [(idx, val_idx) for idx in molere.epoch_batches(run, cfg)[:3]]
    _, alignment, _, d, ideal = meta_signal.measure(run, data, cfg, pairs)
    for (idx, _), row in zip(pairs, d):
        torch.manual_seed(int(idx[0]))  # as measure draws them
        x, y = data.batch(idx, cfg.augment), data.y[idx]
        step = molere.classifier_step(run, cfg, x, y, replay=True)
        xv, yv = molere.validation_batch(data, molere.validation_set(run, data), cfg)
        _, ref = meta_grad_reference(run.model, run.meta, x, y, step.z, xv, yv, run.opt.param_groups[0]["lr"],
                                     step.rng)
        ref = torch.cat([t.flatten() for t in ref])  # float32 both ways: equal up to rounding, as a vector
        assert (row - ref).norm() <= 1e-3 * ref.norm() and ref.norm() > 0, ((row - ref).norm(), ref.norm())
    assert abs(alignment) > 0.05, alignment  # a measurable direction (the step below must show it)
    train_idx = (~run.val_mask).nonzero().squeeze(1)
    noisy = data.noisy[train_idx]

    def gap():
        with torch.no_grad():
            w = meta_signal.weights_of(run, data, train_idx)
        return float(w[noisy].mean() - w[~noisy].mean())

    before, step = gap(), -d.mean(0)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(run.meta.parameters()) + 1e-2 * step / step.norm(),
            run.meta.parameters())
    assert (gap() < before) == (alignment > 0), (before, gap(), alignment)


def test_intervals_and_held_out_accuracy():
    """The t critical value against closed forms (df 1: tan(pi/2 (1 - p)); df 2:
    sqrt(2 (1 - p)^2 / (1 - (1 - p)^2))), the 95% interval of a mean, and held-out S_val accuracy
    paired against the reference's ERM-tr of the same seed and split (margin > 0: correct)."""
    assert analyze.t_quantile(1) == pytest.approx(math.tan(math.pi / 2 * 0.95), rel=1e-6)
    assert analyze.t_quantile(2) == pytest.approx(math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2)), rel=1e-6)
    lo, hi = analyze.interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - lo == pytest.approx(2 * analyze.t_quantile(2) / math.sqrt(3))
    val = [0, 1, 2, 3]
    rec = lambda m, seed, margins: dict(method=m, seed=seed, val_mask=val, train_margins=margins + [0.5, -0.5])
    reference = [rec("erm-tr", 0, [0.1, 0.2, -0.1, -0.2]), rec("erm-tr", 1, [0.1, -0.2, -0.1, -0.2]),
                 rec("lrw-random", 0, [0.1, 0.2, 0.3, -0.2]), rec("lrw-random", 1, [0.1, -0.2, -0.1, -0.2])]
    rows = [rec("lrw-random", 0, [0.1, 0.2, 0.3, 0.4]), rec("lrw-random", 1, [-0.1, -0.2, -0.1, -0.2])]
    lines = analyze.heldout_table(rows, reference).splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][:5] == ["lrw-random (this study)", "100.00, 0.00", "+50.00, -25.00", "+12.50 (-463.98 to +488.98)",
                            "1+ / 1−"], cells[0]
    assert cells[1][:3] == ["lrw-random (reference)", "75.00, 25.00", "+25.00, +0.00"] and len(cells) == 2
    # a candidate against the defaults: paired with the reference's own LRW-Random instead
    lines = analyze.heldout_table(rows, reference, "lrw-random").splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert "minus the reference's lrw-random" in lines[0]
    assert cells[0][:3] == ["lrw-random (this study)", "100.00, 0.00", "+25.00, -25.00"], cells[0]
    assert cells[1][:3] == ["erm-tr (control) (reference)", "50.00, 25.00", "-25.00, +0.00"] and len(cells) == 2


def test_the_papers_figures_only_beside_the_papers_kind_of_data():
    """Fig. 1's CIFAR-100 gains sit beside clean CIFAR-100 results (labelled as the paper's) and Table
    2's beside CIFAR-100 class skew with ResNet-32; CIFAR-10, a folder of one's own, the synthetic set,
    or a noisy or skewed setting the paper's figure does not cover get none."""
    rows = lambda **cfg: [dict(config=cfg)]
    assert report.paper_column(rows(), "cifar100")[1]["molere"] == "+1.96"
    assert report.paper_column(rows(arch="resnet32", imbalance=200.0), "cifar100")[1]["molere"] == "42.33"
    for dataset, cfg in (("folder:/data/pets", {}), ("synthetic", {}), ("cifar10", {"noise": "uniform:0.4"}),
                         ("cifar10", {}), ("packed", {})):
        assert report.paper_column(rows(**cfg), dataset) == ("paper's figure", {}), dataset


def test_holm_and_the_minimum_detectable_effect():
    # Holm by hand: sorted 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, then 0.04 x 1 = 0.04 kept monotone at 0.06
    assert analyze.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert analyze.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped
    # t quantiles of the MDE against tables: t(0.975, 4) = 2.7764, t(0.80, 4) = 0.9410
    assert analyze.mde(1.0, 5) == pytest.approx((2.7764 + 0.9410) / math.sqrt(5), abs=1e-3)
    assert analyze.mde(2.0, 3) == pytest.approx((4.3027 + 1.0607) * 2 / math.sqrt(3), abs=1e-3)


def test_family_tables_and_subpopulations_follow_the_records():
    def rec(method, seed, acc, minority_acc):
        return dict(method=method, seed=seed, test_acc=acc, test_acc_majority=2 * acc - minority_acc,
                    test_acc_minority=minority_acc, minority=[0, 1], val_mask=[1, 2, 3, 4] if method != "erm" else [],
                    config={}, dataset="spurious", log=[{"w_auc_minority": 0.7}] if "lrw" in method else [{}])
    rows = [rec("erm", s, 80, 50 + s) for s in range(3)] + [rec("lrw-random", s, 81, 52 + 2 * s) for s in range(3)] + \
        [rec("lrw-hard", s, 82, 60 + s * s) for s in range(3)]
    text = analyze.family_tables(rows)
    assert "Holm over 2" in text  # molere is absent: two of the four comparisons
    d = [60 - 52, 61 - 54, 64 - 56]  # lrw-hard - lrw-random on the minority
    line = next(l for l in text.splitlines() if l.startswith("| lrw-hard − lrw-random"))
    p = analyze.t_test_p(d)
    ps = [p, analyze.t_test_p([10, 10, 12])]  # and lrw-hard - erm
    assert f"{analyze.holm(ps)[0]:.3f}" in line and f"{statistics.mean(d):+.2f}" in line
    control = analyze.family_tables(rows + [rec("erm-hard", s, 70, 30 + 2 * s) for s in range(3)])
    line = next(l for l in control.splitlines() if l.startswith("| erm-hard − erm"))
    assert "-19.00" in line and line.endswith("| a < b |")  # a control predicts no direction: no verdict word
    assert next(l for l in control.splitlines() if l.startswith("| lrw-hard − erm |")).endswith("| supported (a > b) |")
    skew = [dict(method=m, seed=s, test_acc=acc + s * s, config={"imbalance": 20.0})
            for m, acc in (("erm", 50), ("erm-cb", 51), ("mwn", 49)) for s in range(3)]
    both = analyze.family_tables(skew)
    assert "**class skew (overall test accuracy)**, Holm over 1" in both and "| mwn − erm | 3 |" in both
    anchor = analyze.family_tables(skew, "the anchor")  # --family: that question alone
    assert anchor.startswith("**class skew, the anchor") and "erm-cb" not in anchor and "-1.00 (-1.00 to -1.00)" in anchor
    table = analyze.subpopulation_table(rows)
    assert "| lrw-hard | 3 | 82.00 ± 0.00 |" in table and "| 25.00 ± 0.00 | 0.70 ± 0.00 |" in table  # 1 of S_val's 4 is minority


def test_unfinished_runs_are_read_from_the_metrics_file(tmp_path):
    line = lambda m, seed, epoch, loss, h="abc": dict(method=m, seed=seed, epoch=epoch, loss=loss, config_hash=h)
    metrics = [line("erm", 0, 1, 2.0), line("erm", 0, 2, 1.5),  # finished: its record exists
               line("molere", 0, 1, 2.2), line("molere", 0, 2, 1.9),
               line("molere", 0, 2, 1.8),  # resumed from epoch 1's checkpoint: epoch 2 again, the last line wins
               dict(line("molere", 1, 1, 2.4), test_acc=31.5, w_auc=0.61),
               line("mwn", 0, 1, 9.9, h="old")]  # another config
    for name, lines in (("metrics.jsonl", metrics), ("results.jsonl", [dict(method="erm", seed=0, config_hash="abc")])):
        for entry in lines:
            molere_io.append_result(str(tmp_path / name), entry)
    runs = analyze.unfinished_runs(str(tmp_path / "results.jsonl"), "abc")
    assert list(runs) == [("molere", 0), ("molere", 1)]
    assert [e["loss"] for e in runs[("molere", 0)]] == [2.2, 1.8]
    table = analyze.unfinished_table(runs, 40)
    assert "| molere | 0 | 2 of 40 | 1.800 | — | — |" in table
    assert "| molere | 1 | 1 of 40 | 2.400 | 31.50 (epoch 1) | 0.61 |" in table


def test_class_shot_table_groups_the_classes_by_their_count():
    def rec(method, seed, by_class, weights=None, train=None, counts=(100, 10, 50), val_size=0):
        return dict(method=method, seed=seed, test_acc=sum(by_class) / 3, config={"imbalance": 10.0},
                    train_counts=list(counts), test_acc_by_class=by_class, weight_by_class=weights,
                    train_acc_by_class=train, val_size=val_size)
    # MOLERE comes first and holds out so much of class 0 that its S_tr would order the classes
    # differently: the grouping and the prior must come from the pool (a run with val_size 0)
    rows = [rec("molere", 0, [70.0, 40.0, 60.0], [0.1, 0.5, 0.3], [99.0, 90.0, 98.0], counts=(5, 10, 50), val_size=95),
            rec("erm", 0, [90.0, 30.0, 60.0], train=[100.0, 80.0, 96.0]),
            rec("erm", 1, [80.0, 20.0, 60.0], train=[100.0, 60.0, 98.0]),
            rec("mwn", 0, [85.0, 45.0, 65.0], [0.2, 0.6, 0.4]), rec("mwn", 1, [85.0, 55.0, 65.0], [0.2, 0.6, 0.4])]
    table = analyze.shot_table(rows)
    # many: class 0 (100 images), medium: class 2 (50), few: class 1 (10)
    assert "many-shot (%), classes [0] | medium-shot (%), classes [2] | few-shot (%), classes [1]" in table
    assert "| erm | 2 | 56.67 ± 4.71 | 85.00 ± 7.07 | 60.00 ± 0.00 | 25.00 ± 7.07 |" in table
    assert "| class 0 (n=100) | class 1 (n=10) | class 2 (n=50) |" in table
    prior = [1 / 100, 1 / 10, 1 / 50]
    assert "| prior 1/n_c | " + " | ".join(f"{p / statistics.mean(prior):.2f}" for p in prior) + " |" in table
    # training accuracy per class: the mean over seeds, the lowest seed in brackets; no row without the numbers
    assert "| erm | 100.0 (100.0) | 70.0 (60.0) | 97.0 (96.0) |" in table
    assert "| molere | 99.0 (99.0) | 90.0 (90.0) | 98.0 (98.0) |" in table
    assert "mwn" not in table.split("Mean learned weight")[0].split("Training accuracy")[1]  # mwn has none
    assert "| mwn (baseline) | 0.50 | 1.50 | 1.00 |" in table


def test_learning_curves_average_only_where_every_seed_tested():
    # each seed records test accuracy at its own epochs (its new bests on the meta set, say)
    def run(tested, offset):
        return dict(log=[dict(epoch=e, loss=1.0, **({"test_acc": 10.0 * e + offset} if e in tested else {}))
                         for e in (1, 2, 3)])
    a, b = run({1, 3}, 0), run({2, 3}, 4)
    assert analyze.mean_where_all_have([a, b], "test_acc") == ([3], [32.0])  # (30 + 34) / 2
    assert analyze.mean_where_all_have([a, b], "loss") == ([1, 2, 3], [1.0, 1.0, 1.0])


def test_over_run_table_reads_the_rule_off_the_logs():
    """The long run's rule, by hand: the lowest AUC and n_eff from epoch 10, and the first epoch that breaks
    AUC >= 0.8 or n_eff >= B/4 with the count of such epochs; a run short of its epochs holds 'so far'."""
    import molere_analyze as analyze
    ok = [dict(epoch=e, w_auc=0.9, n_eff=40.0 + e, w_sat=0.1, fit_flipped=0.02, fit_clean=0.9) for e in range(1, 21)]
    ok[3]["w_auc"] = 0.5  # before epoch 10: not ruled on
    bad = [dict(e, n_eff=30.0 if e["epoch"] >= 14 else e["n_eff"], w_auc=0.79 if e["epoch"] == 17 else e["w_auc"])
           for e in ok]
    table = analyze.over_run_table({("a", 1): ok, ("b", 2): bad, ("erm", 3): [dict(epoch=1, loss=1.0)]}, 128, epochs=30)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) == 2  # ERM logged no n_eff
    assert rows[0][3:5] == ["0.90 (10)", "50.00 (10)"] and rows[0][-1] == "holds so far |"
    assert rows[1][3:5] == ["0.79 (17)", "30.00 (14)"] and rows[1][-1] == "fails at 7 of 11 epochs, first 14 |"


def test_every_study_folder_is_data_whose_flags_give_its_records_config():
    """results/*/study.json: every folder of results/ is a study, and each study's flags (with its runs'
    own) give the config hash of every committed record (the study ran, and reruns, as written)."""
    from tools import study
    folders = {p.name for p in study.RESULTS.iterdir() if p.is_dir()}
    assert folders == set(study.studies()), folders ^ set(study.studies())
    bad = [line for name, s in study.studies().items() for line in study.check(name, s)]
    assert not bad, bad
    assert all(s["kind"] in ("study", "pilots", "history") and s["about"] for s in study.studies().values())


@pytest.mark.slow
@pytest.mark.parametrize("method", analyze.NO_META)
def test_runs_without_a_meta_level_read_no_meta_only_field(method):
    """--baselines joins ERM runs made under another meta level's flags: trained for an epoch under two
    configs that differ in every META_ONLY field, ERM and erm-cb end with bitwise the same classifier, so
    the records are the same runs. (g_phi's size is left out of META_ONLY: it moves the random stream.)"""
    import molere
    from helpers import fresh_seed, small_run
    seed = fresh_seed()
    other = dict(K=2, meta_steps_min=0, meta_grad="reference", meta_lr=1.6e-4, meta_lr_per="meta-step", meta_wd=1e-4,
                 meta_bound=4.0, meta_logit="centred", meta_lr_decay=540, split_lr=0.01, meta_init="uniform")
    assert set(other) == set(analyze.META_ONLY)
    states = []
    for flags in ({}, other):
        cfg, data, run = small_run(method, seed, epochs=1, **flags)
        molere.train(run, data, cfg)
        states.append(run.model.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), (seed, name)


def test_baselines_join_only_runs_whose_config_differs_in_meta_only_fields():
    """baseline_rows: ERM and erm-cb of the study's seeds join; a meta level's run, another seed, or an ERM
    run under another classifier setting (here the lr) does not, the last refused in one line."""
    ours = [dict(method="mwn", seed=1, config=dict(dataset="cifar10", meta_lr=1.6e-4), config_hash="a")]
    ref = [dict(method=m, seed=s, config=dict(dataset="cifar10"), config_hash="b")
           for m in ("erm", "erm-cb", "mwn", "lrw-random") for s in (1, 2)]
    assert sorted(r["method"] for r in analyze.baseline_rows(ours, ref, "ref")) == ["erm", "erm-cb"]
    with pytest.raises(SystemExit, match="erm seed 1 ran under another lr than these runs"):
        analyze.baseline_rows(ours, [dict(method="erm", seed=1, config=dict(dataset="cifar10", lr=0.05))], "ref")
