"""Tables and figures from the result records of one study (RESULTS.md is made from these).

    python -m tools.analyze results/cifar10-cpu-2/results.jsonl --figures results/cifar10-cpu-2

Reads the newest config in the file and prints markdown, in this order (METHOD.md §5):
(a) accuracy, gain over ERM, per-seed paired gains with their sign count and a paired t-test
    p-value, the paper's CIFAR-100 gain beside ours (labelled); controls labelled as such;
(b) the paired comparisons that isolate one cause each: LRW-Random - ERM-tr (the learned
    weights alone), Hard - Random, Hard - Easy, MOLERE - Hard;
(c) the regime check (training accuracy on S, eval mode) and the meta-level diagnostics;
(d) the margin analysis: paired test-margin differences method - ERM, binned by ERM margin,
    beside ERM of one seed against ERM of another (what regression to the mean alone gives);
(e) wall time per run, from the records;
(f) the runs still going: their last epoch's numbers, read from the metrics.jsonl beside the
    records (one line per epoch, written as a run goes), so a study can be read before it ends.
Where the study asks one question (RESULTS.md section 9), (b) adds that family of comparisons,
Holm-adjusted, with 95% intervals and minimum detectable effects; and the tables a setting
calls for: subpopulations (--dataset spurious), many/medium/few-shot classes (class skew),
early stopping on the meta set (a fixed meta set).
With --figures, also writes gain_over_erm.png, margin_gain.png, weight_vs_margin.png,
weights_noisy_clean.png, meta_level.png (under --noise: weights' AUC, saturation and flipped
labels fitted, by epoch), learning_curves.png and, while runs are unfinished, progress.png (figures need matplotlib, which requirements.txt installs; without it the
tables are still printed).
With --into RESULTS.md, the markdown replaces the block between the lines
`<!-- analyze RESULTS_PATH -->` and `<!-- /analyze -->` of that file, so the tables there are
generated, never typed. Records from before
2026-11-27 lack some fields; their sections are left out.

    python -m tools.analyze --compare results/cifar10-anchor/results.jsonl results/cifar10-anchor-pilots/*/results.jsonl

prints one table of runs whose configs differ (pilots against the study they vary).
"""
import argparse
import dataclasses
import math
import os
import statistics

import torch

import molere
import molere_cli
import molere_io
import molere_report as report

BINS = [-1.0, -0.5, 0.0, 0.5, 1.0001]


