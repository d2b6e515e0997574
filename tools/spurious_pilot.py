"""Pilot of the hard-samples known answer (RESULTS.md section 9): how strong each cue of the
spurious set is (molere_data.SPURIOUS), chosen on held-out training images, never on the test set.

    python -m tools.spurious_pilot --shape 0.35 --tint 0.5 --noise 0.25 --minority 0.2 -- <molere.py flags>

Runs molere.py with the generator's parameters replaced (the config hash does not see them: give
every setting its own --out), then prints, for each finished run that holds images out (erm-tr,
LRW), the accuracy on its held-out S_val by subpopulation (majority: the image's own class tint;
minority: another class's), and the training accuracy by subpopulation: the regime the study needs
is one where plain training leans on the tint, so the held-out minority falls well below the majority.
"""
import argparse
import json
import os

import molere_cli
import molere_data


def held_out(record):
    """Accuracy (%) on the held-out S_val and on S_tr, by subpopulation, from a result record."""
    right = [m > 0 for m in record["train_margins"]]
    minority = set(record["minority"])
    val = set(record["val_mask"])
    share = lambda idx: round(100 * sum(right[i] for i in idx) / len(idx), 1) if idx else None
    groups = {}
    for part, members in (("val", val), ("train", set(range(len(right))) - val)):
        groups[f"{part} majority"] = share([i for i in members if i not in minority])
        groups[f"{part} minority"] = share([i for i in members if i in minority])
    return groups


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in molere_data.SPURIOUS.items():
        p.add_argument(f"--{k}", type=float, default=v)
    args, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]
    molere_data.SPURIOUS.update({k: getattr(args, k) for k in molere_data.SPURIOUS})
    print(f"spurious set: {molere_data.SPURIOUS}", flush=True)
    molere_cli.main(rest)
    out = rest[rest.index("--out") + 1]
    with open(os.path.join(out, "results.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("minority") is not None and r["val_mask"]:
                print(f"{r['method']} seed {r['seed']}: {held_out(r)}")


if __name__ == "__main__":
    main()
