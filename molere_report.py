"""The results table and what it compares against (METHOD.md §§5 and 6): accuracy by seed,
paired gains over ERM, method labels, and the paper's figures beside ours, labelled as the
paper's. molere.py prints it at the end of a plan; tools/ build their tables on it."""
import torch

from molere import METHODS

ROLE = {m: spec.role for m, spec in METHODS.items() if spec.role}  # how tables label the others

# The paper's CIFAR-100 gains over ERM in points, read off its Fig. 1 (METHOD.md §6).
# Printed beside our numbers, labelled as the paper's; never used as a result.
PAPER_GAIN_CIFAR100 = {"lrw-easy": -0.31, "lrw-random": 0.57, "lrw-hard": 1.72, "molere": 1.96}
# The paper's Table 2: CIFAR-100 test accuracy (%) under class skew rho = 200/50/10/1 (METHOD.md §6).
PAPER_TABLE2 = {"molere": {200: 42.33, 50: 50.77, 10: 63.28, 1: 75.12},
                "mwn": {200: 40.11, 50: 48.67, 10: 61.32, 1: 74.23}}


def auc(pos, neg):
    """P(a random `pos` value > a random `neg` value), ties counted half (Mann-Whitney U / n m)."""
    neg = neg.sort().values
    below = torch.searchsorted(neg, pos, right=False).double()
    ties = torch.searchsorted(neg, pos, right=True).double() - below
    return (below + 0.5 * ties).sum() / (len(pos) * len(neg))


def mean_std(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(xs) > 1 else 0.0


def accuracy_by_seed(rows):
    """{method: {seed: test accuracy}} from result lines."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r["test_acc"]
    return by


def paired_gains(by, method, base="erm"):
    """Per-seed differences `method` - `base` (accuracy of the same seed, in points), in seed
    order, over the seeds both have."""
    return [by[method][s] - by[base][s] for s in sorted(set(by.get(method, {})) & set(by.get(base, {})))]


def method_label(m):
    return f"{m} ({ROLE[m]})" if m in ROLE else m


def paper_column(rows, dataset):
    """The paper's figure for this setting, per method: Table 2's accuracy for the CIFAR-100
    class-skew setting (ResNet-32, rho in 200/50/10/1), Fig. 1's gain for clean CIFAR-100, nothing
    for other data (CIFAR-10, a folder, synthetic: the paper has no number for them)."""
    cfg = rows[0]["config"] if rows else {}
    rho = cfg.get("imbalance", 1.0)
    if dataset == "cifar100" and cfg.get("arch") == "resnet32" and rho in PAPER_TABLE2["molere"]:
        return f"paper's accuracy (Table 2, ρ={rho:g})", {m: f"{v[rho]:.2f}" for m, v in PAPER_TABLE2.items()}
    if "noise" in cfg or "imbalance" in cfg or dataset != "cifar100":
        return "paper's figure", {}  # a setting or data the paper's Fig. 1 does not cover (a folder, synthetic)
    return "paper's CIFAR-100 gain", {m: f"{v:+.2f}" for m, v in PAPER_GAIN_CIFAR100.items()}


def report_table(rows, dataset):
    """Method, accuracy mean +- std (n seeds), gain over ERM and its per-seed paired spread,
    and the paper's figure beside it (labelled as the paper's)."""
    by = accuracy_by_seed(rows)
    erm = by.get("erm", {})
    paper_head, paper_of = paper_column(rows, dataset)
    lines = [f"results on {dataset} (test accuracy, %; gains in points over ERM of the same seed)",
             f"| method | n | accuracy mean ± std | gain over ERM | paired gain ± std | {paper_head} |",
             "|---|---|---|---|---|---|"]
    for m in METHODS:
        if m not in by:
            continue
        accs = list(by[m].values())
        mu, sd = mean_std(accs)
        paired = paired_gains(by, m)
        if m != "erm" and paired:
            gain_mean, gain_sd = mean_std(paired)
            gain, pair = f"{mu - mean_std(list(erm.values()))[0]:+.2f}", f"{gain_mean:+.2f} ± {gain_sd:.2f} (n={len(paired)})"
        else:
            gain = pair = "—"
        paper = paper_of.get(m, "—")
        lines.append(f"| {method_label(m)} | {len(accs)} | {mu:.2f} ± {sd:.2f} | {gain} | {pair} | {paper} |")
    return "\n".join(lines)
