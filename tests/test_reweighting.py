"""METHOD.md §§7 and 8: the per-sample meta-gradient g (the core every look-ahead reweighting
method is built on), L2RW's weights, Meta-Weight-Net's optimizer and the meta-level diagnostics,
each against an independent reference (finite differences, create_graph, pairwise counts)."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import molere
import molere_data
import molere_io
import molere_report as report
from kernels import weighted_cross_entropy
from helpers import ROOT, TINY, SmoothNet, fresh_seed, lookahead_reference, run_main, small_run


def batches(classes=5, n=12, dtype=torch.float64):
    x, xv = torch.randn(n, 3, 8, 8, dtype=dtype), torch.randn(n, 3, 8, 8, dtype=dtype)
    return x, torch.randint(0, classes, (n,)), xv, torch.randint(0, classes, (n,))


def grads_at(model, x, y, w, rng):
    """The classifier step written out: G = grad_theta mean_i w~_i l_i under the masks of `rng`."""
    with molere.replay_rng(rng, x.device):
        logits = model(x)[0]
    return torch.autograd.grad(weighted_cross_entropy(logits, y, w), list(model.parameters()))


def test_weight_grad_reference_matches_finite_differences_in_float64():
    """g_i = dL_val(theta')/dw~_i against central differences of L_val along a random direction of
    w~, on a kink-free model with BatchNorm, at two step sizes (both must agree)."""
    fresh_seed()
    model = SmoothNet().double()
    x, y, xv, yv = batches()
    w = torch.rand(len(y), dtype=torch.float64) + 0.5
    rng, alpha = molere.rng_state(torch.device("cpu")), 0.5
    loss_val, g = molere.weight_grad_reference(model, x, y, w, xv, yv, alpha, rng)
    direction = torch.randn_like(w)
    analytic = float(g @ direction)
    assert abs(analytic) > 1e-6  # a real signal, not zeros
    for eps in (1e-5, 1e-6):
        at = lambda s: molere.weight_grad_reference(model, x, y, w + s * eps * direction, xv, yv, alpha, rng)[0].item()
        numeric = (at(1) - at(-1)) / (2 * eps)
        assert math.isclose(analytic, numeric, rel_tol=1e-6, abs_tol=1e-10), (eps, analytic, numeric)
    ref_val, _ = lookahead_reference(model, lambda losses: w, x, y, xv, yv, alpha, rng)
    assert loss_val.item() == pytest.approx(ref_val.item(), rel=1e-12)  # and L_val is the loss at theta'


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("arch", ["wrn", "smooth"])
def test_weight_grad_fast_equals_reference_in_float64(arch, dropout):
    """One JVP (fast) = create_graph (reference), with and without dropout (masks replayed)."""
    fresh_seed()
    model = (molere.WideResNet(10, 1, 5, dropout) if arch == "wrn" else SmoothNet(dropout=dropout)).double()
    x, y, xv, yv = batches()
    w = torch.rand(len(y), dtype=torch.float64) + 0.2
    w = w / w.mean()
    rng = molere.rng_state(torch.device("cpu"))
    grads = grads_at(model, x, y, w, rng)
    state = torch.get_rng_state()
    fast_val, fast = molere.weight_grad_fast(model, x, y, grads, xv, yv, 0.2, rng)
    torch.set_rng_state(state)  # the validation forward draws the same masks in both paths
    ref_val, ref = molere.weight_grad_reference(model, x, y, w, xv, yv, 0.2, rng)
    assert fast_val.item() == pytest.approx(ref_val.item(), rel=1e-12)
    assert ref.abs().sum() > 1e-8 and fast.shape == (len(y),)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-13)


def test_weight_grad_with_a_frozen_backbone():
    """Parameters with requires_grad False (a frozen backbone) are constants of the look-ahead:
    fast = reference, and both equal central differences of L_val(theta') computed the plain way
    (a copy of the model, one SGD step of its trainable parameters, the validation loss)."""
    fresh_seed()
    model = SmoothNet().double()
    model.conv.requires_grad_(False)
    x, y, xv, yv = batches()
    w = torch.rand(len(y), dtype=torch.float64) + 0.5
    rng, alpha = molere.rng_state(torch.device("cpu")), 0.5
    trainable = [p for p in model.parameters() if p.requires_grad]
    with molere.replay_rng(rng, x.device):
        losses = F.cross_entropy(model(x)[0], y, reduction="none")
    step = iter(torch.autograd.grad((w * losses).mean(), trainable))
    grads = [next(step) if p.requires_grad else None for p in model.parameters()]  # as p.grad leaves them
    _, fast = molere.weight_grad_fast(model, x, y, grads, xv, yv, alpha, rng)
    _, ref = molere.weight_grad_reference(model, x, y, w, xv, yv, alpha, rng)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-13)

    def loss_val(w):
        copy_ = copy.deepcopy(model)
        mine = [p for p in copy_.parameters() if p.requires_grad]
        G = torch.autograd.grad((w * F.cross_entropy(copy_(x)[0], y, reduction="none")).mean(), mine)
        with torch.no_grad():
            for p, d in zip(mine, G):
                p -= alpha * d
        return F.cross_entropy(copy_(xv)[0], yv).item()

    direction = torch.randn_like(w)
    analytic, eps = float(fast @ direction), 1e-6
    assert abs(analytic) > 1e-6
    numeric = (loss_val(w + eps * direction) - loss_val(w - eps * direction)) / (2 * eps)
    assert math.isclose(analytic, numeric, rel_tol=1e-6, abs_tol=1e-10), (analytic, numeric)


def test_meta_gradient_is_the_chain_rule_through_g():
    """METHOD.md §7's recipe, autograd.grad(w_tilde, phi, g), for a weighting that is neither
    ours nor MW-Net's (an affine map of the loss, batch-normalised), equals create_graph through phi."""
    fresh_seed()
    model = SmoothNet().double()
    x, y, xv, yv = batches()
    phi = torch.tensor([0.7, -0.3], dtype=torch.float64, requires_grad=True)
    rng = molere.rng_state(torch.device("cpu"))
    with torch.no_grad(), molere.replay_rng(rng, x.device):
        loss_in = F.cross_entropy(model(x)[0], y, reduction="none")
    weigh = lambda: (lambda w: w / w.mean())(torch.sigmoid(phi[0] * loss_in + phi[1]))
    w_tilde = weigh()
    _, g = molere.weight_grad_fast(model, x, y, grads_at(model, x, y, w_tilde.detach(), rng), xv, yv, 0.3, rng)
    got = torch.autograd.grad(w_tilde, phi, grad_outputs=g)[0]
    ref_val, _ = lookahead_reference(model, lambda losses: weigh(), x, y, xv, yv, 0.3, rng)
    ref = torch.autograd.grad(ref_val, phi)[0]  # create_graph all the way to phi
    assert ref.abs().sum() > 1e-8
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)


def test_l2rw_weights_equal_a_direct_create_graph_implementation():
    """Ren et al.'s algorithm written out: eps = 0 (requires grad), theta' = theta - alpha grad mean
    eps_i l_i, w = max(-dL_val/deps, 0) normalised to sum 1; float64, dropout masks replayed."""
    fresh_seed()
    model = molere.WideResNet(10, 1, 5, 0.3).double()
    x, y, xv, yv = batches(n=16)
    rng = molere.rng_state(torch.device("cpu"))
    state = torch.get_rng_state()
    loss_val, w = molere.l2rw_weights(model, x, y, xv, yv, 0.1, rng)
    torch.set_rng_state(state)
    eps = torch.zeros(len(y), dtype=torch.float64, requires_grad=True)
    ref_val, _ = lookahead_reference(model, lambda losses: eps, x, y, xv, yv, 0.1, rng)
    ref = torch.relu(-torch.autograd.grad(ref_val, eps)[0])
    ref = ref / ref.sum()
    assert loss_val.item() == pytest.approx(ref_val.item(), rel=1e-12)
    assert (ref > 0).any() and w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-9)  # w is float32, like the kernel's input


