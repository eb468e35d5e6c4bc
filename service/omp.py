"""Orthogonal matching pursuit for gradient matching (paper Eq. 1, Algorithm 2, appendix A.1).

GRAD-MATCH chooses a subset ``S`` of candidate gradients (the rows ``A_i`` of ``A``) and weights whose
weighted sum matches a target gradient ``b``. With the regulariser of Algorithm 2 the problem is::

    minimise  E_lam(S, w) = ||sum_{i in S} w_i A_i - b||^2 + lam ||w||^2
    subject to  |S| <= n_select,  w >= 0  (w free when ``positive=False``)

:func:`_pursue` is the greedy loop, read top to bottom as scikit-learn's ``_gram_omp``: correlate the
candidates with the residual (``c = A b - G_S^T w``), pick the largest, grow a Cholesky factor of
``G_SS + lam I`` by one row, update the weights; under ``positive``, atoms the non-negative solve drives to
zero leave the support and are never picked again.

Where things are computed: the large products (``A A^T``, ``A b``, correlations, products with chosen rows)
run where ``A`` lives, in its dtype (:mod:`service.arrays`); the small linear algebra (the factor, the
weights, the non-negative solve, the final re-solve) is float64 numpy on the CPU, the same on every device.

Correlations come from one of two methods, chosen by :func:`choose_method`:

``"gram"``
    ``G = A A^T`` once (a SYRK on the CPU); each pick then costs ``c = A b - G_S^T w`` with the chosen rows
    of ``G`` in one contiguous buffer. :func:`omp_gram` runs this method on a Gram matrix given by the caller.
``"rows"``
    ``c = A (b - A_S^T w)`` every pick (one pass over ``A``), no ``n x n`` memory.

Precision: products in ``A``'s dtype are trusted to ``PRECISION_RTOL * eps(dtype)`` relative. A candidate
is numerically dependent on the chosen atoms when its Cholesky pivot (its squared distance from their span)
is within the rounding error of the products it is computed from; that error grows with the conditioning of
the support (see :meth:`service.ridge.Cholesky.append`). Dependent candidates are banned with a ``RuntimeWarning``. A
correlation within its rounding error counts as zero.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from service import arrays
from service.checks import nonnegative_float, positive_int
from service.ridge import Cholesky, ridge_weights, stacked_solve

ROWS_SLOWDOWN = 8.0
"""Cost of one multiply-add in a matrix-vector product over an operand streamed from memory, relative to one
in a large matrix product (memory bandwidth against arithmetic; 8 to 16 on CPUs). Used by :func:`choose_method`."""

CACHED_SLOWDOWN = 2.5
"""The same ratio for an operand of at most ``CACHE_BYTES``, read from the last-level cache (measured 2.2 to 2.5
on the 2-core test machine, single-threaded, float32)."""

CACHE_BYTES = 16 << 20
"""Operands up to this size are assumed to stay in the last-level cache from one pick to the next."""

PARALLEL_PICK_ELEMENTS = 1 << 20
"""Per-pick products of at least this many elements (``n * dim`` for rows, ``n * n_select`` for gram) run on the
caller's BLAS threads; smaller ones on one thread (:func:`_loop_threads`)."""

PRECISION_RTOL = 64.0
MAX_PRECISION = 1e-3
"""Products in A's dtype are trusted to ``min(PRECISION_RTOL * eps(dtype), MAX_PRECISION)`` relative (the cap
keeps half-precision data usable: its loop is approximate, the final re-solve is exact in float64)."""

KKT_RTOL = 1e-9
"""Relative tolerance on the gradient of atoms dropped by the warm-started non-negative solve."""

REFINE_STEPS = 8
REFINE_RTOL = 1e-11
"""The final float64 re-solve takes at most ``REFINE_STEPS`` refinement steps and stops once a step
changes no weight by more than ``REFINE_RTOL`` times the largest weight."""

METHODS = ("auto", "gram", "rows")
STOP_REASONS = ("budget", "tolerance", "no_positive_correlation", "exhausted")


