"""Array shims for the selection kernels: one code path for numpy arrays on the CPU and torch tensors anywhere.

Large products run where the data lives, in its dtype: float32/float64 data on the CPU as numpy arrays (CPU
tensors are viewed as numpy without a copy), every other tensor (CUDA, half precision) through torch on its
device. Small linear algebra is float64 numpy on the CPU (:func:`host64`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # without it BLAS keeps its own thread count
    ThreadpoolController = None

_NUMPY_FLOATS = (np.float32, np.float64)


def as_array(x, name: str):
    """``x`` as a C-contiguous real float array: numpy for CPU float32/float64 data, else a torch tensor.

    Integer and boolean data become float64 (numpy) or the default float dtype (torch).
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex():
            raise ValueError(f"{name} must be real, got dtype {t.dtype}")
        t = (t if t.is_floating_point() else t.to(torch.get_default_dtype())).contiguous()
        if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
            return t.numpy()
        return t
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("="))


def match(x, ref):
    """``x`` as the same kind of array as ``ref``, on its device, in its dtype, C-contiguous."""
    if isinstance(ref, np.ndarray):
        x_np = x if isinstance(x, np.ndarray) else x.to("cpu").numpy()
        return np.ascontiguousarray(x_np, dtype=ref.dtype)
    x_t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return x_t.to(device=ref.device, dtype=ref.dtype).contiguous()


def count_nonfinite(x) -> int:
    """Number of NaN/Inf entries; a single reduction when there are none."""
    # NaN and Inf survive any sum; an overflowing sum of finite values falls through to the count.
    if isinstance(x, np.ndarray):
        flat = x.reshape(-1)
        quick = flat @ flat if x.dtype.type in _NUMPY_FLOATS else flat.sum()
        return 0 if np.isfinite(quick) else int(flat.size - np.count_nonzero(np.isfinite(flat)))
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return 0
    return int(x.numel() - torch.isfinite(x).sum())


def host64(x) -> np.ndarray:
    """A float64 numpy copy of ``x`` on the CPU."""
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=np.float64)
    return x.to(device="cpu", dtype=torch.float64).numpy()


def like(x64: np.ndarray, ref):
    """``x64`` in the array type, device and dtype of ``ref``."""
    if isinstance(ref, np.ndarray):
        return x64.astype(ref.dtype)
    return torch.from_numpy(x64).to(device=ref.device, dtype=ref.dtype)


def empty(shape: tuple, ref):
    if isinstance(ref, np.ndarray):
        return np.empty(shape, dtype=ref.dtype)
    return torch.empty(shape, dtype=ref.dtype, device=ref.device)


def zeros(shape: tuple, ref):
    if isinstance(ref, np.ndarray):
        return np.zeros(shape, dtype=ref.dtype)
    return torch.zeros(shape, dtype=ref.dtype, device=ref.device)


def take_rows(x, index):
    """``x[index]`` (a copy) for an int64 numpy ``index``."""
    if isinstance(x, np.ndarray):
        return x[index]
    return x[torch.from_numpy(np.asarray(index, dtype=np.int64)).to(x.device)]


def delete_row(x, j: int, size: int) -> None:
    """Shift rows ``j + 1 .. size - 1`` of ``x`` up by one, in place."""
    if isinstance(x, np.ndarray):
        x[j: size - 1] = x[j + 1: size]  # numpy buffers overlapping copies
    else:
        x[j: size - 1] = x[j + 1: size].clone()


def diagonal64(x) -> np.ndarray:
    """The diagonal of a square array as float64 numpy, shape (n,)."""
    if isinstance(x, np.ndarray):
        return np.diagonal(x).astype(np.float64)
    return host64(torch.diagonal(x))


def row_norms64(x) -> np.ndarray:
    """Euclidean norm of each row, float64 numpy, shape (n,); computed in ``x``'s dtype."""
    if isinstance(x, np.ndarray):
        return np.sqrt(np.einsum("ij,ij->i", x, x).astype(np.float64))
    return host64(torch.linalg.vector_norm(x, dim=1))


def itemsize(x) -> int:
    return x.itemsize if isinstance(x, np.ndarray) else x.element_size()


def unit_roundoff(x) -> float:
    """Machine epsilon of ``x``'s dtype."""
    return float(np.finfo(x.dtype).eps if isinstance(x, np.ndarray) else torch.finfo(x.dtype).eps)


_controller = None


def single_threaded_blas():
    """Context in which CPU BLAS runs on one thread.

    For loops of hundreds of small or memory-bound BLAS calls: with a thread pool each call may wait for an
    idle worker to wake, which on a busy or virtualised machine costs more than the call.
    """
    global _controller
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")
