"""The method as a library: installed from pyproject.toml into a folder outside the repository,
`import molere` works from anywhere, imports torch and the kernel only, installs no generic
top-level names, and docs/library.md's first two examples (the meta-gradient, the splitter) run there as
they stand, with a frozen layer in the model."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, docs_code

pytestmark = pytest.mark.slow  # runs the command line, subprocesses or whole trainings (README, Tests)

OUTSIDE = textwrap.dedent('''
    import sys
    import torch
    import torch.nn as nn
    import molere
    assert molere.__file__.startswith(sys.argv[1]), molere.__file__  # the installed copy, not the checkout
    loaded = {m.split(".")[0] for m in sys.modules}
    assert not loaded & {"torchvision", "molere_io", "molere_cli", "molere_data", "kernels", "report"}, loaded
    assert "molere_kernels" in loaded

    class Net(nn.Module):  # (logits, features); its first layer frozen, as a fine-tuned backbone's
        def __init__(self):
            super().__init__()
            self.stem, self.body, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Linear(6, 3)
            self.stem.requires_grad_(False)
        def forward(self, x):
            h = torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3))
            return self.head(h), h

    torch.manual_seed(0)
    x, y, xv, yv = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)), torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    meta, split = {}, {}
    exec(open(sys.argv[2]).read(), meta)
    exec(open(sys.argv[3]).read(), split)

    class Logits(nn.Module):  # the meta-gradient example's model gives logits alone
        def __init__(self, net):
            super().__init__()
            self.net = net
        def forward(self, x):
            return self.net(x)[0]

    net = Net()
    model = Logits(net)
    weigh = meta["LossWeightNet"](hidden=8)
    phi = [p.detach().clone() for p in weigh.parameters()]
    stem = net.stem.weight.detach().clone()
    meta["reweighted_step"](model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                            weigh, torch.optim.SGD(weigh.parameters(), lr=1.0), x, y, xv, yv)
    assert any(not torch.equal(p, b) for p, b in zip(weigh.parameters(), phi)), "phi did not move"
    assert torch.equal(net.stem.weight, stem), "the frozen layer moved"

    splitter = split["make_splitter"](6, 3, 0.25, hidden=8)
    terms = split["splitter_update"](splitter, torch.optim.Adam(splitter.parameters()), net, x, y, 0.25, 3)
    mask = split["hard_split"](splitter, net, x, y, 0.25, 3)
    assert set(terms) == {"fit", "l_val", "r_size", "r_bal"} and mask.dtype == torch.bool and 0 < int(mask.sum()) < 8
    print("outside: ok")
''')


def test_installed_package_runs_the_docs_examples_from_outside(tmp_path):
    target, work, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    work.mkdir()
    # a copy of what pyproject.toml installs, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=lambda d, names: [n for n in names if n in (
        ".venv", ".git", "results", "runs", "tests", "tools", "build") or n.endswith(".egg-info")])
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(source)], capture_output=True, text=True, cwd=work)
    assert build.returncode == 0, build.stderr[-2000:]
    top = {name.split(".")[0] for name in os.listdir(target) if not name.endswith((".dist-info", "__pycache__"))}
    assert top == {"molere", "molere_cli", "molere_data", "molere_io", "molere_report", "molere_world", "molere_kernels",
                   "molere_analyze", "bin"}, top
    assert {"molere", "molere-analyze"} <= set(os.listdir(target / "bin"))
    files = []
    for name, code in (("meta.py", docs_code()), ("split.py", docs_code("splitter")), ("check.py", OUTSIDE)):
        (work / name).write_text(code)
        files.append(str(work / name))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)  # the install alone: the checkout is not on the path
    run = subprocess.run([sys.executable, files[2], str(target), files[0], files[1]], capture_output=True, text=True,
                         cwd=work, env=env, timeout=300)
    assert run.returncode == 0 and "outside: ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    # the command line and the analysis from the same outside folder: a run without ERM draws no empty figure
    out = work / "runs"
    train = subprocess.run([sys.executable, "-m", "molere_cli", "--dataset", "synthetic", "--train-subset", "200",
                            "--depth", "10", "--width", "1", "--epochs", "2", "--batch-size", "20", "--hidden", "8",
                            "--method", "lrw-random", "--eval-every", "1", "--out", str(out)],
                           capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    tables = subprocess.run([sys.executable, "-m", "molere_analyze", str(out / "results.jsonl"), "--figures",
                             str(out / "fig")], capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert tables.returncode == 0, tables.stdout[-2000:] + tables.stderr[-2000:]
    assert "need ERM and another method on the same seeds: not drawn" in tables.stdout
    drawn = set(os.listdir(out / "fig"))
    assert "learning_curves.png" in drawn and not {"gain_over_erm.png", "margin_gain.png"} & drawn, drawn
    assert "Warning" not in tables.stderr, tables.stderr[-1000:]