def test_l2rw_batch_with_no_positive_weight_makes_no_update(monkeypatch):
    """Through the real loop: an all-zero batch leaves theta and the optimizer state untouched
    (no step of momentum or weight decay either); any positive weight moves theta."""
    seed = fresh_seed()
    cfg, data, run = small_run("l2rw", seed, epochs=1)
    run.val_mask = molere.initial_split("lrw-random", data, cfg.delta, seed)
    batch = molere.epoch_batches(run, cfg)[:2]
    molere.train_steps(run, data, cfg, batch[:1])  # momentum buffers exist from here on
    before = [p.detach().clone() for p in run.model.parameters()]
    momentum = [run.opt.state[p]["momentum_buffer"].clone() for p in run.model.parameters()]
    monkeypatch.setattr(molere, "l2rw_weights", lambda model, x, *a, **k: (torch.tensor(1.0), torch.zeros(len(x))))
    _, seen = molere.train_steps(run, data, cfg, batch[1:])
    assert (seen["w"][batch[1]] == 0).all()
    for p, b, m in zip(run.model.parameters(), before, momentum):
        assert torch.equal(p, b) and torch.equal(run.opt.state[p]["momentum_buffer"], m)
    one_hot = lambda model, x, *a, **k: (torch.tensor(1.0), F.one_hot(torch.tensor(0), len(x)).float())
    monkeypatch.setattr(molere, "l2rw_weights", one_hot)
    molere.train_steps(run, data, cfg, batch[1:])
    assert any(not torch.equal(p, b) for p, b in zip(run.model.parameters(), before))


