"""Orthogonal matching pursuit for gradient matching (paper Eq. 1, Algorithm 2, appendix A.1).

GRAD-MATCH chooses a subset ``S`` of candidate gradients (the rows ``A_i`` of ``A``) and weights whose
weighted sum matches a target gradient ``b``. With the regulariser of Algorithm 2 the problem is::

    minimise  E_lam(S, w) = ||sum_{i in S} w_i A_i - b||^2 + lam ||w||^2
    subject to  |S| <= budget,  w >= 0  (w free when ``positive=False``)

The greedy solver adds, one at a time, the candidate whose gradient correlates most with the residual
``r = b - A_S^T w`` (``c = A r``) and re-solves the weights exactly on the support.

Where things are computed:

- The large products (``A A^T``, ``A b``, ``A r``, products with chosen rows) run where ``A`` lives, in
  its dtype: float32/float64 arrays on the CPU (numpy arrays, or CPU tensors viewed as numpy without a
  copy) through numpy/BLAS, every other tensor (CUDA, half precision) through torch on its device.
- The small linear algebra (a Cholesky factor of ``G_SS + lam I`` grown by one row per pick, the
  weights, the non-negative solve, the final re-solve) is float64 numpy on the CPU, so it is the same
  on every device.

Correlations come from one of two methods, chosen by :func:`choose_method`:

``"gram"``
    ``G = A A^T`` once (a SYRK on the CPU, about ``n^2 d / 2`` multiply-adds) and ``A b``; each pick
    then costs ``c = A b - G_S^T w`` with the chosen rows of ``G`` kept in one contiguous
    ``(budget, n)`` buffer.
``"rows"``
    ``c = A (b - A_S^T w)`` every pick (about ``n d`` multiply-adds at matrix-vector speed), no ``n x n``
    memory.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
import torch
from scipy.linalg import blas, lapack

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # without it BLAS keeps its own thread count
    ThreadpoolController = None

ROWS_SLOWDOWN = 8.0
"""Cost of one multiply-add in a matrix-vector product relative to one in a large matrix product.

