"""Any image folder (--dataset folder:PATH, --meta-set folder:PATH): images read from disk as
torchvision reads them, a run end to end with a torchvision backbone and weights from a local
file, the outside meta set as every reweighting method's S_val but MOLERE's, and bad folders
refused in one line before any training."""
import json
import math
import os

import pytest
import torch
import torchvision
import torchvision.transforms as T

import molere
import molere_cli
import molere_data
import molere_io
from helpers import ROOT, fresh_seed, run_main
from tools import toy_folder
from tools.toy_folder import write_folder

pytestmark = pytest.mark.slow  # runs the command line, subprocesses or whole trainings (README, Tests)

SIZE = 32


def tiny_tree(root, classes=("cat", "dog", "owl"), train=12, test=4):
    write_folder(os.path.join(root, "train"), classes, train, seed=0)
    write_folder(os.path.join(root, "test"), classes, test, seed=1)
    return str(root)


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_images_are_read_as_torchvision_reads_them(tmp_path, workers):
    """FolderImages.load (on demand, and the epoch's batches read ahead by `expect`) gives what
    torchvision's own ImageFolder with the standard evaluation transforms gives, at any positions."""
    fresh_seed()
    root = tiny_tree(tmp_path)
    x, y, xt, yt, classes, names = molere_data.load_folder(root, SIZE, workers)
    reference = torchvision.datasets.ImageFolder(os.path.join(root, "train"), T.Compose([
        T.Resize(SIZE * 8 // 7), T.CenterCrop(SIZE), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    assert names == ["cat", "dog", "owl"] and classes == 3 and len(x) == 36 and len(xt) == 12
    assert y.tolist() == reference.targets
    idx = torch.randperm(len(x))[:7]
    want = torch.stack([reference[i][0] for i in idx.tolist()])
    torch.testing.assert_close(x.load(idx, augment=False), want)
    torch.testing.assert_close(x[idx].load(slice(2, 5), augment=False), want[2:5])  # a view of a view
    batches = torch.randperm(len(x))[:30].view(3, 10)
    x.expect(batches, augment=False)
    for b in batches:  # read ahead, in the epoch's order
        torch.testing.assert_close(x.load(b, augment=False), torch.stack([reference[i][0] for i in b.tolist()]))
    assert not x.expected
    augmented = torchvision.datasets.ImageFolder(os.path.join(root, "train"), T.Compose([
        T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    for i in idx.tolist():  # each image's crop and flip: torchvision's, drawn from its own seed
        torch.manual_seed(1000 + i)
        torch.testing.assert_close(molere_data.read_image(x.paths[i], SIZE, True, seed=1000 + i)[0], augmented[i][0])


def test_random_crops_do_not_depend_on_the_number_of_workers(tmp_path):
    """The same RNG state gives the same augmented batches, read ahead and on demand, and leaves
    the RNG in the same state, with 0 and with 2 workers; two epochs' crops differ."""
    root = tiny_tree(tmp_path)
    seed = fresh_seed()
    batches, idx = torch.randperm(36)[:30].view(3, 10), torch.randint(36, (12,))
    seen = []
    for workers in (0, 2):
        x = molere_data.load_folder(root, SIZE, workers)[0]
        torch.manual_seed(seed)
        x.expect(batches, augment=True)
        ahead = [x.load(b, augment=True) for b in batches]
        seen.append((ahead, x.load(idx, augment=True), torch.get_rng_state()))
        assert not torch.allclose(x.load(batches[0], augment=True), ahead[0])  # another read, other crops
    (ahead0, demand0, rng0), (ahead2, demand2, rng2) = seen
    for u, v in zip(ahead0 + [demand0], ahead2 + [demand2]):
        torch.testing.assert_close(u, v)
    assert torch.equal(rng0, rng2)


DEMO = ["--image-size", str(SIZE), "--arch", "tv:resnet18", "--lr", "0.01", "--noise", "instance:0.3", "--method",
        "erm,lrw-random,molere", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "6", "--delta", "0.25",
        "--workers", "2"]  # as README's worked example and `bash reproduce.sh folder-demo` run it


def test_a_folder_run_with_a_torchvision_backbone_and_an_outside_meta_set(tmp_path, capsys):
    """The README's worked example, end to end: ResNet-18 with weights from a local file,
    instance-dependent noise drawn from the folder's pixels, and a meta set of two of the three
    classes from outside S. LRW-Random holds nothing of S out and draws its validation batches
    there (labels of those two classes only); MOLERE keeps its own hard split of S."""
    torch.manual_seed(fresh_seed())
    toy_folder.write_demo(str(tmp_path))
    argv = ["--dataset", f"folder:{tmp_path / 'pets'}", "--meta-set", f"folder:{tmp_path / 'hard'}",
            "--weights", str(tmp_path / "resnet18.pt"), *DEMO, "--device", "cpu", "--out", str(tmp_path / "out")]
    done = run_main(argv, capsys)
    out = done.out
    assert "36 training / 12 test images, 3 classes; tv:resnet18" in out
    assert "Warning" not in done.err and "warning" not in out, done.err  # to the end, with no warning
    rows = {r["method"]: r for r in molere_io.read_results(str(tmp_path / "out" / "results.jsonl"))}
    assert sorted(rows) == ["erm", "lrw-random", "molere"]
    assert rows["lrw-random"]["val_size"] == 0 and rows["molere"]["val_size"] > 0
    assert len(rows["erm"]["noisy"]) > 0 and all(0 <= r["test_acc"] <= 100 for r in rows.values())
    assert os.path.isfile(tmp_path / "out" / "folder-pets-lrw-random-seed0.pt")
    with open(os.path.join(ROOT, "reproduce.sh")) as f:  # the command the README shows runs these flags
        demo = " ".join(line.strip().rstrip("\\").strip() for line in f.read().split("folder-demo)")[1].splitlines()[3:6])
    assert " ".join(DEMO) in demo, demo

    cfg = molere.Config(**rows["lrw-random"]["config"])
    data = molere_data.load_data(cfg, torch.device("cpu"))
    for method, labels in (("lrw-random", {1, 2}), ("molere", {0, 1, 2})):
        run = molere.Run(cfg, method, 0, data, torch.device("cpu"))
        run.val_mask = molere.initial_split(method, data, cfg.delta, 0)
        drawn = torch.cat([molere.validation_batch(data, molere.validation_set(run, data), cfg)[1]
                           for _ in range(20)])
        assert set(drawn.tolist()) == labels, (method, drawn)


def bad_trees(tmp):
    """(flags, what the one line must say) for broken folders and flags."""
    good = tiny_tree(tmp / "good")
    no_test = tmp / "no_test"
    write_folder(str(no_test / "train"), ("cat", "dog"), 2)
    empty = tmp / "empty"
    write_folder(str(empty / "train"), ("cat", "dog"), 2)
    write_folder(str(empty / "test"), ("cat", "dog"), 2)
    os.makedirs(empty / "train" / "emu")
    broken = tmp / "broken"
    write_folder(str(broken / "train"), ("cat", "dog"), 4)
    write_folder(str(broken / "test"), ("cat", "dog"), 2)
    (broken / "train" / "dog" / "2.jpg").write_bytes(b"not a jpeg")
    stray = write_folder(str(tmp / "stray"), ("dog", "emu"), 2)
    return [
        ([f"folder:{tmp / 'nowhere'}"], "is not a folder"),
        ([f"folder:{no_test}"], f"{no_test / 'test'} is not a folder"),
        ([f"folder:{empty}"], "emu"),
        ([f"folder:{broken}", "--method", "erm", "--batch-size", "2"], f"cannot read image {broken / 'train' / 'dog' / '2.jpg'}"),
        ([f"folder:{good}", "--meta-set", f"folder:{stray}"], "class folder 'emu' is not a training class"),
        ([f"folder:{good}", "--image-size", "8"], "--image-size must be at least 16"),
        (["synthetic", "--meta-set", f"folder:{stray}"], "--meta-set folder:PATH needs --dataset folder:PATH"),
        ([f"folder:{good}", "--workers", "-1"], "--workers must be non-negative"),
    ]


def test_bad_folders_and_flags_one_line_exit_2(tmp_path, capsys):
    for extra, msg in bad_trees(tmp_path):
        out = tmp_path / "out"
        argv = ["--dataset", extra[0], "--image-size", str(SIZE), "--depth", "10", "--width", "1", "--epochs", "1",
                "--batch-size", "2", "--method", "erm,lrw-random", "--workers", "0", "--device", "cpu",
                "--out", str(out), *extra[1:]]  # the last of a repeated flag counts
        with pytest.raises(SystemExit) as e:
            molere_cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1, (extra, err)
        assert not out.exists() or not any(out.glob("*.pt")), extra  # nothing trained


def test_subset_skew_noise_and_clean_meta_set_on_a_folder(tmp_path):
    """--train-subset, --imbalance, --noise and --meta-set clean:N pick images of a folder as they
    pick CIFAR's: each kept image still carries its own folder's class as y_true, the skew holds,
    the clean meta set keeps its true labels."""
    root = tiny_tree(tmp_path, classes=("a", "b", "c", "d"), train=10)
    cfg = molere.Config(dataset=f"folder:{root}", image_size=SIZE, train_subset=32, imbalance=4.0,
                        noise="uniform:0.5", meta_set="clean:4")
    data = molere_data.load_data(cfg, torch.device("cpu"))
    counts = torch.bincount(data.y_true, minlength=4).tolist()
    assert counts == [8, 5, 3, 2], counts  # 8 * 4^(-c/3) of the balanced 8 per class
    names = [os.path.basename(os.path.dirname(p)) for p in data.x.paths]
    assert names == [["a", "b", "c", "d"][c] for c in data.y_true.tolist()]
    assert data.noisy.any() and torch.equal(data.y[data.meta_mask], data.y_true[data.meta_mask])
    assert int(data.meta_mask.sum()) == 4


def test_resume_refuses_data_that_changed(tmp_path, capsys):
    """A checkpoint keeps a fingerprint of the data (a folder's files and their sizes, labels, the
    noise, the test set, the meta set): an image added to the folder, one removed from its test
    set, or another noise draw between a stop and --resume is refused in one line naming what
    changed, and the checkpoint is left as it was; unchanged data resumes."""
    root = tiny_tree(tmp_path / "pets")
    out = tmp_path / "out"
    argv = ["--dataset", f"folder:{root}", "--image-size", "16", "--arch", "resnet32", "--method", "erm",
            "--epochs", "2", "--batch-size", "6", "--eval-every", "0", "--workers", "0", "--out", str(out)]
    run_main(argv + ["--stop-after", "1"], capsys)
    ckpt = out / "folder-pets-erm-seed0.pt"
    before = ckpt.read_bytes()
    write_folder(str(tmp_path / "extra"), ("cat",), 1, seed=5)
    os.replace(tmp_path / "extra" / "cat" / "0.jpg", tmp_path / "pets" / "train" / "cat" / "new.jpg")
    test_image = tmp_path / "pets" / "test" / "dog" / "0.jpg"
    for change, says in ((lambda: None, "the pool's images"),
                         (lambda: os.replace(test_image, tmp_path / "aside.jpg"), "the test set")):
        change()
        with pytest.raises(SystemExit) as e:
            molere_cli.main(argv + ["--resume"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err and "changed" in err, err
        assert "label noise" not in err  # there is none: an added image changes the labels, not a noise draw
        assert ckpt.read_bytes() == before  # nothing overwritten
    os.remove(tmp_path / "pets" / "train" / "cat" / "new.jpg")  # only the test set differs now
    with pytest.raises(SystemExit):
        molere_cli.main(argv + ["--resume"])
    assert "the pool's images" not in capsys.readouterr().err
    os.replace(tmp_path / "aside.jpg", test_image)  # the data as it was: the run resumes
    # an image rewritten at the same size (as when two of one size swap): names and sizes agree, times do not
    a, b = tmp_path / "pets" / "train" / "dog" / "1.jpg", tmp_path / "pets" / "train" / "dog" / "2.jpg"
    a_bytes, b_bytes, a_stat, b_stat = a.read_bytes(), b.read_bytes(), os.stat(a), os.stat(b)
    b.write_bytes(a_bytes[:len(b_bytes)].ljust(len(b_bytes), b"\0"))
    with pytest.raises(SystemExit):
        molere_cli.main(argv + ["--resume"])
    err = capsys.readouterr().err
    assert "modification times" in err and "label noise" not in err and "the pool's images" not in err, err
    b.write_bytes(b_bytes)
    os.utime(a, ns=(a_stat.st_atime_ns, a_stat.st_mtime_ns))
    os.utime(b, ns=(b_stat.st_atime_ns, b_stat.st_mtime_ns))
    text = run_main(argv + ["--resume"], capsys).out
    assert "resumed" in text and len(molere_io.read_results(str(out / "results.jsonl"))) == 1


def documented_start(name):
    """The command of docs/usage.md's starting point `name` (small, large), as a molere.py argv."""
    import shlex
    text = open(os.path.join(ROOT, "docs", "usage.md")).read()
    block = text.split(f"<!-- start {name} -->", 1)[1].split("<!-- /start -->", 1)[0]
    code = block.split("```bash", 1)[1].split("```", 1)[0]
    command = " ".join(line.rstrip("\\").strip() for line in code.splitlines() if line.strip() and not line.startswith("#"))
    argv = shlex.split(command)
    assert argv[:2] == ["python", "molere.py"], argv
    return argv[2:]


def test_the_documented_starting_points_run(tmp_path, capsys):
    """docs/usage.md's two starting points for a folder of one's own, run on a generated folder of 180
    training images: every flag is checked against the folder for the whole plan (ERM and MOLERE), then
    ERM trains one epoch (--stop-after 1). The small one runs as written. The large one is written for tens of thousands of images on a GPU: here its batch and
    image size are lowered (--batch-size 8 --image-size 32, the only changes) so the flags are checked
    together on a folder a test can afford."""
    import torchvision
    torch.manual_seed(fresh_seed())
    classes = ("cat", "dog", "owl")
    write_folder(str(tmp_path / "mine" / "train"), classes, 60, seed=0)
    write_folder(str(tmp_path / "mine" / "test"), classes, 8, seed=1)
    for arch in ("resnet18", "resnet50"):
        torch.save(torchvision.models.get_model(arch).state_dict(), tmp_path / f"{arch}.pt")
    for name, extra in (("small", []), ("large", ["--batch-size", "8", "--image-size", "32"])):
        argv = [str(tmp_path / "mine") if a == "folder:PATH" else a for a in documented_start(name)]
        argv = ["folder:" + a if a == str(tmp_path / "mine") else a for a in argv]
        argv = [str(tmp_path / a) if a.endswith(".pt") else a for a in argv]
        argv = [str(tmp_path / name) if a == "runs/mine" else a for a in argv] + extra + ["--device", "cpu"]
        out = run_main(argv + ["--stop-after", "1"], capsys)  # every flag checked against the folder, then one epoch
        assert "stopped after 1 epoch(s)" in out.out and "error" not in out.err, (name, out.out[-500:], out.err)
        assert not [line for line in out.err.splitlines() if "Warning" in line], out.err
        log = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert [(e["method"], e["epoch"]) for e in log] == [("erm", 1)] and math.isfinite(log[0]["loss"]), log


def test_default_workers_fit_the_cores_and_more_are_honoured_with_one_line(tmp_path, capsys):
    """--workers by default is at most the cores this process may use (no DataLoader warning); an explicit
    value above that is kept, with one line saying so."""
    root = tiny_tree(tmp_path / "pets")
    argv = ["--dataset", f"folder:{root}", "--image-size", "16", "--arch", "resnet32", "--method", "erm",
            "--batch-size", "6", "--out", str(tmp_path / "out")]
    cores = len(os.sched_getaffinity(0))
    args, *_ = molere_cli.setup(argv)
    assert args.workers == min(4, cores) and "--workers" not in capsys.readouterr().out
    args, *_ = molere_cli.setup(argv + ["--workers", str(cores + 3)])
    said = [line for line in capsys.readouterr().out.splitlines() if "--workers" in line]
    assert args.workers == cores + 3 and len(said) == 1 and f"the {cores} cores" in said[0], said