@dataclass(frozen=True)
class OMPResult:
    """Outcome of :func:`orthogonal_matching_pursuit` and :func:`omp_gram`.

    Attributes
    ----------
    indices : ndarray of int64, shape (n_selected,)
        Chosen candidates in order of selection, no repeats, ``n_selected <= n_select``.
    weights : ndarray of float64, shape (n_selected,)
        Exact ridge (non-negative when ``positive``) least-squares weights on ``indices``.
    error : float
        Relative matching error ``||A[indices]^T weights - b|| / ||b||`` in float64 (1.0 for an empty
        selection of a non-zero target, 0.0 for a zero target).
    n_iter : int
        Number of candidates picked, including those that left the support or were banned.
    method : str
        ``"gram"`` or ``"rows"``: how correlations were computed.
    stop_reason : str
        ``"budget"`` (n_select atoms with positive weight), ``"tolerance"`` (``E_lam < eps``, or no candidate
        correlates beyond rounding and ``E_lam`` is within its rounding error: matched to working precision),
        ``"no_positive_correlation"`` (no eligible candidate correlates with the residual beyond rounding:
        ``c > 0`` when ``positive``, ``|c| > 0`` otherwise) or ``"exhausted"`` (every candidate chosen or
        banned).
    """

    indices: np.ndarray
    weights: np.ndarray
    error: float
    n_iter: int
    method: str
    stop_reason: str


def orthogonal_matching_pursuit(
    A, b, n_select, lam=0.5, eps=1e-10, positive=True, *, method="auto", gram_max_bytes=1 << 30
) -> OMPResult:
    """Choose at most ``n_select`` rows of ``A`` whose weighted sum matches ``b`` (Algorithm 2).

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
    n_select : int
        Maximum number of chosen rows, ``1 <= n_select <= n_candidates``.
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
        ``A`` not 2-D, ``b`` of the wrong shape, NaN or Inf in ``A`` or ``b``, or a bad ``n_select``,
        ``lam``, ``eps``, ``method`` or ``gram_max_bytes``.

    Warns
    -----
    RuntimeWarning
        The target is zero (the result is empty); candidates were banned as linearly dependent on the chosen
        ones; or the run ended early because the remaining candidates correlate with the residual only within
        rounding (dependent on the chosen ones; possible only when ``lam`` is tiny).
    """
    A_x, b_x = _as_problem(A, b)
    n, dim = A_x.shape
    n_select = positive_int(n_select, "n_select", at_most=n, limit="n_candidates")
    lam, eps = nonnegative_float(lam, "lam"), nonnegative_float(eps, "eps")
    method = _resolve_method(method, n, dim, n_select, arrays.itemsize(A_x), gram_max_bytes)
    b64 = arrays.host64(b_x)
    b_sq = float(b64 @ b64)
    if b_sq == 0.0:
        return _zero_target(method)
    if method == "gram":
        products = _GramProducts(A_x @ A_x.T, A_x @ b_x, n_select)  # (n, n) and (n,), all BLAS threads
    else:
        products = _RowProducts(A_x, b_x, n_select)
    with _loop_threads(n * (n_select if method == "gram" else dim)):
        run = _pursue(products, b_sq, n_select, lam, eps, positive, _precision(A_x))
        indices, weights, error = _refit(A_x, b64, run, positive)
    _warn_early_end(run)
    return _result(indices, weights, error, run.n_iter, method, run.stop_reason)


