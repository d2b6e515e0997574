"""The classifiers f_theta besides the Wide-ResNet, and weight files: ResNet-32 at the paper's size,
a torchvision model with auxiliary heads, pretrained weights from a local file in the formats
people have."""
import pytest
import torch

import molere
import molere_cli
import molere_io
from helpers import fresh_seed, run_main
from kernels import weighted_cross_entropy


def test_resnet32_has_the_papers_size_and_returns_features():
    model = molere_io.ResNet32(10)
    assert sum(p.numel() for p in model.parameters()) == 464_154  # He et al.'s 0.46M
    logits, h = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10) and h.shape == (3, model.features)


@pytest.mark.slow
def test_a_torchvision_model_with_auxiliary_heads_trains_through_one_head():
    """tv:googlenet is built with its auxiliary classifiers off (in train mode it would return a
    tuple of three outputs): one logits tensor for our classes in train and eval mode, and the
    fast meta-gradient equals the reference on it."""
    fresh_seed()
    model = molere.make_model(molere.Config(dataset="synthetic", arch="tv:googlenet"), 5).double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (4,))
    for train in (True, False):
        logits, h = model.train(train)(x)
        assert logits.shape == (4, 5) and h.shape == (4, 1024)
    model.train()
    rng = molere.rng_state(torch.device("cpu"))
    w = torch.ones(4, dtype=torch.float64)
    with molere.replay_rng(rng, x.device):
        grads = torch.autograd.grad(weighted_cross_entropy(model(x)[0], y, w), list(model.parameters()))
    state = torch.get_rng_state()
    _, fast = molere.weight_grad_fast(model, x, y, grads, x, y, 0.1, rng)
    torch.set_rng_state(state)  # the validation forward draws the same dropout masks in both paths
    _, ref = molere.weight_grad_reference(model, x, y, w, x, y, 0.1, rng)
    assert ref.abs().sum() > 1e-8
    torch.testing.assert_close(fast, ref, rtol=1e-7, atol=1e-12)


@pytest.mark.slow
def test_pretrained_torchvision_weights_from_a_local_file(tmp_path, capsys):
    """--arch tv:resnet18 --weights FILE: the file's tensors are in the model that trains (its own
    head replaced for our classes), a run goes end to end, and a file made for another model is
    refused in one line before any training."""
    import torchvision
    torch.manual_seed(fresh_seed())
    good, bad = tmp_path / "r18.pt", tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    torch.save(torchvision.models.resnet34().state_dict(), bad)
    cfg = molere.Config(dataset="synthetic", arch="tv:resnet18", weights=str(good))
    model = molere.make_model(cfg, 10)
    saved = torch.load(good, weights_only=True)
    assert torch.equal(model.body.conv1.weight, saved["conv1.weight"]) and model.fc.out_features == 10
    assert isinstance(model.body.fc, torch.nn.Identity) and model.features == 512
    out = tmp_path / "out"
    argv = ["--dataset", "synthetic", "--train-subset", "200", "--arch", "tv:resnet18", "--epochs", "1",
            "--batch-size", "20", "--method", "lrw-random", "--out", str(out)]
    run_main(argv + ["--weights", str(good)], capsys)
    assert len(molere_io.read_results(str(out / "results.jsonl"))) == 1
    with pytest.raises(SystemExit) as e:
        molere_cli.main(argv + ["--weights", str(bad), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "does not fit tv:resnet18" in err, err


@pytest.mark.slow
def test_weights_in_the_formats_people_have(tmp_path):
    """--weights reads a state_dict, {'state_dict'}, {'model'} (torchvision's references),
    {'model_state_dict'}, DDP's `module.` prefix and a checkpoint of molere.py itself (its
    classifier's backbone); a file that would run code, a file torch cannot read and a dict of
    something else are each refused in one line that says which."""
    import torchvision
    torch.manual_seed(fresh_seed())
    sd = torchvision.models.resnet18().state_dict()
    ours = {"model": {**{"body." + k: v for k, v in sd.items() if not k.startswith("fc.")},
                      "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)},
            "config": {"arch": "tv:resnet18"}, "method": "erm", "epoch": 3}
    for name, obj in (("plain", sd), ("sd", {"state_dict": sd}), ("model", {"model": sd, "epoch": 90}),
                      ("msd", {"model_state_dict": sd}), ("ddp", {"module." + k: v for k, v in sd.items()}),
                      ("ours", ours)):
        torch.save(obj, tmp_path / f"{name}.pt")
        model = molere_io.load_torchvision("resnet18", str(tmp_path / f"{name}.pt"))
        assert torch.equal(model.conv1.weight, sd["conv1.weight"]), name
        assert torch.equal(model.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"]), name
    torch.save(torchvision.models.resnet18(), tmp_path / "pickled.pt")  # a whole module: runs code to load
    (tmp_path / "notes.txt").write_text("101 dalmatians\n")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pt")
    for name, says in (("pickled.pt", "would run code when loaded"), ("notes.txt", "is not a file torch.load can read"),
                       ("other.pt", "found a dict with keys ['epoch', 'lr'], not a state_dict")):
        with pytest.raises(molere_io.DataError) as e:
            molere_io.load_torchvision("resnet18", str(tmp_path / name))
        assert says in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


@pytest.mark.slow
def test_a_checkpoint_fine_tuned_on_any_class_count_loads_its_backbone_with_one_line(tmp_path, capsys):
    """A torchvision-format {'model': state_dict} of a ResNet-18 fine-tuned on 10 classes (head [10, 512]) and
    one on 1,000: the backbone's tensors load exactly, the head's are dropped with one line naming them,
    and a run on 10-class data goes end to end; a backbone that does not fit is still refused."""
    import torchvision
    torch.manual_seed(fresh_seed())
    capsys.readouterr()  # the seed's line
    for classes in (10, 1000):
        sd = torchvision.models.resnet18(num_classes=classes).state_dict()
        path = tmp_path / f"ft{classes}.pt"
        torch.save({"model": sd, "epoch": 30}, path)
        model = molere_io.load_torchvision("resnet18", str(path))
        assert torch.equal(model.conv1.weight, sd["conv1.weight"])
        assert torch.equal(model.layer4[1].bn2.running_mean, sd["layer4.1.bn2.running_mean"])
        said = capsys.readouterr().out.strip().splitlines()
        assert len(said) == 1 and f"fc.weight [{classes}, 512]" in said[0] and "dropped" in said[0], said
    out = tmp_path / "out"
    argv = ["--dataset", "synthetic", "--train-subset", "200", "--arch", "tv:resnet18", "--epochs", "1",
            "--batch-size", "20", "--method", "erm", "--out", str(out), "--weights", str(tmp_path / "ft10.pt")]
    text = run_main(argv, capsys).out
    assert len(molere_io.read_results(str(out / "results.jsonl"))) == 1
    assert sum("are dropped" in line for line in text.splitlines()) <= 1  # said once, or already said above
    bad = torchvision.models.resnet34(num_classes=10).state_dict()
    torch.save({"model": bad}, tmp_path / "r34.pt")
    with pytest.raises(molere_io.DataError, match="does not fit tv:resnet18"):
        molere_io.load_torchvision("resnet18", str(tmp_path / "r34.pt"))
