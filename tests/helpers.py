"""What the test files share: seeded random inputs, tiny models and batches, the meta-gradient
written out two ways (the chain rule through METHOD.md §7's g, as `molere.meta_step` applies
it, and an independent create_graph path all the way to phi), CIFAR files in the real pickle
layout, and small runs."""
import contextlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import molere
import molere_cli
import molere_data
from kernels import weighted_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def docs_code(name=""):
    """The code of docs/library.md's example block `name` ("" the meta-gradient one, "splitter", "alone"),
    which the tests run as it stands."""
    text = open(os.path.join(ROOT, "docs", "library.md")).read()
    code = text.split(f"<!-- example{' ' + name if name else ''} -->", 1)[1].split("<!-- /example -->", 1)[0]
    return code.split("```python", 1)[1].split("```", 1)[0]


def docs_example(name=""):
    """docs/library.md's example block `name`, executed as it stands (not a copy of it): its names."""
    scope = {}
    exec(compile(docs_code(name), f"docs/library.md example {name}", "exec"), scope)
    return scope


def fresh_seed():
    """A new random seed for this test, printed (pytest shows it when the test fails)."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    print(f"seed {seed}")
    return seed



class SmoothNet(nn.Module):
    """A classifier with no kink anywhere (softplus, not ReLU), BatchNorm and dropout, returning
    (logits, h) like the project's networks: finite differences of L_val(theta') cannot cross a
    ReLU boundary and flake."""

    def __init__(self, classes=5, dropout=0.0):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc, self.dropout, self.features = nn.Linear(6, classes), dropout, 6

    def forward(self, x):
        h = F.softplus(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(F.dropout(h, self.dropout, self.training)), h



def tiny_setup(dropout=0.0, classes=5, n=12, dtype=torch.float64, smooth=False):
    """A WRN-10-1 (or the kink-free SmoothNet) on 8x8 images, a meta-network, train and
    validation batches, features h."""
    model = (SmoothNet(classes, dropout) if smooth else molere.WideResNet(10, 1, classes, dropout)).to(dtype)
    meta = molere.SampleNet(model.features, classes, 7).to(dtype)
    with torch.no_grad():  # non-zero init so every meta parameter matters
        for p in meta.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x, y, xv, yv = batches(classes, n, dtype)
    with torch.no_grad():
        _, h = model(x)
    return model, meta, x, y, h.to(dtype), xv, yv



def classifier_grads(model, meta, x, y, h, rng, weight_norm):
    """G at theta for g_phi's weights (normalised by `weight_norm`), under the dropout masks of `rng`."""
    w = torch.sigmoid(meta(h, y)).detach()
    return grads_at(model, x, y, w / w.mean() if weight_norm == "batch" else w, rng)



def meta_grad_fast(model, meta, x, y, h, grads, xv, yv, alpha, rng, weight_norm="batch",
                   weight_grad=molere.weight_grad_fast):
    """dL_val/dphi as `molere.meta_step` computes it: g from the fast path, then the chain rule
    through w~(phi), one backward of w~."""
    loss_val, g = weight_grad(model, x, y, grads, xv, yv, alpha, rng)
    w = molere.instance_weights(meta, h, y, weight_norm)
    return loss_val, torch.autograd.grad(w, list(meta.parameters()), grad_outputs=g.to(w.dtype))


def lookahead_reference(model, weigh, x, y, xv, yv, alpha, rng=None):
    """The look-ahead written out with create_graph: the one independent reference every test
    of the meta-gradient compares against. Returns (L_val(theta'), G) with theta' = theta - alpha G,
    G = grad_theta mean_i w~_i l_i(theta), w~ = weigh(l) any differentiable weighting, the
    training forward under the dropout masks of `rng`, BatchNorm statistics on copies."""
    params = dict(model.named_parameters())
    with molere.replay_rng(rng, x.device) if rng is not None else contextlib.nullcontext():
        losses = molere.per_sample_losses(model, params, x, y)
    inner = torch.autograd.grad((weigh(losses) * losses).mean(), list(params.values()), create_graph=True)
    theta1 = {n: p - alpha * d for (n, p), d in zip(params.items(), inner)}
    return molere.per_sample_losses(model, theta1, xv, yv).mean(), inner


