"""CRAIG: coresets by facility location on gradient similarities (Mirzasoleiman et al., ICML 2020).

CRAIG picks a subset ``S`` of a ground set whose gradients cover every ground gradient well. With a
similarity ``sim[i, j] >= 0`` between ground elements it maximises the facility-location function::

    F(S) = sum_i max_{j in S} sim[i, j]            (F(empty) = 0)

which is monotone submodular, so the greedy algorithm is within ``1 - 1/e`` of the best subset of the
same size. Each chosen element is then weighted by the size of its cluster: the number of ground
elements for which it is the most similar chosen element.

Gradients are the last-layer gradients of cross-entropy on logits ``z = W h + b``. For one example
with error ``e = softmax(z) - onehot(y)`` (C,) and features ``h`` (D,) the gradient is
``g = e ⊗ [1, h]``, so two examples' gradients have the inner product::

    <g_i, g_j> = (e_i . e_j) (1 + h_i . h_j)

and their Gram matrix is computed from the factors without forming the ``C (D + 1)`` long rows
(:func:`gradient_gram`). Mini-batch summaries (the PB variant) arrive as full rows instead
(:func:`row_gram`). Distances follow from the Gram matrix and similarities from the distances
(:func:`similarity_from_gram`).
"""

from __future__ import annotations

import heapq

import numpy as np

from service.checks import as_matrix, positive_int

__all__ = [
    "craig_weights",
    "facility_location_greedy",
    "gradient_gram",
    "row_gram",
    "select_craig",
    "similarity_from_gram",
]


