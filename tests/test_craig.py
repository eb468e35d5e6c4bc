"""Unit tests of CRAIG: the gradient Gram matrix, lazy greedy facility location, the weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from service.craig import (
    craig_weights,
    facility_location_greedy,
    gradient_gram,
    row_gram,
    select_craig,
    similarity_from_gram,
)

SEEDS = range(6)


def factors(n=12, n_classes=3, dim=4, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Errors ``softmax(z) - onehot(y)`` and features of a random last layer, float32."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, dim))
    z = h @ rng.standard_normal((dim, n_classes)) + rng.standard_normal(n_classes)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    e = p - np.eye(n_classes)[rng.integers(0, n_classes, n)]
    return e.astype(np.float32), h.astype(np.float32)


def explicit_rows(e: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Full gradient rows ``e ⊗ [1, h]`` laid out as [bias (C) | weight (C * D)], float64."""
    e, h = e.astype(np.float64), h.astype(np.float64)
    return np.concatenate([e, (e[:, :, None] * h[:, None, :]).reshape(len(e), -1)], axis=1)


def objective(sim: np.ndarray, subset) -> float:
    return float(sim[:, list(subset)].max(axis=1).sum())


def plain_greedy(sim: np.ndarray, budget: int) -> tuple[list[int], list[float]]:
    """Non-lazy greedy: every unchosen candidate's exact gain at every step, ties to smallest index."""
    cover, picks, gains = np.zeros(len(sim)), [], []
    for _ in range(budget):
        gain = np.array([np.maximum(sim[:, j] - cover, 0).sum() for j in range(len(sim))])
        gain[picks] = -np.inf
        j = int(np.argmax(gain))
        picks.append(j)
        gains.append(gain[j])
        cover = np.maximum(cover, sim[:, j])
    return picks, gains


def random_similarity(seed: int, n=12) -> np.ndarray:
    return similarity_from_gram(gradient_gram(*factors(n=n, seed=seed)))


# ---------------------------------------------------------------------------------------------------
# Gram matrices and similarities


@pytest.mark.parametrize("seed", SEEDS)
def test_gradient_gram_equals_gram_of_explicit_rows(seed):
    e, h = factors(n=20, n_classes=4, dim=6, seed=seed)
    rows = explicit_rows(e, h)
    gram = gradient_gram(e, h)
    assert gram.dtype == np.float64 and gram.shape == (20, 20)
    np.testing.assert_allclose(gram, rows @ rows.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(gram, gram.T)
    np.testing.assert_allclose(row_gram(rows.astype(np.float32)), rows @ rows.T, rtol=1e-5, atol=1e-6)


def test_similarity_is_nonnegative_with_maximal_diagonal():
    e, h = factors(n=15, seed=3)
    rows = explicit_rows(e, h)
    sim = similarity_from_gram(gradient_gram(e, h))
    dist = np.linalg.norm(rows[:, None, :] - rows[None, :, :], axis=2)
    np.testing.assert_allclose(sim, dist.max() - dist, atol=1e-6)
    assert sim.min() >= 0 and np.all(np.diag(sim) == sim.max())


# ---------------------------------------------------------------------------------------------------
# Facility location


@pytest.mark.parametrize("seed", SEEDS)
def test_lazy_greedy_equals_plain_greedy(seed):
    sim = random_similarity(seed)
    picks, gains = facility_location_greedy(sim, 4)
    expected_picks, expected_gains = plain_greedy(sim, 4)
    assert picks.dtype == np.int64 and gains.dtype == np.float64
    assert picks.tolist() == expected_picks
    np.testing.assert_allclose(gains, expected_gains, rtol=1e-12)
    assert objective(sim, picks) == pytest.approx(gains.sum(), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_reaches_the_submodular_guarantee(seed):
    sim = random_similarity(seed)
    picks, _ = facility_location_greedy(sim, 4)
    best = max(objective(sim, s) for s in itertools.combinations(range(len(sim)), 4))
    assert objective(sim, picks) >= (1 - 1 / math.e) * best


def test_ties_go_to_the_smallest_index():
    sim = np.ones((5, 5))
    picks, gains = facility_location_greedy(sim, 3)
    assert picks.tolist() == [0, 1, 2]
    assert gains.tolist() == [5.0, 0.0, 0.0]


def test_greedy_budget_beyond_n_picks_every_element_once():
    picks, _ = facility_location_greedy(random_similarity(0, n=7), 20)
    assert sorted(picks.tolist()) == list(range(7))


# ---------------------------------------------------------------------------------------------------
# Weights and the whole selection


@pytest.mark.parametrize("seed", SEEDS)
def test_weights_are_cluster_sizes(seed):
    e, h = factors(n=30, seed=seed)
    gram = gradient_gram(e, h)
    indices, weights = select_craig(gram, 5)
    sim = similarity_from_gram(gram)
    assert len(set(indices.tolist())) == 5 and weights.dtype == np.float64
    assert weights.sum() == 30 and np.all(weights >= 1)
    nearest = indices[np.argmax(sim[:, indices], axis=1)]
    np.testing.assert_array_equal(weights, [np.sum(nearest == i) for i in indices])


def test_duplicates_keep_every_chosen_weight_positive():
    sim = np.full((4, 4), 2.0)  # four identical elements: the later picks tie with the first
    weights = craig_weights(sim, np.array([2, 0, 3]))
    assert weights.tolist() == [2.0, 1.0, 1.0]


def test_budget_at_least_n_returns_everything_with_unit_weights():
    gram = gradient_gram(*factors(n=6))
    for budget in (6, 9):
        indices, weights = select_craig(gram, budget)
        assert indices.tolist() == list(range(6)) and weights.tolist() == [1.0] * 6


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("budget", [0, -3, 2.5, True, "4", None])
def test_bad_budget_is_rejected(budget):
    gram = gradient_gram(*factors(n=6))
    with pytest.raises(ValueError, match="n_select must be an integer >= 1"):
        select_craig(gram, budget)
    with pytest.raises(ValueError, match="n_select"):
        facility_location_greedy(similarity_from_gram(gram), budget)


@pytest.mark.parametrize("budget", [0, 2.5, True, "4"])
def test_bad_budget_reads_the_same_in_craig_and_omp(budget):
    # one validator (service.checks.positive_int) for every selection kernel: one message per bad value
    from service.omp import orthogonal_matching_pursuit

    e, h = factors(n=6)
    messages = []
    for call in (lambda: select_craig(gradient_gram(e, h), budget),
                 lambda: facility_location_greedy(similarity_from_gram(gradient_gram(e, h)), budget),
                 lambda: orthogonal_matching_pursuit(explicit_rows(e, h), np.ones(3 + 3 * 4), budget)):
        with pytest.raises(ValueError) as error:
            call()
        messages.append(str(error.value))
    assert messages == [f"n_select must be an integer >= 1, got {budget!r}"] * 3


def test_bad_arrays_are_rejected():
    e, h = factors(n=6)
    with pytest.raises(ValueError, match="features must have one row per row of errors"):
        gradient_gram(e, h[:5])
    with pytest.raises(ValueError, match="errors must be finite"):
        gradient_gram(np.full_like(e, np.nan), h)
    with pytest.raises(ValueError, match="gram must be square"):
        select_craig(np.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="similarity must be >= 0"):
        facility_location_greedy(-np.ones((3, 3)), 2)
    with pytest.raises(ValueError, match="indices must be distinct"):
        craig_weights(np.ones((3, 3)), np.array([1, 1]))
    with pytest.raises(ValueError, match="indices must lie in"):
        craig_weights(np.ones((3, 3)), np.array([3]))
