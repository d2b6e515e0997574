"""
The frame around molere.py: the command line, where and how runs execute (`Runtime`), the plan
of (method, seed) runs, checkpoints, the epoch budget, progress lines and result records.
None of it changes a run's numbers; molere.py is the method.

    python molere_cli.py --help          # the same as python molere.py --help
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import warnings
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

import torch.distributed as dist

from molere import (METHODS, NEEDS_ERM, Config, ConfigError, Run, accuracy, fit_problems, image_side, initial_split,
                    instance_weights, margins, meta_input, predict, rng_state, set_rng, train)
from molere_world import rank, spread_over, world
from molere_data import load_data
from molere_io import (UserError, append_result, device_name, has_checkpoint, load_torchvision, model_problems,
                       make_writable_folder, read_checkpoint, read_results, run_lock, source_version,
                       write_checkpoint)
from molere_report import auc, report_table

ALL = [m for m, spec in METHODS.items() if spec.role != "baseline" and m != "erm-hard"]  # --method all: the
# paper's and ERM-tr; erm-hard (what holding the hard split out costs) is run by name

try:  # optional (--tensorboard): TensorBoard's event-file writer, where the tensorboard package is installed
    from torch.utils.tensorboard import SummaryWriter as tensorboard_writer
except ImportError:
    tensorboard_writer = None


@dataclass(frozen=True)
class Runtime:
    """Where and how runs execute; none of it changes a run's numbers."""
    device: torch.device = torch.device("cpu")
    out: str = "runs"
    resume: bool = False     # continue runs from their checkpoints, skip finished ones
    compile: bool = False    # torch.compile the classifier's steps, evaluation and the fast meta step
    eval_every: int = 1      # test accuracy in the log every N epochs (0: only at the end)
    tensorboard: bool = False  # also TensorBoard event files, OUT/tensorboard/METHOD-seedN

# Config fields added after results were recorded, with the value every earlier run had: left out
# of a run's identity at that value (what a record without the key means), so earlier records and
# checkpoints still match, even should a default change later.
LATER = dict(arch="wrn", imbalance=1.0, noise="none", meta_set="split", meta_input="features", weights="",
             image_size=224, meta_lr_per="meta-step", meta_init="uniform",
             meta_steps_min=0, data_draw="fixed", meta_wd=0.0, meta_bound=0.0, meta_logit="free",
             meta_lr_decay=0)


def config_record(cfg):
    """What a checkpoint or result line holds of the Config, and what identifies a run."""
    d = json.loads(json.dumps(asdict(cfg)))
    return {k: v for k, v in d.items() if k not in LATER or v != LATER[k]}


def config_hash(cfg):
    return hashlib.sha1(json.dumps(config_record(cfg), sort_keys=True).encode()).hexdigest()[:10]

# ----------------------------------------------------------------------------- one run: checkpoints, budget, record


def checkpoint_path(rt, cfg, method, seed):
    return os.path.join(rt.out, f"{dataset_tag(cfg)}-{method}-seed{seed}.pt")


def dataset_tag(cfg):
    """The dataset in a file name: folder:/data/pets -> folder-pets."""
    if cfg.dataset.startswith("folder:"):
        return "folder-" + os.path.basename(os.path.normpath(cfg.dataset[7:]))
    return cfg.dataset


def save_checkpoint(run, path, cfg, data_prints=None):
    """Everything a run owns, as tensors, numbers, strings, lists and dicts only (readable with
    torch.load(weights_only=True)), written crash-safe (molere_io.write_checkpoint)."""
    ckpt = {k: getattr(run, k).state_dict() for k in Run.STATE}
    ckpt.update(config=config_record(cfg), method=run.method, seed=run.seed, epoch=run.epoch, step=run.step,
                elapsed=run.elapsed, log=run.log, val_mask=run.val_mask.cpu(), rng=list(rng_state(run.device)),
                code=source_version(), data=data_prints)
    write_checkpoint(path, ckpt)


def restore(run, ckpt):
    for k in Run.STATE:
        getattr(run, k).load_state_dict(ckpt[k])
    run.epoch, run.step, run.elapsed, run.log = ckpt["epoch"], ckpt["step"], ckpt["elapsed"], ckpt["log"]
    run.val_mask = ckpt["val_mask"].to(run.device)
    set_rng(ckpt["rng"], run.device)


class StopAfter(Exception):
    """--stop-after reached: the checkpoint is written; --resume continues."""


DIVERGED_X = 100  # a loss this many times a uniform guess's (or its first epoch's, if larger) has diverged


