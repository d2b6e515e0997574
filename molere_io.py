"""
What molere.py needs from its surroundings, and what can go wrong there, kept apart so that
molere.py reads as the method:
  config values     those only torchvision can check (`model_problems`; the rest: molere.config_problems)
  data files        CIFAR pickles read by our own reader through an unpickler that runs no
                    code; the packed subset a GPU call carries
  torch.compile     with a one-line fallback to eager where it cannot compile (`Compiled`)
  checkpoints       written atomically with the previous epoch's kept; loaded weights_only
  result records    one JSON line per finished run, appended under a lock, torn lines skipped
  other classifiers the CIFAR ResNet-32 and any torchvision model (--arch), beside the Wide-ResNet
and the errors the CLI turns into one line.
"""
import contextlib
import fcntl
import functools
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class UserError(Exception):
    """Bad input, missing data, a checkpoint that does not fit: the CLI prints one line, exit 2."""


class ModelError(UserError):
    """A classifier (--arch tv:NAME) or a weights file that does not fit the run."""


class DataError(UserError):
    """Missing or unreadable data."""


class ConfigMismatch(UserError):
    """A checkpoint made under another Config."""

# ----------------------------------------------------------------------------- CIFAR pickles


CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", labels="labels", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"]),
    "cifar100": dict(folder="cifar-100-python", labels="fine_labels", classes=100,
                     train=["train"], test=["test"]),
}


def find_cifar(root, name):
    spec = CIFAR[name]
    for folder in (os.path.join(root, spec["folder"]), root):
        if all(os.path.isfile(os.path.join(folder, f)) for f in spec["train"] + spec["test"]):
            return folder
    return None


def download_cifar(root, name):
    """torchvision's download helper, with its URL and MD5 checksum. Returns an error or None; a failed
    download removes what it made (the folder it created, or the partial archive in one that was there)."""
    tv = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    print(f"{name}: not under {root}, downloading with torchvision (MD5-checked) ...", flush=True)
    top = os.path.abspath(root)
    while not os.path.exists(os.path.dirname(top)):  # the outermost folder the download would create
        top = os.path.dirname(top)
    made = [p for p in (top, os.path.join(root, tv.filename), os.path.join(root, tv.base_folder))
            if not os.path.exists(p)]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torchvision.datasets.utils.download_and_extract_archive(
            tv.url, download_root=root, filename=tv.filename, md5=tv.tgz_md5)
        return None
    except Exception as e:  # no network, bad checksum, disk full: all end in one line
        for p in made:  # the first is the outermost: removing it removes the rest
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
        return f"{type(e).__name__}: {e}".splitlines()[0][:160]
    finally:
        socket.setdefaulttimeout(old)


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR pickle without running anything from the file: only the globals that the
    real files use (numpy arrays and dtypes, and bytes as Python 3 pickles them) are admitted.
    Everything else (os.system, eval, any class) is refused before it is looked up."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR file holds only "
                                         f"dicts, lists, strings, bytes, numbers and numpy arrays")
        return super().find_class(module, name)


def read_cifar_pickles(folder, files, label_key, classes):
    """Our own reader for the python-pickle CIFAR layout: dict with 'data' (n x 3072 uint8,
    R plane, G plane, B plane) and a list of integer labels."""
    xs, ys = [], []
    for f in files:
        path = os.path.join(folder, f)
        try:
            with open(path, "rb") as fh:
                d = CifarUnpickler(fh, encoding="latin1").load()
            x = np.asarray(d["data"], dtype=np.uint8)
            y = np.asarray(d[label_key], dtype=np.int64)
        except Exception as e:
            raise DataError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e})")
        if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise DataError(f"{path}: expected 'data' of shape (n, 3072) and n labels, got "
                            f"{x.shape} and {len(y)}")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise DataError(f"{path}: labels outside [0, {classes})")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(root, name, download=True):
    spec = CIFAR[name]
    folder = find_cifar(root, name)
    why = "download disabled (--no-download)"
    if folder is None and download:
        why = download_cifar(root, name) or "the download did not produce the expected files"
        folder = find_cifar(root, name)
    if folder is None:
        files = ", ".join(spec["train"] + spec["test"])
        raise DataError(f"{name} not found: place the python version ({spec['folder']}/ with "
                        f"{files}) under --data-root {root} [{why}]")
    x, y = read_cifar_pickles(folder, spec["train"], spec["labels"], spec["classes"])
    xt, yt = read_cifar_pickles(folder, spec["test"], spec["labels"], spec["classes"])
    return x, y, xt, yt, spec["classes"]


