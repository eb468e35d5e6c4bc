"""torchvision's data sets on disk: every file checked before torchvision's own classes read it.

MNIST and Fashion-MNIST (idx files, also ``.gz``), CIFAR-10/100 (pickles, read as numpy arrays only) and
SVHN (MATLAB files) under ``DataConfig.data_root``, in torchvision's layout (docs/data.md). ``check_files``
reads headers, keys, dtypes, counts and label ranges without decoding the images; ``load_torchvision``
checks, optionally downloads, and reads.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Callable

import numpy as np

from protocol.config import DataConfig
from trainer.data.raw import DataError, MissingDataError, Raw, as_raw, cause, describe


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


def check_files(cfg: DataConfig, fetch: bool) -> None:
    """Check ``cfg.dataset``'s files; without ``fetch``, files missing with ``cfg.download`` are left unchecked.

    With ``fetch`` (``load_splits``), missing files are downloaded by torchvision when ``cfg.download``.
    """
    layout = LAYOUTS[cfg.dataset]
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
        message = f"{source}: not a readable gzip file ({cause(exc)}); expected a gzipped idx file"
        raise DataError(message) from exc
    except OSError as exc:
        raise DataError(f"{source}: cannot write the decompressed {target} ({cause(exc)}); decompress it "
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
        check_labels(part.labels_file, part.labels, n_classes)
        if part.image_shape != first.image_shape:
            raise DataError(f"{part.images_file}: images of shape {part.image_shape}, but {first.images_file} "
                            f"holds {first.image_shape}; expected one image shape in every split")


def check_labels(where: str, labels: np.ndarray, n_classes: int) -> None:
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
        raise DataError(f"{where}: torchvision's {cls.__name__}({arguments}) failed: {cause(exc)}") from exc


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
        raise DataError(f"{path}: not a readable pickle ({cause(exc)}); expected a CIFAR python pickle") from exc


def _cifar_part(path: str, label_key: str) -> _Part:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        found = sorted(map(str, entry)) if isinstance(entry, dict) else describe(entry)
        raise DataError(f"{path}: holds {found}, expected a dict with keys 'data' and {label_key!r} (a CIFAR pickle)")
    data, labels = entry["data"], np.asarray(entry[label_key])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{path}: 'data' is {describe(data)}, expected a uint8 ndarray of shape (n, 3072) "
                        "(n images of 3x32x32)")
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: {label_key!r} is {describe(labels)}, expected a list of int labels")
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
        raise DataError(f"{path}: not a readable MATLAB file ({cause(exc)}); expected SVHN's .mat") from exc
    x_shape, x_kind = found.get("X", ((), None))
    if y is None or x_kind is None:
        raise DataError(f"{path}: holds variables {sorted(found)}, expected 'X' and 'y'")
    if x_kind != "uint8" or len(x_shape) != 4:
        raise DataError(f"{path}: 'X' is {x_kind} of shape {x_shape}, expected uint8 of shape (H, W, C, n)")
    labels = np.asarray(y).reshape(-1)
    if labels.dtype.kind not in "iuf" or not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path}: 'y' is {describe(y)} with values that are not whole numbers, expected int labels")
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
LAYOUTS: dict[str, _Layout] = {
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


def load_torchvision(cfg: DataConfig, seed: int) -> Raw:
    """A torchvision data set: its files checked (and fetched with ``cfg.download``), then read by torchvision."""
    layout = LAYOUTS[cfg.dataset]
    check_files(cfg, fetch=True)
    train, test = layout.read(cfg.data_root)
    return as_raw(layout.n_classes, 255.0, train, test)
