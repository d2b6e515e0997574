"""molere.py copied alone: in a folder holding only that file, with torch installed and nothing else of
the repository importable (no kernels/, molere_world, molere_io, ...; no torchvision, no triton),
`import molere` works, Config() builds and checks itself, and LRW-Random and MOLERE train through the
Python API (docs/library.md's third example, run as it stands). Its plain-torch weighted cross-entropy
gives the kernel's numbers."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import ROOT, docs_code, fresh_seed
from kernels import weighted_cross_entropy

pytestmark = pytest.mark.slow  # a subprocess

ALONE = textwrap.dedent('''
    import json, os, sys
    for name in ("torchvision", "kernels", "molere_kernels", "molere_world", "molere_io", "molere_data", "molere_cli",
                 "molere_report", "molere_analyze", "triton", "tools"):
        sys.modules[name] = None  # importing any of them fails, as in a folder with molere.py alone
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.abspath(sys.argv[1])]
    sys.path.insert(0, os.getcwd())
    import torch
    import molere
    assert os.path.dirname(molere.__file__) == os.getcwd(), molere.__file__
    assert molere.weighted_cross_entropy.__module__ == "molere" and molere.world() == 1
    molere.Config()  # the paper's defaults
    try:
        molere.Config(delta=0.7, K=0)
        raise SystemExit("a bad Config was built")
    except molere.ConfigError as e:
        assert "--delta" in str(e) and "--K" in str(e), e  # every problem, in one message
    out = {}
    torch.manual_seed(int(sys.argv[2]))
    logits, labels, weights = torch.randn(37, 7, requires_grad=True), torch.randint(0, 7, (37,)), torch.rand(37)
    loss, losses = molere.weighted_cross_entropy(logits, labels, weights, return_losses=True)
    loss.backward()
    out["ce"] = dict(loss=loss.item(), losses=losses.tolist(), grad=logits.grad.flatten().tolist())
    example = {}
    exec(open(sys.argv[3]).read(), example)
    x, y = torch.randn(200, 3, 8, 8), torch.randint(0, 4, (200,))
    x += torch.nn.functional.one_hot(y, 4).float()[:, :3, None, None]  # something to learn
    for method in ("lrw-random", "molere"):
        run, log = example["train_alone"](x, y, 4, method=method, epochs=2)
        out[method] = dict(epochs=[e["epoch"] for e in log], loss=[e["loss"] for e in log],
                           val_loss=[e["val_loss"] for e in log], steps=run.step,
                           split_kept=[e.get("split_kept") for e in log])
    print(json.dumps(out))
''')


def test_molere_py_alone_imports_builds_a_config_and_trains_lrw_and_molere(tmp_path):
    seed = fresh_seed()
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "molere.py"), alone)
    (alone / "check.py").write_text(ALONE)
    (alone / "example.py").write_text(docs_code("alone"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, "check.py", ROOT, str(seed), "example.py"], cwd=alone, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for method in ("lrw-random", "molere"):
        r = out[method]
        assert r["epochs"] == [1, 2] and r["steps"] > 0 and all(v > 0 for v in r["loss"] + r["val_loss"]), r
    assert out["molere"]["split_kept"][1] is not None  # the second epoch ran on the splitter's split
    # the plain-torch cross-entropy of molere.py alone against the kernel package on the same inputs
    torch.manual_seed(seed)
    logits, labels, weights = torch.randn(37, 7, requires_grad=True), torch.randint(0, 7, (37,)), torch.rand(37)
    loss, losses = weighted_cross_entropy(logits, labels, weights, return_losses=True)
    loss.backward()
    ce = out["ce"]
    assert ce["loss"] == pytest.approx(loss.item(), rel=1e-6), seed
    torch.testing.assert_close(torch.tensor(ce["losses"]), losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(ce["grad"]), logits.grad.flatten(), rtol=1e-5, atol=1e-8)
