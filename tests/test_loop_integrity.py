"""The training steps as they run, each against an independent reference: the mistakes a
reviewer fears most and that a mutation test of the suite once let through (a gradient going
uphill, a weight normalisation dropped in the look-ahead only, a splitter objective missing a
term, the initial lr as the look-ahead step, a validation batch from all of S, a re-split keeping
the wrong samples, MW-Net's loss with the wrong labels, noise "flipping" a label to itself)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import molere
import molere_data
from helpers import fresh_seed, meta_grad_reference, small_run


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("method", ["lrw-random", "mwn"])
def test_meta_step_moves_phi_down_the_reference_meta_gradient_at_the_scheduled_lr(method):
    """With a plain SGD meta optimiser (step eta), after an lr milestone, on a WRN with BatchNorm:
    phi moves by exactly -eta x the create_graph meta-gradient at alpha = the CURRENT lr, with
    w~ = w / mean w in the look-ahead, on a validation batch drawn from S_val."""
    seed = fresh_seed()
    cfg, data, run = small_run(method, seed, dropout=0.0)
    run.val_mask = molere.initial_split("lrw-random", data, cfg.delta, seed)
    val_idx = run.val_mask.nonzero().squeeze(1)
    run.sched.step()  # past the first milestone: lr 0.1 -> 0.02
    alpha = cfg.lr * cfg.gamma
    assert run.opt.param_groups[0]["lr"] == pytest.approx(alpha)
    eta = 0.5
    run.opt_meta = torch.optim.SGD(run.meta.parameters(), lr=eta)
    idx = molere.epoch_batches(run, cfg)[0]
    x, y = data.batch(idx, cfg.augment), data.y[idx]
    step = molere.classifier_step(run, cfg, x, y, replay=True)
    meta_before, state = copy.deepcopy(run.meta), torch.get_rng_state()
    molere.meta_step(run, cfg, step, *molere.validation_batch(data, molere.validation_set(run, data), cfg))
    torch.set_rng_state(state)  # the reference draws the same validation batch, from S_val
    vi = val_idx[torch.randint(len(val_idx), (cfg.batch_size,))]
    xv, yv = data.batch(vi, cfg.augment), data.y[vi]
    _, ref = meta_grad_reference(run.model, meta_before, x, y, step.z, xv, yv, alpha, step.rng, "batch")
    step = flat(run.meta.parameters()) - flat(meta_before.parameters())
    assert flat(ref).norm() > 1e-7
    # float32, fast path against create_graph: about 1e-5 of the whole vector, up to 2e-3 where
    # the meta-gradient is tiny (MW-Net, seed 78962953: norm 4e-5); a sign, a factor of 5 in
    # alpha, a dropped normalisation or another validation batch are errors of order 1
    assert (step + eta * flat(ref)).norm() / (eta * flat(ref)).norm() < 1e-2


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


@pytest.mark.parametrize("p", [0.2, 0.9])
def test_uniform_noise_flips_to_another_class_at_the_stated_rate(p):
    y = torch.arange(10_000) % 10
    noisy = molere_data.add_noise(y, f"uniform:{p}", 10)
    assert abs(float((noisy != y).float().mean()) - p) < 0.02
    moved = noisy[noisy != y] - y[noisy != y]
    counts = torch.bincount(moved % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.7 * counts[1:].float().mean()  # every other class, evenly


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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lrw-random", "lrw-easy", "lrw-hard", "molere"])
def test_no_validation_image_ever_enters_a_classifier_batch(tmp_path, monkeypatch, method):
    seed = fresh_seed()
    cfg, data, _ = small_run(method, seed, epochs=3)
    seen, real_batch = [], data.batch

    def recording_batch(idx, augment, images=None):  # images None: a batch of S for a classifier step
        if images is None:
            seen.append((run.epoch, idx.clone(), run.val_mask.clone()))
        return real_batch(idx, augment, images)

    monkeypatch.setattr(data, "batch", recording_batch)
    erm = molere.WideResNet(10, 1, data.classes, 0.0)  # any model gives margins for the split
    run = molere.Run(cfg, method, seed, data, torch.device("cpu"))
    run.val_mask = molere.initial_split(method, data, cfg.delta, seed, erm)
    molere.train(run, data, cfg)
    assert len(seen) == cfg.epochs * 9  # 360 training images, batch 40
    for epoch in range(cfg.epochs):
        rows = [(idx, mask) for e, idx, mask in seen if e == epoch]
        drawn = torch.cat([idx for idx, _ in rows])
        mask = rows[0][1]
        assert int(mask.sum()) == 40 and all(torch.equal(m, mask) for _, m in rows)
        assert not mask[drawn].any(), f"epoch {epoch}: a validation image in a classifier batch"
        assert len(drawn.unique()) == len(drawn) == int((~mask).sum())  # S_tr exactly once
    if method == "molere":  # the splitter's re-splits changed S_val during the run
        assert not torch.equal(seen[0][2], seen[-1][2])


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

