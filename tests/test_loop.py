"""The training loop as it runs (METHOD.md E7, E11, §3, §4): the meta step moves phi down the
reference meta-gradient at the scheduled lr, no validation image enters a classifier batch, the lr
milestones, the train-twice splits by margin, ERM-hard's training split, evaluation drawing no
random numbers."""
import copy

import pytest
import torch
import torch.nn.functional as F

import molere
import molere_cli
import molere_data
from helpers import flat, fresh_seed, meta_grad_reference, small_run


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


def test_train_twice_hard_holds_lowest_margins_easy_highest():
    fresh_seed()
    data = molere_data.load_data(molere.Config(dataset="synthetic", train_subset=300), torch.device("cpu"))
    model = molere.WideResNet(10, 1, data.classes, 0.0)
    with torch.no_grad():
        model.fc.weight.mul_(20)  # spread the margins
    splits = {m: molere.initial_split(m, data, 0.2, 0, model) for m in ("lrw-hard", "lrw-easy", "lrw-random")}
    model.eval()
    with torch.no_grad():  # independent margins in float64
        x = ((data.x.double() / 255) - data.mean.double()) / data.std.double()
        p = F.softmax(model.double()(x)[0], 1)
    pm = torch.tensor([p[i, t] - max(p[i, k] for k in range(data.classes) if k != t)
                       for i, t in enumerate(data.y.tolist())])
    for c in range(data.classes):
        in_c = data.y == c
        hard, easy = splits["lrw-hard"] & in_c, splits["lrw-easy"] & in_c
        assert pm[hard].max() <= pm[in_c & ~hard].min() + 1e-6
        assert pm[easy].min() >= pm[in_c & ~easy].max() - 1e-6
    assert pm[splits["lrw-hard"]].mean() < pm[splits["lrw-random"]].mean() < pm[splits["lrw-easy"]].mean()
    assert all(int(s.sum()) == 60 for s in splits.values())


def test_erm_hard_is_erm_on_lrw_hards_training_split():
    """RESULTS 9.2's control: the same per-class split of lowest ERM margin as LRW-Hard (any model
    gives margins), weights 1 (G is plain cross-entropy's), and not part of --method all."""
    seed = fresh_seed()
    cfg, data, run = small_run("erm-hard", seed, augment=False)
    erm = molere.WideResNet(10, 1, data.classes, 0.0)
    hard = molere.initial_split("lrw-hard", data, cfg.delta, seed, erm)
    run.val_mask = molere.initial_split("erm-hard", data, cfg.delta, seed, erm)
    assert torch.equal(run.val_mask, hard) and 0 < int(hard.sum()) < len(data.y)
    pm = molere.margins(molere.predict(erm, data, data.x)[0], data.y)
    for c in range(data.classes):  # within each class, every held-out image has a margin below every kept one
        in_c = data.y == c
        assert pm[in_c & hard].max() <= pm[in_c & ~hard].min() + 1e-6
    idx = molere.epoch_batches(run, cfg)[0]
    assert not hard[idx].any()
    x = data.batch(idx, augment=False)
    got = [g.clone() for g in molere.classifier_step(run, cfg, x, data.y[idx]).G]
    run.model.zero_grad()
    F.cross_entropy(run.model(x)[0].double(), data.y[idx]).backward()
    for g, p in zip(got, run.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert "erm-hard" not in molere_cli.ALL and "erm-tr" in molere_cli.ALL


def test_evaluation_draws_no_random_numbers():
    """The frame evaluates the meta set every epoch and the test set at each new best; neither may
    move the RNG, or adding a meta set would change the training it measures."""
    cfg, data, run = small_run("erm", 0)
    before = torch.get_rng_state()
    molere.predict(run.model, data, data.x)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("method", ["lrw-random", "mwn"])
def test_meta_lr_decay_sets_adams_lr_to_t_over_n_at_the_nth_meta_step(method):
    """--meta-lr-decay T: at the meta step made after n - 1 others, our meta-network's Adam steps at
    base x min(1, T / n); MW-Net keeps its published constant lr."""
    seed = fresh_seed()
    cfg, data, run = small_run(method, seed, meta_lr_decay=4, meta_steps_min=0)
    run.val_mask = molere.initial_split("lrw-random", data, cfg.delta, seed)
    base = cfg.meta_lr * (run.K if cfg.meta_lr_per == "step" else 1)
    val = molere.validation_set(run, data)
    for n in (1, 4, 11):
        run.step = (n - 1) * run.K  # n - 1 meta steps made before this one
        idx = molere.epoch_batches(run, cfg)[0]
        step = molere.classifier_step(run, cfg, data.batch(idx, cfg.augment), data.y[idx], replay=True)
        molere.meta_step(run, cfg, step, *molere.validation_batch(data, val, cfg))
        want = base * min(1.0, 4 / n) if method == "lrw-random" else base
        assert run.opt_meta.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), (n, seed)
