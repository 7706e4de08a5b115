"""The thin training loop: noise augmentation (Cohen et al.), SmoothAdv (Salman et al. 2019) and
stability training (Li et al. 2019, as in rs4a); SGD, step or cosine schedule.

One epoch = one shuffled pass over the data; each batch is perturbed with the same noise object and
samplers that certification uses (float32, the counter-based stream of fastsmooth/seeding.py) and
the model is trained on the noisy batch. Everything random (shuffling, augmentation, noise; the
model's initialization is the caller's) is a word of that stream under the run's seed, in domains of
their own (seeding.DOMAIN_TRAIN, DOMAIN_DATA, DOMAIN_EVALUATE): a run is reproducible for a seed, a
resumed run sees what an unbroken one saw, no generator is seeded through a 32-bit state, and
torch's global seed is neither used nor disturbed.

Extending the loop: ``train(..., loss_fn=...)`` takes a function
``loss_fn(model, x, y, noise, draws) -> (loss, logits)`` (draws: a ``NoiseDraws``) that replaces the default
``noise_augmentation_loss`` (logits: (B, K), one row per image, for the running accuracy). A loss_fn
with a ``set_epoch(epoch)`` method (0-based) is told the epoch before each one starts (the SmoothAdv
warmup). The two built in:

* ``SmoothAdvLoss`` (Salman et al. 2019): m noise draws per image (float32, from the same Noise
  object as certification), held fixed while ``attacks.SmoothAdvPGD`` finds one delta per image
  against the soft smoothed classifier, then cross-entropy on x + delta + eps_1 only, or on all m
  copies (``multi_noise``, their --train-multi-noise). epsilon ramps up linearly over the first
  ``warmup`` epochs: epoch e (0-based) uses epsilon * min(1, (e + 1) / warmup), as their
  train_pgd.py. One difference: their --batch counts noisy copies (batch / m images per step),
  ``batch_size`` here counts images (each step sees batch_size * m copies).
* ``StabilityLoss`` (the loss of rs4a's --stability, their weight 6.0):
  CE(f(x + eps1), y) + w * KL(softmax f(x + eps1) || softmax f(x + eps2)), eps1 and eps2
  independent draws, the gradient through both terms, batch mean.

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

from .attacks import widen
from .backends import draw_noise
from .kernels.philox import counter_words, stream_permutation
from .seeding import DOMAIN_DATA, DOMAIN_EVALUATE, DOMAIN_TRAIN

__all__ = [
    "EpochStats",
    "TrainResult",
    "noise_augmentation_loss",
    "NoiseDraws",
    "sample_noise_copies",
    "warmup_epsilon",
    "SmoothAdvLoss",
    "stability_loss",
    "StabilityLoss",
    "make_optimizer",
    "make_scheduler",
    "train",
    "evaluate",
    "save_checkpoint",
    "add_arguments",
    "run",
]

class NoiseDraws:
    """Training noise from the stream: the draws of one epoch are copies 0, 1, 2, ... of image index
    ``epoch`` under ``seed`` in ``domain`` (seeding.DOMAIN_TRAIN), so that no two draws of a run share
    a word and a resumed run draws what an unbroken one drew."""

    def __init__(self, seed: int, epoch: int, device, domain: int = DOMAIN_TRAIN):
        self.seed, self.epoch, self.device, self.domain = int(seed), int(epoch), torch.device(device), domain
        self.next_copy = 0

    def sample(self, noise, shape) -> torch.Tensor:
        """Float32 noise of ``shape`` = (copies, *input_shape) on the device: the next copies."""
        shape = tuple(int(s) for s in shape)
        eps = draw_noise(noise, shape[0], shape[1:], seed=self.seed, image_index=self.epoch,
                         first_copy=self.next_copy, domain=self.domain, device=self.device)
        self.next_copy += shape[0]
        return eps


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, object, Optional[NoiseDraws]],
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
                            draws: Optional[NoiseDraws]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the model on x + eps, eps ~ noise drawn per image in float32 (Cohen et al.)."""
    if noise is not None:
        x = x + draws.sample(noise, tuple(x.shape)).to(x.device)
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def sample_noise_copies(noise, x: torch.Tensor, m: int, draws: NoiseDraws) -> torch.Tensor:
    """m independent float32 noise draws per image of x: shape (B, m, *x.shape[1:]), on x's device."""
    b = x.shape[0]
    eps = draws.sample(noise, (b * m, *x.shape[1:])).to(x.device)
    return eps.reshape(b, m, *x.shape[1:])