def test_mwn_meta_optimizer_is_its_published_one():
    """MW-Net.py: Adam(vnet.params(), 1e-3, weight_decay=1e-4). Our meta-network: no weight decay."""
    for method, wd in (("mwn", 1e-4), ("lrw-random", 0.0), ("molere", 0.0)):
        _, _, run = small_run(method, 0)
        group = run.opt_meta.param_groups[0]
        assert isinstance(run.opt_meta, torch.optim.Adam) and group["lr"] == 1e-3 and group["weight_decay"] == wd
    for method, wd in (("mwn", 1e-4), ("lrw-random", 3e-4)):  # --meta-wd is for our meta-network only
        assert small_run(method, 0, meta_wd=3e-4)[2].opt_meta.param_groups[0]["weight_decay"] == wd


def test_meta_bound_keeps_the_logit_inside_and_is_c_tanh_of_the_unbounded_one():
    """--meta-bound c: g_phi's logit is c tanh(logit / c) of the same network's unbounded logit, so
    every weight lies in (sigmoid(-c), sigmoid(c)); the splitter stays unbounded."""
    seed = fresh_seed()
    free = molere.SampleNet(12, 4, 8, extra=1).double()
    bound = molere.SampleNet(12, 4, 8, extra=1, bound=2.0).double()
    bound.load_state_dict(free.state_dict())
    with torch.no_grad():
        free.net[2].weight.mul_(50)  # logits far outside (-2, 2)
        bound.net[2].weight.mul_(50)
    h, y = torch.randn(300, 13, dtype=torch.float64), torch.randint(0, 4, (300,))
    raw, out = free(h, y), bound(h, y)
    assert raw.abs().max() > 4 and out.abs().max() < 2, seed
    assert torch.allclose(out, 2.0 * torch.tanh(raw / 2.0), rtol=0, atol=1e-12), seed
    _, _, run = small_run("molere", 0, meta_bound=2.0)
    assert run.meta.bound == 2.0 and run.splitter.bound == 0


def test_auc_counts_pairs_with_ties_half():
    seed = fresh_seed()
    for n, m in ((1, 1), (7, 5), (200, 300)):
        pos = torch.randint(0, 6, (n,)).double() / 5  # many ties, as L2RW's zero weights make
        neg = torch.randint(0, 6, (m,)).double() / 5
        pairs = (pos[:, None] > neg[None]).double().mean() + 0.5 * (pos[:, None] == neg[None]).double().mean()
        assert report.auc(pos, neg).item() == pytest.approx(pairs.item(), abs=1e-12), seed
    assert report.auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0


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


def readme_code(name=""):
    """The code of the README's example block `name` ("" the meta-gradient one, "splitter")."""
    text = open(os.path.join(ROOT, "README.md")).read()
    code = text.split(f"<!-- example{' ' + name if name else ''} -->", 1)[1].split("<!-- /example -->", 1)[0]
    return code.split("```python", 1)[1].split("```", 1)[0]


def readme_example(name=""):
    """The README's example block, executed as it stands (not a copy of it)."""
    code = readme_code(name)
    scope = {}
    exec(compile(code, "README.md example", "exec"), scope)
    return scope


