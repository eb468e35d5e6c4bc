"""Experiments: ``python -m trainer.experiment --preset NAME`` or ``--grid FILE.yaml``.

Every trial of the grid (strategies x budgets x kappa x R x seeds, FULL as reference) runs in a placement
group of its own that reserves ``--trial-cpus`` CPUs and ``--trial-gpus`` GPUs (a task blocked in
``ray.get`` gives its CPUs back to Ray; a placement group keeps them reserved), so trials run side by side
on a cluster and one after another on a small machine; the trial's selector and trainer actors share its
bundle, hence its node and GPU. Finished trials are kept in ``<out>/trials/<key>/``; running the same command
again skips them (resume). At the end ``results.csv``, ``report.md`` and the plots are (re)written.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import ray
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from protocol.config import (
    CRAIG, CRAIG_PB, FULL, FULL_EARLYSTOP, GLISTER, GRADMATCH, GRADMATCH_PB, RANDOM, ROUND_STRATEGIES, DataConfig,
    RunConfig,
)
from protocol.errors import RunFailed, one_line
from protocol.experiment import Grid, Trial
from trainer.builtin.actor import default_threads
from trainer.builtin.distributed import check_workers
from trainer.client import cluster
from trainer.client.cluster import RayUnavailable, connect_ray
from trainer.data.raw import DataError
from trainer.data.splits import check_data
from trainer.launch.job import execute

POLL_S = 1.0
PRESETS: dict[str, dict] = {
    "smoke": {
        "name": "smoke",
        "base": {"data": {"dataset": "digits"}, "model": {"name": "mlp"},
                 "train": {"epochs": 4, "eval_every": 2}, "schedule": {"on_late": "wait"}},
        "strategies": [RANDOM, GRADMATCH_PB, FULL_EARLYSTOP],
        "budgets": [0.1, 0.3],
        "kappas": [0.5],
        "select_every": [2],
        "seeds": [0, 1],
    },
    "mnist5k-paper": {
        "name": "mnist5k-paper",
        "base": {"data": {"dataset": "mnist5k"}, "model": {"name": "lenet"},
                 "train": {"epochs": 100, "eval_every": 5},
                 "schedule": {"lead": 0}},  # the paper's synchronous selection, for the reproduction
        "strategies": [RANDOM, GRADMATCH, GRADMATCH_PB, CRAIG, CRAIG_PB, GLISTER, FULL_EARLYSTOP],
        "budgets": [0.05, 0.1, 0.3],
        "kappas": [0, 0.5],
        "select_every": [10],  # R / T = 0.1 as the paper's 20 / 200
        "seeds": [0, 1, 2, 3, 4],
    },
}


def merge(base: dict, update: dict) -> dict:
    """Deep merge of config trees (``update`` wins)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def expand(grid: Grid) -> list[Trial]:
    """All trials of the grid: FULL once per seed, each strategy per budget, kappa and R, FULL-EARLYSTOP
    per budget matched to ``earlystop_match`` at the largest kappa."""
    full = [_trial(grid, FULL, 1.0, 0.0, grid.select_every[0], seed) for seed in grid.seeds]
    selecting = [s for s in grid.strategies if s in ROUND_STRATEGIES]
    by_key = {
        (seed, R, strategy, budget, kappa): _trial(grid, strategy, budget, kappa, R, seed)
        for seed, R, strategy, budget, kappa
        in itertools.product(grid.seeds, grid.select_every, selecting, grid.budgets, grid.kappas)
    }
    earlystop = [
        _trial(grid, FULL_EARLYSTOP, budget, 0.0, R, seed,
               matches=by_key[(seed, R, grid.earlystop_match, budget, max(grid.kappas))].key)
        for seed, R, budget in itertools.product(grid.seeds, grid.select_every, grid.budgets)
    ] if FULL_EARLYSTOP in grid.strategies else []
    return full + list(by_key.values()) + earlystop


def _trial(grid: Grid, strategy: str, budget: float, kappa: float, R: int, seed: int, matches=None) -> Trial:
    selector = {"strategy": strategy, **grid.strategy_options.get(strategy, {})}
    if strategy == FULL_EARLYSTOP:
        selector["time_budget_s"] = 1.0  # replaced by the matched trial's wall time when it runs
    config = merge(grid.base, {"seed": seed, "selector": selector,
                               "schedule": {"budget": budget, "kappa": kappa, "select_every": R}})
    return Trial(strategy=strategy, budget=budget, kappa=kappa, select_every=R, seed=seed, matches=matches,
                 config=RunConfig.model_validate(config).model_dump(mode="json"))


