"""Faults that once passed the whole suite (a mutation run of one-line faults, 2026-11-29), each
with a test that fails on it: the AUC's direction, instance noise's per-image flip rate, L2RW's
all-zero batch, the run lock's key, the meta-network's input columns, and the lr milestones."""
import math

import pytest
import torch
import torch.nn.functional as F

import molere
import molere_cli
import molere_data
import molere_io
from helpers import fresh_seed, run_main, small_run


def pairwise_auc(pos, neg):
    """P(a positive scores above a negative), ties counted half: every pair, no ranks."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def test_epoch_auc_ranks_clean_above_flipped():
    """w_auc is the AUC of clean images' weights over flipped ones' (1 when every clean image
    weighs more), over the images the epoch's batches held only; a swapped order reads 1 - AUC."""
    fresh_seed()
    cfg, data, run = small_run("lrw-random", 0, noise="uniform:0.4", meta_set="clean:20")
    n = len(data.y)
    w = torch.rand(n) * 0.7 + 0.4 * (~data.noisy).float()  # clean images mostly above flipped ones
    w[data.meta_mask] = float("nan")  # never in a batch
    seen = dict(w=w, fitted=torch.rand(n) < 0.5, phi_start=torch.cat([p.detach().flatten() for p in run.meta.parameters()]))
    out = molere_cli.epoch_diagnostics(run, data, seen)
    batched = ~data.meta_mask
    want = pairwise_auc(w[batched & ~data.noisy], w[batched & data.noisy])
    assert 0.8 < want < 1.0 and math.isclose(out["w_auc"], want, abs_tol=1e-6), (out["w_auc"], want)


def test_instance_noise_draws_a_flip_rate_per_image():
    """Xia et al.'s q_i ~ N(p, 0.1^2) truncated to [0, 1], one per image. At p = 0.05 the truncation
    at 0 lifts the mean rate to p + 0.1 phi(a) / (1 - Phi(a)), a = -p / 0.1, about 0.101 (a single
    rate p for every image gives 0.05); and the rate of a whole draw varies across generator
    seeds only by sampling (one q for all images would vary by about 0.06)."""
    p, n, classes = 0.05, 1000, 10
    a = -p / 0.1
    phi, tail = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(a / math.sqrt(2))
    expected = p + 0.1 * phi / tail  # the truncated normal's mean (the upper bound 1 is 9.5 sd away)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    rates = torch.tensor([float((molere_data.instance_noise(x, y, p, classes, torch.Generator().manual_seed(s)) != y)
                                .float().mean()) for s in range(20)])
    assert abs(rates.mean() - expected) < 0.01, (rates.mean(), expected)
    assert rates.std() < 0.03, rates  # sampling alone: about sqrt(0.1 * 0.9 / 1000) = 0.0095


def test_l2rw_batch_with_no_agreeing_point_has_zero_weights_not_nan():
    """Where every g_i >= 0 (no training point agrees with the validation gradient), L2RW's weights
    are all 0, finite, and such a batch makes no update; elsewhere they sum to 1."""
    fresh_seed()
    model = molere.WideResNet(10, 1, 5, 0.0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    for g, total in ((torch.rand(6) + 0.1, 0.0), (torch.tensor([-1.0, 0.5, -3.0, 0.0, 2.0, 1.0]), 1.0)):
        loss_val, w = molere.l2rw_weights(model, x, y, x, y, 0.1, None,
                                          weight_grad=lambda *args, g=g: (torch.tensor(1.0), g))
        assert torch.isfinite(w).all() and float(w.sum()) == total, w
    torch.testing.assert_close(w, torch.tensor([0.25, 0.0, 0.75, 0.0, 0.0, 0.0]))


@pytest.mark.slow
def test_each_seed_of_a_run_has_its_own_lock(tmp_path, capsys, monkeypatch):
    """The lock that stops two processes training one run is keyed by method AND seed: two seeds
    of one method (two workers of a schedule) must not block each other."""
    taken = []
    real = molere_io.run_lock

    def spy(path, **how):
        taken.append(path)
        return real(path, **how)

    monkeypatch.setattr(molere_cli, "run_lock", spy)
    run_main(["--dataset", "synthetic", "--train-subset", "100", "--depth", "10", "--width", "1", "--epochs", "1",
              "--batch-size", "20", "--method", "erm", "--seeds", "0", "1", "--eval-every", "0",
              "--out", str(tmp_path)], capsys)
    assert len(taken) == 2 and len(set(taken)) == 2, taken
    with real(taken[0]) as mine0, real(taken[1]) as mine1:  # held at once: neither blocks the other
        assert mine0 and mine1


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


def test_lr_milestones_never_at_epoch_0_and_each_decays():
    """The lr of each epoch is --lr x gamma^(milestones passed), each milestone at round(f x epochs)
    but never before epoch 1 (--epochs 1 trains at --lr), and milestones that round to one epoch
    each apply their decay there."""
    for epochs, milestones, want in ((1, (0.3, 0.6, 0.8), [0.1]),
                                     (4, (0.3, 0.6, 0.8), [0.1, 0.02, 0.004, 0.0008]),
                                     (2, (0.3, 0.6, 0.8), [0.1, 0.02 * 0.2])):
        cfg, data, run = small_run("erm", 0, epochs=epochs, milestones=milestones, lr=0.1, gamma=0.2)
        lrs = []
        for _ in range(epochs):
            lrs.append(run.opt.param_groups[0]["lr"])
            run.opt.step()
            run.sched.step()
        assert lrs == [pytest.approx(v, rel=1e-12) for v in want], (epochs, lrs)
