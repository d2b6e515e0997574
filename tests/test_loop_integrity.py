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
from test_molere import fresh_seed, small_run


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
    x, y, h, rng, _, _ = molere.classifier_step(run, data, cfg, idx, molere.defaultdict(list), meta_next=True)
    meta_before, state = copy.deepcopy(run.meta), torch.get_rng_state()
    molere.meta_step(run, data, cfg, x, y, h, rng, val_idx, molere.defaultdict(list))
    torch.set_rng_state(state)  # the reference draws the same validation batch, from S_val
    vi = val_idx[torch.randint(len(val_idx), (cfg.batch_size,))]
    xv, yv = molere.get_batch(data, vi, augment=cfg.augment), data.y[vi]
    _, ref = molere.meta_grad_reference(run.model, meta_before, x, y, h, xv, yv, alpha, rng, "batch")
    step = flat(run.meta.parameters()) - flat(meta_before.parameters())
    assert flat(ref).norm() > 1e-7
    # float32, fast path against create_graph: about 1e-5 of the whole vector; a sign, a factor
    # of 5 in alpha, a dropped normalisation or another validation batch are errors of order 1
    assert (step + eta * flat(ref)).norm() / (eta * flat(ref)).norm() < 1e-3


def test_splitter_step_descends_specs_loss_on_the_right_images():
    """SPEC section 2 written out in float64: CE(P(train), 1[y_hat = y]) - l_val on the S_val half
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
    molere.splitter_step(run, data, cfg, molere.defaultdict(list), val_idx)
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
    with torch.no_grad():
        for p in run.splitter.parameters():
            p.add_(torch.randn_like(p))
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
    state = torch.get_rng_state()
    x, y, h, _, w, _ = molere.classifier_step(run, data, cfg, idx, molere.defaultdict(list), meta_next=True)
    torch.set_rng_state(state)
    xb = molere.get_batch(data, idx, augment=cfg.augment)  # the same augmented images
    assert torch.equal(xb, x) and torch.equal(y, data.y[idx])
    logits = run.model(xb)[0]  # train mode, batch statistics: the forward the step made
    torch.testing.assert_close(h.squeeze(1), F.cross_entropy(logits, data.y[idx], reduction="none"),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, torch.sigmoid(run.meta(h, y)))


@pytest.mark.parametrize("p", [0.2, 0.9])
def test_uniform_noise_flips_to_another_class_at_the_stated_rate(p):
    y = torch.arange(10_000) % 10
    noisy = molere.add_noise(y, f"uniform:{p}", 10)
    assert abs(float((noisy != y).float().mean()) - p) < 0.02
    moved = noisy[noisy != y] - y[noisy != y]
    counts = torch.bincount(moved % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.7 * counts[1:].float().mean()  # every other class, evenly
