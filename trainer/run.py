"""Entry point: ``python -m trainer.run [flags]``.

Joins a running Ray cluster (``ray start --head``) or starts a local one, places the selector and the
trainer actors (on one GPU when there is one), shows progress, writes the run directory and prints a
short final table. The only module that names both ``service`` and ``trainer``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from tqdm import tqdm

from protocol.config import RunConfig
from trainer.cli import ConfigError, parse_config

PROGRESS_TIMEOUT_S = 600.0  # the first progress call waits for the trainer to load its data
POLL_S = 0.5


def connect_ray(num_cpus: int | None = None) -> bool:
    """Join the running cluster if there is one, else start a local Ray; True when started here."""
    if ray.is_initialized():  # called from a program that is already connected
        return False
    try:
        ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
        return False
    except ConnectionError:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        return True


def actor_options(config: RunConfig) -> dict:
    """Both actors on one GPU (halves of one placement-group bundle) when there is one, else CPU only.

    No actor holds a CPU for life (``num_cpus=0``): on a 2-core machine a held core would starve the other.
    The placement group, if any, is under the key ``"placement_group"`` of the returned options.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.train.device == "cpu" or gpus < 1:
        return {"num_cpus": 0, "num_gpus": 0}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"GPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=120)
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0)
    return {"num_cpus": 0, "num_gpus": 0.5, "scheduling_strategy": strategy, "placement_group": group}


def run_dir(config: RunConfig) -> Path:
    path = Path(config.out) if config.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.selector.strategy}"
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--out {str(path)!r}: exists and is not empty; choose a new run directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_actors(config: RunConfig, options: dict):
    from service.actor import SelectorActor
    from trainer.actor import TrainerActor

    selector = SelectorActor.options(**options).remote(config.selector.model_dump())
    trainer = TrainerActor.options(**options).remote(config.model_dump(), selector)
    return selector, trainer


def execute(config: RunConfig, out: Path, show_progress: bool = True, options: dict | None = None) -> dict:
    """Run one job on the connected Ray: write ``out`` (config, records, summary); return the summary."""
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    options = dict(actor_options(config) if options is None else options)
    group = options.pop("placement_group", None)
    actors = []
    try:
        actors = start_actors(config, options)
        result = follow(actors[1], out, show_progress)
    finally:
        for actor in actors:
            ray.kill(actor)
        if group is not None:
            remove_placement_group(group)
    summary = dict(result["summary"], ray_address=ray.get_runtime_context().gcs_address)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def follow(trainer, out: Path, show_progress: bool = True) -> dict:
    """Wait for the run, streaming its records to ``out`` and a progress bar to the terminal."""
    result_ref = trainer.run.remote()
    seen_epochs = seen_rounds = 0
    with open(out / "epochs.jsonl", "a") as epochs_file, open(out / "rounds.jsonl", "a") as rounds_file, \
            tqdm(unit="epoch", desc="training", dynamic_ncols=True, file=sys.stderr,
                 disable=not show_progress) as bar:
        while True:
            ready, _ = ray.wait([result_ref], timeout=POLL_S)
            state = ray.get(trainer.progress.remote(seen_epochs, seen_rounds), timeout=PROGRESS_TIMEOUT_S)
            seen_epochs += _append(epochs_file, state["epochs"])
            seen_rounds += _append(rounds_file, state["rounds"])
            bar.total = state["total"]
            bar.update(state["epoch"] - bar.n)
            bar.set_postfix(_postfix(state), refresh=False)
            for record in state["rounds"]:
                if record["status"] != "adopted":
                    bar.write(f"round {record['round']} {record['status']}: {record['reason']}")
            if ready:
                return ray.get(result_ref, timeout=PROGRESS_TIMEOUT_S)


def _append(handle, records: list[dict]) -> int:
    for record in records:
        handle.write(json.dumps(record) + "\n")
    handle.flush()
    return len(records)


def _postfix(state: dict) -> dict:
    postfix = {"loss": f"{state['loss']:.3f}" if state["loss"] is not None else "-"}
    if state["val_acc"] is not None:
        postfix["val_acc"] = f"{state['val_acc']:.1f}"
    return postfix


def format_summary(summary: dict, out: Path) -> str:
    energy = f"{summary['energy_j']:.1f} J" if summary["energy_j"] is not None else f"n/a ({summary['energy_note']})"
    overlap = f"{summary['overlap']:.3f}" if summary["overlap"] is not None else "n/a"
    rows = [
        ("strategy", f"{summary['strategy']} on {summary['dataset']} / {summary['model']}, budget {summary['budget']:g}"),
        ("epochs", f"{summary['epochs_full']} full + {summary['epochs_subset']} subset"),
        ("test accuracy", f"{summary['acc']:.2f} %"),
        ("wall time", f"{summary['wall_s']:.1f} s (summaries {summary['summary_s']:.1f} s)"),
        ("stall time", f"{summary['stall_s']:.2f} s of {summary['selector_busy_s']:.2f} s selector work (overlap {overlap})"),
        ("rounds", f"{summary['rounds']} adopted, {summary['rounds_rejected']} rejected or failed"),
        ("energy", energy),
        ("ray", summary["ray_address"]),
        ("run dir", str(out)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        out = run_dir(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = connect_ray()
    try:
        summary = execute(config, out)
        print(format_summary(summary, out))
        return 0
    except ray.exceptions.RayError as exc:
        print(f"error: the run failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