Matrix-vector products are limited by memory bandwidth, matrix products by arithmetic; on CPUs the
ratio is about 8 to 16. Used by :func:`choose_method`.
"""

PIVOT_RTOL = 64.0
"""A new Cholesky pivot at or below ``PIVOT_RTOL * eps(dtype of A) * (G_ee + lam)`` marks the candidate
as linearly dependent on the chosen ones at the precision of ``A``; it is banned with a warning."""

KKT_RTOL = 1e-9
"""Relative tolerance on the gradient of atoms dropped by the warm-started non-negative solve."""

REFINE_STEPS = 8
REFINE_RTOL = 1e-11
"""The final float64 re-solve takes at most ``REFINE_STEPS`` refinement steps and stops once a step
changes no weight by more than ``REFINE_RTOL`` times the largest weight."""

METHODS = ("auto", "gram", "rows")
STOP_REASONS = ("budget", "tolerance", "no_positive_correlation", "exhausted")
_NUMPY_FLOATS = (np.float32, np.float64)


@dataclass(frozen=True)
class OMPResult:
    """Outcome of :func:`orthogonal_matching_pursuit`.

    Attributes
    ----------
    indices : ndarray of int64, shape (n_selected,)
        Chosen rows of ``A`` in order of selection, no repeats, ``n_selected <= budget``.
    weights : ndarray of float64, shape (n_selected,)
        Exact ridge (non-negative when ``positive``) least-squares weights on ``indices``.
    error : float
        Relative matching error ``||A[indices]^T weights - b|| / ||b||`` computed in float64
        (1.0 for an empty selection of a non-zero target, 0.0 for a zero target).
    n_iter : int
        Number of candidates picked, including those banned later.
    method : str
        ``"gram"`` or ``"rows"``: how correlations were computed.
    stop_reason : str
        ``"budget"`` (budget atoms with positive weight), ``"tolerance"`` (``E_lam < eps``),
        ``"no_positive_correlation"`` (no eligible candidate correlates with the residual: ``c > 0``
        when ``positive``, ``|c| > 0`` otherwise) or ``"exhausted"`` (every candidate chosen or banned).
    """

    indices: np.ndarray
    weights: np.ndarray
    error: float
    n_iter: int
    method: str
    stop_reason: str


def orthogonal_matching_pursuit(
    A, b, budget, lam=0.5, eps=1e-10, positive=True, *, method="auto", gram_max_bytes=1 << 30
) -> OMPResult:
    """Choose at most ``budget`` rows of ``A`` whose weighted sum matches ``b`` (Algorithm 2).

    Minimises the regularised matching error of paper Eq. 1 (appendix A.1),
    ``||A_S^T w - b||^2 + lam ||w||^2``, greedily: pick the unchosen candidate most correlated with the
    residual, re-solve the weights exactly on the support, repeat. With ``positive=True`` the weights
    are non-negative; an atom whose weight the non-negative solve drives to zero leaves the support and
    is never chosen again.

    Parameters
    ----------
    A : ndarray or Tensor, shape (n_candidates, dim)
        Candidate gradients, one per row, used in place (numpy arrays and CPU tensors are not copied
        when C-contiguous). Floating dtypes are kept (float32 usual); integer arrays become float64.
    b : ndarray or Tensor, shape (dim,)
        Target gradient; cast to ``A``'s dtype and device for the large products.
    budget : int
        Maximum number of chosen rows, ``1 <= budget <= n_candidates``.
    lam : float, default 0.5
        Ridge regulariser, ``lam >= 0`` (paper: 0.5).
    eps : float, default 1e-10
        Stop once ``E_lam = ||r||^2 + lam ||w||^2 < eps`` (paper: 1e-10), absolute.
    positive : bool, default True
        Non-negative weights, picking the largest positive correlation; otherwise free weights,
        picking the largest absolute correlation.
    method : {"auto", "gram", "rows"}, default "auto"
        How correlations are computed; ``"auto"`` applies :func:`choose_method`.
    gram_max_bytes : int, default 1 GiB
        Largest ``n_candidates**2 * itemsize`` the ``"gram"`` method may allocate.

    Returns
    -------
    OMPResult
        Indices in order of selection, their float64 weights, the relative error, and why it stopped.

    Raises
    ------
    ValueError
        ``A`` not 2-D, ``b`` of the wrong shape, NaN or Inf in ``A`` or ``b``, or a bad ``budget``,
        ``lam``, ``eps``, ``method`` or ``gram_max_bytes``.

    Warns
    -----
    RuntimeWarning
        The target is zero (the result is empty), or candidates were banned because they were
        linearly dependent on the chosen ones (possible only when ``lam`` is tiny).
    """
    A_x, b_x = _as_problem(A, b)
    n, dim = A_x.shape
    _check_budget(budget, n)
    lam, eps = _check_nonnegative("lam", lam), _check_nonnegative("eps", eps)
    chosen = _resolve_method(method, n, dim, budget, _itemsize(A_x), gram_max_bytes)
    b64 = _host64(b_x)
    b_sq = float(b64 @ b64)
    if b_sq == 0.0:
        warnings.warn("target is zero; nothing to match", RuntimeWarning, stacklevel=2)
        return _result(np.empty(0, np.int64), np.empty(0), 0.0, 0, chosen, "tolerance")
    correlator = (_GramCorrelations if chosen == "gram" else _RowCorrelations)(A_x, b_x, budget)
    factor = _RidgeCholesky(budget, lam, _pivot_rtol(A_x))
    with _single_threaded_blas():
        run = _pursue(correlator, factor, b_sq, budget, eps, positive)
        indices, weights, error = _refit(A_x, b64, run.support, factor, positive)
    if run.dependent:
        _warn_dependent(run.dependent, factor.rtol)
    return _result(indices, weights, error, run.n_iter, chosen, run.stop_reason)


def choose_method(n_candidates, dim, budget, itemsize, gram_max_bytes=1 << 30) -> str:
    """Pick the cheaper way to compute correlations.

    Cost model, in multiply-adds at matrix-product speed:

    - ``"gram"``: ``n^2 d / 2`` (one symmetric product ``A A^T``); allowed only when the ``n x n``
      matrix fits, ``n^2 * itemsize <= gram_max_bytes``.
    - ``"rows"``: ``ROWS_SLOWDOWN * budget * n * d`` (one matrix-vector pass over ``A`` per pick).

    So ``"gram"`` wins when ``n <= 2 * ROWS_SLOWDOWN * budget`` and the Gram matrix fits. The per-pick
    work on chosen rows (``O(budget n)`` for gram, ``O(budget d)`` for rows) is left out.

    Parameters
    ----------
    n_candidates, dim, budget : int
        Shape of ``A`` and the selection budget.
    itemsize : int
        Bytes per element of ``A``.
    gram_max_bytes : int, default 1 GiB
        Memory limit for the Gram matrix.

    Returns
    -------
    str
        ``"gram"`` or ``"rows"``.
    """
    if n_candidates * n_candidates * itemsize > gram_max_bytes:
        return "rows"
    gram_cost = n_candidates * n_candidates * dim / 2
    rows_cost = ROWS_SLOWDOWN * budget * n_candidates * dim
    return "gram" if gram_cost <= rows_cost else "rows"


# ---------------------------------------------------------------------------------------------------
# Arrays: numpy on the CPU, torch elsewhere


def _host64(x) -> np.ndarray:
    """A float64 numpy copy of ``x`` on the CPU."""
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=np.float64)
    return x.to(device="cpu", dtype=torch.float64).numpy()


def _like(w64: np.ndarray, ref):
    """``w64`` in the array type, device and dtype of ``ref``."""
    if isinstance(ref, np.ndarray):
        return w64.astype(ref.dtype)
    return torch.from_numpy(w64).to(device=ref.device, dtype=ref.dtype)


def _empty(shape: tuple, ref):
    if isinstance(ref, np.ndarray):
        return np.empty(shape, dtype=ref.dtype)
    return torch.empty(shape, dtype=ref.dtype, device=ref.device)


def _zeros(shape: tuple, ref):
    if isinstance(ref, np.ndarray):
        return np.zeros(shape, dtype=ref.dtype)
    return torch.zeros(shape, dtype=ref.dtype, device=ref.device)


def _take_rows(x, index: np.ndarray):
    """``x[index]`` (a copy) for an int64 numpy ``index``."""
    if isinstance(x, np.ndarray):
        return x[index]
    return x[torch.from_numpy(index).to(x.device)]


def _itemsize(x) -> int:
    return x.itemsize if isinstance(x, np.ndarray) else x.element_size()


# ---------------------------------------------------------------------------------------------------
# Validation at the public edge


def _as_problem(A, b):
    """``A`` (n, d) and ``b`` (d,) as arrays of one kind, device and dtype, validated.

    float32/float64 data on the CPU become numpy arrays (tensors through ``Tensor.numpy()``, no copy);
    other tensors stay tensors on their device.
    """
    A_x = _as_array(A, "A")
    if A_x.ndim != 2:
        raise ValueError(f"A must be 2-D (n_candidates, dim), got shape {tuple(A_x.shape)}")
    b_x = _as_array(b, "b")
    if b_x.ndim != 1 or b_x.shape[0] != A_x.shape[1]:
        raise ValueError(
            f"b must have shape (dim,) = ({A_x.shape[1]},) to match A of shape {tuple(A_x.shape)}, "
            f"got shape {tuple(b_x.shape)}"
        )
    _check_finite(A_x, "A")
    _check_finite(b_x, "b")
    return A_x, _match(b_x, A_x)


def _as_array(x, name: str):
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


def _match(b_x, A_x):
    """``b`` as the same kind of array as ``A``, on its device, in its dtype."""
    if isinstance(A_x, np.ndarray):
        b_np = b_x if isinstance(b_x, np.ndarray) else b_x.to("cpu").numpy()
        return np.ascontiguousarray(b_np, dtype=A_x.dtype)
    b_t = b_x if isinstance(b_x, torch.Tensor) else torch.from_numpy(b_x)
    return b_t.to(device=A_x.device, dtype=A_x.dtype).contiguous()


def _check_finite(x, name: str) -> None:
    """Raise when ``x`` holds NaN or Inf; a single reduction when it does not."""
    n_bad = _count_nonfinite(x)
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite values; gradients must be finite")


def _count_nonfinite(x) -> int:
    # NaN and Inf survive any sum; an overflowing sum of finite values falls through to the count.
    if isinstance(x, np.ndarray):
        flat = x.reshape(-1)
        quick = flat @ flat if x.dtype.type in _NUMPY_FLOATS else flat.sum()
        return 0 if np.isfinite(quick) else int(flat.size - np.count_nonzero(np.isfinite(flat)))
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return 0
    return int(x.numel() - torch.isfinite(x).sum())


def _check_budget(budget, n: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    if budget > n:
        raise ValueError(
            f"budget == {budget} exceeds n_candidates == {n}; budget must be <= the number of rows of A"
        )


def _check_nonnegative(name: str, value) -> float:
    valid = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if not valid or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _resolve_method(method, n: int, dim: int, budget: int, itemsize: int, gram_max_bytes) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    valid = not isinstance(gram_max_bytes, bool) and isinstance(gram_max_bytes, numbers.Integral)
    if not valid or gram_max_bytes < 0:
        raise ValueError(f"gram_max_bytes must be an integer >= 0, got {gram_max_bytes!r}")
    if method == "auto":
        return choose_method(n, dim, budget, itemsize, gram_max_bytes)
    if method == "gram" and n * n * itemsize > gram_max_bytes:
        raise ValueError(
            f"method='gram' needs n_candidates**2 * itemsize == {n * n * itemsize} bytes, more than "
            f"gram_max_bytes == {gram_max_bytes}; use method='rows' or raise gram_max_bytes"
        )
    return method


def _pivot_rtol(A_x) -> float:
    eps = np.finfo(A_x.dtype).eps if isinstance(A_x, np.ndarray) else torch.finfo(A_x.dtype).eps
    return min(PIVOT_RTOL * float(eps), 1e-3)


def _warn_dependent(dependent: list, rtol: float) -> None:
    shown = ", ".join(map(str, dependent[:10])) + (", ..." if len(dependent) > 10 else "")
    warnings.warn(
        f"{len(dependent)} candidate(s) were linearly dependent on the chosen ones (Cholesky pivot "
        f"<= {rtol:.1e} * (G_ee + lam)) and were banned: [{shown}]",
        RuntimeWarning,
        stacklevel=3,
    )


def _result(indices, weights, error, n_iter, method, stop_reason) -> OMPResult:
    indices = np.asarray(indices, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    indices.flags.writeable = False
    weights.flags.writeable = False
    return OMPResult(indices, weights, float(error), int(n_iter), method, stop_reason)


# ---------------------------------------------------------------------------------------------------
# Correlations, where A lives


_controller = None


def _single_threaded_blas():
    """Context for the pick loop: CPU BLAS on one thread.

    The loop makes hundreds of BLAS calls, each small or memory-bound; with a thread pool each call may
    wait for an idle worker to wake, which on a busy or virtualised machine costs more than the call.
    """
    global _controller
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def _gram_matrix(A_x):
    """``G = A A^T``, shape (n, n), in A's dtype on A's device.

    numpy computes ``A @ A.T`` of one buffer with a BLAS SYRK (half the multiply-adds of a general
    product) and mirrors the triangle; torch uses one matrix product.
    """
    return A_x @ A_x.T


def _compact_rows(rows, keep: np.ndarray) -> int:
    """Move ``rows[keep]`` to the front of ``rows`` in place; rows before the first gap stay put."""
    first = int(np.argmax(keep != np.arange(keep.size))) if keep.size else 0
    if keep.size and keep[first] != first:
        rows[first: keep.size] = _take_rows(rows, keep[first:])
    return keep.size


class _GramCorrelations:
    """Correlations ``c = A b - G_S^T w`` from a precomputed Gram matrix ``G = A A^T``."""

    def __init__(self, A_x, b_x, budget: int):
        self.A = A_x
        self._gram = _gram_matrix(A_x)  # (n, n)
        self._Ab = A_x @ b_x  # (n,)
        self._rows = _empty((budget, A_x.shape[0]), A_x)  # G[S, :], contiguous
        self.size = 0

    def target(self) -> np.ndarray:
        """``p = A b``, float64 on the CPU, shape (n,)."""
        return _host64(self._Ab)

    def correlations(self, w):
        """``c = A b - G_S^T w``, shape (n,); ``w`` (size,) in A's array type and dtype."""
        if self.size == 0:
            return self._Ab
        return self._Ab - w @ self._rows[: self.size]

    def append(self, e: int) -> np.ndarray:
        """Add candidate ``e``; return ``G[S + [e], e]`` as float64, shape (size + 1,)."""
        self._rows[self.size] = self._gram[e]
        self.size += 1
        return _host64(self._rows[: self.size, e])

    def pop(self) -> None:
        """Undo the last :meth:`append`."""
        self.size -= 1

    def restrict(self, keep: np.ndarray) -> None:
        """Keep only the support positions ``keep`` (increasing), in order."""
        self.size = _compact_rows(self._rows, keep)