def gradient_gram(errors: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Gram matrix of per-example last-layer gradients, from their factors.

    Parameters
    ----------
    errors : array_like, shape (n, C)
        ``softmax(z) - onehot(y)`` of each example.
    features : array_like, shape (n, D)
        Input ``h`` of the last linear layer for each example.

    Returns
    -------
    ndarray of float64, shape (n, n)
        ``G[i, j] = (e_i . e_j) (1 + h_i . h_j)``, the inner product of the gradients
        ``e_i ⊗ [1, h_i]`` and ``e_j ⊗ [1, h_j]``; exactly symmetric.

    Raises
    ------
    ValueError
        If either input is not a finite real 2-D array, or their numbers of rows differ.
    """
    e = as_matrix(errors, "errors")
    h = as_matrix(features, "features")
    if h.shape[0] != e.shape[0]:
        raise ValueError(
            f"features must have one row per row of errors ({e.shape[0]}), got shape {h.shape}"
        )
    gram = (e @ e.T) * (1.0 + h @ h.T)
    return _symmetrise(gram)


def row_gram(rows: np.ndarray) -> np.ndarray:
    """Gram matrix of full gradient rows (mini-batch summaries).

    Parameters
    ----------
    rows : array_like, shape (n, dim)
        One gradient per row, e.g. ``(n_batches, C + C * D)``.

    Returns
    -------
    ndarray of float64, shape (n, n)
        ``G[i, j] = rows[i] . rows[j]``; exactly symmetric.

    Raises
    ------
    ValueError
        If ``rows`` is not a finite real 2-D array with at least one row.
    """
    r = as_matrix(rows, "rows")
    return _symmetrise(r @ r.T)


def similarity_from_gram(gram: np.ndarray) -> np.ndarray:
    """Non-negative similarities from a Gram matrix, through Euclidean distances.

    Parameters
    ----------
    gram : array_like, shape (n, n)
        Inner products of the ground elements.

    Returns
    -------
    ndarray of float64, shape (n, n)
        ``d.max() - d`` with ``d[i, j] = sqrt(max(0, G_ii + G_jj - 2 G_ij))``. Every entry is
        ``>= 0`` and the diagonal holds the largest value, so an element is at least as similar to
        itself as to any other.

    Raises
    ------
    ValueError
        If ``gram`` is not a finite real square 2-D array.
    """
    g = _as_square(gram, "gram")
    diag = np.diag(g)
    sq = diag[:, None] + diag[None, :] - 2.0 * g
    dist = np.sqrt(np.maximum(sq, 0.0))
    return dist.max() - dist


def facility_location_greedy(similarity: np.ndarray, n_select: int) -> tuple[np.ndarray, np.ndarray]:
    """Lazy greedy maximisation of ``F(S) = sum_i max_{j in S} similarity[i, j]``.

    Each candidate keeps an upper bound on its marginal gain in a max-heap; the top candidate's gain
    is recomputed only when its bound is stale. Since ``F`` is submodular, gains only shrink, so a
    candidate whose fresh gain is still at the top is the exact greedy choice. Ties go to the
    smallest index, as in a plain greedy scan.

    Parameters
    ----------
    similarity : array_like, shape (n, n)
        ``similarity[i, j] >= 0``: how well candidate ``j`` represents ground element ``i``.
    n_select : int
        Number of elements to choose, ``>= 1``; at most ``n`` are chosen.

    Returns
    -------
    indices : ndarray of int64, shape (min(n_select, n),)
        Chosen candidates in order of selection, no repeats.
    gains : ndarray of float64, shape (min(n_select, n),)
        Marginal gain ``F(S + j) - F(S)`` of each choice when it was made (non-increasing).

    Raises
    ------
    ValueError
        If ``similarity`` is not a finite, non-negative square array, or ``n_select`` is not an
        integer ``>= 1``.
    """
    sim = _as_similarity(similarity)
    k = min(positive_int(n_select, "n_select"), sim.shape[0])
    cols = np.asfortranarray(sim)  # column j, the coverage candidate j offers, is contiguous
    cover = np.zeros(sim.shape[0])
    heap = [(-_gain(cols[:, j], cover), j, 0) for j in range(sim.shape[0])]
    heapq.heapify(heap)
    picks: list[int] = []
    gains: list[float] = []
    while len(picks) < k:
        neg_bound, j, stamp = heapq.heappop(heap)
        if stamp == len(picks):  # bound computed against the current cover: exact
            picks.append(j)
            gains.append(-neg_bound)
            np.maximum(cover, cols[:, j], out=cover)
        else:
            heapq.heappush(heap, (-_gain(cols[:, j], cover), j, len(picks)))
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64)


def craig_weights(similarity: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Cluster sizes of the chosen elements.

    Every ground element is assigned to its most similar chosen element (ties to the one picked
    earliest); a chosen element is always assigned to itself, so each weight is ``>= 1`` even when
    the ground set holds duplicates.

    Parameters
    ----------
    similarity : array_like, shape (n, n)
        ``similarity[i, j]``: how well candidate ``j`` represents ground element ``i``.
    indices : array_like of int, shape (k,)
        Chosen candidates in order of selection, distinct, ``1 <= k <= n``.

    Returns
    -------
    ndarray of float64, shape (k,)
        Number of ground elements assigned to each chosen element; the weights sum to ``n``.

    Raises
    ------
    ValueError
        If ``similarity`` is not a finite non-negative square array, or ``indices`` is empty, not
        1-D integers, out of range or repeated.
    """
    sim = _as_similarity(similarity)
    idx = _as_indices(indices, sim.shape[0])
    assignment = np.argmax(sim[:, idx], axis=1)  # first maximum = earliest picked
    assignment[idx] = np.arange(idx.size)
    return np.bincount(assignment, minlength=idx.size).astype(np.float64)


def select_craig(gram: np.ndarray, n_select: int) -> tuple[np.ndarray, np.ndarray]:
    """CRAIG subset of a ground set given the Gram matrix of its gradients.

    Parameters
    ----------
    gram : array_like, shape (n, n)
        Gram matrix of the ground gradients (:func:`gradient_gram` or :func:`row_gram`).
    n_select : int
        Subset size, ``>= 1``. ``n_select >= n`` returns every element with weight 1.

    Returns
    -------
    indices : ndarray of int64, shape (min(n_select, n),)
        Chosen elements in order of selection.
    weights : ndarray of float64, shape (min(n_select, n),)
        Cluster sizes (:func:`craig_weights`); they sum to ``n``.

    Raises
    ------
    ValueError
        If ``gram`` is not a finite real square array or ``n_select`` is not an integer ``>= 1``.
    """
    g = _as_square(gram, "gram")
    n = g.shape[0]
    if positive_int(n_select, "n_select") >= n:
        return np.arange(n, dtype=np.int64), np.ones(n)
    sim = similarity_from_gram(g)
    indices, _ = facility_location_greedy(sim, n_select)
    return indices, craig_weights(sim, indices)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _gain(column: np.ndarray, cover: np.ndarray) -> float:
    """Marginal facility-location gain of a candidate whose coverage is ``column`` (n,)."""
    return float(np.maximum(column - cover, 0.0).sum())


def _symmetrise(gram: np.ndarray) -> np.ndarray:
    """Average ``gram`` with its transpose so rounding leaves no asymmetry."""
    return 0.5 * (gram + gram.T)


def _as_square(x, name: str) -> np.ndarray:
    arr = as_matrix(x, name)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be square (n, n), got shape {arr.shape}")
    return arr


def _as_similarity(x) -> np.ndarray:
    sim = _as_square(x, "similarity")
    if sim.min() < 0:
        raise ValueError(
            f"similarity must be >= 0 everywhere (facility location needs it), got min {sim.min()!r}"
        )
    return sim


def _as_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or (idx.dtype.kind not in "iu"):
        raise ValueError(
            f"indices must be a non-empty 1-D integer array, got shape {idx.shape}, dtype {idx.dtype}"
        )
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != idx.size:
        raise ValueError("indices must be distinct, got repeated entries")
    return idx.astype(np.int64)
