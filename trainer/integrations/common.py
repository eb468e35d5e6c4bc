"""What the framework integrations share: the epochs a run trains, and one-line errors for missing extras."""

from __future__ import annotations

import importlib

from protocol.config import ROUND_STRATEGIES, RunConfig
from trainer.client.schedule import EpochPlan, plan_epochs


def require(module: str, what: str, extra: str):
    """Import ``module`` or fail in one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module.split('.')[0]}: pip install 'gradmatch[{extra}]'") from None


def epoch_plan(config: RunConfig) -> EpochPlan:
    """The epochs ``config`` trains: full epochs (warm start) then subset epochs, fewer than ``epochs`` with a warm
    start (``kappa``); the Trainer's epoch count must be ``epoch_plan(config).total``."""
    schedule = config.schedule
    return plan_epochs(config.train.epochs, schedule.kappa, schedule.budget,
                       config.selector.strategy in ROUND_STRATEGIES)
