"""Numpy array field types for pydantic models.

Arrays cross the actor boundary as numpy (zero-copy reads from Ray's object store); these annotated
types coerce lists or arrays to a fixed dtype and rank, and reject anything else with a message that
names the rule. In JSON they serialise as lists.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BeforeValidator, PlainSerializer


def _coerce(value, dtype, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot be read as a {ndim}-D {np.dtype(dtype).name} array: {exc}") from exc
    if array.ndim != ndim:
        raise ValueError(f"must be a {ndim}-D array, got shape {array.shape}")
    if np.issubdtype(np.dtype(dtype), np.integer):
        if array.size and not np.issubdtype(array.dtype, np.integer):
            if not np.issubdtype(array.dtype, np.floating) or not np.all(np.mod(array, 1) == 0):
                raise ValueError(f"must hold integers, got dtype {array.dtype}")
    elif array.size and not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"must hold numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=dtype)


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
