"""The Ray shell around ``SelectorService``.

A threaded actor (``max_concurrency``) so ``status`` and ``stop`` answer while a ``result`` call
waits on a running selection. Resources, restarts and placement come from the caller's
``.options(...)``; the defaults hold no CPU for life, which matters on 2-core machines. A killed
selector is restarted and calls caught by its death are retried on the new one; a retried ``result``
for a round the new one never saw fails fast (``SelectorService.result``).
"""

from __future__ import annotations

import math

import ray
import torch
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from threadpoolctl import threadpool_limits

from protocol.receipts import Accepted, Rejection
from service.coordinator import ShardedSelector
from service.selector import SELECTOR_CONFIG, SelectorService
from service.shard import ShardService


class _PlacedSelector(SelectorService):
    """Computes on the GPU Ray assigned to the actor, if any (``num_gpus=0`` actors see every GPU), with the
    configured number of CPU threads, warmed up before it answers its first call."""

    def __init__(self, config):
        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        super().__init__(config, device="cuda:0" if on_gpu else "cpu")
        torch.set_num_threads(self.config.threads)
        self._blas_limit = threadpool_limits(limits=self.config.threads)  # held for the actor's life
        self.warm_up()


SelectorActor = ray.remote(
    num_cpus=0, num_gpus=0, max_concurrency=8, max_restarts=3, max_task_retries=3
)(_PlacedSelector)


# --- the sharded selector (service/coordinator.py, docs/scaling.md) ----------------------------------

SHARD_PLACE_TIMEOUT_S = 120.0


class _PlacedShard(ShardService):
    """A shard computing on the GPU Ray assigned to it, if any, with ``threads`` CPU threads."""

    def __init__(self, index: int, threads: int = 1):
        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        torch.set_num_threads(threads)
        self._blas_limit = threadpool_limits(limits=threads)  # held for the actor's life
        super().__init__(index, device="cuda:0" if on_gpu else "cpu")

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


ShardActor = ray.remote(  # calls caught by a restart are retried; the new shard then lacks the round's parts
    num_cpus=0, num_gpus=0, max_concurrency=4, max_restarts=3, max_task_retries=3
)(_PlacedShard)


class _PlacedShardedSelector(ShardedSelector):
    """The coordinator: places its shards in a placement group, one bundle (CPU, GPU, node resource) per shard.

    The group is named after the coordinator's actor id, so a restarted coordinator finds and reuses it (the
    shards of the dead incarnation die with it, their bundles stay reserved); ``stop`` removes it.
    """

    def __init__(self, config):
        config = SELECTOR_CONFIG.validate_python(config)
        self._bundles = [_bundle(config, i) for i in range(config.shards)]
        self._group = _shard_group(self._bundles, config.shard_placement)
        shards = [
            ShardActor.options(
                num_cpus=config.shard_cpus, num_gpus=config.shard_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=i),
            ).remote(i, max(1, math.floor(config.shard_cpus)))
            for i in range(config.shards)
        ]
        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        super().__init__(config, shards, device="cuda:0" if on_gpu else "cpu")
        torch.set_num_threads(config.threads)
        self._blas_limit = threadpool_limits(limits=config.threads)  # held for the actor's life

    def placed(self, timeout_s: float = SHARD_PLACE_TIMEOUT_S) -> Accepted | Rejection:
        """``Accepted`` once every shard's bundle is reserved, else a ``Rejection`` that says why not (within
        ``timeout_s``)."""
        try:
            ray.get(self._group.ready(), timeout=timeout_s)
            return Accepted()
        except GetTimeoutError:
            have = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
            asks = (f"{len(self._bundles)} x {self._bundles[0]}" if all(b == self._bundles[0] for b in self._bundles)
                    else str(self._bundles))
            return Rejection(subject="shard placement", field="selector.shards", value=str(len(self._bundles)),
                             rule=f"the {len(self._bundles)} shards (selector.shards) could not be placed within "
                                  f"{timeout_s:g} s: they ask for {asks} ({self.config.shard_placement}); the cluster "
                                  f"has {len(ray.nodes())} nodes and {have}")

    def shard_nodes(self, timeout_s: float = SHARD_PLACE_TIMEOUT_S) -> list[str]:
        """The node id of each shard, in shard order."""
        return ray.get([shard.node.remote() for shard in self.calls.shards], timeout=timeout_s)

    def stop(self) -> None:
        """Fail open rounds, refuse new ones, end the shards and free their placement group."""
        SelectorService.stop(self)
        for shard in self.calls.shards:
            try:
                ray.kill(shard, no_restart=True)
            except Exception:  # already gone
                pass
        try:
            remove_placement_group(self._group)
        except Exception:  # already removed
            pass


def _bundle(config, index: int) -> dict:
    bundle = {"CPU": config.shard_cpus}
    if config.shard_gpus:
        bundle["GPU"] = config.shard_gpus
    if config.shard_resources:
        bundle[config.shard_resources[index]] = 1.0
    return bundle


def _shard_group(bundles: list[dict], strategy: str):
    name = f"selector-shards-{ray.get_runtime_context().get_actor_id()}"
    try:
        return get_placement_group(name)  # this coordinator's, from before a restart
    except ValueError:
        return placement_group(bundles, strategy=strategy, name=name)


ShardedSelectorActor = ray.remote(
    num_cpus=0, num_gpus=0, max_concurrency=8, max_restarts=3, max_task_retries=3
)(_PlacedShardedSelector)