def divergence(log, entry, steps, classes):
    """One line if this epoch's training loss or validation loss L_val(theta') is not finite, or is above
    DIVERGED_X times the larger of ln C (the loss of a uniform guess over C classes: a first epoch above
    that has diverged already) and its first epoch's value; None otherwise. A cross-entropy of 100 ln C
    gives the right class a probability of C^-100: no hard split or label noise comes near. `steps`: the
    epoch's step range, for the message."""
    for key, name in (("loss", "training loss"), ("val_loss", "validation loss L_val")):
        value = entry.get(key)
        if value is None:
            continue
        first = log[0].get(key, 0.0) if log else 0.0
        bound = DIVERGED_X * max(first if math.isfinite(first) else 0.0, math.log(classes))
        if not math.isfinite(value) or value > bound:
            why = "" if not math.isfinite(value) else f", above {bound:.3g} ({DIVERGED_X} x " + (
                f"its first epoch's {first:.3g})" if first > math.log(classes) else f"ln {classes}, a uniform guess's)")
            return (f"the run diverged at epoch {entry['epoch']} (steps {steps}): its {name} is {value:.4g}{why}; "
                    f"lower --lr (now {entry['lr']:g}). The checkpoint of the last good epoch is kept, and no result "
                    f"is written")
    return None


class EpochBudget:
    """How many more epochs this invocation may train (--stop-after; None: no limit), and the
    plan's clock: epochs left in the whole plan (`todo`, set by run_plan) at this invocation's pace."""

    def __init__(self, epochs=None):
        self.left = epochs or None
        self.todo, self.done, self.start = 0, 0, time.time()

    def spend(self):
        """After an epoch: the invocation stops here once --stop-after epochs are spent."""
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                raise StopAfter

    def tick(self):
        self.done, self.todo = self.done + 1, max(0, self.todo - 1)

    def plan_eta(self):
        """Seconds until the whole plan is done, or None before the first epoch."""
        return (time.time() - self.start) / self.done * self.todo if self.done else None