def meta_grad_reference(model, meta, x, y, h, xv, yv, alpha, rng, weight_norm="batch"):
    """dL_val/dphi entirely the direct way, independent of `weight_grad_*`: the create_graph
    look-ahead with w~ = g_phi(h, y), backpropagated to phi."""
    loss_val, _ = lookahead_reference(model, lambda losses: molere.instance_weights(meta, h, y, weight_norm),
                                      x, y, xv, yv, alpha, rng)
    return loss_val.detach(), torch.autograd.grad(loss_val, list(meta.parameters()))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]



def write_cifar(root, name, n_train, n_test, seed=0):
    """Small files in the real CIFAR pickle layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    key = "labels" if name == "cifar10" else "fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_files = ["test_batch"] if name == "cifar10" else ["test"]
    written = {}
    for split, files, n in (("train", train_files, n_train), ("test", test_files, n_test)):
        xs, ys = [], []
        for f in files:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = (np.arange(n) % classes)[rng.permutation(n)]
            d = {"data": x, key: y.tolist(), "filenames": [f"{i}.png" for i in range(n)]}
            if name == "cifar100":
                d["coarse_labels"] = (y // 5).tolist()
            with open(os.path.join(folder, f), "wb") as fh:
                pickle.dump(d, fh)
            xs.append(x)
            ys.append(y)
        written[split] = (np.concatenate(xs), np.concatenate(ys))
    meta = ("batches.meta", {"label_names": [str(i) for i in range(10)]}) if name == "cifar10" else \
        ("meta", {"fine_label_names": [str(i) for i in range(100)], "coarse_label_names": [str(i) for i in range(20)]})
    with open(os.path.join(folder, meta[0]), "wb") as fh:
        pickle.dump(meta[1], fh)
    return folder, written



def run_main(argv, capsys):
    molere_cli.main(argv)
    return capsys.readouterr()



TINY = ["--depth", "10", "--width", "1", "--dropout", "0.1", "--batch-size", "20", "--eval-every", "1",
        "--warmup-epochs", "1", "--resplit-every", "1", "--hidden", "16"]



def small_run(method, seed, **overrides):
    cfg = molere.Config(**{**dict(dataset="synthetic", train_subset=400, depth=10, width=1, dropout=0.0,
                                  batch_size=40, epochs=4, hidden=16, warmup_epochs=1, resplit_every=1),
                           **overrides})
    data = molere_data.load_data(cfg, torch.device("cpu"))
    return cfg, data, molere.Run(cfg, method, seed, data, torch.device("cpu"))



def batches(classes=5, n=12, dtype=torch.float64):
    x, xv = torch.randn(n, 3, 8, 8, dtype=dtype), torch.randn(n, 3, 8, 8, dtype=dtype)
    return x, torch.randint(0, classes, (n,)), xv, torch.randint(0, classes, (n,))


def grads_at(model, x, y, w, rng):
    """The classifier step written out: G = grad_theta mean_i w~_i l_i under the masks of `rng`."""
    with molere.replay_rng(rng, x.device):
        logits = model(x)[0]
    return torch.autograd.grad(weighted_cross_entropy(logits, y, w), list(model.parameters()))


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


CPU = torch.device("cpu")


def records_of(tmp_path, capsys, *flags):
    """Run molere.py's command line on TINY settings (the test set every epoch); its records, by method."""
    out = tmp_path / "out"
    run_main([*flags, "--out", str(out)] + TINY, capsys)
    return {r["method"]: r for r in map(json.loads, open(out / "results.jsonl"))}


class Boom:
    """A pickled object that runs a command when loaded: what the readers must refuse."""

    def __reduce__(self):
        return (os.system, ("echo ran > " + os.environ["BOOM_FILE"],))
