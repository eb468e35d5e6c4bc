"""One job on the connected Ray: place the selector and the trainer, follow the run, write its files.

``execute`` is what ``python -m trainer.run`` calls with the selector it started
(``trainer.client.cluster.start_service``, with ``cluster_check``), and the experiment runner on its connected
Ray (then ``execute`` starts the selector itself): it writes ``config.json``, starts the trainer actor
(``trainer.builtin.actor``, or with ``--workers N`` the Ray Train run of ``trainer.builtin.distributed``) beside
the selector, streams the records to whole-line JSONL files (and to TensorBoard and Ray metrics,
``trainer.client.watch``) and writes ``summary.json`` atomically (``trainer.files``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray
from tqdm import tqdm

from protocol.config import RunConfig
from protocol.errors import RunFailed
from protocol.records import Progress, RunResult, StepClock
from trainer.builtin.actor import TrainerActor
from trainer.builtin.distributed import ClusterRefused, DistributedTrainerActor, check_cluster
from trainer.client import cluster
from trainer.client.cluster import Service, release, start_service
from trainer.client.schedule import CheckedConfig, run_config
from trainer.client.watch import Watch
from trainer.files import RecordFile, write_json

PROGRESS_TIMEOUT_S = 600.0  # the first progress call waits for the trainer to build its model
POLL_S = 0.5
STATUS_TIMEOUT_S = 30.0  # the selector's status, asked once at the end of a run


def cluster_check(config: RunConfig):
    """The ``check`` of ``start_service`` for a run: ``ClusterRefused`` when the cluster cannot hold the run's
    summary workers or data-parallel workers (``check_cluster``), before anything is placed."""
    def check(resources: dict) -> None:
        problem = check_cluster(config, resources)
        if problem:
            raise ClusterRefused(problem)

    return check


def start_trainer(config: RunConfig | CheckedConfig, service: Service, splits, out: Path | None, resume: bool):
    """The trainer beside the service's selector: one trainer actor, or with ``--workers N`` the handle on a Ray
    Train run (``trainer.builtin.distributed``), which answers the same calls. The config crosses to the actor as
    the typed object (checked by the command line: a ``CheckedConfig``, which the trainer's client does not check
    again)."""
    workers = run_config(config).train.workers
    actor = DistributedTrainerActor if workers > 1 else TrainerActor
    # the Ray Train workers ask for their own CPUs or GPUs; their handle here needs none
    trainer_options = service.options if workers <= 1 else {"num_cpus": 0, "num_gpus": 0}
    return actor.options(**trainer_options).remote(config, service.selector, splits, str(out) if out else None,
                                                   resume)


def process_started_at() -> float | None:
    """When this process started, as a ``time.time()`` (Linux: /proc, to 10 ms); None where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def selector_gpu_peak(selector) -> int | None:
    """The selector's GPU memory peak (its status' ``gpu_peak_bytes``); None on the CPU, or when the selector does
    not answer within ``STATUS_TIMEOUT_S`` (a lost selector does not fail a run that has ended)."""
    try:
        return ray.get(selector.status.remote(), timeout=STATUS_TIMEOUT_S).gpu_peak_bytes
    except ray.exceptions.RayError:
        return None


def start_stop(clock: StepClock | None, began: float, ended: float) -> dict:
    """``start_s`` (``began`` to the first step) and ``stop_s`` (the last step to ``ended``) from the trainer's
    ``clock`` instants; None where an instant is missing (a run that never trained)."""
    clock = clock or StepClock()
    first, last = clock.first_step_at, clock.last_step_at
    return {"start_s": None if first is None else max(0.0, first - began),
            "stop_s": None if last is None else max(0.0, ended - last)}