class _RowCorrelations:
    """Correlations ``c = A (b - A_S^T w)``, one pass over the rows of ``A`` per pick."""

    def __init__(self, A_x, b_x, budget: int):
        self.A, self._b = A_x, b_x
        self._rows = _empty((budget, A_x.shape[1]), A_x)  # A[S, :], contiguous
        self.size = 0

    def target(self) -> np.ndarray:
        """``p = A b``, float64 on the CPU, shape (n,)."""
        return _host64(self.A @ self._b)

    def correlations(self, w):
        """``c = A r`` with ``r = b - A_S^T w``, shape (n,)."""
        if self.size == 0:
            return self.A @ self._b
        return self.A @ (self._b - w @ self._rows[: self.size])

    def append(self, e: int) -> np.ndarray:
        """Add candidate ``e``; return ``A[S + [e]] A[e]`` as float64, shape (size + 1,)."""
        self._rows[self.size] = self.A[e]
        self.size += 1
        return _host64(self._rows[: self.size] @ self._rows[self.size - 1])

    def pop(self) -> None:
        """Undo the last :meth:`append`."""
        self.size -= 1

    def restrict(self, keep: np.ndarray) -> None:
        """Keep only the support positions ``keep`` (increasing), in order."""
        self.size = _compact_rows(self._rows, keep)


