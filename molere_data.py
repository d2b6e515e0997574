"""
The pool S and the untouched test split that a run trains and is tested on, each choice fixed
for every seed and method (SPEC sections 5, 6 and 8): the source (a synthetic demo set made in
memory, CIFAR-10/100, the packed CIFAR-10 subset), a class-balanced subset, class skew (the
paper's Table 2), label noise (Table 3 and the noisy-label anchor) and a clean meta set. What
training does with it (GPU-resident batches, crop and flip) is molere.get_batch.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from molere_io import DataError, load_cifar, load_packed


def make_synthetic(n_train=2000, n_test=1000, classes=10, hard=0.25, mislabelled=0.08, seed=1234):
    """A learnable CIFAR-shaped set made in memory (same for every training seed): each
    class is a smooth colour pattern; a `hard` fraction of images blends in another class
    (near the boundary), and a `mislabelled` fraction of TRAINING labels is flipped."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=32, mode="bilinear",
                           align_corners=False)

    def sample(n, flip):
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=g)]
        other = (y + torch.randint(1, classes, (n,), generator=g)) % classes
        mix = torch.where(torch.rand(n, generator=g) < hard,
                          0.5 + 0.15 * torch.rand(n, generator=g), torch.ones(n))[:, None, None, None]
        x = mix * protos[y] + (1 - mix) * protos[other] + 0.12 * torch.randn(n, 3, 32, 32, generator=g)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if flip:
            bad = torch.rand(n, generator=g) < mislabelled
            y = torch.where(bad, (y + torch.randint(1, classes, (n,), generator=g)) % classes, y)
        return x, y

    return (*sample(n_train, True), *sample(n_test, False), classes)


def balanced_subset(y, n, classes, seed=0):
    """A fixed class-balanced subset of n indices (same for every seed and method)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    ys = y[perm]
    rank = torch.zeros_like(ys)
    for c in range(classes):
        m = ys == c
        rank[m] = torch.arange(int(m.sum()))
    return perm[rank < math.ceil(n / classes)][:n].sort().values


def long_tail(y, rho, classes):
    """Indices of a long-tailed pool: class c keeps n_c = n_max * rho^(-c/(C-1)) of its images
    (class 0 largest), chosen by a fixed permutation, the same for every seed and method."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    n_max = int(torch.bincount(y, minlength=classes).min())
    keep = [perm[y[perm] == c][:max(1, int(n_max * rho ** (-c / max(classes - 1, 1))))] for c in range(classes)]
    return torch.cat(keep).sort().values


def add_noise(y, noise, classes, x=None):
    """Label noise, drawn once with a fixed generator: `uniform:p` moves a p-fraction of labels
    to another class chosen uniformly, `pair:p` to the next class, `instance:p` as `instance_noise`
    (which needs the images x). Returns the new labels."""
    kind, p = noise.split(":")
    g = torch.Generator().manual_seed(2)
    if kind == "instance":
        return instance_noise(x, y, float(p), classes, g)
    flip = torch.rand(len(y), generator=g) < float(p)
    shift = torch.randint(1, classes, (len(y),), generator=g) if kind == "uniform" else torch.ones_like(y)
    return torch.where(flip, (y + shift) % classes, y)


def instance_noise(x, y, p, classes, g):
    """Instance-dependent label noise as Xia et al. generate it ("Part-dependent label noise:
    towards instance-dependent label noise", NeurIPS 2020; the generator the instance-noise
    literature commonly reuses):
      1. a flip rate q_i per image from N(p, 0.1^2) truncated to [0, 1];
      2. per class c a random projection W_c of shape (S, C), entries N(0, 1), S = 3 * 32 * 32;
      3. for image x_i (flattened, scaled to [0, 1]) with label y_i: scores x_i W_{y_i}, the
         score of y_i set to -inf, P(flip to k) = q_i softmax(scores)_k and P(keep) = 1 - q_i;
      4. the new label drawn from that distribution.
    So whether and where a label moves depends on the image itself. The average flip rate is
    about p (the truncation shifts it slightly)."""
    n = len(y)
    q = torch.randn(n, generator=g) * 0.1 + p
    while ((q < 0) | (q > 1)).any():  # truncation by redrawing the values outside [0, 1]
        bad = (q < 0) | (q > 1)
        q[bad] = torch.randn(int(bad.sum()), generator=g) * 0.1 + p
    feats = x.reshape(n, -1).float() / 255
    probs = torch.empty(n, classes)
    for c in range(classes):
        rows = (y == c).nonzero().squeeze(1)
        scores = feats[rows] @ torch.randn(feats.shape[1], classes, generator=g)
        scores[:, c] = -math.inf
        probs[rows] = q[rows, None] * torch.softmax(scores, 1)
        probs[rows, c] = 1 - q[rows]
    return torch.multinomial(probs, 1, generator=g).squeeze(1)


@dataclass
class Data:
    x: torch.Tensor        # pool S, uint8 (N, 3, 32, 32), on the device
    y: torch.Tensor        # int64 (N,), the labels training sees (noisy under --noise)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    mean: torch.Tensor     # per-channel pixel statistics of S, for normalisation
    std: torch.Tensor
    y_true: torch.Tensor   # labels before --noise (= y without it)
    meta_mask: torch.Tensor = None  # --meta-set clean:N: the fixed clean S_val
    noisy: torch.Tensor = None      # --noise: which labels of S it flipped (y != y_true)


def load_data(cfg, device, data_root="data", download=True):
    """The pool S (subset, class skew, noise, clean meta set: each fixed for every seed) and the
    untouched test split, on the device."""
    if cfg.dataset == "synthetic":
        x, y, xt, yt, classes = make_synthetic()
    elif cfg.dataset == "packed":
        x, y, xt, yt, classes = load_packed(data_root)
    else:
        x, y, xt, yt, classes = load_cifar(data_root, cfg.dataset, download)
    if cfg.train_subset:
        if cfg.train_subset > len(y):
            raise DataError(f"--train-subset {cfg.train_subset} exceeds the {len(y)} training images")
        keep = balanced_subset(y, cfg.train_subset, classes)
        x, y = x[keep], y[keep]
    if cfg.imbalance > 1:
        keep = long_tail(y, cfg.imbalance, classes)
        x, y = x[keep], y[keep]
    y_true = y
    if cfg.noise != "none":
        y = add_noise(y, cfg.noise, classes, x)
    meta_mask = None
    if cfg.meta_set != "split":
        n = int(cfg.meta_set.split(":")[1])
        counts = torch.bincount(y_true, minlength=classes)
        if n < classes or n > int(counts.min()) * classes // 2:
            raise DataError(f"--meta-set {cfg.meta_set}: N must be between {classes} (one per class) and "
                            f"{int(counts.min()) * classes // 2} (half the smallest class, times {classes})")
        meta_mask = torch.zeros(len(y), dtype=torch.bool)
        meta_mask[balanced_subset(y_true, n, classes)] = True
        y = torch.where(meta_mask, y_true, y)  # the meta set keeps its true labels
    xf = x.float() / 255
    mean, std = xf.mean((0, 2, 3)), xf.std((0, 2, 3))
    dev = lambda t: None if t is None else t.to(device)
    return Data(dev(x), dev(y), dev(xt), dev(yt), classes, dev(mean.view(1, 3, 1, 1)), dev(std.view(1, 3, 1, 1)),
                dev(y_true), dev(meta_mask), dev(y != y_true) if cfg.noise != "none" else None)
