"""The trainer: weighted training on subsets, with selection rounds run by a remote selector.

``Trainer`` is a plain class that talks to the selector only through a Ray actor handle and protocol
messages; ``trainer.actor.TrainerActor`` is its Ray shell. It never waits on the selector while training:
at each epoch boundary it polls with ``ray.wait(..., timeout=0)`` (DESIGN.md §3).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from pydantic import ValidationError
from ray.exceptions import GetTimeoutError, RayError

from protocol.config import RunConfig
from protocol.messages import RoundRequest, StrategyPlan, SubsetMessage
from protocol.records import EpochRecord, RoundRecord, RunSummary
from trainer.data import Splits
from trainer.energy import EnergyMeter
from trainer.models import build_model
from trainer.rounds import RoundSlot, batch_budget, budget_size, round_schedule
from trainer.summaries import batch_summaries
from trainer.training import (
    Subset, evaluate, fixed_batches, full_subset, make_optimizer, plan_epochs, subset_from_batches,
    subset_from_examples, train_epoch,
)

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 60.0  # cheap selector calls (plan)


@dataclass
class PendingRound:
    slot: RoundSlot
    request: RoundRequest
    result: ray.ObjectRef
    trigger_epoch: int
    started: float
    summary_s: float
    stall_s: float = 0.0


@dataclass
class Progress:
    epoch: int = 0
    total: int = 0
    loss: float | None = None
    val_acc: float | None = None
    epochs: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)


class Trainer:
    """Trains ``config.model`` on ``splits`` following ``config.schedule``, asking ``selector`` for subsets."""

    def __init__(self, config: RunConfig, splits: Splits, selector, device: torch.device):
        self.config = config
        self.splits = splits
        self.selector = selector
        self.device = device
        self.plan = StrategyPlan.model_validate(ray.get(selector.plan.remote(), timeout=CALL_TIMEOUT_S))
        torch.manual_seed(config.seed)
        self.model = build_model(config.model.name, splits.in_shape, splits.n_classes).to(device)
        self.x, self.y = splits.train_x.to(device), splits.train_y.to(device)
        self.n_train = int(self.y.shape[0])
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch_plan = plan_epochs(config.train.epochs, config.schedule.kappa, config.schedule.budget, self.plan.rounds)
        self.slots = round_schedule(self.epoch_plan, config.schedule.select_every, config.schedule.lead)
        self._set_ground()
        self.subset = self._initial_subset()
        self.optimizer, self.schedule = make_optimizer(
            self.model, config.train.lr, config.train.momentum, config.train.weight_decay, self._total_steps()
        )
        self.steps = 0
        self.pending: PendingRound | None = None
        self.next_slot = 0
        self.stall_s = self.summary_s = self.selector_busy_s = 0.0
        self.eval_s = 0.0
        self._progress = Progress(total=self.epoch_plan.total)
        self._lock = threading.Lock()

    # set-up ------------------------------------------------------------------------------------
    def _set_ground(self) -> None:
        batch_size = self.config.train.batch_size
        self.k = budget_size(self.config.schedule.budget, self.n_train)
        self.batches = fixed_batches(self.n_train, batch_size, self.config.seed) if self.plan.ground == "batch" else None
        if self.batches is not None:
            self.n_ground, self.n_select = len(self.batches), batch_budget(self.k, batch_size, len(self.batches))
        else:
            self.n_ground, self.n_select = self.n_train, self.k

    def _initial_subset(self) -> Subset:
        """Without a warm start the run begins on a seeded random subset (weights 1)."""
        if not self.plan.rounds:
            return full_subset(self.n_train)
        rng = np.random.default_rng([self.config.seed, 2**31])
        chosen = np.sort(rng.choice(self.n_ground, size=self.n_select, replace=False))
        return self._subset(chosen, np.ones(self.n_select), None)

    def _subset(self, indices, weights, round_id: int | None) -> Subset:
        if self.batches is not None:
            return subset_from_batches(self.batches, indices, weights, self.n_train, round_id)
        return subset_from_examples(indices, weights, self.n_train, round_id)

    def _total_steps(self) -> int:
        batch_size = self.config.train.batch_size
        full_steps = math.ceil(self.n_train / batch_size)
        subset_steps = self.n_select if self.batches is not None else math.ceil(self.k / batch_size)
        return self.epoch_plan.full * full_steps + self.epoch_plan.subset * subset_steps

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train every epoch of the plan; return ``{"summary", "epochs", "rounds"}``."""
        meter = EnergyMeter(use_gpu=self.device.type == "cuda")
        meter.start()
        start = time.perf_counter()
        for epoch in range(self.epoch_plan.total):
            epoch_start = time.perf_counter()
            self._boundary(epoch)
            subset = full_subset(self.n_train) if epoch < self.epoch_plan.full else self.subset
            loss, steps = train_epoch(
                self.model, self.optimizer, self.schedule, self.x, self.y, subset,
                self.config.train.batch_size, self.splits.augment, self.generator,
            )
            self.steps += steps
            train_s = time.perf_counter() - epoch_start
            val_acc = self._maybe_validate(epoch)
            self._record_epoch(epoch, subset, loss, train_s, time.perf_counter() - start - self.eval_s, val_acc)
        self._finish_pending(self.epoch_plan.total)
        wall_s = time.perf_counter() - start - self.eval_s
        energy = meter.stop()
        return self._result(wall_s, energy)

    def _maybe_validate(self, epoch: int) -> float | None:
        last = epoch == self.epoch_plan.total - 1
        if not last and (epoch + 1) % self.config.train.eval_every:
            return None
        start = time.perf_counter()
        acc = evaluate(self.model, self.splits.val_x.to(self.device), self.splits.val_y.to(self.device))
        self.eval_s += time.perf_counter() - start
        return acc

    def _boundary(self, epoch: int) -> None:
        """Adopt a due subset, then start the next round if its trigger epoch has come."""
        if self.pending is not None and epoch >= self.pending.slot.due:
            self._try_adopt(epoch, wait=self._must_wait())
        elif self.pending is not None:
            self._check_timeout(epoch)
        if self.pending is None and self.next_slot < len(self.slots) and epoch >= self.slots[self.next_slot].trigger:
            self._trigger(self.slots[self.next_slot], epoch)
            self.next_slot += 1
            if epoch >= self.pending.slot.due:
                self._try_adopt(epoch, wait=self._must_wait())

    def _must_wait(self) -> bool:
        return self.config.schedule.lead == 0 or self.config.schedule.on_late == "wait"

    # rounds ------------------------------------------------------------------------------------
    def _trigger(self, slot: RoundSlot, epoch: int) -> None:
        """Snapshot: stream the ground set's summaries to the selector, then ask for the answer."""
        start = time.perf_counter()
        chunk_rows = self.config.schedule.chunk_rows
        needs = self.plan.needs_gradients
        n_chunks = math.ceil(self.n_ground / chunk_rows) if needs else 0
        sizes = np.array([len(b) for b in self.batches]) if self.batches is not None else None
        request = RoundRequest(
            round_id=slot.round, model_step=self.steps, ground=self.plan.ground, n_ground=self.n_ground,
            n_select=self.n_select, n_chunks=n_chunks, seed=self.config.seed, sizes=sizes,
        )
        self.selector.start_round.remote(request.model_dump())
        if needs:
            self._stream(slot.round, chunk_rows)
        result = self.selector.result.remote(slot.round, self.config.schedule.round_timeout_s)
        summary_s = time.perf_counter() - start
        self.summary_s += summary_s
        self.pending = PendingRound(slot, request, result, epoch, time.perf_counter(), summary_s)

    def _stream(self, round_id: int, chunk_rows: int) -> None:
        chunks = batch_summaries(self.model, self.x, self.y, self.batches, chunk_rows, self.device)
        for index, (ids, labels, rows) in enumerate(chunks):
            self.selector.add_chunk.remote(
                {"round_id": round_id, "chunk_index": index, "ids": ids.numpy(), "labels": labels.cpu().numpy(),
                 "rows": rows.numpy()}
            )

    def _try_adopt(self, epoch: int, wait: bool) -> None:
        pending = self.pending
        remaining = self.config.schedule.round_timeout_s - (time.perf_counter() - pending.started)
        start = time.perf_counter()
        ready, _ = ray.wait([pending.result], timeout=max(0.0, remaining) if wait else 0)
        if wait:
            stall = time.perf_counter() - start
            pending.stall_s += stall
            self.stall_s += stall
        if not ready:
            self._check_timeout(epoch)
            return
        self.pending = None
        try:
            payload = ray.get(pending.result, timeout=CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            self._record_round(pending, "failed", reason=_first_line(exc))
            return
        busy_s = payload.get("busy_s") if isinstance(payload, dict) else None
        if isinstance(busy_s, (int, float)):
            self.selector_busy_s += float(busy_s)
        try:
            message = SubsetMessage.model_validate(payload, context={"request": pending.request})
        except ValidationError as exc:
            self._record_round(pending, "rejected", reason=_validation_reason(exc), selector_s=busy_s)
            return
        self.subset = self._subset(message.indices, message.weights, message.round_id)
        self._record_round(
            pending, "adopted", adopted_epoch=epoch, staleness=epoch - pending.trigger_epoch,
            selector_s=message.busy_s, select_s=message.select_s, grad_error=message.grad_error,
            subset_size=self.subset.n_examples, n_padded=message.n_padded,
        )

    def _check_timeout(self, epoch: int) -> None:
        pending = self.pending
        if time.perf_counter() - pending.started >= self.config.schedule.round_timeout_s:
            self.pending = None  # the selector gives up on it by itself (its result() timeout)
            self._record_round(pending, "timeout", reason=f"no answer within {self.config.schedule.round_timeout_s} s")

    def _finish_pending(self, epoch: int) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._record_round(pending, "unused", reason="training ended before the subset was adopted")

    # records -----------------------------------------------------------------------------------
    def _record_round(self, pending: PendingRound, status: str, **fields) -> None:
        if status != "adopted":
            log.warning("round %d %s: %s", pending.slot.round, status, fields.get("reason"))
        record = RoundRecord(
            round=pending.slot.round, model_step=pending.request.model_step, trigger_epoch=pending.trigger_epoch,
            due_epoch=pending.slot.due, status=status, stall_s=pending.stall_s, summary_s=pending.summary_s,
            **fields,
        )
        with self._lock:
            self._progress.rounds.append(record.model_dump())

    def _record_epoch(self, epoch, subset: Subset, loss, train_s, wall_s, val_acc) -> None:
        record = EpochRecord(
            epoch=epoch, phase="full" if epoch < self.epoch_plan.full else "subset", steps=self.steps,
            n_examples=subset.n_examples, loss=loss, lr=self.optimizer.param_groups[0]["lr"],
            train_s=train_s, wall_s=wall_s, val_acc=val_acc,
            subset_round=subset.round if epoch >= self.epoch_plan.full else None,
        )
        with self._lock:
            p = self._progress
            p.epoch, p.loss = epoch + 1, loss
            p.val_acc = val_acc if val_acc is not None else p.val_acc
            p.epochs.append(record.model_dump())

    def progress(self, n_epochs_seen: int = 0, n_rounds_seen: int = 0) -> dict:
        """The state of the run and the records not yet seen by the caller."""
        with self._lock:
            p = self._progress
            return {
                "epoch": p.epoch, "total": p.total, "loss": p.loss, "val_acc": p.val_acc,
                "epochs": p.epochs[n_epochs_seen:], "rounds": p.rounds[n_rounds_seen:],
            }

    def _result(self, wall_s: float, energy) -> dict:
        rounds = self._progress.rounds
        adopted = sum(r["status"] == "adopted" for r in rounds)
        test_acc = evaluate(self.model, self.splits.test_x.to(self.device), self.splits.test_y.to(self.device))
        summary = RunSummary(
            strategy=self.plan.strategy, dataset=self.splits.name, model=self.config.model.name,
            budget=self.config.schedule.budget, epochs=self.config.train.epochs,
            epochs_full=self.epoch_plan.full, epochs_subset=self.epoch_plan.subset, acc=test_acc,
            wall_s=wall_s, stall_s=self.stall_s, selector_busy_s=self.selector_busy_s, summary_s=self.summary_s,
            overlap=(1.0 - self.stall_s / self.selector_busy_s) if self.selector_busy_s > 0 else None,
            rounds=adopted, rounds_rejected=sum(r["status"] in ("rejected", "failed", "timeout") for r in rounds),
            steps=self.steps, energy_j=energy.energy_j, energy_note=energy.note, ray_address="",
            device=str(self.device),
        )
        return {"summary": summary.model_dump(), "progress": self.progress()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    cause = [line for line in text if "RoundFailed" in line or "Error" in line]
    return (cause[-1] if cause else (text[0] if text else type(exc).__name__))[:300]


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)[:300]
