"""The Ray shell around ``Trainer``: loads the data where the actor runs and picks its device.

A threaded actor (``max_concurrency=3``) so ``progress`` and ``request_stop`` answer while ``run`` trains.
Resources and placement come from the caller's ``.options(...)``.
"""

from __future__ import annotations

import os

import ray
import torch

from protocol.config import RunConfig
from protocol.records import Progress, RunResult
from trainer.builtin.core import Trainer
from trainer.client.schedule import CheckedConfig, run_config
from trainer.data.splits import load_splits


def default_threads(cpus: float | None = None) -> int:
    """The trainer's torch threads when ``--threads`` is not given: the cores (or ``cpus``) but one, at least one.

    The core left over is the selector's and Ray's own processes'. On a 2-core machine a trainer actor with 2
    threads took about twice as long as with one (``bench/threads.py``, docs/performance.md), most likely
    because its thread pool waits at every parallel region for a core that something else holds.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cpus) - 1)


def pick_device(requested: str, gpu_ids: list) -> torch.device:
    """``auto``: the GPU Ray assigned to this actor, else the CPU (``num_gpus=0`` actors see every GPU)."""
    if requested == "auto":
        return torch.device("cuda:0") if gpu_ids and torch.cuda.is_available() else torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device == {requested!r}, but no CUDA device is visible to the trainer")
    return torch.device(requested)


class TrainerService:
    """``config``: a ``RunConfig``, or the ``CheckedConfig`` of the command line (``trainer.builtin.core.Trainer``)."""

    def __init__(self, config: RunConfig | CheckedConfig, selector, splits=None, out: str | None = None,
                 resume: bool = False):
        run = run_config(config)
        torch.set_num_threads(run.train.threads or default_threads())
        device = pick_device(run.train.device, ray.get_gpu_ids())
        splits = load_splits(run.data, run.seed) if splits is None else splits
        self.trainer = Trainer(config, splits, selector, device, out=out, resume=resume)

    def run(self) -> RunResult:
        """Train the run; its summary, records and step clock (``protocol.records.RunResult``)."""
        try:
            return self.trainer.run()
        finally:
            self.trainer.close()

    def progress(self, n_epochs_seen: int = 0, n_rounds_seen: int = 0) -> Progress:
        return self.trainer.progress(n_epochs_seen, n_rounds_seen)

    def request_stop(self, reason: str, sent_at: float | None = None) -> None:
        self.trainer.request_stop(reason, sent_at)


TrainerActor = ray.remote(num_cpus=0, num_gpus=0, max_concurrency=3)(TrainerService)
