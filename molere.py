"""
MOLERE: learned reweighting with a hard validation set, one readable file.

Reference reproduction of Jain, Suggala, Shenoy, "Improving Generalization via
Meta-Learning on Hard Samples" (CVPR 2024). Three levels (METHOD.md):
  inner   classifier f_theta, trained on S_tr with per-sample weights w_i = g_phi(x_i, y_i)
  middle  meta-network g_phi, trained so that the loss on S_val after a look-ahead falls
  outer   splitter P_Theta(val | x, y), which makes S_val the hardest delta-fraction of S
Train-twice variants (LRW-Easy/Random/Hard) fix S_val from an ERM model's margins instead.

    python molere.py --dataset synthetic --depth 10 --width 2 --epochs 10   # CPU demo
    python molere.py --dataset cifar100 --data-root data --seeds 0 1 2     # the paper setting
    python molere.py --help

The file is the method and only the method, in the order a run executes: what each method
is (METHODS), config, the Wide-ResNet, weight nets and splitter, the look-ahead meta-gradient
(METHOD.md §7's weight_grad_fast / weight_grad_reference), the steps of one training step, each
returning what the next needs, the loop over them (`train_steps`), the splits, and the MOLERE
loop (`train`). Beside it: the pool S, the test split, the meta set and `Data.batch` in
molere_data.py; one run over several processes (torchrun) in molere_world.py; the command line,
the plan, checkpoints and result records in molere_cli.py; files, config checks and the other
classifiers (ResNet-32, torchvision) in molere_io.py; the results table in molere_report.py; the
fused weighted cross-entropy in kernels/. Equation -> function -> test: METHOD.md.
"""
import contextlib
import functools
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # E3's fused Triton kernel: molere_kernels once installed (pip install -e .), kernels/ in a checkout
    from molere_kernels import weighted_cross_entropy
except ImportError:
    try:
        from kernels import weighted_cross_entropy
    except ImportError:  # molere.py copied alone: the same numbers in plain torch
        def weighted_cross_entropy(logits, labels, weights, return_losses=False):
            """mean_i w_i l_i and (with return_losses) the per-sample losses l_i, fp32 and detached."""
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
            loss = (weights.float() * losses).mean()
            return (loss, losses.detach()) if return_losses else loss
try:  # one run over several processes (torchrun)
    from molere_world import my_share, world, world_mean, world_sum, wrap
except ImportError:  # molere.py copied alone: one process
    my_share = world_mean = world_sum = lambda t: t
    world = lambda: 1
    wrap = lambda model, device: model

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")  # noise from torch.func

# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Method:
    """What a method is, in one row (METHOD.md §§1-4 and 8):
    split       where S_val comes from: none (S_tr = S) | random (a seeded delta-split) | low-margin /
                high-margin (the delta-fraction of lowest / highest margin under a finished ERM model
                of the same seed) | splitter (random for the warm-up, then the splitter's hard split);
                under --meta-set clean:N every split but none and splitter is the clean set
    weights     none (w = 1) | features (g_phi on [h(x), y]) | loss (MW-Net's net on the loss) |
                l2rw (no network: from the per-sample meta-gradient, every step) | class (no
                meta level: the prior w = 1 / n_y, n_c the class counts of S_tr)
    every_step  a meta step on every classifier step (MW-Net's and L2RW's schedule), else every K
    role        "" for the paper's methods; control or baseline in tables"""
    split: str
    weights: str
    every_step: bool = False
    role: str = ""
    meta_wd: float = 0.0  # weight decay of the meta optimizer (MW-Net's published code: 1e-4)

    @property
    def reweights(self):  # a learned weight: a meta level to run
        return self.weights not in ("none", "class")


METHODS = {
    "erm": Method("none", "none"),
    "erm-tr": Method("random", "none", role="control"),  # ERM on LRW-Random's S_tr: what holding out costs
    "lrw-random": Method("random", "features"),
    "lrw-easy": Method("high-margin", "features"),
    "lrw-hard": Method("low-margin", "features"),
    "molere": Method("splitter", "features"),
    "mwn": Method("random", "loss", every_step=True, role="baseline", meta_wd=1e-4),  # Shu et al. 2019
    "l2rw": Method("random", "l2rw", every_step=True, role="baseline"),  # Ren et al. 2018
    "erm-cb": Method("none", "class", role="baseline"),  # class-balanced ERM: does a meta level beat the prior?
    "erm-hard": Method("low-margin", "none", role="control"),  # ERM on LRW-Hard's S_tr (RESULTS 9.2's control)
}
NEEDS_ERM = [m for m, spec in METHODS.items() if spec.split.endswith("margin")]  # train-twice: ERM first


