"""Summary workers: the summary pass made by Ray actors from a snapshot, off the trainer's path."""

import pytest
import ray
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainer.client.api import AdaptiveSubset

from loops import weighted_step

pytestmark = pytest.mark.ray


def blobs(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(3, 5, generator=g)[y] * 2 + torch.randn(n, 5, generator=g)
    return TensorDataset(x, y)


def run(workers: int, strategy: str, kill_after: int | None = None, watch=None, on_model=None, **options):
    """A short run; ``watch(subset)`` is called at the start of every epoch, ``on_model(model)`` before it starts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    if on_model is not None:
        on_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with AdaptiveSubset(model, blobs(), strategy=strategy, budget=0.2, epochs=10, select_every=2, kappa=0,
                        batch_size=20, lead=0, seed=1, summary_workers=workers, chunk_examples=100,
                        **options) as subset:
        for epoch, batches in subset:
            if watch is not None:
                watch(subset)
            for x, y, w in batches:
                weighted_step(model, opt, x, y, w)
            if kill_after is not None and epoch == kill_after:
                ray.kill(subset.workers.workers[0])
        return subset.records, [p.detach().clone() for p in model.parameters()], subset


def run_sharded(workers: int, strategy: str):
    """A run on the sharded selector (2 shards); returns its records, the subset adopted in each round (its
    example ids and weights), each round's class map (per-example rounds) and the coordinator's status."""
    subsets, maps, status = {}, {}, []

    def watch(subset):
        current = subset.subset
        if current.round is not None and current.round not in subsets:
            subsets[current.round] = (torch.cat(current.batches).sort().values, current.weights.clone())
            last = ray.get(subset.selector.status.remote(), timeout=30)
            status.append(last)
            maps[current.round] = last.last_round.class_shards

    records, _, _ = run(workers, strategy, watch=watch, shards=2, shard_cpus=0.01)
    return records, subsets, maps, status[-1]


@pytest.mark.parametrize("strategy, pool", [("gradmatch-pb", 1.0), ("gradmatch", 1.0), ("gradmatch", 0.5)])
def test_workers_give_the_same_rounds_as_the_trainer(ray_address, strategy, pool):
    inline, inline_weights, inline_run = run(0, strategy, pool=pool)
    spread, spread_weights, spread_run = run(2, strategy, pool=pool)
    # the pool waited for its workers to be built and warm before the first round, and knows their nodes
    assert sorted(spread_run.workers.nodes) == sorted(spread[0]["worker_nodes"])
    n_ground = 15 if strategy.endswith("-pb") else 300  # 300 examples in batches of 20
    assert [r["n_ground"] for r in spread] == [r["n_ground"] for r in inline] == [round(n_ground * pool)] * 4
    assert [r["status"] for r in spread] == ["adopted"] * 4
    assert all(r["summary_where"] == "workers" and r["worker_s"] > 0 and len(r["worker_nodes"]) == 2 for r in spread)
    assert all(r["summary_where"] == "trainer" for r in inline)
    # the same snapshot gives the same summaries, hence the same subsets and the same trained model
    assert [r["grad_error"] for r in spread] == pytest.approx([r["grad_error"] for r in inline], rel=1e-6)
    assert [r["subset_size"] for r in spread] == [r["subset_size"] for r in inline]
    for a, b in zip(spread_weights, inline_weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # overlap's denominator is all the selection work off the trainer: the workers' passes too when there are any
    inline_summary, spread_summary = inline_run.summary(), spread_run.summary()
    assert inline_summary["workers_busy_s"] == 0
    assert inline_summary["overlap"] == pytest.approx(1 - inline_summary["stall_s"] / inline_summary["selector_busy_s"])
    assert spread_summary["workers_busy_s"] == pytest.approx(sum(r["worker_s"] for r in spread))
    assert spread_summary["stall_s"] > 0  # lead 0: the trainer waits for every round
    assert spread_summary["overlap"] == pytest.approx(
        1 - spread_summary["stall_s"] / (spread_summary["selector_busy_s"] + spread_summary["workers_busy_s"]))


@pytest.mark.parametrize("strategy", ["gradmatch-pb", "gradmatch"])
def test_a_pool_is_all_a_round_summarises_and_chooses_from(ray_address, strategy):
    from protocol.messages import StrategyPlan
    from trainer.client.schedule import ground_layout, pool_layout

    adopted, started = {}, []
    summarising = []  # examples of each forward pass in eval mode once the loop runs: the summary passes

    def count(module, args):
        if started and not module.training:
            summarising.append(args[0].shape[0])

    def watch(subset):
        started.append(True)
        current = subset.subset
        if current.round is not None and current.round not in adopted:
            adopted[current.round] = torch.cat(current.batches)

    records, _, _ = run(0, strategy, watch=watch, on_model=lambda m: m[0].register_forward_pre_hook(count), pool=0.5)
    assert [r["status"] for r in records] == ["adopted"] * 4
    pb = strategy.endswith("-pb")
    plan = StrategyPlan(strategy=strategy, ground="batch" if pb else "example",
                        summaries="batch" if pb else "example", rounds=True)
    ground = ground_layout(plan, 300, 60, 20, 1)
    expected = []
    for record in records:
        pool = pool_layout(ground, 0.5, 1, record["round"])
        assert record["n_ground"] == pool.n_ground == (8 if pb else 150)
        examples = torch.cat(pool.batches) if pb else pool.ids
        expected.append(len(examples))
        assert set(adopted[record["round"]].tolist()) <= set(examples.tolist()), record["round"]
    assert sum(summarising) == sum(expected)  # only the pool was forwarded, once per round


@pytest.mark.parametrize("shards", [1, 2])
def test_a_lost_worker_fails_its_round_and_is_replaced(ray_address, shards):
    records, _, finished = run(2, "gradmatch-pb", kill_after=2, shards=shards, shard_cpus=0.01)
    pool = finished.workers
    statuses = [r["status"] for r in records]
    assert statuses[0] == "adopted" and statuses.count("failed") == 1, records
    failed = next(r for r in records if r["status"] == "failed")
    assert "summary worker failed" in failed["reason"]
    assert statuses[statuses.index("failed") + 1:] and all(s == "adopted" for s in statuses[statuses.index("failed") + 1:])
    assert pool.replaced == 1


@pytest.mark.parametrize("strategy", ["gradmatch-pb", "gradmatch"])
def test_workers_send_class_parts_straight_to_the_shards_with_the_same_rounds(ray_address, strategy):
    streamed, streamed_subsets, streamed_maps, streamed_status = run_sharded(0, strategy)
    direct, direct_subsets, direct_maps, direct_status = run_sharded(2, strategy)
    assert [r["status"] for r in direct] == [r["status"] for r in streamed] == ["adopted"] * 4
    assert all(r["summary_where"] == "workers" and len(r["worker_nodes"]) == 2 for r in direct)
    assert sorted(direct_subsets) == sorted(streamed_subsets) == [r["round"] for r in direct]
    for round_id, (ids, weights) in direct_subsets.items():
        torch.testing.assert_close(ids, streamed_subsets[round_id][0], rtol=0, atol=0)
        torch.testing.assert_close(weights, streamed_subsets[round_id][1], rtol=1e-5, atol=1e-7)
    assert [r["grad_error"] for r in direct] == pytest.approx([r["grad_error"] for r in streamed], rel=1e-6)
    # the trainer's chunks pass through the coordinator; the workers' class parts go straight to the shards
    assert streamed_status.routed_bytes > 0
    assert direct_status.routed_bytes == 0 and direct_status.last_round.moved_bytes > 0
    if strategy == "gradmatch":  # the first round's map: by arrival when streamed, dealt by counts up front
        first = min(direct_maps)
        assert direct_maps[first] != streamed_maps[first], (direct_maps, streamed_maps)
