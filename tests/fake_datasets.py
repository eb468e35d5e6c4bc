"""Tiny data files in torchvision's on-disk layouts, for tests that must not download anything.

Each ``write_*`` function writes random images with balanced labels under ``root`` exactly where
``trainer.data`` (and torchvision) look for them, and returns what it wrote, in the layout of the file
(MNIST: (n, 28, 28) uint8; CIFAR, SVHN: (n, 3, 32, 32) uint8 after the reader's transpose), so tests
can check a round trip. Files carry no valid md5 sum: torchvision's CIFAR and SVHN classes reject them
unless their md5 sums are None, as ``trainer.data`` sets them (it checks the content instead).
``write_imagefolder`` writes PNG files in the ``imagefolder:PATH`` layout.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np


def _images_labels(
    n: int, shape: tuple[int, ...], n_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (n, *shape) and balanced, shuffled labels (n,) in ``[0, n_classes)``."""
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    return x, y


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in the idx format: magic 0x0000 08 <ndim>, big-endian sizes, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx_set(
    root: str | Path, folder: str, n_train: int, n_test: int, seed: int, gz: bool
) -> dict[str, np.ndarray]:
    """Write ``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x, y = _images_labels(n, (28, 28), 10, rng)
        for kind, array in (("images-idx3", x), ("labels-idx1", y.astype(np.uint8))):
            name = raw / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                name, data = name.with_name(name.name + ".gz"), gzip.compress(data)
            name.write_bytes(data)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out


def write_mnist(
    root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0, gz: bool = False
) -> dict[str, np.ndarray]:
    """Fake MNIST under ``<root>/MNIST/raw``.

    Returns
    -------
    dict
        ``train_x`` (n_train, 28, 28) uint8, ``train_y`` (n_train,) int64, ``test_x``, ``test_y``.
    """
    return _write_idx_set(root, "MNIST", n_train, n_test, seed, gz)


def write_fashion_mnist(
    root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0, gz: bool = False
) -> dict[str, np.ndarray]:
    """Fake Fashion-MNIST under ``<root>/FashionMNIST/raw``; returns as :func:`write_mnist`."""
    return _write_idx_set(root, "FashionMNIST", n_train, n_test, seed, gz)


def write_pickle(path: str | Path, entry) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _cifar_entry(x: np.ndarray, y: np.ndarray, label_key: str) -> dict:
    """One CIFAR pickle's dict: ``data`` (n, 3072) uint8 rows in C, H, W order, labels as a list."""
    return {"data": x.reshape(len(x), -1), label_key: [int(v) for v in y]}


def write_cifar10(
    root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0
) -> dict[str, np.ndarray]:
    """Fake CIFAR-10 under ``<root>/cifar-10-batches-py`` (train spread over ``data_batch_1..5``).

    Returns
    -------
    dict
        ``train_x`` (n_train, 3, 32, 32) uint8 in the order of the batches, ``train_y`` (n_train,)
        int64, ``test_x``, ``test_y``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = _images_labels(n_train, (3, 32, 32), 10, rng)
    test_x, test_y = _images_labels(n_test, (3, 32, 32), 10, rng)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        write_pickle(folder / f"data_batch_{i}", _cifar_entry(train_x[part], train_y[part], "labels"))
    write_pickle(folder / "test_batch", _cifar_entry(test_x, test_y, "labels"))
    write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def write_cifar100(
    root: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0
) -> dict[str, np.ndarray]:
    """Fake CIFAR-100 under ``<root>/cifar-100-python/{train,test}`` (fine and coarse labels).

    Returns
    -------
    dict
        As :func:`write_cifar10`, labels the fine ones in ``[0, 100)``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images_labels(n, (3, 32, 32), 100, rng)
        entry = _cifar_entry(x, y, "fine_labels")
        entry["coarse_labels"] = [int(v) // 5 for v in y]
        write_pickle(folder / split, entry)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    write_pickle(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
    return out


def write_svhn(
    root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0
) -> dict[str, np.ndarray]:
    """Fake SVHN ``<root>/{train,test}_32x32.mat``: ``X`` (32, 32, 3, n) uint8, ``y`` (n, 1) with 10 for 0.

    Returns
    -------
    dict
        ``train_x`` (n_train, 3, 32, 32) uint8, ``train_y`` (n_train,) int64 in ``[0, 10)`` (0, not 10),
        ``test_x``, ``test_y``.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images_labels(n, (3, 32, 32), 10, rng)
        stored_y = np.where(y == 0, 10, y).astype(np.uint8)[:, None]  # (n, 1), digit 0 stored as 10
        savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": x.transpose(2, 3, 1, 0), "y": stored_y})
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out


def write_imagefolder(
    root: str | Path, splits: dict[str, int], classes=("cat", "dog", "emu"), size=(6, 5), seed: int = 0
) -> dict[str, np.ndarray]:
    """Random RGB PNG files ``<root>/<split>/<class>/<i>.png``, ``splits[split]`` per class, ``size`` (H, W).

    Returns
    -------
    dict
        ``<split>_x`` (n, 3, H, W) uint8 and ``<split>_y`` (n,) int64 in ImageFolder's order (classes sorted,
        then file names sorted).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for split, n_per_class in splits.items():
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                x = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(x).save(folder / f"{i:03d}.png")
                images.append(x.transpose(2, 0, 1))
                labels.append(label)
        out[f"{split}_x"], out[f"{split}_y"] = np.stack(images), np.array(labels, dtype=np.int64)
    return out


WRITERS = {
    "mnist": write_mnist,
    "fashion-mnist": write_fashion_mnist,
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "svhn": write_svhn,
}
