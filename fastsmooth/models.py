"""Architectures, NormalizeLayer and Cohen-style checkpoints.

A fastsmooth model takes inputs in [0, 1] (the space the noise is added in) and is
``nn.Sequential(NormalizeLayer(mean, std), net)``, as in Cohen et al.'s ``get_architecture``, so
state_dict keys are "1.<net key>" (NormalizeLayer keeps its constants out of the state_dict, as
Cohen's did) and their checkpoints load unchanged.

    arch              net                                              params / multiply-adds per input
    cnn               2 strided convs + 2 linear layers, BatchNorm      0.1 M / 0.2 M on 28x28
    lenet             LeNet-5 (ReLU, max pooling)                        ~60 k on 32x32 / 28x28
    cifar_resnet20    Cohen et al.'s CIFAR ResNet (bearpaw layout)      0.27 M / 41 M on 32x32
    cifar_resnet110   the same, depth 110                               1.7 M / 253 M on 32x32
    resnet50          ImageNet ResNet-50 with torchvision's key names   25.6 M / 4.1 G on 224x224

Checkpoints: ``{'arch', 'state_dict', 'epoch', 'optimizer', ...}`` as Cohen et al. / Salman et al.
save them, read with ``torch.load(weights_only=True)`` (no code from the file is ever run);
fastsmooth adds 'noise' (Noise.spec()), 'dataset' and 'num_classes'. DataParallel's "module."
prefixes, anywhere in a key (Cohen's ResNet-50 keys read "1.module.conv1.weight"), are stripped.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .checks import first_line
from .data import DATASETS, DatasetInfo, get_info

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "NormalizeLayer",
    "SmallCNN",
    "LeNet",
    "CifarResNet",
    "ResNet50",
    "get_architecture",
    "read_checkpoint",
    "load_checkpoint",
    "clean_state_dict",
    "is_factory_spec",
    "load_factory",
]

ARCHITECTURES = ("cnn", "lenet", "cifar_resnet20", "cifar_resnet110", "resnet50")

# Which dataset a checkpoint without a 'dataset' entry was trained on (Cohen et al.'s two).
_DEFAULT_DATASET = {"resnet50": "imagenet", "cifar_resnet20": "cifar10", "cifar_resnet110": "cifar10"}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match its architecture (one-line message)."""


# -- the user's own model: `MODULE:FACTORY` ---------------------------------------------------------

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory_spec(spec: str) -> bool:
    """True for ``MODULE:FUNCTION`` (and no file of that name exists)."""
    return bool(_FACTORY.match(spec)) and not os.path.exists(spec)