def agree(value):
    """Under torchrun, rank 0's value in every process: the plan's decisions (skip, resume, which
    ERM model) must be the same everywhere, or the processes would wait on each other forever."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lock(path, **how):
    """molere_io.run_lock, taken by rank 0 only under torchrun (the others follow its decisions)."""
    return run_lock(path, **how) if rank() == 0 else contextlib.nullcontext(True)


def train_run(cfg, rt, method, seed, data, val_mask, budget=None):
    """Train one (method, seed) to the end with molere.train, from its checkpoint where --resume
    finds one, else from `val_mask` (molere.initial_split); after every epoch the test accuracy
    (every --eval-every epochs and at the end), a checkpoint, a line in OUT/metrics.jsonl, a
    progress line and the budget.
    Returns the run and its result record."""
    path, tag = checkpoint_path(rt, cfg, method, seed), f"[{method} seed {seed}]"
    run = Run(cfg, method, seed, data, rt.device, rt.compile)
    if agree(rt.resume and has_checkpoint(path)):  # torchrun: every process resumes, or none
        restore(run, same_data(read_checkpoint(path, config_record(cfg)), path, data))
        print(f"{tag} resumed from {path} at epoch {run.epoch}", flush=True)
        if budget is not None:
            budget.todo = max(0, budget.todo - run.epoch)
    else:
        run.val_mask = val_mask
    last = dict(start=time.time(), test=None)
    board = tensorboard_writer(os.path.join(rt.out, "tensorboard", f"{method}-seed{seed}")) \
        if rt.tensorboard and rank() == 0 else None

    def on_epoch(run, entry, seen):
        diverged = agree(divergence(run.log, entry, f"{run.step - entry['steps'] + 1}-{run.step}",
                                         data.classes))  # torchrun: rank 0 decides
        if diverged:  # before anything is written: the last good epoch's checkpoint stays
            raise UserError(f"{tag} {diverged}")
        entry.update(epoch_diagnostics(run, data, seen))
        best = max((e["meta_acc"] for e in run.log if "meta_acc" in e), default=-1.0)
        if data.y_meta is not None:  # a fixed meta set: early stopping on it, test accuracy at each new best
            entry["meta_acc"] = accuracy(predict(run.model, data, data.x_meta, forward=run.forward)[0], data.y_meta)
        if run.epoch == cfg.epochs or (rt.eval_every and run.epoch % rt.eval_every == 0) or \
                entry.get("meta_acc", -1.0) > best:
            last["test"], _ = predict(run.model, data, data.x_test, forward=run.forward)
            entry["test_acc"] = accuracy(last["test"], data.y_test)
        run.elapsed += time.time() - last["start"]
        entry["time_s"] = round(time.time() - last["start"], 2)
        run.log.append(entry)
        if rank() == 0:  # torchrun: one writer
            save_checkpoint(run, path, cfg, data.fingerprint)
            # the same numbers as the progress line, one strict-JSON line per epoch, while the run goes
            append_result(os.path.join(rt.out, "metrics.jsonl"),
                          dict(method=method, seed=seed, config_hash=config_hash(cfg), **entry))
        if board is not None:  # the same numbers, by epoch
            for name, value in entry.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and name != "epoch":
                    board.add_scalar(name, value, run.epoch)
            board.flush()
        if budget is not None:
            budget.tick()
        plan_eta = budget.plan_eta() if budget is not None else None
        print(("\r\033[K" if sys.stdout.isatty() else "") + progress_line(tag, entry, run, cfg.epochs, plan_eta),
              flush=True)
        warning = collapse_warning(run.log, cfg.batch_size)
        if warning:
            print(f"{tag} {warning}", flush=True)
        if budget is not None:
            budget.spend()
        last["start"] = time.time()

    train(run, data, cfg, on_epoch, StepProgress(tag, run, cfg))
    if board is not None:
        board.close()
    if last["test"] is None:  # resumed from a checkpoint of the last epoch
        last["test"], _ = predict(run.model, data, data.x_test, forward=run.forward)
    return run, result_record(run, data, cfg, rt, last["test"])


PROGRESS_EVERY_S = 30  # how often a progress line is printed inside an epoch when output is not a terminal


class StepProgress:
    """A progress line inside an epoch: steps done of the epoch's, images a second, the last
    step's loss and the epoch's ETA; refreshed in place about once a second on a terminal,
    printed every PROGRESS_EVERY_S seconds otherwise. Reads the loss (a host sync) only when it
    prints."""

    def __init__(self, tag, run, cfg):
        self.tag, self.run, self.cfg, self.tty = tag, run, cfg, sys.stdout.isatty()
        self.start = self.last = 0.0

    def __call__(self, done, steps, losses):
        now = time.time()
        if done == 1:  # the clock starts once the first step (compilation, reading ahead) is over
            self.start = self.last = now
        if done == 1 or done == steps or now - self.last < (1 if self.tty else PROGRESS_EVERY_S):
            return
        self.last, spent = now, now - self.start  # timed from the end of the first step
        eta = int(spent / (done - 1) * (steps - done))
        line = (f"{self.tag} epoch {self.run.epoch + 1}/{self.cfg.epochs} step {done}/{steps} | "
                f"{(done - 1) * self.cfg.batch_size / max(spent, 1e-9):.0f} img/s | loss {float(losses[-1]):.3f} | "
                f"epoch ETA {eta // 60}:{eta % 60:02d}")
        print("\r\033[K" + line if self.tty else line, end="" if self.tty else "\n", flush=True)


def best_on_meta_set(log):
    """Early stopping on the meta set, the noisy-label literature's strong baseline (RESULTS §9): the
    first epoch of highest meta-set accuracy and the test accuracy there (the frame evaluates the
    test set at every new best). Empty without a fixed meta set."""
    scored = [e for e in log if "meta_acc" in e]
    if not scored:
        return {}
    best = max(scored, key=lambda e: e["meta_acc"])  # the first of equals
    return dict(best_meta_epoch=best["epoch"], best_meta_acc=best["meta_acc"], test_acc_best_meta=best["test_acc"])


def epoch_diagnostics(run, data, seen):
    """METHOD.md §8: does the meta level learn? Over the epoch's training images (each seen
    once, its weight as its batch gave it, the label fit in train mode before the step):
    w_sat  share of raw sigmoid weights below 0.05 or above 0.95 (saturation)
    w_zero share of weights exactly 0 (L2RW)
    w_auc  AUC of the weights, clean images above flipped ones (only under --noise)
    w_auc_minority  AUC of the weights, minority images above majority ones (--dataset spurious)
    val_minority    the minority's share of S_val (--dataset spurious)
    dphi   the meta-network's parameter change over the epoch, ||phi_end - phi_start||
    fit_flipped, fit_clean  share of flipped / clean labels the batches predicted (under --noise)"""
    if not run.reweights and data.noisy is None and data.minority is None:
        return {}
    w, fits = seen["w"], seen["fitted"]
    batched = ~torch.isnan(w)  # S_tr: the images the epoch's batches held
    out = {}
    if run.reweights:
        if run.spec.weights == "l2rw":
            out["w_zero"] = (w[batched] == 0).float().mean()
        else:
            out["w_sat"] = ((w[batched] < 0.05) | (w[batched] > 0.95)).float().mean()
            phi = torch.cat([p.detach().flatten() for p in run.meta.parameters()])
            out["dphi"] = (phi - seen["phi_start"]).norm()
    if data.noisy is not None:
        flipped, clean = batched & data.noisy, batched & ~data.noisy
        if run.reweights and flipped.any() and clean.any():
            out["w_auc"] = auc(w[clean], w[flipped])
        out["fit_flipped"], out["fit_clean"] = fits[flipped].float().mean(), fits[clean].float().mean()
    if data.minority is not None:
        few, many = batched & data.minority, batched & ~data.minority
        if run.reweights and few.any() and many.any():
            out["w_auc_minority"] = auc(w[few], w[many])
        if run.val_mask.any():
            out["val_minority"] = data.minority[run.val_mask].float().mean()
    if not out:
        return {}
    return dict(zip(out, torch.stack([v.float() for v in out.values()]).tolist()))  # one host sync


COLLAPSE_EPOCHS = 3  # epochs in a row with n_eff below a quarter of the batch before the warning


def collapse_warning(log, batch_size, epochs=COLLAPSE_EPOCHS):
    """One line when the learned weights have rested on fewer than B/4 samples a batch (the epoch's
    mean n_eff, molere.effective_batch) for `epochs` epochs in a row, printed once, on the epoch the
    streak reaches that length; None otherwise. The run goes on: it is a warning."""
    low = [e.get("n_eff", batch_size) < batch_size / 4 for e in log]
    if len(low) < epochs or not all(low[-epochs:]) or (len(low) > epochs and low[-epochs - 1]):
        return None
    n = log[-1]["n_eff"]
    return (f"warning: for {epochs} epochs the learned weights have rested on about {n:.0f} of {batch_size} "
            f"samples a batch (n_eff < B/4): the meta level has concentrated its weight and the classifier "
            f"learns from few samples (docs/usage.md, 'Watching a run')")


def result_record(run, data, cfg, rt, test_logits):
    """One finished run: config, log, test accuracy and margins, and on S (eval mode) the fit,
    margins and learned weights that the analysis reads."""
    train_logits, h = predict(run.model, data, data.x, forward=run.forward)  # the regime check: how well S is fitted
    rounded = lambda t: [round(v, 4) for v in t.tolist()]
    with torch.no_grad():  # L2RW has no weight for an image outside a batch
        weights = rounded(instance_weights(run.meta, meta_input(run, h, train_logits, data.y), data.y, "none")) \
            if run.spec.weights in ("features", "loss") else None
    fits = {}
    if data.noisy is not None:  # the regime check under noise: does the model memorise the flipped labels?
        right = train_logits.argmax(1) == data.y
        fits = dict(fit_flipped=float(right[data.noisy].float().mean()), fit_clean=float(right[~data.noisy].float().mean()))
    if data.minority is not None:  # the hard-samples known answer: the minority, tested and held out
        fits.update(test_acc_majority=accuracy(test_logits[~data.minority_test], data.y_test[~data.minority_test]),
                    test_acc_minority=accuracy(test_logits[data.minority_test], data.y_test[data.minority_test]),
                    minority=data.minority.nonzero().squeeze(1).tolist())
    right_test = (test_logits.argmax(1) == data.y_test).float()
    per_class = lambda v, y: [round(float(v[y == c].mean()), 4) if (y == c).any() else None
                              for c in range(data.classes)]
    s_tr = ~run.val_mask
    right_train = (train_logits.argmax(1) == data.y).float()
    percent = lambda accs: [None if a is None else round(a * 100, 2) for a in accs]
    by_class = dict(test_acc_by_class=percent(per_class(right_test, data.y_test)),
                    train_acc_by_class=percent(per_class(right_train[s_tr], data.y[s_tr])),  # eval mode, S_tr
                    train_counts=torch.bincount(data.y[s_tr], minlength=data.classes).tolist())  # as training sees them
    if weights is not None:  # the learned weight per class, over S_tr, against the prior 1 / n_c
        by_class["weight_by_class"] = per_class(torch.tensor(weights, device=data.y.device)[s_tr], data.y[s_tr])
    return dict(
        method=run.method, seed=run.seed, dataset=cfg.dataset, config_hash=config_hash(cfg), config=config_record(cfg),
        test_acc=accuracy(test_logits, data.y_test), test_margins=rounded(margins(test_logits, data.y_test)),
        train_acc=accuracy(train_logits, data.y), train_margins=rounded(margins(train_logits, data.y)),
        train_weights=weights, val_mask=run.val_mask.nonzero().squeeze(1).tolist(),
        noisy=(data.y != data.y_true).nonzero().squeeze(1).tolist(),
        val_size=int(run.val_mask.sum()), **fits, **by_class, **best_on_meta_set(run.log), log=run.log,
        wall_time_s=round(run.elapsed, 1),
        device=device_name(rt.device), date=time.strftime("%Y-%m-%d %H:%M:%S"), code=source_version())


def progress_line(tag, e, run, epochs, plan_eta=None):
    eta = run.elapsed / run.epoch * (epochs - run.epoch)
    parts = [f"{tag} epoch {e['epoch']}/{epochs}", f"lr {e['lr']:.4g}", f"loss {e['loss']:.3f}"]
    if run.reweights:
        parts += [f"w {e['w_mean']:.2f} spread {e['w_spread']:.2f} corr(w,l) {e['w_loss_corr']:+.2f}",
                  f"val-loss {e['val_loss']:.3f}", f"val n={int(run.val_mask.sum())}"]
    shown = [k for k in ("w_sat", "w_zero", "w_auc", "w_auc_minority", "val_minority", "meta_acc") if k in e]
    if shown:
        parts.append(" ".join(f"{k} {e[k]:.2f}" for k in shown))
    if "n_eff" in e:
        parts.append(f"n_eff {e['n_eff']:.1f}")
    if "fit_flipped" in e:
        parts.append(f"fits flipped {e['fit_flipped']:.0%} clean {e['fit_clean']:.0%}")
    if "split_fit" in e:
        parts.append(f"splitter fit {e['split_fit']:.3f} l_val {e['split_l_val']:.3f} "
                     f"R_size {e['split_r_size']:.4f} R_bal {e['split_r_bal']:.4f}")
    if "val_err" in e:  # a re-split: the classifier's error on the new S_val and S_tr (details in the log)
        parts.append(f"new split: err val {e['val_err']:.1%} train {e['train_err']:.1%}, kept {e['split_kept']:.0%}")
    if "test_acc" in e:
        parts.append(f"test {e['test_acc']:.2f}%")
    clock = lambda s: f"{int(s) // 3600}:{int(s) % 3600 // 60:02d}:{int(s) % 60:02d}"
    plan = f" (plan {clock(plan_eta)})" if plan_eta is not None and plan_eta > eta + 1 else ""
    parts.append(f"{e['time_s']:.1f}s ETA {clock(eta)}{plan}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- CLI


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for flags that take a value; an on/off flag's help says it in words."""

    def _get_help_string(self, action):
        return action.help if action.nargs == 0 else super()._get_help_string(action)


