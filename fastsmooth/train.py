"""The thin training loop: noise augmentation (Cohen et al.), SGD, step or cosine schedule.

One epoch = one shuffled pass over the data; each batch is perturbed with the same noise object and
sampler that certification uses (``noise.sample``, float32) and the model is trained on the noisy
batch. Everything random is drawn from explicitly seeded generators (shuffling, augmentation and
noise; the model's initialization is the caller's), so a run is reproducible for a seed and does not
depend on, or disturb, torch's global seed.

Extending the loop: ``train(..., loss_fn=...)`` takes a function
``loss_fn(model, x, y, noise, generator) -> (loss, logits)`` that replaces the default
``noise_augmentation_loss``; SmoothAdv and stability training plug in there.

Checkpoints (``save_checkpoint``) are Cohen-compatible: {'epoch', 'arch', 'state_dict', 'optimizer'}
plus 'noise' (Noise.spec()), 'dataset', 'num_classes' and 'input_shape'; written atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EpochStats",
    "TrainResult",
    "noise_augmentation_loss",
    "make_optimizer",
    "make_scheduler",
    "train",
    "evaluate",
    "save_checkpoint",
    "add_arguments",
    "run",
]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, object, Optional[torch.Generator]],
                  Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EpochStats:
    epoch: int          # 1-based
    lr: float           # learning rate used in this epoch
    loss: float         # mean training loss over the epoch's examples
    accuracy: float     # fraction of training examples classified right (under the training noise)
    seconds: float


@dataclass
class TrainResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int                                       # the last finished epoch (1-based)
    history: List[EpochStats] = field(default_factory=list)


def noise_augmentation_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise,
                            generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the model on x + eps, eps ~ noise drawn per image in float32 (Cohen et al.)."""
    if noise is not None:
        x = x + noise.sample(tuple(x.shape), generator).to(x.device)
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(optimizer, schedule: str, epochs: int, steps_per_epoch: int,
                   step_size: Optional[int] = None, gamma: float = 0.1, start_epoch: int = 0):
    """Per-step scheduler. "cosine": from lr to 0 over all steps; "step": lr * gamma every
    ``step_size`` epochs (default epochs // 3, Cohen et al. use 30 of 90). start_epoch: where a
    resumed run continues (the schedule picks up there)."""
    total = max(1, epochs * steps_per_epoch)
    offset = start_epoch * steps_per_epoch
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step + offset, total) / total)))
    if schedule == "step":
        size = max(1, step_size if step_size else epochs // 3) * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: gamma ** ((step + offset) // size))
    raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'step'")


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(dataset, batch_size: int, shuffle: bool, generator: torch.Generator, device, workers: int = 0):
    """Yield (x, y) on ``device``. In-memory datasets (with get_batch) skip the DataLoader."""
    n = len(dataset)
    if hasattr(dataset, "get_batch"):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            x, y = dataset.get_batch(order[start:start + batch_size], generator)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


def train(model: nn.Module, dataset, noise, *, epochs: int, batch_size: int = 256, lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 1e-4, schedule: str = "cosine",
          step_size: Optional[int] = None, gamma: float = 0.1, device=None, progress: bool = True,
          seed: int = 0, loss_fn: Optional[LossFn] = None, optimizer=None, scheduler=None,
          start_epoch: int = 0, amp: bool = False, workers: int = 0,
          on_epoch_end: Optional[Callable[[EpochStats, "TrainResult"], None]] = None) -> TrainResult:
    """Train ``model`` on ``dataset`` with noise augmentation; returns a TrainResult.

    noise: a fastsmooth Noise (None trains on clean inputs). Each batch gets fresh noise from a
    generator on ``device`` seeded from ``seed``; shuffling uses a CPU generator seeded likewise.
    schedule: "cosine" (per step, to 0) or "step" (x gamma every step_size epochs).
    optimizer / scheduler / start_epoch: continue a run (--resume); epochs is the total count.
    amp: bfloat16 autocast for the forward pass on CUDA (the noise stays float32: it is added
    before the cast, as in certification).
    on_epoch_end(stats, result): called after every epoch (e.g. to save a checkpoint).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    device = _resolve_device(device)
    model.to(device)
    loss_fn = loss_fn or noise_augmentation_loss
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    if optimizer is None:
        optimizer = make_optimizer(model, lr, momentum, weight_decay)
    if scheduler is None:
        scheduler = make_scheduler(optimizer, schedule, epochs, steps_per_epoch, step_size, gamma)
    result = TrainResult(model, optimizer, scheduler, start_epoch)
    use_amp = amp and device.type == "cuda"

    for epoch in range(start_epoch, epochs):
        # Seeds per epoch, so that a resumed run sees the same data order and noise as an unbroken one.
        shuffle_gen = torch.Generator().manual_seed(_mix(seed, epoch, 0))
        noise_gen = torch.Generator(device=device).manual_seed(_mix(seed, epoch, 1))
        model.train()
        lr_now = optimizer.param_groups[0]["lr"]
        total_loss, correct, seen, began = 0.0, 0, 0, time.perf_counter()
        bar = _progress(progress, steps_per_epoch, f"epoch {epoch + 1}/{epochs}")
        for x, y in _batches(dataset, batch_size, True, shuffle_gen, device, workers):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, logits = loss_fn(model, x, y, noise, noise_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            b = y.shape[0]
            total_loss += float(loss.detach()) * b
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += b
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        if bar is not None:
            bar.close()
        stats = EpochStats(epoch + 1, lr_now, total_loss / seen, correct / seen, time.perf_counter() - began)
        result.history.append(stats)
        result.epochs = epoch + 1
        if on_epoch_end is not None:
            on_epoch_end(stats, result)
    model.eval()
    return result


def _mix(seed: int, *parts: int) -> int:
    """A 63-bit seed from (seed, parts): splitmix64 steps, so nearby seeds give unrelated streams."""
    z = int(seed) & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        z = (z + 0x9E3779B97F4A7C15 + (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, noise=None, *, batch_size: int = 1000, device=None,
             seed: int = 0) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``dataset``, each image perturbed once by
    ``noise`` (None: clean) from a generator seeded with ``seed``."""
    device = _resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(_mix(seed, 0, 2))
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in _batches(dataset, batch_size, False, torch.Generator(), device):
        if noise is not None:
            x = x + noise.sample(tuple(x.shape), gen).to(device)
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += y.shape[0]
    model.train(was_training)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def save_checkpoint(path, model: nn.Module, arch: str, epoch: int, optimizer=None, noise=None,
                    dataset=None, **extra) -> Path:
    """Write a Cohen-compatible checkpoint atomically (temporary file + os.replace).

    {'epoch', 'arch', 'state_dict', 'optimizer'} as Cohen et al. (state_dict on the CPU), plus
    'noise' (noise.spec() or None), 'dataset' (its name), 'num_classes', 'input_shape' and any
    ``extra`` entries (plain Python values and tensors only: the file is read with weights_only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = getattr(dataset, "info", None)
    dataset_name = getattr(info, "name", None) or getattr(dataset, "name", None) or dataset
    net = model[1] if isinstance(model, nn.Sequential) and len(model) == 2 else model
    fc = getattr(net, "fc", None)
    state = {
        "epoch": int(epoch),
        "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "noise": noise.spec() if noise is not None else None,
        "dataset": dataset_name,
        "num_classes": getattr(fc, "out_features", None),
    }
    shape = getattr(info, "shape", None)
    if shape is not None:
        state["input_shape"] = [int(s) for s in shape]
    state.update(extra)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ---------------------------------------------------------------------------------------------
# `fastsmooth train` (the CLI dispatches here: add_arguments(parser) and run(args) -> int)


def add_arguments(parser) -> None:
    from .data import DATASETS
    from .models import ARCHITECTURES

    parser.add_argument("--dataset", default="mnist", choices=list(DATASETS),
                        help="training data (default: the embedded MNIST subset)")
    parser.add_argument("--data-root", default=None, help="folder with the dataset's files")
    parser.add_argument("--arch", default="cnn", choices=list(ARCHITECTURES))
    parser.add_argument("--noise", default="gaussian", choices=["gaussian", "laplace", "uniform", "expinf"])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sigma", type=float, default=None, help="per-coordinate RMS of the noise (default 0.25)")
    group.add_argument("--scale", type=float, default=None, help="lambda of the noise density")
    parser.add_argument("--k", type=float, default=None, help="ExpInf exponent (default 1)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", "--wd", type=float, default=1e-4)
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "step"])
    parser.add_argument("--lr-step-size", type=int, default=None, help="epochs between lr drops (step schedule)")
    parser.add_argument("--gamma", type=float, default=0.1, help="lr factor per drop (step schedule)")
    parser.add_argument("--augment", action="store_true", help="random crop + flip (cifar10)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for image folders")
    parser.add_argument("--out", required=True, help="checkpoint path (written after every epoch)")
    parser.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import sys

    from .data import get_dataset
    from .models import get_architecture, read_checkpoint, clean_state_dict
    from .noises import make_noise

    sigma = args.sigma if args.sigma is not None or args.scale is not None else 0.25
    noise = make_noise(args.noise, sigma=sigma, scale=args.scale, k=args.k if args.noise == "expinf" else None)
    dataset = get_dataset(args.dataset, "train", args.data_root, augment=args.augment)
    device = _resolve_device(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = get_architecture(args.arch, dataset).to(device)
    steps = math.ceil(len(dataset) / args.batch)
    optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay)
    start = 0
    if args.resume and Path(args.out).is_file():
        ckpt = read_checkpoint(args.out, map_location=device)
        model.load_state_dict(clean_state_dict(ckpt["state_dict"]))
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # the schedule below rescales from the base lr
                group["lr"] = group.get("initial_lr", args.lr)
        start = int(ckpt.get("epoch") or 0)
        print(f"resuming from {args.out} at epoch {start}", file=sys.stderr)
    scheduler = make_scheduler(optimizer, args.schedule, args.epochs, steps, args.lr_step_size, args.gamma,
                               start_epoch=start)

    def checkpoint(stats: EpochStats, result: TrainResult) -> None:
        save_checkpoint(args.out, model, args.arch, stats.epoch, optimizer, noise, dataset)
        print(f"epoch {stats.epoch}\tlr {stats.lr:.4g}\tloss {stats.loss:.4f}\tacc {stats.accuracy:.4f}\t"
              f"{stats.seconds:.1f}s", file=sys.stderr)

    train(model, dataset, noise, epochs=args.epochs, batch_size=args.batch, device=device,
          progress=not args.no_progress, seed=args.seed, optimizer=optimizer, scheduler=scheduler,
          start_epoch=start, amp=args.amp, workers=args.workers, on_epoch_end=checkpoint)
    test = get_dataset(args.dataset, "test", args.data_root)
    loss, acc = evaluate(model, test, noise, device=device, seed=args.seed)
    print(f"test under noise: loss {loss:.4f}\taccuracy {acc:.4f}", file=sys.stderr)
    return 0