PACKED = "cifar10-packed.npz"  # --dataset packed: tools/pack.py's file under --data-root


def load_packed(root):
    """A packed CIFAR-10 subset (tools/pack.py): one .npz of plain arrays, loaded with
    allow_pickle=False, so it cannot run code; shapes, dtypes and labels are checked."""
    path = os.path.join(root, PACKED)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: make it with `python -m tools.pack --data-root CIFAR10_DIR --out {root}`")
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y, xt, yt = (f[k] for k in ("x", "y", "x_test", "y_test"))
            classes = int(f["classes"])
    except Exception as e:  # not a zip, a missing array, an object array: all one line
        raise DataError(f"{path} is not a packed CIFAR file ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"make it again with python -m tools.pack")
    for name, images, labels in (("x", x, y), ("x_test", xt, yt)):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32) or \
                labels.shape != (len(images),) or labels.dtype.kind not in "iu" or not len(labels) or \
                labels.min() < 0 or labels.max() >= classes:
            raise DataError(f"{path}: {name} must be uint8 (n, 3, 32, 32) with n integer labels in [0, {classes}), "
                            f"got {images.dtype} {images.shape} and labels {labels.dtype} {labels.shape}")
    return (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(xt),
            torch.from_numpy(yt.astype(np.int64)), classes)

# ----------------------------------------------------------------------------- checkpoints


class Compiled:
    """`fn` through torch.compile, built on first use (--compile). Inductor's `fallback_random`
    makes dropout draw from the global RNG exactly as eager does, so a replayed RNG state gives
    the classifier step's masks here too. If compiling fails (no C compiler, no Triton), one
    line on stderr and eager from then on."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if self.compiled is not self.fn:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, options={"fallback_random": True})
                return self.compiled(*args)
            except Exception as e:  # torch's compile errors have no common base class
                print(f"warning: torch.compile of {self.fn.__name__} failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''}); running it eagerly", file=sys.stderr)
                self.compiled = self.fn
        return self.fn(*args)


def model_problems(cfg, side):
    """The Config values that only torchvision can check, as lines (none: fine): --arch tv:NAME must
    be a torchvision classification model, and the images (`side` pixels a side: molere.image_side) must
    be at least its smallest input (its weights' `min_size`). A ViT without weights is built for the
    images it sees, so it has no such bound. The checks that need no torchvision are
    molere.config_problems."""
    if not cfg.arch.startswith("tv:"):
        return []
    name = cfg.arch[3:]
    if name not in torchvision.models.list_models(module=torchvision.models):
        return [f"--arch must be wrn, resnet32 or tv:NAME with NAME a torchvision classification model "
                f"(tv:resnet18, tv:resnet50, tv:vit_b_16, ...), got {cfg.arch!r}"]
    if name.startswith("vit") and not cfg.weights:
        return []
    least = max(next(iter(torchvision.models.get_model_weights(name))).meta.get("min_size", (1, 1)))
    if side >= least:
        return []
    return [f"--arch tv:{name} needs images of at least {least} x {least} pixels; it would see "
            f"{side} x {side} ({'--image-size' if cfg.dataset.startswith('folder:') else cfg.dataset})"]


def other_classifier(cfg, classes, side):
    """f_theta for --arch resnet32 | tv:NAME (molere.make_model builds the Wide-ResNet itself)."""
    if cfg.arch == "resnet32":
        return ResNet32(classes)
    bad = model_problems(cfg, side)
    if bad:
        raise ModelError("; ".join(bad))
    return Torchvision(load_torchvision(cfg.arch[3:], cfg.weights, side), classes)


class ResNet32(nn.Module):
    """He et al.'s CIFAR ResNet-32 (--arch resnet32): 3 stages of 5 post-activation basic blocks,
    16/32/64 channels, parameter-free shortcuts (stride 2, zero-padded channels): 0.46M
    parameters. Like WideResNet, forward returns (logits, h) and `features` is h's width."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(5):
                stride = 2 if i and not j else 1
                layers.append(nn.ModuleDict(dict(
                    conv1=nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn1=nn.BatchNorm2d(cout),
                    conv2=nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn2=nn.BatchNorm2d(cout))))
                cin = cout
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(64, classes)
        self.features = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        for b in self.layers:
            y = F.relu(b.bn1(b.conv1(x)))
            y = b.bn2(b.conv2(y))
            if y.shape != x.shape:  # downsample, and pad the new channels with zeros
                x = x[:, :, ::2, ::2]
                x = F.pad(x, (0, 0, 0, 0, (y.shape[1] - x.shape[1]) // 2, (y.shape[1] - x.shape[1]) // 2))
            x = F.relu(y + x)
        h = x.mean((2, 3))
        return self.fc(h), h


class Torchvision(nn.Module):
    """--arch tv:NAME: any torchvision classifier with its last Linear (the head) replaced by one
    for our classes; forward returns (logits, h) with h the penultimate features, so g_phi and
    the splitter work unchanged. `body` is the model as built (and loaded) with its own head."""

    def __init__(self, body, classes):
        super().__init__()
        heads = [(n, m) for n, m in body.named_modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise ModelError(f"--arch tv:{type(body).__name__} has no Linear head to replace")
        name, head = heads[-1]
        parent = body.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], nn.Identity())
        self.body, self.features = body, head.in_features
        self.fc = nn.Linear(head.in_features, classes)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), h


_ANNOUNCED = set()  # --weights files whose dropped head has been said, once a process
AUX_HEADS = ("googlenet", "inception_v3")  # their auxiliary classifiers are built off: one output, one head


def load_torchvision(name, weights="", image_size=32):
    """torchvision model NAME with its own head, built with weights=None (nothing is ever
    downloaded), its pretrained tensors loaded from the local file `weights` if given
    (`read_weights`). A ViT is built for `image_size` unless weights fix it (224); a file that
    does not fit the model is refused in one line."""
    kwargs = {"image_size": image_size} if name.startswith("vit") and not weights else {}
    if name in AUX_HEADS:
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights:
        state, ours = read_weights(weights)
        head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        in_head = lambda key: key.rpartition(".")[0] == head
        dropped = {k: tuple(v.shape) for k, v in state.items() if in_head(k)}
        if dropped and weights not in _ANNOUNCED:  # the head is replaced for our classes whatever it was
            _ANNOUNCED.add(weights)
            print(f"--weights {weights}: its head's tensors ({', '.join(f'{k} {list(v)}' for k, v in dropped.items())}) "
                  f"are dropped; the head is replaced for this data's classes", flush=True)
        try:
            missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not in_head(k)}, strict=False)
            left = [k for k in missing if not in_head(k)]  # the backbone must fit exactly
            if left or unexpected:
                raise RuntimeError(f"missing keys {left[:3]}, unexpected keys {unexpected[:3]}")
        except Exception as e:
            first = " ".join(str(e).split())[:200] or type(e).__name__
            raise DataError(f"--weights {weights} does not fit tv:{name}: {first}") from None
    return model