def execute(config: RunConfig | CheckedConfig, out: Path, show_progress: bool = True, options: dict | None = None,
            resume: bool = False, stopper=None, splits=None, began: float | None = None,
            service: Service | None = None) -> dict:
    """Run one job on the connected Ray: write ``out`` (config, records, checkpoints, model, summary).

    ``service``: the running selector (``start_service``), which the caller closes; without one, a selector is
    started here on the connected Ray (placed by ``options`` when given, after ``cluster_check``) and closed
    before this returns. Returns the summary; its ``status`` says whether the run completed, was interrupted or
    failed. Its ``start_s`` counts from ``began`` (a ``time.time()``: the command's start; default: this call),
    its ``stop_s`` to the release of the actors started here (a caller that then closes its service adds that,
    ``finish_stop``).
    """
    began = time.time() if began is None else began
    run = run_config(config)
    if not resume:
        write_json(out / "config.json", run.model_dump(mode="json"))
    own = service is None
    if own:
        service = start_service(run.selector, device=run.train.device, options=options, check=cluster_check(run))
    trainer = watch = None
    try:
        watch = Watch(run.tensorboard, run.selector.strategy, rewrite=resume)
        trainer = start_trainer(config, service, splits, out, resume)
        if stopper is not None:
            stopper.attach(trainer)
        result = follow(trainer, out, show_progress, watch)
        summary = result.summary.model_dump()
        summary["selector_gpu_peak_bytes"] = selector_gpu_peak(service.selector)
        watch.harmful(summary.get("harmful", []))
    finally:
        if watch is not None:
            watch.close()
        release(trainer)
        if own:
            service.close()
    summary.update(start_stop(result.clock, began, time.time()))
    if cluster.connection is not None and summary.get("ray") is None:
        summary["ray"] = cluster.connection.describe()
    write_json(out / "summary.json", summary)
    return summary


def finish_stop(summary: dict, out: Path, seconds: float) -> dict:
    """Add ``seconds`` spent after ``execute`` returned (closing the service: the selector, the private Ray) to
    ``stop_s`` and write ``summary.json`` again."""
    if summary.get("stop_s") is not None:
        summary["stop_s"] += seconds
        write_json(out / "summary.json", summary)
    return summary


def follow(trainer, out: Path, show_progress: bool = True, watch: Watch | None = None) -> RunResult:
    """Wait for the run, streaming its records to ``out``, to ``watch`` (TensorBoard, Ray metrics) and a progress
    bar to the terminal."""
    result_ref = trainer.run.remote()
    seen_epochs = seen_rounds = 0
    files = ()  # opened at the first answer: by then a resumed trainer has read and checked its checkpoint
    try:
        with tqdm(unit="epoch", desc="training", dynamic_ncols=True, file=sys.stderr, disable=not show_progress) as bar:
            while True:
                ready, _ = ray.wait([result_ref], timeout=POLL_S)
                state = ray.get(trainer.progress.remote(seen_epochs, seen_rounds), timeout=PROGRESS_TIMEOUT_S)
                try:
                    if not files:  # a resumed run's records come back whole and replace the old files
                        files = (RecordFile.replacing(out / "epochs.jsonl", state.epochs),
                                 RecordFile.replacing(out / "rounds.jsonl", state.rounds))
                        seen_epochs, seen_rounds = len(state.epochs), len(state.rounds)
                    else:
                        seen_epochs += files[0].append(state.epochs)
                        seen_rounds += files[1].append(state.rounds)
                except RunFailed:
                    trainer.request_stop.remote("a record could not be written")
                    raise
                if watch is not None:
                    watch.epochs(state.epochs)
                    watch.rounds(state.rounds)
                bar.total = state.total
                bar.update(state.epoch - bar.n)
                bar.set_postfix(_postfix(state), refresh=False)
                for record in state.rounds:
                    if record["status"] != "adopted":
                        bar.write(f"round {record['round']} {record['status']}: {record['reason']}")
                if ready:
                    return ray.get(result_ref, timeout=PROGRESS_TIMEOUT_S)
    finally:
        for handle in files:
            handle.close()


def _postfix(state: Progress) -> dict:
    postfix = {"loss": f"{state.loss:.3f}" if state.loss is not None else "-"}
    if state.val_acc is not None:
        postfix["val_acc"] = f"{state.val_acc:.1f}"
    return postfix
