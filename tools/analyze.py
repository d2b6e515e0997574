"""Tables and figures from a results.jsonl written by molere.py (RESULTS.md is made from these).

    python -m tools.analyze results/cifar10-cpu/results.jsonl [--figures DIR]

Prints, for the newest config in the file: (a) accuracy and gain over ERM with the per-seed
paired spread, the paper's CIFAR-100 gain beside it; (b) the margin analysis of SPEC section 4:
paired test-margin differences method - ERM (same test image, same seed), mean and median,
and the mean margin gain binned by ERM margin; (c) wall time per method and MOLERE/ERM.
With --figures, also writes gain_over_erm.png (like the paper's Fig. 1) and
margin_gain.png (like its Fig. 3). Figures need matplotlib, an optional extra.
"""
import argparse
import os
import statistics

import torch

import molere

BINS = [-1.0, -0.5, 0.0, 0.5, 1.0001]


def paired_margin_gains(rows):
    """{method: (erm margins, method - erm margins)} over all seeds both have, concatenated."""
    erm = {r["seed"]: torch.tensor(r["test_margins"]) for r in rows if r["method"] == "erm"}
    out = {}
    for m in molere.METHODS[1:]:
        pairs = [(erm[r["seed"]], torch.tensor(r["test_margins"]) - erm[r["seed"]])
                 for r in rows if r["method"] == m and r["seed"] in erm]
        if pairs:
            out[m] = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), len(pairs))
    return out


def margin_table(gains):
    head = ["method", "seeds", "mean margin gain", "median margin gain"] + \
           [f"ERM margin in [{lo:+.1f}, {min(hi, 1):+.1f})" for lo, hi in zip(BINS, BINS[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, (base, diff, n) in gains.items():
        cells = [m, str(n), f"{diff.mean():+.4f}", f"{diff.median():+.4f}"]
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
            ratio = f"{t / erm:.2f}" if erm else "—"
            lines.append(f"| {m} | {', '.join(f'{x:.0f}' for x in by[m])} | {t:.0f} | {ratio} |")
    return "\n".join(lines)


def figures(rows, gains, folder):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install matplotlib), the tables above are complete")
        return
    acc = molere.accuracy_by_seed(rows)
    methods = [m for m in molere.METHODS[1:] if m in acc and molere.paired_gains(acc, m)]
    paired = [molere.paired_gains(acc, m) for m in methods]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [statistics.mean(p) for p in paired], 0.4,
           yerr=[statistics.stdev(p) if len(p) > 1 else 0 for p in paired], capsize=3, label="ours (mean ± std over seeds)")
    ax.bar([x + 0.2 for x in xs], [molere.PAPER_GAIN_CIFAR100[m] for m in methods], 0.4, fill=False,
           hatch="//", label="paper's CIFAR-100 (Fig. 1)")
    for x, p in zip(xs, paired):
        ax.scatter([x - 0.2] * len(p), p, color="k", s=8, zorder=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("test accuracy gain over ERM (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "gain_over_erm.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    centers = [(lo + min(hi, 1)) / 2 for lo, hi in zip(BINS, BINS[1:])]
    for m, (base, diff, _) in gains.items():
        means = [float(diff[(base >= lo) & (base < hi)].mean()) if ((base >= lo) & (base < hi)).any() else float("nan")
                 for lo, hi in zip(BINS, BINS[1:])]
        ax.plot(centers, means, marker="o", label=m)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("ERM test margin (bin centre)")
    ax.set_ylabel("mean margin gain over ERM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "margin_gain.png"), dpi=120)
    print(f"figures: {folder}/gain_over_erm.png, {folder}/margin_gain.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--figures", help="folder for the two PNG figures")
    a = p.parse_args()
    rows = molere.read_results(a.results)
    if not rows:
        raise SystemExit(f"analyze.py: error: no results in {a.results}")
    rows = [r for r in rows if r["config_hash"] == rows[-1]["config_hash"]]
    gains = paired_margin_gains(rows)
    print(molere.report_table(rows, rows[0]["dataset"]))
    print("\nmargin analysis: paired test-margin differences method - ERM (same image, same seed)")
    print(margin_table(gains))
    print("\nwall time")
    print(time_table(rows))
    if a.figures:
        figures(rows, gains, a.figures)


if __name__ == "__main__":
    main()