def read_weights(path):
    """The tensors of a weights file, whatever the usual wrapping: a state_dict, {'state_dict': ...},
    {'model': ...} (torchvision's reference scripts), {'model_state_dict': ...}, or a checkpoint of
    this project (its classifier's backbone, `body.*`); prefixes `module.` (DDP) and `_orig_mod.`
    (torch.compile) dropped. Read with weights_only, so a file that would run code is refused.
    Returns (state_dict, whether it came from our checkpoint); anything else is one line."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"--weights {path}: no such file") from None
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class to import and call: loading would run code
            raise DataError(f"--weights {path} would run code when loaded (it pickles objects, not only "
                            f"tensors): refused; save model.state_dict() with torch.save instead") from None
        raise DataError(f"--weights {path} is not a file torch.load can read (not a PyTorch pickle)") from None
    except Exception as e:
        raise DataError(f"--weights {path} is not a file torch.load can read ({_first_words(e)})") from None
    ours = isinstance(obj, dict) and {"model", "config", "method"} <= set(obj)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    if not tensors:
        found = f"a dict with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise DataError(f"--weights {path}: found {found}, not a state_dict (nor one under 'state_dict', 'model' "
                        f"or 'model_state_dict', nor a checkpoint of molere.py)")
    if ours:  # our classifier: Torchvision(body, fc); the body is the torchvision model, head removed
        obj = {k[5:]: v for k, v in obj.items() if k.startswith("body.")}
    for prefix in ("module.", "_orig_mod."):
        obj = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in obj.items()}
    return obj, ours


def _first_words(e):
    return " ".join(str(e).split())[:120] or type(e).__name__


def has_checkpoint(path):
    return os.path.exists(path) or os.path.exists(path + ".prev")


def write_checkpoint(path, ckpt):
    """Written to a temporary file and fsynced, then renamed into place; the previous epoch's
    checkpoint is kept as PATH.prev until the new one is in place, so at every instant one
    complete checkpoint exists."""
    tmp = f"{path}.tmp{os.getpid()}"  # per process: two writers never share a temporary file
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # a full disk (torch.save raises RuntimeError around the OSError)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write the checkpoint {path} ({_first_words(e)}); the previous one is intact: "
                        f"free space and rerun with --resume") from None
    if os.path.exists(path):
        os.replace(path, path + ".prev")
    os.replace(tmp, path)


@contextlib.contextmanager
def run_lock(path, wait=None):
    """An exclusive lock on PATH.lock while this process trains the run whose checkpoint is
    PATH: yields True, or False (holding nothing) where another process holds it; with `wait`
    (a line to print), it waits for the lock instead. The kernel drops the lock when its holder
    exits, however it exits; a holder that ends normally also removes the file. A process that
    got the lock on a file its holder had just removed tries again on the file now at PATH.lock."""
    lock = path + ".lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait is None:
                os.close(fd)
                yield False
                return
            if wait:
                print(wait, flush=True)
                wait = ""  # said once, should the file change under it
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still holding it, so no one can hold the removed file alongside a new one
        os.close(fd)


def read_checkpoint(path, config):
    """The checkpoint at `path`, or the previous epoch's (PATH.prev) if that one cannot be read;
    refused if it was made under another config (`config`: molere_cli.config_record of the run's Config).
    Loading never runs code from the file (weights_only=True); a file that would is refused."""
    why = "missing"
    for candidate in (path, path + ".prev"):
        if not os.path.exists(candidate):
            continue
        try:
            ckpt = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or holding code to run: never unpickled
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'unreadable'}"
            print(f"warning: checkpoint {candidate} is unreadable ({why})", file=sys.stderr)
            continue
        theirs = ckpt.get("config", {})
        if theirs != config:
            diff = sorted(k for k in set(config) | set(theirs) if config.get(k) != theirs.get(k))
            raise ConfigMismatch(f"{candidate} is from a different config (differs in: {', '.join(diff)}); "
                                 f"use another --out or the same flags")
        if candidate != path:
            print(f"warning: falling back to the previous epoch's checkpoint {candidate}", file=sys.stderr)
        return ckpt
    raise UserError(f"checkpoint {path} cannot be read ({why}) and no readable previous one exists: "
                    f"delete it to train that run from the start")

# ----------------------------------------------------------------------------- result records


def read_results(path, cfg_hash=None):
    """Result records, one JSON line per finished run. A torn line (a process killed while
    writing it) is skipped with one warning; that run counts as unfinished, so --resume
    reports it again from its checkpoint."""
    rows = []
    if os.path.exists(path):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        print(f"warning: {path} line {n} is a torn record, skipped; --resume reports that "
                              f"run again from its checkpoint", file=sys.stderr)
    return [r for r in rows if cfg_hash is None or r.get("config_hash") == cfg_hash]


def finite_or_null(value):
    """`value` with every NaN or infinity replaced by None, so that json.dumps writes strict JSON
    (null) rather than the NaN that strict parsers reject."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def append_result(path, result):
    """Append one record, strict JSON (NaN and infinities as null), under an exclusive lock,
    fsynced: two processes sharing --out never interleave, and a crash leaves at most a torn last
    line, which the next append closes."""
    line = (json.dumps(finite_or_null(result), allow_nan=False) + "\n").encode()
    try:
        with open(path, "ab+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: at most a torn last line, which readers skip and the next append closes
        raise UserError(f"could not append to {path} ({_first_words(e)}); the run's checkpoint is kept: free "
                        f"space and rerun with --resume") from None


# ----------------------------------------------------------------------------- the output folder, the machine


def make_writable_folder(folder, flag):
    """Create `folder` and prove it writable before any work, or one line naming the flag."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")  # per process: workers share --out
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder} cannot be created or written ({e.strerror or e})")


@functools.lru_cache(maxsize=None)
def source_version():
    """The code a run ran: {"commit": HEAD of the repository holding this file, "dirty": whether
    tracked files differed from it}, or None outside a git checkout (an installed copy)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=30, check=True)
        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return dict(commit=commit, dirty=dirty)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    return f"CPU x{torch.get_num_threads()} threads"
