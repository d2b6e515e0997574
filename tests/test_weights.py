"""How a method's sample weights are made (METHOD.md E1, E2, E15, E17): the meta-network's input
columns and bound, MW-Net's net and optimizer, class-balanced ERM against F.cross_entropy, and a
class weighted zero that the classifier step, and the whole loop, leave unlearnt."""
import math

import pytest
import torch
import torch.nn.functional as F

import molere
from helpers import classifier_grads, fresh_seed, meta_grad_fast, meta_grad_reference, records_of, small_run, tiny_setup
from kernels import weighted_cross_entropy


def test_meta_network_columns_are_features_extra_then_label():
    """SampleNet reads [LayerNorm(h[:, :features]), h[:, features:] (the loss), onehot(y)]:
    the loss column as given (not normalised), and meta_input puts the detached per-sample loss
    last. With --meta-init loss-first the network starts as a function of that column alone."""
    fresh_seed()
    feats, classes, n = 6, 4, 8
    net = molere.SampleNet(feats, classes, 5, extra=1, init="loss-first").double()
    h, y = torch.randn(n, feats + 1, dtype=torch.float64), torch.randint(0, classes, (n,))
    h2, y2 = h.clone(), (y + 1) % classes
    h2[:, :feats] = torch.randn(n, feats, dtype=torch.float64)  # other features, other labels, same loss
    torch.testing.assert_close(net(h, y), net(h2, y2))
    h3 = h.clone()
    h3[:, feats] += 1.0  # another loss
    assert (net(h3, y) - net(h, y)).abs().max() > 1e-3
    with torch.no_grad():  # every weight on: the output is the MLP on the three blocks in this order
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    z = torch.cat([F.layer_norm(h[:, :feats], (feats,)), h[:, feats:], F.one_hot(y, classes).double()], 1)
    first, _, last = net.net
    torch.testing.assert_close(net(h, y), last(torch.relu(first(z))).squeeze(1))
    cfg, data, run = small_run("lrw-random", 0, meta_input="features+loss")
    logits, hh = torch.randn(5, data.classes), torch.randn(5, run.model.features)
    yy = torch.randint(0, data.classes, (5,))
    inp = molere.meta_input(run, hh, logits, yy)
    torch.testing.assert_close(inp[:, :-1], hh)
    torch.testing.assert_close(inp[:, -1], F.cross_entropy(logits, yy, reduction="none"))


def test_meta_bound_keeps_the_logit_inside_and_is_c_tanh_of_the_unbounded_one():
    """--meta-bound c: g_phi's logit is c tanh(logit / c) of the same network's unbounded logit, so
    every weight lies in [sigmoid(-c), sigmoid(c)], two weights within a ratio of e^c (the help's
    words: sigmoid(c) / sigmoid(-c) = e^c exactly); the splitter stays unbounded."""
    seed = fresh_seed()
    free = molere.SampleNet(12, 4, 8, extra=1).double()
    bound = molere.SampleNet(12, 4, 8, extra=1, bound=2.0).double()
    bound.load_state_dict(free.state_dict())
    with torch.no_grad():
        free.net[2].weight.mul_(50)  # logits far outside (-2, 2)
        bound.net[2].weight.mul_(50)
    h, y = torch.randn(300, 13, dtype=torch.float64), torch.randint(0, 4, (300,))
    raw, out = free(h, y), bound(h, y)
    assert raw.abs().max() > 4 and out.abs().max() <= 2, seed  # = 2 where tanh rounds to 1 (|logit| > 38)
    assert torch.allclose(out, 2.0 * torch.tanh(raw / 2.0), rtol=0, atol=1e-12), seed
    w = torch.sigmoid(out)
    assert math.exp(2.0) / 2 < w.max() / w.min() <= math.exp(2.0) * (1 + 1e-12), seed  # near the bound, never past
    _, _, run = small_run("molere", 0, meta_bound=2.0)
    assert run.meta.bound == 2.0 and run.splitter.bound == 0


def test_mwn_weight_net_sees_each_samples_loss_with_its_own_label():
    seed = fresh_seed()
    cfg, data, run = small_run("mwn", seed, dropout=0.0)
    run.val_mask = molere.initial_split("lrw-random", data, cfg.delta, seed)
    idx = molere.epoch_batches(run, cfg)[0]
    x, y = data.batch(idx, cfg.augment), data.y[idx]
    step = molere.classifier_step(run, cfg, x, y, replay=True)
    logits = run.model(x)[0]  # train mode, batch statistics: the forward the step made
    torch.testing.assert_close(step.z.squeeze(1), F.cross_entropy(logits, y, reduction="none"),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.w, torch.sigmoid(run.meta(step.z, y)))


def test_mwn_meta_optimizer_is_its_published_one():
    """MW-Net.py: Adam(vnet.params(), 1e-3, weight_decay=1e-4). Our meta-network: no weight decay."""
    for method, wd in (("mwn", 1e-4), ("lrw-random", 0.0), ("molere", 0.0)):
        _, _, run = small_run(method, 0)
        group = run.opt_meta.param_groups[0]
        assert isinstance(run.opt_meta, torch.optim.Adam) and group["lr"] == 1e-3 and group["weight_decay"] == wd
    for method, wd in (("mwn", 1e-4), ("lrw-random", 3e-4)):  # --meta-wd is for our meta-network only
        assert small_run(method, 0, meta_wd=3e-4)[2].opt_meta.param_groups[0]["weight_decay"] == wd


