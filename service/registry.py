"""One entry per strategy: how it selects on the whole ground set (``service.strategies``) and on the shards of
a sharded selector (``service.sharded``), keyed by its config class, so that names stay in ``protocol.config``.
What a strategy needs from the trainer is declared by that class; ``plan_of`` turns it into a ``StrategyPlan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from protocol.config import (
    CraigPBSelector, CraigSelector, FullEarlyStopSelector, FullSelector, GlisterSelector, GradMatchPBSelector,
    GradMatchSelector, RandomOnlineSelector, RandomSelector, SelectorBase,
)
from protocol.messages import StrategyPlan
from service.sharded import sharded_craig_pb, sharded_gradmatch_pb, sharded_per_class, sharded_random, sharded_whole
from service.strategies import (
    Selection, select_craig, select_craig_pb, select_glister, select_gradmatch, select_gradmatch_pb, select_random,
)


def plan_of(config: SelectorBase) -> StrategyPlan:
    """What ``config``'s strategy asks of the trainer, from what its class declares (``protocol.config``)."""
    return StrategyPlan(strategy=config.strategy, rounds=config.rounds, ground=config.ground,
                        summaries=config.summaries, measure_only=config.measure_only,
                        needs_validation=config.needs_validation or bool(getattr(config, "valid", False)),
                        time_budget_s=getattr(config, "time_budget_s", None), online=config.online)


@dataclass(frozen=True)
class Strategy:
    """How a strategy selects (None: it never selects), alone and on the shards."""

    select: Callable[..., Selection] | None
    sharded: Callable[..., Selection] | None = None

    def plan(self, config: SelectorBase) -> StrategyPlan:
        return plan_of(config)


IMPLEMENTATIONS: dict[type[SelectorBase], Strategy] = {
    FullSelector: Strategy(None),
    FullEarlyStopSelector: Strategy(None),
    RandomSelector: Strategy(select_random, sharded_random),
    RandomOnlineSelector: Strategy(None),
    GradMatchSelector: Strategy(select_gradmatch, sharded_per_class),
    GradMatchPBSelector: Strategy(select_gradmatch_pb, sharded_gradmatch_pb),
    CraigSelector: Strategy(select_craig, sharded_per_class),
    CraigPBSelector: Strategy(select_craig_pb, sharded_craig_pb),
    GlisterSelector: Strategy(select_glister, sharded_whole),
}


def implementation(config: SelectorBase) -> Strategy:
    """The strategy that runs ``config`` (a validated branch of ``SelectorConfig``)."""
    return IMPLEMENTATIONS[type(config)]
