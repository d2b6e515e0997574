"""The data a run trains on: the synthetic set at any size, and the data draw (one for every seed, or
each seed its own)."""
import pytest
import torch

import molere
import molere_data
from molere import ConfigError

CPU = torch.device("cpu")


def test_synthetic_at_a_given_size_and_side():
    """synthetic:N:SIDE: N training images of SIDE x SIDE pixels and CIFAR's 10,000 test images; the plain `synthetic` is the demo set, exactly as make_synthetic()."""
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
    from helpers import TINY, run_main
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
