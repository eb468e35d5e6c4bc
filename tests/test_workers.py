"""Summary workers: the summary pass made by Ray actors from a snapshot, off the trainer's path."""

import pytest
import ray
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from trainer.api import AdaptiveSubset

pytestmark = pytest.mark.ray


def blobs(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(3, 5, generator=g)[y] * 2 + torch.randn(n, 5, generator=g)
    return TensorDataset(x, y)


def run(workers: int, strategy: str, kill_after: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with AdaptiveSubset(model, blobs(), strategy=strategy, budget=0.2, epochs=10, select_every=2, kappa=0,
                        batch_size=20, lead=0, seed=1, summary_workers=workers, chunk_examples=100) as subset:
        for epoch, batches in subset:
            for x, y, w in batches:
                loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            if kill_after is not None and epoch == kill_after:
                ray.kill(subset.workers.workers[0])
        return subset.records, [p.detach().clone() for p in model.parameters()], subset.workers


@pytest.mark.parametrize("strategy", ["gradmatch-pb", "gradmatch"])
def test_workers_give_the_same_rounds_as_the_trainer(ray_address, strategy):
    inline, inline_weights, _ = run(0, strategy)
    spread, spread_weights, pool = run(2, strategy)
    assert [r["status"] for r in spread] == ["adopted"] * 4
    assert all(r["summary_where"] == "workers" and r["worker_s"] > 0 and len(r["worker_nodes"]) == 2 for r in spread)
    assert all(r["summary_where"] == "trainer" for r in inline)
    # the same snapshot gives the same summaries, hence the same subsets and the same trained model
    assert [r["grad_error"] for r in spread] == pytest.approx([r["grad_error"] for r in inline], rel=1e-6)
    assert [r["subset_size"] for r in spread] == [r["subset_size"] for r in inline]
    for a, b in zip(spread_weights, inline_weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_lost_worker_fails_its_round_and_is_replaced(ray_address):
    records, _, pool = run(2, "gradmatch-pb", kill_after=2)
    statuses = [r["status"] for r in records]
    assert statuses[0] == "adopted" and statuses.count("failed") == 1, records
    failed = next(r for r in records if r["status"] == "failed")
    assert "summary worker failed" in failed["reason"]
    assert statuses[statuses.index("failed") + 1:] and all(s == "adopted" for s in statuses[statuses.index("failed") + 1:])
    assert pool.replaced == 1
