"""Does the meta-gradient carry a signal that a weight net can learn from? (RESULTS.md section 7)

    python -m tools.meta_signal --at-epochs 4 12 20 --batches 100 -- <molere.py flags of the study>

Trains the classifier as the erm-tr control does (ERM on S_tr, the clean meta set held out) and,
at the end of each of --at-epochs, holds theta fixed and draws --batches pairs of a training
batch and a meta-set batch, as a run would. For each weight net, freshly initialised as a run
initialises it (our g_phi on [h(x), y]; the same with the loss as one more input; MW-Net's net
on the loss alone), it computes each pair's meta-gradient d_m = dL_val(theta')/dphi the way
molere.meta_step does (METHOD.md §7's g, then autograd.grad(w~, phi, g)), and prints:
  consistency  ||mean_m d_m|| / mean_m ||d_m||: 1 when every batch pushes phi the same way,
               about 1 / sqrt(M) when the directions are random: what steps can accumulate
  alignment    cosine between the mean meta-gradient step -mean_m d_m and the steepest way to
               lower the flipped images' mean weight against the clean ones' (over all of S_tr):
               above 0, descending L_val moves the weights the way the noise calls for
and, per epoch, the AUC with which -g itself (the per-sample meta-gradient, the same for every
weight net to first order) ranks clean training images above flipped ones: L2RW's signal.
Training numbers only (the known flips of the pool and the meta set); no test image is read.
"""
import argparse
import math
from dataclasses import replace

import torch

import molere
import molere_cli
import molere_report as report

NETS = {"[h, y]": ("lrw-random", "features"), "[h, y, loss]": ("lrw-random", "features+loss"),
        "loss (MW-Net)": ("mwn", "features")}


def weights_of(run, data, idx):
    """w~ of the images S[idx] (eval-mode features and loss, as a fixed classifier sees them),
    differentiable in phi."""
    with torch.no_grad():
        logits, h = molere.predict(run.model, data, data.x[idx])
    return molere.instance_weights(run.meta, molere.meta_input(run, h, logits, data.y[idx]), data.y[idx], "none")


def measure(run, data, cfg, pairs):
    """consistency and alignment of the meta-gradient of run.meta over the given batch pairs,
    the per-sample g of every pair (with its image indices), and the pairs' meta-gradients d
    (one row each) and `ideal` (the gradient of the flipped-minus-clean weight gap)."""
    phi = list(run.meta.parameters())
    train_idx = (~run.val_mask).nonzero().squeeze(1)
    noisy = data.noisy[train_idx]
    w = weights_of(run, data, train_idx)
    gap = w[noisy].mean() - w[~noisy].mean()  # what a good step lowers
    ideal = torch.cat([t.flatten() for t in torch.autograd.grad(gap, phi)])
    d, gs = [], []
    for idx, val_idx in pairs:
        torch.manual_seed(int(idx[0]))  # the same dropout masks and validation batch for every net
        x, y = data.batch(idx, cfg.augment), data.y[idx]
        step = molere.classifier_step(run, cfg, x, y, replay=True)
        xv, yv = molere.validation_batch(data, molere.ValSet(data.x, data.y, val_idx), cfg)
        w_tilde = molere.instance_weights(run.meta, step.z, y, cfg.weight_norm)
        _, g = molere.weight_grad_fast(run.model, x, y, step.G, xv, yv, run.opt.param_groups[0]["lr"], step.rng)
        d.append(torch.cat([t.flatten() for t in torch.autograd.grad(w_tilde, phi, grad_outputs=g)]))
        gs.append((idx, g))
    d = torch.stack(d)
    consistency = float(d.mean(0).norm() / d.norm(dim=1).mean())
    alignment = float(torch.nn.functional.cosine_similarity(-d.mean(0), -ideal, dim=0))
    return consistency, alignment, gs, d, ideal


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--at-epochs", type=int, nargs="+", default=[4, 12, 20])
    p.add_argument("--batches", type=int, default=100, help="batch pairs per measurement")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then molere.py's flags (the study's config)")
    a = p.parse_args()
    flags = [f for f in a.flags if f != "--"]
    args, cfg, rt, data = molere_cli.setup(flags + ["--method", "erm-tr"])
    if data.noisy is None or data.meta_mask is None:
        raise SystemExit("meta_signal: error: needs --noise and --meta-set clean:N (known flips, a clean S_val)")
    seed = args.seeds[0]
    erm = molere.Run(cfg, "erm-tr", seed, data, rt.device)
    erm.val_mask = molere.initial_split("erm-tr", data, cfg.delta, seed)
    val_idx = erm.val_mask.nonzero().squeeze(1)
    print(f"| epoch | lr (alpha) | AUC of -g (clean above flipped) | weight net | consistency (random: "
          f"{1 / math.sqrt(a.batches):.2f}) | alignment |\n|---|---|---|---|---|---|")
    for epoch in range(1, max(a.at_epochs) + 1):
        molere.train_epoch(erm, data, cfg)
        erm.sched.step()
        erm.epoch += 1
        if epoch not in a.at_epochs:
            continue
        torch.manual_seed(10_000 * seed + epoch)
        batches = torch.cat([molere.epoch_batches(erm, cfg) for _ in range(-(-a.batches * cfg.batch_size //
                                                                           int((~erm.val_mask).sum())))])
        pairs = [(idx, val_idx) for idx in batches[:a.batches]]
        for name, (method, meta_input) in NETS.items():
            run = molere.Run(replace(cfg, meta_input=meta_input), method, seed, data, rt.device)
            run.model.load_state_dict(erm.model.state_dict())
            run.opt.load_state_dict(erm.opt.state_dict())  # the scheduled lr: the look-ahead's alpha
            run.val_mask = erm.val_mask
            consistency, alignment, gs, _, _ = measure(run, data, cfg, pairs)
            if name == "[h, y]":
                idx, g = (torch.cat(t) for t in zip(*gs))
                flipped = data.noisy[idx]
                auc = report.auc(-g[~flipped], -g[flipped])
            lr = run.opt.param_groups[0]["lr"]
            print(f"| {epoch} | {lr:g} | {auc:.3f} | {name} | {consistency:.3f} | {alignment:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