def load_factory(spec: str) -> nn.Module:
    """The model returned by FUNCTION() of MODULE, for ``spec = "MODULE:FUNCTION"``: the user's own
    code, named explicitly (nothing is ever imported from or run out of a checkpoint, which loads with
    weights_only=True). MODULE is looked up on sys.path and in the working directory.
    Raises CheckpointError with a one-line message."""
    module_name, attr = spec.split(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m`: the console script leaves the cwd out
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise CheckpointError(f"--model {spec}: cannot import {module_name} ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"--model {spec}: {module_name} has no function {attr}")
    try:
        model = factory()
    except Exception as exc:
        raise CheckpointError(f"--model {spec}: the factory failed ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--model {spec}: the factory returned a {type(model).__name__}, "
                              "not a torch.nn.Module")
    return model


class NormalizeLayer(nn.Module):
    """Standardize channels: (x - mean) / sd, per channel (Cohen et al.).

    The first layer of every model, so that noise is added to the raw [0, 1] input and certified
    radii are in input space. mean and sd are non-persistent buffers: they follow .to(device) and
    stay out of the state_dict (Cohen's layer kept them out too, so their checkpoints load).
    """

    def __init__(self, means: Sequence[float], sds: Sequence[float]):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32).reshape(1, -1, 1, 1)
        sds = torch.as_tensor(sds, dtype=torch.float32).reshape(1, -1, 1, 1)
        if means.shape != sds.shape:
            raise ValueError(f"means and sds differ in length: {means.numel()} vs {sds.numel()}")
        if not bool((sds > 0).all()):
            raise ValueError("standard deviations must be > 0")
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("sds", sds, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.means.shape[1]:
            raise ValueError(f"NormalizeLayer expects (B, {self.means.shape[1]}, H, W), got {tuple(x.shape)}")
        return (x - self.means.to(x.dtype)) / self.sds.to(x.dtype)

    def extra_repr(self) -> str:
        return f"means={self.means.flatten().tolist()}, sds={self.sds.flatten().tolist()}"


# ---------------------------------------------------------------------------------------------
# Small networks for 8x8 and 28x28 inputs


class SmallCNN(nn.Module):
    """A small, fast CNN: conv 5x5/2 (8) -> conv 3x3/2 (16) -> linear 128 -> linear K.

    Two stride-2 convolutions (BatchNorm, ReLU) reduce 28x28 to 7x7 and 8x8 to 2x2; the classifier
    reads the flattened map. About 0.2 M multiply-adds and 0.1 M parameters for a 28x28 image, so
    that certification with n = 100,000 noisy copies stays cheap on a CPU: measured on a 2-core
    CPU (one thread) about 80,000 copies/s, 4x the rate of width 16, at about 1 point less
    accuracy under noise on MNIST.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: Tuple[int, int] = (28, 28),
                 width: int = 8, hidden: int = 128):
        super().__init__()
        h, w = input_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        out_h, out_w = _conv_out(_conv_out(h, 5, 2, 2), 3, 2, 1), _conv_out(_conv_out(w, 5, 2, 2), 3, 2, 1)
        self.flat = 2 * width * out_h * out_w
        self.hidden = nn.Linear(self.flat, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.fc(self.relu(self.hidden(x)))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv5 (6) -> pool -> conv5 (16) -> pool -> 120 -> 84 -> K.

    32x32 inputs use the classic unpadded layout; smaller inputs pad the convolutions (28x28 as
    in the usual MNIST variant; 8x8 pads both) so that the feature map stays at least 2x2.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: Tuple[int, int] = (28, 28)):
        super().__init__()
        h, w = input_size
        pad1 = 0 if min(h, w) >= 32 else 2
        s = (min(h, w) + 2 * pad1 - 4) // 2
        pad2 = 0 if s >= 10 else 2
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=pad1)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=pad2)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        oh = (_conv_out(h, 5, 1, pad1) // 2 + 2 * pad2 - 4) // 2
        ow = (_conv_out(w, 5, 1, pad1) // 2 + 2 * pad2 - 4) // 2
        self.fc1 = nn.Linear(16 * oh * ow, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = x.flatten(1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc(x)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet (Cohen et al. / Salman et al. layout, from bearpaw's pytorch-classification)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _residual_stage(block, inplanes: int, planes: int, blocks: int, stride: int):
    """A stage of ``blocks`` residual blocks (torchvision's / Cohen's layout and state_dict keys);
    returns it and its output width."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    outplanes = planes * block.expansion
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(outplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), outplanes


def _he_init(model: nn.Module) -> None:
    """He et al. (2015) normal init of the convolutions, N(0, 2 / (k*k*out_channels)), and unit
    BatchNorms, as Cohen's and torchvision's ResNets."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs, depth = 6n + 2: conv 16 -> 3 stages of n BasicBlocks (16, 32, 64
    planes; 1x1 convolution shortcuts where the shape changes) -> global average pool -> fc.

    Parameter names match Cohen et al.'s archs/cifar_resnet.py (conv1, bn1, layer1..3, fc), so their
    and Salman et al.'s cifar_resnet20 / cifar_resnet110 checkpoints load. The pooling is adaptive
    (the same as their AvgPool2d(8) on 32x32 inputs) so other input sizes work too.
    """

    def __init__(self, depth: int = 110, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, width = _residual_stage(BasicBlock, 16, 16, n, 1)
        self.layer2, width = _residual_stage(BasicBlock, width, 32, n, 2)
        self.layer3, width = _residual_stage(BasicBlock, width, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * BasicBlock.expansion, num_classes)
        _he_init(self)


    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------
# ImageNet ResNet-50 (torchvision's parameter names, so a torchvision state_dict loads)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, "ResNet v1.5" as torchvision) -> 1x1 (x4), with a shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 for ImageNet (He et al. 2016) with torchvision's module names and initialization."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, width = _residual_stage(Bottleneck, 64, 64, layers[0], 1)
        self.layer2, width = _residual_stage(Bottleneck, width, 128, layers[1], 2)
        self.layer3, width = _residual_stage(Bottleneck, width, 256, layers[2], 2)
        self.layer4, width = _residual_stage(Bottleneck, width, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        _he_init(self)


    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------
# Factory


def _resolve_info(dataset) -> DatasetInfo:
    if isinstance(dataset, DatasetInfo):
        return dataset
    info = getattr(dataset, "info", None)  # a dataset object from data.get_dataset
    if isinstance(info, DatasetInfo):
        return info
    return get_info(dataset)


def get_architecture(arch: str, dataset, *, num_classes: Optional[int] = None,
                     input_shape: Optional[Tuple[int, int, int]] = None) -> nn.Sequential:
    """``nn.Sequential(NormalizeLayer(mean, std), net)`` for ``arch`` sized for ``dataset``.

    dataset: a name in data.DATASETS, a DatasetInfo, or a dataset object (its resolved ``.info``).
    num_classes / input_shape override the dataset's (needed for "imagefolder", whose registry
    entry fixes neither). The model expects inputs in [0, 1]; it is returned in train mode.
    """
    info = _resolve_info(dataset)
    num_classes = num_classes if num_classes is not None else info.num_classes
    if num_classes is None:
        raise ValueError(f"dataset {info.name!r} does not fix the number of classes: pass num_classes=")
    shape = tuple(input_shape) if input_shape is not None else info.shape
    channels = shape[0] if shape is not None else len(info.mean)
    if len(info.mean) != channels:
        raise ValueError(f"dataset {info.name!r} normalizes {len(info.mean)} channels but inputs have {channels}")
    if arch == "cnn":
        net = SmallCNN(channels, num_classes, _hw(shape, arch, info))
    elif arch == "lenet":
        net = LeNet(channels, num_classes, _hw(shape, arch, info))
    elif arch == "cifar_resnet20":
        net = CifarResNet(20, num_classes, channels)
    elif arch == "cifar_resnet110":
        net = CifarResNet(110, num_classes, channels)
    elif arch == "resnet50":
        net = ResNet50(num_classes, channels)
    else:
        raise ValueError(f"unknown architecture {arch!r}; known architectures: {', '.join(ARCHITECTURES)}")
    return nn.Sequential(NormalizeLayer(info.mean, info.std), net)


def _hw(shape, arch, info) -> Tuple[int, int]:
    if shape is None:
        raise ValueError(f"{arch!r} needs a fixed input size; dataset {info.name!r} has none: pass input_shape=")
    return int(shape[1]), int(shape[2])


# ---------------------------------------------------------------------------------------------
# Checkpoints


def clean_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop DataParallel / DistributedDataParallel "module." components from every key."""
    cleaned = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p != "module"]
        cleaned[".".join(parts)] = value
    return cleaned


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dictionary at ``path`` (torch.load with weights_only=True), validated to hold a
    state_dict. A bare state_dict (a mapping of tensors) is returned as {'state_dict': it}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict with 'arch' and 'state_dict', got {type(obj).__name__}")
    if "state_dict" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"state_dict": obj}
        raise CheckpointError(f"{path}: no 'state_dict' entry (keys: {', '.join(map(str, obj)) or 'none'})")
    if not isinstance(obj["state_dict"], dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(obj['state_dict']).__name__}, not a dict")
    return obj


def load_checkpoint(path, dataset=None, device="cpu", *, arch: Optional[str] = None):
    """Load a Cohen-style checkpoint {'arch', 'state_dict', ...} into a fresh model.

    dataset: the data the model was trained on (normalization and class count); default the
    checkpoint's 'dataset' entry, else Cohen's convention (resnet50 -> imagenet, cifar_* -> cifar10).
    arch: overrides or supplies the architecture (a bare state_dict has none).
    Returns (model in eval mode on ``device``, meta) where meta holds 'arch', 'dataset',
    'num_classes', 'epoch', 'noise' (a Noise.spec() dict or None), 'path' and the checkpoint's
    other small entries (not 'state_dict' nor 'optimizer').
    Raises CheckpointError for a missing or corrupt file, missing or unexpected keys, an unknown
    architecture or mismatching shapes.
    """
    ckpt = read_checkpoint(path, map_location="cpu")
    arch = arch or ckpt.get("arch")
    if not arch:
        raise CheckpointError(f"{path}: no 'arch' entry; pass arch= (one of {', '.join(ARCHITECTURES)})")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    dataset = dataset or ckpt.get("dataset") or _DEFAULT_DATASET.get(arch)
    if dataset is None:
        raise CheckpointError(f"{path}: the checkpoint does not say its dataset; pass dataset= "
                              f"(one of {', '.join(DATASETS)})")
    try:
        info = _resolve_info(dataset)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    state = clean_state_dict(ckpt["state_dict"])
    if not any(k.startswith(("0.", "1.")) for k in state):  # the bare net's state_dict (e.g. torchvision)
        state = {f"1.{k}": v for k, v in state.items()}
    num_classes = ckpt.get("num_classes")
    if num_classes is None and isinstance(state.get("1.fc.weight"), torch.Tensor):
        num_classes = int(state["1.fc.weight"].shape[0])
    input_shape = ckpt.get("input_shape")
    try:
        model = get_architecture(arch, info, num_classes=num_classes,
                                 input_shape=tuple(input_shape) if input_shape else None)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    _load_state(model, state, path)
    model.to(device).eval()
    noise = ckpt.get("noise")
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer")}
    meta.update(arch=arch, dataset=info.name, num_classes=model[1].fc.out_features, noise=noise,
                epoch=ckpt.get("epoch"), path=str(path))
    return model, meta


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], path) -> None:
    expected = model.state_dict()
    # BatchNorm counters are absent from checkpoints written before PyTorch 0.4.1; they do not
    # affect inference, so keep the fresh ones.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_few(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_few(unexpected)})")
        raise CheckpointError(f"{path}: state_dict does not match the architecture: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors ({_few(bad)})")
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if mismatched:
        raise CheckpointError(f"{path}: shape mismatch for {len(mismatched)} tensors ({_few(mismatched)})")
    full = dict(expected)
    full.update(state)
    model.load_state_dict(full, strict=True)


def _few(items, limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")