def warmup_epsilon(epsilon: float, epoch: int, warmup: int) -> float:
    """SmoothAdv's warmup (Salman et al., train_pgd.py): epsilon * min(1, (epoch + 1) / warmup) for
    the 0-based ``epoch``; warmup <= 1 is no warmup."""
    if warmup <= 1:
        return float(epsilon)
    return float(epsilon) * min(1.0, (epoch + 1) / warmup)


class SmoothAdvLoss:
    """SmoothAdv (Salman et al. 2019): train on adversarial examples of the soft smoothed classifier.

    attack: an ``attacks.SmoothAdvPGD``; its epsilon is set per epoch from ``epsilon`` and ``warmup``.
    num_noise_vec: m, the noise draws per image (the attack's Monte Carlo sample, fixed across its
    steps). multi_noise: the loss is the mean cross-entropy over all m copies x + delta + eps_j
    (--train-multi-noise) instead of the first copy only. The noise comes from the loop's Noise object
    and draws (float32, the certification samplers).
    """

    def __init__(self, attack, epsilon: float, num_noise_vec: int = 1, multi_noise: bool = False,
                 warmup: int = 1):
        if int(num_noise_vec) != num_noise_vec or num_noise_vec < 1:
            raise ValueError(f"num_noise_vec must be an integer >= 1, got {num_noise_vec!r}")
        if not float(epsilon) >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        self.attack = attack
        self.epsilon = float(epsilon)
        self.num_noise_vec = int(num_noise_vec)
        self.multi_noise = bool(multi_noise)
        self.warmup = int(warmup)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.attack.epsilon = warmup_epsilon(self.epsilon, epoch, self.warmup)

    def __call__(self, model, x, y, noise, draws):
        if noise is None:
            raise ValueError("SmoothAdv needs a noise (the smoothed classifier is attacked)")
        m = self.num_noise_vec
        eps = sample_noise_copies(noise, x, m, draws)
        x_adv = self.attack(model, x, y, eps)
        if self.multi_noise:
            logits = model((x_adv.unsqueeze(1) + eps).reshape(-1, *x.shape[1:]))
            loss = F.cross_entropy(logits, y.repeat_interleave(m))
            return loss, logits.reshape(x.shape[0], m, -1)[:, 0]
        logits = model(x_adv + eps[:, 0])
        return F.cross_entropy(logits, y), logits


