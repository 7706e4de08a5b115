"""Architectures, NormalizeLayer and Cohen-style checkpoints."""

import os

import pytest
import torch
from torch import nn

from fastsmooth.models import (ARCHITECTURES, CheckpointError, NormalizeLayer, get_architecture,
                               load_checkpoint, read_checkpoint)
from fastsmooth.noises import Gaussian, Laplace
from fastsmooth.train import save_checkpoint


def _params(module):
    return sum(p.numel() for p in module.parameters())


# -- NormalizeLayer --------------------------------------------------------------------------------


def test_normalize_layer():
    layer = NormalizeLayer([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])
    x = torch.rand(2, 3, 4, 5)
    out = layer(x)
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.5) / 0.5)
    assert torch.allclose(out[:, 2], x[:, 2] / 2.0)
    assert layer.state_dict() == {}  # Cohen's layer has no state either: their checkpoints load
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        layer(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError):
        NormalizeLayer([0.1], [0.0])


# -- architectures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,dataset,shape", [
    ("cnn", "mnist", (1, 28, 28)),
    ("cnn", "digits", (1, 8, 8)),
    ("cnn", "cifar10", (3, 32, 32)),
    ("lenet", "mnist", (1, 28, 28)),
    ("lenet", "digits", (1, 8, 8)),
    ("lenet", "cifar10", (3, 32, 32)),
    ("cifar_resnet20", "cifar10", (3, 32, 32)),
    ("cifar_resnet20", "fashion-mnist", (1, 28, 28)),
])
def test_output_shapes(arch, dataset, shape):
    torch.manual_seed(0)
    model = get_architecture(arch, dataset).eval()
    assert isinstance(model, nn.Sequential) and isinstance(model[0], NormalizeLayer)
    with torch.no_grad():
        out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_small_nets_are_small():
    assert _params(get_architecture("cnn", "mnist")) < 300_000
    assert _params(get_architecture("lenet", "cifar10")) == 62_006  # the classic LeNet-5 count


