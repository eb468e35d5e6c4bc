"""When selection rounds start and when their subsets are due (DESIGN.md §3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.training import EpochPlan


@dataclass(frozen=True)
class RoundSlot:
    """Round ``round`` starts before epoch ``trigger`` and its subset is due before epoch ``due``."""

    round: int
    trigger: int
    due: int


def round_schedule(plan: EpochPlan, select_every: int, lead: int) -> list[RoundSlot]:
    """Rounds every ``select_every`` epochs of the subset phase, each started ``lead`` epochs early.

    With a warm start the first round is due when the subset phase begins; without one the run
    starts from a random subset and the first round is due ``select_every`` epochs in.
    """
    first = plan.full if plan.full > 0 else select_every
    dues = range(first, plan.total, select_every) if plan.subset > 0 else range(0)
    return [RoundSlot(r, max(0, due - lead), due) for r, due in enumerate(dues)]


def budget_size(budget: float, n_train: int) -> int:
    """k: the number of training examples the budget allows (at least one)."""
    return max(1, min(n_train, round(budget * n_train)))


def batch_budget(k: int, batch_size: int, n_batches: int) -> int:
    """PB budget: the number of mini-batches that holds ``k`` examples."""
    return max(1, min(n_batches, math.ceil(k / batch_size)))