def omp_gram(gram, correlation, target_sq_norm, n_select, lam=0.5, eps=1e-10, positive=True) -> OMPResult:
    """Algorithm 2 on a precomputed Gram matrix: the ``"gram"`` method of :func:`orthogonal_matching_pursuit`.

    For candidate rows ``A`` and target ``b``, pass ``gram = A A^T``, ``correlation = A b`` and
    ``target_sq_norm = ||b||^2``; the support and weights are those of
    ``orthogonal_matching_pursuit(A, b, n_select, lam, eps, positive, method="gram")``. Partial Gram matrices of
    column blocks of ``A`` (class shards) add up to the whole one.

    Parameters
    ----------
    gram : ndarray or Tensor, shape (n_candidates, n_candidates)
        Symmetric positive semi-definite ``A A^T`` (not checked), used in place, in its dtype and device.
    correlation : ndarray or Tensor, shape (n_candidates,)
        ``A b``.
    target_sq_norm : float
        ``||b||^2``, ``>= 0``.
    n_select, lam, eps, positive
        As in :func:`orthogonal_matching_pursuit`.

    Returns
    -------
    OMPResult
        As :func:`orthogonal_matching_pursuit`, with ``method == "gram"``. The weights are the exact optimum
        for the given ``gram`` and ``correlation`` (float64 solve); ``error`` comes from them,
        ``sqrt(max(0, ||b||^2 - 2 w.p_S + w^T G_SS w) / ||b||^2)``, a difference of nearly equal energies
        resolved only to about ``sqrt(cond(G_SS) * eps(dtype))``.

    Raises
    ------
    ValueError
        ``gram`` not square, ``correlation`` of the wrong shape, NaN or Inf in either, or a bad
        ``target_sq_norm``, ``n_select``, ``lam`` or ``eps``.

    Warns
    -----
    RuntimeWarning
        As :func:`orthogonal_matching_pursuit`.
    """
    gram_x, p_x = _as_gram_problem(gram, correlation)
    n = gram_x.shape[0]
    b_sq = nonnegative_float(target_sq_norm, "target_sq_norm")
    n_select = positive_int(n_select, "n_select", at_most=n, limit="n_candidates")
    lam, eps = nonnegative_float(lam, "lam"), nonnegative_float(eps, "eps")
    if b_sq == 0.0:
        return _zero_target("gram")
    with _loop_threads(n * n_select):
        run = _pursue(_GramProducts(gram_x, p_x, n_select), b_sq, n_select, lam, eps, positive, _precision(gram_x))
    factor = run.factor
    factor.refresh()
    residual_sq = b_sq - factor.explained - lam * float(factor.weights @ factor.weights)
    _warn_early_end(run)
    error = math.sqrt(max(residual_sq, 0.0) / b_sq)
    return _result(run.support, factor.weights, error, run.n_iter, "gram", run.stop_reason)


def choose_method(n_candidates, dim, n_select, itemsize, gram_max_bytes=1 << 30) -> str:
    """Pick the cheaper way to compute correlations.

    Cost model, in multiply-adds at matrix-product speed (``s(x)`` is ``CACHED_SLOWDOWN`` for an operand of
    ``x <= CACHE_BYTES`` bytes, ``ROWS_SLOWDOWN`` otherwise):

    - ``"gram"``: ``n^2 d / 2`` (one symmetric product ``A A^T``) plus ``s(n_select n) n n_select^2 / 2`` (one
      product with the chosen rows of ``G`` per pick); allowed only when ``n^2 * itemsize <= gram_max_bytes``.
    - ``"rows"``: ``s(n d) n_select d (n + n_select)`` (one pass over ``A`` and one over the chosen rows per pick).

    Parameters
    ----------
    n_candidates, dim, n_select : int
        Shape of ``A`` and the number of rows to choose.
    itemsize : int
        Bytes per element of ``A``.
    gram_max_bytes : int, default 1 GiB
        Memory limit for the Gram matrix.

    Returns
    -------
    str
        ``"gram"`` or ``"rows"``.
    """
    n, d, k = n_candidates, dim, n_select
    if n * n * itemsize > gram_max_bytes:
        return "rows"
    gram_cost = n * n * d / 2 + _slowdown(k * n * itemsize) * n * k * k / 2
    rows_cost = _slowdown(n * d * itemsize) * k * d * (n + k)
    return "gram" if gram_cost <= rows_cost else "rows"


def _slowdown(operand_bytes: int) -> float:
    return CACHED_SLOWDOWN if operand_bytes <= CACHE_BYTES else ROWS_SLOWDOWN