@ray.remote(num_cpus=0)
def run_trial(config: dict, out: str, gpus: float) -> dict:
    """One trial inside its placement group; its actors share the group's bundle (and GPU, if any).

    A trial interrupted after a checkpoint continues from it; one interrupted before starts again.
    """
    path = Path(out)
    resume = (path / "checkpoint.pt").is_file() and (path / "config.json").is_file()
    if path.exists() and not resume:
        shutil.rmtree(path)  # an attempt that left nothing to continue
    path.mkdir(parents=True, exist_ok=True)
    started = time.time()
    options = {"num_cpus": 0, "num_gpus": gpus / 2}
    config = RunConfig.model_validate_json((path / "config.json").read_text()) if resume else RunConfig.model_validate(config)
    problem = check_workers(config)
    if problem:
        raise RunFailed(problem)
    summary = execute(config, path, show_progress=False, options=options, resume=resume)
    if summary["status"] != "completed":
        raise RunFailed(f"trial {summary['status']}: {summary['reason']}")
    (path / "trial.json").write_text(json.dumps({"started": started, "finished": time.time(),
                                                 "node": ray.get_runtime_context().get_node_id()}))
    return summary


class Experiment:
    """Runs the trials of ``grid`` under ``out``, skipping those already finished."""

    def __init__(self, grid: Grid, out: Path, trial_cpus: float, trial_gpus: float):
        self.grid, self.out = grid, out
        self.trials = expand(grid)
        self.by_key = {t.key: t for t in self.trials}
        self.options = {"num_cpus": trial_cpus, "num_gpus": trial_gpus}
        self.threads = default_threads(trial_cpus)

    def trial_dir(self, trial: Trial) -> Path:
        return self.out / "trials" / trial.key

    def done(self, trial: Trial) -> bool:
        path = self.trial_dir(trial) / "summary.json"
        return path.exists() and json.loads(path.read_text()).get("status", "completed") == "completed"

    def summary(self, trial: Trial) -> dict:
        return json.loads((self.trial_dir(trial) / "summary.json").read_text())

    def run(self, show_progress: bool = True) -> dict[str, str]:
        """Run every unfinished trial; returns ``{key: error}`` for trials that failed."""
        todo = [t for t in self.trials if not self.done(t)]
        failed: dict[str, str] = {}
        running: dict[ray.ObjectRef, tuple[Trial, object]] = {}
        with tqdm(total=len(self.trials), initial=len(self.trials) - len(todo), unit="trial", desc=self.grid.name,
                  file=sys.stderr, disable=not show_progress, dynamic_ncols=True) as bar:
            while todo or running:
                for trial in [t for t in todo if self._ready(t, failed)]:
                    todo.remove(trial)
                    ref, entry = self._submit(trial, failed)
                    running[ref] = entry
                if not running:
                    break  # what is left waits on failed trials
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    trial, group = running.pop(ref)
                    try:
                        ray.get(ref, timeout=60)
                    except Exception as exc:  # a failed trial is recorded; the others go on
                        failed[trial.key] = one_line(exc, limit=500)
                        self.trial_dir(trial).mkdir(parents=True, exist_ok=True)
                        (self.trial_dir(trial) / "error.txt").write_text(str(exc))
                        bar.write(f"trial {trial.key} failed: {failed[trial.key]}")
                    finally:
                        remove_placement_group(group)
                    bar.update(1)
                    bar.set_postfix(failed=len(failed), refresh=False)
        for trial in todo:
            failed[trial.key] = f"not run: the trial it matches ({trial.matches}) failed"
        return failed

    def _ready(self, trial: Trial, failed: dict) -> bool:
        return trial.matches is None or (self.done(self.by_key[trial.matches]) and trial.matches not in failed)

    def _submit(self, trial: Trial, failed: dict) -> tuple[ray.ObjectRef, tuple]:
        config = merge(trial.config, {"train": {"threads": trial.config["train"]["threads"] or self.threads}})
        if trial.matches is not None:
            config = merge(config, {"selector": {"time_budget_s": self.summary(self.by_key[trial.matches])["wall_s"]}})
        bundle = {"CPU": self.options["num_cpus"]}
        if self.options["num_gpus"] > 0:
            bundle["GPU"] = self.options["num_gpus"]
        group = placement_group([bundle])
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        ref = run_trial.options(scheduling_strategy=strategy).remote(
            config, str(self.trial_dir(trial)), self.options["num_gpus"])
        return ref, (trial, group)


