"""The trainer: weighted training on subsets, with selection rounds run by a remote selector.

``Trainer`` is a plain class that talks to the selector only through a Ray actor handle and protocol
messages; ``trainer.actor.TrainerActor`` is its Ray shell. It never waits on the selector while training:
at each epoch boundary it polls with ``ray.wait(..., timeout=0)`` (DESIGN.md §3).
"""

from __future__ import annotations

import copy
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
from trainer.summaries import batch_summaries, example_summaries, validation_view
from trainer.training import (
    Subset, evaluate, fixed_batches, full_subset, make_optimizer, plan_epochs, subset_from_batches,
    subset_from_examples, train_epoch,
)

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 60.0  # cheap selector calls (plan, reconfigure)
RESULT_MARGIN_S = 5.0


@dataclass(frozen=True)
class Ground:
    """The ground set of a strategy: fixed mini-batches (PB) or the training examples."""

    batches: list[torch.Tensor] | None
    n_ground: int
    n_select: int
    sizes: np.ndarray | None


@dataclass
class PendingRound:
    slot: RoundSlot
    strategy: str
    ground: Ground
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
        self.k = budget_size(config.schedule.budget, self.n_train)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch_plan = plan_epochs(config.train.epochs, config.schedule.kappa, config.schedule.budget, self.plan.rounds)
        self.slots = round_schedule(self.epoch_plan, config.schedule.select_every, config.schedule.lead)
        self.ground = self._ground(self.plan)
        self.subset = self._initial_subset()
        self.optimizer, self.schedule = make_optimizer(
            self.model, config.train.lr, config.train.momentum, config.train.weight_decay, self._total_steps()
        )
        # a change at epoch E governs the subsets adopted from boundary E on, so it reaches the selector
        # ``lead`` epochs earlier, before the round due at E starts
        lead = config.schedule.lead
        self.changes: dict[int, list] = {}
        for change in config.strategy_schedule:
            if change.epoch > 0:
                self.changes.setdefault(max(0, change.epoch - lead), []).append(change)
        self.applied_changes: list[dict] = []
        self.resend_config = None  # a scheduled config to give a restarted selector again
        self.selector_failed = False
        self.ever_selected = torch.zeros(self.n_train, dtype=torch.bool)  # by an adopted round
        self.steps = 0
        self.pending: PendingRound | None = None
        self.next_slot = 0
        self.stall_s = self.summary_s = self.selector_busy_s = self.eval_s = 0.0
        self._progress = Progress(total=self.epoch_plan.total)
        self._lock = threading.Lock()
        self.meter = EnergyMeter(use_gpu=device.type == "cuda")
        self._warm_up()

    def _warm_up(self) -> None:
        """One throwaway training step and eval pass on a copy of the model, before the clock starts.

        A fresh process pays one-off costs on its first optimizer step and kernels (lazy imports, kernel
        selection: seconds on a CPU); without this they would land in whichever epoch comes first and
        skew comparisons of wall time between strategies.
        """
        model = copy.deepcopy(self.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)
        ids = torch.arange(min(self.n_train, self.config.train.batch_size), device=self.x.device)
        torch.nn.functional.cross_entropy(model(self.x[ids]), self.y[ids]).backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            model(self.x[ids])

    # set-up ------------------------------------------------------------------------------------
    def _ground(self, plan: StrategyPlan) -> Ground:
        if plan.ground == "batch":
            batches = fixed_batches(self.n_train, self.config.train.batch_size, self.config.seed)
            n_select = batch_budget(self.k, self.config.train.batch_size, len(batches))
            return Ground(batches, len(batches), n_select, np.array([len(b) for b in batches]))
        return Ground(None, self.n_train, self.k, None)

    def _initial_subset(self) -> Subset:
        """Without a warm start the run begins on a seeded random subset (weights 1)."""
        if not self.plan.rounds:
            return full_subset(self.n_train)
        rng = np.random.default_rng([self.config.seed, 2**31])
        chosen = np.sort(rng.choice(self.ground.n_ground, size=self.ground.n_select, replace=False))
        return self._subset(self.ground, chosen, np.ones(self.ground.n_select), None)

    def _subset(self, ground: Ground, indices, weights, round_id: int | None) -> Subset:
        if ground.batches is not None:
            return subset_from_batches(ground.batches, indices, weights, self.n_train, round_id)
        return subset_from_examples(indices, weights, self.n_train, round_id)

    def _total_steps(self) -> int:
        batch_size = self.config.train.batch_size
        full_steps = math.ceil(self.n_train / batch_size)
        subset_steps = self.ground.n_select if self.ground.batches is not None else math.ceil(self.k / batch_size)
        return self.epoch_plan.full * full_steps + self.epoch_plan.subset * subset_steps

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train every epoch of the plan; return ``{"summary", "progress"}``."""
        meter = self.meter
        meter.start()
        start = time.perf_counter()
        budget_s = self.plan.time_budget_s
        out_of_time = (lambda: time.perf_counter() - start - self.eval_s >= budget_s) if budget_s else None
        for epoch in range(self.epoch_plan.total):
            epoch_start = time.perf_counter()
            self._apply_change(epoch)
            self._boundary(epoch)
            subset = full_subset(self.n_train) if epoch < self.epoch_plan.full else self.subset
            with meter.phase("training"):
                loss, steps = train_epoch(
                    self.model, self.optimizer, self.schedule, self.x, self.y, subset,
                    self.config.train.batch_size, self.splits.augment, self.generator, stop=out_of_time,
                )
            self.steps += steps
            train_s = time.perf_counter() - epoch_start
            stopped = out_of_time is not None and out_of_time()
            val_acc = self._maybe_validate(epoch, last=stopped)
            self._record_epoch(epoch, subset, loss, train_s, time.perf_counter() - start - self.eval_s, val_acc)
            if stopped:
                break
        self._finish_pending()
        wall_s = time.perf_counter() - start - self.eval_s
        return self._result(wall_s, meter.stop())

    def _energy_j(self, total) -> float | None:
        """Joules of the measured phases (training, summaries, stall): evaluation excluded, as in wall_s."""
        phases = [reading.energy_j for reading in self.meter.phases().values()]
        if phases and all(j is not None for j in phases):
            return float(sum(phases))
        return total.energy_j

    def _maybe_validate(self, epoch: int, last: bool = False) -> float | None:
        last = last or epoch == self.epoch_plan.total - 1
        if not last and (epoch + 1) % self.config.train.eval_every:
            return None
        start = time.perf_counter()
        acc = evaluate(self.model, self.splits.val_x.to(self.device), self.splits.val_y.to(self.device))
        self.eval_s += time.perf_counter() - start
        return acc

    def _apply_change(self, epoch: int) -> None:
        """Scheduled strategy changes: reconfigure the selector; rounds asked from now on use it."""
        for change in self.changes.get(epoch, []):
            self._reconfigure(change, epoch)

    def _reconfigure(self, change, epoch: int) -> None:
        selector, record = change.selector, {"epoch": change.epoch, "applied_epoch": epoch,
                                             "strategy": change.selector.strategy}
        try:
            plan = ray.get(self.selector.reconfigure.remote(selector.model_dump()), timeout=CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            log.warning("reconfigure at epoch %d failed: %s", epoch, _first_line(exc))
            self.applied_changes.append({**record, "status": "failed"})
            return
        self.plan = StrategyPlan.model_validate(plan)
        self.ground = self._ground(self.plan)
        self.resend_config = selector
        self.applied_changes.append({**record, "status": "applied"})

    def _boundary(self, epoch: int) -> None:
        """Adopt a due subset, then start the next round if its trigger epoch has come."""
        if self.pending is not None and epoch >= self.pending.slot.due:
            self._try_adopt(epoch, wait=self._must_wait())
        elif self.pending is not None:
            self._check_timeout()
        if self.pending is None:
            self._skip_overdue(epoch)
        if self.pending is None and self.next_slot < len(self.slots) and epoch >= self.slots[self.next_slot].trigger:
            self._trigger(self.slots[self.next_slot], epoch)
            self.next_slot += 1
            if epoch >= self.pending.slot.due:
                self._try_adopt(epoch, wait=self._must_wait())

    def _skip_overdue(self, epoch: int) -> None:
        """Rounds whose boundary passed while an earlier round was still out are not started late:
        selection keeps its every-R rhythm instead of running at every epoch to catch up."""
        while self.next_slot < len(self.slots) and self.slots[self.next_slot].due < epoch:
            slot = self.slots[self.next_slot]
            self.next_slot += 1
            self._append_round(RoundRecord(
                round=slot.round, strategy=self.plan.strategy, model_step=self.steps, trigger_epoch=epoch,
                due_epoch=slot.due, status="skipped", reason="its boundary passed while an earlier round was still out",
            ))

    def _must_wait(self) -> bool:
        return self.config.schedule.lead == 0 or self.config.schedule.on_late == "wait"

    # rounds ------------------------------------------------------------------------------------
    def _trigger(self, slot: RoundSlot, epoch: int) -> None:
        """Snapshot: stream what the strategy needs to the selector, then ask for the answer."""
        start = time.perf_counter()
        self._resend_config()
        plan, ground = self.plan, self.ground
        chunk_rows = self._chunk_rows(plan)
        n_chunks = math.ceil(ground.n_ground / chunk_rows) if plan.summaries != "none" else 0
        request = RoundRequest(
            round_id=slot.round, model_step=self.steps, ground=plan.ground, n_ground=ground.n_ground,
            n_select=ground.n_select, n_chunks=n_chunks, seed=self.config.seed, strategy=plan.strategy,
            sizes=ground.sizes,
            lr=self.optimizer.param_groups[0]["lr"], with_validation=plan.needs_validation,
        )
        self.selector.start_round.remote(request.model_dump())
        with self.meter.phase("summaries"):
            self._stream(slot.round, plan, ground, chunk_rows)
        # the selector gives up a little after the trainer does, so the trainer's timeout (which restarts a
        # hung selector) is the one that fires
        result = self.selector.result.remote(slot.round, self.config.schedule.round_timeout_s + RESULT_MARGIN_S)
        summary_s = time.perf_counter() - start
        self.summary_s += summary_s
        self.pending = PendingRound(slot, plan.strategy, ground, request, result, epoch, time.perf_counter(), summary_s)

    def _chunk_rows(self, plan: StrategyPlan) -> int:
        examples = self.config.schedule.chunk_examples
        return max(1, examples // self.config.train.batch_size) if plan.summaries == "batch" else examples

    def _stream(self, round_id: int, plan: StrategyPlan, ground: Ground, chunk_rows: int) -> None:
        """Send the summaries chunk by chunk as they are computed (the selector may start early)."""
        if plan.summaries == "batch":
            for index, (ids, labels, rows) in enumerate(
                    batch_summaries(self.model, self.x, self.y, ground.batches, chunk_rows, self.device)):
                self.selector.add_chunk.remote({"round_id": round_id, "chunk_index": index, "ids": ids.numpy(),
                                                "labels": labels.cpu().numpy(), "rows": rows.numpy()})
        elif plan.summaries == "example":
            for index, (ids, labels, errors, features) in enumerate(
                    example_summaries(self.model, self.x, self.y, chunk_rows, self.device)):
                self.selector.add_chunk.remote({"round_id": round_id, "chunk_index": index, "ids": ids.numpy(),
                                                "labels": labels.numpy(), "errors": errors.numpy(),
                                                "features": features.numpy()})
        if plan.needs_validation:
            logits, features = validation_view(self.model, self.splits.val_x, self.config.schedule.chunk_examples,
                                               self.device)
            self.selector.add_validation.remote({"round_id": round_id, "logits": logits.numpy(),
                                                 "features": features.numpy(),
                                                 "labels": self.splits.val_y.numpy()})

    def _resend_config(self) -> None:
        """After a selector failure, give the (restarted) selector the scheduled strategy again."""
        if self.resend_config is None or not self.selector_failed:
            return
        try:
            ray.get(self.selector.reconfigure.remote(self.resend_config.model_dump()), timeout=CALL_TIMEOUT_S)
            self.selector_failed = False
        except (RayError, GetTimeoutError) as exc:
            log.warning("reconfigure after a selector failure failed: %s", _first_line(exc))

    def _try_adopt(self, epoch: int, wait: bool) -> None:
        pending = self.pending
        remaining = self.config.schedule.round_timeout_s - (time.perf_counter() - pending.started)
        start = time.perf_counter()
        with self.meter.phase("stall"):
            ready, _ = ray.wait([pending.result], timeout=max(0.0, remaining) if wait else 0)
        if wait:
            stall = time.perf_counter() - start
            pending.stall_s += stall
            self.stall_s += stall
        if not ready:
            self._check_timeout()
            return
        self.pending = None
        try:
            payload = ray.get(pending.result, timeout=CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            self.selector_failed = True
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
        self.subset = self._subset(pending.ground, message.indices, message.weights, message.round_id)
        self.ever_selected[torch.cat(self.subset.batches)] = True
        self._record_round(
            pending, "adopted", adopted_epoch=epoch, staleness=epoch - pending.trigger_epoch,
            selector_s=message.busy_s, select_s=message.select_s, grad_error=message.grad_error,
            target=message.target, subset_size=self.subset.n_examples, n_padded=message.n_padded,
        )

    def _check_timeout(self) -> None:
        pending = self.pending
        if time.perf_counter() - pending.started >= self.config.schedule.round_timeout_s:
            self.pending = None
            # a selector that does not answer is hung: restart it so the next round has a fresh one
            ray.kill(self.selector, no_restart=False)
            self.selector_failed = True
            self._record_round(pending, "timeout", reason=f"no answer within {self.config.schedule.round_timeout_s} s; "
                                                          "selector restarted")

    def _finish_pending(self) -> None:
        """At the end: the round still out is unused, rounds never started are skipped."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._record_round(pending, "unused", reason="training ended before the subset was adopted")
        self._skip_overdue(self.epoch_plan.total)

    # records -----------------------------------------------------------------------------------
    def _record_round(self, pending: PendingRound, status: str, **fields) -> None:
        if status != "adopted":
            log.warning("round %d %s: %s", pending.slot.round, status, fields.get("reason"))
        record = RoundRecord(
            round=pending.slot.round, strategy=pending.strategy, model_step=pending.request.model_step,
            trigger_epoch=pending.trigger_epoch, due_epoch=pending.slot.due, status=status,
            stall_s=pending.stall_s, summary_s=pending.summary_s, **fields,
        )
        self._append_round(record)

    def _append_round(self, record: RoundRecord) -> None:
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
        errors = [r["grad_error"] for r in rounds if r["grad_error"] is not None]
        summary = RunSummary(
            strategy=self.config.selector.strategy, dataset=self.splits.name, model=self.config.model.name,
            budget=self.config.schedule.budget, epochs=self.config.train.epochs,
            epochs_full=self.epoch_plan.full, epochs_subset=self.epoch_plan.subset,
            epochs_run=len(self._progress.epochs), acc=test_acc,
            wall_s=wall_s, stall_s=self.stall_s, selector_busy_s=self.selector_busy_s, summary_s=self.summary_s,
            overlap=(1.0 - self.stall_s / self.selector_busy_s) if self.selector_busy_s > 0 else None,
            rounds=adopted, rounds_rejected=sum(r["status"] in ("rejected", "failed", "timeout") for r in rounds),
            grad_error=float(np.mean(errors)) if errors else None,
            redundant=(1.0 - float(self.ever_selected.float().mean())) if adopted else None,
            steps=self.steps, energy_j=self._energy_j(energy), energy_note=energy.note, ray_address="",
            energy_phases={name: reading.energy_j for name, reading in self.meter.phases().items()},
            device=str(self.device), time_budget_s=self.plan.time_budget_s, imbalance=self.splits.imbalance,
            strategy_changes=self.applied_changes, n_train=self.n_train,
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
