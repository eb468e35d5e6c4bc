"""The float64 linear algebra of the pursuit (docs/design.md §4): the Cholesky factor of ``G_SS + lam I`` grown
one atom at a time (``Cholesky``), and the exact ridge(-NNLS) solve on a chosen support (``ridge_weights``),
the one solve that ``service.omp`` and the sharded coordinator (``service.sharded``) both use.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.optimize
from scipy.linalg import blas, lapack


class Cholesky:
    """Cholesky factor ``L`` of ``Q = G_SS + lam I``, grown one atom at a time, and the ridge weights on ``S``.

    Keeps ``z = L^{-1} p_S`` (``p = A b``), so that ``w = L^{-T} z`` and ``E_lam = ||b||^2 - ||z||^2``.
    ``L`` is stored row after row (LAPACK upper-packed ``L^T``): a new row is appended to one array and each
    triangular solve is one BLAS call, O(size^2).
    """

    def __init__(self, n_select: int, lam: float, precision: float):
        self.lam, self.precision, self.size = lam, precision, 0
        self._packed = np.zeros(n_select * (n_select + 1) // 2)
        self._p = np.zeros(n_select)  # p_S
        self._z = np.zeros(n_select)
        self.roots = np.zeros(n_select)  # sqrt(G_ii) of the chosen atoms
        self.weights = np.empty(0)  # Q^{-1} p_S
        self.explained = 0.0  # ||z||^2

    def append(self, g: np.ndarray, p_e: float) -> bool:
        """Add the atom with ``g = G[S + [e], e]`` (size + 1,) and ``p_e``; False if it is numerically dependent.

        The pivot ``g_ee + lam - q^T Q^{-1} q`` (``q = G_Se``) is ``lam`` plus the squared distance of ``A_e``
        from the span of the chosen atoms. With ``x = Q^{-1} q`` its first-order rounding error
        ``dg_ee - 2 x.dq + x^T dQ x``, from products good to ``precision`` relative (``|dG_ij| <= precision *
        sqrt(G_ii G_jj)``, errors of independent signs), is about ``precision * (sqrt(g_ee) + ||x * sqrt(G_SS
        diagonal)||)^2``. An ill-conditioned support makes ``x`` large, so the threshold follows its
        conditioning. The weights update is the bordered solve ``w_e = z_e / d``, ``w_S -= w_e x``.
        """
        s = self.size
        row = self._solve(g[:s], lower=True)  # L^{-1} q
        x = self._solve(row, lower=False)  # Q^{-1} q
        pivot = g[s] + self.lam - row @ row
        root = math.sqrt(max(g[s], 0.0))
        scale = root + math.sqrt((x * self.roots[:s]) @ (x * self.roots[:s]))
        if not pivot > self.precision * scale * scale:
            return False
        d = math.sqrt(pivot)
        start = s * (s + 1) // 2
        self._packed[start: start + s] = row
        self._packed[start + s] = d
        z_e = (p_e - row @ self._z[:s]) / d
        self._p[s], self._z[s], self.roots[s] = p_e, z_e, root
        self.weights = np.append(self.weights - (z_e / d) * x, z_e / d)
        self.explained += z_e * z_e
        self.size = s + 1
        return True

    def delete(self, j: int) -> None:
        """Remove support position ``j`` in O(size^2): Givens rotations re-triangularise ``L^T`` without column j."""
        s = self.size
        upper = self._unpack()
        _, r = scipy.linalg.qr_delete(np.eye(s), upper, j, which="col", overwrite_qr=True, check_finite=False)
        r = r[: s - 1] * np.copysign(1.0, np.diag(r))[:, None]  # rows with a positive diagonal
        packed, _ = lapack.dtrttp(np.asfortranarray(r))
        self._packed[: packed.size] = packed
        for kept in (self._p, self.roots):
            kept[j: s - 1] = kept[j + 1: s].copy()
        self.size = s - 1
        self.refresh()

    def load(self, gram: np.ndarray, p: np.ndarray) -> None:
        """Factor a support from scratch: ``gram`` = G_SS (k, k), ``p`` = p_S (k,)."""
        k = self.size = p.size
        if k:
            upper, info = lapack.dpotrf(gram + self.lam * np.eye(k), lower=0, clean=1)
            if info != 0:
                raise np.linalg.LinAlgError(f"G_SS + lam I is not positive definite (potrf info {info})")
            packed, _ = lapack.dtrttp(upper)
            self._packed[: packed.size] = packed
        self._p[:k], self.roots[:k] = p, np.sqrt(np.maximum(np.diag(gram), 0.0))
        self.refresh()

    def refresh(self) -> None:
        """Recompute ``z``, the weights and ``||z||^2`` from the factor."""
        s = self.size
        self._z[:s] = self._solve(self._p[:s], lower=True)
        self.weights = self._solve(self._z[:s], lower=False)
        self.explained = float(self._z[:s] @ self._z[:s])

    def solve(self, v: np.ndarray) -> np.ndarray:
        """``Q^{-1} v`` for ``v`` of shape (size,)."""
        return self._solve(self._solve(v, lower=True), lower=False)

    def nonnegative_weights(self) -> np.ndarray:
        """Exact non-negative optimum on the support, shape (size,).

        ``w^T Q w / 2 - p^T w = ||L^T w - z||^2 / 2 + const``, so ``nnls(L^T, z)`` minimises E_lam over ``w >= 0``.
        """
        return scipy.optimize.nnls(self._unpack(), self._z[: self.size])[0]

    def _unpack(self) -> np.ndarray:
        """``L^T`` as a dense upper-triangular (size, size) array (f2py zero-fills the lower part)."""
        s = self.size
        return lapack.dtpttr(s, self._packed[: s * (s + 1) // 2])[0]

    def _solve(self, v: np.ndarray, lower: bool) -> np.ndarray:
        """``L^{-1} v`` (``lower``) or ``L^{-T} v``, a new array."""
        if self.size == 0:
            return np.empty(0)
        return blas.dtpsv(self.size, self._packed, v, trans=1 if lower else 0)




def stacked_solve(rows: np.ndarray, b64: np.ndarray, lam: float, positive: bool) -> np.ndarray:
    """Least squares on ``[rows^T; sqrt(lam) I] w = [b; 0]`` by orthogonal factorisations (backward stable)."""
    s = rows.shape[0]
    matrix = np.vstack([rows.T, math.sqrt(lam) * np.eye(s)])
    target = np.concatenate([b64, np.zeros(s)])
    if positive:
        return scipy.optimize.nnls(matrix, target)[0]
    return np.linalg.lstsq(matrix, target, rcond=None)[0]


def ridge_weights(gram: np.ndarray, correlation: np.ndarray, lam: float, positive: bool,
                  singular=None) -> np.ndarray:
    """``argmin_w w^T G w - 2 p^T w + lam ||w||^2`` (``w >= 0`` if ``positive``) from the normal equations.

    Parameters
    ----------
    gram : (k, k) float64
        ``A_S A_S^T`` of the chosen rows.
    correlation : (k,) float64
        ``A_S b``.
    lam : float
        Ridge regulariser, ``>= 0``.
    positive : bool
        Non-negative weights (a non-negative least-squares solve when the free optimum has a weight <= 0).
    singular : callable, optional
        Called (no arguments) for the weights when ``G + lam I`` is singular in float64; by default the
        least-squares (NNLS under ``positive``) solution on the range of ``G + lam I``.

    Returns
    -------
    (k,) float64
        The weights; with ``lam == 0`` and a singular ``gram``, a least-squares solution.
    """
    q = gram + lam * np.eye(len(gram))
    try:
        lower = scipy.linalg.cholesky(q, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        if singular is not None:
            return singular()
        values, vectors = np.linalg.eigh(q)
        keep = values > values.max() * len(q) * np.finfo(float).eps
        root = np.sqrt(values[keep])[:, None] * vectors[:, keep].T  # root^T root = q on its range
        z = (vectors[:, keep].T @ correlation) / np.sqrt(values[keep])
        return scipy.optimize.nnls(root, z)[0] if positive else np.linalg.lstsq(root, z, rcond=None)[0]
    z = scipy.linalg.solve_triangular(lower, correlation, lower=True, check_finite=False)
    w = scipy.linalg.solve_triangular(lower.T, z, lower=False, check_finite=False)
    if positive and w.min() <= 0:
        w = scipy.optimize.nnls(lower.T, z)[0]
    return w
