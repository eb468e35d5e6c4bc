"""Strategies as plain functions: RANDOM's seeding, padding, and GRAD-MATCH-PB's matching."""

import numpy as np
import pytest

from protocol.config import GradMatchPBSelector, RandomSelector
from protocol.messages import RoundRequest
from service.strategies import (
    GroundSet, matching_error, pad_selection, select_gradmatch_pb, select_random, train_target,
)


def request(n_ground, n_select, round_id=0, seed=0, sizes=None, ground="batch"):
    return RoundRequest(round_id=round_id, model_step=0, ground=ground, n_ground=n_ground, n_select=n_select,
                        n_chunks=1, seed=seed, sizes=sizes)


def test_random_is_seeded_per_round():
    config = RandomSelector()
    a = select_random(config, request(100, 10, round_id=1), None)
    b = select_random(config, request(100, 10, round_id=1), None)
    c = select_random(config, request(100, 10, round_id=2), None)
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)
    assert a.indices.size == 10 and np.unique(a.indices).size == 10 and np.all(a.weights == 1)


def test_train_target_weights_batches_by_size():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    sizes = np.array([4, 4, 2])
    # example sum = 4*[1,0] + 4*[0,1] + 2*[2,2] = [8, 8]; mean = [0.8, 0.8]; times 3 batches
    np.testing.assert_allclose(train_target(rows, sizes), [2.4, 2.4])
    np.testing.assert_allclose(train_target(rows, None), [3.0, 3.0])


def test_padding_fills_exactly_on_the_same_scale():
    rng = np.random.default_rng(0)
    indices, weights, n = pad_selection(np.array([3, 5]), np.array([2.0, 4.0]), 10, 5, rng)
    assert n == 3 and indices.size == 5 and np.unique(indices).size == 5
    assert np.all(weights[2:] == 3.0)
    indices, weights, n = pad_selection(np.array([], dtype=np.int64), np.array([]), 10, 4, rng)
    assert n == 4 and np.all(weights == 2.5)


def test_gradmatch_pb_finds_a_planted_combination():
    # the other 38 batches come in opposite pairs, so the full gradient is exactly rows 5 + 17 + 33
    rng = np.random.default_rng(1)
    rows = np.zeros((41, 30), dtype=np.float32)
    rows[[5, 17, 33]] = rng.normal(size=(3, 30))
    others = np.setdiff1d(np.arange(41), [5, 17, 33])
    half = rng.normal(size=(19, 30)) * 0.5
    rows[others[:19]], rows[others[19:]] = half, -half
    sizes = np.full(41, 8)
    np.testing.assert_allclose(train_target(rows, sizes), rows[[5, 17, 33]].sum(0), rtol=1e-5, atol=1e-6)
    selection = select_gradmatch_pb(GradMatchPBSelector(lam=1e-6), request(41, 5, sizes=sizes),
                                    GroundSet(labels=np.zeros(41), rows=rows))
    assert {5, 17, 33} <= set(selection.indices.tolist())
    assert selection.indices.size == 5 and np.unique(selection.indices).size == 5
    planted = {int(i): w for i, w in zip(selection.indices, selection.weights) if i in (5, 17, 33)}
    np.testing.assert_allclose(sorted(planted.values()), [1.0, 1.0, 1.0], atol=1e-4)
    assert selection.grad_error < 1e-4


def test_gradmatch_pb_error_is_the_returned_subsets():
    rng = np.random.default_rng(2)
    rows = (rng.normal(size=(60, 20)) + 0.5).astype(np.float32)
    selection = select_gradmatch_pb(GradMatchPBSelector(), request(60, 6), GroundSet(labels=np.zeros(60), rows=rows))
    target = train_target(rows, None)
    assert selection.indices.size == 6
    assert selection.grad_error == pytest.approx(matching_error(rows, target, selection.indices, selection.weights))
    assert selection.grad_error < 0.5
    assert np.all(selection.weights > 0)


def test_gradmatch_pb_needs_summaries():
    with pytest.raises(ValueError, match="gradmatch-pb needs rows"):
        select_gradmatch_pb(GradMatchPBSelector(), request(10, 2), None)
