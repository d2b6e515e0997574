"""MOLERE's outer level (METHOD.md E8-E11): the splitter's objective against a float64 loop, its step
on the right images, the hard split's size and balance, the re-split, and docs/library.md's splitter
example against the objective written out."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import molere
from helpers import docs_example, flat, fresh_seed, small_run


def test_splitter_regularizers_over_all_100_classes():
    fresh_seed()
    classes, delta = 100, 0.1
    y = torch.tensor([3, 3, 17, 17, 17, 42, 99, 0, 0, 3, 55, 42])  # most classes absent
    logit = torch.randn(len(y), requires_grad=True)
    correct = torch.rand(len(y)) < 0.5
    losses = torch.rand(len(y)) * 3
    loss, parts = molere.splitter_loss(logit, correct, losses, y, delta, classes, 1.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logit.grad).all() and logit.grad.abs().sum() > 0
    # independent float64 loop over the classes present (absent ones have P(y) = 0)
    p = torch.sigmoid(logit.detach().double()).tolist()
    n = len(y)
    r_bal = 0.0
    for c in set(y.tolist()):
        prior = sum(1 for t in y.tolist() if t == c) / n
        q_val = sum(pi for pi, t in zip(p, y.tolist()) if t == c) / sum(p)
        q_tr = sum(1 - pi for pi, t in zip(p, y.tolist()) if t == c) / sum(1 - pi for pi in p)
        r_bal += prior * (math.log(prior / q_val) + math.log(prior / q_tr))
    mp = sum(p) / n
    r_size = delta * math.log(delta / mp) + (1 - delta) * math.log((1 - delta) / (1 - mp))
    l_val = sum(pi * li for pi, li in zip(p, losses.tolist())) / sum(p)
    fit = -sum(math.log(1 - pi) if ok else math.log(pi) for pi, ok in zip(p, correct.tolist())) / n
    # the KL terms of nearly equal distributions cancel in float32: an absolute bound of a few
    # float32 ulps of the summed terms (each below 1), on values of about 0.01 to 0.1
    assert parts["r_bal"].item() == pytest.approx(r_bal, rel=1e-5, abs=2e-6)
    assert parts["r_size"].item() == pytest.approx(r_size, rel=1e-5, abs=2e-6)
    assert parts["l_val"].item() == pytest.approx(l_val, rel=1e-5)
    assert parts["fit"].item() == pytest.approx(fit, rel=1e-5)
    assert loss.item() == pytest.approx(fit - l_val + r_size + r_bal, rel=1e-5, abs=4e-6)


def test_splitter_step_descends_its_loss_e9_on_the_right_images():
    """METHOD.md §2 written out in float64: CE(P(train), 1[y_hat = y]) - l_val on the S_val half
    of the batch, lambda_size R_size + lambda_bal R_bal on the half drawn from all of S (distinct
    lambdas); a plain SGD splitter optimiser must move Theta by -eta x its gradient."""
    seed = fresh_seed()
    cfg, data, run = small_run("molere", seed, lambda_size=0.7, lambda_bal=1.9)
    run.val_mask = molere.random_split(data, cfg.delta, seed)
    val_idx = run.val_mask.nonzero().squeeze(1)
    with torch.no_grad():
        for p in run.splitter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    eta = 0.3
    run.opt_split = torch.optim.SGD(run.splitter.parameters(), lr=eta)
    before, state = copy.deepcopy(run.splitter).double(), torch.get_rng_state()
    molere.splitter_step(run, data, cfg, val_idx)
    torch.set_rng_state(state)
    B, n_val = cfg.batch_size, cfg.batch_size - cfg.batch_size // 2
    idx = torch.cat([val_idx[torch.randint(len(val_idx), (n_val,))], torch.randint(len(data.y), (B // 2,))])
    assert run.val_mask[idx[:n_val]].all()
    logits, h = molere.predict(run.model, data, data.x[idx])
    y, logits = data.y[idx], logits.double()
    p = torch.sigmoid(before(h.double(), y))
    g, r = slice(None, n_val), slice(n_val, None)
    correct = (logits[g].argmax(1) == y[g]).double()
    fit = -(correct * torch.log(1 - p[g]) + (1 - correct) * torch.log(p[g])).mean()
    losses = F.cross_entropy(logits[g], y[g], reduction="none")
    l_val = (p[g] * losses).sum() / p[g].sum()
    m, d = p[r].mean(), cfg.delta
    r_size = d * torch.log(d / m) + (1 - d) * torch.log((1 - d) / (1 - m))
    onehot = F.one_hot(y[r], data.classes).double()
    prior = onehot.mean(0)
    present = prior > 0
    q_val = (p[r, None] * onehot).sum(0) / p[r].sum()
    q_tr = ((1 - p[r])[:, None] * onehot).sum(0) / (1 - p[r]).sum()
    r_bal = (prior[present] * (2 * prior[present].log() - q_val[present].log() - q_tr[present].log())).sum()
    loss = fit - l_val + 0.7 * r_size + 1.9 * r_bal
    grads = torch.autograd.grad(loss, list(before.parameters()))
    step = flat(run.splitter.parameters()).double() - flat(before.parameters())
    assert flat(grads).norm() > 1e-6
    torch.testing.assert_close(step, -eta * flat(grads), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("splitter_data", ["val", "all"])
def test_splitter_game_terms_see_only_validation_images(monkeypatch, splitter_data):
    """METHOD.md §2: CE and -l_val on images of the current S_val, the regularisers on images
    drawn from S, in one forward of one batch (--splitter-data val); the old reading puts all
    four terms on one batch of S."""
    seed = fresh_seed()
    cfg, data, run = small_run("molere", seed, splitter_data=splitter_data, batch_size=30)
    run.val_mask = molere.random_split(data, cfg.delta, seed)
    val_idx = run.val_mask.nonzero().squeeze(1)
    seen, parts = [], {}
    real_predict, real_game, real_reg = molere.predict, molere.splitter_game_terms, molere.splitter_regularizers
    monkeypatch.setattr(molere, "predict", lambda net, d, x, chunk=1000, **kw: seen.append(x.clone()) or real_predict(net, d, x, chunk, **kw))
    monkeypatch.setattr(molere, "splitter_game_terms", lambda logit, *a: parts.setdefault("game", len(logit)) and real_game(logit, *a))
    monkeypatch.setattr(molere, "splitter_regularizers", lambda logit, *a: parts.setdefault("reg", len(logit)) and real_reg(logit, *a))
    before = [p.clone() for p in run.splitter.parameters()]
    molere.splitter_step(run, data, cfg, val_idx)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.splitter.parameters()))
    (x,) = seen  # one classifier forward for the whole step
    val_images = {bytes(img.numpy()) for img in data.x[val_idx]}
    in_val = torch.tensor([bytes(img.numpy()) in val_images for img in x])
    assert len(x) == 30  # one forward of one batch
    if splitter_data == "val":
        assert parts == {"game": 15, "reg": 15} and in_val[:15].all()
        assert not in_val[15:].all()  # the pool half is drawn from all of S (40 of 400 are S_val)
    else:
        assert parts == {"game": 30, "reg": 30} and not in_val.all()


@pytest.mark.parametrize("delta", [0.001, 0.1, 0.37, 0.5])
def test_hard_split_is_exact_balanced_and_never_empty(delta):
    fresh_seed()
    classes = 7
    counts = torch.randint(2, 60, (classes,))
    labels = torch.repeat_interleave(torch.arange(classes), counts)
    labels = labels[torch.randperm(len(labels))]
    scores = torch.randn(len(labels))
    mask = molere.per_class_topk(scores, labels, delta, classes)
    assert mask.any()
    for c in range(classes):
        in_c = labels == c
        n_c = int(in_c.sum())
        k = min(max(1, int(torch.tensor(delta * n_c).round())), n_c - 1)
        assert int(mask[in_c].sum()) == k
        top = sorted(scores[in_c].tolist(), reverse=True)[:k]  # the k highest scores
        assert sorted(scores[in_c & mask].tolist(), reverse=True) == top


def test_resplit_holds_the_top_p_val_samples_of_each_class():
    seed = fresh_seed()
    cfg, data, run = small_run("molere", seed)
    with torch.no_grad():  # spread the scores, not so far that float32 sigmoids tie at 1.0
        for p in run.splitter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    new, _ = molere.molere_split(run, data, cfg)
    _, h = molere.predict(run.model, data, data.x)
    with torch.no_grad():
        score = torch.sigmoid(run.splitter(h, data.y))
    for c in range(data.classes):
        in_c = data.y == c
        assert int((new & in_c).sum()) == max(1, round(cfg.delta * int(in_c.sum())))
        assert score[new & in_c].min() >= score[~new & in_c].max()
        assert score[in_c].max() > score[in_c].min()  # the scores really differ


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


def test_docs_splitter_example_is_the_objective_and_the_hard_split():
    """The README's splitter block: its update with SGD(lr 1) moves Theta by exactly minus the
    gradient of the objective computed by hand (float64), leaves the classifier alone, and its
    split is per class the round(delta n_c) highest P(val)."""
    fresh_seed()
    ex = docs_example("splitter")
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
