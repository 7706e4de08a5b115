"""The training loop basics, `fastsmooth train`, and the cached embedded default model."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsmooth import embedded
from fastsmooth import train as train_mod
from fastsmooth.data import get_dataset
from fastsmooth.models import get_architecture, load_checkpoint
from fastsmooth.noises import ExpInf, Gaussian, Laplace
from fastsmooth.train import evaluate, make_optimizer, make_scheduler, train

REPO = Path(__file__).resolve().parents[1]


def _digits_model(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_architecture("cnn", "digits")


# -- the loop --------------------------------------------------------------------------------------


def test_train_learns_reproducibly_and_leaves_global_rng_alone():
    data = get_dataset("digits", "train")
    noise = Gaussian(sigma=0.25)
    before = torch.random.get_rng_state()
    a, b = _digits_model(), _digits_model()
    result = train(a, data, noise, epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False, seed=3)
    train(b, data, noise, epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [h.epoch for h in result.history] == [1, 2] and result.epochs == 2
    assert result.history[1].loss < result.history[0].loss
    assert not a.training
    _, accuracy = evaluate(a, get_dataset("digits", "test"), noise, device="cpu")
    assert accuracy > 0.7


def test_loss_hook_and_clean_training():
    data = get_dataset("digits", "test")
    seen = []

    def loss_fn(model, x, y, noise, generator):
        seen.append((x.shape, noise, generator.device.type))
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y), logits

    train(_digits_model(), data, None, epochs=1, batch_size=100, device="cpu", progress=False, loss_fn=loss_fn)
    assert len(seen) == 4 and seen[0] == ((100, 1, 8, 8), None, "cpu")


@pytest.mark.parametrize("noise", [Laplace(sigma=0.5), ExpInf(k=1.0, sigma=0.5)])
def test_other_noises_train(noise):
    data = get_dataset("digits", "test")
    result = train(_digits_model(), data, noise, epochs=1, batch_size=128, device="cpu", progress=True)
    assert torch.isfinite(torch.tensor(result.history[0].loss))


def test_schedules():
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, lr=1.0)
    sched = make_scheduler(opt, "step", epochs=6, steps_per_epoch=2, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0] * 4 + [0.5] * 4 + [0.25] * 4
    opt = make_optimizer(model, lr=1.0)
    sched = make_scheduler(opt, "cosine", epochs=2, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(0.5) and lrs[-1] < 0.03
    resumed = make_scheduler(make_optimizer(model, lr=1.0), "cosine", epochs=2, steps_per_epoch=5,
                             start_epoch=1)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_scheduler(opt, "linear", 1, 1)


def test_train_command_and_resume(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    out = tmp_path / "model.pth.tar"
    args = parser.parse_args(["--dataset", "digits", "--noise", "laplace", "--sigma", "0.5", "--epochs", "1",
                              "--batch", "128", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert train_mod.run(args) == 0
    model, meta = load_checkpoint(out)
    assert meta["epoch"] == 1 and meta["noise"] == {"name": "laplace", "sigma": 0.5}
    assert meta["dataset"] == "digits" and meta["arch"] == "cnn"
    args = parser.parse_args(["--dataset", "digits", "--noise", "laplace", "--sigma", "0.5", "--epochs", "2",
                              "--batch", "128", "--out", str(out), "--device", "cpu", "--no-progress",
                              "--resume"])
    assert train_mod.run(args) == 0
    assert load_checkpoint(out)[1]["epoch"] == 2
    assert "resuming from" in capsys.readouterr().err


# -- the embedded default --------------------------------------------------------------------------

TINY = dict(epochs=1, train_size=256)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSMOOTH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir(cache, monkeypatch):
    assert embedded.cache_dir() == cache
    monkeypatch.delenv("FASTSMOOTH_CACHE")
    assert embedded.cache_dir().name == "fastsmooth"


def test_default_model_is_cached_and_reused(cache, monkeypatch):
    noise = Gaussian(sigma=0.25)
    model = embedded.default_model(noise, device="cpu", progress=False, **TINY)
    path = embedded.default_model_path(noise, **TINY)
    assert path.parent == cache and path.is_file() and not model.training
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.name + ".lock"])
    _, meta = load_checkpoint(path)
    assert meta["noise"] == noise.spec() and meta["dataset"] == "mnist" and meta["arch"] == "cnn"
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(embedded, "_train", no_training)
    again = embedded.default_model(Gaussian(sigma=0.25), device="cpu", progress=False, **TINY)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # Another noise, or another recipe, is another file.
    assert embedded.default_model_path(Gaussian(sigma=0.5), **TINY) != path
    assert embedded.default_model_path(Laplace(sigma=0.25), **TINY) != path
    assert embedded.default_model_path(noise) != path


def test_default_model_is_reproducible(cache, tmp_path, monkeypatch):
    noise = Laplace(scale=0.2)
    first = embedded.default_model(noise, device="cpu", progress=False, **TINY)
    monkeypatch.setenv("FASTSMOOTH_CACHE", str(tmp_path / "other"))
    torch.manual_seed(12345)  # the recipe does not depend on the global seed
    second = embedded.default_model(noise, device="cpu", progress=False, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_corrupt_cache_is_retrained(cache):
    noise = Gaussian(sigma=0.25)
    path = embedded.default_model_path(noise, **TINY)
    cache.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring the cached embedded model"):
        model, trained = embedded._load_or_train(noise, "cpu", False, 1, 256)
    assert trained and load_checkpoint(path)[1]["noise"] == noise.spec()


def test_two_processes_train_once(cache):
    code = (
        "import sys; from fastsmooth import embedded; from fastsmooth.noises import Gaussian; "
        "_, trained = embedded._load_or_train(Gaussian(sigma=0.3), 'cpu', False, 1, 256); "
        "print('TRAINED' if trained else 'LOADED')"
    )
    env = {**__import__("os").environ, "FASTSMOOTH_CACHE": str(cache), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(out.strip() for out, _ in outputs) == ["LOADED", "TRAINED"]


@pytest.mark.slow
def test_default_recipe_accuracy(cache):
    """The full recipe (what `fastsmooth certify` uses): sensible accuracy under sigma = 0.25."""
    noise = Gaussian(sigma=0.25)
    model = embedded.default_model(noise, device="cpu", progress=False)
    test = get_dataset("mnist", "test")
    _, clean = evaluate(model, test, None, device="cpu")
    _, noisy = evaluate(model, test, noise, device="cpu")
    assert clean > 0.93 and noisy > 0.92
