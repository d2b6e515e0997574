"""The studies as data: each folder results/NAME/ with a study.json holds one study's runs, records,
tables and protocol (README.md). This tool lists them, reruns one (resumable), and checks that each
study's flags still give the config of its committed records.

    python -m tools.study list               # every study: what it asks, runs recorded of planned
    python -m tools.study run control        # rerun (or continue) one, then its tables and figures
    python -m tools.study check              # each study's flags give its records' config hash

study.json:
    about     one line: what the study asks
    kind      study (a question of RESULTS.md) | pilots (its variants chose something) | history
              (superseded by a later study; RESULTS.md's History list)
    data      true where the runs read CIFAR from DATA_ROOT (default data/)
    flags     molere.py flags every run shares, the old defaults a study pins included
    runs      [{"out": subfolder or "", "methods": "erm,mwn", "seeds": [...], "flags": [...]}, ...]
    workers   parallel processes (tools/schedule.py; default 2)
    tool      optional: a module that wraps molere.py (tools.spurious_pilot), with each run's
              "tool_flags" before `--`
    analyze   optional extra tools/analyze.py flags (e.g. --held-out FILE); with --compare or
              --over-run, one table of every run's records side by side ("baseline": the first)
    commit    optional: the code the records ran on, where this code no longer gives their config
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def studies():
    """{name: study dict}, every folder of results/ with a study.json, by name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/study.json"))}


def run_commands(name, study, data_root="data", extra=()):
    """(out folder, argv) of each run of the study: a tools.schedule (or the study's tool) command."""
    out = []
    for run in study["runs"]:
        folder = RESULTS / name / run.get("out", "")
        flags = (["--data-root", data_root] if study.get("data") else []) + study["flags"] + run.get("flags", []) + \
            ["--method", run["methods"], "--seeds", *map(str, run["seeds"]), "--out", str(folder.relative_to(ROOT)),
             "--resume", *extra]
        if study.get("tool"):
            argv = ["-m", study["tool"], *run.get("tool_flags", []), "--", *flags]
        else:
            argv = ["-m", "tools.schedule", "--workers", str(study.get("workers", 2)), "--", *flags]
        out.append((folder, argv))
    return out


def config_hash(argv):
    """The config hash of a run's molere.py flags (those after `--`), as molere_cli computes it."""
    import molere
    import molere_cli
    flags = argv[argv.index("--") + 1:]
    args = molere_cli.build_parser().parse_args(flags)
    from dataclasses import fields
    return molere_cli.config_hash(molere.Config(**{f.name: getattr(args, f.name) for f in fields(molere.Config)}))


def recorded(folder):
    """(method, seed) -> config hash of the finished runs in folder/results.jsonl."""
    path = folder / "results.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["method"], r["seed"]): r["config_hash"] for r in rows}


def planned(study):
    return sum(len(r["methods"].split(",")) * len(r["seeds"]) for r in study["runs"])


def check(name, study):
    """Lines naming each run whose committed records were made under another config than the flags
    give today (empty: every record matches). A study with a `commit` ran on older code and is skipped."""
    if study.get("commit"):
        return []
    bad = []
    for (folder, argv), run in zip(run_commands(name, study), study["runs"]):
        want = config_hash(argv)
        for (method, seed), got in recorded(folder).items():
            if method in run["methods"].split(",") and seed in run["seeds"] and got != want:
                bad.append(f"{name}/{run.get('out', '')}: {method} seed {seed} recorded under {got}, flags give {want}")
    return bad


def fail(message):
    print(f"study: error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("verb", choices=["list", "run", "check"])
    p.add_argument("name", nargs="?", help="run: the study (a folder of results/ with a study.json)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="run: more molere.py flags, e.g. --stop-after 1")
    a = p.parse_args()
    all_studies = studies()
    if a.verb == "list":
        for kind in ("study", "pilots", "history"):
            for name, s in all_studies.items():
                if s["kind"] == kind:
                    done = sum(len(recorded(f)) for f, _ in run_commands(name, s))
                    print(f"{name:24} {kind:8} {done:3}/{planned(s):<3} runs  {s['about']}")
        return
    if a.verb == "check":
        bad = [line for name, s in all_studies.items() for line in check(name, s)]
        print("\n".join(bad) or f"{len(all_studies)} studies: every record's config is what its flags give")
        sys.exit(1 if bad else 0)
    if a.name not in all_studies:
        fail(f"no study {a.name!r}; the studies are: {', '.join(all_studies)}")
    s = all_studies[a.name]
    if s.get("commit"):
        fail(f"{a.name} ran on the code of commit {s['commit']}, which today's flags no longer reproduce: "
             f"`git worktree add old {s['commit']}` and rerun it there")
    commands = run_commands(a.name, s, os.environ.get("DATA_ROOT", "data"), a.extra)
    for folder, argv in commands:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT)
        if done.returncode:  # the run has said why, in one line; its finished epochs are checkpointed
            sys.exit(done.returncode)
    folder = RESULTS / a.name
    many = {"--compare", "--over-run"} & set(s.get("analyze", []))
    if many:  # pilots: one table of every run's records, the baseline (a run's folder or another study's) first
        base = s.get("baseline")
        files = [str(f / "results.jsonl") for f, _ in commands]
        first = [str(folder / base / "results.jsonl")] if base and (folder / base).is_dir() else [base] if base else []
        tables = [sys.executable, "-m", "molere_analyze", *s["analyze"], *first, *[f for f in files if f not in first]]
    else:
        readme = folder / "README.md"
        into = ["--into", str(readme)] if readme.exists() and \
            f"<!-- analyze results/{a.name}/results.jsonl -->" in readme.read_text() else []
        last = commands[-1][0]  # the study's records, or its last run folder's (beside another run's: --held-out)
        tables = [sys.executable, "-m", "molere_analyze", str((last / "results.jsonl").relative_to(ROOT)),
                  "--figures", str(last), *into, *s.get("analyze", [])]
    if subprocess.run(tables, cwd=ROOT).returncode:
        sys.exit(1)
    where = "its run folders' results.jsonl; the table above" if many else \
        f"{folder}/results.jsonl; tables and figures in {folder}/"
    print(f"records in {where} (the protocol and conclusion: {folder}/README.md)")


if __name__ == "__main__":
    main()
