"""train.py: SmoothAdv and stability losses, warmup, and `fastsmooth train` -> `fastsmooth certify`."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastsmooth.attacks import SmoothAdvPGD
from fastsmooth.cli import main
from fastsmooth.data import DATASETS, TensorImageDataset
from fastsmooth.models import load_checkpoint, read_checkpoint
from fastsmooth.noises import Gaussian, Laplace, Uniform
from fastsmooth.results import read_results
from fastsmooth.backends import draw_noise
from fastsmooth.seeding import DOMAIN_TRAIN
from fastsmooth.train import (NoiseDraws, SmoothAdvLoss, StabilityLoss, sample_noise_copies, stability_loss, train,
                              warmup_epsilon)


# -- warmup ------------------------------------------------------------------------------------------


def test_warmup_ramp_values():
    assert [warmup_epsilon(0.8, e, 4) for e in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert [warmup_epsilon(0.5, e, 1) for e in range(3)] == [0.5, 0.5, 0.5]
    assert warmup_epsilon(0.5, 0, 0) == 0.5
    loss = SmoothAdvLoss(SmoothAdvPGD("l2", 1.0), epsilon=1.0, warmup=2)
    assert loss.attack.epsilon == 0.5          # epoch 0 from the start
    loss.set_epoch(1)
    assert loss.attack.epsilon == 1.0


class _Recorder:
    """A loss_fn that records the epochs the loop announces and the batch sizes it sees."""

    def __init__(self):
        self.epochs, self.sizes = [], []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __call__(self, model, x, y, noise, draws):
        self.sizes.append(x.shape[0])
        logits = model(x)
        return F.cross_entropy(logits, y), logits


def _tiny_data(n=40, size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TensorImageDataset(images, labels, DATASETS["digits"], "train")


def test_loop_announces_epochs_and_resumes_mid_ramp():
    data = _tiny_data()
    model = _net()
    rec = _Recorder()
    train(model, data, Gaussian(sigma=0.25), epochs=3, batch_size=16, progress=False, device="cpu", loss_fn=rec)
    assert rec.epochs == [0, 1, 2] and rec.sizes[:3] == [16, 16, 8]
    rec = _Recorder()
    train(model, data, Gaussian(sigma=0.25), epochs=3, batch_size=16, progress=False, device="cpu", loss_fn=rec,
          start_epoch=2)
    assert rec.epochs == [2]


# -- the losses --------------------------------------------------------------------------------------


def test_stability_loss_equals_the_formula():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 10, generator=g, dtype=torch.float64)
    b = torch.randn(7, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (7,), generator=g)
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    ce = -torch.log(p[torch.arange(7), y]).mean()
    kl = (p * (torch.log(p) - torch.log(q))).sum(1).mean()
    torch.testing.assert_close(stability_loss(a, b, y, 6.0), ce + 6.0 * kl)
    torch.testing.assert_close(stability_loss(a, b, y, 0.0), F.cross_entropy(a, y))
    torch.testing.assert_close(stability_loss(a, a, y, 3.0), F.cross_entropy(a, y))


class _Logged(nn.Module):
    """Wraps a model and keeps the inputs it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_stability_loss_uses_two_independent_draws():
    model = _Logged(_net())
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    loss, logits = StabilityLoss(2.0)(model, x, y, Laplace(sigma=0.5), NoiseDraws(1, 0, "cpu"))
    (batch,) = model.inputs
    assert batch.shape == (8, 1, 8, 8) and logits.shape == (4, 10)
    e1, e2 = batch[:4] - x, batch[4:] - x
    assert not torch.allclose(e1, e2)
    torch.testing.assert_close(loss, stability_loss(model.net(batch[:4]), model.net(batch[4:]), y, 2.0))


@pytest.mark.parametrize("multi", [False, True])
def test_smoothadv_loss(multi):
    model = _Logged(_net())
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    noise = Gaussian(sigma=0.25)
    fn = SmoothAdvLoss(SmoothAdvPGD("l2", 0.5, num_steps=2), epsilon=0.5, num_noise_vec=3, multi_noise=multi)
    loss, logits = fn(model, x, y, noise, NoiseDraws(2, 0, "cpu"))
    assert logits.shape == (4, 10) and loss.requires_grad
    # two attack steps on 4 x 3 copies, then the training batch
    assert [t.shape[0] for t in model.inputs] == [12, 12, 12 if multi else 4]
    # the noise is held fixed across the attack steps and reused for training
    eps0 = model.inputs[0].reshape(4, 3, 1, 8, 8) - x[:, None]
    eps1 = model.inputs[1].reshape(4, 3, 1, 8, 8) - x[:, None]
    assert (eps1 - eps0).reshape(4, 3, -1).std(dim=1).max() < 1e-5  # differ only by the shared delta
    k = 3 if multi else 1  # training copies: all noise copies (multi-noise) or the first
    moved = model.inputs[2].reshape(4, k, 64) - model.inputs[1].reshape(4, 3, 64)[:, :k]
    assert (moved - moved[:, :1]).abs().max() < 1e-5    # one shift per image across its copies,
    assert moved.norm(dim=2).max() <= 2 * 0.5 + 1e-5     # a difference of two deltas in the 0.5-ball
    assert moved.abs().max() > 1e-3                      # (fresh noise would differ by about 2.8)


