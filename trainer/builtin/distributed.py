"""Data-parallel training with Ray Train (``--workers N``).

N Ray Train workers (``ray.train.torch.TorchTrainer``: gloo on CPU, NCCL on GPU) each hold a replica of the
model wrapped in ``DistributedDataParallel``. Every step is one mini-batch of the adopted weighted subset,
whole: each worker computes the loss of its share of that batch's examples, with weights scaled so that DDP's
mean of the workers' gradients is exactly the gradient of the batch's weighted mean loss. So a run with N
workers takes the same steps, on the same batches, with the same learning rates as a run with one, computed
in parallel; the PB variants' fixed batches are never mixed with other batches.

Rank 0 is the only worker that talks to the selector (``trainer.client.api.AdaptiveSubset`` makes it the leader,
``trainer.client.group`` holds the ranks' side): it runs the rounds, and at every epoch boundary it broadcasts the subset in force to the other ranks when it
changed. Rank 0 also evaluates, records and checkpoints. Checkpoints go through Ray Train
(``ray.train.report`` with a ``Checkpoint``) into ``<run dir>/train/checkpoint_*``; a run started again with
the same run directory (``--resume DIR``) is restored by Ray Train from the latest one.

On the driver's side ``DistributedTrainerActor`` stands where ``trainer.builtin.actor.TrainerActor`` stands for
one worker: it runs ``TorchTrainer.fit`` and answers ``progress`` and ``request_stop`` from what rank 0 pushes to
it at every epoch end, so progress bars, records, signals and summaries work as with one worker.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from protocol.config import FULL_EARLYSTOP, RunConfig
from protocol.errors import RunFailed, one_line
from protocol.receipts import Accepted, Rejection
from protocol.records import Progress, RunResult
from trainer.builtin.core import MODEL, Trainer, atomic_save, load_checkpoint
from trainer.client.group import Group
from trainer.client.schedule import CheckedConfig, plan_epochs, run_config
from trainer.data.splits import load_splits

TRAIN_NAME = "train"  # Ray Train's run name: checkpoints live in <run dir>/train/
CALL_TIMEOUT_S = 60.0
DATA_TIMEOUT_S = 600.0
PLACE_TIMEOUT_S = 300.0  # the Ray Train workers must have started by then
log = logging.getLogger(__name__)



class TrainStore:
    """Checkpoints as Ray Train ``Checkpoint``s; every rank calls ``save`` (``ray.train.report`` is collective),
    rank 0 with the state. The final weights are kept for the driver, which writes ``model.pt``."""

    keeps = True

    def __init__(self, group: Group):
        self.group = group
        self.model_state: dict | None = None

    def save(self, state: dict | None, epoch: int) -> None:
        import ray.train

        if state is None:
            ray.train.report({"epoch": epoch}, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="gradmatch-ckpt-") as tmp:
            torch.save(state, Path(tmp) / "checkpoint.pt")
            ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def load(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / "checkpoint.pt")

    def save_model(self, state: dict) -> None:
        self.model_state = state


def latest_checkpoint(run: Path) -> Path | None:
    """The newest ``checkpoint.pt`` Ray Train stored for the run in ``run`` (by the time in its folder's name,
    ``checkpoint_YYYY-MM-DD_HH-MM-SS.ffffff``), or None."""
    folders = sorted((run / TRAIN_NAME).glob("checkpoint_*"))
    files = [f / "checkpoint.pt" for f in folders if (f / "checkpoint.pt").is_file()]
    return files[-1] if files else None


# --- the worker's loop --------------------------------------------------------------------------------

def train_loop(setup: dict) -> None:
    """One Ray Train worker: build the trainer on this rank and train; rank 0 hands the result to the driver."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    group = Group(context.get_world_rank(), context.get_world_size())
    config = setup["config"]
    torch.set_num_threads(worker_threads(run_config(config)))
    device = ray.train.torch.get_device()
    splits = ray.get(setup["splits"], timeout=DATA_TIMEOUT_S)
    sink = setup["sink"]
    ray.get(sink.started.remote(group.rank, ray.get_runtime_context().get_node_id()), timeout=CALL_TIMEOUT_S)
    store = TrainStore(group)
    resume = ray.train.get_checkpoint() is not None
    trainer = Trainer(config, splits, setup["selector"] if group.leader else None, device, store=store,
                      resume=resume, group=group, on_epoch=_pusher(sink) if group.leader else None)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if group.leader:
        ray.get(sink.finish.remote(result, store.model_state), timeout=DATA_TIMEOUT_S)