def check_trial_data(grid: Grid) -> None:
    """Every data set the trials read, checked before Ray starts (trials load their data inside their actors)."""
    for data in {json.dumps(t.config["data"], sort_keys=True) for t in expand(grid)}:
        try:
            check_data(DataConfig.model_validate_json(data))
        except (DataError, ValueError, OSError) as exc:
            raise SystemExit(_error(one_line(exc))) from None


def load_grid(args) -> Grid:
    if args.preset:
        if args.preset not in PRESETS:
            raise SystemExit(_error(f"--preset {args.preset!r}: must be one of {', '.join(PRESETS)}"))
        tree = PRESETS[args.preset]
    else:
        try:
            tree = yaml.safe_load(Path(args.grid).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SystemExit(_error(f"--grid {args.grid}: cannot read: {exc}")) from None
    try:
        return Grid.model_validate(tree)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "grid"
        raise SystemExit(_error(f"{where}: {error['msg'].removeprefix('Value error, ')}")) from None


def _check_fits(cpus: float, gpus: float) -> None:
    """A trial must fit on one node, or its placement group would wait forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        biggest = max(((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes), default=(0, 0))
        raise SystemExit(_error(f"--trial-cpus {cpus:g} / --trial-gpus {gpus:g}: no node has that much "
                                f"(largest: {biggest[0]:g} CPUs, {biggest[1]:g} GPUs)"))


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.experiment",
                                     description="Run a grid of trials and write results.csv, report.md and plots.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"one of {', '.join(PRESETS)}")
    source.add_argument("--grid", metavar="FILE.yaml", help="a grid file (see docs/guide.md, Experiments)")
    parser.add_argument("--out", help="experiment folder (default: experiments/<name>); reused to resume")
    parser.add_argument("--trial-cpus", type=float, default=None,
                        help="CPUs each trial reserves (default: all CPUs of the machine when local, else 1)")
    parser.add_argument("--trial-gpus", type=float, default=None,
                        help="GPUs each trial reserves (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--ray", default="auto", metavar="WHICH",
                        help="local, cluster or HOST:PORT, as for python -m trainer.run (default: auto)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.csv, report.md and the plots from the finished trials; run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # the report is written at the end: without its packages, say so before any trial runs
        importlib.import_module("trainer.experiments.report")
    except ImportError as exc:
        return _error(str(exc))
    grid = load_grid(args)
    out = Path(args.out or Path("experiments") / grid.name)
    started = False
    if not args.report_only:  # a cluster that cannot be joined is refused before anything is written
        check_trial_data(grid)
        try:
            started = connect_ray(ray_choice=args.ray)
        except RayUnavailable as exc:
            return _error(str(exc))
        if cluster.connection is not None:
            print(f"ray: {cluster.connection.describe()}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(grid.model_dump_json(indent=2))
    command = " ".join(["python -m trainer.experiment", *(argv if argv is not None else sys.argv[1:])])
    if args.report_only:
        from trainer.experiments.report import write_report

        experiment = Experiment(grid, out, 1.0, 0.0)
        missing = {t.key: "not run yet" for t in experiment.trials if not experiment.done(t)}
        print(f"report: {write_report(experiment, missing, command=command, elapsed_s=0.0)}")
        return 0
    # both signals stop the runner, whatever this process inherited (a parent that ignored SIGINT hands that on,
    # and Python then leaves it ignored)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        resources = ray.cluster_resources()
        gpus = args.trial_gpus if args.trial_gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
        cpus = args.trial_cpus if args.trial_cpus is not None else (resources.get("CPU", 1) if started else 1.0)
        _check_fits(cpus, gpus)
        experiment = Experiment(grid, out, cpus, gpus)
        start = time.perf_counter()
        failed = experiment.run()
        elapsed = time.perf_counter() - start
    except KeyboardInterrupt:
        print(f"interrupted: finished trials are kept in {out / 'trials'}; run the same command again to go on "
              "(a half-done trial resumes from its checkpoint)", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            ray.shutdown()
    from trainer.experiments.report import write_report

    write_report(experiment, failed, command=command, elapsed_s=elapsed)
    print(f"{len(experiment.trials) - len(failed)} of {len(experiment.trials)} trials done in {elapsed:.0f} s; "
          f"report: {out / 'report.md'}")
    return 1 if failed else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
