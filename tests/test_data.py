"""Data loaders: the embedded sets, and IDX / CIFAR-10 / image-folder readers on files written here."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsmooth import data
from fastsmooth.data import DATASETS, DataError, get_dataset, read_idx

PIL = pytest.importorskip("PIL.Image")


# -- registry --------------------------------------------------------------------------------------


def test_registry_entries():
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) and all(s > 0 for s in info.std)
        if info.shape is not None:
            assert info.shape[0] == len(info.mean)
    assert DATASETS["mnist"].shape == (1, 28, 28) and DATASETS["mnist"].dim == 784
    assert DATASETS["cifar10"].mean == (0.4914, 0.4822, 0.4465)  # Cohen et al.'s constants
    assert DATASETS["imagenet"].num_classes == 1000


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="known datasets: mnist, digits"):
        get_dataset("svhn")
    with pytest.raises(ValueError, match="unknown split"):
        get_dataset("digits", "validation")
    assert data.get_info("Fashion_MNIST").name == "fashion-mnist"


# -- embedded --------------------------------------------------------------------------------------


def test_embedded_mnist_split():
    train, test = get_dataset("mnist", "train"), get_dataset("mnist", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    # Deterministic, disjoint, and mixed classes in any prefix of the test split.
    again = get_dataset("mnist", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    train_rows = {bytes(img.numpy()) for img in train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in test.images)
    assert len(set(test.labels[:20].tolist())) >= 6
    xb, yb = test.get_batch(torch.arange(5))
    assert xb.shape == (5, 1, 28, 28) and torch.equal(xb[0], x) and yb.dtype == torch.int64


def test_digits():
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    x, y = test[3]
    assert x.shape == (1, 8, 8) and 0 <= y < 10
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    test = get_dataset("fashion-mnist", "test")
    assert len(test) == 10000 and test[0][0].shape == (1, 28, 28)
    assert test.classes[9] == "Ankle boot"


# -- IDX -------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, compress: bool):
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    raw = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _write_mnist_like(root: Path, compress: bool, n_train=7, n_test=5, size=28):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if compress else ""
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_fashion_mnist(tmp_path, compress):
    arrays = _write_mnist_like(tmp_path, compress)
    for split in ("train", "test"):
        ds = get_dataset("fashion-mnist", split, root=tmp_path)
        images, labels = arrays[split]
        assert len(ds) == len(labels)
        x, y = ds[2]
        assert x.shape == (1, 28, 28) and y == int(labels[2])
        assert torch.allclose(x[0], torch.from_numpy(images[2]).float() / 255)


def test_idx_mnist_with_root_reads_files(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    arrays = _write_mnist_like(tmp_path / "MNIST" / "raw", True, n_test=3)
    ds = get_dataset("mnist", "test", root=tmp_path)
    assert len(ds) == 3 and ds[1][1] == int(arrays["test"][1][1])


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        get_dataset("fashion-mnist", "test", root=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"missing t10k-images-idx3-ubyte\[\.gz\]") as info:
        get_dataset("fashion-mnist", "test", root=tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x01\x02\x03rubbish")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    _write_idx(short, np.zeros((4, 3, 3), np.uint8), False)
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(DataError, match="IDX header says"):
        read_idx(short)


# -- CIFAR-10 --------------------------------------------------------------------------------------


def _write_cifar(root: Path, n=4, bytes_keys=False):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        if bytes_keys:
            entry = {k.encode(): v for k, v in entry.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        batches[name] = entry
    return batches


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_batches(tmp_path, bytes_keys):
    batches = _write_cifar(tmp_path, bytes_keys=bytes_keys)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    test = get_dataset("cifar10", "test", root=tmp_path)
    assert len(test) == 4 and test.classes[0] == "airplane"
    x, y = test[1]
    raw = batches["test_batch"][key("data")][1].reshape(3, 32, 32)
    assert x.shape == (3, 32, 32) and y == batches["test_batch"][key("labels")][1]
    assert torch.allclose(x, torch.from_numpy(raw).float() / 255)
    train = get_dataset("cifar10", "train", root=tmp_path / "cifar-10-batches-py", augment=True)
    assert len(train) == 20
    xb, yb = train.get_batch(torch.arange(6))
    assert xb.shape == (6, 3, 32, 32) and yb.shape == (6,)
    assert float(xb.min()) >= 0.0 and float(xb.max()) <= 1.0
    # three words per image: crop offsets floor(9 w / 2^32) (4 = no shift) and the flip bit
    still = torch.full((6,), 2 ** 31, dtype=torch.int64)                # offsets 4, 4, flip 0
    flip = torch.tensor([2 ** 31, 2 ** 31, 1] * 2, dtype=torch.int64)   # offsets 4, 4, flip 1
    originals = train._to_float(train.images[:2])
    assert torch.equal(train.get_batch(torch.arange(2), still)[0], originals)
    assert torch.equal(train.get_batch(torch.arange(2), flip)[0], originals.flip(-1))


def test_cifar10_missing_and_malicious(tmp_path):
    with pytest.raises(DataError, match="never downloads") as info:
        get_dataset("cifar10", "test", root=tmp_path)
    assert "test_batch" in str(info.value) and str(tmp_path) in str(info.value)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        get_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


# -- image folders ---------------------------------------------------------------------------------


def _write_folder(root: Path, sizes, mode="RGB"):
    rng = np.random.default_rng(2)
    written = []
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            PIL.fromarray(array, mode).save(root / cls / f"{i}.png")
            written.append((cls, array))
    (root / "cat" / "notes.txt").write_text("not an image")
    return written


def test_imagefolder_native_size(tmp_path):
    written = _write_folder(tmp_path / "test", [(10, 12), (10, 12)])
    ds = get_dataset("imagefolder", "test", root=tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4 and ds.info.num_classes == 2
    x, y = ds[3]
    assert x.shape == (3, 12, 10) and y == 1
    assert torch.allclose(x, torch.from_numpy(written[3][1]).permute(2, 0, 1).float() / 255)


def test_imagefolder_grayscale_and_crop(tmp_path):
    _write_folder(tmp_path, [(40, 30)], mode="L")  # no split subfolder: root itself holds the classes
    ds = get_dataset("imagefolder", "train", root=tmp_path, resize=20, crop=16)
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and ds.info.shape == (3, 16, 16)
    assert torch.equal(x[0], x[1])  # grey converted to RGB


def test_imagenet_layout(tmp_path, monkeypatch):
    _write_folder(tmp_path / "val", [(300, 260), (260, 400)])
    ds = get_dataset("imagenet", "test", root=tmp_path)
    assert ds[0][0].shape == (3, 224, 224) and ds[3][0].shape == (3, 224, 224)
    assert ds.info.num_classes == 1000
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    assert len(get_dataset("imagenet", "test")) == 4
    monkeypatch.delenv("IMAGENET_DIR")
    with pytest.raises(DataError, match="IMAGENET_DIR"):
        get_dataset("imagenet", "test")
    with pytest.raises(DataError, match="train: directory not found"):
        get_dataset("imagenet", "train", root=tmp_path)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="no root given"):
        get_dataset("imagefolder")
    with pytest.raises(DataError, match="directory not found"):
        get_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(DataError, match="one subfolder per class"):
        get_dataset("imagefolder", root=tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not a png")
    ds = get_dataset("imagefolder", root=tmp_path)
    with pytest.raises(DataError, match="not a readable image"):
        ds[0]