# ---------------------------------------------------------------------------------------------------
# Small float64 factor on the CPU


class _RidgeCholesky:
    """Cholesky factor ``L`` of ``Q = G_SS + lam I``, grown one row per pick, and ``z = L^{-1} p_S``.

    With ``p = A b`` the ridge weights are ``w = L^{-T} z`` and, at those weights,
    ``E_lam = ||b||^2 - ||z||^2``. ``L`` is stored row after row (LAPACK upper-packed ``L^T``), so a
    new row is appended to one array and each triangular solve is one BLAS call, O(size^2).
    """

    def __init__(self, budget: int, lam: float, rtol: float):
        self.lam, self.rtol, self.size = lam, rtol, 0
        self._packed = np.zeros(budget * (budget + 1) // 2)
        self._gram = np.zeros((budget, budget))  # G_SS without lam
        self._p = np.zeros(budget)
        self._z = np.zeros(budget)

    def try_append(self, g: np.ndarray, p_e: float) -> bool:
        """Add an atom with ``g = G[S + [e], e]`` (size + 1,); False if it is numerically dependent."""
        s, lam = self.size, self.lam
        row = blas.dtpsv(s, self._packed, g[:s], trans=1) if s else g[:0]  # L^{-1} g_S
        pivot = g[s] + lam - row @ row
        if not pivot > self.rtol * (g[s] + lam):
            return False
        d = math.sqrt(pivot)
        start = s * (s + 1) // 2
        self._packed[start: start + s] = row
        self._packed[start + s] = d
        self._gram[s, : s + 1] = g
        self._gram[:s, s] = g[:s]
        self._p[s] = p_e
        self._z[s] = (p_e - row @ self._z[:s]) / d
        self.size = s + 1
        return True

    def weights(self) -> np.ndarray:
        """Unconstrained ridge weights on the support, shape (size,)."""
        if self.size == 0:
            return np.empty(0)
        return blas.dtpsv(self.size, self._packed, self._z[: self.size], trans=0)

    def solve(self, v: np.ndarray) -> np.ndarray:
        """``Q^{-1} v`` for ``v`` of shape (size,)."""
        inner = blas.dtpsv(self.size, self._packed, v, trans=1)
        return blas.dtpsv(self.size, self._packed, inner, trans=0, overwrite_x=1)

    def explained(self) -> float:
        """``||z||^2 = p_S^T Q^{-1} p_S``, so that ``E_lam = ||b||^2 - explained``."""
        z = self._z[: self.size]
        return float(z @ z)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``G_SS`` (size, size) and ``p_S`` (size,)."""
        return self._gram[: self.size, : self.size].copy(), self._p[: self.size].copy()

    def nonnegative_weights(self) -> np.ndarray:
        """Exact non-negative optimum on the support, shape (size,).

        ``w^T Q w / 2 - p^T w = ||L^T w - z||^2 / 2 + const``, so ``nnls(L^T, z)`` minimises E_lam
        over ``w >= 0``.
        """
        s = self.size
        upper, _ = lapack.dtpttr(s, self._packed[: s * (s + 1) // 2])  # L^T, (s, s)
        return scipy.optimize.nnls(np.triu(upper), self._z[:s])[0]

    def restrict(self, keep: np.ndarray) -> None:
        """Refactor for the support positions ``keep`` (increasing)."""
        self.load(self._gram[np.ix_(keep, keep)], self._p[keep])

    def load(self, gram: np.ndarray, p: np.ndarray) -> None:
        """Factor a support from scratch: ``gram`` = G_SS (k, k), ``p`` = p_S (k,)."""
        k = self.size = p.size
        if k == 0:
            return
        q = gram + self.lam * np.eye(k)
        upper, info = lapack.dpotrf(q.T, lower=0, clean=0)  # q is symmetric: q.T is its F-order view
        if info != 0:
            raise np.linalg.LinAlgError(f"G_SS + lam I is not positive definite (potrf info {info})")
        packed, _ = lapack.dtrttp(upper)  # column-major upper = L row by row
        self._packed[: packed.size] = packed
        self._gram[:k, :k] = gram
        self._p[:k] = p
        self._z[:k] = blas.dtpsv(k, self._packed, p, trans=1)


# ---------------------------------------------------------------------------------------------------
# The greedy loop (Algorithm 2)


@dataclass
class _Run:
    support: list
    n_iter: int
    stop_reason: str
    dependent: list


def _pursue(correlator, factor: _RidgeCholesky, b_sq: float, budget: int, eps: float,
            positive: bool) -> _Run:
    """Greedy selection; the support comes back as rows of ``A`` in order of selection."""
    p = correlator.target()
    n = p.size
    penalty = _zeros((n,), correlator.A)  # -inf on chosen and banned candidates
    support, dependent = [], []
    n_blocked, n_iter, energy = 0, 0, b_sq
    w, c = np.empty(0), None
    while True:
        reason = _stop_reason(len(support), budget, energy, eps, n_blocked, n)
        if reason:
            break
        if c is None:
            c = correlator.correlations(_like(w, correlator.A))
        e, score = _best_candidate(c, penalty, positive)
        if not score > 0:
            reason = "no_positive_correlation"
            break
        n_iter, n_blocked = n_iter + 1, n_blocked + 1
        penalty[e] = -math.inf
        if not factor.try_append(correlator.append(e), p[e]):
            correlator.pop()
            dependent.append(e)
            continue  # the weights did not change, so neither did c
        support.append(e)
        w, support = _solve_support(factor, correlator, support, w, positive)
        energy, c = b_sq - factor.explained(), None
    return _Run(support, n_iter, reason, dependent)


def _stop_reason(size: int, budget: int, energy: float, eps: float, n_blocked: int, n: int) -> str:
    if size == budget:
        return "budget"
    if energy < eps:
        return "tolerance"
    if n_blocked == n:
        return "exhausted"
    return ""


def _best_candidate(c, penalty, positive: bool) -> tuple[int, float]:
    """Unblocked index with the largest ``c`` (``|c|`` unless ``positive``), and that value."""
    score = (c if positive else abs(c)) + penalty
    e = int(score.argmax())
    return e, float(score[e])


def _solve_support(factor: _RidgeCholesky, correlator, support: list, w_prev: np.ndarray,
                   positive: bool):
    """Ridge weights after a pick; atoms the non-negative solve sets to zero leave (and stay banned)."""
    w = factor.weights()
    if not positive or w.min() > 0:
        return w, support
    keep = _nonnegative_support(factor, np.append(w_prev, 0.0), w)
    correlator.restrict(keep)
    return factor.weights(), [support[i] for i in keep]


def _nonnegative_support(factor: _RidgeCholesky, start: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Positions of the support that keep a positive weight in the exact non-negative optimum.

    Lawson-Hanson steps from the previous optimum ``start`` (feasible, new atom at 0) towards the
    unconstrained solution ``w``, dropping the atom that reaches zero first and refactoring, until all
    weights are positive. The result is accepted when no dropped atom has a positive gradient (the
    optimality conditions of the non-negative problem); otherwise ``nnls`` decides. Leaves ``factor``
    on the returned positions.
    """
    gram, p = factor.snapshot()
    keep, x = np.arange(p.size), start
    while w.size and w.min() <= 0:
        negative = np.flatnonzero(w <= 0)
        gap = x[negative] - w[negative]  # >= 0
        ratios = np.divide(x[negative], gap, out=np.zeros_like(gap), where=gap > 0)
        x = x + ratios.min() * (w - x)
        x[negative[ratios.argmin()]] = 0.0
        alive = np.flatnonzero(x > 0)
        keep, x = keep[alive], x[alive]
        factor.restrict(alive)
        w = factor.weights()
    if _is_nonnegative_optimum(gram, p, keep, w):
        return keep
    factor.load(gram, p)
    keep = np.flatnonzero(factor.nonnegative_weights() > 0)
    factor.restrict(keep)
    return keep


def _is_nonnegative_optimum(gram: np.ndarray, p: np.ndarray, keep: np.ndarray, w: np.ndarray) -> bool:
    """No atom outside ``keep`` would lower E_lam by entering: ``p_j - G_j,keep w <= 0``."""
    dropped = np.setdiff1d(np.arange(p.size), keep)
    gradient = p[dropped] - gram[np.ix_(dropped, keep)] @ w
    return bool((gradient <= KKT_RTOL * np.abs(p).max()).all())


# ---------------------------------------------------------------------------------------------------
# Final exact solve on the chosen support, in float64


def _refit(A_x, b64: np.ndarray, support: list, factor: _RidgeCholesky, positive: bool):
    """Exact ridge(-NNLS) weights on ``support`` in float64, and the relative error.

    The loop's factor comes from products in A's dtype. Its weights are refined against the float64
    normal equations ``(A_S A_S^T + lam I) w = A_S b`` (:func:`_refine`); when that does not
    converge, or a weight turns non-positive under ``positive``, the support is solved directly.
    Atoms left with zero weight are dropped.
    """
    indices = np.asarray(support, dtype=np.int64)
    if indices.size == 0:
        return indices, np.empty(0), 1.0
    rows = _host64(_take_rows(A_x, indices))  # (s, d)
    weights = _refine(rows, b64, factor)
    if weights is None or (positive and weights.min() <= 0):
        weights = _ridge_weights(rows, b64, factor.lam, positive)
    if positive and not (weights > 0).all():
        keep = weights > 0
        indices, rows, weights = indices[keep], rows[keep], weights[keep]
    error = np.linalg.norm(b64 - weights @ rows) / math.sqrt(b64 @ b64)
    return indices, weights, float(error)


def _refine(rows: np.ndarray, b64: np.ndarray, factor: _RidgeCholesky) -> np.ndarray | None:
    """Iterative refinement of the loop's ridge weights in float64; None if it does not converge.

    Each step solves ``Q_loop step = A_S b - (A_S A_S^T + lam I) w`` with the loop's factor, the
    residual of the normal equations formed in float64 from ``rows`` (s, d) in two matrix-vector
    products, so no ``s x s`` float64 Gram matrix is built.
    """
    w = factor.weights()
    previous = math.inf
    for _ in range(REFINE_STEPS):
        step = factor.solve(rows @ (b64 - w @ rows) - factor.lam * w)
        w = w + step
        size = np.abs(step).max()
        if size <= REFINE_RTOL * np.abs(w).max():
            return w
        if not size < 0.5 * previous:  # not contracting: the loop's factor is too far off
            return None
        previous = size
    return None


def _ridge_weights(rows: np.ndarray, b64: np.ndarray, lam: float, positive: bool) -> np.ndarray:
    """``argmin_w ||rows^T w - b||^2 + lam ||w||^2`` (``w >= 0`` if ``positive``); rows (s, d)."""
    q = rows @ rows.T + lam * np.eye(rows.shape[0])
    p = rows @ b64
    try:
        lower = scipy.linalg.cholesky(q, lower=True, check_finite=False)
    except np.linalg.LinAlgError:  # singular (lam == 0 and dependent rows): solve the stacked system
        return _stacked_solve(rows, b64, lam, positive)
    z = scipy.linalg.solve_triangular(lower, p, lower=True, check_finite=False)
    w = scipy.linalg.solve_triangular(lower.T, z, lower=False, check_finite=False)
    if positive and w.min() <= 0:
        w = scipy.optimize.nnls(lower.T, z)[0]
    return w


def _stacked_solve(rows: np.ndarray, b64: np.ndarray, lam: float, positive: bool) -> np.ndarray:
    """Least squares on ``[rows^T; sqrt(lam) I] w = [b; 0]``."""
    s = rows.shape[0]
    matrix = np.vstack([rows.T, math.sqrt(lam) * np.eye(s)])
    target = np.concatenate([b64, np.zeros(s)])
    if positive:
        return scipy.optimize.nnls(matrix, target)[0]
    return np.linalg.lstsq(matrix, target, rcond=None)[0]