def test_cifar_resnet_layout_matches_cohen():
    model = get_architecture("cifar_resnet110", "cifar10")
    keys = model.state_dict().keys()
    # Names and counts of Cohen et al.'s archs/cifar_resnet.py (bearpaw), under Sequential index 1.
    for key in ("1.conv1.weight", "1.bn1.running_mean", "1.layer1.0.conv1.weight", "1.layer1.17.bn2.bias",
                "1.layer2.0.downsample.0.weight", "1.layer2.0.downsample.1.num_batches_tracked",
                "1.layer3.17.conv2.weight", "1.fc.weight", "1.fc.bias"):
        assert key in keys, key
    assert not any(k.startswith("0.") for k in keys)
    assert "1.layer1.0.downsample.0.weight" not in keys
    assert _params(model) == 1_730_714
    assert _params(get_architecture("cifar_resnet20", "cifar10")) == 272_474
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_resnet50_torchvision_names():
    model = get_architecture("resnet50", "imagenet")
    state = model.state_dict()
    assert _params(model) == 25_557_032  # torchvision.models.resnet50
    assert state["1.fc.weight"].shape == (1000, 2048)
    assert state["1.layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert state["1.layer3.0.downsample.0.weight"].shape == (1024, 512, 1, 1)
    assert state["1.layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


def test_architecture_errors():
    with pytest.raises(ValueError, match="known architectures: cnn, lenet"):
        get_architecture("vgg16", "cifar10")
    with pytest.raises(ValueError, match="num_classes"):
        get_architecture("cifar_resnet20", "imagefolder")
    model = get_architecture("cifar_resnet20", "imagefolder", num_classes=7)
    assert model[1].fc.out_features == 7
    assert set(ARCHITECTURES) == {"cnn", "lenet", "cifar_resnet20", "cifar_resnet110", "resnet50"}


# -- checkpoints -----------------------------------------------------------------------------------


def _trained_like(arch, dataset, seed=0):
    torch.manual_seed(seed)
    model = get_architecture(arch, dataset)
    with torch.no_grad():  # make BatchNorm statistics non-trivial
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _same_outputs(a, b, shape):
    x = torch.rand(4, *shape)
    with torch.no_grad():
        return torch.allclose(a(x), b(x))


def test_checkpoint_round_trip(tmp_path):
    model = _trained_like("cnn", "digits")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pth.tar", model, "cnn", 7, optimizer,
                           Laplace(sigma=0.5), "digits")
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth.tar"]  # no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(raw)  # Cohen's keys
    loaded, meta = load_checkpoint(path)
    assert meta["arch"] == "cnn" and meta["dataset"] == "digits" and meta["epoch"] == 7
    assert meta["noise"] == {"name": "laplace", "sigma": 0.5} and meta["num_classes"] == 10
    assert not loaded.training
    assert _same_outputs(model, loaded, (1, 8, 8))
    # Overwriting is atomic too.
    save_checkpoint(path, model, "cnn", 8, None, None, "digits")
    assert load_checkpoint(path)[1]["epoch"] == 8


def test_cohen_checkpoint_with_dataparallel_prefixes(tmp_path):
    model = _trained_like("cifar_resnet20", "cifar10")
    state = model.state_dict()
    # Cohen's train.py: {'epoch', 'arch', 'state_dict', 'optimizer'}, no dataset entry; their
    # NormalizeLayer had no state. A DataParallel around the Sequential prefixes "module."; one
    # around the net (their resnet50) puts it after "1.".
    for name, keys in (("outer", {f"module.{k}": v for k, v in state.items()}),
                       ("inner", {k.replace("1.", "1.module.", 1): v for k, v in state.items()})):
        path = tmp_path / f"{name}.pth.tar"
        torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": keys, "optimizer": {}}, path)
        loaded, meta = load_checkpoint(path)
        assert meta["dataset"] == "cifar10" and meta["noise"] is None
        assert _same_outputs(model, loaded, (3, 32, 32))


def test_bare_state_dict_and_old_batchnorm(tmp_path):
    model = _trained_like("lenet", "mnist")
    bare = {k[2:]: v for k, v in model.state_dict().items()}  # the net's own keys, as torchvision's
    path = tmp_path / "bare.pt"
    torch.save(bare, path)
    with pytest.raises(CheckpointError, match="no 'arch' entry"):
        load_checkpoint(path, "mnist")
    loaded, _ = load_checkpoint(path, "mnist", arch="lenet")
    assert _same_outputs(model, loaded, (1, 28, 28))
    # Checkpoints older than PyTorch 0.4.1 have no num_batches_tracked.
    model = _trained_like("cnn", "mnist")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"arch": "cnn", "state_dict": state, "dataset": "mnist"}, path)
    assert _same_outputs(model, load_checkpoint(path)[0], (1, 28, 28))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(junk)
    good = save_checkpoint(tmp_path / "good.pt", _trained_like("cnn", "mnist"), "cnn", 1, None,
                           Gaussian(sigma=0.25), "mnist")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)

    state = torch.load(good, weights_only=True)
    broken = dict(state, state_dict={k: v for k, v in state["state_dict"].items() if "hidden" not in k})
    torch.save(broken, tmp_path / "missing_keys.pt")
    with pytest.raises(CheckpointError, match=r"missing 2 keys \(1\.hidden\.weight, 1\.hidden\.bias\)"):
        load_checkpoint(tmp_path / "missing_keys.pt")
    torch.save(dict(state, arch="vit"), tmp_path / "arch.pt")
    with pytest.raises(CheckpointError, match="unknown architecture 'vit'"):
        load_checkpoint(tmp_path / "arch.pt")
    torch.save({"arch": "cnn"}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="no 'state_dict' entry"):
        load_checkpoint(tmp_path / "nostate.pt")
    # A checkpoint for 8x8 digits read as 28x28 MNIST: shapes differ.
    digits = save_checkpoint(tmp_path / "digits.pt", _trained_like("cnn", "digits"), "cnn", 1, None, None,
                             "digits")
    with pytest.raises(CheckpointError, match=r"shape mismatch for 1 tensors \(1\.hidden\.weight"):
        load_checkpoint(digits, "mnist")
    torch.save({"arch": "lenet", "state_dict": {}}, tmp_path / "nodata.pt")
    with pytest.raises(CheckpointError, match="pass dataset="):
        load_checkpoint(tmp_path / "nodata.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fastsmooth-should-not-exist",))


def test_checkpoint_never_runs_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"arch": "cnn", "state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(path)
    assert not os.path.exists("/tmp/fastsmooth-should-not-exist")