@dataclass(frozen=True)
class Config:
    """Everything that defines a run's numbers, and nothing else (where and how a run executes
    is apart, in molere_cli.Runtime). Defaults: the paper's CIFAR-100 / WRN-28-10 setting with the
    standard recipe. Stored with every checkpoint and result (molere_cli.config_record); every
    field is a CLI flag, its full help in molere_cli.HELP (python molere.py --help)."""
    dataset: str = "cifar100"  # synthetic[:N[:SIDE]] | spurious | cifar10 | cifar100 | packed | folder:PATH
    image_size: int = 224  # folder:PATH: the side of the images the network sees
    train_subset: int = 0  # a fixed class-balanced subset of S of this size (0: all of S)
    # classifier: Wide-ResNet and the standard CIFAR recipe (METHOD.md §6)
    depth: int = 28  # Wide-ResNet depth, 6n+4
    width: int = 10  # Wide-ResNet widening factor k
    dropout: float = 0.3  # between the two convs of a block
    epochs: int = 200  # over the classifier's training split
    batch_size: int = 128  # classifier, validation and splitter batches
    lr: float = 0.1  # classifier SGD, also the look-ahead's alpha
    momentum: float = 0.9  # Nesterov
    wd: float = 0.0005  # classifier weight decay
    milestones: tuple = (0.3, 0.6, 0.8)  # fractions of epochs where the lr is scaled by gamma
    gamma: float = 0.2  # the lr's decay at each milestone
    # LRW and MOLERE
    delta: float = 0.1  # validation fraction, in (0, 0.5]
    K: int = 5  # phi and Theta every K classifier steps (E7)
    meta_steps_min: int = 540  # K lowered so a run makes at least this many meta steps
    meta_grad: str = "fast"  # fast (one JVP) | reference (create_graph)
    weight_norm: str = "batch"  # batch: w~ = w / mean w (E2) | none
    meta_lr: float = 0.001  # Adam's lr for g_phi, per meta_lr_per
    meta_lr_per: str = "step"  # step (x K, E7) | meta-step
    meta_wd: float = 0.0  # weight decay of g_phi's Adam (MW-Net's own net keeps its published 1e-4)
    meta_bound: float = 0.0  # g_phi's logit bounded to (-c, c) by c tanh(logit / c); 0: unbounded
    meta_logit: str = "free"  # free | centred (g_phi's logit minus its mean over the batch)
    meta_lr_decay: int = 0  # Adam's lr times min(1, T / n) at the n-th meta step; 0: constant
    split_lr: float = 0.001  # Adam's lr for P_Theta
    hidden: int = 100  # units of g_phi's and P_Theta's hidden layer
    meta_input: str = "features+loss"  # what g_phi sees: features+loss | features (E1)
    meta_init: str = "loss-first"  # loss-first (g_phi starts as a function of the loss) | uniform
    warmup_epochs: int = 25  # MOLERE: epochs on a random split first (E11)
    resplit_every: int = 5  # MOLERE: a new hard split every R epochs (E11)
    lambda_size: float = 1.0  # weight of R_size (E9)
    lambda_bal: float = 1.0  # weight of R_bal (E9)
    splitter_data: str = "val"  # val (the game terms on S_val, E9) | all
    augment: bool = True  # random crop and flip
    # the paper's other settings (its Tables 2 and 3) and the MW-Net baseline
    arch: str = "wrn"  # wrn | resnet32 | tv:NAME (torchvision)
    weights: str = ""  # tv:NAME: a local pretrained state_dict
    imbalance: float = 1.0  # class skew rho: n_c = n_max rho^(-c/(C-1))
    noise: str = "none"  # none | uniform:p | pair:p | instance:p, fixed for every seed
    meta_set: str = "split"  # split | clean:N | outside:N | folder:PATH (every method's S_val but MOLERE's)
    data_draw: str = "fixed"  # fixed (one draw of subset, skew, noise, meta set for every seed) | seed

    def __post_init__(self):  # numbers as the CLI gives them, so Config(dropout=0) is Config(dropout=0.0)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        bad = config_problems(self)  # every value no run can use, together in one line
        if bad:
            raise ConfigError("; ".join(bad))


class ConfigError(ValueError):
    """Config values that no run can use (the command line prints them as one line, exit 2)."""


DATASETS = ("synthetic", "spurious", "cifar10", "cifar100", "packed")  # packed: tools/pack.py's CIFAR-10 subset


def synthetic_size(dataset):
    """--dataset synthetic[:N[:SIDE]] -> (training images, test images, side): the demo set's 2,000 / 1,000
    at 32 x 32; N training images (and CIFAR's 10,000 test images) at SIDE pixels. None for anything else
    or a malformed one (N >= 100 and SIDE >= 8 digits only)."""
    kind, *size = dataset.split(":")
    if kind != "synthetic" or len(size) > 2 or not all(q.isdigit() for q in size):
        return None
    if not size:
        return 2000, 1000, 32
    n, side = int(size[0]), int(size[1]) if len(size) == 2 else 32
    return (n, 10_000, side) if n >= 100 and side >= 8 else None


def image_side(cfg):
    """The side of the images the classifier sees: --image-size for a folder, SIDE for synthetic:N:SIDE,
    32 for CIFAR and the built-in sets."""
    if cfg.dataset.startswith("folder:"):
        return cfg.image_size
    return (synthetic_size(cfg.dataset) or (0, 0, 32))[2]


def config_problems(cfg):
    """Every value of a Config that no run can use, one line each (none: fine), whatever the data.
    What only torchvision can tell (a tv:NAME model and its smallest input) is checked where the
    model is built (molere_io.model_problems); what only the data can tell, where the run is set up
    (molere_cli.fit_problems)."""
    flag = lambda name: "--" + name.replace("_", "-")

    def number(text):
        with contextlib.suppress(ValueError):
            return float(text)

    choice = lambda name, allowed: (getattr(cfg, name) in allowed, f"{flag(name)} must be "
                                    f"{' or '.join(allowed)}, got {getattr(cfg, name)!r}")
    noise, _, p = cfg.noise.partition(":")
    meta, _, n = cfg.meta_set.partition(":")
    kind = cfg.dataset.split(":")[0]
    checks = [
        (cfg.dataset in DATASETS or kind == "folder" and len(cfg.dataset) > 7 or synthetic_size(cfg.dataset),
         f"unknown --dataset {cfg.dataset!r}: choose from {', '.join(DATASETS)}, synthetic:N[:SIDE] (N >= 100 "
         f"images, SIDE >= 8 pixels) or folder:PATH"),
        (cfg.image_size >= 16, f"--image-size must be at least 16, got {cfg.image_size}"),
        (0 < cfg.delta <= 0.5, f"--delta must be in (0, 0.5], got {cfg.delta}"),
        (cfg.K >= 1, f"--K must be at least 1, got {cfg.K}"),
        choice("meta_grad", ("fast", "reference")), choice("weight_norm", ("batch", "none")),
        choice("splitter_data", ("val", "all")), choice("data_draw", ("fixed", "seed")),
        (cfg.arch in ("wrn", "resnet32") or cfg.arch.startswith("tv:") and len(cfg.arch) > 3,
         f"--arch must be wrn, resnet32 or tv:NAME (a torchvision classification model), got {cfg.arch!r}"),
        (not cfg.weights or cfg.arch.startswith("tv:"), "--weights is for --arch tv:NAME only"),
        choice("meta_input", ("features", "features+loss")), choice("meta_lr_per", ("meta-step", "step")),
        choice("meta_init", ("uniform", "loss-first")), choice("meta_logit", ("free", "centred")),
        (cfg.depth >= 10 and (cfg.depth - 4) % 6 == 0,
         f"--depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {cfg.depth}"),
        *((getattr(cfg, k) >= 1, f"{flag(k)} must be at least 1, got {getattr(cfg, k)}")
          for k in ("width", "epochs", "batch_size", "resplit_every", "hidden")),
        (cfg.meta_steps_min >= 0, f"--meta-steps-min must be 0 (off) or more, got {cfg.meta_steps_min}"),
        (cfg.meta_lr_decay >= 0, f"--meta-lr-decay must be 0 (off) or more, got {cfg.meta_lr_decay}"),
        *((0 < getattr(cfg, k) < math.inf, f"{flag(k)} must be a finite positive number, got {getattr(cfg, k)}")
          for k in ("lr", "meta_lr", "split_lr")),
        (0 <= cfg.momentum < 1 and 0 <= cfg.wd < math.inf and 0 < cfg.gamma <= 1,
         "--momentum must be in [0, 1), --wd finite and non-negative, --gamma in (0, 1]"),
        (all(0 < m <= 1 for m in cfg.milestones),
         f"--milestones are fractions of --epochs, each in (0, 1], got {list(cfg.milestones)}"),
        (0 <= cfg.meta_wd < math.inf and 0 <= cfg.meta_bound < math.inf,
         "--meta-wd and --meta-bound must be finite and non-negative"),
        (0 <= cfg.lambda_size < math.inf and 0 <= cfg.lambda_bal < math.inf,
         "--lambda-size and --lambda-bal must be finite and non-negative"),
        (0 <= cfg.dropout < 1 and cfg.warmup_epochs >= 0 and cfg.train_subset >= 0,
         "--dropout must be in [0, 1); --warmup-epochs and --train-subset non-negative"),
        (1 <= cfg.imbalance < math.inf, f"--imbalance is a ratio n_max / n_min, at least 1, got {cfg.imbalance}"),
        (cfg.noise == "none" or (noise in ("uniform", "pair", "instance") and 0 < (number(p) or 0) < 1),
         f"--noise must be none, uniform:p, pair:p or instance:p with p in (0, 1), got {cfg.noise!r}"),
        (cfg.meta_set == "split" or (meta in ("clean", "outside") and n.isdigit() and int(n) > 0) or
         (meta == "folder" and n),
         f"--meta-set must be split, clean:N or outside:N with N >= 1, or folder:PATH, got {cfg.meta_set!r}"),
        (meta != "folder" or kind == "folder",
         "--meta-set folder:PATH needs --dataset folder:PATH (its images are read and transformed alike)"),
        (meta != "outside" or kind != "folder",
         "--meta-set outside:N draws from a built-in set's training images; for a folder, use folder:PATH"),
    ]
    return [message for ok, message in checks if not ok]