def _pusher(sink):
    """Rank 0's epoch-end call: push the records not yet pushed; returns a stop request, if any."""
    seen = {"epochs": 0, "rounds": 0}

    def push(trainer) -> str | None:
        state = trainer.progress(seen["epochs"], seen["rounds"])
        seen["epochs"] += len(state.epochs)
        seen["rounds"] += len(state.rounds)
        answer = ray.get(sink.push.remote(state), timeout=CALL_TIMEOUT_S)
        return answer.rule if isinstance(answer, Rejection) else None

    return push


# --- the driver's side --------------------------------------------------------------------------------

def worker_resources(config: RunConfig, cluster: dict | None = None) -> tuple[bool, dict]:
    """``(use_gpu, resources per worker)``: one GPU each when asked for (or ``auto`` and the cluster has one per
    worker), else ``train.worker_cpus`` CPUs each."""
    train = config.train
    gpus = (ray.cluster_resources() if cluster is None else cluster).get("GPU", 0)
    use_gpu = train.device.startswith("cuda") or (train.device == "auto" and gpus >= train.workers)
    return use_gpu, {"CPU": train.worker_cpus, **({"GPU": 1} if use_gpu else {})}


class ClusterRefused(RunFailed):
    """The connected cluster lacks what the run's workers ask for (``check_cluster``); nothing was started."""


def check_workers(config: RunConfig) -> str | None:
    """Why ``--workers`` cannot run with this config, or None: checked once per run, before Ray starts (the
    command line's ``prepare``, the experiment runner's trial)."""
    log.debug("check_workers: %d workers", config.train.workers)
    train = config.train
    if train.workers <= 1:
        return None
    if config.selector.strategy == FULL_EARLYSTOP:
        return (f"--workers {train.workers}: full-earlystop stops on a wall-time budget in the middle of an epoch, "
                "which data-parallel workers cannot agree on step by step; use --workers 1")
    if train.workers > train.batch_size:
        return (f"--workers {train.workers}: more workers than the {train.batch_size} examples of a mini-batch "
                f"(--batch-size); each worker trains on a share of every batch")
    return None


def check_cluster(config: RunConfig, cluster: dict) -> str | None:
    """Why the cluster (``ray.cluster_resources()``) cannot hold the run's summary workers or data-parallel
    workers, or None: checked once per run, once Ray is joined and before anything is placed (``trainer.launch``,
    through ``trainer.client.cluster.start_service``)."""
    log.debug("check_cluster: %s", cluster)
    train, n_summary = config.train, config.schedule.summary_workers
    if n_summary > max(1, int(cluster.get("CPU", 0))):
        return (f"--summary-workers {n_summary}: more summary workers than the {cluster.get('CPU', 0):g} CPUs of the "
                "cluster; each is a process making forward passes, so more would only share the cores")
    if train.workers <= 1:
        return None
    use_gpu, per_worker = worker_resources(config, cluster)
    for name, amount in per_worker.items():
        need = amount * train.workers
        if cluster.get(name, 0) + 1e-9 < need:
            return (f"--workers {train.workers}: needs {need:g} {name} ({amount:g} per worker), the cluster has "
                    f"{cluster.get(name, 0):g}")
    return None


