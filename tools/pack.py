"""Pack a fixed, class-balanced CIFAR-10 subset into one small file, for a machine the data
cannot reach otherwise (a lent GPU gets only the checkout, at most 64 MiB).

    python -m tools.pack --data-root ../shared/data --out packed          # 12,000 + 5,000 images
    python molere.py --dataset packed --data-root packed ...

Reads the CIFAR-10 python pickles with molere_io's safe reader, keeps `--train` training and
`--test` test images, the same number of each class, chosen by a fixed permutation
(`--seed`), and writes `OUT/cifar10-packed.npz` (compressed, plain uint8 / int64 arrays, read
back with allow_pickle=False) with the SHA-256 of every source file it read. `packed/` is
git-ignored. Same sources and flags: the same file, byte for byte.
"""
import argparse
import hashlib
import io
import os
import sys
import zipfile

import numpy as np
import torch

import molere_io
from molere_data import balanced_subset

MAX_BYTES = 55_000_000  # what the GPU call can carry beside the checkout


def balanced(y, n, classes, seed):
    """n indices, n / classes of each class (molere_data.balanced_subset with its own seed), sorted."""
    if n % classes or n // classes > int(torch.bincount(y, minlength=classes).min()):
        raise molere_io.DataError(f"cannot take {n} images as {classes} equal classes from {len(y)} "
                                  f"(need a multiple of {classes}, at most {classes} x the smallest class)")
    return balanced_subset(y, n, classes, seed)


def pack(data_root, out, n_train=12_000, n_test=5_000, seed=0):
    """Writes OUT/cifar10-packed.npz; returns its path and size in bytes."""
    spec = molere_io.CIFAR["cifar10"]
    folder = molere_io.find_cifar(data_root, "cifar10")
    if folder is None:
        raise molere_io.DataError(f"cifar10 not found under {data_root}: the python version "
                                  f"({spec['folder']}/ with {', '.join(spec['train'] + spec['test'])})")
    x, y, xt, yt, classes = molere_io.load_cifar(data_root, "cifar10", download=False)
    keep, keep_t = balanced(y, n_train, classes, seed), balanced(yt, n_test, classes, seed + 1)
    sources = []
    for f in spec["train"] + spec["test"]:
        with open(os.path.join(folder, f), "rb") as fh:
            sources.append(f"{hashlib.sha256(fh.read()).hexdigest()}  {f}")
    buffer = io.BytesIO()  # np.savez stamps no time, but zipfile does: write entries with a fixed date
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, array in (("x", x[keep].numpy()), ("y", y[keep].numpy()), ("x_test", xt[keep_t].numpy()),
                            ("y_test", yt[keep_t].numpy()), ("classes", np.array(classes)),
                            ("seed", np.array(seed)), ("sources", np.array(sources))):
            entry = io.BytesIO()
            np.save(entry, array if array.ndim == 0 else np.ascontiguousarray(array), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(2026, 1, 1, 0, 0, 0)), entry.getvalue(),
                       compress_type=zipfile.ZIP_DEFLATED)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, molere_io.PACKED)
    with open(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)
    return path, os.path.getsize(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--out", default="packed", help="folder for cifar10-packed.npz (default: packed, git-ignored)")
    p.add_argument("--train", type=int, default=12_000, help="training images, a multiple of 10 (default: 12000)")
    p.add_argument("--test", type=int, default=5_000, help="test images, a multiple of 10 (default: 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed class-balanced choice (default: 0)")
    a = p.parse_args(argv)
    try:
        path, size = pack(a.data_root, a.out, a.train, a.test, a.seed)
    except molere_io.UserError as e:
        sys.exit(f"pack: error: {e}")
    print(f"{path}: {a.train} training and {a.test} test images, {size / 1e6:.1f} MB"
          + ("" if size <= MAX_BYTES else f" (over the {MAX_BYTES / 1e6:.0f} MB a GPU call can carry)"))


if __name__ == "__main__":
    main()
