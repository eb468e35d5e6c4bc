"""Entry point: ``python -m trainer.run [flags]`` or ``python -m trainer.run --resume DIR``.

Checks the flags, the run directory, the model and the data before Ray starts; joins a cluster started with
``ray start`` (or named by ``RAY_ADDRESS``) or starts a private local Ray; places the selector and the trainer
actors (on one GPU when there is one); shows progress; writes the run directory; prints a short final table.
SIGINT and SIGTERM stop the run at the next epoch end with a checkpoint (a second Ctrl-C exits at once).

Exit codes: 0 completed, 1 failed (one line on stderr says why), 2 bad input, 130 / 143 interrupted by
SIGINT / SIGTERM (resumable with ``--resume``).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

import ray

from protocol.config import FACTORY, RunConfig
from protocol.errors import RunFailed, one_line
from trainer.builtin.core import load_checkpoint
from trainer.builtin.distributed import ClusterRefused, check_workers, latest_checkpoint
from trainer.builtin.models import check_model_name
from trainer.cli import ConfigError, flag_of, parse_args, parse_config
from trainer.client import cluster
from trainer.client.cluster import RayUnavailable, start_service
from trainer.client.layers import ModelError
from trainer.client.schedule import CheckedConfig, check_run
from trainer.client.watch import tensorboard_module
from trainer.data.splits import load_splits
from trainer.launch.job import cluster_check, execute, finish_stop, process_started_at

EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 130, 143
COMMAND_AT = time.time()  # the start of start_s where the process's own start cannot be read


# --- the run directory --------------------------------------------------------------------------

def run_dir(config: RunConfig, create: bool = True) -> Path:
    """The run directory, checked before anything starts: new or empty, creatable and writable.

    ``create=False`` only checks and names it (``make_run_dir`` creates it once Ray has been joined).
    """
    if config.out == "":
        raise ConfigError("--out '': must name a directory")
    path = Path(config.out) if config.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.selector.strategy}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r}: exists and is not a directory")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--out {str(path)!r}: exists and is not empty; choose a new run directory "
                          "(or continue it with --resume)")
    return make_run_dir(path) if create else path


def make_run_dir(path: Path) -> Path:
    """Create the run directory and check that it can be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {str(path)!r}: cannot create or write there: {exc.strerror or exc}") from None
    return path


