"""One job on the connected Ray: place the selector and the trainer, follow the run, write its files.

``execute`` is what ``python -m trainer.run`` and the experiment runner call once Ray is connected
(``trainer.client.cluster.connect_ray``): it writes ``config.json``, starts the selector
(``trainer.client.cluster.start_selector``) and the trainer actor (``trainer.builtin.actor``, or with
``--workers N`` the Ray Train run of ``trainer.builtin.distributed``), streams the records to whole-line JSONL
files (and to TensorBoard and Ray metrics, ``trainer.client.watch``) and writes ``summary.json`` atomically
(``trainer.files``).
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
from trainer.client.cluster import actor_options, release, start_selector
from trainer.client.watch import Watch
from trainer.files import RecordFile, write_json

PROGRESS_TIMEOUT_S = 600.0  # the first progress call waits for the trainer to build its model
POLL_S = 0.5


def start_actors(config: RunConfig, options: dict, splits, out: Path | None, resume: bool):
    """The selector and the trainer: one trainer actor, or with ``--workers N`` the handle on a Ray Train run
    (``trainer.builtin.distributed``), which answers the same calls. A cluster that cannot hold the run's
    workers raises ``ClusterRefused`` first. The config crosses to the actors as the typed object."""
    problem = check_cluster(config, ray.cluster_resources())
    if problem:
        raise ClusterRefused(problem)
    actor = DistributedTrainerActor if config.train.workers > 1 else TrainerActor
    selector = start_selector(config.selector, options)
    # the Ray Train workers ask for their own CPUs or GPUs; their handle here needs none
    trainer_options = options if config.train.workers <= 1 else {"num_cpus": 0, "num_gpus": 0}
    trainer = actor.options(**trainer_options).remote(config, selector, splits, str(out) if out else None, resume)
    return selector, trainer


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


def start_stop(clock: StepClock | None, began: float, ended: float) -> dict:
    """``start_s`` (``began`` to the first step) and ``stop_s`` (the last step to ``ended``) from the trainer's
    ``clock`` instants; None where an instant is missing (a run that never trained)."""
    clock = clock or StepClock()
    first, last = clock.first_step_at, clock.last_step_at
    return {"start_s": None if first is None else max(0.0, first - began),
            "stop_s": None if last is None else max(0.0, ended - last)}


def execute(config: RunConfig, out: Path, show_progress: bool = True, options: dict | None = None,
            resume: bool = False, stopper=None, splits=None, began: float | None = None) -> dict:
    """Run one job on the connected Ray: write ``out`` (config, records, checkpoints, model, summary).

    Returns the summary; its ``status`` says whether the run completed, was interrupted or failed. Its
    ``start_s`` counts from ``began`` (a ``time.time()``: the command's start; default: this call), its
    ``stop_s`` to the actors' release (a caller that then shuts Ray down adds that, ``finish_stop``).
    """
    began = time.time() if began is None else began
    if not resume:
        write_json(out / "config.json", config.model_dump(mode="json"))
    options = dict(actor_options(config.train.device) if options is None else options)
    group = options.pop("placement_group", None)
    actors = ()
    watch = Watch(config.tensorboard, config.selector.strategy, rewrite=resume)
    try:
        actors = start_actors(config, options, splits, out, resume)
        if stopper is not None:
            stopper.attach(actors[1])
        result = follow(actors[1], out, show_progress, watch)
        summary = result.summary.model_dump()
        watch.harmful(summary.get("harmful", []))
    finally:
        watch.close()
        release(*actors, group=group)
    summary.update(start_stop(result.clock, began, time.time()))
    if cluster.connection is not None and summary.get("ray") is None:
        summary["ray"] = cluster.connection.describe()
    write_json(out / "summary.json", summary)
    return summary


def finish_stop(summary: dict, out: Path, seconds: float) -> dict:
    """Add ``seconds`` spent after ``execute`` returned (shutting the private Ray down) to ``stop_s`` and write
    ``summary.json`` again."""
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
