"""Numpy array field types for pydantic models.

Arrays cross the actor boundary as numpy (zero-copy reads from Ray's object store); these annotated
types coerce lists or arrays to a fixed dtype and rank, and reject anything else with a message that
names the rule. In JSON they serialise as lists.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BeforeValidator, PlainSerializer


_INT64_END = 2.0**63  # int64 holds [-2**63, 2**63)


def _coerce(value, dtype, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot be read as a {ndim}-D {np.dtype(dtype).name} array: {exc}") from exc
    if array.ndim != ndim:
        raise ValueError(f"must be a {ndim}-D array, got shape {array.shape}")
    if array.size == 0:  # no values: any dtype will do (an empty list reads as float64)
        return np.zeros(array.shape, dtype)
    kind = array.dtype.kind  # b: bool, i/u: (un)signed integer, f: floating, c: complex, anything else: not numbers
    if np.issubdtype(np.dtype(dtype), np.integer):
        if kind not in "iuf" or (kind == "f" and not (np.all(np.isfinite(array)) and np.all(np.mod(array, 1) == 0))):
            raise ValueError(f"must hold integers, got dtype {array.dtype}")
        # A cast would wrap these around silently (2**63 becomes -2**63).
        if (kind == "u" and array.max() > np.iinfo(np.int64).max) or (
                kind == "f" and (array.min() < -_INT64_END or array.max() >= _INT64_END)):
            raise ValueError(f"must hold int64 values, got range [{array.min()}, {array.max()}]")
    elif kind not in "biuf":  # complex would lose its imaginary part
        raise ValueError(f"must hold real numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        result = np.ascontiguousarray(array, dtype=dtype)
    if kind == "f" and result.dtype.kind == "f" and np.any(np.isinf(result) & np.isfinite(array)):
        raise ValueError(f"must hold values within the {result.dtype.name} range, got range "
                         f"[{array.min()}, {array.max()}]")
    return result


def _array_type(dtype, ndim: int):
    return Annotated[
        np.ndarray,
        BeforeValidator(lambda v: _coerce(v, dtype, ndim)),
        PlainSerializer(lambda a: a.tolist(), when_used="json"),
    ]


Int64Vector = _array_type(np.int64, 1)
Float64Vector = _array_type(np.float64, 1)
Float32Vector = _array_type(np.float32, 1)
Float32Matrix = _array_type(np.float32, 2)
