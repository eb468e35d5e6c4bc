"""Weighted loss, epoch plan, round schedule and budgets."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.rounds import batch_budget, budget_size, round_schedule
from trainer.training import (
    EpochPlan, fixed_batches, plan_epochs, subset_from_batches, weighted_loss,
)


def test_uniform_weights_give_the_unweighted_loss():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss = weighted_loss(logits, labels, torch.full((8,), 7.0), mean_weight=7.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_weighted_loss_keeps_mean_step_size_and_relative_weights():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3), torch.randint(0, 3, (4,))
    weights = torch.tensor([1.0, 3.0, 6.0, 10.0])
    mean_w = float(weights.mean())
    loss = weighted_loss(logits, labels, weights, mean_w)
    losses = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss, (losses * weights).sum() / (4 * mean_w))
    # scaling every weight changes nothing
    torch.testing.assert_close(weighted_loss(logits, labels, 5 * weights, 5 * mean_w), loss)


def test_pb_subset_spreads_batch_weights_to_examples():
    batches = fixed_batches(10, 4, seed=0)
    subset = subset_from_batches(batches, [2, 0], [3.0, 1.0], 10, round_id=1)
    assert subset.n_examples == len(batches[2]) + len(batches[0])
    assert torch.all(subset.weights[batches[2]] == 3.0) and torch.all(subset.weights[batches[1]] == 0)
    expected = (3.0 * len(batches[2]) + len(batches[0])) / subset.n_examples
    assert subset.mean_weight == pytest.approx(expected)


def test_fixed_batches_partition_and_are_seeded():
    batches = fixed_batches(103, 10, seed=5)
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    assert [len(b) for b in batches][-1] == 3
    assert all(torch.equal(a, b) for a, b in zip(batches, fixed_batches(103, 10, seed=5)))
    assert not torch.equal(batches[0], fixed_batches(103, 10, seed=6)[0])


@pytest.mark.parametrize(
    "epochs, kappa, budget, rounds, expected",
    [
        (200, 0.5, 0.1, True, EpochPlan(full=10, subset=100)),  # paper A.2.1
        (300, 0.5, 0.1, True, EpochPlan(full=15, subset=150)),  # the paper's example
        (20, 0.0, 0.1, True, EpochPlan(full=0, subset=20)),
        (5, 0.5, 0.01, True, EpochPlan(full=1, subset=2)),
        (7, 0.5, 0.1, False, EpochPlan(full=7, subset=0)),
    ],
)
def test_plan_epochs(epochs, kappa, budget, rounds, expected):
    assert plan_epochs(epochs, kappa, budget, rounds) == expected


def test_round_schedule_warm_and_cold():
    warm = round_schedule(EpochPlan(full=10, subset=100), select_every=20, lead=1)
    assert [(s.trigger, s.due) for s in warm] == [(9, 10), (29, 30), (49, 50), (69, 70), (89, 90)]
    cold = round_schedule(EpochPlan(full=0, subset=10), select_every=3, lead=0)
    assert [(s.trigger, s.due) for s in cold] == [(3, 3), (6, 6), (9, 9)]
    assert round_schedule(EpochPlan(full=1, subset=4), 2, 2)[0].trigger == 0  # clamped
    assert round_schedule(EpochPlan(full=5, subset=0), 2, 1) == []


def test_budgets():
    assert budget_size(0.1, 4500) == 450
    assert budget_size(1e-6, 100) == 1
    assert batch_budget(450, 32, 141) == math.ceil(450 / 32)
    assert batch_budget(10_000, 32, 20) == 20
