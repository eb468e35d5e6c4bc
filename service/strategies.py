"""Selection strategies: plain functions of the gathered ground set, registered by their config class.

A strategy declares what it needs (``StrategyPlan``); given a ``RoundRequest`` and the ground set's
summaries it returns a ``Selection``: indices into the ground set and their weights. Every strategy that
selects asks for the summaries of its ground set, even one that does not need them to choose (RANDOM),
so that ``gradient_errors`` (paper Table 8, ``docs/metrics.md``) can score every subset alike.

Scale of targets and weights: a target is the gradient *sum* over the ground set (``n_ground`` times the
mean example gradient), so weights count how many ground elements each chosen one stands for, as CRAIG's
cluster sizes do. Training normalises weights over each mini-batch, so only their ratios matter there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from protocol.config import (
    RANDOM_STREAM, CraigPBSelector, CraigSelector, GlisterSelector, GradMatchPBSelector, GradMatchSelector,
    OMPOptions, RandomSelector, SelectorBase,
)
from protocol.messages import RoundRequest, ValidationSet
from service import craig
from service.glister import glister_greedy
from service.omp import orthogonal_matching_pursuit

GRAM_MAX_BYTES = 256 << 20  # beyond this OMP passes over rows instead of building an n x n Gram


@dataclass(frozen=True)
class GroundSet:
    """A round's summaries, ordered by ground id (shapes: n ground elements, C classes, D features).

    labels : (n,) int64, the class of each element (majority class for mini-batches).
    rows : (n, C + C*D) float32 mean last-layer gradient of each mini-batch, or None.
    errors, features : (n, C) and (n, D) float32 factors of each example's gradient, or None.
    validation : the validation set seen by the last layer, when the plan asked for it.
    """

    labels: np.ndarray
    rows: np.ndarray | None = None
    errors: np.ndarray | None = None
    features: np.ndarray | None = None
    validation: ValidationSet | None = None


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # (k,) int64 into the ground set
    weights: np.ndarray  # (k,) float64, >= 0
    match_error: float | None = None  # the strategy's own objective, relative (GRAD-MATCH's matching error; logged)
    n_padded: int = 0
    target: str | None = None  # what was matched: "train" or "val"


def round_rng(seed: int, round_id: int) -> np.random.Generator:
    """The generator of one round, derived from the run seed and the round id."""
    return np.random.default_rng([seed, round_id])


# --- gradients and targets ---------------------------------------------------------------------

def softmax_errors(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``softmax(z) - onehot(y)``: (m, C) float64."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p


def weighted_row_sum(rows: np.ndarray, coefficients: np.ndarray, block_bytes: int = 32 << 20) -> np.ndarray:
    """``coefficients @ rows`` in float64, a block of rows at a time (no float64 copy of all rows): (dim,)."""
    step = max(1, block_bytes // max(1, 8 * rows.shape[1]))
    total = np.zeros(rows.shape[1])
    for start in range(0, len(rows), step):
        total += coefficients[start:start + step] @ rows[start:start + step].astype(np.float64)
    return total


def flat_gradient(errors: np.ndarray, features: np.ndarray, block_bytes: int = 32 << 20) -> np.ndarray:
    """Sum of ``errors_i ⊗ [1, features_i]`` in the row layout ``[bias (C), weight (C*D)]``: (C + C*D,).

    Accumulated in float64 a block of examples at a time (no float64 copy of all features).
    """
    step = max(1, block_bytes // max(1, 8 * (errors.shape[1] + features.shape[1])))
    bias, weight = np.zeros(errors.shape[1]), np.zeros((errors.shape[1], features.shape[1]))
    for start in range(0, len(errors), step):
        e = errors[start:start + step].astype(np.float64)
        bias += e.sum(axis=0)
        weight += e.T @ features[start:start + step].astype(np.float64)
    return np.concatenate([bias, weight.ravel()])


def train_target(rows: np.ndarray, sizes: np.ndarray | None) -> np.ndarray:
    """The training gradient on the scale of the ground set: ``n_ground *`` mean example gradient.

    rows : (n_ground, dim) mean gradient of each element; sizes : (n_ground,) examples per element.
    """
    if sizes is None:
        return weighted_row_sum(rows, np.ones(len(rows)))
    return rows.shape[0] * weighted_row_sum(rows, sizes.astype(np.float64)) / sizes.sum()


def validation_target(validation: ValidationSet, n_ground: int) -> np.ndarray:
    """The validation gradient on the scale of the ground set: ``n_ground *`` mean validation gradient."""
    errors = softmax_errors(validation.logits, validation.labels)
    return n_ground * flat_gradient(errors, validation.features) / len(validation.labels)


def class_rows(errors: np.ndarray, features: np.ndarray, c: int) -> np.ndarray:
    """Per-gradient approximation: class ``c``'s own logit column, ``[e_c, e_c h]`` per example: (n, 1 + D)."""
    e_c = errors[:, c:c + 1]
    return np.concatenate([e_c, e_c * features], axis=1).astype(np.float32)


