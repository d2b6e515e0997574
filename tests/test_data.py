"""The data a run trains on, each choice against what it promises: label noise (uniform, pair,
instance-dependent), class skew, the meta sets (clean, from outside a long-tailed pool), the spurious
set, the synthetic set at any size, the data draw (one for every seed, or each seed its own), and
CIFAR files (the pickle reader, files that would run code, missing or corrupt data)."""
import math
import os
import pickle

import numpy as np
import pytest
import torch

import molere
import molere_cli
import molere_data
import molere_io
from helpers import CPU, TINY, Boom, fresh_seed, records_of, run_main, write_cifar
from molere import ConfigError


def test_synthetic_at_a_given_size_and_side():
    """synthetic:N:SIDE: N training images of SIDE x SIDE pixels and CIFAR's 10,000 test images; the
    plain `synthetic` is the demo set, exactly as make_synthetic()."""
    data = molere_data.load_data(molere.Config(dataset="synthetic:500:8"), CPU)
    assert data.x.shape == (500, 3, 8, 8) and data.x_test.shape == (10_000, 3, 8, 8)
    assert set(data.y_true.tolist()) == set(range(10)) and data.classes == 10
    x, y, *_ = molere_data.make_synthetic()
    plain = molere_data.load_data(molere.Config(dataset="synthetic"), CPU)
    assert torch.equal(plain.x, x) and torch.equal(plain.y, y) and plain.x.shape == (2000, 3, 32, 32)
    for bad in ("synthetic:", "synthetic:50", "synthetic:500:4", "synthetic:5e3", "synthetic:500:8:1"):
        with pytest.raises(ConfigError, match="synthetic:N"):
            molere.Config(dataset=bad)


def test_data_draw_fixed_is_one_draw_and_seed_is_each_seeds_own():
    """--data-draw fixed: the same images, subset, noise and meta set for every seed (and what every
    earlier study had); seed: another draw of each for another seed, the same again for the same seed."""
    cfg = lambda draw: molere.Config(dataset="synthetic", train_subset=600, noise="uniform:0.4",
                                     meta_set="clean:50", imbalance=2.0, data_draw=draw)
    load = lambda draw, seed: molere_data.load_data(cfg(draw), CPU, seed=seed)
    a, b = load("fixed", 0), load("fixed", 5)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.meta_mask, b.meta_mask)
    assert a.fingerprint == b.fingerprint
    c, d, e = load("seed", 0), load("seed", 1), load("seed", 1)
    assert d.fingerprint == e.fingerprint and torch.equal(d.y, e.y)
    assert all(c.fingerprint[k] != d.fingerprint[k] for k in c.fingerprint), (c.fingerprint, d.fingerprint)
    assert all(c.fingerprint[k] != a.fingerprint[k] for k in ("the pool's images", "the label noise"))
    assert int(c.noisy.sum()) != int(d.noisy.sum()) or not torch.equal(c.noisy, d.noisy)
    with pytest.raises(ConfigError, match="--data-draw"):
        molere.Config(data_draw="each")


def test_a_plan_under_data_draw_seed_trains_each_seed_on_its_own_draw(tmp_path, capsys):
    """Through the command line: two seeds, one process, each record's flipped labels those of its
    own seed's draw (load_data with that seed), not the first seed's."""
    import molere_io
    flags = ["--dataset", "synthetic", "--train-subset", "200", "--noise", "uniform:0.4", "--data-draw", "seed",
             "--method", "erm", "--epochs", "1", "--seeds", "3", "4", "--out", str(tmp_path)] + TINY
    run_main(flags, capsys)
    rows = {r["seed"]: r for r in molere_io.read_results(str(tmp_path / "results.jsonl"))}
    cfg = molere.Config(dataset="synthetic", train_subset=200, noise="uniform:0.4", data_draw="seed")
    for seed in (3, 4):
        want = molere_data.load_data(cfg, CPU, seed=seed).noisy.nonzero().squeeze(1).tolist()
        assert rows[seed]["noisy"] == want, seed
    assert rows[3]["noisy"] != rows[4]["noisy"]


