"""What every data source returns before splitting (``Raw``), the one error type of data (``DataError``), and
the helpers that word its messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocol.errors import one_line


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
class Raw:
    """Splits before splitting: each an ``(x (n, C, H, W) float32, y (n,) int64)`` pair; ``val`` and ``test``
    are None where the data set has no such split (they are then cut from ``train``)."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    val: tuple[np.ndarray, np.ndarray] | None
    n_classes: int


def as_raw(n_classes: int, scale: float, train, test=None, val=None) -> Raw:
    """``Raw`` from ``(x (n, C, H, W), y (n,))`` pairs (or None): images / scale as float32, labels int64."""
    def pair(xy):
        if xy is None:
            return None
        x, y = xy
        return np.asarray(x, dtype=np.float32) / np.float32(scale), np.asarray(y, dtype=np.int64).reshape(-1)

    return Raw(pair(train), pair(test), pair(val), n_classes)


def dataset_kind(dataset: str) -> str:
    """A built-in name, ``"imagefolder"`` or ``"factory"``."""
    if dataset.startswith(IMAGEFOLDER):
        return "imagefolder"
    return "factory" if ":" in dataset else dataset


def cause(exc: BaseException) -> str:
    """``Type: message`` of an exception from a library or a user's code, in one line."""
    return f"{type(exc).__name__}: {one_line(exc)}"


def describe(value: Any) -> str:
    """A short description of a value for error messages: type, and dtype and shape for arrays."""
    name = type(value).__name__
    article = "an" if name[0].lower() in "aeiou" else "a"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{article} {name} of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"{article} {name}"

