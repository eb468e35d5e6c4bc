"""What a run writes: per-epoch metrics, one record per selection round, and the summary; and what the trainer
actor answers: its ``Progress`` while it runs, its ``RunResult`` at the end."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from protocol.config import Strict


class EpochRecord(Strict):

    epoch: int
    phase: Literal["full", "subset"]
    steps: int = Field(description="optimizer steps taken so far")
    n_examples: int = Field(description="examples trained on in this epoch")
    loss: float
    lr: float
    train_s: float = Field(description="seconds of training, summary passes and stalls in this epoch")
    wall_s: float = Field(description="wall time so far, evaluation excluded")
    val_acc: float | None = None
    subset_round: int | None = Field(None, description="round whose subset was trained on (None: initial)")


class RoundRecord(Strict):
    round: int
    strategy: str = Field(description="the strategy the round was asked of")
    model_step: int = Field(description="step of the model snapshot the round was computed from")
    trigger_epoch: int
    due_epoch: int
    adopted_epoch: int | None = None
    status: Literal["adopted", "rejected", "failed", "timeout", "unused", "skipped"]
    reason: str | None = None
    staleness: int | None = Field(None, description="epochs between the snapshot and adoption")
    stall_s: float = 0.0
    summary_s: float = Field(0.0, description="seconds the trainer spent on the round's summaries")
    summary_where: Literal["trainer", "workers", "none"] = Field(
        "trainer", description="who made the summary pass: the trainer itself, or summary workers from a snapshot"
    )
    worker_s: float | None = Field(None, description="seconds of the slowest summary worker")
    worker_nodes: list[str] | None = Field(None, description="Ray node ids of the workers that made the chunks")
    selector_s: float | None = Field(None, description="seconds the selector worked on the round")
    select_s: float | None = Field(None, description="seconds of the strategy itself")
    selector_cpu_s: float | None = Field(
        None, description="CPU seconds of the selector's round thread (selector_s less the waits for a core)"
    )
    selector_preempted: int | None = Field(
        None, description="times the selector's round thread was preempted for another runnable thread (Linux)"
    )
    grad_error: float | None = Field(None, description="paper Eq. 1, absolute, with the raw weights (docs/metrics.md)")
    grad_error_rel: float | None = Field(None, description="grad_error relative to the norm of the target matched")
    grad_error_trained: float | None = Field(
        None, description="relative error of the subset as trained against the full training gradient"
    )
    target: str | None = Field(None, description="the gradient that was matched: train or val")
    subset_size: int | None = Field(None, description="examples in the adopted subset")
    n_ground: int | None = Field(None, description="elements the round chose from: the ground set or its --pool")
    n_padded: int | None = None


class Progress(Strict):
    """Where a run is, and its records the caller has not seen yet: the trainer actor's answer to ``progress``."""

    model_config = ConfigDict(allow_inf_nan=True)  # a diverged run's last loss is not finite

    epoch: int = Field(0, ge=0, description="epochs trained so far")
    total: int = Field(0, ge=0, description="epochs the run trains in all")
    loss: float | None = Field(None, description="the last epoch's mean training loss")
    val_acc: float | None = Field(None, description="the last validation accuracy measured")
    epochs: list[dict] = Field(default_factory=list, description="epoch records (EpochRecord dumps) not yet seen")
    rounds: list[dict] = Field(default_factory=list, description="round records (RoundRecord dumps) not yet seen")