def t_test_p(diffs):
    """Two-sided p-value of the paired t-test (H0: mean difference 0), df = n - 1, by integrating
    Student's t density over |t|..inf on the substitution x = tan(u). None if n < 2."""
    n = len(diffs)
    if n < 2:
        return None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if statistics.mean(diffs) != 0 else 1.0
    t, df = abs(statistics.mean(diffs)) / (sd / math.sqrt(n)), n - 1
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    lo, steps = math.atan(t), 4000  # Simpson's rule on [atan t, pi/2]
    u = torch.linspace(lo, math.pi / 2, steps + 1, dtype=torch.float64)
    f = c * (1 + torch.tan(u) ** 2 / df) ** (-(df + 1) / 2) / torch.cos(u) ** 2
    f[-1] = 0.0 if df > 1 else c * df  # the limit at pi/2 (df = 1: the Cauchy density times sec^2)
    w = torch.ones(steps + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float(min(1.0, 2 * (w * f).sum() * (math.pi / 2 - lo) / (3 * steps)))


def t_quantile(df, p=0.05):
    """The two-sided critical value of Student's t (|T| > t with probability p), by bisection on
    t_test_p: a sample of df + 1 values whose t statistic is exactly t."""
    n = df + 1
    base = [1.0 if i % 2 else -1.0 for i in range(n)]
    base = [b - statistics.mean(base) for b in base]  # mean 0; shifted by t sd / sqrt(n), its t is t
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        t = (lo + hi) / 2
        if t_test_p([b + t * statistics.stdev(base) / math.sqrt(n) for b in base]) > p:
            lo = t
        else:
            hi = t
    return (lo + hi) / 2


def interval(diffs):
    """The 95% interval of the mean of paired differences (t, n - 1 degrees of freedom)."""
    n = len(diffs)
    half = t_quantile(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return statistics.mean(diffs) - half, statistics.mean(diffs) + half


def heldout_table(rows, reference, against="erm-tr"):
    """Accuracy on the held-out S_val, a validation number (the classifier never trains on it),
    of each run of `rows` and of `reference`'s runs with the same seed and the same S_val, and
    each method's paired differences against the reference's run of method `against` (erm-tr; or, to
    judge a candidate setting against the defaults, lrw-random): mean, 95% interval, signs, p. METHOD.md
    §9's 'does no harm in the clean setting'."""
    def val_acc(r):
        m = r["train_margins"]
        return 100 * sum(m[i] > 0 for i in r["val_mask"]) / len(r["val_mask"])
    base = {r["seed"]: r for r in reference if r["method"] == against}
    head = ["run", "held-out S_val accuracy by seed (%)", f"minus the reference's {report.method_label(against)}, by seed",
            "mean (95% interval)", "signs", "p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in (("this study", rows), ("reference", reference)):
        for m in molere.METHODS:
            rs = sorted((r for r in runs if r["method"] == m and r["seed"] in base and r["val_mask"]
                         and r["val_mask"] == base[r["seed"]]["val_mask"]), key=lambda r: r["seed"])
            if not rs or (label == "reference" and m == against):
                continue
            diffs = [val_acc(r) - val_acc(base[r["seed"]]) for r in rs]
            lo, hi = interval(diffs) if len(diffs) > 1 else (math.nan, math.nan)
            mean, _, each, signs, p = describe(diffs)
            lines.append(f"| {report.method_label(m)} ({label}) | {', '.join(f'{val_acc(r):.2f}' for r in rs)} | "
                         f"{each} | {mean} ({lo:+.2f} to {hi:+.2f}) | {signs} | {p} |")
    return "\n".join(lines)


# Config fields that only a meta level reads (its schedule, optimisers and logit): a method with neither a
# split nor a meta level (ERM, class-balanced ERM) is the same run under any of them, which
# tests/test_analyze.py checks by training both ways. Not g_phi's size (hidden, meta_input): every run
# builds g_phi from the seed's random stream, so its size moves what the classifier draws after it.
META_ONLY = ("K", "meta_steps_min", "meta_grad", "meta_lr", "meta_lr_per", "meta_wd", "meta_bound", "meta_logit",
             "meta_lr_decay", "split_lr", "meta_init")
NO_META = [m for m, spec in molere.METHODS.items() if spec.split == "none" and not spec.reweights]


def baseline_rows(rows, reference, path):
    """The runs of `reference` (records of another file, at `path`) of the methods without a split or
    a meta level (NO_META: erm, erm-cb) on the seeds of `rows`, for a study that reran only meta
    levels: refused unless the configs agree on every field outside META_ONLY, where those runs would
    be the same runs. Each keeps its own config hash."""
    full = lambda c: {**{f.name: f.default for f in dataclasses.fields(molere.Config)}, **c,
                      "milestones": list(c.get("milestones", molere.Config.milestones))}
    ours = {k: v for k, v in full(rows[-1]["config"]).items() if k not in META_ONLY}
    seeds = {r["seed"] for r in rows}
    picked = [r for r in reference if r["method"] in NO_META and r["seed"] in seeds]
    for r in picked:
        theirs = {k: v for k, v in full(r["config"]).items() if k not in META_ONLY}
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differ:
            raise SystemExit(f"analyze: error: {path}: {r['method']} seed {r['seed']} ran under another "
                             f"{', '.join(differ)} than these runs, so it is not their baseline")
    return picked


def holm(ps):
    """Holm's step-down adjustment of the p-values of one family (same order as given): the
    i-th smallest p times (m - i + 1), kept monotone, capped at 1."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def mde(sd, n, power=0.8):
    """Minimum detectable effect of a paired t-test at alpha = 0.05 (two-sided) with `power`:
    (t(0.975, n-1) + t(power, n-1)) sd / sqrt(n)."""
    return (t_quantile(n - 1) + t_quantile(n - 1, 2 * (1 - power))) * sd / math.sqrt(n)


# The questions of RESULTS.md section 9, each one family of paired comparisons (a, b), Holm-adjusted
# within the family. A run's value is read by `metric`. The paper predicts a > b in every family but
# a control's, which says so ("no direction predicted"): its verdict is a > b or a < b, not
# supported or contradicted.
FAMILIES = {
    "known answer, noisy labels: every meta level against ERM (test accuracy)": (
        lambda r: r["test_acc"] if r.get("noisy") and r["dataset"].startswith("synthetic") else None,
        [("mwn", "erm"), ("l2rw", "erm"), ("lrw-random", "erm"), ("molere", "erm")]),
    "hard samples (minority test accuracy)": (
        lambda r: r.get("test_acc_minority"),
        [("lrw-hard", "lrw-random"), ("molere", "lrw-random"), ("lrw-hard", "erm"), ("molere", "erm")]),
    "hard samples, the control: holding out or weighting (minority test accuracy)": (
        lambda r: r.get("test_acc_minority"),
        [("lrw-hard", "erm-hard"), ("erm-hard", "erm")], "no direction predicted"),
    "class skew (overall test accuracy)": (
        lambda r: r["test_acc"] if r["config"].get("imbalance", 1) > 1 else None,
        [("mwn", "erm-cb"), ("lrw-random", "erm-cb"), ("molere", "erm-cb"), ("molere", "mwn")]),
    "class skew, the anchor: MW-Net against plain ERM (overall test accuracy)": (
        lambda r: r["test_acc"] if r["config"].get("imbalance", 1) > 1 else None, [("mwn", "erm")]),
    "noisy labels: against ERM (test accuracy)": (
        lambda r: r["test_acc"] if r.get("noisy") and "best_meta_epoch" in r and not r["dataset"].startswith("synthetic")
        else None,
        [("mwn", "erm"), ("l2rw", "erm"), ("lrw-random", "erm"), ("molere", "erm")]),
    "noisy labels: against ERM-tr stopped at its best meta-set epoch (test accuracy)": (
        lambda r: (r["test_acc_best_meta"] if r["method"] == "erm-tr" else r["test_acc"])
        if r.get("noisy") and "best_meta_epoch" in r and not r["dataset"].startswith("synthetic") else None,
        [("mwn", "erm-tr"), ("l2rw", "erm-tr"), ("lrw-random", "erm-tr"), ("molere", "erm-tr")]),
    "the paper's ordering on clean data (test accuracy)": (
        lambda r: r["test_acc"] if not r.get("noisy") and r.get("minority") is None
        and r["config"].get("imbalance", 1) == 1 and r["dataset"] != "synthetic" else None,
        [("molere", "lrw-random"), ("lrw-random", "erm"), ("molere", "erm"), ("lrw-hard", "lrw-random")]),
}


def family_tables(rows, only=None):
    """For each question of FAMILIES whose runs are here (or only the one whose title contains `only`):
    every comparison's paired differences by seed, mean and 95% interval, signs, raw and Holm-adjusted
    p, the MDE from its SD, and the verdict by RESULTS.md section 9's rule."""
    out = []
    for question, (metric, pairs, *undirected) in FAMILIES.items():
        if only and only not in question:
            continue
        value = {}
        for r in rows:
            v = metric(r)
            if v is not None:
                value.setdefault(r["method"], {})[r["seed"]] = v
        found = []
        for a, b in pairs:
            seeds = sorted(set(value.get(a, {})) & set(value.get(b, {})))
            if len(seeds) >= 2:
                found.append((a, b, [value[a][s] - value[b][s] for s in seeds]))
        if not found:
            continue
        adjusted = holm([t_test_p(d) for _, _, d in found])
        head = ["comparison", "n", "per seed", "mean (95% interval)", "signs", "p", "Holm p", "MDE (80% power)",
                "verdict"]
        lines = [f"**{question}**, Holm over {len(found)}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (a, b, d), p_adj in zip(found, adjusted):
            lo, hi = interval(d)
            mean, sd, each, signs, p = describe(d)
            above = statistics.mean(d) > 0
            verdict = (("a > b" if above else "a < b") if undirected else
                       "supported (a > b)" if above else "contradicted (a < b)") if p_adj < 0.05 \
                else "below the detectable effect"
            lines.append(f"| {a} − {b} | {len(d)} | {each} | {mean} ({lo:+.2f} to {hi:+.2f}) | {signs} | {p} | "
                         f"{p_adj:.3f} | {mde(statistics.stdev(d), len(d)):.2f} | {verdict} |")
        out.append("\n".join(lines))
    return "\n\n".join(out) or None


def subpopulation_table(rows):
    """The hard-samples known answer (--dataset spurious), per method: average, majority and
    minority (worst-subpopulation) test accuracy, the minority's share of the final S_val, and
    the weights' AUC ranking minority training images above majority ones, last epoch."""
    if not any(r.get("minority") is not None for r in rows):
        return None
    head = ["method", "n", "average (%)", "majority (%)", "minority = worst (%)", "minority in S_val (%)",
            "weights' AUC, minority above majority (last epoch)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ms = lambda xs: "—" if not xs else f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"
    for m in molere.METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        share = [100 * len(set(r["val_mask"]) & set(r["minority"])) / len(r["val_mask"]) for r in rs if r["val_mask"]]
        aucs = [r["log"][-1]["w_auc_minority"] for r in rs if "w_auc_minority" in r["log"][-1]]
        lines.append(f"| {report.method_label(m)} | {len(rs)} | {ms([r['test_acc'] for r in rs])} | "
                     f"{ms([r['test_acc_majority'] for r in rs])} | {ms([r['test_acc_minority'] for r in rs])} | "
                     f"{ms(share)} | {ms(aucs)} |")
    return "\n".join(lines)


def shot_table(rows):
    """Class skew: test accuracy on the many-, medium- and few-shot classes (the floor(C/3)
    largest classes of the pool, the floor(C/3) smallest, the rest); per class, the training
    accuracy at the end (eval mode, over each run's S_tr: the regime check, is the tail
    fitted?); and per class the mean learned weight over S_tr beside the prior 1/n_c (both
    divided by their mean over classes). The class counts are the pool's, read from a run that
    holds nothing out (MOLERE's S_tr lacks its S_val), else from the first run."""
    rows = [r for r in rows if r["config"].get("imbalance", 1) > 1 and r.get("train_counts")]
    if not rows:
        return None
    counts = next((r for r in rows if not r.get("val_size")), rows[0])["train_counts"]
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    third = len(counts) // 3
    groups = {"many": order[:third], "medium": order[third:len(order) - third], "few": order[len(order) - third:]}
    head = ["method", "n", "overall (%)"] + [f"{g}-shot (%), classes {sorted(cs)}" for g, cs in groups.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in molere.METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        part = lambda r, cs: statistics.mean(r["test_acc_by_class"][c] for c in cs)
        cell = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"
        lines.append(f"| {report.method_label(m)} | {len(rs)} | {cell([r['test_acc'] for r in rs])} | " +
                     " | ".join(cell([part(r, cs) for r in rs]) for cs in groups.values()) + " |")
    class_head = ["| method | " + " | ".join(f"class {c} (n={counts[c]})" for c in range(len(counts))) + " |",
                  "|" + "---|" * (len(counts) + 1)]
    lines += ["", "Training accuracy (%) per class at the end, eval mode, over each run's S_tr (seeds averaged; "
              "the lowest seed in brackets): the regime check, is the tail fitted?", ""] + class_head
    for m in molere.METHODS:
        accs = [r["train_acc_by_class"] for r in rows if r["method"] == m and r.get("train_acc_by_class")]
        if accs:
            at = lambda c: [a[c] for a in accs if a[c] is not None]
            lines.append(f"| {report.method_label(m)} | " + " | ".join(
                f"{statistics.mean(at(c)):.1f} ({min(at(c)):.1f})" if at(c) else "—" for c in range(len(counts))) + " |")
    prior = [1 / n for n in counts]
    norm = lambda v: [x / statistics.mean(v) for x in v]
    lines += ["", "Mean learned weight per class over S_tr, divided by its mean over classes (seeds averaged), "
              "beside the prior 1/n_c divided alike:", ""] + class_head + [
              "| prior 1/n_c | " + " | ".join(f"{v:.2f}" for v in norm(prior)) + " |"]
    for m in molere.METHODS:
        ws = [norm(r["weight_by_class"]) for r in rows if r["method"] == m and r.get("weight_by_class")
              and None not in r["weight_by_class"]]
        if ws:
            lines.append(f"| {report.method_label(m)} | " +
                         " | ".join(f"{statistics.mean(w[c] for w in ws):.2f}" for c in range(len(counts))) + " |")
    return "\n".join(lines)


def early_stopping_table(rows):
    """Every run with a fixed meta set: the first epoch of highest meta-set accuracy, that
    accuracy, and the test accuracy there, beside the test accuracy at the end."""
    rows = [r for r in rows if "best_meta_epoch" in r]
    if not rows:
        return None
    head = ["method", "n", "best meta-set epoch by seed", "meta-set accuracy there (%)", "test accuracy there (%)",
            "test accuracy at the end (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in molere.METHODS:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        if rs:
            cell = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"
            lines.append(f"| {report.method_label(m)} | {len(rs)} | {', '.join(str(r['best_meta_epoch']) for r in rs)} | "
                         f"{cell([r['best_meta_acc'] for r in rs])} | {cell([r['test_acc_best_meta'] for r in rs])} | "
                         f"{cell([r['test_acc'] for r in rs])} |")
    return "\n".join(lines)


def describe(diffs):
    p = t_test_p(diffs)
    signs = f"{sum(d > 0 for d in diffs)}+ / {sum(d < 0 for d in diffs)}−"
    return (f"{statistics.mean(diffs):+.2f}", f"{statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "—",
            ", ".join(f"{d:+.2f}" for d in diffs), signs, "—" if p is None else f"{p:.3f}")


def accuracy_table(rows):
    by = report.accuracy_by_seed(rows)
    head = ["method", "n", "test accuracy mean ± std (%)", "paired gain over ERM (pp)", "± std",
            "per seed (seed order)", "signs", "paired t p", report.paper_column(rows, rows[0]["dataset"])[0]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in molere.METHODS:
        if m not in by:
            continue
        mu, sd = report.mean_std(list(by[m].values()))
        cells = [report.method_label(m), str(len(by[m])), f"{mu:.2f} ± {sd:.2f}"]
        d = report.paired_gains(by, m)
        cells += list(describe(d)) if m != "erm" and d else ["—"] * 5
        cells.append(report.paper_column(rows, rows[0]["dataset"])[1].get(m, "—"))
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append(f"\nPer-seed test accuracy (%), seeds {', '.join(map(str, seeds))}:")
    for m in molere.METHODS:
        if m in by:
            lines.append(f"* {report.method_label(m)}: " + ", ".join(f"{by[m][s]:.2f}" for s in seeds if s in by[m]))
    return "\n".join(lines)


COMPARISONS = [("lrw-random", "erm-tr", "the learned weights alone (same S_tr, same steps)"),
               ("lrw-hard", "lrw-random", "a hard validation set instead of a random one"),
               ("lrw-hard", "lrw-easy", "hard against easy validation set"),
               ("molere", "lrw-hard", "the splitter's split against train-twice Hard"),
               ("erm-tr", "erm", "the price of holding delta of S out"),
               ("lrw-random", "mwn", "LRW's rich meta-network against MW-Net's loss-only one")]


def comparison_table(rows):
    by = report.accuracy_by_seed(rows)
    head = ["comparison", "what it isolates", "n", "mean (pp)", "± std", "per seed", "signs", "paired t p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b, what in COMPARISONS:
        d = report.paired_gains(by, a, b)
        if d:
            lines.append("| " + " | ".join([f"{a} − {b}", what, str(len(d))] + list(describe(d))) + " |")
    return "\n".join(lines)


def regime_table(rows):
    """Training accuracy on S (eval mode, no augmentation) and what the meta-level did."""
    if not all("train_acc" in r for r in rows):
        return None
    head = ["method", "train acc on S (%) by seed", "w spread (std/mean), first → last epoch",
            "corr(w, loss), first → last", "val loss, first → last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in molere.METHODS:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        if not rs:
            continue
        cells = [report.method_label(m), ", ".join(f"{r['train_acc']:.2f}" for r in rs)]
        for key in ("w_spread", "w_loss_corr", "val_loss"):
            # null (NaN when written, e.g. the correlation of constant weights): left out of the mean
            firsts = [r["log"][0][key] for r in rs if r["log"][0].get(key) is not None]
            lasts = [r["log"][-1][key] for r in rs if r["log"][-1].get(key) is not None]
            cells.append(f"{statistics.mean(firsts):.3f} → {statistics.mean(lasts):.3f}" if firsts and lasts else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checkpoints(epochs):
    """The epochs a by-epoch column shows: the first, quarters, the last."""
    return sorted({1, *(max(1, round(epochs * q)) for q in (0.25, 0.5, 0.75)), epochs})


def label_fits(r):
    """(share of flipped, share of clean labels) the final model predicts (eval mode) among the
    images the run trained on, S_tr: the images of S_val (a clean meta set, MOLERE's split) are
    never trained on, so counting them would understate what a method fits. From the record's
    training margins (margin > 0 exactly where the prediction is the given label; a margin
    rounded to 0.0000 counts as not fitted)."""
    m = torch.tensor(r["train_margins"])
    noisy, train = torch.zeros(len(m), dtype=torch.bool), torch.ones(len(m), dtype=torch.bool)
    noisy[r["noisy"]], train[r["val_mask"]] = True, False
    fits = lambda part: float((m[part] > 0).float().mean()) if part.any() else float("nan")
    return fits(noisy & train), fits(~noisy & train)


def meta_level_table(rows):
    """METHOD.md §8, per method and seed (under --noise): the gain over ERM, the share of
    flipped and clean labels the final model fits, the share of flipped labels in its final
    S_val, the test accuracy at the evaluations before the last (never used as a result), and
    by epoch the weights' AUC (clean above flipped) and their saturation (sigmoid weights: share
    below 0.05 or above 0.95; L2RW: share exactly 0), with the peak of each. Records made before
    the diagnostics were logged show only the first columns."""
    if not any(r.get("noisy") for r in rows):
        return None
    erm = {r["seed"]: r["test_acc"] for r in rows if r["method"] == "erm"}
    at = checkpoints(len(rows[0]["log"]))
    head = ["method", "seed", "gain over ERM (pp)", "fits flipped / clean labels of S_tr (end, %)", "flipped in S_val (%)",
            "test acc at earlier evaluations (%)", f"weights' AUC at epochs {', '.join(map(str, at))}",
            "peak AUC (epoch)", "saturation (or share of w = 0) at the same epochs", "peak saturation (epoch)",
            "‖Δφ‖ summed over epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    series = lambda log, key: ", ".join(f"{log[e - 1][key]:.2f}" if key in log[e - 1] else "—" for e in at)

    def peak(log, key):
        if key not in log[0]:
            return "—"
        best = max(log, key=lambda e: e[key])
        return f"{best[key]:.2f} ({best['epoch']})"

    for m in molere.METHODS:
        for r in sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"]):
            log, (flipped, clean) = r["log"], label_fits(r)
            sat = "w_zero" if "w_zero" in log[0] else "w_sat"
            earlier = "; ".join(f"epoch {e['epoch']}: {e['test_acc']:.2f}" for e in log[:-1] if "test_acc" in e)
            dphi = f"{sum(e['dphi'] for e in log):.3g}" if "dphi" in log[0] else "—"
            gain = f"{r['test_acc'] - erm[r['seed']]:+.2f}" if m != "erm" and r["seed"] in erm else "—"
            val = set(r["val_mask"])
            in_val = f"{100 * len(val & set(r['noisy'])) / len(val):.1f}" if val else "—"
            lines.append(f"| {report.method_label(m)} | {r['seed']} | {gain} | {100 * flipped:.1f} / {100 * clean:.1f} | "
                         f"{in_val} | {earlier or '—'} | {series(log, 'w_auc')} | {peak(log, 'w_auc')} | "
                         f"{series(log, sat)} | {peak(log, sat)} | {dphi} |")
    return "\n".join(lines)


def over_run_table(logs, batch_size, start=10, auc_min=0.8, epochs=None):
    """The meta level over a whole run (the long run's rule): per run that logged the effective batch
    (n_eff, the epoch's mean over its batches), the lowest weights' AUC and n_eff from epoch `start`
    on, with their epochs, the last epoch's, and whether the rule held: AUC >= auc_min and
    n_eff >= B / 4 at every epoch from `start` on (so far, for a run short of `epochs`). `logs`:
    {(label, seed): [log entries by epoch]}."""
    logs = {k: log for k, log in logs.items() if log and "n_eff" in log[-1]}
    if not logs:
        return None
    head = ["run", "seed", "epochs", f"lowest AUC from epoch {start} (epoch)", f"lowest n_eff from epoch {start} (epoch)",
            "last AUC", "last n_eff", "last w_sat", "fits flipped / clean, last epoch (%)",
            f"AUC >= {auc_min} and n_eff >= B/4 = {batch_size / 4:g} from epoch {start}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, seed), log in logs.items():
        late = [e for e in log if e["epoch"] >= start and e.get("w_auc") is not None]
        low = lambda key: (lambda e: f"{e[key]:.2f} ({e['epoch']})")(min(late, key=lambda e: e[key])) if late else "—"
        bad = [e["epoch"] for e in late if e["w_auc"] < auc_min or e["n_eff"] < batch_size / 4]
        rule = "—" if not late else f"fails at {len(bad)} of {len(late)} epochs, first {bad[0]}" if bad else \
            "holds" + (" so far" if epochs and log[-1]["epoch"] < epochs else "")
        last = log[-1]
        number = lambda key: f"{last[key]:.2f}" if last.get(key) is not None else "—"
        fits = f"{100 * last['fit_flipped']:.1f} / {100 * last['fit_clean']:.1f}" if "fit_flipped" in last else "—"
        lines.append(f"| {label} | {seed} | {last['epoch']} | {low('w_auc')} | {low('n_eff')} | {number('w_auc')} | "
                     f"{last['n_eff']:.1f} | {number('w_sat')} | {fits} | {rule} |")
    return "\n".join(lines)


def over_run_files(files, batch_size=None):
    """over_run_table for the runs of several results files (finished, and unfinished from their
    metrics.jsonl), each run labelled by its folder: pilots that stop early (--stop-after) included.
    B for the rule comes from a finished record's config, else from `batch_size`."""
    logs, batch = {}, batch_size
    for f in files:
        label = os.path.basename(os.path.dirname(os.path.abspath(f)))
        for r in molere_io.read_results(f):
            logs[(f"{label} {r['method']}", r["seed"])] = r["log"]
            batch = r["config"]["batch_size"]
        for (m, seed), log in unfinished_runs(f).items():
            logs.setdefault((f"{label} {m}", seed), log)
    if batch is None:
        raise SystemExit("analyze: error: no finished record gives the batch size B of the rule: pass --batch-size")
    return over_run_table(logs, batch) or "no run of these files logged the effective batch (n_eff)"


def compare_table(files):
    """Pilots beside the study they vary, one row per run of a reweighting method present in
    the pilots: what its config changes against the first file's, the clean meta-set loss of its
    last epoch (mean L_val(theta') over that epoch's meta steps: the pilots' criterion), the
    weights' peak and last AUC and peak saturation, the labels the final model fits, and its test
    accuracy and gain over the first file's ERM of the same seed (reported, never used to choose)."""
    runs = [(r, path) for path in files for r in molere_io.read_results(path)]
    if not runs:
        raise SystemExit(f"analyze: error: no results in {', '.join(files)}")
    base = runs[0][0]["config"]
    changed = lambda c: ", ".join(f"{k} {v}" for k, v in c.items()
                                  if base.get(k, molere_cli.LATER.get(k)) != v) or "the study's"
    erm = {r["seed"]: r["test_acc"] for r, path in sorted(runs, key=lambda rp: rp[1] == files[0])
           if r["method"] == "erm"}  # the first file's ERM where it has one, else another file's
    varied = {r["method"] for r, path in runs if path != files[0]}
    head = ["method", "seed", "config (against the first file's)", "clean meta-set loss, last epoch",
            "weights' AUC: peak (epoch) / last", "peak saturation (epoch)", "fits flipped / clean of S_tr (end, %)",
            "test acc (%)", "gain over ERM (pp)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, path in sorted(runs, key=lambda rp: (rp[0]["method"], rp[0]["seed"], rp[1] != files[0])):
        if r["method"] not in varied or "w_auc" not in r["log"][-1]:  # no meta level to compare (ERM)
            continue
        log, (flipped, clean) = r["log"], label_fits(r)
        auc = max(log, key=lambda e: e["w_auc"])
        key = "w_zero" if "w_zero" in log[0] else "w_sat"
        sat = max(log, key=lambda e: e[key])
        gain = f"{r['test_acc'] - erm[r['seed']]:+.2f}" if r["seed"] in erm else "—"
        lines.append(f"| {report.method_label(r['method'])} | {r['seed']} | {changed(r['config'])} | "
                     f"{log[-1]['val_loss']:.3f} | {auc['w_auc']:.2f} ({auc['epoch']}) / {log[-1]['w_auc']:.2f} | "
                     f"{sat[key]:.2f} ({sat['epoch']}) | {100 * flipped:.1f} / {100 * clean:.1f} | "
                     f"{r['test_acc']:.2f} | {gain} |")
    return "\n".join(lines)


def resplit_table(rows):
    """MOLERE's re-splits: overlap with the previous split, error of its points, kept and new."""
    rs = sorted((r for r in rows if r["method"] == "molere"), key=lambda r: r["seed"])
    if not rs or "val_err_new" not in next((e for e in rs[0]["log"] if "val_err" in e), {}):
        return None
    fmt = lambda v: "—" if v is None else f"{v:.1%}"
    lines = ["| seed | epoch | kept from previous split | error on new S_val | of which kept | of which new | "
             "error on new S_tr |", "|---|---|---|---|---|---|---|"]
    for r in rs:
        for e in r["log"]:
            if "val_err" in e:
                lines.append(f"| {r['seed']} | {e['epoch'] - 1} | {e['split_kept']:.0%} | {fmt(e['val_err'])} | "
                             f"{fmt(e['val_err_kept'])} | {fmt(e['val_err_new'])} | {fmt(e['train_err'])} |")
    return "\n".join(lines)


def paired_margin_gains(rows):
    """{method: (erm margins, method - erm margins, pairs)} pooled over seeds; the key
    'erm (other seed)' pairs ERM of one seed with ERM of every other seed."""
    erm = {r["seed"]: torch.tensor(r["test_margins"]) for r in rows if r["method"] == "erm"}
    out = {}
    for m in list(molere.METHODS)[1:]:
        pairs = [(erm[r["seed"]], torch.tensor(r["test_margins"]) - erm[r["seed"]])
                 for r in rows if r["method"] == m and r["seed"] in erm]
        if pairs:
            out[m] = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), len(pairs))
    pairs = [(erm[s], erm[t] - erm[s]) for s in erm for t in erm if s != t]
    if pairs:
        out["erm (other seed)"] = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), len(pairs))
    return out


def margin_table(gains):
    head = ["method", "pairs of runs", "mean margin gain", "median margin gain"] + \
           [f"ERM margin in [{lo:+.1f}, {min(hi, 1):+.1f})" for lo, hi in zip(BINS, BINS[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, (base, diff, n) in gains.items():
        cells = [report.method_label(m), str(n), f"{diff.mean():+.4f}", f"{diff.median():+.4f}"]
        for lo, hi in zip(BINS, BINS[1:]):
            sel = (base >= lo) & (base < hi)
            cells.append(f"{diff[sel].mean():+.4f} (n={int(sel.sum())})" if sel.any() else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(rows):
    by = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        by.setdefault(r["method"], []).append(r["wall_time_s"])
    erm = statistics.mean(by["erm"]) if "erm" in by else None
    lines = ["| method | wall time per run, by seed (s) | mean (s) | mean / ERM mean |", "|---|---|---|---|"]
    for m in molere.METHODS:
        if m in by:
            t = statistics.mean(by[m])
            lines.append(f"| {report.method_label(m)} | {', '.join(f'{x:.0f}' for x in by[m])} | {t:.0f} | "
                         f"{f'{t / erm:.2f}' if erm else '—'} |")
    return "\n".join(lines)


def weight_vs_margin(rows, bins=10):
    """{method: (bin centres, mean w~ per bin)}: the final meta-network's weight of each image of
    S_tr (divided by its mean over S_tr, so 1 = average) against ERM's margin of the same image."""
    erm = {r["seed"]: torch.tensor(r["train_margins"]) for r in rows if r["method"] == "erm" and "train_margins" in r}
    edges = torch.linspace(-1, 1.0001, bins + 1)
    out = {}
    for m in molere.METHODS:
        xs, ws = [], []
        for r in rows:
            if r["method"] == m and r.get("train_weights") and r["seed"] in erm:
                keep = torch.ones(len(r["train_weights"]), dtype=torch.bool)
                keep[r["val_mask"]] = False
                w = torch.tensor(r["train_weights"])[keep]
                xs.append(erm[r["seed"]][keep])
                ws.append(w / w.mean())
        if xs:
            x, w = torch.cat(xs), torch.cat(ws)
            idx = torch.bucketize(x, edges[1:-1])
            out[m] = ([float((edges[i] + edges[i + 1]) / 2) for i in range(bins) if (idx == i).any()],
                      [float(w[idx == i].mean()) for i in range(bins) if (idx == i).any()],
                      [int((idx == i).sum()) for i in range(bins) if (idx == i).any()])
    return out


def weight_table(curves):
    if not curves:
        return None
    lines = ["| method | ERM margin bin centre: mean w~ (n images) |", "|---|---|"]
    for m, (x, w, n) in curves.items():
        lines.append(f"| {report.method_label(m)} | " + "; ".join(f"{a:+.1f}: {b:.3f} ({c})" for a, b, c in zip(x, w, n)) + " |")
    return "\n".join(lines)


def noisy_clean_weights(rows):
    """{method: [(seed, w~ of clean images, w~ of noisy images)]} for the training images (S_tr)
    of each run: the final weights, divided by their mean over S_tr, of the images whose label
    --noise flipped and of those it left alone."""
    out = {}
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
        if r.get("train_weights") and r.get("noisy"):
            w = torch.tensor(r["train_weights"])
            train, noisy = torch.ones(len(w), dtype=torch.bool), torch.zeros(len(w), dtype=torch.bool)
            train[r["val_mask"]], noisy[r["noisy"]] = False, True
            w = w / w[train].mean()
            out.setdefault(r["method"], []).append((r["seed"], w[train & ~noisy], w[train & noisy]))
    return out


def noise_table(weights):
    if not weights:
        return None
    lines = ["| method | seed | mean w~ of clean images | mean w~ of noisy images | AUC (clean above noisy) |",
             "|---|---|---|---|---|"]
    for m, entries in weights.items():
        for seed, clean, noisy in entries:  # AUC = P(w of a clean image > w of a noisy one), ties half
            auc = report.auc(clean, noisy)
            lines.append(f"| {report.method_label(m)} | {seed} | {clean.mean():.3f} | {noisy.mean():.3f} | {auc:.3f} |")
    return "\n".join(lines)


def unfinished_runs(results_path, config_hash=None):
    """The runs of a study still going (or stopped before their record), from the per-epoch
    lines in the metrics.jsonl beside `results_path` (molere_cli.train_run appends one per epoch,
    flushed): {(method, seed): [log entries by epoch]} for every run of the config (the newest
    in the file without one) that has no result record. An epoch written twice (a run resumed
    from an earlier checkpoint) keeps its last line."""
    path = os.path.join(os.path.dirname(results_path), "metrics.jsonl")
    lines = molere_io.read_results(path)
    if not lines:
        return {}
    config_hash = config_hash or lines[-1]["config_hash"]
    done = {(r["method"], r["seed"]) for r in molere_io.read_results(results_path, config_hash)}
    runs = {}
    for e in lines:
        if e["config_hash"] == config_hash and (e["method"], e["seed"]) not in done:
            runs.setdefault((e["method"], e["seed"]), {})[e["epoch"]] = e
    return {k: [by_epoch[ep] for ep in sorted(by_epoch)] for k, by_epoch in sorted(runs.items())}


def unfinished_table(runs, epochs):
    """One row per unfinished run: epochs done, and the last numbers it wrote."""
    if not runs:
        return None
    head = ["method", "seed", "epochs done", "last loss", "last test acc (%)", "last weights' AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (m, seed), log in runs.items():
        tested = [e for e in log if e.get("test_acc") is not None]
        test = f"{tested[-1]['test_acc']:.2f} (epoch {tested[-1]['epoch']})" if tested else "—"
        auc_ = next((f"{log[-1][k]:.2f}" for k in ("w_auc", "w_auc_minority") if log[-1].get(k) is not None), "—")
        lines.append(f"| {report.method_label(m)} | {seed} | {log[-1]['epoch']} of {epochs or '?'} | "
                     f"{log[-1]['loss']:.3f} | {test} | {auc_} |")
    return "\n".join(lines)


def progress_figure(rows, runs, folder):
    """progress.png: the training loss by epoch of every run, finished (solid, from its record)
    and unfinished (dashed, from metrics.jsonl), one colour per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colour = {m: f"C{i}" for i, m in enumerate(molere.METHODS)}
    labelled = set()
    for (m, _), log, style in [((r["method"], r["seed"]), r["log"], "-") for r in rows] + \
            [(k, log, "--") for k, log in runs.items()]:
        ax.plot([e["epoch"] for e in log], [e["loss"] for e in log], style, marker=".", color=colour[m], lw=1,
                label=None if m in labelled else report.method_label(m))
        labelled.add(m)
    ax.set_xlabel("epoch (solid: finished; dashed: still going)")
    ax.set_ylabel("training loss (unweighted, batch mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(folder, exist_ok=True)
    fig.savefig(os.path.join(folder, "progress.png"), dpi=120)
    return "progress.png"


def mean_where_all_have(runs, key):
    """(epochs, means) of a log entry over runs, at the epochs where every run recorded it. A run
    tests at its own epochs (each new best on the meta set, say), so seeds differ in where."""
    epochs = [e["epoch"] for e in runs[0]["log"]]
    common = [i for i in range(len(epochs)) if all(key in r["log"][i] for r in runs)]
    return [epochs[i] for i in common], [statistics.mean(r["log"][i][key] for r in runs) for i in common]


def gain_figure(plt, rows, methods, gains_by, save):
    """gain_over_erm.png: each method's test-accuracy gain over ERM of the same seed, mean, std and every
    seed; the paper's CIFAR-100 gains beside ours where the dataset is CIFAR-100, labelled as the paper's."""
    paper_head, paper_of = report.paper_column(rows, rows[0]["dataset"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [statistics.mean(p) for p in gains_by], 0.4,
           yerr=[statistics.stdev(p) if len(p) > 1 else 0 for p in gains_by], capsize=3, label="ours (mean ± std over seeds)")
    if "gain" in paper_head:
        ax.bar([x + 0.2 for x in xs], [float(paper_of.get(m, 0)) for m in methods], 0.4, fill=False,
               hatch="//", label="paper's CIFAR-100 (Fig. 1)")
    for x, p in zip(xs, gains_by):
        ax.scatter([x - 0.2] * len(p), p, color="k", s=8, zorder=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(list(xs), [report.method_label(m).replace(" (", "\n(") for m in methods])
    ax.set_ylabel("test accuracy gain over ERM (points)")
    ax.legend(fontsize=8)
    save(fig, "gain_over_erm.png")


def figures(rows, gains, curves, folder):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install matplotlib), the tables above are complete")
        return
    written = []
    os.makedirs(folder, exist_ok=True)

    def save(fig, filename):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, filename), dpi=120)
        written.append(filename)

    def lines_plot(series, xlabel, ylabel, filename, baseline=0.0):
        """One line per method: series = {method: (x, y)}."""
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m, (x, y) in series.items():
            ax.plot(x, y, marker="o", label=report.method_label(m), **(dict(ls="--", color="k") if m.startswith("erm (") else {}))
        ax.axhline(baseline, color="k", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        save(fig, filename)

    acc = report.accuracy_by_seed(rows)
    methods = [m for m in list(molere.METHODS)[1:] if m in acc and report.paired_gains(acc, m)]
    gains_by = [report.paired_gains(acc, m) for m in methods]
    if methods:
        gain_figure(plt, rows, methods, gains_by, save)
    if gains:
        centers = [(lo + min(hi, 1)) / 2 for lo, hi in zip(BINS, BINS[1:])]
        bins = [lambda base, lo=lo, hi=hi: (base >= lo) & (base < hi) for lo, hi in zip(BINS, BINS[1:])]
        lines_plot({m: (centers, [float(diff[b(base)].mean()) if b(base).any() else float("nan") for b in bins])
                    for m, (base, diff, _) in gains.items()},
                   "ERM test margin (bin centre)", "mean margin gain over ERM", "margin_gain.png")
    if not methods or not gains:  # both compare with ERM of the same seed
        print("gain_over_erm.png and margin_gain.png need ERM and another method on the same seeds: not drawn")
    if curves:
        lines_plot({m: (x, w) for m, (x, w, _) in curves.items()}, "ERM margin of the same training image (bin centre)",
                   "learned weight / mean weight (end of run)", "weight_vs_margin.png", baseline=1.0)

    weights = noisy_clean_weights(rows)
    if weights:
        fig, axes = plt.subplots(1, len(weights), figsize=(3.2 * len(weights), 3), squeeze=False)
        for ax, (m, entries) in zip(axes[0], weights.items()):
            seed, clean, noisy = entries[0]  # the first seed's run
            edges = torch.linspace(float(torch.cat([clean, noisy]).min()), float(torch.cat([clean, noisy]).max()) + 1e-6, 31)
            ax.hist(clean.tolist(), bins=edges.tolist(), alpha=0.6, label="clean label")
            ax.hist(noisy.tolist(), bins=edges.tolist(), alpha=0.6, label="flipped label")
            ax.set_title(f"{report.method_label(m)}, seed {seed}", fontsize=9)
            ax.set_xlabel("learned weight / mean")
        axes[0][0].set_ylabel("training images")
        axes[0][0].legend(fontsize=7)
        save(fig, "weights_noisy_clean.png")

    if any("w_auc" in e for r in rows for e in r["log"]):  # METHOD.md §8: does the meta level learn?
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for i, m in enumerate(molere.METHODS):  # one colour per method, one line per seed (seeds can disagree)
            for k, r in enumerate(sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])):
                log, style = r["log"], dict(color=f"C{i}", lw=1, label=report.method_label(m) if k == 0 else None)
                epochs = [e["epoch"] for e in log]
                if "w_auc" in log[0]:
                    axes[0].plot(epochs, [e["w_auc"] for e in log], **style)
                    axes[1].plot(epochs, [e.get("w_sat", e.get("w_zero")) for e in log], **style)
                axes[2].plot(epochs, [e["fit_flipped"] for e in log], **style)
        axes[0].axhline(0.5, color="k", lw=0.8)
        axes[0].set_ylabel("AUC of weights, clean above flipped")
        axes[1].set_ylabel("saturated weights (<0.05 or >0.95);\nL2RW: share of w = 0")
        axes[2].set_ylabel("flipped labels fitted (train mode)")
        for ax in axes:
            ax.set_xlabel("epoch (one line per seed)")
        axes[2].legend(fontsize=7)
        save(fig, "meta_level.png")

    if any("test_acc" in e for r in rows for e in r["log"][:-1]):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for m in molere.METHODS:
            rs = [r for r in rows if r["method"] == m]
            if not rs:
                continue
            a1.plot(*mean_where_all_have(rs, "loss"), marker=".", label=report.method_label(m))
            a2.plot(*mean_where_all_have(rs, "test_acc"), marker=".", label=report.method_label(m))
        a1.set_xlabel("epoch"), a1.set_ylabel("training loss (unweighted, batch mean)")
        a2.set_xlabel("epoch"), a2.set_ylabel("test accuracy (%), plotted, never used to select")
        a2.legend(fontsize=7)
        save(fig, "learning_curves.png")
    print(f"\nfigures in {folder}: {', '.join(written)}")


def write_block(path, kind, results, text):
    """Replace the block between `<!-- KIND RESULTS -->` and `<!-- /KIND -->` of a markdown file."""
    doc = open(path).read()
    begin, end = f"<!-- {kind} {results} -->", f"<!-- /{kind} -->"
    if begin not in doc:
        raise SystemExit(f"analyze: error: {path} has no line {begin}")
    head, rest = doc.split(begin, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="a results.jsonl (several with --compare)")
    p.add_argument("--compare", action="store_true", help="one table of runs from several files whose configs differ")
    p.add_argument("--over-run", action="store_true", help="the meta level over the run (lowest AUC and n_eff from epoch "
                   "10), for the runs of several files, finished or not, each labelled by its folder (pilots)")
    p.add_argument("--batch-size", type=int, help="--over-run: B of the rule n_eff >= B/4 where no run has finished")
    p.add_argument("--figures", help="folder for the PNG figures")
    p.add_argument("--into", help="a markdown file whose analyze block for these results gets the tables")
    p.add_argument("--family-into", help="a markdown file (RESULTS.md) whose family block for these results gets the "
                                         "study's question alone: its family of comparisons, Holm-adjusted")
    p.add_argument("--family", help="--family-into: only the question whose title contains this text (a study "
                                    "whose protocol rules on one question of several its runs answer)")
    p.add_argument("--held-out", help="a reference results.jsonl: held-out S_val accuracy of both, paired against "
                                      "its erm-tr of the same seed and split (the clean-data check of METHOD.md §9)")
    p.add_argument("--baselines", help="a results.jsonl whose ERM and erm-cb runs of the same seeds join these in "
                                       "every table: for a study that reran only meta levels (their configs may "
                                       "differ only in fields that no run without a meta level reads)")
    p.add_argument("--held-out-against", default="erm-tr", help="--held-out: the reference's method to pair "
                                                                 "against (lrw-random: a candidate against the defaults)")
    a = p.parse_args()
    if a.family and not any(a.family in question for question in FAMILIES):
        p.error(f"--family {a.family!r} is in no question's title: {'; '.join(FAMILIES)}")
    if a.compare:
        return print(compare_table(a.results))
    if a.over_run:
        return print(over_run_files(a.results, a.batch_size))
    if len(a.results) > 1:
        p.error("several results files only with --compare")
    a.results = a.results[0]
    rows = molere_io.read_results(a.results)
    runs = unfinished_runs(a.results, rows[-1]["config_hash"] if rows else None)
    if not rows:  # a study that has started: what its runs have done so far
        if not runs:
            raise SystemExit(f"analyze: error: no results in {a.results} and no metrics.jsonl beside it")
        print(f"No finished run yet in `{a.results}`; from its metrics.jsonl:\n\n{unfinished_table(runs, None)}")
        print(f"\n{over_run_files([a.results], a.batch_size)}")
        if a.figures:
            print(f"\nfigures in {a.figures}: {progress_figure([], runs, a.figures)}")
        return
    rows = [r for r in rows if r["config_hash"] == rows[-1]["config_hash"]]
    r0 = rows[0]
    command = f"python -m tools.analyze {a.results}" + (f" --baselines {a.baselines}" if a.baselines else "")
    out = [f"Generated by `{command}`: config `{r0['config_hash']}` on {r0['dataset']}, "
           f"{len(rows)} runs, seeds {sorted({r['seed'] for r in rows})}, {r0['device']}, finished between "
           f"{min(r['date'] for r in rows)} and {max(r['date'] for r in rows)}."]
    if a.baselines:
        joined = baseline_rows(rows, molere_io.read_results(a.baselines), a.baselines)
        out.append(f"With {len(joined)} runs of `{a.baselines}` (ERM without a meta level: "
                   f"{', '.join(sorted({report.method_label(r['method']) for r in joined}))}; config "
                   f"{', '.join(sorted({'`' + r['config_hash'] + '`' for r in joined}))}), paired by seed.")
        rows = rows + joined
    gains, curves = paired_margin_gains(rows), weight_vs_margin(rows)
    sections = [("(a) accuracy", accuracy_table(rows)),
                ("(b) paired comparisons", comparison_table(rows)),
                ("(b) the study's question (RESULTS.md section 9): one family, Holm-adjusted", family_tables(rows)),
                ("(b) subpopulations: majority and minority (the hard-samples known answer)", subpopulation_table(rows)),
                ("(b) class skew: many-, medium- and few-shot classes, training accuracy and learned weight per class",
                 shot_table(rows)),
                ("(b) early stopping on the meta set", early_stopping_table(rows)),
                ("(c) regime check and meta-level diagnostics", regime_table(rows)),
                ("(c) the meta level, per method and seed (METHOD.md §8)", meta_level_table(rows)),
                ("(c) the meta level over the run: lowest AUC and effective batch from epoch 10",
                 over_run_table({**{(report.method_label(r["method"]), r["seed"]): r["log"] for r in rows},
                                 **{(report.method_label(m) + " (unfinished)", s): log for (m, s), log in runs.items()}},
                                r0["config"]["batch_size"], epochs=r0["config"].get("epochs"))),
                ("(c) MOLERE's re-splits", resplit_table(rows)),
                ("(d) margin analysis: paired test-margin differences method − ERM (same image, same seed)",
                 margin_table(gains)),
                ("(d) learned weight against the ERM margin of the same training image", weight_table(curves)),
                ("(d) learned weights of training images with flipped and with clean labels",
                 noise_table(noisy_clean_weights(rows))),
                ("(e) wall time", time_table(rows)),
                ("(f) runs still going (from metrics.jsonl; not in the tables above)",
                 unfinished_table(runs, r0["config"].get("epochs")))]
    if a.held_out:
        sections.insert(2, (f"(b) held-out S_val accuracy against `{a.held_out}`",
                            heldout_table(rows, molere_io.read_results(a.held_out), a.held_out_against)))
    out += [f"\n#### {title}\n\n{table}" for title, table in sections if table]
    text = "\n".join(out)
    print(text)
    if a.into:
        write_block(a.into, "analyze", a.results, text)
    if a.family_into:
        only = f" --family '{a.family}'" if a.family else ""
        write_block(a.family_into, "family", a.results, f"{family_tables(rows, a.family)}\n\n(`{command} --family-into "
                    f"{a.family_into}{only}`: {len(rows)} runs, seeds {sorted({r['seed'] for r in rows})})")
    if a.figures:
        figures(rows, gains, curves, a.figures)
        if runs:
            print(f"figures in {a.figures}: {progress_figure(rows, runs, a.figures)}")


if __name__ == "__main__":
    main()