HELP = {  # each Config field's --help (molere.py keeps a one-line comment beside the field)
    "dataset": "synthetic (the demo set, 2,000 images at 32 x 32) | synthetic:N[:SIDE] (N training images "
               "at SIDE x SIDE pixels, 10,000 test images: the long run's synthetic:46000:8) | "
               "spurious (the hard-samples known answer) | cifar10 | cifar100 | packed (the "
               "CIFAR-10 subset that tools/pack.py writes to --data-root, for a GPU machine) | "
               "folder:PATH (PATH/train/<class>/* and PATH/test/<class>/*, read from disk)",
    "image_size": "--dataset folder:PATH: the side of the images the network sees (ImageNet's "
                  "transforms: random resized crop and flip; resize and centre crop to test)",
    "train_subset": "train on a fixed class-balanced subset of this many images (0: all of S)",
    "depth": "Wide-ResNet depth, 6n+4",
    "width": "Wide-ResNet widening factor k",
    "dropout": "dropout between the two convs of a block",
    "epochs": "epochs over the classifier's training split",
    "batch_size": "classifier, validation and splitter batch size",
    "lr": "classifier SGD learning rate (also alpha of the look-ahead)",
    "momentum": "classifier SGD Nesterov momentum",
    "wd": "classifier weight decay",
    "milestones": "fractions of --epochs at which the lr is scaled by --gamma",
    "gamma": "learning-rate decay factor at each milestone",
    "delta": "validation fraction delta, in (0, 0.5]",
    "K": "meta-network and splitter update every K classifier steps (see --meta-steps-min)",
    "meta_steps_min": "a run makes at least this many meta steps: K is lowered (to 1 at the least) "
                      "where --epochs x steps an epoch / K is fewer; 0: K as given",
    "meta_grad": "fast (one JVP, no double backward) | reference (create_graph)",
    "weight_norm": "batch (w / mean w over the batch, as L2RW and MW-Net's class-imbalance code) | none "
                   "(the paper's literal sum; MW-Net's noisy-label script)",
    "meta_lr": "Adam learning rate of the meta-network g_phi (see --meta-lr-per)",
    "meta_lr_per": "what --meta-lr is per: meta-step (Adam's lr is --meta-lr) | step (per classifier "
                   "step: Adam's lr is --meta-lr x the classifier steps between two meta steps, K, so "
                   "phi may move as far per epoch at any K)",
    "meta_wd": "weight decay (L2, as torch's Adam) of the meta-network g_phi's optimizer; MW-Net's own weight "
               "net (--method mwn) keeps its published 1e-4",
    "meta_bound": "bound g_phi's logit to (-c, c) by c * tanh(logit / c), so the normalised weights w / mean w "
                  "stay within a ratio of e^c of each other (sigmoid(c) / sigmoid(-c)); 0: unbounded",
    "meta_logit": "free (g_phi's logit as the network gives it) | centred (minus its mean over the batch, so "
                  "the weights cannot all sink into sigmoid's exponential tail, where w / mean w is a softmax)",
    "meta_lr_decay": "T > 0: Adam's lr of our meta-network times min(1, T / n) at its n-th meta step, so that a long "
                     "run's phi travels little further than a run of T meta steps (MW-Net keeps its published "
                     "constant lr); 0: constant",
    "split_lr": "Adam learning rate of the splitter P_Theta",
    "hidden": "hidden units of the meta-network and the splitter",
    "meta_input": "what our meta-network g_phi sees: features+loss ([h(x), onehot(y)] and the sample's "
                  "detached loss) | features ([h(x), onehot(y)] only: before 2026-11-29; RESULTS "
                  "section 7)",
    "meta_init": "how g_phi's first layer starts: loss-first (with --meta-input features+loss: its "
                 "weights on h and y start at 0, so g_phi starts as a function of the loss alone) | "
                 "uniform (torch's default everywhere)",
    "warmup_epochs": "MOLERE: epochs on a random split before the splitter's",
    "resplit_every": "MOLERE: recompute the hard split every R epochs",
    "lambda_size": "weight of the splitter's size regularizer",
    "lambda_bal": "weight of the splitter's label-balance regularizer",
    "splitter_data": "val (CE and -l_val on a batch of the current S_val, as the paper's update) | all "
                     "(on a batch of S, the first study's reading)",
    "augment": "random crop and flip for training and validation batches",
    "arch": "wrn (Wide-ResNet --depth/--width/--dropout) | resnet32 (He et al.'s CIFAR ResNet-32, 0.46M "
            "parameters, as the class-skew and noise literature uses) | tv:NAME (a torchvision model, "
            "e.g. tv:resnet18, tv:resnet50, tv:vit_b_16)",
    "weights": "--arch tv:NAME: a local file with the model's pretrained state_dict (head included; the "
               "head is then replaced for the class count)",
    "imbalance": "class skew rho of the pool: n_c = n_max * rho^(-c/(C-1)), class 0 largest (1: as "
                 "given)",
    "noise": "label noise on the pool, fixed for every seed: none | uniform:p (to another class, "
             "uniformly) | pair:p (to the next class) | instance:p (Xia et al. 2020: whether and where "
             "a label moves depends on the image)",
    "meta_set": "split (S_val from S: the paper) | clean:N (N class-balanced images of S with their "
                "true labels) | outside:N (N class-balanced images of the source's training set beyond "
                "--train-subset, none of S: MW-Net's class-imbalance meta set) | folder:PATH "
                "(PATH/<class>/*, classes named as in training: images from outside S, the paper's "
                "Table 4): every reweighting method's fixed S_val but MOLERE's",
    "data_draw": "fixed (the synthetic images, subset, skew, noise and meta set drawn once, the same for every "
                 "seed: every study before 2026-12-07) | seed (drawn afresh from each training seed, so that "
                 "seeds vary the data as well)",
}