def _loop_threads(pick_elements: int):
    """BLAS threads for the pick loop: one, unless each pick's large product has ``PARALLEL_PICK_ELEMENTS``.

    Small calls gain nothing from threads and may wait for idle workers to wake (which on a busy machine costs
    more than the call); large ones run on the threads the caller gave BLAS.
    """
    return contextlib.nullcontext() if pick_elements >= PARALLEL_PICK_ELEMENTS else arrays.single_threaded_blas()


# ---------------------------------------------------------------------------------------------------
# The pursuit (Algorithm 2)


@dataclass
class _Run:
    support: list  # chosen candidates, in order of selection
    factor: Cholesky  # of the support; its weights are the loop's solution
    n_iter: int
    stop_reason: str
    dependent: list  # candidates banned as numerically dependent on the chosen ones
    rounding: bool  # ended because the remaining correlations are within rounding (dependent candidates)


def _pursue(products, b_sq: float, n_select: int, lam: float, eps: float, positive: bool,
            precision: float) -> _Run:
    """Greedy selection with a Cholesky factor grown one atom per pick.

    ``products`` computes correlations and the chosen atoms' Gram entries where ``A`` lives (``_GramProducts``
    or ``_RowProducts``); ``precision`` is the relative accuracy of those products.
    """
    p, norms = products.target, products.norms  # A b and ||A_i||, float64 (n,)
    n, b_norm = p.size, math.sqrt(b_sq)
    factor = Cholesky(n_select, lam, precision)
    penalty = arrays.zeros((n,), products.target_x)  # -inf on chosen and banned candidates
    support, dependent, n_iter, c = [], [], 0, None
    while True:
        reason = _stop_reason(len(support), n_select, b_sq - factor.explained, eps, n_iter, n)
        if reason:
            break
        if c is None:
            c = products.correlations(factor.weights)  # (n,) in A's dtype
        # a correlation is significant beyond level * ||A_e||, the rounding error of c_e = A_e . r
        level = precision * (b_norm + np.abs(factor.weights) @ factor.roots[: factor.size])
        e = _pick(c, penalty, positive, level, norms)
        if e < 0:
            reason = "no_positive_correlation"
            break
        n_iter += 1
        penalty[e] = -math.inf
        previous = factor.weights
        if not factor.append(products.append(e), p[e]):
            products.pop()
            dependent.append(e)
            continue  # the weights did not change, so neither did c
        support.append(e)
        c = None
        if positive and factor.weights.min() <= 0:
            support = _drop_nonpositive(factor, products, support, previous, p)
    if reason == "no_positive_correlation" and b_sq - factor.explained <= precision * b_sq:
        reason = "tolerance"  # nothing left to match at the precision of the products
    rounding = reason == "no_positive_correlation" and _correlated_within_rounding(c, penalty, positive)
    return _Run(support, factor, n_iter, reason, dependent, rounding)


def _stop_reason(size: int, n_select: int, energy: float, eps: float, n_blocked: int, n: int) -> str:
    if size == n_select:
        return "budget"
    if energy < eps:
        return "tolerance"
    if n_blocked == n:  # every pick blocks one candidate for good
        return "exhausted"
    return ""


def _pick(c, penalty, positive: bool, level: float, norms: np.ndarray) -> int:
    """The eligible candidate with the largest significant ``c`` (``|c|`` unless ``positive``); -1 if none."""
    score = (c if positive else abs(c)) + penalty
    e = int(score.argmax())
    if float(score[e]) > level * norms[e]:
        return e
    score = arrays.host64(score)  # rare: the largest is within rounding; look for a smaller, significant one
    significant = score > level * norms
    return int(np.where(significant, score, -np.inf).argmax()) if significant.any() else -1


def _correlated_within_rounding(c, penalty, positive: bool) -> bool:
    """Some eligible candidate correlates with the residual, but only within rounding (none does beyond it)."""
    return bool((arrays.host64((c if positive else abs(c)) + penalty) > 0).any())


