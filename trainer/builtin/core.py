"""The built-in trainer: a user of ``trainer.client.api.AdaptiveSubset`` like any other training loop.

``Trainer`` owns the model, the optimizer, the learning-rate schedule, evaluation, checkpoints and the records;
the rounds are the client's. ``trainer.builtin.actor.TrainerActor`` is its Ray shell.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from torch.utils.data import TensorDataset

from protocol.config import RunConfig
from protocol.errors import RunFailed, one_line
from protocol.records import EpochRecord, Progress, RunResult, RunSummary, StepClock
from trainer.builtin.energy import EnergyMeter
from trainer.builtin.models import build_model
from trainer.builtin.training import CosineSchedule, dominant_prediction, evaluate, make_optimizer, weighted_step
from trainer.client.api import AdaptiveSubset
from trainer.client.schedule import CheckedConfig, run_config
from trainer.data.splits import Splits, augment_batch
from trainer.files import atomic_write, plain

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
CHECKPOINT_VERSION = 1
DEGENERATE_SHARE = 0.9  # eval-mode predictions this concentrated on one class are reported
LEARNED_FRACTION = 0.5  # ... while the training loss is under this fraction of ln C (the model has learned)


def degenerate_note(epoch: int, cls: int, share: float, label_share: float, loss: float, n_classes: int) -> str | None:
    """The note for a model degenerate in eval mode, or None: its eval-mode predictions fall on one class (at least
    ``DEGENERATE_SHARE`` of them, a quarter more than the most common label) while it trains to a loss under
    ``LEARNED_FRACTION`` of chance (ln C). A model that has not learned yet (a loss near ln C) and predicts one
    class is untrained, not degenerate."""
    learned = math.isfinite(loss) and loss < LEARNED_FRACTION * math.log(max(2, n_classes))
    if share < DEGENERATE_SHARE or share <= label_share + 0.25 or not learned:
        return None
    return (f"eval mode: at epoch {epoch} the model predicts class {cls} for {100 * share:.0f} % of the validation "
            f"examples (the most common label is {100 * label_share:.0f} % of them) while it trains to a loss of "
            f"{loss:.3g}; the summaries and the test accuracy are computed in eval mode too. Likely cause: BatchNorm "
            "running statistics from too few steps (or batches too small); remedy: more full epochs (--kappa), a "
            "larger --batch-size, or a model without BatchNorm")


@dataclass
class RunState:
    """The trainer's own view of the run, read under its lock (``progress`` answers a ``Progress`` from it)."""

    epoch: int = 0
    total: int = 0
    loss: float | None = None
    val_acc: float | None = None
    epochs: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` that never leaves half a file (``trainer.files.atomic_write``)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, read as tensors and plain types only (``weights_only=True``: loading never runs code);
    a missing, truncated or corrupt file is a ``RunFailed`` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and OS errors alike
        raise RunFailed(f"cannot read checkpoint {path}: it is missing, truncated or corrupt ({one_line(exc)}); "
                        "resume from a copy or start the run again") from None
    if not isinstance(state, dict):
        raise RunFailed(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a checkpoint")
    return state


class FileStore:
    """Checkpoints as ``<out>/checkpoint.pt`` and the trained weights as ``<out>/model.pt`` (nothing without out)."""

    def __init__(self, out: str | Path | None):
        self.out = Path(out) if out else None
        self.keeps = self.out is not None  # without a run directory no checkpoint state is even built

    def save(self, state: dict | None, epoch: int) -> None:
        if self.out is not None and state is not None:
            atomic_save(state, self.out / CHECKPOINT)

    def load(self) -> dict:
        return load_checkpoint(self.out / CHECKPOINT)

    def save_model(self, state: dict) -> None:
        if self.out is not None:
            atomic_save(state, self.out / MODEL)


class Trainer:
    """Trains ``config.model`` on ``splits``, asking ``selector`` for subsets; writes checkpoints to ``out``.

    ``config``: a ``RunConfig``, or the ``CheckedConfig`` the command line made when it checked the schedule (the
    client then does not check it again).

    Data-parallel (``trainer.builtin.distributed``): ``group`` is this rank's place, ``store`` keeps the checkpoints,
    ``on_epoch(trainer)`` is called by rank 0 at every epoch end and may return a stop request. Only rank 0
    holds a ``selector``, evaluates, records and checkpoints; every rank takes the same steps.
    """

    def __init__(self, config: RunConfig | CheckedConfig, splits: Splits, selector, device: torch.device,
                 out: str | None = None, resume: bool = False, store=None, group=None, on_epoch=None):
        given, config = config, run_config(config)
        self.config, self.splits, self.device = config, splits, device
        self.store = store if store is not None else FileStore(out)
        self.group, self.on_epoch = group, on_epoch
        self.leader = group is None or group.leader
        torch.manual_seed(config.seed)
        self.model = build_model(config.model.name, splits.in_shape, splits.n_classes).to(device)
        self.step_model = self.model
        if group is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.x, self.y = splits.train_x.to(device), splits.train_y.to(device)
        self.n_train = int(self.y.shape[0])
        self.meter = EnergyMeter(use_gpu=device.type == "cuda")
        self.subset = AdaptiveSubset(  # finds and checks the classifier layer (the model's last nn.Linear)
            self.model, TensorDataset(self.x, self.y), config=given, n_classes=splits.n_classes,
            val_set=TensorDataset(splits.val_x.to(device), splits.val_y.to(device)), selector=selector,
            phase=self.meter.phase, group=group, watch=False,  # the driver watches (trainer.launch.job)
            on_round=self._on_round,
        )
        self.plan = self.subset.epoch_plan
        self.strategy_plan = self.subset.strategy_plan
        # augmentation draws: each rank its own stream (rank 0's is a single trainer's)
        self.generator = torch.Generator().manual_seed(config.seed + 1 + (group.rank if group else 0))
        self.optimizer = make_optimizer(self.model, config.train.lr, config.train.momentum, config.train.weight_decay)
        self.lr_schedule = CosineSchedule(self.optimizer, config.train.lr, config.train.lr_schedule,
                                          self.plan.nominal_total, self.subset.planned_steps, nominal=self.plan.nominal)
        self.eval_s = self.elapsed_s = 0.0
        self._progress = RunState(total=self.plan.total)
        self._lock = threading.Lock()
        self._stop_reason: str | None = None
        self._stop_epoch: int | None = None  # the epoch in progress when a stop request arrived
        self.notes: list[str] = []  # warnings for the summary (an actor's log does not reach the user)
        self._epoch_in_progress = 0  # the epoch a stop request arriving now is honoured after
        self.start_epoch = 0
        if resume:
            self._restore()
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

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> RunResult | None:
        """Train every epoch of the plan (or until stopped); return the ``RunResult`` (rank 0; None on the others)."""
        status, reason = "completed", None
        self.meter.start()
        try:
            self._train()
            if self._stop_reason is not None:
                status, reason = "interrupted", self._stop_reason
                if self._stop_epoch is not None:
                    reason += (f" during epoch {self._stop_epoch}; stopped at the end of epoch "
                               f"{len(self._progress.epochs) - 1}")
        except RunFailed as exc:
            status, reason = "failed", exc.reason
            log.error("run failed: %s", exc.reason)
        finally:
            energy = self.meter.stop()
        try:
            self._save_model()
        except RunFailed as exc:
            if status != "failed":
                status, reason = "failed", exc.reason
        return self._result(energy, status, reason) if self.leader else None

    def _train(self) -> None:
        start = time.perf_counter() - self.elapsed_s
        stop_after_s = self.strategy_plan.time_budget_s
        subset = self.subset  # summary passes made only to measure grad_error are not training time
        measured_before = subset.measure_s  # already out of elapsed_s when resumed
        wall = lambda: time.perf_counter() - start - self.eval_s - (subset.measure_s - measured_before)  # noqa: E731
        out_of_time = (lambda: wall() >= stop_after_s) if stop_after_s else None
        epoch_start = time.perf_counter()
        for epoch, batches in self.subset:
            self.lr_schedule.start_epoch(epoch, self.subset.step)
            lr = self.lr_schedule.lr
            loss = self._train_epoch(epoch, batches, out_of_time)
            self.subset.clock.last_step(again=True)  # a stop inside the epoch leaves the batches unfinished
            self.subset.report_loss(loss)
            train_s = time.perf_counter() - epoch_start
            if stop_after_s and epoch == 0 and self.config.train.lr_schedule == "epoch":
                # FULL-EARLYSTOP anneals over the epochs its time budget affords, estimated from the first one
                self.lr_schedule.n_epochs = int(min(self.plan.total, max(1, stop_after_s // max(train_s, 1e-9))))
            stopped = out_of_time is not None and out_of_time()
            val_acc = self._maybe_validate(epoch, last=stopped)
            self.elapsed_s = wall()
            self._record_epoch(epoch, loss, lr, train_s, self.elapsed_s, val_acc)
            asked = self._stop_requested()  # every epoch: data-parallel ranks agree on it together
            self._epoch_in_progress = epoch + 1  # a request from now on stops after the next epoch
            last = stopped or epoch == self.plan.total - 1 or asked
            if last or (epoch + 1) % self.config.train.checkpoint_every == 0:
                self._timed_checkpoint()
            if last:
                break
            epoch_start = time.perf_counter()
        self.subset.finish()

    def _train_epoch(self, epoch: int, batches, out_of_time) -> float:
        """One epoch on the client's batches; returns the mean loss. A non-finite loss stops the run."""
        self.model.train()
        total, steps = 0.0, 0
        for x, y, w in batches:
            if self.splits.augment:
                x = augment_batch(x, self.generator)
            value = float(weighted_step(self.step_model, self.optimizer, x, y, w,
                                        reduce=self.group.mean if self.group is not None else None))
            if not math.isfinite(value):
                raise RunFailed(f"the training loss became {value} at epoch {epoch}, step {self.subset.step}: "
                                f"lower the learning rate (--lr {self.config.train.lr:g}) or check the data for "
                                "NaN/inf values", epoch=epoch)
            self.lr_schedule.after_step(self.subset.step + 1)
            total += value
            steps += 1
            if out_of_time is not None and out_of_time():
                break
        return total / max(steps, 1)

    def _maybe_validate(self, epoch: int, last: bool = False) -> float | None:
        last = last or epoch == self.plan.total - 1
        if not self.leader or (not last and (epoch + 1) % self.config.train.eval_every):
            return None
        start = time.perf_counter()
        acc = evaluate(self.model, self.splits.val_x.to(self.device), self.splits.val_y.to(self.device))
        self._check_degenerate(epoch)
        self.eval_s += time.perf_counter() - start
        return acc

    def _check_degenerate(self, epoch: int) -> None:
        """Once per run: a model whose eval-mode predictions fall on one class, though the labels do not, is
        degenerate in eval mode, and so are the summaries (made in eval mode) and the test accuracy."""
        if any(note.startswith("eval mode") for note in self.notes):
            return
        val_y = self.splits.val_y
        label_share = float(torch.bincount(val_y).max()) / max(1, val_y.numel())
        cls, share = dominant_prediction(self.model, self.splits.val_x.to(self.device))
        loss = self._progress.loss if self._progress.loss is not None else float("nan")
        note = degenerate_note(epoch, cls, share, label_share, loss, self.splits.n_classes)
        if note is not None:
            self.notes.append(note)
            log.warning("%s", note)

    def request_stop(self, reason: str, sent_at: float | None = None) -> None:
        """Stop at the end of the epoch in progress, after a checkpoint (a signal's handler calls this).

        ``sent_at``: the sender's ``time.time()``, so the reason says how long the request took to arrive."""
        if self._stop_reason is None:
            self._stop_epoch = self._epoch_in_progress
            if sent_at is not None:
                reason += f" (delivered in {max(0.0, time.time() - sent_at):.2f} s)"
        self._stop_reason = reason

    def _stop_requested(self) -> bool:
        """Whether to stop at this epoch end; data-parallel ranks all follow rank 0's answer."""
        if self.on_epoch is not None:
            reason = self.on_epoch(self)
            if reason is not None and self._stop_reason is None:
                self._stop_reason = reason
        if self.group is None:
            return self._stop_reason is not None
        stop = self.group.any(self._stop_reason is not None)
        if stop and self._stop_reason is None:
            self._stop_reason = "stopped by rank 0"
        return stop

    # checkpoints -------------------------------------------------------------------------------
    def _timed_checkpoint(self) -> None:
        """A checkpoint; its time is left out of the wall time, like evaluation."""
        began = time.perf_counter()
        self.checkpoint()
        self.eval_s += time.perf_counter() - began

    def checkpoint(self) -> None:
        """Hand the state to the store (every rank calls this; only rank 0's state is kept)."""
        if self.store.keeps:
            self.store.save(self._state() if self.leader else None, self.subset.epoch)

    def _state(self) -> dict:
        with self._lock:
            epochs = plain(list(self._progress.epochs))  # tensors and plain types: loads with weights_only=True
        state = {
            "version": CHECKPOINT_VERSION, "config": self.config.model_dump(mode="json"),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule_epochs": self.lr_schedule.n_epochs, "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "selection": self.subset.state_dict(), "epochs": epochs,
            "elapsed_s": self.elapsed_s,
        }
        return state

    def _restore(self) -> None:
        state = self.store.load()
        if state is None:
            return
        if state.get("version") != CHECKPOINT_VERSION:
            raise RunFailed(f"checkpoint version {state.get('version')!r}, must be {CHECKPOINT_VERSION}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.n_epochs = state["schedule_epochs"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.subset.load_state_dict(state["selection"])
        self.elapsed_s = state["elapsed_s"]
        with self._lock:
            self._progress.epochs = list(state["epochs"])
            self._progress.rounds = list(self.subset.records)
            self._progress.epoch = self.subset.epoch

    def _save_model(self) -> None:
        """``model.pt``: the trained weights as a plain ``state_dict`` (``torch.load(..., weights_only=True)``)."""
        if not self.leader:
            return
        if any(not torch.isfinite(p).all() for p in self.model.state_dict().values() if p.is_floating_point()):
            log.error("the model holds non-finite weights; %s not written", MODEL)
            return
        self.store.save_model({k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    # records -----------------------------------------------------------------------------------
    def _on_round(self, record: dict) -> None:
        with self._lock:
            self._progress.rounds.append(record)

    def _record_epoch(self, epoch, loss, lr, train_s, wall_s, val_acc) -> None:
        subset = self.subset.subset
        record = EpochRecord(
            epoch=epoch, phase="full" if epoch < self.plan.full else "subset", steps=self.subset.step,
            n_examples=subset.n_examples, loss=loss, lr=lr, train_s=train_s, wall_s=wall_s, val_acc=val_acc,
            subset_round=subset.round if epoch >= self.plan.full else None,
        )
        with self._lock:
            p = self._progress
            p.epoch, p.loss = epoch + 1, loss
            p.val_acc = val_acc if val_acc is not None else p.val_acc
            p.epochs.append(record.model_dump())

    def progress(self, n_epochs_seen: int = 0, n_rounds_seen: int = 0) -> Progress:
        """The state of the run and the records not yet seen by the caller."""
        with self._lock:
            p = self._progress
            return Progress(epoch=p.epoch, total=p.total, loss=p.loss, val_acc=p.val_acc,
                            epochs=p.epochs[n_epochs_seen:], rounds=p.rounds[n_rounds_seen:])

    def _energy_j(self, total) -> float | None:
        """Joules of the measured phases (training, summaries, stall): evaluation excluded, as in wall_s."""
        phases = [reading.energy_j for reading in self.meter.phases().values()]
        if phases and all(j is not None for j in phases):
            return float(sum(phases))
        return total.energy_j

    def _result(self, energy, status: str, reason: str | None) -> RunResult:
        rounds = self.subset.summary()
        test_acc = evaluate(self.model, self.splits.test_x.to(self.device), self.splits.test_y.to(self.device))
        if not all(bool(torch.isfinite(p.detach()).all()) for p in self.model.parameters()):
            test_acc = float("nan")
        with self._lock:
            n_epochs = len(self._progress.epochs)
        summary = RunSummary(
            status=status, reason=reason,
            strategy=self.config.selector.strategy, dataset=self.splits.name, model=self.config.model.name,
            budget=self.config.schedule.budget, epochs=self.config.train.epochs,
            epochs_full=self.plan.full, epochs_subset=self.plan.subset, epochs_run=n_epochs,
            acc=test_acc if math.isfinite(test_acc) else 0.0, wall_s=self.elapsed_s,
            stall_s=rounds["stall_s"], selector_busy_s=rounds["selector_busy_s"], summary_s=rounds["summary_s"],
            workers_busy_s=rounds["workers_busy_s"],
            overlap=rounds["overlap"], rounds=rounds["rounds"], rounds_rejected=rounds["rounds_rejected"],
            rounds_skipped=rounds["rounds_skipped"], late_adoptions=rounds["late_adoptions"],
            rounds_harmful=rounds["rounds_harmful"], harmful=rounds["harmful"], notes=list(self.notes),
            staleness=rounds["staleness"], selector_lost=rounds["selector_lost"], grad_error=rounds["grad_error"],
            grad_error_rel=rounds["grad_error_rel"], grad_error_trained=rounds["grad_error_trained"],
            redundant=rounds["redundant"] if self.strategy_plan.rounds else None,
            steps=self.subset.step, energy_j=self._energy_j(energy), energy_note=energy.note,
            ray_address=ray.get_runtime_context().gcs_address if ray.is_initialized() else "",
            energy_phases={name: reading.energy_j for name, reading in self.meter.phases().items()},
            device=str(self.device), time_budget_s=self.strategy_plan.time_budget_s, imbalance=self.splits.imbalance,
            strategy_changes=rounds["strategy_changes"], n_train=self.n_train,
        )
        clock = self.subset.clock  # the driver turns these instants into start_s and stop_s
        return RunResult(summary=summary, progress=self.progress(),
                         clock=StepClock(first_step_at=clock.first_step_at, last_step_at=clock.last_step_at))

    def close(self) -> None:
        self.subset.close()