def stability_loss(logits1: torch.Tensor, logits2: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """CE(logits1, y) + weight * KL(softmax logits1 || softmax logits2), both averaged over the batch;
    KL(p || q) = sum_c p_c (log p_c - log q_c)."""
    log_p = F.log_softmax(widen(logits1), dim=1)
    log_q = F.log_softmax(widen(logits2), dim=1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return F.nll_loss(log_p, y) + weight * kl


class StabilityLoss:
    """Stability training as in rs4a: CE(f(x + eps1), y) + w KL(f(x + eps1) || f(x + eps2)).

    The 2B noisy images go through the model in one batch (BatchNorm sees both halves)."""

    def __init__(self, weight: float):
        if not float(weight) >= 0:
            raise ValueError(f"the stability weight must be >= 0, got {weight!r}")
        self.weight = float(weight)

    def __call__(self, model, x, y, noise, draws):
        if noise is None:
            raise ValueError("stability training needs a noise")
        eps = sample_noise_copies(noise, x, 2, draws)
        logits = model((x.unsqueeze(1) + eps).transpose(0, 1).reshape(-1, *x.shape[1:]))
        logits1, logits2 = logits[:x.shape[0]], logits[x.shape[0]:]
        return stability_loss(logits1, logits2, y, self.weight), logits1


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


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(dataset, batch_size: int, device, workers: int = 0, seed: int = 0, epoch: Optional[int] = None):
    """Yield (x, y) on ``device``: shuffled by the stream (DOMAIN_DATA, image index = epoch) unless
    ``epoch`` is None. In-memory datasets (with get_batch) skip the DataLoader; their augmentation
    takes three stream words per image (DOMAIN_DATA + 1)."""
    n = len(dataset)
    order = torch.arange(n) if epoch is None else stream_permutation(seed, DOMAIN_DATA, epoch, n)
    if hasattr(dataset, "get_batch"):
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            words = None if epoch is None else counter_words(seed, DOMAIN_DATA + 1, epoch, 3 * start, 3 * len(idx))
            x, y = dataset.get_batch(idx, words)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                                         num_workers=workers, pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


def train(model: nn.Module, dataset, noise, *, epochs: int, batch_size: int = 256, lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 1e-4, schedule: str = "cosine",
          step_size: Optional[int] = None, gamma: float = 0.1, device=None, progress: bool = True,
          seed: int = 0, loss_fn: Optional[LossFn] = None, optimizer=None, scheduler=None,
          start_epoch: int = 0, amp=False, workers: int = 0,
          on_epoch_end: Optional[Callable[[EpochStats, "TrainResult"], None]] = None) -> TrainResult:
    """Train ``model`` on ``dataset`` with noise augmentation; returns a TrainResult.

    noise: a fastsmooth Noise (None trains on clean inputs). Each batch gets fresh noise from the
    stream under ``seed`` (NoiseDraws); the data order and augmentation come from it too.
    schedule: "cosine" (per step, to 0) or "step" (x gamma every step_size epochs).
    optimizer / scheduler / start_epoch: continue a run (--resume); epochs is the total count.
    amp: bfloat16 autocast for the forward passes: True, False, or "auto" (on CUDA devices that
    support bfloat16, where it is fast; off on the CPU, where it was measured slower for the small
    models). The noise stays float32: it is added before the cast, as in certification.
    on_epoch_end(stats, result): called after every epoch (e.g. to save a checkpoint).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    device = resolve_device(device)
    model.to(device)
    loss_fn = loss_fn or noise_augmentation_loss
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    if optimizer is None:
        optimizer = make_optimizer(model, lr, momentum, weight_decay)
    if scheduler is None:
        scheduler = make_scheduler(optimizer, schedule, epochs, steps_per_epoch, step_size, gamma)
    result = TrainResult(model, optimizer, scheduler, start_epoch)
    use_amp = _use_amp(amp, device)
    set_epoch = getattr(loss_fn, "set_epoch", None)

    for epoch in range(start_epoch, epochs):
        # Keyed by the epoch, so that a resumed run sees the same data order and noise as an unbroken one.
        draws = NoiseDraws(seed, epoch, device)
        if set_epoch is not None:
            set_epoch(epoch)
        model.train()
        lr_now = optimizer.param_groups[0]["lr"]
        total_loss, correct, seen, began = 0.0, 0, 0, time.perf_counter()
        bar = _progress(progress, steps_per_epoch, f"epoch {epoch + 1}/{epochs}")
        for x, y in _batches(dataset, batch_size, device, workers, seed, epoch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, logits = loss_fn(model, x, y, noise, draws)
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


def _use_amp(amp, device: torch.device) -> bool:
    if amp == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if amp in (True, False, "on", "off"):
        return amp in (True, "on")
    raise ValueError(f"amp must be True, False or 'auto', got {amp!r}")


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, noise=None, *, batch_size: int = 1000, device=None,
             seed: int = 0) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``dataset``, each image perturbed once by
    ``noise`` (None: clean) from the stream under ``seed`` (seeding.DOMAIN_EVALUATE)."""
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    draws = NoiseDraws(seed, 0, device, DOMAIN_EVALUATE)
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in _batches(dataset, batch_size, device):
        if noise is not None:
            x = x + draws.sample(noise, tuple(x.shape)).to(device)
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
    from .attacks import ATTACK_NORMS, DEFAULT_L1_TOPK
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
    parser.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", "--wd", type=float, default=1e-4)
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "step"])
    parser.add_argument("--lr-step-size", type=int, default=None, help="epochs between lr drops (step schedule)")
    parser.add_argument("--gamma", type=float, default=0.1, help="lr factor per drop (step schedule)")
    parser.add_argument("--augment", action="store_true", help="random crop + flip (cifar10)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on the first N images of the train split only (a quick run)")
    parser.add_argument("--amp", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                        help="bfloat16 autocast: auto (default) = on CUDA devices with bfloat16, off on the "
                             "CPU (slower there for small models); --amp alone = on")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for image folders")
    parser.add_argument("--out", required=True, help="checkpoint path (written after every epoch)")
    parser.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's; small models on a busy CPU train "
                             "fastest with 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    adv = parser.add_argument_group("SmoothAdv (Salman et al. 2019)")
    adv.add_argument("--adv-training", action="store_true",
                     help="train on PGD adversarial examples of the soft smoothed classifier")
    adv.add_argument("--attack", default="pgd", choices=["pgd"], help="the attack (default pgd)")
    adv.add_argument("--attack-norm", default=None, choices=list(ATTACK_NORMS),
                     help="default: the noise's norm (l2 for gaussian, l1 for laplace/uniform/expinf)")
    adv.add_argument("--epsilon", type=float, default=None,
                     help="attack radius in input units, required with --adv-training (Salman et al.'s "
                          "train_pgd.py divides its --epsilon by 256: their 64 is 0.25 here)")
    adv.add_argument("--num-steps", type=int, default=10, help="PGD steps (default 10)")
    adv.add_argument("--step-size", type=float, default=None, help="PGD step (default 2 * epsilon / num-steps)")
    adv.add_argument("--num-noise-vec", type=int, default=1, help="noise draws m per image (default 1)")
    adv.add_argument("--warmup", type=int, default=1,
                     help="epochs over which epsilon ramps up linearly (default 1: none)")
    adv.add_argument("--train-multi-noise", action="store_true",
                     help="train on all m noisy adversarial copies (default: the first only)")
    adv.add_argument("--l1-topk", type=float, default=DEFAULT_L1_TOPK,
                     help=f"l1 attack: share of the coordinates moved per step (default {DEFAULT_L1_TOPK}; "
                          "rs4a used 1/16)")
    stab = parser.add_argument_group("stability training (rs4a)")
    stab.add_argument("--stability-weight", type=float, default=0.0,
                      help="w > 0: CE(f(x+e1)) + w KL(f(x+e1) || f(x+e2)) (rs4a uses 6)")
    parser.set_defaults(run=run)