def _drop_nonpositive(factor: Cholesky, products, support: list, previous: np.ndarray, p: np.ndarray) -> list:
    """Make the weights the exact non-negative optimum on ``support``; atoms at zero leave it.

    Lawson-Hanson steps from the previous optimum (the new atom at 0) towards the unconstrained solution:
    drop the atom that reaches zero first, re-solve, until every weight is positive. The result is accepted
    when no dropped atom has a positive gradient (the optimality conditions of the non-negative problem);
    otherwise ``nnls`` decides from scratch. Leaves ``factor`` and ``products`` on the returned support.
    """
    before = list(support)
    x, w = np.append(previous, 0.0), factor.weights
    while w.min() <= 0:
        negative = np.flatnonzero(w <= 0)
        gap = x[negative] - w[negative]  # > 0: old atoms are positive, the new one starts at 0 with w > 0
        ratios = np.divide(x[negative], gap, out=np.zeros_like(gap), where=gap > 0)
        x = x + ratios.min() * (w - x)
        x[negative[ratios.argmin()]] = 0.0
        for j in np.flatnonzero(x <= 0)[::-1]:
            factor.delete(j)
            products.delete(j)
            del support[j]
        x, w = x[x > 0], factor.weights
    kept = set(support)
    dropped = [e for e in before if e not in kept]
    gradients = [p[e] - products.cross(e) @ w for e in dropped]  # of E_lam / 2, at w_e = 0
    if max(gradients) <= KKT_RTOL * np.abs(p).max():
        return support
    return _nonnegative_from_scratch(factor, products, np.asarray(before), p)


def _nonnegative_from_scratch(factor: Cholesky, products, atoms: np.ndarray, p: np.ndarray) -> list:
    """``nnls`` on ``atoms``; the atoms it keeps positive become the support."""
    gram = products.block(atoms)  # (s, s) float64
    factor.load(gram, p[atoms])
    keep = np.flatnonzero(factor.nonnegative_weights() > 0)
    factor.load(gram[np.ix_(keep, keep)], p[atoms[keep]])
    products.load(atoms[keep])
    return atoms[keep].tolist()


# ---------------------------------------------------------------------------------------------------
# Products, where A lives


class _ChosenRows:
    """The rows kept for the chosen atoms, in pick order: ``_rows[:size]`` of a buffer sized for ``n_select`` rows."""

    _rows = None
    size = 0

    def pop(self) -> None:
        self.size -= 1

    def delete(self, j: int) -> None:
        arrays.delete_row(self._rows, j, self.size)
        self.size -= 1


class _GramProducts(_ChosenRows):
    """Correlations from a Gram matrix ``G = A A^T``: ``c = A b - G_S^T w``, chosen rows of ``G`` in one buffer."""

    def __init__(self, gram, correlation, n_select: int):
        self._gram, self.target_x = gram, correlation  # (n, n), (n,): A's array type, dtype and device
        self.target = arrays.host64(correlation)
        self.norms = np.sqrt(np.maximum(arrays.diagonal64(gram), 0.0))
        self._rows = arrays.empty((n_select, gram.shape[0]), gram)  # G[S, :]
        self.size = 0

    def correlations(self, w: np.ndarray):
        if self.size == 0:
            return self.target_x
        return self.target_x - arrays.like(w, self._rows) @ self._rows[: self.size]

    def append(self, e: int) -> np.ndarray:
        """Add candidate ``e``; return ``G[S + [e], e]``, float64 (size + 1,)."""
        self._rows[self.size] = self._gram[e]
        self.size += 1
        return self.cross(e)

    def cross(self, e: int) -> np.ndarray:
        """``G[S, e]``, float64 (size,)."""
        return arrays.host64(self._rows[: self.size, e])

    def block(self, atoms: np.ndarray) -> np.ndarray:
        """``G[atoms][:, atoms]``, float64."""
        return arrays.host64(arrays.take_rows(arrays.take_rows(self._gram, atoms).T, atoms))

    def load(self, atoms: np.ndarray) -> None:
        self.size = atoms.size
        if atoms.size:
            self._rows[: atoms.size] = arrays.take_rows(self._gram, atoms)