def build_parser():
    p = argparse.ArgumentParser(
        description="MOLERE / LRW reproduction (CVPR 2024). Defaults: the paper's CIFAR-100 "
                    "WRN-28-10 setting with the standard recipe.",
        formatter_class=Help)
    a = p.add_argument
    a("--method", default="all", help="erm | erm-tr (control) | lrw-random | lrw-easy | lrw-hard | molere | "
      "mwn | l2rw | erm-cb (baselines; erm-cb: ERM weighted by 1 / n_class) | erm-hard (control: ERM on "
      "LRW-Hard's S_tr) | all, or a comma list (all: every method but the baselines and erm-hard; ERM once per "
      "seed, reused for the train-twice margins)")
    a("--seeds", type=int, nargs="+", default=[0], help="training seeds; each repeats every method")
    a("--data-root", default="data", help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    a("--no-download", action="store_true", help="never try to download missing CIFAR files (without this flag: "
      "try torchvision's MD5-checked download)")
    for f in fields(Config):  # what defines a run's numbers: one flag per Config field
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # default on: the flag turns it off
            a("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
              help=f"turn off: {HELP[f.name]} (on without this flag)")
        elif isinstance(f.default, tuple):
            a(flag, type=float, nargs="+", default=list(f.default), help=HELP[f.name])
        else:
            a(flag, type=type(f.default), default=f.default, help=HELP[f.name])
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--compile", action="store_true", help="torch.compile the classifier's plain steps, evaluation and the fast "
      "meta step's look-ahead and JVP (dropout masks still replayed; eager, with one line, where compile fails)")
    a("--out", default="runs", help="folder for checkpoints and results.jsonl")
    a("--resume", action="store_true", help="continue runs from their checkpoints and skip finished ones (without "
      "this flag an existing checkpoint stops the command)")
    a("--eval-every", type=int, default=1, help="test accuracy in the log every N epochs (0: only at the end)")
    a("--tensorboard", action="store_true", help="also write each epoch's numbers (those of OUT/metrics.jsonl) as "
      "TensorBoard event files in OUT/tensorboard/METHOD-seedN; needs the tensorboard package")
    a("--stop-after", type=int, default=0, help="stop cleanly after N epochs in this invocation (0: never)")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--workers", type=int, default=None, help="--dataset folder:PATH: DataLoader processes that read images "
      "(default: 4, or fewer where this process may use fewer cores) "
      "(0: read in the main process)")
    a("--report", action="store_true", help="only print the results table of this config from OUT, train nothing")
    a("--no-table", action="store_true", help="do not print the results table at the end (tools/schedule.py prints it "
      "once for all its runs)")
    p.error = lambda msg: fail(msg)  # one clear line, not a usage dump
    return p