def test_class_balanced_erm_weights_each_class_by_its_inverse_count():
    seed = fresh_seed()
    cfg, data, run = small_run("erm-cb", seed, imbalance=8.0, train_subset=600, augment=False)
    counts = torch.bincount(data.y, minlength=data.classes).double()
    idx = torch.randperm(len(data.y))[:cfg.batch_size]
    x = data.batch(idx, augment=False)
    got = [g.clone() for g in molere.classifier_step(run, cfg, x, data.y[idx]).G]
    # the reference: F.cross_entropy with class weights 1/n_c, which normalises by the batch's sum
    run.model.zero_grad()
    logits, _ = run.model(x)
    F.cross_entropy(logits.double(), data.y[idx], weight=1 / counts).backward()
    for g, p in zip(got, run.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_class_balanced_erm_is_erm_where_the_classes_are_balanced(tmp_path, capsys):
    rows = records_of(tmp_path, capsys, "--dataset", "synthetic", "--train-subset", "200", "--method", "erm,erm-cb",
                      "--epochs", "2")
    # w~ = w / mean w is 1 up to rounding (1/20 / mean of 1/20s), so the two agree to rounding
    assert rows["erm"]["test_margins"] == pytest.approx(rows["erm-cb"]["test_margins"], abs=2e-3)
    assert rows["erm"]["test_acc"] == pytest.approx(rows["erm-cb"]["test_acc"], abs=0.21)


def test_classifier_step_with_zero_weights_for_a_class_does_not_learn_it():
    fresh_seed()
    classes, n = 4, 40
    model = molere.WideResNet(10, 1, classes, 0.0)
    x = torch.randn(n, 3, 8, 8)
    y = torch.arange(n) % classes
    w = torch.rand(n) + 0.5
    w[y == 2] = 0.0
    model.eval()  # no BatchNorm coupling between samples, so the reference can drop rows
    logits, _ = model(x)
    got = torch.autograd.grad(weighted_cross_entropy(logits, y, w), list(model.parameters()))
    keep = y != 2
    logits_keep, _ = model(x[keep])
    ref_loss = (w[keep] * F.cross_entropy(logits_keep, y[keep], reduction="none")).sum() / n
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # 0.5 diverged to NaN for some seeds (695272257)
    with torch.no_grad():
        p_before = F.softmax(model(x)[0], 1)
    for _ in range(30):
        opt.zero_grad()
        weighted_cross_entropy(model(x)[0], y, w).backward()
        opt.step()
    with torch.no_grad():
        p = F.softmax(model(x)[0], 1)
    assert p[y == 2, 2].mean() <= p_before[y == 2, 2].mean()  # class 2 never pulled up
    learnt = p[keep].gather(1, y[keep, None]).mean() - p_before[keep].gather(1, y[keep, None]).mean()
    assert learnt > 0.01  # while the other classes are learnt


def test_a_class_weighted_zero_inside_train_epoch_stays_unlearnt():
    """Through the real training loop: a meta-network that gives class 3 weight 0 (and is never
    updated) must leave class 3 unlearnt while the other classes are learnt. A loop that ignored
    the weights (the public course reproduction's bug) would learn class 3 like the rest."""
    seed = fresh_seed()
    cfg, data, run = small_run("lrw-random", seed)
    run.val_mask = molere.initial_split("lrw-random", data, cfg.delta, seed)
    with torch.no_grad():  # logit -1e4 for class 3 whatever h is (sigmoid = 0), 0 for the others
        first, last = run.meta.net[0], run.meta.net[2]
        first.weight.zero_(), first.bias.zero_(), last.weight.zero_(), last.bias.zero_()
        first.weight[0, run.meta.features + run.meta.extra + 3] = 1.0  # the one-hot of class 3
        last.weight[0, 0] = -1e4
    run.opt_meta = torch.optim.SGD(run.meta.parameters(), lr=0.0)  # the meta step runs, changes nothing
    for _ in range(cfg.epochs):
        molere.train_epoch(run, data, cfg)
    pred = molere.predict(run.model, data, data.x)[0].argmax(1)
    recall = torch.stack([(pred[data.y == c] == c).float().mean() for c in range(data.classes)])
    others = torch.cat([recall[:3], recall[4:]])
    # 4 epochs leave a class or two unlearnt on some seeds: over 21 fresh seeds (2026-12-06) the
    # other nine averaged 0.46-0.88 recall (0.5 failed seed 1001206305 at 0.456); a network
    # that learnt one class or none averages at most 1/9. With the weights ignored (constant
    # 0.5, 10 seeds) class 3 reached 0.65-0.88 recall, so the 0.02 bound is what catches the bug.
    assert recall[3] < 0.02 and others.mean() > 0.3, recall


def test_centred_logits_have_mean_zero_and_keep_the_meta_gradient_exact():
    """--meta-logit centred: g_phi's logits over a batch have mean 0 (the network's shifted by its mean), and
    the fast meta-gradient through them equals the create_graph reference in float64."""
    seed = fresh_seed()
    model, meta, x, y, h, xv, yv = tiny_setup()
    centred = molere.SampleNet(model.features, 5, 7, centred=True).double()
    centred.load_state_dict(meta.state_dict())
    raw, out = meta(h, y), centred(h, y)
    assert raw.mean().abs() > 1e-3 and out.mean().abs() < 1e-12, seed
    torch.testing.assert_close(out, raw - raw.mean(), rtol=0, atol=1e-12)
    rng = molere.rng_state(torch.device("cpu"))
    grads = classifier_grads(model, centred, x, y, h, rng, "batch")
    state = torch.get_rng_state()
    fast_val, fast = meta_grad_fast(model, centred, x, y, h, grads, xv, yv, 0.2, rng)
    torch.set_rng_state(state)
    ref_val, ref = meta_grad_reference(model, centred, x, y, h, xv, yv, 0.2, rng)
    assert sum(r.abs().sum() for r in ref) > 1e-8, seed
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12)