def test_readme_example_runs_and_its_meta_step_is_exact_on_a_torchvision_resnet18():
    """The README's own-training-loop example on torchvision's ResNet-18 (float64, BatchNorm):
    its meta step with SGD(lr 1) moves phi by exactly minus the create_graph meta-gradient, its
    classifier step by the weighted gradient; its L2RW step runs and moves theta."""
    torchvision = pytest.importorskip("torchvision")
    fresh_seed()
    ex = readme_example()
    model = torchvision.models.resnet18(num_classes=4).double()
    weigh = ex["LossWeightNet"](hidden=8).double()
    x, xv = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y, yv = torch.randint(0, 4, (8,)), torch.randint(0, 4, (8,))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = [p.detach().clone() for p in weigh.parameters()]
    ref_val, inner = lookahead_reference(copy.deepcopy(model), weigh, x, y, xv, yv, 0.1)  # the example changes model
    ref = torch.autograd.grad(ref_val, list(weigh.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex["reweighted_step"](model, opt, weigh, torch.optim.SGD(weigh.parameters(), lr=1.0), x, y, xv, yv)
    for p, before, r in zip(weigh.parameters(), phi, ref):
        torch.testing.assert_close(p.detach() - before, -r, rtol=1e-7, atol=1e-12)
    assert sum(r.abs().sum() for r in ref) > 1e-8
    for (n, p), d in zip(params.items(), inner):
        torch.testing.assert_close(model.state_dict()[n] - p, -0.1 * d.detach(), rtol=1e-7, atol=1e-12)
    before = [p.detach().clone() for p in model.parameters()]
    ex["l2rw_step"](model, opt, x, y, xv, yv)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


class FeatureNet(torch.nn.Module):
    """A small classifier returning (logits, features), as the splitter example needs."""

    def __init__(self, classes, features=6):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, features, 3, padding=1), torch.nn.BatchNorm2d(features),
                                        torch.nn.Softplus())
        self.head = torch.nn.Linear(features, classes)

    def forward(self, x):
        h = self.body(x).mean((2, 3))
        return self.head(h), h


def splitter_objective_by_hand(logit, correct, losses, y, delta, classes, lambda_size, lambda_bal):
    """METHOD.md E9 written out in float64 from its definitions, sharing no code with molere."""
    logit, losses = logit.double(), losses.double()
    p = 1 / (1 + torch.exp(-logit))
    c = correct.double()
    fit = -(c * torch.log(1 - p) + (1 - c) * torch.log(p)).mean()  # CE(P(train), 1[right])
    l_val = (p * losses).sum() / p.sum()
    m = p.mean()
    r_size = delta * math.log(delta) - delta * torch.log(m) + (1 - delta) * math.log(1 - delta) - \
        (1 - delta) * torch.log(1 - m)
    r_bal = 0
    for k in range(classes):
        prior = float((y == k).double().mean())
        if prior > 0:
            in_val = p[y == k].sum() / p.sum()
            in_train = (1 - p)[y == k].sum() / (1 - p).sum()
            r_bal = r_bal + prior * (math.log(prior) - torch.log(in_val)) + prior * (math.log(prior) - torch.log(in_train))
    return fit - l_val + lambda_size * r_size + lambda_bal * r_bal


def test_readme_splitter_example_is_the_objective_and_the_hard_split():
    """The README's splitter block: its update with SGD(lr 1) moves Theta by exactly minus the
    gradient of the objective computed by hand (float64), leaves the classifier alone, and its
    split is per class the round(delta n_c) highest P(val)."""
    fresh_seed()
    ex = readme_example("splitter")
    classes, delta, n = 4, 0.25, 40
    model = FeatureNet(classes).double()
    splitter = ex["make_splitter"](6, classes, delta, hidden=8).double()
    with torch.no_grad():  # away from the start so every term has a gradient
        for q in splitter.parameters():
            q.add_(torch.randn_like(q) * 0.3)
    x, y = torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.randint(0, classes, (n,))
    y[:classes] = torch.arange(classes)  # every class present
    theta = [q.detach().clone() for q in splitter.parameters()]
    model_before = copy.deepcopy(model.state_dict())
    model.eval()
    with torch.no_grad():
        logits, h = model(x)
    model.train()
    ref = splitter_objective_by_hand(splitter(h, y), logits.argmax(1) == y,
                                     torch.nn.functional.cross_entropy(logits, y, reduction="none"), y, delta, classes,
                                     0.7, 1.3)
    grads = torch.autograd.grad(ref, list(splitter.parameters()))
    terms = ex["splitter_update"](splitter, torch.optim.SGD(splitter.parameters(), lr=1.0), model, x, y, delta,
                                  classes, 0.7, 1.3)
    for q, before, g in zip(splitter.parameters(), theta, grads):  # log(1 - p) by hand, logsigmoid in torch
        torch.testing.assert_close(q.detach() - before, -g, rtol=1e-5, atol=1e-8)
    assert sum(float(g.abs().sum()) for g in grads) > 1e-6 and set(terms) == {"fit", "l_val", "r_size", "r_bal"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model_before.items())  # only read
    assert model.training
    mask = ex["hard_split"](splitter, model, x, y, delta, classes)
    model.eval()
    with torch.no_grad():
        score = torch.sigmoid(splitter(model(x)[1], y))
    for k in range(classes):
        members = (y == k).nonzero().squeeze(1)
        want = min(max(1, round(delta * len(members))), len(members) - 1)
        top = members[score[members].argsort(descending=True)[:want]]
        assert int(mask[members].sum()) == want and bool(mask[top].all())