class _RowProducts(_ChosenRows):
    """Correlations ``c = A (b - A_S^T w)``, one pass over the rows of ``A`` per pick; chosen rows in one buffer."""

    def __init__(self, A_x, b_x, n_select: int):
        self._A, self._b = A_x, b_x
        self.target_x = A_x @ b_x
        self.target = arrays.host64(self.target_x)
        self.norms = arrays.row_norms64(A_x)
        self._rows = arrays.empty((n_select, A_x.shape[1]), A_x)  # A[S, :]
        self.size = 0

    def correlations(self, w: np.ndarray):
        if self.size == 0:
            return self.target_x
        return self._A @ (self._b - arrays.like(w, self._rows) @ self._rows[: self.size])

    def append(self, e: int) -> np.ndarray:
        """Add candidate ``e``; return ``A[S + [e]] A[e]``, float64 (size + 1,)."""
        self._rows[self.size] = self._A[e]
        self.size += 1
        return self.cross(e)

    def cross(self, e: int) -> np.ndarray:
        """``A[S] A[e]``, float64 (size,)."""
        return arrays.host64(self._rows[: self.size] @ self._A[e])

    def block(self, atoms: np.ndarray) -> np.ndarray:
        """``A[atoms] A[atoms]^T``, float64."""
        rows = arrays.take_rows(self._A, atoms)
        return arrays.host64(rows @ rows.T)

    def load(self, atoms: np.ndarray) -> None:
        self.size = atoms.size
        if atoms.size:
            self._rows[: atoms.size] = arrays.take_rows(self._A, atoms)


# ---------------------------------------------------------------------------------------------------
# Final exact solve on the chosen support, in float64


def _refit(A_x, b64: np.ndarray, run: _Run, positive: bool):
    """Exact ridge(-NNLS) weights on the support in float64, and the relative error.

    The loop's factor comes from products in A's dtype. Its weights are refined against the float64
    normal equations ``(A_S A_S^T + lam I) w = A_S b`` (:func:`_refine`). When that does not converge (an
    ill-conditioned support, where normal equations lose twice the digits) the support is solved by QR; when a
    weight turns non-positive under ``positive``, by a direct non-negative solve. Atoms left with zero weight
    are dropped.
    """
    indices, factor = np.asarray(run.support, dtype=np.int64), run.factor
    if indices.size == 0:
        return indices, np.empty(0), 1.0
    rows = arrays.host64(arrays.take_rows(A_x, indices))  # (s, d)
    weights = _refine(rows, b64, factor)
    if weights is None:
        weights = stacked_solve(rows, b64, factor.lam, positive)
    elif positive and weights.min() <= 0:
        weights = ridge_weights(rows @ rows.T, rows @ b64, factor.lam, positive,
                                singular=lambda: stacked_solve(rows, b64, factor.lam, positive))
    if positive and not (weights > 0).all():
        keep = weights > 0
        indices, rows, weights = indices[keep], rows[keep], weights[keep]
    error = np.linalg.norm(b64 - weights @ rows) / math.sqrt(b64 @ b64)
    return indices, weights, float(error)


def _refine(rows: np.ndarray, b64: np.ndarray, factor: Cholesky) -> np.ndarray | None:
    """Iterative refinement of the loop's ridge weights in float64; None if it does not converge.

    Each step solves ``Q_loop step = A_S b - (A_S A_S^T + lam I) w`` with the loop's factor, the
    residual of the normal equations formed in float64 from ``rows`` (s, d) in two matrix-vector
    products (the corrected semi-normal equations), so no ``s x s`` float64 Gram matrix is built.
    """
    w = factor.weights
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



# ---------------------------------------------------------------------------------------------------
# The public edge: validation, results, warnings


