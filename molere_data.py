"""
The pool S and the untouched test split that a run trains and is tested on, each choice fixed
for every seed and method (METHOD.md §§5, 6 and 8): the source (a synthetic demo set made in
memory, CIFAR-10/100, the packed CIFAR-10 subset, or any image folder), a class-balanced subset,
class skew (the paper's Table 2), label noise (Table 3 and the noisy-label anchor) and a meta set
(clean images of S, images of the source beyond S, or an image folder of the user's: Table 4's
natural hard examples); and the spurious set of the hard-samples known answer (`make_spurious`).
`Data` is all the method sees of it: batches of images by index (`Data.batch`: CIFAR stays on the
device as uint8, crop and flip done there, no DataLoader; a folder is read from disk by
`FolderImages`), the labels, and the fixed meta set as images and labels of its own, whatever its
kind.
"""
import hashlib
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as TV
import torchvision.transforms.functional as TF
from PIL import Image

from molere import synthetic_size
from molere_io import DataError, load_cifar, load_packed


def make_synthetic(n_train=2000, n_test=1000, classes=10, hard=0.25, mislabelled=0.08, seed=1234, side=32):
    """A learnable CIFAR-shaped set made in memory (same for every training seed): each
    class is a smooth colour pattern; a `hard` fraction of images blends in another class
    (near the boundary), and a `mislabelled` fraction of TRAINING labels is flipped. `side`:
    the images' side in pixels (--dataset synthetic:N:SIDE; the long run's 8 x 8)."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=side, mode="bilinear",
                           align_corners=False)

    def sample(n, flip):
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=g)]
        other = (y + torch.randint(1, classes, (n,), generator=g)) % classes
        mix = torch.where(torch.rand(n, generator=g) < hard,
                          0.5 + 0.15 * torch.rand(n, generator=g), torch.ones(n))[:, None, None, None]
        x = mix * protos[y] + (1 - mix) * protos[other] + 0.12 * torch.randn(n, 3, side, side, generator=g)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if flip:
            bad = torch.rand(n, generator=g) < mislabelled
            y = torch.where(bad, (y + torch.randint(1, classes, (n,), generator=g)) % classes, y)
        return x, y

    return (*sample(n_train, True), *sample(n_test, False), classes)


# the second known answer (METHOD.md §9): how strong each cue is, chosen by the pilot of RESULTS §9
SPURIOUS = dict(minority=0.2, shape=0.25, tint=0.5, noise=0.3)


def make_spurious(n_train=2000, n_test=1000, classes=10, seed=4321, minority=None, shape=None, tint=None,
                  noise=None):
    """A synthetic set with a majority and a minority subpopulation in every class (METHOD.md §9,
    the hard-samples known answer). Each class is a grey pattern of zero mean (the cue that
    generalises) under a colour tint, a cue that is easier to learn and spurious: a training image
    has its own class's tint with probability 1 - `minority`, another class's otherwise. The test
    set is half majority, half minority, so its minority half measures what the pattern alone
    teaches. The same for every training seed. Returns the training images and labels, the test
    images and labels, the class count, and which training and test images are minority."""
    p = dict(SPURIOUS, **{k: v for k, v in dict(minority=minority, shape=shape, tint=tint, noise=noise).items()
                          if v is not None})
    g = torch.Generator().manual_seed(seed)
    shapes = F.interpolate(torch.rand(classes, 1, 4, 4, generator=g), size=32, mode="bilinear",
                           align_corners=False)
    shapes = shapes - shapes.mean((2, 3), keepdim=True)  # the pattern carries no colour of its own
    tints = torch.rand(classes, 3, 1, 1, generator=g) - 0.5

    def sample(n, minority):
        y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
        tint_of = torch.where(minority, (y + torch.randint(1, classes, (n,), generator=g)) % classes, y)
        x = 0.5 + p["shape"] * shapes[y] + p["tint"] * tints[tint_of] + p["noise"] * torch.randn(n, 3, 32, 32,
                                                                                                 generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    m_train = torch.rand(n_train, generator=g) < p["minority"]
    m_test = (torch.arange(n_test) % 2 == 1)[torch.randperm(n_test, generator=g)]  # half and half
    return (*sample(n_train, m_train), *sample(n_test, m_test), classes, m_train, m_test)


def balanced_subset(y, n, classes, seed=0):
    """A class-balanced subset of n indices, fixed by `seed` (the same for every training seed and
    method unless --data-draw seed)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    ys = y[perm]
    rank = torch.zeros_like(ys)
    for c in range(classes):
        m = ys == c
        rank[m] = torch.arange(int(m.sum()))
    return perm[rank < math.ceil(n / classes)][:n].sort().values


