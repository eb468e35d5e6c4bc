"""The round protocol (docs/design.md §3), in one place: when rounds happen and how they are driven.

``RoundClient`` owns the selector's actor handle. At each epoch boundary it adopts a due subset (polling
without blocking, or waiting when asked to), triggers the next round when its epoch has come, streams the
summaries the strategy asks for, times rounds out, restarts a hung selector, skips overdue rounds and
records every round. The built-in trainer and a user's own loop (``trainer.client.api.AdaptiveSubset``) both drive
rounds through it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray
import torch
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError

from protocol.config import RANDOM_STREAM, RunConfig, StrategyChange
from protocol.errors import RoundFailed, RunFailed, one_line
from protocol.jobs import BatchJob, ExampleJob
from protocol.messages import RoundRequest, StrategyPlan, SubsetMessage
from protocol.records import RoundRecord
from trainer.client.schedule import (
    GroundLayout, RoundSlot, budget_size, ground_layout, plan_epochs, pool_layout, round_schedule,
)
from trainer.client.subsets import Subset, full_subset, subset_from_batches, subset_from_examples
from trainer.files import plain

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 60.0  # cheap selector calls (plan, reconfigure)
RESULT_MARGIN_S = 5.0  # the selector gives up this much after the trainer, so the trainer's timeout fires
ONLINE_STREAM = 2**31 + 2  # seed stream of RANDOM-ONLINE's per-epoch subsets
# the divergence guard: an adopted subset is harmful when the training loss exceeds
# max(GUARD_FACTOR * the loss before adoption, GUARD_CHANCE * ln C) for GUARD_EPOCHS epochs in a row without
# recovering (each such epoch at least GUARD_RECOVERY times the one before): a new subset's loss often jumps
# and then falls within a few epochs, a collapse stays up
GUARD_FACTOR, GUARD_CHANCE, GUARD_EPOCHS, GUARD_RECOVERY = 10.0, 0.25, 2, 0.9
AUTO_MARGIN = 2.0  # lead auto: a round starts when the epochs left before its boundary give it less than
AUTO_SLACK_S = 0.05  # AUTO_MARGIN times its expected time plus AUTO_SLACK_S, if it waited one epoch more


# --- the client ---------------------------------------------------------------------------------

@dataclass
class PendingRound:
    slot: RoundSlot
    strategy: str
    ground: GroundLayout
    request: RoundRequest
    result: ray.ObjectRef | None  # None once the answer is held in ``payload`` (restored from a checkpoint)
    trigger_epoch: int
    started: float
    summary_s: float
    stall_s: float = 0.0
    payload: SubsetMessage | dict | None = None  # the answer once received; a dict when restored from a checkpoint
    workers: list = field(default_factory=list)  # result refs of the summary workers making this round's chunks
    where: str = "trainer"


@dataclass
class RoundStats:
    stall_s: float = 0.0
    summary_s: float = 0.0
    selector_busy_s: float = 0.0
    records: list[dict] = field(default_factory=list)
    measure_s: float = 0.0  # summary passes made only to measure grad_error (left out of wall time)
    workers_busy_s: float = 0.0  # the slowest summary worker's seconds, summed over rounds


def overlap(stats: RoundStats) -> float | None:
    """``1 - stall_s / selection_s``: the share of the selection work the trainer did not wait for.

    The selection work off the trainer is the selector's busy time plus, when summary workers make the
    passes, the slowest worker's time of each round (a stall can wait for either). Without workers it is
    docs/design.md's ``1 - stall_s / selector_busy_s``. None before any selection work.
    """
    selection_s = stats.selector_busy_s + stats.workers_busy_s
    return 1.0 - stats.stall_s / selection_s if selection_s > 0 else None


class RoundClient:
    """Drives a run's selection rounds against one selector actor.

    Parameters
    ----------
    selector : ray.actor.ActorHandle
        A ``service.actor.SelectorActor`` (restarted by Ray when it dies, up to its ``max_restarts``).
    config : RunConfig
        The run's config; ``schedule``, ``strategy_schedule``, ``seed``, ``train.batch_size`` and ``train.lr``
        are read here.
    n_train : int
        Examples in the ground set (the training set).
    source : trainer.client.summaries.SummarySource
        Computes the summaries a round asks for from the current model.
    phase : callable, optional
        ``phase(name)`` returns a context manager around the work of one phase (``"summaries"``, ``"stall"``),
        e.g. an energy meter's.
    """

    def __init__(self, selector, config: RunConfig, n_train: int, source, phase: Callable | None = None,
                 workers=None, n_classes: int | None = None):
        self.selector = selector
        self.workers = workers  # a trainer.client.workers.SummaryPool, or None: the summary passes are made here
        self.config = config
        self.source = source
        self.n_train = n_train
        self.phase = phase or (lambda name: contextlib.nullcontext())
        self.plan = StrategyPlan.model_validate(ray.get(selector.plan.remote(), timeout=CALL_TIMEOUT_S))
        schedule = config.schedule
        self.k = budget_size(schedule.budget, n_train)
        self.epoch_plan = plan_epochs(config.train.epochs, schedule.kappa, schedule.budget, self.plan.rounds)
        # lead auto: the slots hold the earliest start; _start_now picks the epoch from measured times
        self.slots = [] if self.plan.online else round_schedule(self.epoch_plan, schedule.select_every,
                                                                 schedule.max_lead)
        self.auto_lead = schedule.lead == "auto"
        self.epoch_s: float | None = None  # the last epoch's length, boundary to boundary
        self.round_s: list[float] = []  # the time adopted rounds took after their summaries were sent
        self._boundary_t: float | None = None
        self.ground = self._layout(self.plan)
        self.subset = self._initial_subset()
        # a change at epoch E governs the subsets adopted from boundary E on, so it reaches the selector
        # ``lead`` epochs earlier, before the round due at E starts
        self.changes: dict[int, list] = {}
        for change in config.strategy_schedule:
            if change.epoch > 0:
                self.changes.setdefault(max(0, change.epoch - schedule.max_lead), []).append(change)
        self.applied_changes: list[dict] = []
        self.resend_config = None  # a scheduled config to give a restarted selector again
        self.selector_failed = False
        self.selector_lost: str | None = None  # why the selector is gone for good
        self.ever_used = torch.zeros(n_train, dtype=torch.bool)  # trained on in some epoch
        self.pending: PendingRound | None = None
        self.next_slot = 0
        self.stats = RoundStats()
        self.on_record: Callable[[dict], None] | None = None
        self.chance_loss = math.log(n_classes) if n_classes and n_classes > 1 else 0.0
        self.last_loss: float | None = None  # the training loss of the last epoch reported
        self.watch: dict | None = None  # the adopted round the divergence guard watches, and what it falls back to
        self.harmful: list[dict] = []  # rounds the guard undid

    # set-up ------------------------------------------------------------------------------------
    def _layout(self, plan: StrategyPlan) -> GroundLayout:
        return ground_layout(plan, self.n_train, self.k, self.config.train.batch_size, self.config.seed)

    def _initial_subset(self) -> Subset:
        """Without a warm start the run begins on a seeded random subset (weights 1)."""
        if not self.plan.rounds:
            return full_subset(self.n_train)
        return self._random_subset(np.random.default_rng([self.config.seed, RANDOM_STREAM]))

    def _random_subset(self, rng: np.random.Generator) -> Subset:
        chosen = np.sort(rng.choice(self.ground.n_ground, size=self.ground.n_select, replace=False))
        return self._subset(self.ground, chosen, np.ones(self.ground.n_select), None)

    def _round_ground(self, ground: GroundLayout, plan: StrategyPlan, round_id: int) -> GroundLayout:
        """The ground set of one round: its random pool (``--pool``) when the strategy reads summaries."""
        if plan.summaries == "none" or plan.measure_only:  # RANDOM's one subset is drawn from the whole ground set
            return ground
        return pool_layout(ground, self.config.schedule.pool, self.config.seed, round_id)

    def _subset(self, ground: GroundLayout, indices, weights, round_id: int | None) -> Subset:
        if ground.batches is not None:
            return subset_from_batches(ground.batches, indices, weights, self.n_train, round_id)
        if ground.ids is not None:
            indices = ground.ids[torch.from_numpy(np.array(indices, dtype=np.int64))].numpy()
        return subset_from_examples(indices, weights, self.n_train, round_id)

    # the boundary ------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, step: int) -> Subset:
        """Run the boundary before ``epoch`` (``step`` optimizer steps so far); return what to train on."""
        self.step = step
        now = time.perf_counter()
        if self._boundary_t is not None:
            self.epoch_s = now - self._boundary_t
        self._boundary_t = now
        for change in self.changes.get(epoch, []):
            self._reconfigure(change, epoch)
        self._boundary(epoch)
        if self.plan.online and epoch >= self.epoch_plan.full:
            self.subset = self._random_subset(np.random.default_rng([self.config.seed, ONLINE_STREAM, epoch]))
        subset = full_subset(self.n_train) if epoch < self.epoch_plan.full else self.subset
        self.ever_used[torch.cat(subset.batches)] = True
        return subset

    def _boundary(self, epoch: int) -> None:
        """Adopt a due subset, then start the next round if its trigger epoch has come."""
        if self.pending is not None and epoch >= self.pending.slot.due:
            self._try_adopt(epoch, wait=self._must_wait())
        elif self.pending is not None:
            self._check_timeout()
        if self.selector_lost:
            return
        if self.pending is None:
            self._skip_overdue(epoch)
        if (self.pending is None and self.next_slot < len(self.slots) and epoch >= self.slots[self.next_slot].trigger
                and self._start_now(self.slots[self.next_slot], epoch)):
            self._trigger(self.slots[self.next_slot], epoch)
            self.next_slot += 1
            if self.pending is not None and epoch >= self.pending.slot.due:
                self._try_adopt(epoch, wait=self._must_wait())

    def _start_now(self, slot: RoundSlot, epoch: int) -> bool:
        """Lead auto: start the round at the last boundary that still leaves it AUTO_MARGIN times the time the
        recent rounds took (or one epoch before its boundary, before any round has been timed)."""
        if not self.auto_lead or epoch >= slot.due - 1:
            return True
        if not self.round_s or self.epoch_s is None:
            return False
        expected = max(self.round_s[-2:])
        return (slot.due - epoch - 1) * self.epoch_s < AUTO_MARGIN * expected + AUTO_SLACK_S

    def _must_wait(self) -> bool:
        return self.config.schedule.lead == 0 or self.config.schedule.on_late == "wait"

    def _skip_overdue(self, epoch: int) -> None:
        """Rounds whose boundary passed while an earlier round was still out are not started late:
        selection keeps its every-R rhythm instead of running at every epoch to catch up."""
        while self.next_slot < len(self.slots) and self.slots[self.next_slot].due < epoch:
            slot = self.slots[self.next_slot]
            self.next_slot += 1
            self._append(RoundRecord(
                round=slot.round_id, strategy=self.plan.strategy, model_step=self.step, trigger_epoch=epoch,
                due_epoch=slot.due, status="skipped",
                reason=self.selector_lost or "its boundary passed while an earlier round was still out",
            ))

    def _reconfigure(self, change, epoch: int) -> None:
        """A scheduled strategy change: reconfigure the selector; rounds asked from now on use it."""
        selector, record = change.selector, {"epoch": change.epoch, "applied_epoch": epoch,
                                             "strategy": change.selector.strategy}
        try:
            plan = ray.get(self.selector.reconfigure.remote(selector), timeout=CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            log.warning("reconfigure at epoch %d failed: %s", epoch, one_line(exc))
            self.applied_changes.append({**record, "status": "failed"})
            return
        self.plan = StrategyPlan.model_validate(plan)
        self.ground = self._layout(self.plan)
        self.resend_config = selector
        self.applied_changes.append({**record, "status": "applied"})

    # rounds ------------------------------------------------------------------------------------
    def _trigger(self, slot: RoundSlot, epoch: int) -> None:
        """Snapshot: stream what the strategy needs to the selector, then ask for the answer."""
        start = time.perf_counter()
        self._resend_config()
        plan = self.plan
        ground = self._round_ground(self.ground, plan, slot.round_id)
        chunk_rows = self._chunk_rows(plan)
        n_chunks = math.ceil(ground.n_ground / chunk_rows) if plan.summaries != "none" else 0
        request = RoundRequest(
            round_id=slot.round_id, model_step=self.step, ground=plan.ground, n_ground=ground.n_ground,
            n_select=ground.n_select, n_chunks=n_chunks, seed=self.config.seed, strategy=plan.strategy,
            sizes=ground.sizes, lr=self.config.train.lr, with_validation=plan.needs_validation,
        )
        self.selector.start_round.remote(request.model_dump())
        workers, where = [], "none" if plan.summaries == "none" else "trainer"
        with self.phase("summaries"):
            if self.workers is not None and plan.summaries != "none":
                workers, where = self._stream_on_workers(slot.round_id, plan, ground, chunk_rows), "workers"
            else:
                self._stream(slot.round_id, plan, ground, chunk_rows)
        timeout_s = self.config.schedule.round_timeout_s
        result = self.selector.result.remote(slot.round_id, timeout_s + RESULT_MARGIN_S)
        summary_s = time.perf_counter() - start
        if plan.measure_only:
            self.stats.measure_s += summary_s
        else:
            self.stats.summary_s += summary_s
        self.pending = PendingRound(slot, plan.strategy, ground, request, result, epoch, time.perf_counter(),
                                    summary_s, workers=workers, where=where)

    def _chunk_rows(self, plan: StrategyPlan) -> int:
        examples = self.config.schedule.chunk_examples
        return max(1, examples // self.config.train.batch_size) if plan.summaries == "batch" else examples

    def _stream(self, round_id: int, plan: StrategyPlan, ground: GroundLayout, chunk_rows: int) -> None:
        """Send the summaries chunk by chunk as they are computed (the selector may start early)."""
        if plan.summaries == "batch":
            chunks = self.source.batch_chunks(ground.batches, chunk_rows)
        elif plan.summaries == "example":
            chunks = self.source.example_chunks(chunk_rows, ground.ids)
        else:
            chunks = iter(())
        for index, chunk in enumerate(chunks):
            self.selector.add_chunk.remote({"round_id": round_id, "chunk_index": index, **chunk})
        if plan.needs_validation:
            self.selector.add_validation.remote({"round_id": round_id, **self.source.validation()})

    def _stream_on_workers(self, round_id: int, plan: StrategyPlan, ground: GroundLayout, chunk_rows: int) -> list:
        """Put a snapshot of the model in the object store and let the workers make and send the chunks."""
        if plan.summaries == "batch":
            jobs = [BatchJob(i, start, ground.batches[start:start + chunk_rows])
                    for i, start in enumerate(range(0, ground.n_ground, chunk_rows))]
        else:
            jobs = [ExampleJob(i, start, min(start + chunk_rows, ground.n_ground),
                               None if ground.ids is None else ground.ids[start:start + chunk_rows])
                    for i, start in enumerate(range(0, ground.n_ground, chunk_rows))]
        refs, _ = self.workers.start(round_id, self.source.model, jobs, self.selector)
        if plan.needs_validation:
            self.selector.add_validation.remote({"round_id": round_id, **self.source.validation()})
        return refs

    def _failed_on_workers(self, pending: PendingRound) -> bool:
        """Fail ``pending`` when one of its summary workers failed (checked without waiting); True if it did."""
        done, _ = ray.wait(pending.workers, num_returns=len(pending.workers), timeout=0) if pending.workers else ([], [])
        for ref in done:
            try:
                ray.get(ref, timeout=CALL_TIMEOUT_S)
            except (RayError, GetTimeoutError) as exc:
                self.pending = None
                self._record(pending, "failed", reason=f"a summary worker failed: {one_line(exc)}")
                return True
        return False

    def _worker_report(self, pending: PendingRound) -> dict:
        if not pending.workers:
            return {}
        try:
            reports = ray.get(pending.workers, timeout=CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError):
            return {}
        return {"worker_s": max(r.seconds for r in reports), "worker_nodes": [r.node for r in reports]}

    def _resend_config(self) -> None:
        """After a selector failure, give the (restarted) selector the scheduled strategy again."""
        if self.resend_config is None or not self.selector_failed:
            return
        try:
            ray.get(self.selector.reconfigure.remote(self.resend_config), timeout=CALL_TIMEOUT_S)
            self.selector_failed = False
        except (RayError, GetTimeoutError) as exc:
            log.warning("reconfigure after a selector failure failed: %s", one_line(exc))

    def _try_adopt(self, epoch: int, wait: bool) -> None:
        pending = self.pending
        if self._failed_on_workers(pending):
            return
        if pending.payload is None:
            remaining = self.config.schedule.round_timeout_s - (time.perf_counter() - pending.started)
            start = time.perf_counter()
            with self.phase("stall"):
                ready, _ = ray.wait([pending.result], timeout=max(0.0, remaining) if wait else 0)
            if wait:
                stall = time.perf_counter() - start
                pending.stall_s += stall
                self.stats.stall_s += stall
            if not ready:
                self._check_timeout()
                return
        self.pending = None
        try:
            payload = self._payload(pending)
        except RoundFailed as exc:
            self.selector_failed = True
            self._record(pending, "failed", reason=exc.reason)
            return
        except (RayError, GetTimeoutError) as exc:
            if self._gone_for_good(exc):
                self._lose_selector(pending, one_line(exc))
                return
            self.selector_failed = True
            self._record(pending, "failed", reason=one_line(exc))
            return
        busy_s = payload.get("busy_s") if isinstance(payload, dict) else getattr(payload, "busy_s", None)
        if isinstance(busy_s, (int, float)) and math.isfinite(busy_s):
            self.stats.selector_busy_s += float(busy_s)
        workers = self._worker_report(pending)
        self.stats.workers_busy_s += workers.get("worker_s", 0.0)
        try:
            message = SubsetMessage.model_validate(payload, context={"request": pending.request})
        except ValidationError as exc:
            self._record(pending, "rejected", reason=one_line(exc), selector_s=_finite_or_none(busy_s), **workers)
            return
        previous, self.subset = self.subset, self._subset(pending.ground, message.indices, message.weights,
                                                          message.round_id)
        self._watch(message.round_id, epoch, previous)
        self.round_s.append(workers.get("worker_s", 0.0) + message.busy_s)
        self._record(
            pending, "adopted", adopted_epoch=epoch, staleness=epoch - pending.trigger_epoch,
            selector_s=message.busy_s, select_s=message.select_s, selector_cpu_s=message.cpu_s,
            selector_preempted=message.preempted,
            grad_error=message.grad_error, grad_error_rel=message.grad_error_rel,
            grad_error_trained=message.grad_error_trained,
            target=message.target, subset_size=self.subset.n_examples, n_padded=message.n_padded, **workers,
        )

    @staticmethod
    def _payload(pending: PendingRound):
        if pending.payload is not None:
            return pending.payload
        return ray.get(pending.result, timeout=CALL_TIMEOUT_S)

    def _check_timeout(self) -> None:
        pending = self.pending
        if self._failed_on_workers(pending):
            return
        timeout_s = self.config.schedule.round_timeout_s
        if pending.payload is None and time.perf_counter() - pending.started >= timeout_s:
            self.pending = None
            # a selector that does not answer is hung: restart it so the next round has a fresh one
            with contextlib.suppress(RayError):
                ray.kill(self.selector, no_restart=False)
            self.selector_failed = True
            self._record(pending, "timeout", reason=f"no answer within {timeout_s:g} s; selector restarted")

    def _gone_for_good(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the selector is gone for good. Ray reports a dead actor as any of the
        ``RayActorError`` family (``ActorDiedError``, ``ActorUnavailableError``...), also while it restarts; the
        actor's state in the GCS tells the two apart (``DEAD``: no restart is coming)."""
        if not isinstance(exc, RayActorError):
            return False
        dead = actor_dead(self.selector)
        return isinstance(exc, ActorDiedError) if dead is None else dead

    def _lose_selector(self, pending: PendingRound, why: str) -> None:
        """The selector is gone for good (its restarts are used up)."""
        reason = f"selector lost for good ({why})"
        self.selector_lost = reason
        self._record(pending, "failed", reason=reason)
        if self.config.schedule.on_selector_loss == "fail":
            raise RunFailed(f"{reason}; the run stops (--on-selector-loss continue trains on the current subset)")
        log.warning("%s: training goes on with the current subset (--on-selector-loss continue)", reason)

    # the divergence guard ----------------------------------------------------------------------
    def _watch(self, round_id: int, epoch: int, previous: Subset) -> None:
        """Watch the subset adopted at ``epoch``: its bound is set by the loss of the last epoch before it."""
        if not self.config.schedule.divergence_guard or self.last_loss is None:
            self.watch = None
            return
        bound = max(GUARD_FACTOR * self.last_loss, GUARD_CHANCE * self.chance_loss)
        self.watch = {"round": round_id, "epoch": epoch, "loss_before": self.last_loss, "bound": bound, "high": 0,
                      "last": None, "previous": previous}

    def observe_loss(self, epoch: int, loss: float) -> None:
        """The mean training loss of ``epoch``: an adopted subset that keeps it above its bound for ``GUARD_EPOCHS``
        epochs in a row, without falling by a tenth from one to the next, is undone (the previous subset comes
        back) and counted as harmful."""
        if not math.isfinite(loss):
            return
        watch = self.watch
        if watch is not None and epoch >= watch["epoch"]:
            stuck = watch["last"] is None or loss >= GUARD_RECOVERY * watch["last"]
            watch["high"] = watch["high"] + 1 if loss > watch["bound"] and stuck else int(loss > watch["bound"])
            watch["last"] = loss
            if watch["high"] >= GUARD_EPOCHS:
                self.watch = None
                if self.subset.round == watch["round"]:
                    self.subset = watch["previous"]
                    event = {"round": watch["round"], "epoch": epoch, "loss_before": watch["loss_before"],
                             "loss": loss, "bound": watch["bound"], "fallback_round": self.subset.round}
                    self.harmful.append(event)
                    log.warning("round %d harmful: training loss %.4g after its adoption exceeded %.4g (%.4g before) "
                                "for %d epochs; back to %s", watch["round"], loss, watch["bound"], watch["loss_before"],
                                GUARD_EPOCHS, "round %d's subset" % self.subset.round if self.subset.round is not None
                                else "the initial random subset")
        self.last_loss = loss

    def finish(self, epochs_run: int | None = None) -> None:
        """At the end: the round still out is unused, rounds whose boundary training passed without starting
        them are skipped. ``epochs_run`` (default: all of the plan) bounds that: a run stopped early records
        nothing about boundaries it never reached (a resumed run runs those rounds)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._record(pending, "unused", reason="training ended before the subset was adopted")
        self._skip_overdue(self.epoch_plan.total if epochs_run is None else min(epochs_run, self.epoch_plan.total))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Tell the selector to stop (its open rounds fail at once) and let a round still out finish, so that
        releasing the actor leaves no call in flight; bounded by ``timeout_s``."""
        refs = [self.selector.stop.remote()]
        if self.pending is not None and self.pending.result is not None:
            refs.append(self.pending.result)
        with contextlib.suppress(RayError, RoundFailed):
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)

    # records -----------------------------------------------------------------------------------
    def _record(self, pending: PendingRound, status: str, **fields) -> None:
        if status != "adopted":
            log.warning("round %d %s: %s", pending.slot.round_id, status, fields.get("reason"))
        self._append(RoundRecord(
            round=pending.slot.round_id, strategy=pending.strategy, model_step=pending.request.model_step,
            trigger_epoch=pending.trigger_epoch, due_epoch=pending.slot.due, status=status,
            stall_s=pending.stall_s, summary_s=pending.summary_s, summary_where=pending.where,
            n_ground=pending.ground.n_ground, **fields,
        ))

    def _append(self, record: RoundRecord) -> None:
        entry = record.model_dump()
        self.stats.records.append(entry)
        if self.on_record is not None:
            self.on_record(entry)

    def summary(self) -> dict:
        """Counts and times of the rounds so far."""
        records, stats = self.stats.records, self.stats
        adopted = [r for r in records if r["status"] == "adopted"]
        errors = {key: [r[key] for r in adopted if r.get(key) is not None]
                  for key in ("grad_error", "grad_error_rel", "grad_error_trained")}
        staleness = [r["staleness"] for r in adopted if r["staleness"] is not None]
        return {
            "rounds": len(adopted),
            "rounds_rejected": sum(r["status"] in ("rejected", "failed", "timeout") for r in records),
            "rounds_skipped": sum(r["status"] == "skipped" for r in records),
            "late_adoptions": sum(r["adopted_epoch"] > r["due_epoch"] for r in adopted),
            "staleness": float(np.mean(staleness)) if staleness else None,
            "stall_s": stats.stall_s, "summary_s": stats.summary_s, "selector_busy_s": stats.selector_busy_s,
            "workers_busy_s": stats.workers_busy_s, "overlap": overlap(stats),
            **{key: float(np.mean(values)) if values else None for key, values in errors.items()},
            "redundant": 1.0 - float(self.ever_used.float().mean()),
            "strategy_changes": list(self.applied_changes),
            "selector_lost": self.selector_lost,
            "rounds_harmful": len(self.harmful), "harmful": list(self.harmful),
        }

    # checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The selection state at a boundary. A round still out is waited for (its timeout bounds the wait)
        so that a resumed run adopts the same answer at the same boundary as an uninterrupted one."""
        pending = None
        if self.pending is not None:
            self._await_pending()
        if self.pending is not None:
            p = self.pending
            pending = {"slot": p.slot.__dict__, "strategy": p.strategy, "request": p.request.model_dump(mode="json"),
                       "trigger_epoch": p.trigger_epoch, "summary_s": p.summary_s, "stall_s": p.stall_s,
                       "payload": p.payload.model_dump() if isinstance(p.payload, SubsetMessage) else p.payload,
                       "plan": self.plan.model_dump(), "where": p.where}
        watch = None if self.watch is None else {**self.watch, "previous": _subset_state(self.watch["previous"])}
        return {
            "subset": _subset_state(self.subset), "last_loss": self.last_loss, "watch": watch,
            "harmful": list(self.harmful),
            "plan": self.plan.model_dump(), "next_slot": self.next_slot, "ever_used": self.ever_used.clone(),
            "records": plain(list(self.stats.records)), "stall_s": self.stats.stall_s, "summary_s": self.stats.summary_s,
            "selector_busy_s": self.stats.selector_busy_s, "measure_s": self.stats.measure_s,
            "workers_busy_s": self.stats.workers_busy_s,
            "applied_changes": list(self.applied_changes),
            "resend_config": self.resend_config.model_dump() if self.resend_config is not None else None,
            "selector_lost": self.selector_lost, "pending": plain(pending),
        }

    def _await_pending(self) -> None:
        p = self.pending
        if p.payload is not None:
            return
        remaining = max(0.0, self.config.schedule.round_timeout_s - (time.perf_counter() - p.started))
        ready, _ = ray.wait([p.result], timeout=remaining)
        if not ready:
            self._check_timeout()
            return
        try:
            p.payload = ray.get(p.result, timeout=CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError, RoundFailed) as exc:
            self.pending = None
            if self._gone_for_good(exc):
                self._lose_selector(p, one_line(exc))
                return
            self.selector_failed = True
            self._record(p, "failed", reason=one_line(exc))

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved; the selector is told the strategy in force."""
        self.subset = _subset_from_state(state["subset"])
        self.last_loss, self.harmful = state.get("last_loss"), list(state.get("harmful", []))
        watch = state.get("watch")
        self.watch = None if watch is None else {**watch, "previous": _subset_from_state(watch["previous"])}
        self.next_slot = state["next_slot"]
        self.ever_used = state["ever_used"].clone()
        self.stats = RoundStats(state["stall_s"], state["summary_s"], state["selector_busy_s"], list(state["records"]),
                                state.get("measure_s", 0.0), state.get("workers_busy_s", 0.0))
        self.applied_changes = list(state["applied_changes"])
        self.selector_lost = state["selector_lost"]
        if state["resend_config"] is not None:
            self.resend_config = StrategyChange.model_validate(
                {"epoch": 1, "selector": state["resend_config"]}).selector
            self.selector_failed = True
            self._resend_config()
        self.plan = StrategyPlan.model_validate(state["plan"])
        self.ground = self._layout(self.plan)
        p = state["pending"]
        if p is not None:
            plan = StrategyPlan.model_validate(p["plan"])
            ground = self._round_ground(self._layout(plan), plan, p["slot"]["round_id"])
            self.pending = PendingRound(
                RoundSlot(**p["slot"]), p["strategy"], ground, RoundRequest.model_validate(p["request"]),
                None, p["trigger_epoch"], time.perf_counter(), p["summary_s"], p["stall_s"], p["payload"],
                where=p.get("where", "trainer"),
            )


def _subset_state(subset: Subset) -> dict:
    return {"batches": [b.clone() for b in subset.batches], "weights": subset.weights.clone(), "fixed": subset.fixed,
            "round": subset.round}


def _subset_from_state(state: dict) -> Subset:
    return Subset(list(state["batches"]), state["weights"], state["fixed"], state["round"])


def actor_dead(actor) -> bool | None:
    """Whether the GCS holds ``actor`` as ``DEAD`` (no restart left or killed for good); None when its state
    cannot be read."""
    try:
        from ray._private.state import actors

        state = actors(actor_id=actor._actor_id.hex()).get("State")
    except Exception:  # noqa: BLE001 - a Ray without the accessor, or the GCS out of reach
        return None
    return None if state is None else str(state) == "DEAD"


def _finite_or_none(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