def first_items(dataset, n: int):
    """The first n items of dataset (the embedded splits are hash-ordered: a prefix mixes the classes)."""
    from .data import TensorImageDataset

    if n >= len(dataset):
        return dataset
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[:n], dataset.labels[:n], dataset.info, dataset.split,
                                  augment=dataset.augment, classes=dataset.classes)
    subset = torch.utils.data.Subset(dataset, range(n))
    subset.info = getattr(dataset, "info", None)
    return subset


def build_loss(args, noise):
    """(loss_fn or None for plain noise augmentation, a JSON-able description for the checkpoint)."""
    from .attacks import SmoothAdvPGD

    if args.adv_training and args.stability_weight > 0:
        raise ValueError("--adv-training and --stability-weight exclude each other; choose one")
    if args.stability_weight < 0:
        raise ValueError(f"--stability-weight must be >= 0, got {args.stability_weight}")
    if args.stability_weight > 0:
        return StabilityLoss(args.stability_weight), {"method": "stability", "weight": args.stability_weight}
    if not args.adv_training:
        return None, {"method": "noise"}
    if args.epsilon is None:
        raise ValueError("--adv-training needs --epsilon (the attack radius in input units; "
                         "Salman et al.'s --epsilon 64 is 0.25 here)")
    if args.epsilon < 0:
        raise ValueError(f"--epsilon must be >= 0, got {args.epsilon}")
    for flag, value in (("--num-steps", args.num_steps), ("--num-noise-vec", args.num_noise_vec)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    norm = args.attack_norm or noise.default_norm
    attack = SmoothAdvPGD(norm, args.epsilon, args.num_steps, args.step_size, args.l1_topk)
    loss = SmoothAdvLoss(attack, args.epsilon, args.num_noise_vec, args.train_multi_noise, args.warmup)
    info = {"method": "smoothadv", "attack": args.attack, "norm": norm, "epsilon": args.epsilon,
            "num_steps": args.num_steps, "step_size": args.step_size, "num_noise_vec": args.num_noise_vec,
            "warmup": args.warmup, "train_multi_noise": bool(args.train_multi_noise)}
    if norm == "l1":
        info["l1_topk"] = args.l1_topk
    return loss, info


def run(args) -> int:
    import sys

    from .data import get_dataset
    from .models import get_architecture, read_checkpoint, clean_state_dict
    from .noises import make_noise

    for flag, value in (("--epochs", args.epochs), ("--batch", args.batch), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sigma = args.sigma if args.sigma is not None or args.scale is not None else 0.25
    noise = make_noise(args.noise, sigma=sigma, scale=args.scale, k=args.k if args.noise == "expinf" else None)
    loss_fn, training = build_loss(args, noise)
    dataset = get_dataset(args.dataset, "train", args.data_root, augment=args.augment)
    if args.train_size is not None:
        if args.train_size < 1:
            raise ValueError(f"--train-size must be >= 1, got {args.train_size}")
        dataset = first_items(dataset, args.train_size)
    device = resolve_device(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = get_architecture(args.arch, dataset).to(device)
    steps = math.ceil(len(dataset) / args.batch)
    optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay)
    start = 0
    if args.resume and Path(args.out).is_file():
        ckpt = read_checkpoint(args.out, map_location=device)
        if ckpt.get("arch") not in (None, args.arch):
            raise ValueError(f"--resume: {args.out} holds a {ckpt.get('arch')!r} model, not --arch {args.arch!r}")
        if ckpt.get("noise") not in (None, noise.spec()):
            raise ValueError(f"--resume: {args.out} was trained with noise {ckpt.get('noise')}, not {noise.spec()}")
        model.load_state_dict(clean_state_dict(ckpt["state_dict"]))
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # the schedule below rescales from the base lr
                group["lr"] = group.get("initial_lr", args.lr)
        start = int(ckpt.get("epoch") or 0)
        print(f"resuming from {args.out} at epoch {start}", file=sys.stderr)
    scheduler = make_scheduler(optimizer, args.schedule, args.epochs, steps, args.lr_step_size, args.gamma,
                               start_epoch=start)
    if start >= args.epochs:
        print(f"{args.out} already has {start} of {args.epochs} epochs; nothing to train", file=sys.stderr)

    def checkpoint(stats: EpochStats, result: TrainResult) -> None:
        save_checkpoint(args.out, model, args.arch, stats.epoch, optimizer, noise, dataset, training=training)
        eps = getattr(getattr(loss_fn, "attack", None), "epsilon", None)
        print(f"epoch {stats.epoch}\tlr {stats.lr:.4g}\tloss {stats.loss:.4f}\tacc {stats.accuracy:.4f}\t"
              + (f"epsilon {eps:.4g}\t" if eps is not None else "") + f"{stats.seconds:.1f}s", file=sys.stderr)

    train(model, dataset, noise, epochs=max(args.epochs, start), batch_size=args.batch, device=device,
          progress=not args.no_progress, seed=args.seed, loss_fn=loss_fn, optimizer=optimizer,
          scheduler=scheduler, start_epoch=start, amp=args.amp, workers=args.workers, on_epoch_end=checkpoint)
    test = get_dataset(args.dataset, "test", args.data_root)
    loss, acc = evaluate(model, test, noise, device=device, seed=args.seed)
    print(f"test under noise: loss {loss:.4f}\taccuracy {acc:.4f}", file=sys.stderr)
    return 0