def long_tail(y, rho, classes, seed=1):
    """Indices of a long-tailed pool: class c keeps n_c = n_max * rho^(-c/(C-1)) of its images
    (class 0 largest), chosen by a permutation fixed by `seed` (the same for every training seed
    and method unless --data-draw seed)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_max = int(torch.bincount(y, minlength=classes).min())
    keep = [perm[y[perm] == c][:max(1, int(n_max * rho ** (-c / max(classes - 1, 1))))] for c in range(classes)]
    return torch.cat(keep).sort().values


def add_noise(y, noise, classes, x=None, seed=2):
    """Label noise, drawn once with a generator fixed by `seed`: `uniform:p` moves a p-fraction of
    labels to another class chosen uniformly, `pair:p` to the next class, `instance:p` as
    `instance_noise` (which needs the images x). Returns the new labels."""
    kind, p = noise.split(":")
    g = torch.Generator().manual_seed(seed)
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


# ----------------------------------------------------------------------------- an image folder, read from disk

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def crop_params(path, seed):
    """The random part of the standard ImageNet training transform for one image: torchvision's
    RandomResizedCrop box (scale 0.08-1, aspect 3/4-4/3), then the coin of its horizontal flip,
    drawn as torchvision draws them, from torch's RNG seeded with `seed` and restored after. Each
    image has its own seed, so its crop does not depend on which process reads it, or when. It
    uses the process's RNG: call it from one thread (FolderImages' threads get the results)."""
    try:
        with Image.open(path) as im, torch.random.fork_rng(devices=[]):  # the header only: the size
            torch.manual_seed(seed)
            return (*TV.RandomResizedCrop.get_params(im, (0.08, 1.0), (3 / 4, 4 / 3)), bool(torch.rand(1) < 0.5))
    except (OSError, ValueError):
        return None  # unreadable: `read_image` says so


def read_image(path, size, augment, params=None, seed=0):
    """One image as the network sees it, (3, size, size) normalised with ImageNet's statistics,
    and "" or, where it cannot be read, its path (and a black image): training and validation
    batches (augment) crop `params` (drawn here with `seed` if not given) and flip; evaluation
    resizes to size * 8/7 and centre-crops, as torchvision's ImageNet recipe."""
    try:
        if augment and params is None:
            params = crop_params(path, seed)
        with Image.open(path) as im:
            im = im.convert("RGB")
        if augment:
            i, j, h, w, flip = params
            im = TF.resized_crop(im, i, j, h, w, [size, size])
            im = TF.hflip(im) if flip else im
        else:
            im = TF.center_crop(TF.resize(im, size * 8 // 7), size)
        bad = ""
    except (OSError, ValueError, TypeError):  # PIL's UnidentifiedImageError is an OSError
        im, bad = Image.new("RGB", (size, size)), path
    return TF.normalize(TF.to_tensor(im), IMAGENET_MEAN, IMAGENET_STD), bad


class ReadImages(torch.utils.data.Dataset):
    """`read_image` of each path for a DataLoader, image i's crop seeded with base + i."""

    def __init__(self, paths, size, augment, base):
        self.paths, self.size, self.augment, self.base = paths, size, augment, base

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return read_image(self.paths[i], self.size, self.augment, seed=self.base + i)


def seed_base():
    """One draw of torch's RNG for a whole read (an epoch ahead, or one batch): the images' seeds."""
    return int(torch.randint(2**62, (1,)))


def checked(batch):
    """The images of an (images, unreadable paths) batch, or one line naming the first bad file."""
    images, bad = batch
    unreadable = [p for p in bad if p]
    if unreadable:
        raise DataError(f"cannot read image {unreadable[0]} (not an image, or damaged)")
    return images


class FolderImages:
    """The images of an image folder, read from disk when a batch needs them: what Data.x is for
    --dataset folder:PATH. Indexing (a tensor of positions, a slice) gives a view that reads
    nothing; `load(idx, augment)` returns the images at those positions (`read_image`) on the
    device. The epoch's training batches, announced in order by `expect`, are read ahead by one
    DataLoader with `workers` processes while the device trains; the few other reads (validation
    and splitter batches, evaluation) are read when asked for by `workers` threads. Every random
    crop comes from its image's own seed (`crop_params`), so a run is the same run whatever
    --workers and the timing."""

    def __init__(self, paths, size, workers=0, device=torch.device("cpu"), threads=None):
        self.paths, self.size, self.workers, self.device = list(paths), size, workers, device
        self.ahead, self.expected, self.ahead_augment = None, deque(), None
        self.threads = threads or (ThreadPoolExecutor(workers) if workers else None)  # a view shares them

    def __len__(self):
        return len(self.paths)

    def positions(self, idx):
        return list(range(len(self.paths))[idx]) if isinstance(idx, slice) else idx.tolist()

    def __getitem__(self, idx):
        return FolderImages([self.paths[i] for i in self.positions(idx)], self.size, self.workers, self.device,
                            self.threads)

    def to(self, device):
        self.device = device
        return self

    def expect(self, batches, augment):
        self.expected, self.ahead_augment = deque(batches.tolist()), augment
        read = ReadImages(self.paths, self.size, augment, seed_base())
        self.ahead = iter(torch.utils.data.DataLoader(read, batch_sampler=list(self.expected),
                                                      num_workers=self.workers))

    def load(self, idx, augment):
        pos = self.positions(idx)
        if self.expected and pos == self.expected[0] and augment == self.ahead_augment:  # the epoch's next batch
            self.expected.popleft()
            x = checked(next(self.ahead))
        else:
            paths = [self.paths[i] for i in pos]
            base = seed_base()
            params = [crop_params(p, base + k) if augment else None for k, p in enumerate(paths)]
            one = lambda a: read_image(a[0], self.size, augment, a[1])
            x = checked(stacked(self.map(one, zip(paths, params))))
        return x.to(self.device, non_blocking=True)

    def map(self, fn, items):
        return list(self.threads.map(fn, items) if self.threads else map(fn, items))

    def thumbnails(self, side=32):
        """Every image resized whole to uint8 (N, 3, side, side): the pixels `instance_noise` projects."""
        def small(path):
            try:
                with Image.open(path) as im:
                    return TF.pil_to_tensor(im.convert("RGB").resize((side, side), Image.BILINEAR)), ""
            except (OSError, ValueError):
                return torch.zeros(3, side, side, dtype=torch.uint8), path
        return checked(stacked(self.map(small, self.paths)))


def stacked(results):
    """[(image, bad path)] -> (images stacked, [bad paths]): one batch as `checked` takes it."""
    return torch.stack([x for x, _ in results]), [bad for _, bad in results]


def scan_folder(path, classes=None):
    """torchvision's ImageFolder scan of PATH/<class>/<image>: (image paths, class names, labels).
    With `classes` (the training classes) the labels index those, and a class folder that is not
    one of them is refused. Every problem of the tree is one line that names the folder."""
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a folder: an image folder holds one folder of images per class")
    try:
        found = torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, OSError) as e:  # no class folder, or one that holds no image
        raise DataError(f"{path}: {str(e).splitlines()[0]}") from None
    names = classes or found.classes
    stray = sorted(set(found.classes) - set(names))
    if stray:
        raise DataError(f"{path}: class folder {stray[0]!r} is not a training class "
                        f"(the training classes: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    labels = [names.index(found.classes[t]) for _, t in found.samples]
    return [p for p, _ in found.samples], names, torch.tensor(labels)


def load_folder(root, size, workers):
    """--dataset folder:ROOT: ROOT/train/<class>/* and ROOT/test/<class>/*, the same classes."""
    x, classes, y = scan_folder(os.path.join(root, "train"))
    xt, _, yt = scan_folder(os.path.join(root, "test"), classes)
    return FolderImages(x, size, workers), y, FolderImages(xt, size, workers), yt, len(classes), classes


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
    meta_mask: torch.Tensor = None  # --meta-set: which images of S the meta set takes out of training
    noisy: torch.Tensor = None      # --noise: which labels of S it flipped (y != y_true)
    x_meta: torch.Tensor = None     # --meta-set: the fixed meta set's images, whatever its kind (clean:N:
    y_meta: torch.Tensor = None     # images of S, true labels; outside:N, folder:PATH: none of S); or None
    fingerprint: dict = None        # what a checkpoint must find again on --resume (`fingerprint`)
    minority: torch.Tensor = None       # --dataset spurious: which images of S are minority (tint of another class)
    minority_test: torch.Tensor = None  # and which test images

    def batch(self, idx, augment, images=None):
        """Images `idx` of S (or of `images`: the test set, the meta set) as a normalised float
        batch on the device; with `augment`, random crop (reflect pad 4) and horizontal flip done
        for the whole batch at once, no DataLoader. Images in a folder (--dataset folder:PATH,
        `FolderImages`) are read from disk and transformed there."""
        source = self.x if images is None else images
        if not torch.is_tensor(source):
            return source.load(idx, augment)
        x = source[idx].float()
        if augment:
            b, c, h, w = x.shape
            x = F.pad(x, (4, 4, 4, 4), mode="reflect")
            dy, dx = (torch.randint(0, 9, (2, b), device=x.device))
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            x = x[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
            x = torch.where(torch.rand(b, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        x = (x / 255 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def fingerprint(x, y, y_true, x_test, y_test, meta_mask, x_meta, y_meta):
    """A short hash of each part of the data a run depends on, by name: images (array bytes, or a
    folder's file list with sizes), labels, the noise draw, the test set, the meta set, and for image
    folders each file's modification time (so two images of the same size that swap contents are seen;
    one os.stat a file, the call that already gives its size). A checkpoint keeps it; --resume refuses a
    run whose data changed (molere_cli.same_data; a checkpoint without a part is not checked on it)."""
    folders = [p for p in (x, x_test, x_meta) if p is not None and not torch.is_tensor(p)]
    stats = {id(p): [os.stat(q) for q in p.paths] for p in folders}  # one os.stat a file

    def h(*parts, times=False):
        d = hashlib.sha1()
        for p in parts:
            if p is None:
                d.update(b"none")
            elif torch.is_tensor(p):
                d.update(p.detach().cpu().contiguous().numpy().tobytes())
            else:  # FolderImages: which files, and how large each is (or when each was last written)
                d.update("\n".join(f"{q}\t{st.st_mtime_ns if times else st.st_size}"
                                   for q, st in zip(p.paths, stats[id(p)])).encode())
        return d.hexdigest()[:12]
    prints = {"the pool's images": h(x), "the pool's labels": h(y_true), "the label noise": h(y),
              "the test set": h(x_test, y_test), "the meta set": h(meta_mask, x_meta, y_meta)}
    if folders:
        prints["the image files' modification times"] = h(*folders, times=True)
    return prints


def meta_set(cfg, y_true, classes, names, workers, outside=None, draw=lambda base: base):
    """--meta-set: (meta_mask over S, the outside images and their labels). clean:N marks N
    class-balanced images of S; folder:PATH marks none of S and reads PATH's images, labelled by
    the training class `names`; outside:N marks none of S and takes N class-balanced images of the
    source's training set that S does not hold, `outside` = (their images, their labels), as
    MW-Net's class-imbalance script builds its meta set (so a long-tailed S keeps all its tail);
    split: nothing (None, None, None)."""
    none_of_s = torch.zeros(len(y_true), dtype=torch.bool)
    if cfg.meta_set.startswith("folder:"):  # S_tr = S for every method; S_val these images
        paths, _, y_meta = scan_folder(cfg.meta_set[7:], names)
        return none_of_s, FolderImages(paths, cfg.image_size, workers), y_meta
    if cfg.meta_set == "split":
        return None, None, None
    n = int(cfg.meta_set.split(":")[1])
    if cfg.meta_set.startswith("outside:"):
        x_out, y_out = outside
        counts = torch.bincount(y_out, minlength=classes)
        if n < classes or n > int(counts.min()) * classes:
            raise DataError(f"--meta-set {cfg.meta_set}: N must be between {classes} (one per class) and "
                            f"{int(counts.min()) * classes} (the images outside the pool, in its smallest class)")
        pick = balanced_subset(y_out, n, classes, seed=draw(3))
        return none_of_s, x_out[pick], y_out[pick]
    counts = torch.bincount(y_true, minlength=classes)
    if n < classes or n > int(counts.min()) * classes // 2:
        raise DataError(f"--meta-set {cfg.meta_set}: N must be between {classes} (one per class) and "
                        f"{int(counts.min()) * classes // 2} (half the smallest class, times {classes})")
    meta_mask = torch.zeros(len(y_true), dtype=torch.bool)
    meta_mask[balanced_subset(y_true, n, classes, seed=draw(0))] = True
    return meta_mask, None, None


def data_draw(cfg, seed):
    """The generator seeds of the data's random draws (the synthetic images, subset, skew, noise,
    meta set), from their fixed base: the base itself under --data-draw fixed (every study before
    2026-12-07: one data draw for every training seed), else a draw of the training seed's own."""
    return (lambda base: base) if cfg.data_draw == "fixed" else (lambda base: base + 7919 * (seed + 1))


def load_data(cfg, device, data_root="data", download=True, workers=0, seed=0):
    """The pool S (subset, class skew, noise, meta set: each fixed for every seed, or under
    --data-draw seed drawn from `seed`) and the untouched test split, on the device (a folder's
    images: read from disk by `workers` processes)."""
    names = minority = minority_test = None
    draw = data_draw(cfg, seed)
    if cfg.dataset.split(":")[0] == "synthetic":
        n, n_test, side = synthetic_size(cfg.dataset)
        x, y, xt, yt, classes = make_synthetic(n, n_test, seed=draw(1234), side=side)
    elif cfg.dataset == "spurious":
        x, y, xt, yt, classes, minority, minority_test = make_spurious(seed=draw(4321))
    elif cfg.dataset == "packed":
        x, y, xt, yt, classes = load_packed(data_root)
    elif cfg.dataset.startswith("folder:"):
        x, y, xt, yt, classes, names = load_folder(cfg.dataset[7:], cfg.image_size, workers)
    else:
        x, y, xt, yt, classes = load_cifar(data_root, cfg.dataset, download)
    pool = torch.arange(len(y))  # which of the source's training images S holds
    if cfg.train_subset:
        if cfg.train_subset > len(y):
            raise DataError(f"--train-subset {cfg.train_subset} exceeds the {len(y)} training images")
        pool = balanced_subset(y, cfg.train_subset, classes, seed=draw(0))
    outside = None
    if cfg.meta_set.startswith("outside:"):  # beyond the balanced subset, before the skew takes its share
        if not cfg.train_subset:
            raise DataError("--meta-set outside:N draws from the training images beyond --train-subset: give it")
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[pool] = False
        outside = (x[rest], y[rest])
    if cfg.imbalance > 1:
        pool = pool[long_tail(y[pool], cfg.imbalance, classes, seed=draw(1))]
    x, y = x[pool], y[pool]
    minority = None if minority is None else minority[pool]
    y_true = y
    if cfg.noise != "none":
        pixels = x.thumbnails() if cfg.noise.startswith("instance") and not torch.is_tensor(x) else x
        y = add_noise(y, cfg.noise, classes, pixels, seed=draw(2))
    meta_mask, x_meta, y_meta = meta_set(cfg, y_true, classes, names, workers, outside, draw)
    if cfg.meta_set.startswith("clean:"):
        y = torch.where(meta_mask, y_true, y)  # the clean meta set keeps its true labels
    if torch.is_tensor(x):
        xf = x.float() / 255
        mean, std = xf.mean((0, 2, 3)), xf.std((0, 2, 3))
    else:  # a folder's images are normalised as they are read (FolderImages)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    prints = fingerprint(x, y, y_true, xt, yt, meta_mask, x_meta, y_meta)
    if cfg.meta_set.startswith("clean:"):  # one kind of meta set for the method: images and labels
        at = meta_mask.nonzero().squeeze(1)
        x_meta, y_meta = x[at], y[at]
    dev = lambda t: None if t is None else t.to(device)
    return Data(dev(x), dev(y), dev(xt), dev(yt), classes, dev(mean.view(1, 3, 1, 1)), dev(std.view(1, 3, 1, 1)),
                dev(y_true), dev(meta_mask), dev(y != y_true) if cfg.noise != "none" else None,
                dev(x_meta), dev(y_meta), prints, dev(minority), dev(minority_test))
