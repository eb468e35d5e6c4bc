"""What the framework integrations share: the epochs a run trains, and one-line errors for missing extras."""

from __future__ import annotations

from protocol.config import ROUND_STRATEGIES, RunConfig
from trainer.client.extras import require
from trainer.client.schedule import EpochPlan, plan_epochs

__all__ = ["epoch_plan", "require"]


def epoch_plan(config: RunConfig) -> EpochPlan:
    """The epochs ``config`` trains: full epochs (warm start) then subset epochs, fewer than ``epochs`` with a warm
    start (``kappa``); the Trainer's epoch count must be ``epoch_plan(config).total``."""
    schedule = config.schedule
    return plan_epochs(config.train.epochs, schedule.kappa, schedule.budget,
                       config.selector.strategy in ROUND_STRATEGIES)