def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

# ----------------------------------------------------------------------------- Wide-ResNet


class Block(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 + shortcut."""

    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        self.dropout = dropout

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.dropout(F.relu(self.bn2(y)), self.dropout, self.training))
        return y + (x if self.short is None else self.short(o))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis): 3 groups of (depth-4)/6 blocks, widths 16k/32k/64k.
    forward returns (logits, penultimate features h); h feeds the meta-network and splitter."""

    def __init__(self, depth=28, width=10, classes=100, dropout=0.3):
        super().__init__()
        n, cin, blocks = (depth - 4) // 6, 16, []
        for i, stride in enumerate((1, 2, 2)):
            for j in range(n):
                blocks.append(Block(cin, 16 * width * 2 ** i, stride if j == 0 else 1, dropout))
                cin = 16 * width * 2 ** i
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)
        self.features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.conv(x)))).mean((2, 3))
        return self.fc(h), h


def make_model(cfg, classes):
    """f_theta: the Wide-ResNet, or (--arch) one of the other classifiers, which live beside the method
    in molere_io.py: ResNet-32 and any torchvision model."""
    if cfg.arch == "wrn":
        return WideResNet(cfg.depth, cfg.width, classes, cfg.dropout)
    from molere_io import other_classifier
    return other_classifier(cfg, classes, image_side(cfg))


@torch.no_grad()
def predict(model, data, x, chunk=1000, forward=None):
    """Eval mode, no augmentation: logits (fp32) and features for every image of x, through
    `forward` (a run's: Run.forward) or the model itself."""
    was_training = model.training
    model.eval()
    outs, feats = [], []
    for i in range(0, len(x), chunk):
        with autocast(x.device):
            o, h = (forward or model)(data.batch(slice(i, i + chunk), False, x))
        outs.append(o.float())
        feats.append(h.float())
    model.train(was_training)
    return torch.cat(outs), torch.cat(feats)


def accuracy(logits, y):
    """Top-1 accuracy in percent."""
    return float((logits.argmax(1) == y).float().mean() * 100)


