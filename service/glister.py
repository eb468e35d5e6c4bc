"""GLISTER-ONLINE on the last layer (Killamsetty et al., AAAI 2021).

GLISTER chooses the subset ``S`` that most decreases the validation loss ``L_V`` after one SGD step
of learning rate ``lr`` on the summed loss of ``S``. Greedily, with a first-order Taylor expansion
around the parameters after the step on the current ``S``, the gain of adding example ``e`` is::

    gain(e | S) = lr * g_e(theta) . grad L_V(theta_S),   theta_S = theta - lr * sum_{s in S} g_s(theta)

Only the last layer (logits ``z = W h + b``) takes part. A training gradient is ``g = e ⊗ [1, h]``
with ``e = softmax(z) - onehot(y)`` (C,) and features ``h`` (D,). In matrix form, with
``a = [1, h]`` (D + 1,), a gradient is the (C, D + 1) matrix ``e a^T`` whose first column is the bias
gradient. The step moves the parameters ``[b, W]`` by ``-lr * Sigma`` with ``Sigma = sum_s e_s a_s^T``,
so the validation logits become ``z'_v = z_v - lr * Sigma a_v`` and::

    grad L_V(theta_S) = M = (1/m) sum_v e'_v a_v^T,    e'_v = softmax(z'_v) - onehot(y_v)
    gain(e | S)       = lr * e_e^T M a_e

Gains of all candidates come from one product ``(A M^T) * E`` summed along rows, never from
``(n, C * D)`` gradient rows. The small matrices ``Sigma`` and ``M`` are float64.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from service.checks import as_matrix, positive_int, softmax

__all__ = ["glister_greedy", "step_sizes"]


def glister_greedy(
    train_errors: np.ndarray,
    train_features: np.ndarray,
    val_logits: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    n_select: int,
    lr: float,
    steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy GLISTER selection with the one-step look-ahead on the last layer.

    Parameters
    ----------
    train_errors : array_like, shape (n, C)
        ``softmax(z) - onehot(y)`` of each training candidate at the current parameters.
    train_features : array_like, shape (n, D)
        Last-layer input ``h`` of each training candidate.
    val_logits : array_like, shape (m, C)
        Validation logits ``z_v`` at the current parameters.
    val_features : array_like, shape (m, D)
        Last-layer input ``h_v`` of each validation example.
    val_labels : array_like of int, shape (m,)
        Validation classes in ``[0, C)``.
    n_select : int
        Number of candidates to choose, ``>= 1``; at most ``n`` are chosen.
    lr : float
        Learning rate of the look-ahead step, finite and ``> 0``.
    steps : int or None, optional
        Number of gain evaluations. Each adds the ``ceil(remaining / steps_left)`` unchosen
        candidates with the highest gains (ties to the smallest index). ``None`` or
        ``steps >= n_select``: one candidate per evaluation (pure greedy).

    Returns
    -------
    indices : ndarray of int64, shape (min(n_select, n),)
        Chosen candidates in order of selection, no repeats.
    gains : ndarray of float64, shape (min(n_select, n),)
        Each candidate's gain at the evaluation that chose it.

    Raises
    ------
    ValueError
        If an input has the wrong shape, dtype or non-finite values, a label is out of range,
        ``n_select`` or ``steps`` is not an integer ``>= 1`` or ``lr`` is not finite and ``> 0``.
    FloatingPointError
        If the look-ahead step overflows the validation logits (``lr`` far too large).
    """
    e_train, a_train = _train_factors(train_errors, train_features)
    n, n_classes = e_train.shape
    z_val, a_val, onehot = _val_factors(
        val_logits, val_features, val_labels, n_classes, a_train.shape[1] - 1
    )
    lr = _check_lr(lr)
    sizes = step_sizes(min(positive_int(n_select, "n_select"), n), steps)
    chosen = np.zeros(n, dtype=bool)
    sigma = np.zeros((n_classes, a_train.shape[1]))  # sum of the chosen gradients, [bias | W]
    picks, gains = [], []
    for size in sizes:
        grad = _val_gradient(z_val, a_val, onehot, sigma, lr)
        gain = lr * _candidate_products(e_train, a_train, grad)
        top = _top_unchosen(gain, chosen, size)
        chosen[top] = True
        sigma += e_train[top].T @ a_train[top]
        picks.append(top)
        gains.append(gain[top])
    return np.concatenate(picks).astype(np.int64), np.concatenate(gains)


