"""Input checks shared by the selection kernels (validate at the public edge, trust inside)."""

from __future__ import annotations

import numbers

import numpy as np


def as_matrix(x, name: str, min_cols: int = 0) -> np.ndarray:
    """``x`` as a finite float64 2-D array with at least one row and ``min_cols`` columns."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < min_cols:
        raise ValueError(
            f"{name} must be 2-D with at least one row and {min_cols} columns, got shape {arr.shape}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(arr)))} NaN/Inf")
    return arr


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (m, C) logits, stabilised by the row maximum."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
