"""When rounds happen and what they choose from: the epoch plan, the round slots, budgets and ground sets.

Plain functions of the config (docs/design.md §3): ``plan_epochs`` splits the epoch budget into full and
subset epochs, ``round_schedule`` places the rounds, ``budget_size`` / ``batch_budget`` turn the budget (a
fraction) into a count, ``ground_layout`` / ``pool_layout`` make the ground set a round summarises.
``check_schedule`` refuses a schedule with no round before anything starts, as ``ScheduleProblem``s that the
command line and the Python API each put in their own words; ``check_run`` checks a config for its own strategy
and returns a ``CheckedConfig``, which the command line hands its trainer so that the check runs once per run.
``RoundClient``
(``trainer.client.rounds``) drives the rounds along this plan.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from protocol.config import PB_STRATEGIES, ROUND_STRATEGIES, RunConfig
from protocol.messages import StrategyPlan
from trainer.client.subsets import fixed_batches

POOL_STREAM = 2**31 + 1  # seed stream of the rounds' random pools
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    """``full`` epochs on all data (warm start or FULL) followed by ``subset`` epochs, in an epoch budget T.

    A warm run trains fewer epochs than T; the learning-rate schedule still runs over T *nominal* epochs, as
    the reference implementation steps its scheduler through the epochs it skips: trained epoch ``e`` is
    nominal epoch ``e`` in the full phase and ``e + (T - full - subset)`` in the subset phase.
    """

    full: int
    subset: int
    nominal_total: int = 0  # T; 0: the epochs trained (full + subset)

    @property
    def total(self) -> int:
        return self.full + self.subset

    def nominal(self, epoch: int) -> int:
        """The nominal epoch (0 .. T-1) that trained epoch ``epoch`` stands for."""
        skipped = max(0, self.nominal_total - self.total)
        return epoch if epoch < self.full else epoch + skipped


def plan_epochs(epochs: int, kappa: float, budget: float, rounds: bool) -> EpochPlan:
    """Warm start as the reference implementation trains it (paper A.2.1).

    Subsets are trained from nominal epoch ``int(kappa * T)`` to ``T``, so ``T - int(kappa*T)`` subset epochs,
    after ``T_f = round(int(kappa*T) * budget)`` full epochs (Python's ``round``, as the reference; at least
    one, so that no round selects with an untrained model); the nominal epochs in between are skipped. With
    ``kappa == 0.5`` that is the paper's ``T_s = kappa*T`` and ``T_f = T_s*k/n``. ``kappa == 0`` means no warm
    start: all ``T`` epochs on subsets. Strategies without rounds (FULL) train ``T`` full epochs.
    """
    if not rounds:
        return EpochPlan(full=epochs, subset=0, nominal_total=epochs)
    if kappa == 0:
        return EpochPlan(full=0, subset=epochs, nominal_total=epochs)
    start = int(kappa * epochs + 1e-9)
    return EpochPlan(full=max(1, round(start * budget)), subset=epochs - start, nominal_total=epochs)


@dataclass(frozen=True)
class RoundSlot:
    """Round ``round_id`` starts before epoch ``trigger`` and its subset is due before epoch ``due``."""

    round_id: int
    trigger: int
    due: int


def round_schedule(plan: EpochPlan, select_every: int, lead: int) -> list[RoundSlot]:
    """Rounds every ``select_every`` epochs of the subset phase, each started ``lead`` epochs early.

    With a warm start the first round is due when the subset phase begins; without one the run starts
    from a random subset and the first round is due ``select_every`` epochs in. No round starts before
    the first epoch has been trained (a subset chosen by the untrained model says nothing).
    """
    first = plan.full if plan.full > 0 else select_every
    dues = range(first, plan.total, select_every) if plan.subset > 0 else range(0)
    return [RoundSlot(r, max(1, due - lead), due) for r, due in enumerate(dues)]


def budget_size(budget: float, n_train: int) -> int:
    """k: the number of training examples the budget allows (at least one)."""
    return max(1, min(n_train, round(budget * n_train)))


def batch_budget(k: int, batch_size: int, n_batches: int) -> int:
    """PB budget: the whole number of mini-batches closest to ``k`` examples (halves up, at least one).

    Not rounded up as the reference implementation does: at a 1% budget of 3,500 examples in batches of 32
    that would train on 64 examples, 1.8 times the budget, and make every comparison with a per-example
    strategy at the same budget unfair. The adopted subset's size is in each round's record.
    """
    return max(1, min(n_batches, math.floor(k / batch_size + 0.5)))


@dataclass(frozen=True)
class ScheduleProblem:
    """One thing that keeps a run from selecting as asked: the config field at fault (a dotted path such as
    ``schedule.select_every``), its value as shown (None: the field as a whole) and the rule it breaks.

    Other fields the rule names are written ``{section.field}``, or ``{section.field:VALUE}`` with a value;
    ``render`` names them, and the field at fault, in the caller's words: ``--select-every 4`` on the command
    line, ``select_every=4`` in the Python API.
    """

    field: str
    value: str | None
    rule: str

    def render(self, name_of: Callable[[str], str], assign: str = " ") -> str:
        """The one line a user reads: ``name_of(path)`` names a field; ``assign`` joins a name and its value."""
        head = name_of(self.field) + (f"{assign}{self.value}" if self.value is not None else "")
        return f"{head}: {self.rule.format_map(_Names(name_of, assign))}"


class _Names(dict):
    """``{section.field}`` and ``{section.field:VALUE}`` in a rule, named by ``name_of`` and joined by ``assign``."""

    def __init__(self, name_of: Callable[[str], str], assign: str):
        super().__init__()
        self.name_of, self.assign = name_of, assign

    def __missing__(self, section: str):
        names = self

        class Section:
            def __getattr__(self, field: str):
                return _Name(names.name_of(f"{section}.{field}"), names.assign)

        return Section()


@dataclass(frozen=True)
class _Name:
    name: str
    assign: str

    def __format__(self, value: str) -> str:
        return f"{self.name}{self.assign}{value}" if value else self.name


def check_schedule(config: RunConfig, n_train: int, pb: bool,
                   rounds: bool) -> tuple[list[ScheduleProblem], list[ScheduleProblem]]:
    """What keeps a run from selecting as asked: ``(errors, warnings)``, each a list of ``ScheduleProblem``.

    Errors: no round fits in the subset phase (the run would train on its initial random subset only); a PB
    batch size that makes the budget every mini-batch. Warnings: strategy changes at or after the last epoch,
    which never take effect; a budget of the whole training set.
    """
    log.debug("check_schedule: %s for %d training examples", config.selector.strategy, n_train)
    errors, warnings = [], []
    if not rounds:
        return errors, warnings
    schedule, train = config.schedule, config.train
    plan = plan_epochs(train.epochs, schedule.kappa, schedule.budget, rounds)
    if not round_schedule(plan, schedule.select_every, schedule.max_lead):
        errors.append(ScheduleProblem(
            "schedule.select_every", str(schedule.select_every),
            f"no selection round fits in the {plan.subset} subset epochs of {{train.epochs:{train.epochs}}} "
            f"({{schedule.kappa:{schedule.kappa:g}}}); use a smaller {{schedule.select_every}}"))
    k = budget_size(schedule.budget, n_train)
    n_batches = math.ceil(n_train / train.batch_size)
    if pb and batch_budget(k, train.batch_size, n_batches) >= n_batches:
        errors.append(ScheduleProblem(
            "train.batch_size", str(train.batch_size),
            f"the budget of {k} examples needs all {n_batches} mini-batches of the {n_train} training examples, so "
            "nothing is selected; use a smaller {train.batch_size}"
            + (f" (or more data: {n_train} examples make {n_batches} mini-batch"
               f"{'es' if n_batches > 1 else ''})" if n_batches < 3 else "")))
    elif k >= n_train:
        warnings.append(ScheduleProblem("schedule.budget", f"{schedule.budget:g}",
                                        f"the subset is the whole training set ({n_train} examples)"))
    if schedule.pool < 1:
        n_ground, n_select, what = (n_batches, batch_budget(k, train.batch_size, n_batches), "mini-batches") if pb \
            else (n_train, k, "examples")
        m = pool_size(schedule.pool, n_ground)
        if m <= n_select:
            errors.append(ScheduleProblem(
                "schedule.pool", f"{schedule.pool:g}",
                f"a pool of {m} of the {n_ground} {what} leaves nothing to choose for the budget of {n_select}; use "
                f"a {{schedule.pool}} of at least {2 * n_select / n_ground:.3g} (ten times the budget, "
                f"{min(1.0, 10 * n_select / n_ground):.3g}, chooses well)"))
    late = [c.epoch for c in config.strategy_schedule if c.epoch >= plan.total]
    if late:
        warnings.append(ScheduleProblem(
            "strategy_schedule", None,
            f"entries at epochs {late} are at or after the last epoch ({plan.total - 1}) and never take effect"))
    return errors, warnings


@dataclass(frozen=True)
class CheckedConfig:
    """A run config whose schedule ``check_run`` accepted for a training set of ``n_train`` examples.

    The command line checks the schedule before Ray starts and hands its trainer this, not the bare config:
    ``AdaptiveSubset(config=checked)`` with no keyword options and a training set of ``n_train`` examples takes it
    as it is and does not check it again (given options, or another training set, it checks as for any config).
    """

    config: RunConfig
    n_train: int


def run_config(config: RunConfig | CheckedConfig) -> RunConfig:
    """The ``RunConfig`` itself, checked or not."""
    return config.config if isinstance(config, CheckedConfig) else config


def check_run(config: RunConfig, n_train: int) -> tuple[CheckedConfig | None, list[ScheduleProblem],
                                                         list[ScheduleProblem]]:
    """``check_schedule`` for the config's own strategy: ``(checked, errors, warnings)``; ``checked`` is the
    ``CheckedConfig`` when there is no error, else None."""
    strategy = config.selector.strategy
    errors, warnings = check_schedule(config, n_train, pb=strategy in PB_STRATEGIES, rounds=strategy in ROUND_STRATEGIES)
    return (None if errors else CheckedConfig(config, n_train)), errors, warnings


@dataclass(frozen=True)
class GroundLayout:
    """What a strategy chooses from: the fixed mini-batches (PB) or the training examples.

    ``ids`` holds the training example ids of a pool of examples (element ``i`` of the round is example
    ``ids[i]``); None when the elements are all the examples, in order. A pool of mini-batches is a shorter
    ``batches`` list.
    """

    batches: list[torch.Tensor] | None
    n_ground: int
    n_select: int
    sizes: np.ndarray | None
    ids: torch.Tensor | None = None


def ground_layout(plan: StrategyPlan, n_train: int, k: int, batch_size: int, seed: int) -> GroundLayout:
    if plan.ground == "batch":
        batches = fixed_batches(n_train, batch_size, seed)
        return GroundLayout(batches, len(batches), batch_budget(k, batch_size, len(batches)),
                            np.array([len(b) for b in batches]))
    return GroundLayout(None, n_train, k, None)


def pool_size(pool: float, n_ground: int) -> int:
    """Elements a round's pool holds: ``pool`` of the ground set, rounded, at least one."""
    return max(1, min(n_ground, round(pool * n_ground)))


def pool_layout(ground: GroundLayout, pool: float, seed: int, round_id: int) -> GroundLayout:
    """The round's random pool: ``pool_size(pool, n_ground)`` elements of ``ground`` drawn without replacement
    from a stream of (seed, round), so a resumed run draws the same pool. ``pool == 1`` is ``ground`` itself."""
    m = pool_size(pool, ground.n_ground)
    if m >= ground.n_ground:
        return ground
    rng = np.random.default_rng([seed, POOL_STREAM, round_id])
    chosen = np.sort(rng.choice(ground.n_ground, size=m, replace=False))
    if ground.batches is not None:
        return GroundLayout([ground.batches[i] for i in chosen], m, min(ground.n_select, m), ground.sizes[chosen])
    return GroundLayout(None, m, min(ground.n_select, m), None, torch.from_numpy(chosen))