class DistributedTrainerService:
    """The driver's handle on a Ray Train run: same calls as ``trainer.builtin.actor.TrainerService``."""

    def __init__(self, config: RunConfig | CheckedConfig, selector, splits, out: str | None, resume: bool = False):
        self.given, self.config = config, run_config(config)  # each rank's Trainer gets what was given
        self.selector, self.out = selector, Path(out).resolve() if out else None
        self.splits = ray.put(splits) if splits is not None else None
        self.resume = resume
        self._lock = threading.Lock()
        total = plan_epochs(self.config.train.epochs, self.config.schedule.kappa, self.config.schedule.budget,
                            True).total  # refined by rank 0's first push
        self._state = Progress(total=total)
        self._stop: str | None = None
        self._result = self._model = None
        self._started = threading.Event()
        self._nodes: dict[int, str] = {}

    def run(self) -> RunResult:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        if self.out is None:
            raise RunFailed("--workers needs a run directory (--out) for Ray Train's checkpoints")
        if self.splits is None:
            self.splits = ray.put(load_splits(self.config.data, self.config.seed))
        use_gpu, per_worker = worker_resources(self.config)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"config": self.given, "splits": self.splits,
                               "selector": self.selector, "sink": ray.get_runtime_context().current_actor},
            scaling_config=ScalingConfig(num_workers=self.config.train.workers, use_gpu=use_gpu,
                                         resources_per_worker=per_worker),
            run_config=TrainRunConfig(name=TRAIN_NAME, storage_path=str(self.out),
                                      checkpoint_config=CheckpointConfig(num_to_keep=2),
                                      failure_config=FailureConfig(max_failures=0)),
        )
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # a worker failed: Ray Train's error names it
                failure.append(exc)

        thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
        thread.start()
        deadline = time.monotonic() + PLACE_TIMEOUT_S
        while thread.is_alive():
            thread.join(timeout=1.0)
            if not self._started.is_set() and time.monotonic() > deadline:
                free = ray.available_resources()
                raise RunFailed(f"--workers {self.config.train.workers}: the workers were not placed within "
                                f"{PLACE_TIMEOUT_S:g} s ({per_worker} each; free now: CPU {free.get('CPU', 0):g}, "
                                f"GPU {free.get('GPU', 0):g})")
        if failure:
            raise RunFailed(f"data-parallel training failed: {one_line(failure[0])}")
        if self._result is None:
            raise RunFailed("Ray Train finished without a result from rank 0")
        if self._model is not None:
            atomic_save(self._model, self.out / MODEL)
        workers = self.config.train.workers
        summary = self._result.summary.model_copy(update={
            "workers": workers, "worker_nodes": [self._nodes.get(rank, "") for rank in range(workers)]})
        return self._result.model_copy(update={"summary": summary})

    # rank 0 calls these ---------------------------------------------------------------------------
    def started(self, rank: int, node: str) -> None:
        self._nodes[rank] = node
        if rank == 0:
            self._started.set()

    def push(self, state: Progress) -> Accepted | Rejection:
        """Rank 0's records since its last push. Answers ``Accepted`` (train on), or, once the driver asked the run
        to stop, a ``Rejection`` of further epochs whose ``rule`` is the stop request."""
        if not isinstance(state, Progress):
            raise TypeError(f"state: a {type(state).__name__}, must be a protocol.records.Progress")
        with self._lock:
            mine = self._state
            self._state = Progress(epoch=state.epoch, total=state.total, loss=state.loss,
                                   val_acc=state.val_acc if state.val_acc is not None else mine.val_acc,
                                   epochs=mine.epochs + state.epochs, rounds=mine.rounds + state.rounds)
            stop = self._stop
        if stop is None:
            return Accepted()
        return Rejection(subject="further epochs", rule=stop)

    def finish(self, result: RunResult, model_state: dict | None) -> None:
        self._result, self._model = result, model_state

    # the driver calls these -----------------------------------------------------------------------
    def progress(self, n_epochs_seen: int = 0, n_rounds_seen: int = 0) -> Progress:
        with self._lock:
            s = self._state
            return s.model_copy(update={"epochs": s.epochs[n_epochs_seen:], "rounds": s.rounds[n_rounds_seen:]})

    def request_stop(self, reason: str, sent_at: float | None = None) -> None:
        self._stop = reason  # rank 0 stops at the end of its epoch in progress (Trainer.on_epoch)


DistributedTrainerActor = ray.remote(num_cpus=0, num_gpus=0, max_concurrency=4)(DistributedTrainerService)


def worker_threads(config: RunConfig) -> int:
    """torch threads per worker: ``--threads``, else the worker's CPUs (at least one)."""
    return config.train.threads or max(1, math.floor(config.train.worker_cpus))