def matching_error(rows: np.ndarray, target: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> float:
    """``||sum_i w_i rows[i] - target|| / ||target||`` (paper Eq. 1, relative)."""
    norm = np.linalg.norm(target)
    return float(np.sqrt(residual_sq(rows, target, indices, weights)) / norm) if norm > 0 else 0.0


def residual_sq(rows: np.ndarray, target: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> float:
    """``||sum_i w_i rows[i] - target||^2`` (paper Eq. 1, squared); rows (n, dim), target (dim,), (k,) the rest."""
    residual = np.asarray(weights, dtype=np.float64) @ rows[indices].astype(np.float64) - target
    return float(residual @ residual)


# --- budgets and padding -----------------------------------------------------------------------

def class_budgets(counts: np.ndarray, n_select: int) -> np.ndarray:
    """Split ``n_select`` over classes in proportion to ``counts``, summing exactly to ``n_select``.

    Largest remainders get the leftover units; no class gets more than it has. counts : (n_classes,).
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_select = min(int(n_select), int(counts.sum()))
    share = n_select * counts / max(1, counts.sum())
    out = np.minimum(np.floor(share).astype(np.int64), counts)
    order = np.lexsort((np.arange(len(counts)), -(share - np.floor(share))))
    while out.sum() < n_select:
        for c in order:
            if out.sum() == n_select:
                break
            if out[c] < counts[c]:
                out[c] += 1
    return out


def pad_selection(
    indices: np.ndarray, weights: np.ndarray, n_ground: int, n_select: int, rng: np.random.Generator,
    pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fill a short selection up to ``n_select`` with random unchosen elements of ``pool``.

    Padded elements get weight 1, as the reference implementation (CORDS) pads: each stands for itself,
    whatever the weights of the chosen ones.

    Returns
    -------
    indices : (n_select,) int64
        The chosen ones first, then the padded ones.
    weights : (n_select,) float64
    n_padded : int
    """
    pool = np.arange(n_ground) if pool is None else pool
    n_missing = n_select - indices.size
    if n_missing <= 0:
        return indices, weights, 0
    free = np.setdiff1d(pool, indices)
    extra = rng.choice(free, size=n_missing, replace=False)
    return (
        np.concatenate([indices, extra]).astype(np.int64),
        np.concatenate([weights, np.ones(n_missing)]),
        n_missing,
    )


# --- strategies --------------------------------------------------------------------------------

def select_random(
    config: RandomSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """RANDOM: one uniform subset of ``n_select`` elements for the whole run (the same in every round), weights 1.

    Drawn from the run seed's ``RANDOM_STREAM``, as the trainer draws a cold start's initial subset, so a
    run without a warm start trains on this one subset from its first epoch.
    """
    rng = np.random.default_rng([request.seed, RANDOM_STREAM])
    indices = np.sort(rng.choice(request.n_ground, size=request.n_select, replace=False))
    return Selection(indices.astype(np.int64), np.ones(request.n_select))


def run_omp(config: OMPOptions, rows: np.ndarray, target: np.ndarray, n_select: int, device: str):
    goal = target.astype(rows.dtype)
    if device != "cpu":
        rows, goal = torch.from_numpy(rows).to(device), torch.from_numpy(goal).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short answer is padded and reported
        return orthogonal_matching_pursuit(rows, goal, n_select, lam=config.lam, eps=config.eps,
                                           positive=config.positive, gram_max_bytes=GRAM_MAX_BYTES)


def _require(ground: GroundSet | None, what: str, strategy: str):
    if ground is None or getattr(ground, what) is None:
        raise ValueError(f"{strategy} needs {what} in its ground set, none were sent")


def select_gradmatch_pb(
    config: GradMatchPBSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """GRAD-MATCH-PB: OMP over mini-batch gradients matching the training (or validation) gradient."""
    _require(ground, "rows", config.strategy)
    if config.valid:
        _require(ground, "validation", config.strategy)
        target = validation_target(ground.validation, request.n_ground)
    else:
        target = train_target(ground.rows, request.sizes)
    result = run_omp(config, ground.rows, target, request.n_select, device)
    indices, weights, n_padded = pad_selection(
        np.asarray(result.indices, dtype=np.int64), np.asarray(result.weights, dtype=np.float64),
        request.n_ground, request.n_select, round_rng(request.seed, request.round_id),
    )
    error = matching_error(ground.rows, target, indices, weights)
    return Selection(indices, weights, error, n_padded, "val" if config.valid else "train")


def class_target(rows: np.ndarray, c: int, validation: ValidationSet | None) -> np.ndarray:
    """Class ``c``'s target in the per-gradient space (1 + D).

    rows : (n_c, 1 + D) the class's own-column gradients (``class_rows``). Without ``validation``: their
    sum (the class's training gradient). With it: the class's mean validation gradient scaled to n_c, or
    the training one where the validation set lacks the class.
    """
    if validation is not None:
        in_val = validation.labels == c
        if in_val.any():
            errors = softmax_errors(validation.logits[in_val], validation.labels[in_val])
            val_rows = class_rows(errors, validation.features[in_val], c)
            return len(rows) * val_rows.astype(np.float64).mean(axis=0)
    return rows.astype(np.float64).sum(axis=0)


def select_gradmatch(
    config: GradMatchSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """GRAD-MATCH: one OMP per class over that class's examples, in that class's logit column (A.2.1)."""
    _require(ground, "errors", config.strategy)
    if config.valid:
        _require(ground, "validation", config.strategy)
    classes, counts = np.unique(ground.labels, return_counts=True)
    budgets = class_budgets(counts, request.n_select)
    rng = round_rng(request.seed, request.round_id)
    picked, weights, n_padded, missed_sq, target_sq = [], [], 0, 0.0, 0.0
    for c, k_c in zip(classes, budgets):
        members = np.flatnonzero(ground.labels == c)
        rows = class_rows(ground.errors[members], ground.features[members], int(c))
        target = class_target(rows, int(c), ground.validation if config.valid else None)
        target_sq += float(target @ target)
        if k_c == 0:
            missed_sq += float(target @ target)
            continue
        local, w, pad = _class_omp(config, rows, target, int(k_c), rng, device)
        missed_sq += residual_sq(rows, target, local, w)
        picked.append(members[local])
        weights.append(w)
        n_padded += pad
    error = float(np.sqrt(missed_sq / target_sq)) if target_sq > 0 else 0.0
    return Selection(np.concatenate(picked).astype(np.int64), np.concatenate(weights), error, n_padded,
                     "val" if config.valid else "train")


def _class_omp(config, rows, target, n_select, rng, device):
    if np.linalg.norm(target) == 0:
        return pad_selection(np.zeros(0, np.int64), np.zeros(0), len(rows), n_select, rng)
    result = run_omp(config, rows, target, n_select, device)
    return pad_selection(np.asarray(result.indices, dtype=np.int64), np.asarray(result.weights, dtype=np.float64),
                         len(rows), n_select, rng)


def select_craig(
    config: CraigSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """CRAIG: per-class facility location over example gradient similarities; weights = cluster sizes."""
    _require(ground, "errors", config.strategy)
    classes, counts = np.unique(ground.labels, return_counts=True)
    picked, weights = [], []
    for c, k_c in zip(classes, class_budgets(counts, request.n_select)):
        if k_c == 0:
            continue
        members = np.flatnonzero(ground.labels == c)
        local, w = craig.select_craig(craig.gradient_gram(ground.errors[members], ground.features[members]), int(k_c))
        picked.append(members[local])
        weights.append(w)
    return Selection(np.concatenate(picked).astype(np.int64), np.concatenate(weights).astype(np.float64))


def select_craig_pb(
    config: CraigPBSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """CRAIG-PB: facility location over mini-batch gradients; weights = how many batches each represents."""
    _require(ground, "rows", config.strategy)
    indices, weights = craig.select_craig(craig.row_gram(ground.rows), request.n_select)
    return Selection(np.asarray(indices, dtype=np.int64), np.asarray(weights, dtype=np.float64))


def select_glister(
    config: GlisterSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """GLISTER: greedy Taylor approximation of the validation loss after a one-step look-ahead.

    The look-ahead step is fixed at ``request.lr``, the run's initial learning rate, as in the reference
    implementation: the annealed rate reaches 0 in late rounds, and with it every gain.
    """
    _require(ground, "errors", config.strategy)
    _require(ground, "validation", config.strategy)
    if request.lr is None or request.lr <= 0:
        raise ValueError(f"lr == {request.lr}, glister needs the initial learning rate (> 0) as its look-ahead step")
    val = ground.validation
    indices, _ = glister_greedy(ground.errors, ground.features, val.logits, val.features, val.labels,
                                request.n_select, request.lr, config.greedy_steps)
    return Selection(np.asarray(indices, dtype=np.int64), np.ones(len(indices)), target="val")


# --- Table 8: the gradient error of a subset (docs/metrics.md) ------------------------------------

@dataclass(frozen=True)
class GradientErrors:
    """The three gradient errors of a round's subset; None where one cannot be computed.

    absolute : paper Eq. 1, ``||sum_S w_i g_i - target||`` with the strategy's raw weights (``grad_error``).
    relative : the same divided by ``||target||`` (``grad_error_rel``).
    trained : the subset as it is trained against the full training gradient, relative (``grad_error_trained``).
    """

    absolute: float | None = None
    relative: float | None = None
    trained: float | None = None

    @classmethod
    def from_sums(cls, residual_sq: float, target_sq: float, trained_sq: float | None,
                  full_sq: float) -> "GradientErrors":
        """From squared norms: Eq. 1's residual and target, the as-trained residual and the full gradient."""
        return cls(
            absolute=float(np.sqrt(residual_sq)),
            relative=float(np.sqrt(residual_sq / target_sq)) if target_sq > 0 else None,
            trained=float(np.sqrt(trained_sq / full_sq)) if trained_sq is not None and full_sq > 0 else None,
        )

    def fields(self) -> dict:
        """The message's fields: ``grad_error``, ``grad_error_rel``, ``grad_error_trained``."""
        return {"grad_error": self.absolute, "grad_error_rel": self.relative, "grad_error_trained": self.trained}


def matched_in_class_columns(config: SelectorBase) -> bool:
    """Whether ``config`` matches per class in each class's own logit column (per-class GRAD-MATCH)."""
    return isinstance(config, GradMatchSelector)


def matched_validation_rows(config: SelectorBase) -> bool:
    """Whether ``config`` matches mini-batch rows against the validation gradient (GRAD-MATCH-PB ``valid``)."""
    return isinstance(config, GradMatchPBSelector) and config.valid


def batch_error_sums(rows: np.ndarray, sizes: np.ndarray | None, indices: np.ndarray, weights: np.ndarray,
                     target: np.ndarray | None = None) -> dict:
    """Squared norms behind the errors of a subset of mini-batches, over the columns of ``rows``.

    Every quantity is column by column, so shards holding some columns each return parts that add up.

    Parameters
    ----------
    rows : (n_b, dim) float
        Mean gradient ``r_b`` of each mini-batch.
    sizes : (n_b,) int or None
        Examples ``s_b`` per mini-batch (None: one each).
    indices, weights : (k,)
        The subset and the strategy's raw weights.
    target : (dim,) float64 or None
        Eq. 1's target (GRAD-MATCH-PB's validation gradient); None: the training gradient ``train_target``.

    Returns
    -------
    dict
        ``residual_sq`` ``||sum_S w_b r_b - target||^2``, ``target_sq`` ``||target||^2``, ``trained_sq``
        ``||n mean_{b in S} r_b - sum_b s_b r_b||^2`` (S: the batches of positive weight, each trained as one
        mini-batch whose weight cancels; n = sum_b s_b; None when no weight is positive) and ``full_sq``
        ``||sum_b s_b r_b||^2``.
    """
    counts = np.ones(len(rows)) if sizes is None else np.asarray(sizes, dtype=np.float64)
    full = weighted_row_sum(rows, counts)
    goal = full * (len(rows) / counts.sum()) if target is None else np.asarray(target, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    chosen = rows[indices]
    matched = weighted_row_sum(chosen, weights) - goal
    live = weights > 0
    trained = (counts.sum() * weighted_row_sum(chosen, live / max(1, live.sum())) - full) if live.any() else None
    return {"residual_sq": float(matched @ matched), "target_sq": float(goal @ goal),
            "trained_sq": None if trained is None else float(trained @ trained), "full_sq": float(full @ full)}


def example_sums(errors: np.ndarray, features: np.ndarray, indices: np.ndarray,
                 weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_U g_i, sum_S w_i g_i)`` over the whole last layer, each (C + C*D,) float64.

    errors (n, C), features (n, D): every example ``U`` here; indices, weights (k,): the subset, raw weights.
    """
    scaled = errors[indices].astype(np.float64) * np.asarray(weights, dtype=np.float64)[:, None]
    return flat_gradient(errors, features), flat_gradient(scaled, features[indices])


def flat_error_sums(full: np.ndarray, subset: np.ndarray, n: int, weight_sum: float) -> dict:
    """``batch_error_sums``'s squared norms for examples, from ``example_sums`` of all n examples.

    Eq. 1 against the full training gradient: ``residual = subset - full``. As trained, the weights are
    rescaled to stand for the n examples, ``w^_i = n w_i / sum_S w``: ``n subset / weight_sum - full``.
    """
    residual = subset - full
    trained = subset * (n / weight_sum) - full if weight_sum > 0 else None
    full_sq = float(full @ full)
    return {"residual_sq": float(residual @ residual), "target_sq": full_sq,
            "trained_sq": None if trained is None else float(trained @ trained), "full_sq": full_sq}


def class_error_sums(errors: np.ndarray, features: np.ndarray, c: int, local: np.ndarray, weights: np.ndarray,
                     validation: ValidationSet | None) -> tuple[float, float]:
    """Per-class GRAD-MATCH's Eq. 1 in class ``c``'s own column: ``(residual^2, ||target||^2)``.

    errors (n_c, C), features (n_c, D): the class's examples in ground id order; local, weights (k_c,): its
    chosen ones (positions among them) and their raw weights; validation: as ``class_target`` takes it.
    """
    rows = class_rows(errors, features, c)
    target = class_target(rows, c, validation)
    return residual_sq(rows, target, np.asarray(local, dtype=np.int64), weights), float(target @ target)


def class_picks(labels: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> dict:
    """``{c: (local, weights)}`` for every class of ``labels`` (n,): the subset's members of class c as positions
    among that class's examples in ground id order (empty for a class with none chosen)."""
    chosen = labels[indices]
    picks = {}
    for c in np.unique(labels):
        mine = chosen == c
        picks[int(c)] = (np.searchsorted(np.flatnonzero(labels == c), indices[mine]), weights[mine])
    return picks


def gradient_errors(config: SelectorBase, ground: GroundSet | None, sizes: np.ndarray | None,
                    indices: np.ndarray, weights: np.ndarray) -> GradientErrors:
    """The three errors of a subset (paper Table 8, ``docs/metrics.md``) on the round's whole ground set.

    Eq. 1 is taken over what ``config``'s strategy matches: per-class GRAD-MATCH per class in its own column
    against its class target (combined as ``sqrt(sum_c residual_c^2)``); GRAD-MATCH-PB against its target
    over the rows; every other strategy against the full last-layer training gradient.

    Parameters
    ----------
    config : SelectorBase
        The strategy that chose the subset.
    ground : GroundSet or None
        Example factors (``errors``, ``features``) or mini-batch ``rows``; None or neither: no error.
    sizes : (n_ground,) int array or None
        Examples per mini-batch (``RoundRequest.sizes``); None counts every element as one example.
    indices, weights : (k,) arrays
        The subset and its raw weights as sent to the trainer.
    """
    indices, weights = np.asarray(indices, dtype=np.int64), np.asarray(weights, dtype=np.float64)
    if ground is None or weights.size == 0 or not np.isfinite(weights).all():
        return GradientErrors()
    if ground.rows is not None:
        target = validation_target(ground.validation, len(ground.rows)) if matched_validation_rows(config) else None
        return GradientErrors.from_sums(**batch_error_sums(ground.rows, sizes, indices, weights, target))
    if ground.errors is None or ground.features is None:
        return GradientErrors()
    full, subset = example_sums(ground.errors, ground.features, indices, weights)
    sums = flat_error_sums(full, subset, len(ground.errors), float(weights.sum()))
    if matched_in_class_columns(config):
        sums.update(_per_class_sums(ground, ground.validation if config.valid else None, indices, weights))
    return GradientErrors.from_sums(**sums)


def _per_class_sums(ground: GroundSet, validation, indices: np.ndarray, weights: np.ndarray) -> dict:
    """``class_error_sums`` of every class, added up in class order: ``residual_sq`` and ``target_sq``."""
    per_class = []
    for c, (local, w) in class_picks(ground.labels, indices, weights).items():
        members = ground.labels == c
        per_class.append(class_error_sums(ground.errors[members], ground.features[members], c, local, w, validation))
    return {"residual_sq": float(sum(p[0] for p in per_class)), "target_sq": float(sum(p[1] for p in per_class))}
