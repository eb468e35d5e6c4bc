"""Weighted loss, epoch plan, round schedule and budgets."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.builtin.training import CosineSchedule, cosine_lr, weighted_step
from trainer.client.schedule import EpochPlan, batch_budget, budget_size, plan_epochs, round_schedule
from trainer.client.subsets import batch_weights, fixed_batches, subset_from_batches


def _step_delta(model, x, y, w, lr=0.1):
    """The parameter change of one plain SGD step of ``weighted_step``."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    weighted_step(model, torch.optim.SGD(model.parameters(), lr=lr), x, y, w)
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def _hand_gradient(model, x, y, w):
    """d/dθ of (1/B) Σ_i w_i CE_i, each example's gradient computed alone with autograd."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        total = [t + float(w[i]) * p.grad / len(y) for t, p in zip(total, model.parameters())]
    return total


def test_weights_reach_the_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25, 0.75])
    for delta, grad in zip(_step_delta(model, x, y, w), _hand_gradient(model, x, y, w)):
        torch.testing.assert_close(delta, -0.1 * grad)
    # a zero weight removes the example: the step equals the step on the others, rescaled by B'/B
    zero = w.clone()
    zero[2] = 0.0
    keep = torch.tensor([0, 1, 3, 4, 5])
    for with_zero, without in zip(_step_delta(model, x, y, zero), _step_delta(model, x[keep], y[keep], w[keep])):
        torch.testing.assert_close(with_zero, without * 5 / 6)
    # doubling one weight adds exactly that example's gradient share once more
    double = w.clone()
    double[4] *= 2
    one = torch.zeros(6)
    one[4] = w[4]
    for d2, d1, extra in zip(_step_delta(model, x, y, double), _step_delta(model, x, y, w), _hand_gradient(model, x, y, one)):
        torch.testing.assert_close(d2 - d1, -0.1 * extra)


def test_batch_weights_make_the_step_the_references_sum_w_l_over_sum_w():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([8.0, 0.5, 20.0, 1.5, 0.25, 0.75])
    normalised = batch_weights(w)
    assert normalised.mean() == pytest.approx(1.0)
    reference = [g * len(y) / float(w.sum()) for g in _hand_gradient(model, x, y, w)]  # sum w grad / sum w
    for delta, grad in zip(_step_delta(model, x, y, normalised), reference):
        torch.testing.assert_close(delta, -0.1 * grad)
    # scale-free: a heavy batch steps no further than a light one, and one weight for the whole batch
    # (a chosen PB mini-batch) cancels to an unweighted step
    torch.testing.assert_close(batch_weights(w * 1000), normalised)
    torch.testing.assert_close(batch_weights(torch.full((6,), 37.0)), torch.ones(6))
    torch.testing.assert_close(batch_weights(torch.zeros(3)), torch.ones(3))  # nothing to weigh: unweighted


def test_non_finite_loss_takes_no_step():
    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    loss = weighted_step(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.tensor([[float("nan"), 0.0]]),
                         torch.tensor([1]), torch.ones(1))
    assert not torch.isfinite(loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


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
        (200, 0.5, 0.1, True, EpochPlan(full=10, subset=100, nominal_total=200)),  # paper A.2.1
        (300, 0.5, 0.1, True, EpochPlan(full=15, subset=150, nominal_total=300)),  # the paper's example
        (20, 0.0, 0.1, True, EpochPlan(full=0, subset=20, nominal_total=20)),
        (5, 0.5, 0.01, True, EpochPlan(full=1, subset=3, nominal_total=5)),  # int(2.5) = 2: subsets from epoch 2
        (200, 0.5, 0.01, True, EpochPlan(full=1, subset=100, nominal_total=200)),  # the paper's MNIST 1%
        (200, 0.5, 0.05, True, EpochPlan(full=5, subset=100, nominal_total=200)),
        (100, 0.5, 0.05, True, EpochPlan(full=2, subset=50, nominal_total=100)),  # round(2.5) == 2, as the reference
        (100, 0.5, 0.01, True, EpochPlan(full=1, subset=50, nominal_total=100)),  # round(0.5) == 0: at least one
        (100, 0.3, 0.1, True, EpochPlan(full=3, subset=70, nominal_total=100)),  # subsets from nominal epoch 30 on
        (7, 0.5, 0.1, False, EpochPlan(full=7, subset=0, nominal_total=7)),
    ],
)
def test_plan_epochs(epochs, kappa, budget, rounds, expected):
    assert plan_epochs(epochs, kappa, budget, rounds) == expected


def test_round_schedule_warm_and_cold():
    warm = round_schedule(EpochPlan(full=10, subset=100), select_every=20, lead=1)
    assert [(s.trigger, s.due) for s in warm] == [(9, 10), (29, 30), (49, 50), (69, 70), (89, 90)]
    cold = round_schedule(EpochPlan(full=0, subset=10), select_every=3, lead=0)
    assert [(s.trigger, s.due) for s in cold] == [(3, 3), (6, 6), (9, 9)]
    # no round starts before the first epoch has been trained (an untrained model's subset says nothing)
    assert round_schedule(EpochPlan(full=1, subset=4), 2, 2)[0].trigger == 1
    assert [(s.trigger, s.due) for s in round_schedule(EpochPlan(full=1, subset=100), 20, 1)][:2] == [(1, 1), (20, 21)]
    assert round_schedule(EpochPlan(full=0, subset=6), 1, 1)[0].trigger == 1
    assert round_schedule(EpochPlan(full=5, subset=0), 2, 1) == []


def test_budgets():
    assert budget_size(0.1, 4500) == 450
    assert budget_size(1e-6, 100) == 1
    # the whole number of batches closest to k, so PB trains on about as many examples as the budget allows
    assert batch_budget(450, 32, 141) == 14  # 14.06 batches: 448 examples
    assert batch_budget(35, 32, 110) == 1  # 1.09: 32 examples (rounding up would train on 64)
    assert batch_budget(175, 32, 110) == 5 and batch_budget(350, 32, 110) == 11  # 5.47 and 10.94
    assert batch_budget(48, 32, 110) == 2  # a half rounds up
    assert batch_budget(3, 32, 110) == 1  # never none
    assert batch_budget(10_000, 32, 20) == 20


def test_a_round_pool_is_drawn_from_its_seed_and_round_and_maps_back_to_examples():
    from protocol.messages import StrategyPlan
    from trainer.client.schedule import ground_layout, pool_layout

    pb = ground_layout(StrategyPlan(strategy="gradmatch-pb", rounds=True, ground="batch", summaries="batch"),
                       1000, 100, 32, seed=3)
    pool = pool_layout(pb, 0.25, seed=3, round_id=2)
    assert pool.n_ground == 8 and pool.n_select == pb.n_select == 3 and len(pool.batches) == 8
    chosen = [next(i for i, b in enumerate(pb.batches) if torch.equal(b, p)) for p in pool.batches]
    assert chosen == sorted(set(chosen)) and list(pool.sizes) == [len(pb.batches[i]) for i in chosen]
    again = pool_layout(pb, 0.25, seed=3, round_id=2)  # a resumed run draws the same pool
    assert all(torch.equal(a, b) for a, b in zip(again.batches, pool.batches))
    other = pool_layout(pb, 0.25, seed=3, round_id=3)
    assert any(not torch.equal(a, b) for a, b in zip(other.batches, pool.batches))
    assert pool_layout(pb, 1.0, seed=3, round_id=2) is pb

    examples = ground_layout(StrategyPlan(strategy="gradmatch", rounds=True), 1000, 100, 32, seed=3)
    pool = pool_layout(examples, 0.3, seed=3, round_id=0)
    assert pool.n_ground == 300 and pool.ids.unique().numel() == 300 and bool((pool.ids.diff() > 0).all())
    assert int(pool.ids.max()) < 1000


def test_epoch_cosine_schedule_runs_over_nominal_epochs():
    """A warm run at T = 40, kappa = 0.5: full epochs at lr(0), lr(1); the first subset epoch at lr(20) = lr0 / 2."""
    plan = plan_epochs(40, 0.5, 0.1, rounds=True)
    assert (plan.full, plan.subset) == (2, 20)
    assert [plan.nominal(e) for e in (0, 1, 2, 3, 21)] == [0, 1, 20, 21, 39]
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.5)
    schedule = CosineSchedule(optimizer, 0.5, "epoch", n_epochs=40, total_steps=10_000, nominal=plan.nominal)
    expected = {0: 0.5, 1: 0.25 * (1 + math.cos(math.pi / 40)), 2: 0.5 * 0.5 * (1 + math.cos(math.pi * 20 / 40)),
                21: 0.25 * (1 + math.cos(math.pi * 39 / 40))}
    for epoch, lr in expected.items():
        schedule.start_epoch(epoch, step=epoch * 90)
        schedule.after_step(epoch * 90 + 1)  # per-epoch: steps leave the rate alone
        assert schedule.lr == pytest.approx(lr, rel=1e-12)
    assert expected[2] == pytest.approx(0.25)


def test_step_cosine_schedule_anneals_over_steps():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = CosineSchedule(optimizer, 1.0, "step", n_epochs=10, total_steps=100)
    schedule.start_epoch(0, step=0)
    assert schedule.lr == 1.0
    schedule.after_step(50)
    assert schedule.lr == pytest.approx(0.5)
    schedule.after_step(100)
    assert schedule.lr == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(2.0, 25, 100) == pytest.approx(1.0 + math.cos(math.pi / 4))