def fail(msg):
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: every process meets the same bad input; one line
        print(f"molere.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def join_torchrun(args, cfg):
    """Under torchrun (WORLD_SIZE > 1), join the process group (NCCL on GPUs, gloo on the CPU) and
    return this process's device: cuda:LOCAL_RANK, or the CPU. Each process takes its 1/N share
    of every batch (molere_world.my_share); only rank 0 prints and writes. None in a plain run."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n == 1:
        return None
    if cfg.batch_size % n:
        raise ConfigError(f"--batch-size {cfg.batch_size} must split evenly over the {n} torchrun processes")
    if cfg.meta_grad != "fast":
        raise ConfigError("--meta-grad reference runs in one process only (its G is not all-reduced)")
    gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")
    spread_over()  # each run over all the processes torchrun started
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def plan_of(method):
    """--method all (the paper's methods and the control), one method, or a comma list."""
    return list(ALL) if method == "all" else [m for m in METHODS if m in method.split(",")]


def check_checkpoints(cfg, rt, plan, seeds):
    """Existing checkpoints of the plan, before any step: each needs --resume and this config."""
    for seed in seeds:
        for m in plan:
            path = checkpoint_path(rt, cfg, m, seed)
            if has_checkpoint(path):
                if not rt.resume:
                    raise UserError(f"{path} exists: pass --resume to continue it, or use another --out")
                read_checkpoint(path, config_record(cfg))


def with_flags(argv, fix):
    """The command line `argv` with each flag of `fix` set to its value (replaced, or added)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in fix:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out + [str(part) for k, v in fix.items() for part in (k, v)]


def same_data(ckpt, path, data):
    """The checkpoint, if the data it was trained on is the data here (its fingerprint; a
    checkpoint from before fingerprints passes); else one line naming what changed, before
    anything is trained or written."""
    changed = [part for part, h in (ckpt.get("data") or {}).items() if data.fingerprint.get(part) != h
               and not (part == "the label noise" and data.noisy is None)]  # no noise: the labels' change says it
    if changed:
        raise UserError(f"{path}: {', '.join(changed)} changed since this run was checkpointed; nothing was "
                        f"overwritten: restore the data, or start afresh with another --out")
    return ckpt


def finished_erm(cfg, rt, seed, data, budget):
    """The ERM model of this config and seed, for the train-twice margins (trained if needed),
    and its result record if it was trained here."""
    path = checkpoint_path(rt, cfg, "erm", seed)
    with lock(path, wait=f"[erm seed {seed}] waiting for another process that trains it ({path}.lock)"):
        ckpt = same_data(read_checkpoint(path, config_record(cfg)), path, data) if has_checkpoint(path) else None
        if agree(ckpt is not None and ckpt["epoch"] == cfg.epochs):
            run = Run(cfg, "erm", seed, data, rt.device)
            run.model.load_state_dict((ckpt or read_checkpoint(path, config_record(cfg)))["model"])
            return run.model, None
        run, result = train_run(cfg, replace(rt, resume=True), "erm", seed, data,  # continue a partial one
                          initial_split("erm", data, cfg.delta, seed), budget)
        return run.model, result


def run_plan(cfg, rt, plan, seeds, data, budget, load=None):
    """Every (method, seed) of the plan, finished runs skipped; each seed's ERM model reused for
    the train-twice margins; a lock per run, so that a plan launched twice trains each run once.
    Under --data-draw seed each seed trains on its own draw of the data (`load(seed)`)."""
    results_path = os.path.join(rt.out, "results.jsonl")
    done = agree({(r["method"], r["seed"]) for r in read_results(results_path, config_hash(cfg))} if rt.resume else set())
    budget.todo = cfg.epochs * sum((m, s) not in done for s in seeds for m in plan)  # less what resumes
    for seed in seeds:
        erm_model = None
        if cfg.data_draw == "seed" and seed != seeds[0] and any((m, seed) not in done for m in plan):
            data = load(seed)
        for method in plan:
            if (method, seed) in done:
                print(f"[{method} seed {seed}] finished earlier, result in {results_path}")
                continue
            if method in NEEDS_ERM and erm_model is None:
                erm_model, result = finished_erm(cfg, rt, seed, data, budget)
                if result is not None and ("erm", seed) not in done and rank() == 0:
                    append_result(results_path, result)
                    done.add(("erm", seed))
            val_mask = initial_split(method, data, cfg.delta, seed, erm_model)
            path = checkpoint_path(rt, cfg, method, seed)
            with lock(path) as mine:
                busy = not mine or (method, seed) in {(r["method"], r["seed"]) for r in
                                                      read_results(results_path, config_hash(cfg))}
                if agree(busy or (has_checkpoint(path) and not rt.resume)):
                    print(f"[{method} seed {seed}] trained by another process{' (finished)' if busy and mine else ''};"
                          f" skipped here, rerun with --resume to continue or report it", flush=True)
                    continue
                run, result = train_run(cfg, rt, method, seed, data, val_mask, budget)
                if rank() == 0:
                    append_result(results_path, result)
                    with contextlib.suppress(FileNotFoundError):  # the record is written: the spare goes
                        os.remove(path + ".prev")
            if method == "erm":
                erm_model = run.model
            done.add((method, seed))
            print(f"[{method} seed {seed}] test accuracy {result['test_acc']:.2f}% "
                  f"({result['wall_time_s']:.0f}s)", flush=True)


def model_name(cfg):
    return {"wrn": f"WRN-{cfg.depth}-{cfg.width}", "resnet32": "ResNet-32"}.get(cfg.arch, cfg.arch)


def setup(argv=None):
    """Everything checked before any work: the flags (Config), then the data, the split sizes,
    existing checkpoints and --out. Returns (args, cfg, rt, data); bad input ends in one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        problems, cfg = [], None
        try:
            cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
            problems += model_problems(cfg, image_side(cfg))
        except ConfigError as e:
            problems.append(str(e))
        plan = plan_of(args.method)
        unknown = [m for m in args.method.split(",") if m not in [*METHODS, "all"]]
        if unknown or ("all" in args.method.split(",") and args.method != "all"):
            problems.append(f"unknown --method {args.method!r}: choose from {', '.join([*METHODS, 'all'])}, "
                            f"or a comma list of methods")
        if cfg and cfg.meta_set != "split" and set(NEEDS_ERM) & set(plan):
            problems.append(f"--meta-set {cfg.meta_set} fixes S_val, so LRW-Easy and LRW-Hard have no split to "
                            f"choose: run erm,erm-tr,lrw-random,mwn,l2rw,molere")
        if min(args.seeds) < 0:
            problems.append(f"--seeds must be non-negative, got {args.seeds}")
        if args.device != "auto" and not args.device.startswith(("cpu", "cuda")):
            problems.append(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
        elif args.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"--device {args.device} asked for, but torch sees no CUDA device")
        if args.tensorboard and tensorboard_writer is None:
            problems.append("--tensorboard needs the tensorboard package, which requirements.txt leaves out: "
                            "pip install tensorboard (or leave the flag off: OUT/metrics.jsonl has the same numbers)")
        cores = len(os.sched_getaffinity(0))
        if args.workers is None:
            args.workers = min(4, cores)
        elif args.workers < 0:
            problems.append(f"--workers must be non-negative, got {args.workers}")
        elif args.workers > cores and cfg and cfg.dataset.startswith("folder:"):
            warnings.filterwarnings("ignore", message="This DataLoader will create")  # said here, once
            print(f"--workers {args.workers}: more reading processes than the {cores} cores this process may use; "
                  f"as asked", flush=True)
        if problems:
            raise ConfigError("; ".join(problems))
        if args.threads:
            torch.set_num_threads(args.threads)
        device = join_torchrun(args, cfg) or torch.device(args.device if args.device != "auto" else
                                                          ("cuda" if torch.cuda.is_available() else "cpu"))
        rt = Runtime(device, args.out, args.resume, args.compile, args.eval_every, args.tensorboard)
        if args.report:
            return args, cfg, rt, None
        if cfg.weights:  # a file that does not fit the model: refused now, not at the first run
            load_torchvision(cfg.arch[3:], cfg.weights)
        data = load_data(cfg, device, args.data_root, not args.no_download, args.workers, args.seeds[0])
        problems, fix = fit_problems(cfg, plan, data)
        if problems:
            raise ConfigError(f"{'; '.join(problems)} ({len(data.y)} training images, {data.classes} classes). "
                              f"This would fit: python molere.py {' '.join(with_flags(argv, fix))}")
        check_checkpoints(cfg, rt, plan, args.seeds)
        make_writable_folder(rt.out, "--out")
    except (UserError, ConfigError) as e:
        fail(str(e))
    return args, cfg, rt, data


def interrupt(signum, frame):
    raise KeyboardInterrupt  # `kill` (SIGTERM) ends a run like Ctrl-C: checkpoints kept, one message


def main(argv=None, handle_sigterm=False):
    args, cfg, rt, data = setup(argv)
    results_path = os.path.join(rt.out, "results.jsonl")
    if args.report:
        print(report_table(read_results(results_path, config_hash(cfg)), cfg.dataset))
        return
    if handle_sigterm:
        signal.signal(signal.SIGTERM, interrupt)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"{cfg.dataset}: {len(data.y)} training / {len(data.y_test)} test images, {data.classes} classes; "
          f"{model_name(cfg)} on {device_name(rt.device)}{f' x {world()} processes' if world() > 1 else ''}; "
          f"config {config_hash(cfg)}; "
          f"results -> {results_path}", flush=True)
    try:
        run_plan(cfg, rt, plan_of(args.method), args.seeds, data, EpochBudget(args.stop_after),
                 lambda seed: load_data(cfg, rt.device, args.data_root, not args.no_download, args.workers, seed))
    except (UserError, ConfigError) as e:
        fail(str(e))
    except StopAfter:
        print(f"stopped after {args.stop_after} epoch(s) (--stop-after); continue with --resume", flush=True)
        return
    except KeyboardInterrupt:
        if rank() == 0:
            print(f"\ninterrupted: every finished epoch is checkpointed in {rt.out}; "
                  f"rerun the same command with --resume to continue", file=sys.stderr)
        sys.exit(130)
    if not args.no_table:
        print(report_table(read_results(results_path, config_hash(cfg)), cfg.dataset))
    if world() > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(handle_sigterm=True)