def test_noise_copies_come_from_the_stream():
    """Training noise is the certification stream's in the training domain: copies 0, 1, ... of image
    index = epoch, consecutive across calls (no draw repeats another), never the certification words."""
    x = torch.zeros(3, 1, 4, 4)
    draws = NoiseDraws(seed=7, epoch=2, device="cpu")
    eps = sample_noise_copies(Uniform(scale=0.5), x, 5, draws)
    more = sample_noise_copies(Uniform(scale=0.5), x, 5, draws)
    assert eps.shape == (3, 5, 1, 4, 4) and eps.dtype == torch.float32
    assert float(eps.abs().max()) <= 0.5
    ref = draw_noise(Uniform(scale=0.5), 30, (1, 4, 4), seed=7, image_index=2, domain=DOMAIN_TRAIN)
    assert torch.equal(torch.cat([eps, more]).reshape(30, 1, 4, 4), ref)
    certify = draw_noise(Uniform(scale=0.5), 30, (1, 4, 4), seed=7, image_index=2)
    assert not torch.equal(ref, certify)


# -- the command line: train a checkpoint, certify it -----------------------------------------------


def _train_args(out, *extra):
    return ["train", "--train-size", "192", "--epochs", "1", "--batch", "64", "--lr", "0.05", "--no-progress",
            "--out", str(out), *extra]


def test_train_checkpoint_is_certified_by_the_cli(tmp_path, capsys):
    ckpt = tmp_path / "adv.pt"
    assert main(_train_args(ckpt, "--noise", "laplace", "--sigma", "0.5", "--adv-training", "--epsilon", "0.5",
                            "--num-steps", "1", "--num-noise-vec", "2", "--warmup", "2")) == 0
    err = capsys.readouterr().err
    assert "epoch 1" in err and "epsilon 0.25" in err  # warmup: half of epsilon in the first of 2 epochs
    state = read_checkpoint(ckpt)
    assert {"epoch", "arch", "state_dict", "optimizer", "noise"} <= set(state)
    assert state["epoch"] == 1 and state["arch"] == "cnn" and state["dataset"] == "mnist"
    assert state["noise"] == {"name": "laplace", "sigma": 0.5}
    assert state["training"]["method"] == "smoothadv" and state["training"]["norm"] == "l1"
    model, meta = load_checkpoint(ckpt)
    assert meta["num_classes"] == 10

    tsv = tmp_path / "adv.tsv"
    assert main(["certify", "--model", str(ckpt), "--samples", "200", "--n0", "20", "--max", "4",
                 "--batch", "110", "--out", str(tsv), "--no-progress"]) == 0
    results = read_results(str(tsv))
    assert [r.idx for r in results.rows] == [0, 1, 2, 3] and results.has_radius
    for r in results.rows:
        assert -1 <= r.predict < 10 and r.radius >= 0 and r.correct == (r.predict == r.label)
        assert (r.predict == -1) == (r.radius == 0)
    meta = json.loads((tmp_path / "adv.tsv.meta.json").read_text())
    assert meta["noise"]["name"] == "laplace" and meta["norm"] == "l1"


def test_train_resume_and_stability(tmp_path, capsys):
    ckpt = tmp_path / "stab.pt"
    base = _train_args(ckpt, "--noise", "uniform", "--stability-weight", "2")
    assert main(base) == 0
    assert read_checkpoint(ckpt)["training"] == {"method": "stability", "weight": 2.0}
    assert main(base[:4] + ["2"] + base[5:] + ["--resume"]) == 0  # --epochs 2, from epoch 1
    assert "resuming" in capsys.readouterr().err
    assert read_checkpoint(ckpt)["epoch"] == 2
    # a different noise does not resume silently
    assert main(_train_args(ckpt, "--noise", "gaussian", "--resume")) == 2
    assert "trained with noise" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--adv-training"], "--epsilon"),
    (["--adv-training", "--epsilon", "0.5", "--stability-weight", "1"], "exclude"),
    (["--adv-training", "--epsilon", "0.5", "--num-noise-vec", "0"], "--num-noise-vec"),
    (["--train-size", "0"], "--train-size"),
])
def test_train_rejects_bad_flags(tmp_path, capsys, extra, message):
    assert main(_train_args(tmp_path / "x.pt", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