@pytest.mark.parametrize("p", [0.2, 0.9])
def test_uniform_noise_flips_to_another_class_at_the_stated_rate(p):
    y = torch.arange(10_000) % 10
    noisy = molere_data.add_noise(y, f"uniform:{p}", 10)
    assert abs(float((noisy != y).float().mean()) - p) < 0.02
    moved = noisy[noisy != y] - y[noisy != y]
    counts = torch.bincount(moved % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.7 * counts[1:].float().mean()  # every other class, evenly


@pytest.mark.parametrize("kind", ["uniform", "pair", "instance"])
def test_label_noise_and_the_clean_meta_set(kind):
    cfg = molere.Config(dataset="synthetic", train_subset=1000, noise=f"{kind}:0.4", meta_set="clean:50")
    data = molere_data.load_data(cfg, torch.device("cpu"))
    again = molere_data.load_data(cfg, torch.device("cpu"))
    assert torch.equal(data.y, again.y)  # fixed, whatever the seed
    meta = data.meta_mask
    assert int(meta.sum()) == 50 and torch.bincount(data.y[meta], minlength=10).tolist() == [5] * 10
    assert torch.equal(data.y[meta], data.y_true[meta])  # the meta set keeps its true labels
    flipped = (data.y != data.y_true) & ~meta
    rate = float(flipped.sum()) / int((~meta).sum())
    assert abs(rate - 0.4) < 0.06, rate  # 950 draws: 4 standard deviations
    if kind == "pair":
        assert torch.equal(data.y[flipped], (data.y_true[flipped] + 1) % 10)


def test_instance_noise_depends_on_the_image():
    """--noise instance:p (Xia et al. 2020): the flip rate is p, no label "flips" to itself, and
    where a label moves is the image's own: the flipped copies of one image agree on their new
    class (uniform noise, the contrast, scatters them), while the images of one class move to
    more than one class (not pair noise)."""
    g = torch.Generator().manual_seed(fresh_seed())
    copies, n = 20, 500
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).repeat(copies, 1, 1, 1)
    y = (torch.arange(n) % 10).repeat(copies)

    def agreement(noisy):  # per image with 2+ flipped copies: the share of them at its commonest new class
        shares = []
        for i in range(n):
            moved = noisy[i::n][noisy[i::n] != y[i]]
            if len(moved) > 1:
                shares.append(torch.bincount(moved, minlength=10).max() / len(moved))
        return float(torch.stack(shares).mean())

    noisy = molere_data.add_noise(y, "instance:0.4", 10, x)
    assert abs(float((noisy != y).float().mean()) - 0.4) < 0.02  # 10,000 draws: 4 standard deviations
    assert agreement(noisy) > 0.9 > 0.5 > agreement(molere_data.add_noise(y, "uniform:0.4", 10))
    for c in range(10):
        moved = noisy[(y == c) & (noisy != y)]
        assert (moved != c).all() and len(moved.unique()) >= 2


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


def test_class_skew_profile():
    rho = 10.0
    data = molere_data.load_data(molere.Config(dataset="synthetic", train_subset=1000, imbalance=rho), torch.device("cpu"))
    plain = molere_data.load_data(molere.Config(dataset="synthetic", train_subset=1000), torch.device("cpu"))
    counts = torch.bincount(data.y, minlength=10).tolist()
    n_max = int(torch.bincount(plain.y, minlength=10).min())
    assert counts == [int(n_max * rho ** (-c / 9)) for c in range(10)]  # class 0 largest, 10 times the last
    pool = {bytes(img.numpy()) for img in plain.x}  # a subset of the balanced pool, test set untouched
    assert all(bytes(img.numpy()) in pool for img in data.x) and torch.equal(data.y_test, plain.y_test)


def test_an_outside_meta_set_leaves_the_long_tailed_pool_whole():
    skew = dict(dataset="synthetic", train_subset=1000, imbalance=10.0)
    inside = molere_data.load_data(molere.Config(**skew), CPU)
    data = molere_data.load_data(molere.Config(**skew, meta_set="outside:50"), CPU)
    # the pool is the one without a meta set, every tail image kept and none marked as S_val
    assert torch.equal(data.x, inside.x) and torch.equal(data.y, inside.y) and not data.meta_mask.any()
    assert torch.bincount(data.y_meta, minlength=10).tolist() == [5] * 10
    # the meta images are training images of the source, none of them in the balanced subset
    x_all, y_all, *_ = molere_data.make_synthetic()
    subset = molere_data.balanced_subset(y_all, 1000, 10)
    flat = lambda t: {bytes(r.numpy().tobytes()) for r in t}
    assert flat(data.x_meta) <= flat(x_all) and not flat(data.x_meta) & flat(x_all[subset])
    for img, label in zip(data.x_meta[:10], data.y_meta[:10]):  # each keeps its true label
        assert label == y_all[(x_all == img).flatten(1).all(1)][0]
    # clean:N takes its images out of the pool instead (half the smallest class at most)
    with pytest.raises(molere_data.DataError, match="half the smallest class"):
        molere_data.load_data(molere.Config(**skew, meta_set="clean:60"), CPU)
    with pytest.raises(molere_data.DataError, match="give it"):
        molere_data.load_data(molere.Config(dataset="synthetic", meta_set="outside:50"), CPU)