def _as_problem(A, b):
    """``A`` (n, d) and ``b`` (d,) as arrays of one kind, device and dtype, validated."""
    A_x = arrays.as_array(A, "A")
    if A_x.ndim != 2:
        raise ValueError(f"A must be 2-D (n_candidates, dim), got shape {tuple(A_x.shape)}")
    b_x = arrays.as_array(b, "b")
    if b_x.ndim != 1 or b_x.shape[0] != A_x.shape[1]:
        raise ValueError(
            f"b must have shape (dim,) = ({A_x.shape[1]},) to match A of shape {tuple(A_x.shape)}, "
            f"got shape {tuple(b_x.shape)}"
        )
    _check_finite(A_x, "A")
    _check_finite(b_x, "b")
    return A_x, arrays.match(b_x, A_x)


def _as_gram_problem(gram, correlation):
    """``gram`` (n, n) and ``correlation`` (n,) as arrays of one kind, device and dtype, validated."""
    gram_x = arrays.as_array(gram, "gram")
    if gram_x.ndim != 2 or gram_x.shape[0] != gram_x.shape[1]:
        raise ValueError(f"gram must be square (n_candidates, n_candidates), got shape {tuple(gram_x.shape)}")
    p_x = arrays.as_array(correlation, "correlation")
    if tuple(p_x.shape) != (gram_x.shape[0],):
        raise ValueError(
            f"correlation must have shape ({gram_x.shape[0]},) to match gram, got shape {tuple(p_x.shape)}"
        )
    _check_finite(gram_x, "gram")
    _check_finite(p_x, "correlation")
    return gram_x, arrays.match(p_x, gram_x)


def _check_finite(x, name: str) -> None:
    n_bad = arrays.count_nonfinite(x)
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite values; gradients must be finite")


def _resolve_method(method, n: int, dim: int, n_select: int, itemsize: int, gram_max_bytes) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    valid = not isinstance(gram_max_bytes, bool) and isinstance(gram_max_bytes, numbers.Integral)
    if not valid or gram_max_bytes < 0:
        raise ValueError(f"gram_max_bytes must be an integer >= 0, got {gram_max_bytes!r}")
    if method == "auto":
        return choose_method(n, dim, n_select, itemsize, gram_max_bytes)
    if method == "gram" and n * n * itemsize > gram_max_bytes:
        raise ValueError(
            f"method='gram' needs n_candidates**2 * itemsize == {n * n * itemsize} bytes, more than "
            f"gram_max_bytes == {gram_max_bytes}; use method='rows' or raise gram_max_bytes"
        )
    return method


def _precision(x) -> float:
    return min(PRECISION_RTOL * arrays.unit_roundoff(x), MAX_PRECISION)


def _zero_target(method: str) -> OMPResult:
    warnings.warn("target is zero; nothing to match", RuntimeWarning, stacklevel=3)
    return _result(np.empty(0, np.int64), np.empty(0), 0.0, 0, method, "tolerance")


def _warn_early_end(run: _Run) -> None:
    if run.dependent:
        shown = ", ".join(map(str, run.dependent[:10])) + (", ..." if len(run.dependent) > 10 else "")
        warnings.warn(
            f"{len(run.dependent)} candidate(s) were linearly dependent on the chosen ones at the precision of "
            f"the products (Cholesky pivot within rounding) and were banned: [{shown}]; stopped: {run.stop_reason}",
            RuntimeWarning,
            stacklevel=3,
        )
    if run.rounding:
        warnings.warn(
            f"OMP ended early with {len(run.support)} atoms: the remaining candidates correlate with the residual "
            "only within rounding, as candidates linearly dependent on the chosen ones do; the tolerance eps was "
            "not reached",
            RuntimeWarning,
            stacklevel=3,
        )


def _result(indices, weights, error, n_iter, method, stop_reason) -> OMPResult:
    indices = np.asarray(indices, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    indices.flags.writeable = False
    weights.flags.writeable = False
    return OMPResult(indices, weights, float(error), int(n_iter), method, stop_reason)