def step_sizes(n_select: int, steps: int | None) -> list[int]:
    """How many candidates each gain evaluation adds.

    Parameters
    ----------
    n_select : int
        Total number of candidates to add, ``>= 1``.
    steps : int or None
        Number of evaluations, ``>= 1``; ``None`` or ``>= n_select`` gives ``n_select`` steps of one.

    Returns
    -------
    list of int, length min(steps, n_select)
        ``ceil(remaining / steps_left)`` at each evaluation; the sizes sum to ``n_select``.

    Raises
    ------
    ValueError
        If ``n_select`` or ``steps`` is not an integer ``>= 1``.
    """
    n_select = positive_int(n_select, "n_select")
    n_steps = n_select if steps is None else min(positive_int(steps, "steps"), n_select)
    sizes, remaining = [], n_select
    for left in range(n_steps, 0, -1):
        sizes.append(math.ceil(remaining / left))
        remaining -= sizes[-1]
    return sizes


# ---------------------------------------------------------------------------------------------------
# The mathematics


def _val_gradient(z_val, a_val, onehot, sigma, lr) -> np.ndarray:
    """``grad L_V`` (C, D + 1) after the step ``-lr * sigma`` on ``[b, W]``."""
    logits = z_val - lr * (a_val @ sigma.T)
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError(f"lr = {lr!r} overflows the look-ahead validation logits")
    errors = softmax(logits) - onehot
    return errors.T @ a_val / z_val.shape[0]


def _candidate_products(e_train, a_train, grad) -> np.ndarray:
    """``e_i^T grad a_i`` for every candidate, shape (n,); the product's output is only (n, C)."""
    return np.einsum("ic,ic->i", a_train @ grad.T, e_train)


def _top_unchosen(gain: np.ndarray, chosen: np.ndarray, size: int) -> np.ndarray:
    """Indices of the ``size`` highest gains among unchosen candidates, ties to smaller index."""
    masked = np.where(chosen, -np.inf, gain)
    if size == 1:
        return np.array([np.argmax(masked)])
    return np.argsort(-masked, kind="stable")[:size]


# ---------------------------------------------------------------------------------------------------
# Validation at the public edge


def _train_factors(errors, features) -> tuple[np.ndarray, np.ndarray]:
    """Errors (n, C) and augmented features ``[1, h]`` (n, D + 1), float64."""
    e = as_matrix(errors, "train_errors", min_cols=1)
    h = as_matrix(features, "train_features")
    if h.shape[0] != e.shape[0]:
        raise ValueError(
            f"train_features must have one row per row of train_errors ({e.shape[0]}), "
            f"got shape {h.shape}"
        )
    return e, _augment(h)


def _val_factors(logits, features, labels, n_classes: int, n_features: int):
    """Validation logits (m, C), ``[1, h_v]`` (m, D + 1) and one-hot labels (m, C), float64."""
    z = as_matrix(logits, "val_logits", min_cols=1)
    h = as_matrix(features, "val_features")
    if z.shape[1] != n_classes:
        raise ValueError(f"val_logits must have C = {n_classes} columns (as train_errors), "
                         f"got shape {z.shape}")
    if h.shape != (z.shape[0], n_features):
        raise ValueError(f"val_features must have shape (m, D) = {(z.shape[0], n_features)}, "
                         f"got shape {h.shape}")
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (z.shape[0],):
        raise ValueError(f"val_labels must be integers of shape (m,) = ({z.shape[0]},), "
                         f"got shape {y.shape}, dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"val_labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    return z, _augment(h), np.eye(n_classes)[y]


def _augment(h: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ones((h.shape[0], 1)), h], axis=1)


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return float(lr)