def resume_config(run: str, args: dict | None = None) -> RunConfig:
    """The config an interrupted run in ``run`` was started with; refuses a completed run."""
    path = Path(run)
    if not (path / "checkpoint.pt").is_file() and latest_checkpoint(path) is None:
        raise ConfigError(f"--resume {run}: no checkpoint.pt there (nor train/checkpoint_*/ of --workers); "
                          "nothing to resume")
    summary = path / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text()).get("status", "completed")
        except (OSError, ValueError, AttributeError):
            status = None  # an unreadable summary: resume and write it anew
        if status == "completed":
            raise ConfigError(f"--resume {run}: that run already completed")
    try:
        config = RunConfig.model_validate_json((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {run}: cannot read its config.json: {one_line(exc)}") from None
    confirm_factories(args or {"resume": run}, config)
    check_checkpoint(run, config)
    return config


CONFIRMED = {"model.name": "--model", "data.dataset": "--dataset"}  # flags that may confirm a factory on --resume


def confirm_factories(args: dict, config: RunConfig) -> None:
    """A run directory is data, not code: a factory its config.json names (``package.module:function``) is
    imported and called only when the user names it again on the command line."""
    for dest, flag in CONFIRMED.items():
        section, name = dest.split(".")
        value = getattr(getattr(config, section), name)
        given = args.get(dest)
        if given is not None and given != value:
            raise ConfigError(f"--resume {args['resume']}: {flag} {given!r} differs from the run's {value!r}")
        if FACTORY.match(value) and given is None:
            raise ConfigError(f"--resume {args['resume']}: its config.json names the factory {value!r} ({flag}), "
                              f"which resuming imports and runs; pass {flag} {value} again to confirm you trust it")


def check_checkpoint(run: str, config: RunConfig) -> None:
    """The run's checkpoint reads (as tensors and plain types) and was written with ``config``, before anything
    starts and before any record is replaced."""
    path = Path(run) / "checkpoint.pt"
    if not path.is_file():
        path = latest_checkpoint(Path(run))
    try:
        state = load_checkpoint(path)
    except RunFailed as exc:
        raise ConfigError(f"--resume {run}: {exc.reason}") from None
    stored = state.get("config")
    try:
        stored = RunConfig.model_validate(stored).model_dump(mode="json")
    except ValueError:
        pass  # compared as it is: every field differs
    differing = _differences(stored if isinstance(stored, dict) else {}, config.model_dump(mode="json"))
    if differing:
        raise ConfigError(f"--resume {run}: {path} was written with another config than config.json "
                          f"(differing: {', '.join(differing)}); restore the run's own config.json or start a new run")


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted names of the fields whose values differ between two config trees."""
    names = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            names += _differences(x, y, f"{prefix}{key}.")
        elif x != y or (key in a) != (key in b):
            names.append(f"{prefix}{key}")
    return names


# --- running --------------------------------------------------------------------------------------

class Stopper:
    """SIGINT / SIGTERM: the first asks the trainer to stop at the next epoch end, a second exits at once."""

    def __init__(self):
        self.signal: int | None = None
        self.trainer = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def attach(self, trainer) -> None:
        """Forward stop requests to ``trainer``, including one made before it existed."""
        self.trainer = trainer
        if self.signal is not None:
            trainer.request_stop.remote(f"stopped by {signal.Signals(self.signal).name}", time.time())

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping at the end of this epoch with a checkpoint (again to exit at once)",
              file=sys.stderr, flush=True)
        if self.trainer is not None:
            self.trainer.request_stop.remote(f"stopped by {name}", time.time())


def format_summary(summary: dict, out: Path) -> str:
    energy = f"{summary['energy_j']:.1f} J" if summary["energy_j"] is not None else f"n/a ({summary['energy_note']})"
    overlap = f"{summary['overlap']:.3f}" if summary["overlap"] is not None else "n/a"
    rows = [
        ("status", summary["status"] + (f": {summary['reason']}" if summary.get("reason") else "")),
        ("strategy", f"{summary['strategy']} on {summary['dataset']} / {summary['model']}, budget {summary['budget']:g}"),
        ("epochs", f"{summary['epochs_run']} of {summary['epochs_full']} full + {summary['epochs_subset']} subset"),
        ("test accuracy", f"{summary['acc']:.2f} %"),
        ("wall time", f"{summary['wall_s']:.1f} s (summaries {summary['summary_s']:.1f} s)"),
        ("stall time", f"{summary['stall_s']:.2f} s of {summary['selector_busy_s']:.2f} s selector work"
                       + (f" + {summary['workers_busy_s']:.2f} s on summary workers" if summary.get("workers_busy_s") else "")
                       + f" (overlap {overlap})"),
        ("rounds", f"{summary['rounds']} adopted ({summary['late_adoptions']} late), {summary['rounds_rejected']} "
                   f"rejected or failed, {summary['rounds_skipped']} skipped"
                   + (f", {summary['rounds_harmful']} undone as harmful" if summary.get("rounds_harmful") else "")),
        ("energy", energy),
        ("start / stop", start_stop_text(summary)),
        ("ray", summary.get("ray") or summary["ray_address"]),
        ("run dir", f"{out} (model.pt: the trained weights)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def start_stop_text(summary: dict) -> str:
    start, stop = summary.get("start_s"), summary.get("stop_s")
    seconds = lambda value: "n/a" if value is None else f"{value:.1f} s"  # noqa: E731
    return f"{seconds(start)} from the command to the first step, {seconds(stop)} from the last step to the end"


def prepare(argv: list[str] | None) -> tuple[CheckedConfig, Path, bool, object]:
    """Everything that can be checked before Ray starts: flags, run directory, model, data and plan. The config
    comes back as the ``CheckedConfig`` its schedule was checked as, which the trainer takes without checking it
    again."""
    args = parse_args(argv)
    args.pop("ray", None)  # which Ray to use, and its dashboard, are not part of the run's config (main reads them)
    args.pop("dashboard", None)
    resume = "resume" in args
    if resume:
        extra = sorted(k for k in args if k not in ("resume", *CONFIRMED))
        if extra:
            raise ConfigError(f"--resume {args['resume']}: continues with the run's own config; drop the other "
                              f"flags ({', '.join(extra)})")
        config, out = resume_config(args["resume"], args), Path(args["resume"])
    else:
        config = parse_config(args=args)
    try:
        check_model_name(config.model.name)
        splits = load_splits(config.data, config.seed)
    except (ModelError, ValueError, OSError) as exc:
        raise ConfigError(one_line(exc)) from None
    if config.selector.shards > splits.n_classes:
        raise ConfigError(f"--shards {config.selector.shards}: more shards than the {splits.n_classes} classes of "
                          f"{config.data.dataset} (selection is sharded by class); use --shards {splits.n_classes} "
                          "or fewer")
    checked, errors, warnings = check_run(config, int(splits.train_y.shape[0]))
    if errors:
        raise ConfigError(errors[0].render(flag_of))
    problem = check_workers(config)
    if problem:
        raise ConfigError(problem)
    for warning in warnings:
        print(f"warning: {warning.render(flag_of)}", file=sys.stderr)
    if not resume:
        out = run_dir(config, create=False)  # made once Ray is joined: a refused cluster leaves no directory
    if config.tensorboard:
        check_tensorboard(config.tensorboard)
    return checked, out, resume, splits


def check_tensorboard(logdir: str) -> None:
    """``--tensorboard DIR``: the package is installed and DIR is (or can be made) a writable directory."""
    try:
        tensorboard_module()
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    path = Path(logdir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--tensorboard {logdir!r}: exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--tensorboard {logdir!r}: cannot create or write there ({existing} is not a writable "
                          "directory)")
    try:  # made now, before Ray starts: a directory the system refuses (a read-only or virtual file system) says so
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--tensorboard {logdir!r}: cannot create it ({exc.strerror or exc}); "
                          "must be a writable directory") from None


def main(argv: list[str] | None = None) -> int:
    # start_s counts from the command: the process's start when run as the program, else this call
    began = (process_started_at() or COMMAND_AT) if argv is None else time.time()
    try:
        checked, out, resume, splits = prepare(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config, flags, service = checked.config, parse_args(argv), None
    joined_here = not ray.is_initialized()  # a program already connected keeps its connection
    try:
        # Ray (a cluster, or a private one started here) and the selector; a cluster that cannot hold the run
        # is refused before anything is placed, and a run directory is made only once all of this stands
        service = start_service(config.selector, ray=flags.get("ray", "auto"), device=config.train.device,
                                dashboard=flags.get("dashboard", False), check=cluster_check(config))
        if flags.get("dashboard"):
            url = cluster.connection.dashboard if cluster.connection is not None else None
            print(f"dashboard: {url} (this machine only)" if url else "warning: the Ray dashboard did not start",
                  file=sys.stderr, flush=True)
        if not resume:
            make_run_dir(out)
        with Stopper() as stopper:
            summary = execute(checked, out, resume=resume, stopper=stopper, splits=splits, began=began,
                              service=service)
            stopper.trainer = None  # a signal from now on has no actor to reach
            returned = time.perf_counter()
            service.close()  # the selector, and a private Ray started here: before the table, so that stop_s counts it
            if joined_here and ray.is_initialized():  # a cluster joined by this run: leave it now, not at exit
                ray.shutdown()
            finish_stop(summary, out, time.perf_counter() - returned)
            print(format_summary(summary, out))
            for note in summary.get("notes", []):
                print(f"warning: {note}", file=sys.stderr)
            for event in summary.get("harmful", []):
                print(f"warning: round {event['round']} undone at epoch {event['epoch']}: the training loss "
                      f"{event['loss']:.4g} stayed above {event['bound']:.4g} ({event['loss_before']:.4g} before "
                      "its adoption); the previous subset came back", file=sys.stderr)
            if summary["status"] == "failed":
                print(f"error: the run failed: {summary['reason']}", file=sys.stderr)
                return EXIT_FAILED
            if summary["status"] == "interrupted":
                print(f"interrupted; continue with: python -m trainer.run --resume {out}", file=sys.stderr)
                return EXIT_SIGTERM if stopper.signal == signal.SIGTERM else EXIT_SIGINT
            return 0
    except (ConfigError, ClusterRefused, RayUnavailable) as exc:  # ClusterRefused: the cluster lacks what the
        print(f"error: {exc}", file=sys.stderr)  # workers ask for; RayUnavailable: a Ray that cannot be joined
        return EXIT_USAGE
    except KeyboardInterrupt:
        if (Path(out) / "config.json").exists():
            print(f"error: interrupted at once; the last checkpoint in {out} is kept (--resume {out})",
                  file=sys.stderr)
        else:  # Ray or the selector was still starting: no run directory yet
            print("error: interrupted while starting; no checkpoint was written", file=sys.stderr)
        return EXIT_SIGINT
    except RunFailed as exc:
        print(f"error: the run failed: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except ray.exceptions.RayError as exc:
        print(f"error: the run failed: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if service is not None:
            service.close()


def entry(argv: list[str] | None = None) -> int:
    """``main`` as a program (``python -m trainer.run``, ``gradmatch run``): a Ctrl-C that lands while Ray shuts
    down still ends in one line, not a traceback; and the interpreter's exit that follows skips its final
    collection of every object (``gc.freeze``: measured 1.2 s down to 0.3 s after a run, docs/performance.md)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted while shutting down; the run directory keeps its last checkpoint", file=sys.stderr)
        return EXIT_SIGINT
    finally:
        if argv is None:  # the process ends next (a caller with its own argv may go on)
            exit_quickly()


def exit_quickly() -> None:
    """Before the interpreter's exit: flush the output and freeze the collector's objects, so that the exit's
    final collection does not walk every object of torch and Ray (their memory is the system's anyway)."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()

if __name__ == "__main__":
    sys.exit(entry())
