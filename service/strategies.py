"""Selection strategies: plain functions of the gathered ground set, registered by name.

A strategy sees a ``RoundRequest`` and, when its plan asks for them, the gradient summaries of the
whole ground set, and returns a ``Selection``: indices into the ground set and their weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from protocol.config import FullSelector, GradMatchPBSelector, RandomSelector
from protocol.messages import RoundRequest, StrategyPlan
from service.omp import orthogonal_matching_pursuit


@dataclass(frozen=True)
class GroundSet:
    """Gradient summaries of a round, ordered by ground id.

    rows : (n_ground, dim) float32, rows[i] summarises ground element i.
    labels : (n_ground,) int64, class of each element (-1 for mixed batches).
    """

    rows: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # (n,) int64 into the ground set
    weights: np.ndarray  # (n,) float64, >= 0
    grad_error: float | None = None
    n_padded: int = 0


def round_rng(seed: int, round_id: int) -> np.random.Generator:
    """The generator of one round, derived from the run seed and the round id."""
    return np.random.default_rng([seed, round_id])


def full_plan(config: FullSelector) -> StrategyPlan:
    return StrategyPlan(strategy=config.strategy, rounds=False)


def random_plan(config: RandomSelector) -> StrategyPlan:
    return StrategyPlan(strategy=config.strategy, rounds=True, ground="example")


def gradmatch_pb_plan(config: GradMatchPBSelector) -> StrategyPlan:
    return StrategyPlan(strategy=config.strategy, rounds=True, ground="batch", needs_gradients=True)


def select_random(
    config: RandomSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """RANDOM: a uniform subset of ``n_select`` elements re-drawn each round, weights 1."""
    rng = round_rng(request.seed, request.round_id)
    indices = np.sort(rng.choice(request.n_ground, size=request.n_select, replace=False))
    return Selection(indices.astype(np.int64), np.ones(request.n_select))


def train_target(rows: np.ndarray, sizes: np.ndarray | None) -> np.ndarray:
    """The full training gradient on the scale of the ground set.

    rows : (n_ground, dim) per-element mean gradients; sizes : (n_ground,) examples per element.
    Returns ``n_ground * mean example gradient``, so that weights count how many ground elements each
    chosen element stands for (they sum to about ``n_ground``).
    """
    rows64 = rows.astype(np.float64, copy=False)
    if sizes is None:
        return rows64.sum(axis=0)
    return rows.shape[0] * (sizes.astype(np.float64) @ rows64) / sizes.sum()


def matching_error(rows: np.ndarray, target: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> float:
    """``||sum_i w_i rows[i] - target|| / ||target||`` (paper Eq. 1, relative)."""
    approx = weights @ rows[indices].astype(np.float64)
    norm = np.linalg.norm(target)
    return float(np.linalg.norm(approx - target) / norm) if norm > 0 else 0.0


def pad_selection(
    indices: np.ndarray, weights: np.ndarray, n_ground: int, n_select: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fill a short selection up to ``n_select`` with random unchosen elements.

    Padded elements get the mean weight of the chosen ones (``n_ground / n_select`` when none was
    chosen), so they sit on the same scale.
    """
    n_missing = n_select - indices.size
    if n_missing <= 0:
        return indices, weights, 0
    free = np.setdiff1d(np.arange(n_ground), indices)
    extra = rng.choice(free, size=n_missing, replace=False)
    fill = float(weights.mean()) if weights.size else n_ground / n_select
    return (
        np.concatenate([indices, extra]).astype(np.int64),
        np.concatenate([weights, np.full(n_missing, fill)]),
        n_missing,
    )


def select_gradmatch_pb(
    config: GradMatchPBSelector, request: RoundRequest, ground: GroundSet | None, device: str = "cpu"
) -> Selection:
    """GRAD-MATCH-PB: OMP over mini-batch gradients matching the full training gradient."""
    if ground is None:
        raise ValueError("gradmatch-pb needs gradient summaries, none were sent")
    target = train_target(ground.rows, request.sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short answer is padded and reported below
        rows, goal = ground.rows, target.astype(ground.rows.dtype)
        if device != "cpu":
            rows, goal = torch.from_numpy(rows).to(device), torch.from_numpy(goal).to(device)
        result = orthogonal_matching_pursuit(
            rows, goal, request.n_select,
            lam=config.lam, eps=config.eps, positive=config.positive,
        )
    rng = round_rng(request.seed, request.round_id)
    indices, weights, n_padded = pad_selection(
        np.asarray(result.indices, dtype=np.int64), np.asarray(result.weights, dtype=np.float64),
        request.n_ground, request.n_select, rng,
    )
    error = matching_error(ground.rows, target, indices, weights)
    return Selection(indices, weights, error, n_padded)


@dataclass(frozen=True)
class Strategy:
    plan: Callable[..., StrategyPlan]
    select: Callable[..., Selection] | None


STRATEGIES: dict[str, Strategy] = {
    "full": Strategy(full_plan, None),
    "random": Strategy(random_plan, select_random),
    "gradmatch-pb": Strategy(gradmatch_pb_plan, select_gradmatch_pb),
}