def margins(logits, y):
    """Probabilistic margin PM(x, y) = p_y(x) - max_{k != y} p_k(x), in [-1, 1] (METHOD.md §3)."""
    p = logits.float().softmax(1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    return p_y - p.scatter(1, y[:, None], -1.0).max(1).values

# ----------------------------------------------------------------------------- meta-network, splitter


class SampleNet(nn.Module):
    """A score for one labelled sample (x, y): an MLP on [LayerNorm(h(x)), onehot(y)], where
    h(x) is the classifier's penultimate feature vector, detached. Our interpretation of the
    paper's "rich function of (x, y)": it sees the image through the classifier's current
    representation at the cost of a tiny MLP, and, being detached, it does not depend on theta
    in the graph, which the fast meta-gradient needs. `extra` trailing columns of h (the
    sample's loss, --meta-input features+loss) enter as they are, not normalised. Returns a
    logit; two instances:
      meta-network  g_phi(x, y)           = sigmoid(logit), the instance weight in (0, 1)
      splitter      P_Theta(val | x, y)   = sigmoid(logit)"""

    def __init__(self, features, classes, hidden, p0=0.5, extra=0, init="uniform", bound=0.0, centred=False):
        super().__init__()
        self.features, self.classes, self.extra, self.bound, self.centred = features, classes, extra, bound, centred
        self.net = nn.Sequential(nn.Linear(features + extra + classes, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        nn.init.constant_(self.net[2].bias, math.log(p0 / (1 - p0)))  # start at sigmoid = p0
        if init == "loss-first" and extra:  # start on the extra columns alone; h and y enter as phi learns
            with torch.no_grad():
                self.net[0].weight[:, :features].zero_()
                self.net[0].weight[:, features + extra:].zero_()

    def forward(self, h, y):
        dtype = self.net[0].weight.dtype  # tiny: runs in its own dtype, never autocast
        with torch.autocast(h.device.type, enabled=False):
            h = h.detach().to(dtype)
            feats, extra = h[:, :self.features], h[:, self.features:]
            z = [F.layer_norm(feats, feats.shape[1:]), extra, F.one_hot(y, self.classes).to(dtype)]
            logit = self.net(torch.cat(z, 1)).squeeze(1)
            if self.centred:  # --meta-logit centred: the batch's mean logit is 0, so w / mean w is no softmax
                logit = logit - world_mean(logit.mean())
            return self.bound * torch.tanh(logit / self.bound) if self.bound else logit  # --meta-bound


class LossNet(nn.Module):
    """Meta-Weight-Net's weight net (--method mwn): an MLP 1-hidden-1 on the detached per-sample
    loss, called like SampleNet as net(h, y) with h = the loss column; y is not used."""

    def __init__(self, hidden=100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, h, y):
        with torch.autocast(h.device.type, enabled=False):
            return self.net(h.detach().to(self.net[0].weight.dtype)).squeeze(1)


def meta_input(run, h, logits, y):
    """What g_phi sees: the features h (SampleNet), with --meta-input features+loss the per-sample
    loss as a last column too, or for MW-Net the loss alone; detached either way, so w does not
    depend on theta in the graph and the fast meta-gradient holds."""
    if run.spec.weights != "loss" and not getattr(run.meta, "extra", 0):
        return h
    loss = F.cross_entropy(logits.detach().float(), y, reduction="none")[:, None]
    return loss if run.spec.weights == "loss" else torch.cat([h, loss.to(h.dtype)], 1)


def kl(p, q, eps=1e-12):
    """KL(p || q) over the last axis; 0 log 0 = 0, so classes with p = 0 contribute nothing."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(eps))).sum(-1)


def splitter_game_terms(logit, correct, losses):
    """The two terms of the min-max game, with soft membership p_i = P_Theta(val | x_i, y_i):
         fit   = CE(P_Theta(train | x, y), 1[y_hat = y])   wrong -> val, right -> train
         l_val = sum_i p_i l_i / sum_i p_i                  the validation loss the splitter ascends"""
    p = torch.sigmoid(logit)
    fit = F.binary_cross_entropy_with_logits(-logit, correct.float())  # logit of P(train) = -logit
    return fit, (p * losses).sum() / p.sum()


def splitter_regularizers(logit, y, delta, classes):
    """R_size = KL([delta, 1-delta] || [mean p, 1 - mean p]) and
    R_bal = KL(P(y) || P(y | val)) + KL(P(y) || P(y | train)), P(y) the batch's label distribution.
    The label distributions run over ALL `classes` (one-hot, vectorised): classes absent from
    the batch have P(y) = 0 and add 0, instead of the NaN of counting only present labels."""
    p = torch.sigmoid(logit)
    mean_p = p.mean()
    r_size = kl(torch.stack([torch.tensor(delta, device=p.device), torch.tensor(1 - delta, device=p.device)]),
                torch.stack([mean_p, 1 - mean_p]))
    onehot = F.one_hot(y, classes).float()
    prior = onehot.mean(0)
    in_val = (p[:, None] * onehot).sum(0) / p.sum()
    in_train = ((1 - p)[:, None] * onehot).sum(0) / (1 - p).sum()
    return r_size, kl(prior, in_val) + kl(prior, in_train)


def splitter_loss(logit, correct, losses, y, delta, classes, lambda_size, lambda_bal, game=slice(None),
                  reg=slice(None)):
    """METHOD.md §2, the splitter's objective (E9), all four terms:
       fit - l_val + lambda_size * R_size + lambda_bal * R_bal   (see the two functions above)
    with the game terms on the batch's `game` part and the regularizers on its `reg` part (the
    run: S_val images and images of all S; by default both are the whole batch)."""
    fit, l_val = splitter_game_terms(logit[game], correct[game], losses[game])
    r_size, r_bal = splitter_regularizers(logit[reg], y[reg], delta, classes)
    loss = fit - l_val + lambda_size * r_size + lambda_bal * r_bal
    return loss, dict(fit=fit.detach(), l_val=l_val.detach(), r_size=r_size.detach(), r_bal=r_bal.detach())


def per_class_k(counts, delta):
    """How many of a class's n_c samples go to the validation split: round(delta * n_c), at
    least 1 and at most n_c - 1."""
    return torch.minimum((counts * delta).round().long().clamp(min=1), counts - 1).clamp(min=0)


def per_class_topk(scores, labels, delta, classes):
    """Boolean mask of the validation split: within each class c with n_c samples, the
    k_c = round(delta * n_c) samples of highest score (at least 1, at most n_c - 1), so the
    split has an exact size, exact label balance and is never empty. Used with splitter
    scores (MOLERE), -margin (LRW-Hard), margin (LRW-Easy) and random scores."""
    counts = torch.bincount(labels, minlength=classes)
    k = per_class_k(counts, delta)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # by class, then by score
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels), device=labels.device) - start[labels[order]]
    return rank < k[labels]

# ---------------------------------------------------------- the look-ahead meta-gradient (METHOD.md §§1, 7)


def cloned_buffers(model):
    """Copies of the BatchNorm running statistics: look-ahead and validation forwards update
    these copies, never the real ones."""
    return {n: b.clone() for n, b in model.named_buffers()}


def rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng(state, device):
    """Put the RNG back as `rng_state` took it (a replay; a resumed run)."""
    torch.set_rng_state(state[0])
    if state[1] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def replay_rng(state, device):
    """Run a block with the RNG as it was at `state` (same dropout masks), then restore."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_rng(state, device)
        yield


def per_sample_losses(model, params, x, y):
    """l_i at the given parameters, BatchNorm statistics on copies. Works with any classifier
    whose forward returns logits or a tuple that starts with them. Attention (a ViT's) runs its
    plain math kernel: the fused ones have no forward-mode or double-backward derivative."""
    with sdpa_kernel(SDPBackend.MATH):
        out = functional_call(model, {**params, **cloned_buffers(model)}, (x,))
    logits = out[0] if isinstance(out, tuple) else out
    return F.cross_entropy(logits, y, reduction="none")  # fp32 under autocast


def loss_jvp(model, params, tangents, x, y):
    """(l(theta), a) with a_i = <grad_theta l_i(theta), tangents>: one forward-mode pass."""
    return jvp(lambda p: per_sample_losses(model, p, x, y), (params,), (tangents,))


def instance_weights(meta, h, y, weight_norm="batch"):
    """w~ of a batch: w_i = g_phi(x_i, y_i) = sigmoid(logit) in (0, 1); with weight_norm "batch"
    (METHOD.md §1) w~_i = w_i / mean_j w_j, differentiable in phi through the batch mean, so
    the classifier step and the look-ahead use the same w~ and the meta-gradient stays exact;
    "none": w~ = w, the raw weights."""
    return normalised(torch.sigmoid(meta(h, y)), weight_norm)


def normalised(w, weight_norm):
    return w / world_mean(w.mean()) if weight_norm == "batch" else w  # the mean over the whole batch


def fast_path(losses, loss_jvp):
    """METHOD.md §7's fast path over the two calls it spends its time in, the per-sample
    losses and their JVP: eager (`weight_grad_fast`) or through torch.compile
    (`compiled_fast_path`, --compile). `parts` holds the two."""

    def weight_grad_fast(model, x, y, grads, xv, yv, alpha, rng):
        """The core of every look-ahead reweighting method (METHOD.md §7), fast path: returns
        (L_val(theta'), g) with theta' = theta - alpha * G, G = grad_theta mean_j w~_j l_j(theta), and
             g_i = dL_val(theta') / dw~_i = -(alpha / B) a_i,   a_i = <grad_theta l_i(theta), v>,
        v = grad L_val(theta'). All B values a_i come from ONE forward-mode JVP of the per-sample
        loss vector l(theta) along v, replayed with the classifier step's dropout masks (`rng`).
        `grads` = G at the current w~, which the classifier step has just computed for the same
        batch (all zeros: theta' = theta, L2RW's w~ = 0), one entry per parameter of the model;
        parameters with requires_grad False (a frozen backbone) are constants, their entry unread.
        `model` is any module whose forward returns logits or a tuple that starts with them. Then
        for any weighting w~(phi) that does not depend on theta in the graph:
        dL_val/dphi = autograd.grad(w~, phi, grad_outputs=g).
        Under torchrun each process holds its share of both batches: v and L_val are averaged
        over the processes and B is the whole batch (`world_mean`, `world`: the identity and 1 in
        one process; copy them along, or drop them for one process)."""
        theta1 = {n: (p.detach() - alpha * g).requires_grad_()  # frozen parameters stay as they are
                  for (n, p), g in zip(model.named_parameters(), grads) if p.requires_grad}
        loss_val = losses(model, theta1, xv, yv).mean()
        v = [world_mean(t) for t in torch.autograd.grad(loss_val, list(theta1.values()))]  # torchrun: global
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        with replay_rng(rng, x.device):
            _, a = loss_jvp(model, params, dict(zip(params, v)), x, y)
        return world_mean(loss_val.detach()), -alpha * a / (len(y) * world())

    weight_grad_fast.parts = losses, loss_jvp
    return weight_grad_fast


weight_grad_fast = fast_path(per_sample_losses, loss_jvp)


@functools.cache
def compiled_fast_path():
    """--compile: the fast path with both of its calls through torch.compile, built once per
    process on first use (molere_io.Compiled: eager, after one line, where it cannot compile)."""
    from molere_io import Compiled
    return fast_path(Compiled(per_sample_losses), Compiled(loss_jvp))


def weight_grad_reference(model, x, y, w, xv, yv, alpha, rng):
    """The same (L_val(theta'), g) the direct way, at the given w~ (a vector of B numbers):
    functional_call + create_graph=True through theta' = theta - alpha * grad_theta mean_i w~_i l_i,
    then g = dL_val(theta') / dw~."""
    w = w.detach().requires_grad_()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # frozen: constants
    with replay_rng(rng, x.device):
        losses = per_sample_losses(model, params, x, y)
    grads = torch.autograd.grad((w * losses).mean(), list(params.values()), create_graph=True)
    theta1 = {n: p - alpha * g for (n, p), g in zip(params.items(), grads)}
    loss_val = per_sample_losses(model, theta1, xv, yv).mean()
    return loss_val.detach(), torch.autograd.grad(loss_val, w)[0]


def l2rw_weights(model, x, y, xv, yv, alpha, rng, weight_grad=weight_grad_fast):
    """Learning to Reweight (Ren et al. 2018; METHOD.md §8): with g from `weight_grad_fast` at
    w~ = 0 (so theta' = theta, G = 0), w_i = max(-g_i, 0) / sum_j max(-g_j, 0): the training
    points whose gradient agrees with the validation gradient, in proportion to the agreement.
    Returns (L_val, w), w summing to 1, or all zeros where no point agrees (that batch makes no
    update, as in its paper)."""
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    loss_val, g = weight_grad(model, x, y, zeros, xv, yv, alpha, rng)
    w = torch.relu(-g.float())
    return loss_val, w / world_sum(w.sum()).clamp_min(torch.finfo(w.dtype).tiny)  # sums to 1 over the batch

# ------------------------------------------------------------------------- one training step, in parts


def split_size(method, data, delta):
    """|S_val| of the split `initial_split` gives the method (every later split has the same size)."""
    split = METHODS[method].split
    if split == "none":
        return 0
    if data.meta_mask is not None and split != "splitter":
        return int(data.meta_mask.sum())
    return int(per_class_k(torch.bincount(data.y, minlength=data.classes), delta).sum())


def fit_problems(cfg, methods, data):
    """What of `cfg` does not fit this data for these methods, one line each, and flags that would fit,
    built from the data's size: ([lines], {flag: value}); ([], {}) when all fit. A warm-up that
    leaves MOLERE no epoch on its split; a batch larger than S_tr or S_val (every S_val a run draws
    from holds round(delta n_c) images of each class c, or the fixed meta set)."""
    problems, fix = [], {}
    if any(METHODS[m].split == "splitter" for m in methods) and cfg.warmup_epochs >= cfg.epochs:
        problems.append(f"--warmup-epochs {cfg.warmup_epochs} leaves MOLERE no epoch on the splitter's split "
                        f"(--epochs {cfg.epochs})")
        fix["--warmup-epochs"] = max(1, cfg.epochs // 4) if cfg.epochs > 1 else 0
    n = len(data.y)
    val = int(per_class_k(torch.bincount(data.y, minlength=data.classes), cfg.delta).sum())
    split = any(METHODS[m].split != "none" for m in methods)
    if cfg.batch_size > (min(val, n - val) if split else n):
        problems.append(f"--batch-size {cfg.batch_size} is larger than a split (train {n - val if split else n}"
                        f"{f', validation {val}' if split else ''} of {n} images)")
        fix["--batch-size"] = 2 ** int(math.log2(max(1, min(val, n - val) if split else n)))
    return problems, fix


def meta_every(cfg, spec, n_train):
    """E7, classifier steps per meta step (and splitter step): 1 for MW-Net and L2RW; else K,
    lowered where a run would make fewer than cfg.meta_steps_min meta steps (RESULTS section 8: the
    meta level needs a number of meta-gradients, not only a distance to move). The paper's CIFAR-100
    run (200 epochs of 351 steps) keeps K = 5 for any minimum up to 14,040 (the default is 540)."""
    if spec.every_step:
        return 1
    steps = cfg.epochs * (n_train // cfg.batch_size)
    return max(1, min(cfg.K, steps // cfg.meta_steps_min)) if cfg.meta_steps_min else cfg.K


def meta_lr(cfg, K, meta_steps=0):
    """E7, Adam's learning rate for phi: --meta-lr per classifier step (x K, so phi may move as far
    per epoch at any K) or per meta step; with --meta-lr-decay T, times min(1, T / n) at the n-th meta
    step (`meta_steps` made before it), so a long run moves phi little further than a run of T."""
    base = cfg.meta_lr * (K if cfg.meta_lr_per == "step" else 1)
    return base * min(1.0, cfg.meta_lr_decay / (meta_steps + 1)) if cfg.meta_lr_decay else base


class Run:
    """Everything one (method, seed) training run owns; checkpointed every epoch (STATE, the
    epoch, the step, S_val's mask and the RNG: molere_cli.py)."""
    STATE = ("model", "meta", "splitter", "opt", "sched", "opt_meta", "opt_split")

    def __init__(self, cfg, method, seed, data, device, compile=False):
        problems, fix = fit_problems(cfg, [method], data)
        if problems:
            raise ConfigError(f"{'; '.join(problems)}; this would fit: {' '.join(f'{k} {v}' for k, v in fix.items())}")
        torch.manual_seed(seed)
        self.method, self.seed, self.device, self.spec = method, seed, device, METHODS[method]
        self.model = make_model(cfg, data.classes).to(device)  # f_theta: the one handle to the classifier
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self._exact = wrap(self.model, device)  # torchrun: through DDP, which all-reduces G
        self._fast = torch.compile(self._exact) if compile else self._exact
        self.weight_grad = compiled_fast_path() if compile else weight_grad_fast  # E4-E5
        extra = int(cfg.meta_input == "features+loss")  # the loss as one more input column
        self.meta = (LossNet(cfg.hidden) if self.spec.weights == "loss" else  # g_phi
                     SampleNet(self.model.features, data.classes, cfg.hidden, extra=extra, init=cfg.meta_init,
                               bound=cfg.meta_bound, centred=cfg.meta_logit == "centred")
                     ).to(device)
        self.splitter = SampleNet(self.model.features, data.classes, cfg.hidden, p0=cfg.delta).to(device)  # P_Theta
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.wd, nesterov=cfg.momentum > 0)
        # milestones never at epoch 0; two that round to one epoch both decay there
        self.sched = torch.optim.lr_scheduler.MultiStepLR(
            self.opt, sorted(max(1, round(f * cfg.epochs)) for f in cfg.milestones), cfg.gamma)
        self.K = meta_every(cfg, self.spec, len(data.y) - split_size(method, data, cfg.delta))
        self.opt_meta = torch.optim.Adam(self.meta.parameters(), lr=meta_lr(cfg, self.K),
                                         weight_decay=self.spec.meta_wd if self.spec.weights == "loss" else cfg.meta_wd)
        self.opt_split = torch.optim.Adam(self.splitter.parameters(), lr=cfg.split_lr)
        self.val_mask = torch.zeros(len(data.y), dtype=torch.bool, device=device)  # ERM: S_tr = S
        self.prior = 1 / torch.bincount(data.y, minlength=data.classes).clamp(min=1).float()  # erm-cb: 1/n_c
        self.epoch = self.step = 0
        self.elapsed = 0.0
        self.log = []

    @property
    def reweights(self):
        return self.spec.reweights

    def forward(self, x, replay=False):
        """f_theta(x) -> (logits, h), as the loop and the evaluation run it: through DDP under
        torchrun and through torch.compile under --compile, except where a JVP must replay this
        forward's dropout masks (`replay`: eager)."""
        return (self._exact if replay else self._fast)(x)


class Step(NamedTuple):
    """What a classifier step hands to the rest of the step: the batch (x, y), what g_phi sees (z),
    the RNG state before the forward (for a JVP to replay its dropout masks; None if not kept),
    the logits, G (one entry per parameter, also left in p.grad for run.opt.step()), the raw
    weights w (L2RW: w~), the per-sample losses and, for L2RW, L_val."""
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    rng: tuple
    logits: torch.Tensor
    G: list
    w: torch.Tensor
    losses: torch.Tensor
    val_loss: torch.Tensor = None


def sample_weights(run, z, y):
    """E1, the raw weights w of a batch, constants for the classifier step: g_phi(x_i, y_i) on what
    g_phi sees (`z`, from `meta_input`), 1 / n_y for erm-cb (E17), 1 for ERM."""
    if run.spec.weights == "class":
        return run.prior[y]
    if not run.reweights:
        return torch.ones(len(y), device=run.device)
    with torch.no_grad():
        return instance_weights(run.meta, z, y, "none")


def classifier_grad(run, logits, y, w_tilde):
    """E3: G = grad_theta mean_i w~_i l_i of the batch through the fused kernel (kernels/). G is left
    in p.grad, where run.opt.step() reads it once any meta step (which needs theta as it is) is
    done, and returned, one entry per parameter (None where frozen), with the per-sample losses."""
    loss, losses = weighted_cross_entropy(logits, y, w_tilde, return_losses=True)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()  # torchrun: DDP all-reduces G here
    return [p.grad for p in run.model.parameters()], losses


def classify(run, x, replay):
    """The batch through f_theta (train mode), and the RNG state before it where a JVP will replay
    its dropout masks (`replay`), else None."""
    rng = rng_state(run.device) if replay else None
    with autocast(run.device):
        logits, h = run.forward(x, replay)
    return logits, h, rng


def classifier_step(run, cfg, x, y, replay=False):
    """E1-E3, inner level: w = g_phi(x, y) (1 for ERM; 1/n_y for erm-cb), w~ = w / mean w, and
    G = grad_theta mean_i w~_i l_i on the batch, w~ held constant. With `replay` the forward runs
    eagerly and its RNG state is kept for the meta step's JVP."""
    logits, h, rng = classify(run, x, replay)
    z = meta_input(run, h.detach(), logits, y)  # what g_phi sees
    w = sample_weights(run, z, y)  # E1
    G, losses = classifier_grad(run, logits, y, normalised(w, cfg.weight_norm))  # E2, E3
    return Step(x, y, z, rng, logits, G, w, losses)


def l2rw_step(run, cfg, x, y, data, val):
    """E14, L2RW: this batch's weights from its meta-gradient at w~ = 0 (`l2rw_weights`, the JVP
    replaying the forward's dropout masks, on a validation batch drawn after the forward), as
    w~ = B w, mean 1 over the batch (mean_i w~_i l_i = sum_i w_i l_i); then G at those weights."""
    logits, h, rng = classify(run, x, replay=True)
    xv, yv = validation_batch(data, val, cfg)
    with autocast(run.device):
        val_loss, w = l2rw_weights(run.model, x, y, xv, yv, run.opt.param_groups[0]["lr"], rng, run.weight_grad)
    w = w * len(y) * world()
    G, losses = classifier_grad(run, logits, y, w)
    return Step(x, y, h, rng, logits, G, w, losses, val_loss)


class ValSet(NamedTuple):
    """S_val as validation batches draw from it: images, labels and the positions that are S_val."""
    images: torch.Tensor
    labels: torch.Tensor
    at: torch.Tensor


def validation_set(run, data):
    """S_val: the run's mask over S, or for every method but MOLERE the fixed meta set (--meta-set;
    Data.x_meta), whatever its kind."""
    if data.y_meta is not None and run.spec.split != "splitter":
        return ValSet(data.x_meta, data.y_meta, torch.arange(len(data.y_meta), device=run.device))
    return ValSet(data.x, data.y, run.val_mask.nonzero().squeeze(1))


def validation_batch(data, val, cfg):
    """B images drawn with replacement from S_val (`validation_set`), augmented like training batches."""
    vi = my_share(val.at[torch.randint(len(val.at), (cfg.batch_size,), device=val.at.device)])
    return data.batch(vi, cfg.augment, val.images), val.labels[vi]


def meta_step(run, cfg, step, xv, yv):
    """E4-E6, middle level: phi <- Adam(phi, grad_phi L_val(theta'(phi))), with the look-ahead
    theta' = theta - alpha G at the classifier step's batch (`step`: its images, what g_phi saw,
    its RNG state, its G) and L_val on the validation batch (xv, yv):
        dL_val/dphi = sum_i g_i dw~_i/dphi,    g = dL_val(theta')/dw~ (E5),
    exact because w~ = g_phi(z, y) does not depend on theta in the graph. g by one JVP
    (`weight_grad_fast`, at the classifier step's G) or by create_graph (--meta-grad reference).
    The classifier update of this step still uses phi from before (one-step lag, README). Under
    torchrun each process holds its share of both batches: G and v are the whole batch's (DDP;
    `world_mean`), g_i is local, and the phi gradients are summed. Returns L_val(theta')."""
    x, y, z, rng, G = step.x, step.y, step.z, step.rng, step.G
    alpha = run.opt.param_groups[0]["lr"]
    with autocast(run.device):
        w_tilde = instance_weights(run.meta, z, y, cfg.weight_norm)  # E2, differentiable in phi
        if cfg.meta_grad == "fast":
            loss_val, g = run.weight_grad(run.model, x, y, G, xv, yv, alpha, rng)
        else:
            loss_val, g = weight_grad_reference(run.model, x, y, w_tilde, xv, yv, alpha, rng)
        phi = list(run.meta.parameters())
        for p, d in zip(phi, torch.autograd.grad(w_tilde, phi, grad_outputs=g.to(w_tilde.dtype))):
            p.grad = world_sum(d.float())  # torchrun: each process holds its share of the batch
    if cfg.meta_lr_decay and run.spec.weights == "features":  # our meta-network; MW-Net keeps its published lr
        run.opt_meta.param_groups[0]["lr"] = meta_lr(cfg, run.K, run.step // run.K)
    run.opt_meta.step()
    return loss_val


def splitter_step(run, data, cfg, val_idx):
    """E9: one update of Theta from ONE eval-mode forward of B images, scored like the split itself
    (no augmentation, so 'correct' and l_i are the classifier's clean verdicts):
      CE(P_Theta(train), 1[y_hat = y]) - l_val    on B/2 images of the current S_val (the paper's
                                                  update; --splitter-data all: on B images of S)
      lambda_size R_size + lambda_bal R_bal        on B/2 images drawn from all of S (all: the same B)
    Under torchrun every process makes this same step on the same B images (its terms are ratios
    and KLs of batch means, not sums), so Theta stays the same everywhere without communication.
    Returns the four terms."""
    B = cfg.batch_size
    if cfg.splitter_data == "all":
        idx = torch.randint(len(data.y), (B,), device=run.device)
        game = reg = slice(None)
    else:
        n_val = B - B // 2
        idx = torch.cat([val_idx[torch.randint(len(val_idx), (n_val,), device=run.device)],
                         torch.randint(len(data.y), (B // 2,), device=run.device)])
        game, reg = slice(None, n_val), slice(n_val, None)
    y = data.y[idx]
    logits, h = predict(run.model, data, data.x[idx], chunk=B, forward=run.forward)
    loss, terms = splitter_loss(run.splitter(h, y), logits.argmax(1) == y, F.cross_entropy(logits, y, reduction="none"),
                                y, cfg.delta, data.classes, cfg.lambda_size, cfg.lambda_bal, game, reg)
    run.opt_split.zero_grad(set_to_none=True)
    loss.backward()
    run.opt_split.step()
    return terms


def effective_batch(w):
    """n_eff = (sum_i w_i)^2 / sum_i w_i^2 over the whole batch (Kish's effective sample size): B for
    equal weights, k when k samples share the weight equally and the rest have none. The same for
    w and w~ = w / mean w, so it measures what the classifier step sees; 0 for an all-zero batch."""
    return world_sum(w.sum()) ** 2 / world_sum((w * w).sum()).clamp_min(torch.finfo(w.dtype).tiny)


def step_stats(stats, run, losses, w, val_loss, split_terms):
    """Each step's numbers for the epoch's log, gathered here alone: the unweighted loss (comparable
    across methods); for a meta level, the scale and spread of the raw weights w, their effective
    batch size n_eff and their correlation with the loss (which samples it favours); L_val(theta');
    the splitter's terms."""
    stats["loss"].append(losses.mean())
    if run.reweights:
        stats["w_mean"].append(w.mean())
        stats["w_spread"].append(w.std() / w.mean())  # std/mean of w, the same for w~
        stats["n_eff"].append(effective_batch(w))  # how many samples the step's weight rests on
        stats["w_loss_corr"].append(torch.corrcoef(torch.stack([w, losses]))[0, 1])
    if val_loss is not None:
        stats["val_loss"].append(val_loss.float())
    for name, value in (split_terms or {}).items():
        stats[f"split_{name}"].append(value)


def epoch_batches(run, cfg):
    """S_tr in a fresh random order, cut into full batches (the last partial one is dropped); under
    torchrun every process draws the same order and keeps its share of each batch."""
    train_idx = (~run.val_mask).nonzero().squeeze(1)
    order = train_idx[torch.randperm(len(train_idx), device=run.device)]
    return my_share(order[:len(order) // cfg.batch_size * cfg.batch_size].view(-1, cfg.batch_size))


def train_steps(run, data, cfg, batches, on_step=None):
    """E11's inner loop, one classifier step per batch of S_tr; every K-th step (every step of
    MW-Net and L2RW) also a meta step on phi, and for MOLERE a splitter step on Theta. Returns
    the per-step statistics averaged, by name, and what the batches saw, for the frame's
    meta-level diagnostics (E16): each image's raw weight w and whether its label was fitted
    (train mode, before its step; each S_tr image once an epoch), and phi at the start."""
    val = validation_set(run, data)
    stats = defaultdict(list)
    run.model.train()
    seen = dict(w=torch.full((len(data.y),), float("nan"), device=run.device),
                fitted=torch.zeros(len(data.y), dtype=torch.bool, device=run.device),
                phi_start=torch.cat([p.detach().flatten() for p in run.meta.parameters()]).clone())
    for done, idx in enumerate(batches, 1):
        x, y = data.batch(idx, cfg.augment), data.y[idx]                # a batch of S_tr
        meta_now = run.reweights and run.step % run.K == 0              # E7 (MW-Net, L2RW: K = 1)
        val_loss = split_terms = None
        if run.spec.weights == "l2rw":
            step = l2rw_step(run, cfg, x, y, data, val)                  # E14: w from this batch's g
            update, val_loss = bool(world_sum(step.w.sum()) > 0), step.val_loss  # all zeros: no update
        else:
            step, update = classifier_step(run, cfg, x, y, replay=meta_now), True  # E1-E3
            if meta_now:
                val_loss = meta_step(run, cfg, step, *validation_batch(data, val, cfg))  # E4-E6
                if run.spec.split == "splitter":
                    split_terms = splitter_step(run, data, cfg, val.at)     # E9
        if update:
            run.opt.step()                                              # E3: theta <- SGD(theta, G)
        step_stats(stats, run, step.losses, step.w, val_loss, split_terms)
        seen["w"][idx], seen["fitted"][idx] = step.w.float(), step.logits.detach().argmax(1) == y
        run.step += 1
        if on_step is not None:  # the frame's progress line inside an epoch: steps done, of, losses
            on_step(done, len(batches), stats["loss"])
    means = torch.stack([torch.stack(v).float().mean() for v in stats.values()]).tolist()  # one host sync
    return dict(zip(stats, means), steps=len(batches)), seen


def train_epoch(run, data, cfg, on_step=None):
    batches = epoch_batches(run, cfg)
    if not torch.is_tensor(data.x):  # images on disk: read the epoch's batches ahead, in this order
        data.x.expect(batches, cfg.augment)
    return train_steps(run, data, cfg, batches, on_step)

# ----------------------------------------------------------------------------- the splits


def random_split(data, delta, seed):
    g = torch.Generator().manual_seed(seed)
    return per_class_topk(torch.rand(len(data.y), generator=g).to(data.y.device), data.y, delta, data.classes)


def initial_split(method, data, delta, seed, erm_model=None):
    """Every choice of the S_val a run starts with, and its seed (METHOD.md §§2-4 and 8), by the
    method's `split`: none -> S_tr = S; splitter -> a random delta-split of its own seed for
    MOLERE's warm-up; under --meta-set clean:N -> the clean set; random -> LRW-Random's seeded
    split (also the S_tr of the erm-tr control, and MW-Net's and L2RW's S_val); low-margin /
    high-margin -> train-twice LRW-Hard / LRW-Easy: per class the delta-fraction of lowest /
    highest margin under `erm_model`, the finished ERM model of the same seed (METHOD.md §3)."""
    split = METHODS[method].split
    if split == "none":
        return torch.zeros(len(data.y), dtype=torch.bool, device=data.y.device)
    if split == "splitter":
        return random_split(data, delta, 20_000 + seed)
    if data.meta_mask is not None:
        return data.meta_mask
    if split == "random":
        return random_split(data, delta, 10_000 + seed)
    pm = margins(predict(erm_model, data, data.x)[0], data.y)
    return per_class_topk(-pm if split == "low-margin" else pm, data.y, delta, data.classes)


def molere_split(run, data, cfg):
    """METHOD.md §2, the hard split: per class, the delta-fraction of S with the highest
    P_Theta(val | x, y). Returns the new mask and what the log says about it."""
    logits, h = predict(run.model, data, data.x, forward=run.forward)
    with torch.no_grad():
        new = per_class_topk(torch.sigmoid(run.splitter(h, data.y)), data.y, cfg.delta, data.classes)
    wrong = (logits.argmax(1) != data.y).float()
    old = run.val_mask
    err = lambda m: float(wrong[m].mean()) if m.any() else None
    return new, dict(split_kept=float((new & old).sum() / new.sum()), val_err=err(new), train_err=err(~new),
                     val_err_kept=err(new & old), val_err_new=err(new & ~old))

# ----------------------------------------------------------------------------- one run: the MOLERE loop


def train(run, data, cfg, on_epoch=None, on_step=None):
    """The algorithm (METHOD.md §§1 and 2), from wherever `run` stands, fresh or restored:
      every epoch     one classifier step per batch of S_tr; every K-th step (every step for
                      MW-Net and L2RW) also a meta step on phi, and for MOLERE a splitter step
                      on Theta (`train_steps`); then the lr schedule steps
      MOLERE          after W warm-up epochs on a random split, every R epochs S_val becomes the
                      splitter's hard split (`molere_split`)
    `on_epoch(run, entry, seen)` receives each epoch's log entry and what its batches saw
    (`train_steps`): the frame measures, evaluates, checkpoints and prints there (molere_cli.py);
    `on_step(done, steps, losses)` is called after each step, for a progress line."""
    while run.epoch < cfg.epochs:
        split = {}
        if run.spec.split == "splitter" and run.epoch >= cfg.warmup_epochs and \
                (run.epoch - cfg.warmup_epochs) % cfg.resplit_every == 0:
            run.val_mask, split = molere_split(run, data, cfg)
        lr = run.opt.param_groups[0]["lr"]
        stats, seen = train_epoch(run, data, cfg, on_step)
        run.sched.step()
        run.epoch += 1
        if on_epoch is not None:
            on_epoch(run, dict(epoch=run.epoch, lr=lr, **stats, **split), seen)


if __name__ == "__main__":  # python molere.py ...: the command line lives in molere_cli.py
    import molere_cli
    molere_cli.main(handle_sigterm=True)
