"""Connecting to Ray, placing the actors and running one job; used by ``trainer.run``, ``trainer.api``,
the experiment runner and the benchmarks.

A run joins a cluster only when one was started with ``ray start`` (its address is in Ray's bootstrap file)
or ``RAY_ADDRESS`` names one; otherwise it starts a private local Ray that no other program joins. That is
how ``ray.init()`` without an address decides; Ray's "auto" address would also join another program's
private local Ray and die with it.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import ray
from tqdm import tqdm

from protocol.config import RunConfig
from protocol.errors import RunFailed
from trainer.files import RecordFile, write_json

PROGRESS_TIMEOUT_S = 600.0  # the first progress call waits for the trainer to build its model
POLL_S = 0.5
LOCAL_OPTIONS = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}


def cluster_address() -> str | None:
    """The address of the cluster to join: ``RAY_ADDRESS``, else the one the last ``ray start`` recorded."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        return address
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None)
    except (ImportError, OSError):  # a Ray without the helper, or an unreadable bootstrap file: no cluster
        return None


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something listens at ``host:port`` (a cluster that was stopped leaves its address behind)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def connect_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster if one was started with ``ray start``, else start a private local Ray.

    ``RAY_ADDRESS`` is always joined (a wrong one is an error). The address the last ``ray start`` recorded is
    joined only while something listens there; a stale one (the cluster was stopped) is passed over with a
    warning. Returns True when the Ray was started here (the caller shuts it down).
    """
    if ray.is_initialized():  # called from a program that is already connected
        return False
    address = cluster_address()
    if address and not os.environ.get("RAY_ADDRESS", "").strip() and not _reachable(address):
        print(f"warning: the Ray cluster recorded at {address} is not running; starting a private local Ray",
              file=sys.stderr)
        address = None
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        return False
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **LOCAL_OPTIONS)
    return True


def actor_options(device: str) -> dict:
    """Both actors on one GPU (halves of one placement-group bundle) when there is one, else CPU only.

    No actor holds a CPU for life (``num_cpus=0``): on a 2-core machine a held core would starve the other.
    The placement group, if any, is under the key ``"placement_group"`` of the returned options.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cpu" or gpus < 1:
        return {"num_cpus": 0, "num_gpus": 0}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"GPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=120)
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0)
    return {"num_cpus": 0, "num_gpus": 0.5, "scheduling_strategy": strategy, "placement_group": group}


def start_selector(selector_config: dict, options: dict | None = None):
    """A selector actor for ``selector_config`` (a ``SelectorConfig`` dump), placed by ``options``.

    With ``shards > 1`` and a strategy with rounds it is the sharded selector (docs/scaling.md): a coordinator
    with the same interface, placed by ``options``, that places its shards itself; ``RunFailed`` when they
    cannot all be placed, before anything else starts.
    """
    from protocol.config import ROUND_STRATEGIES
    from protocol.errors import one_line
    from service.actor import SHARD_PLACE_TIMEOUT_S, SelectorActor, ShardedSelectorActor

    options = options or {"num_cpus": 0, "num_gpus": 0}
    shards = selector_config.get("shards", 1)
    if shards <= 1 or selector_config.get("strategy") not in ROUND_STRATEGIES:
        return SelectorActor.options(**options).remote(selector_config)
    selector = ShardedSelectorActor.options(**options).remote(selector_config)
    try:
        reason = ray.get(selector.placed.remote(SHARD_PLACE_TIMEOUT_S), timeout=SHARD_PLACE_TIMEOUT_S + 60)
    except Exception as exc:  # the coordinator itself could not start
        reason = one_line(exc)
    if reason is None:
        return selector
    try:
        ray.get(selector.stop.remote(), timeout=30)  # frees the shards' placement group
    except Exception:
        pass
    release(selector)
    raise RunFailed(f"--shards {shards}: {reason}")


def release(*actors, group=None) -> None:
    """Stop actors (their open rounds fail at once) and free their placement group; never raises."""
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        if actor is None:
            continue
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass
    if group is not None:
        try:
            remove_placement_group(group)
        except Exception:
            pass


# --- one run ------------------------------------------------------------------------------------

def start_actors(config: RunConfig, options: dict, splits, out: Path | None, resume: bool):
    """The selector and the trainer: one trainer actor, or with ``--workers N`` the handle on a Ray Train run
    (``trainer.distributed``), which answers the same calls."""
    if config.train.workers > 1:
        from trainer.distributed import DistributedTrainerActor as TrainerActor, check_workers

        problem = check_workers(config, ray.cluster_resources())
        if problem:
            raise RunFailed(problem)
    else:
        from trainer.actor import TrainerActor

    selector = start_selector(config.selector.model_dump(), options)
    # the Ray Train workers ask for their own CPUs or GPUs; their handle here needs none
    trainer_options = options if config.train.workers <= 1 else {"num_cpus": 0, "num_gpus": 0}
    trainer = TrainerActor.options(**trainer_options).remote(config.model_dump(), selector, splits,
                                                             str(out) if out else None, resume)
    return selector, trainer


def execute(config: RunConfig, out: Path, show_progress: bool = True, options: dict | None = None,
            resume: bool = False, stopper=None, splits=None) -> dict:
    """Run one job on the connected Ray: write ``out`` (config, records, checkpoints, model, summary).

    Returns the summary; its ``status`` says whether the run completed, was interrupted or failed.
    """
    if not resume:
        write_json(out / "config.json", config.model_dump(mode="json"))
    options = dict(actor_options(config.train.device) if options is None else options)
    group = options.pop("placement_group", None)
    actors = ()
    try:
        actors = start_actors(config, options, splits, out, resume)
        if stopper is not None:
            stopper.attach(actors[1])
        result = follow(actors[1], out, show_progress)
        summary = result["summary"]
    finally:
        release(*actors, group=group)
    write_json(out / "summary.json", summary)
    return summary


def follow(trainer, out: Path, show_progress: bool = True) -> dict:
    """Wait for the run, streaming its records to ``out`` and a progress bar to the terminal."""
    result_ref = trainer.run.remote()
    seen_epochs = seen_rounds = 0
    files = RecordFile(out / "epochs.jsonl"), RecordFile(out / "rounds.jsonl")
    try:
        with tqdm(unit="epoch", desc="training", dynamic_ncols=True, file=sys.stderr, disable=not show_progress) as bar:
            while True:
                ready, _ = ray.wait([result_ref], timeout=POLL_S)
                state = ray.get(trainer.progress.remote(seen_epochs, seen_rounds), timeout=PROGRESS_TIMEOUT_S)
                try:
                    seen_epochs += files[0].append(state["epochs"])
                    seen_rounds += files[1].append(state["rounds"])
                except RunFailed:
                    trainer.request_stop.remote("a record could not be written")
                    raise
                bar.total = state["total"]
                bar.update(state["epoch"] - bar.n)
                bar.set_postfix(_postfix(state), refresh=False)
                for record in state["rounds"]:
                    if record["status"] != "adopted":
                        bar.write(f"round {record['round']} {record['status']}: {record['reason']}")
                if ready:
                    return ray.get(result_ref, timeout=PROGRESS_TIMEOUT_S)
    finally:
        for handle in files:
            handle.close()


def _postfix(state: dict) -> dict:
    postfix = {"loss": f"{state['loss']:.3f}" if state["loss"] is not None else "-"}
    if state["val_acc"] is not None:
        postfix["val_acc"] = f"{state['val_acc']:.1f}"
    return postfix
