"""Input checks shared by the selection kernels (validate at the public edge, trust inside)."""

from __future__ import annotations

import math
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


def positive_int(value, name: str, at_most: int | None = None, limit: str = "") -> int:
    """``value`` as an int >= 1 (bools refused) and, when ``at_most`` is given, ``<= at_most``.

    ``limit`` names the upper bound in the message (``n_select == 21, must be <= n_candidates == 20``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name} == {value}, must be <= {limit or 'the limit'} == {at_most}")
    return int(value)


def nonnegative_float(value, name: str) -> float:
    """``value`` as a finite float >= 0 (bools refused)."""
    valid = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if not valid or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (m, C) logits, stabilised by the row maximum."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