class RunSummary(Strict):
    status: Literal["completed", "interrupted", "failed"] = Field(
        "completed", description="completed: every epoch trained; interrupted: stopped by a signal (resumable); "
        "failed: stopped by an error (reason)"
    )
    reason: str | None = Field(None, description="why the run did not complete")
    strategy: str
    dataset: str
    model: str
    budget: float
    epochs: int = Field(description="epoch budget T")
    epochs_full: int = Field(description="full-data epochs run (warm start or FULL)")
    epochs_subset: int
    epochs_run: int = Field(description="epochs actually trained (fewer when a time budget stopped the run)")
    n_train: int = Field(description="training examples (after any imbalance)")
    acc: float = Field(description="top-1 test accuracy at the end")
    wall_s: float
    stall_s: float
    selector_busy_s: float
    summary_s: float
    workers_busy_s: float = Field(0.0, description="seconds of the slowest summary worker, summed over rounds")
    overlap: float | None = Field(description="1 - stall_s / (selector_busy_s + workers_busy_s)")
    rounds: int = Field(description="rounds adopted")
    rounds_rejected: int = Field(description="rounds rejected, failed or timed out")
    rounds_skipped: int = Field(0, description="rounds not started because their boundary had passed")
    rounds_harmful: int = Field(0, description="adopted rounds the divergence guard undid (the training loss rose "
                                "above its bound for two epochs; the previous subset came back)")
    harmful: list[dict] = Field(default_factory=list, description="each undone round: round, epoch, loss_before, "
                                "loss, bound, fallback_round")
    notes: list[str] = Field(default_factory=list, description="warnings about the run (e.g. a model degenerate in "
                             "eval mode); the CLI prints each as a warning line")
    late_adoptions: int = Field(0, description="adopted rounds adopted after their due epoch")
    staleness: float | None = Field(None, description="mean epochs between snapshot and adoption, adopted rounds")
    selector_lost: str | None = Field(None, description="why selection stopped for good, if it did")
    grad_error: float | None = Field(
        None, description="mean gradient error, paper Eq. 1 absolute (Table 8), over adopted rounds"
    )
    grad_error_rel: float | None = Field(None, description="mean relative gradient error over adopted rounds")
    grad_error_trained: float | None = Field(
        None, description="mean relative gradient error of the subsets as trained, over adopted rounds"
    )
    redundant: float | None = Field(
        None, description="share of training examples never trained on in the whole run (paper Table 9)"
    )
    steps: int
    energy_j: float | None
    energy_note: str
    energy_phases: dict[str, float | None] = Field(
        default_factory=dict,
        description="joules in the trainer's training, summaries and stall phases; selection runs "
        "concurrently in the selector, so its energy is inside these (counters are machine-wide)",
    )
    ray_address: str
    ray: str | None = Field(None, description="which Ray the run used and why (set by the program that joined it)")
    device: str
    time_budget_s: float | None = None
    imbalance: dict | None = Field(None, description="rare classes and examples removed from each")
    strategy_changes: list[dict] = Field(default_factory=list, description="live strategy changes applied")
    workers: int = Field(1, description="data-parallel training workers (Ray Train); 1: one trainer actor")
    worker_nodes: list[str] = Field(default_factory=list, description="the Ray node of each training worker, by "
                                    "rank (with --workers N > 1)")
    start_s: float | None = Field(None, description="seconds from the command (python -m trainer.run: the process's "
                                  "start; a job of the experiment runner or a benchmark: its start) to the first "
                                  "training step")
    stop_s: float | None = Field(None, description="seconds from the last training step to the end: the last "
                                 "validation and checkpoint, the test evaluation, the summary, the actors and the "
                                 "private Ray released")
    selector_gpu_peak_bytes: int | None = Field(None, ge=0, description="the selector's GPU memory peak at the end "
                                                "of the run (its status' gpu_peak_bytes, asked by the driver); None "
                                                "on the CPU or where it could not be asked")


class StepClock(Strict):
    """When the run's first and last training steps were taken (``time.time()`` instants; None: no step), from
    which the driver counts ``RunSummary.start_s`` and ``stop_s``."""

    first_step_at: float | None = None
    last_step_at: float | None = None


class RunResult(Strict):
    """The trainer actor's answer to ``run``: the summary, the whole progress (every record) and the step clock.

    The driver (``trainer.launch.job``) adds ``start_s``, ``stop_s``, ``ray`` and ``selector_gpu_peak_bytes`` to the
    summary's dump and writes it as ``summary.json``."""

    summary: RunSummary
    progress: Progress
    clock: StepClock = Field(default_factory=StepClock)
