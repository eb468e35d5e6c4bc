"""The sharded selector on a multi-node Ray cluster simulated on one machine (``ray.cluster_utils.Cluster``).

A head (no CPU) and three worker nodes of one CPU each, with the custom resources ``node_a``, ``node_b`` and
``node_c``. One scenario runs everything on one cluster: shards spread over distinct nodes; shards pinned by
node resources; the sharded answer equal to the single selector's, also with the class parts sent straight
to the shards on their nodes; a node removed mid-round fails that round with its reason and the next round
runs on the nodes left.

The scenario runs in a subprocess (this file run as a script): the test session's shared local Ray stays
apart, and ``RAY_TMPDIR`` points at a private directory, so the cluster's address file is not seen by any
other program on the machine (``ray.init()`` reads it to find a cluster to join).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from scripts import run_cluster_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_TIMEOUT_S = 300
WORKERS = ("node_a", "node_b", "node_c")


@pytest.fixture(scope="module")
def scenario() -> dict:
    """Run the cluster scenario once; returns what it observed."""
    return run_cluster_script(__file__, SCRIPT_TIMEOUT_S, prefix="rc")


def test_spread_shards_land_on_distinct_worker_nodes(scenario):
    nodes = scenario["spread_nodes"]
    assert len(nodes) == 3 and len(set(nodes)) == 3
    assert set(nodes) == set(scenario["worker_nodes"].values())  # the head has no CPU for a shard
    assert scenario["coordinator_node"] == scenario["head_node"]


def test_pinned_shards_land_on_the_nodes_with_their_resources(scenario):
    workers = scenario["worker_nodes"]
    assert scenario["pinned_nodes"] == [workers["node_c"], workers["node_a"]]


@pytest.mark.parametrize("strategy", ["gradmatch", "gradmatch-pb"])
def test_sharded_selection_on_three_nodes_equals_the_single_selector(scenario, strategy):
    same = scenario["same"][strategy]
    assert same == {"indices": True, "weights": True, "grad_error": True}, same


@pytest.mark.parametrize("strategy", ["gradmatch", "gradmatch-pb"])
def test_parts_sent_straight_to_shards_on_other_nodes_give_the_single_selectors_answer(scenario, strategy):
    same = scenario["direct"][strategy]
    assert same == {"indices": True, "weights": True, "grad_error": True}, same
    assert scenario["routed_bytes"][strategy] == 0  # no summary row came through the coordinator
    assert scenario["routed_bytes"]["gradmatch-pb-whole"] > 0


def test_a_node_removed_mid_round_fails_that_round_and_the_next_runs_on_the_nodes_left(scenario):
    lost = scenario["lost"]
    assert lost["removed"] == scenario["worker_nodes"][lost["removed_name"]]
    assert lost["reason"].startswith("shard 1") and lost["kind"].startswith("shard_"), lost
    assert lost["removed"] not in lost["nodes_after"]
    assert set(lost["nodes_after"]) <= set(scenario["worker_nodes"].values())
    assert lost["next_round_same"] is True
    assert lost["fail_s"] < 60  # failed on the loss, not on a timeout


# --- the scenario, run as a script ---------------------------------------------------------------

def _remote_round(selector, strategy: str, round_id: int, before_chunk=None, direct: bool = False) -> dict:
    """One round against a selector actor; ``before_chunk(i)`` runs before chunk ``i`` is sent. ``direct``: the
    driver splits the chunks by the coordinator's class map and sends the parts straight to the shards, as the
    summary workers do."""
    import numpy as np
    import ray

    from protocol.routes import send_routed
    from test_shards import BATCH, ROWS, batch_chunks, example_chunks, layout_of

    pb = strategy.endswith("-pb")
    chunks = batch_chunks() if pb else example_chunks()
    n = len(ROWS) if pb else sum(len(c["ids"]) for c in chunks)
    route = ray.get(selector.routes.remote(round_id, layout_of(strategy)), timeout=60) if direct else None
    selector.start_round.remote({
        "round_id": round_id, "model_step": 1, "ground": "batch" if pb else "example", "n_ground": n,
        "n_select": n // 10, "n_chunks": len(chunks), "seed": 3, "strategy": strategy, "lr": 0.05,
        "sizes": np.full(n, BATCH) if pb else None,
    })
    for i, chunk in enumerate(chunks):
        if before_chunk is not None:
            before_chunk(i)
        message = {"round_id": round_id, "chunk_index": i, **chunk}
        ref = send_routed(route, selector, message) if direct else selector.add_chunk.remote(message)
        if before_chunk is not None:
            ray.get(ref, timeout=60)  # routed in order, so that a fault lands between known chunks
    return ray.get(selector.result.remote(round_id, 90), timeout=120)


def _same(single, other) -> dict:
    import numpy as np

    same_indices = bool(np.array_equal(single.indices, other.indices))
    return {"indices": same_indices,
            "weights": same_indices and bool(np.allclose(other.weights, single.weights, rtol=1e-6, atol=0)),
            "grad_error": all(abs(getattr(other, key) - getattr(single, key))
                              <= 1e-6 * max(1.0, abs(getattr(single, key)))  # Eq. 1 is absolute
                              for key in ("grad_error", "grad_error_rel", "grad_error_trained"))}


def _local(strategy: str):
    from service.selector import SelectorService
    from test_shards import run_round

    return run_round(SelectorService({"strategy": strategy}), strategy)


def _nodes(selector) -> list[str]:
    import ray

    return ray.get(selector.shard_nodes.remote(60), timeout=90)


def run_scenario(cluster, workers: dict) -> dict:
    import ray

    from protocol.errors import RoundFailed
    from test_shards import selector_config
    from trainer.client.cluster import release, start_selector

    head_options = {"num_cpus": 0, "num_gpus": 0, "resources": {"head": 0.01}}
    result = {"head_node": cluster.head_node.node_id,
              "worker_nodes": {name: node.node_id for name, node in workers.items()}, "same": {}}
    spread = start_selector(selector_config(strategy="gradmatch-pb", shards=3, shard_cpus=0.5), head_options)
    result["coordinator_node"] = ray.get(spread.__ray_call__.remote(
        lambda self: ray.get_runtime_context().get_node_id()), timeout=60)
    result["spread_nodes"] = _nodes(spread)
    pinned = start_selector(selector_config(strategy="gradmatch", shards=2, shard_cpus=0.5,
                                            shard_resources=["node_c", "node_a"]), head_options)
    result["pinned_nodes"] = _nodes(pinned)
    result["same"]["gradmatch"] = _same(_local("gradmatch"), _remote_round(pinned, "gradmatch", 0))
    result["direct"] = {"gradmatch": _same(_local("gradmatch"), _remote_round(pinned, "gradmatch", 1, direct=True))}
    result["routed_bytes"] = {"gradmatch": ray.get(pinned.status.remote(), timeout=60).last_round.routed_bytes}
    ray.get(pinned.stop.remote(), timeout=60)  # frees its bundles for the shard that will move
    release(pinned)

    single = _local("gradmatch-pb")
    result["same"]["gradmatch-pb"] = _same(single, _remote_round(spread, "gradmatch-pb", 0))
    result["routed_bytes"]["gradmatch-pb-whole"] = ray.get(spread.status.remote(), timeout=60).routed_bytes
    victim = result["spread_nodes"][1]
    name = next(n for n, node in workers.items() if node.node_id == victim)

    def remove_midway(i):
        if i == 2:  # once the first chunks are with the shards (else the restarted shard would get them all)
            ray.get(spread.__ray_call__.remote(lambda self: self.calls.settle(1, time.monotonic() + 30)), timeout=60)
            cluster.remove_node(workers[name])

    lost = {"removed": victim, "removed_name": name}
    start = time.monotonic()
    try:
        _remote_round(spread, "gradmatch-pb", 1, before_chunk=remove_midway)
        lost["reason"] = "no failure"
    except RoundFailed as exc:
        lost["reason"], lost["kind"] = exc.reason, exc.kind
    lost["fail_s"] = time.monotonic() - start
    lost["next_round_same"] = _same(single, _remote_round(spread, "gradmatch-pb", 2)) == {
        "indices": True, "weights": True, "grad_error": True}
    lost["nodes_after"] = _nodes(spread)
    result["lost"] = lost
    result["direct"]["gradmatch-pb"] = _same(single, _remote_round(spread, "gradmatch-pb", 3, direct=True))
    result["routed_bytes"]["gradmatch-pb"] = ray.get(spread.status.remote(), timeout=60).last_round.routed_bytes
    ray.get(spread.stop.remote(), timeout=60)
    release(spread)
    return result


def main(out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    store = 120 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"head": 1}, "include_dashboard": False, "object_store_memory": store})
    try:
        workers = {name: cluster.add_node(num_cpus=1, resources={name: 1}, object_store_memory=store)
                   for name in WORKERS}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        Path(out).write_text(json.dumps(run_scenario(cluster, workers)))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