@pytest.mark.slow
def test_an_outside_meta_set_is_every_fixed_methods_s_val(tmp_path, capsys):
    rows = records_of(tmp_path, capsys, "--dataset", "synthetic", "--train-subset", "300", "--imbalance", "2",
                      "--meta-set", "outside:20", "--delta", "0.25", "--method", "erm-tr,mwn,molere", "--epochs", "2")
    assert rows["erm-tr"]["val_mask"] == rows["mwn"]["val_mask"] == []  # S_tr = S: the meta set is outside
    assert rows["molere"]["val_size"] > 0  # MOLERE splits the pool itself
    assert all("meta_acc" in e for e in rows["mwn"]["log"])


def test_the_spurious_set_has_the_subpopulations_it_promises():
    x, y, xt, yt, classes, m, mt = molere_data.make_spurious()
    assert abs(float(m.float().mean()) - molere_data.SPURIOUS["minority"]) < 0.03
    assert int(mt.sum()) == len(yt) // 2  # the test set: half majority, half minority
    # the tint: the mean colour of a majority image is nearer its own class's mean colour than a
    # minority image's is
    colour = x.float().mean((2, 3))
    centre = torch.stack([colour[(y == c) & ~m].mean(0) for c in range(classes)])
    dist = (colour - centre[y]).norm(dim=1)
    assert dist[~m].mean() * 3 < dist[m].mean()
    # the pattern carries no colour: without noise and tint every image has the grey mean
    xs, *_ = molere_data.make_spurious(n_train=50, n_test=10, tint=0.0, noise=0.0)
    assert (xs.float().mean((1, 2, 3)) / 255 - 0.5).abs().max() < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_pickle_reader(tmp_path, name):
    _, written = write_cifar(str(tmp_path), name, 20 if name == "cifar10" else 200, 30, seed=fresh_seed())
    x, y, xt, yt, classes = molere_io.load_cifar(str(tmp_path), name, download=False)
    assert classes == (10 if name == "cifar10" else 100)
    src_x, src_y = written["train"]
    assert x.shape == (len(src_x), 3, 32, 32) and x.dtype == torch.uint8
    i = 7  # the first 1024 bytes of a row are the red plane, row-major
    assert np.array_equal(x[i, 0].numpy().ravel(), src_x[i, :1024])
    assert np.array_equal(x[i, 2, 31].numpy(), src_x[i, 2048 + 31 * 32:])
    assert np.array_equal(y.numpy(), src_y) and np.array_equal(yt.numpy(), written["test"][1])
    assert np.array_equal(xt.reshape(len(xt), -1).numpy(), written["test"][0])


@pytest.mark.slow
def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOOM_FILE", str(tmp_path / "ran"))
    folder, _ = write_cifar(str(tmp_path), "cifar10", 10, 10)
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:
        pickle.dump({"data": Boom(), "labels": [0]}, f)
    with pytest.raises(SystemExit) as e:
        molere_cli.main(["--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "data_batch_2 is not a readable CIFAR pickle" in err and "refused to load posix.system" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ran").exists()
    with open(os.path.join(folder, "data_batch_2"), "rb") as f:  # the check can fail: plain pickle runs it
        pickle.load(f)
    assert (tmp_path / "ran").exists()


@pytest.mark.slow
def test_missing_and_corrupt_data_one_line_exit_2(tmp_path, capsys):
    base = ["--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        molere_cli.main(base)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "cifar10 not found" in err and "cifar-10-batches-py" in err
    assert len(err.splitlines()) == 1
    folder, _ = write_cifar(str(tmp_path), "cifar10", 10, 10)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"this is not a pickle")
    with pytest.raises(SystemExit) as e:
        molere_cli.main(base)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "data_batch_3 is not a readable CIFAR pickle" in err
    assert len(err.splitlines()) == 1


def test_a_failed_download_removes_what_it_made(tmp_path, monkeypatch):
    """A download that fails half-way (here: after writing part of the archive) leaves no folder it created,
    and in a folder that was there, no partial archive; the error comes back as one line."""
    import torchvision
    def partial(url, root, filename=None, md5=None, **k):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, filename), "wb") as f:
            f.write(b"half an archive")
        raise OSError("connection reset\nby peer")
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", partial)
    why = molere_io.download_cifar(str(tmp_path / "new" / "data"), "cifar10")
    assert "OSError: connection reset" in why and "\n" not in why
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    molere_io.download_cifar(str(tmp_path / "mine"), "cifar10")
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]
