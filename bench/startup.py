"""Start and stop times of one short CLI job, this tree against a baseline commit, side by side in one run.

    python bench/startup.py [--baseline REV] [--runs 3] [--ray local] [-- extra CLI flags]
    python bench/startup.py --trace

Each run starts ``python -m trainer.run`` on a short job (synthetic data, MLP, 2 epochs, one round) as a user
does, with a private local Ray (``--ray local``), once from this tree and once from ``--baseline`` (a commit,
extracted with ``git archive`` into a temporary folder and put first on ``PYTHONPATH``), the order alternating
from run to run so that a drift of the machine hits both alike. Each job's ``summary.json`` gives ``start_s``
(from the process's start to the first training step) and ``stop_s`` (from the last step to the end, the
private Ray's shutdown included); ``process_s`` is the whole process as the bench timed it, and ``rest`` what
of it none of start, training and stop counts: mostly the interpreter's exit after the summary. The baseline must
be a commit that writes ``start_s`` and ``stop_s``.

``--trace`` runs the same job's phases one after the other in this process, from this tree, with a private
Ray, and prints the seconds of each: imports, the command's checks and data, ``ray.init``, the selector
actor until it answers, the trainer actor until it has built its model, the first step; then the last step
to the result, the actors' release and Ray's shutdown. (The CLI starts the two actors side by side.)

The last line: ``start_s=X stop_s=Y baseline_start_s=X0 baseline_stop_s=Y0 start_ratio=X/X0 stop_ratio=Y/Y0``
(medians over the runs; ratios of the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "2", "--select-every", "1", "--kappa", "0.5",
       "--budget", "0.25", "--threads", "1"]
RUN_TIMEOUT_S = 600


def extract(rev: str, into: Path) -> Path:
    """The tree of commit ``rev`` as plain files under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def job(tree: Path, out: Path, ray: str, extra: list[str]) -> dict:
    """One CLI job from ``tree``: its summary's start_s and stop_s, and the process's seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if ray == "local":
        env.pop("RAY_ADDRESS", None)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trainer.run", *JOB, *extra, "--ray", ray, "--out", str(out)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"the job from {tree} failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"start_s": summary["start_s"], "stop_s": summary["stop_s"], "process_s": seconds,
            "wall_s": summary["wall_s"]}


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in ("start_s", "stop_s", "process_s", "wall_s")}


def last_line(current: dict, baseline: dict) -> str:
    return (f"start_s={current['start_s']:.2f} stop_s={current['stop_s']:.2f} "
            f"baseline_start_s={baseline['start_s']:.2f} baseline_stop_s={baseline['stop_s']:.2f} "
            f"start_ratio={current['start_s'] / baseline['start_s']:.3f} "
            f"stop_ratio={current['stop_s'] / baseline['stop_s']:.3f}")


def process_started_at() -> float:
    """This process's start as a ``time.time()`` (Linux /proc, as ``trainer.launch.job.process_started_at``, read
    here before anything heavy is imported)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def trace(out: Path) -> str:
    """The phases of one job's start and stop, in sequence (``--trace``)."""
    sys.path.insert(0, str(ROOT))
    t = time.time()
    marks = {"python's start": t - process_started_at()}
    import ray
    import torch  # noqa: F401

    from trainer.builtin.actor import TrainerActor
    from trainer.client.cluster import actor_options, connect_ray, release, start_selector
    from trainer.launch import run

    marks["imports"], t = time.time() - t, time.time()
    checked, out, _, splits = run.prepare([*JOB, "--ray", "local", "--out", str(out)])
    config = checked.config
    marks["checks and data"], t = time.time() - t, time.time()
    connect_ray(ray_choice="local")
    marks["ray.init"], t = time.time() - t, time.time()
    run.make_run_dir(out)
    options = actor_options(config.train.device)
    selector = start_selector(config.selector, options)
    ray.get(selector.plan.remote(), timeout=RUN_TIMEOUT_S)
    marks["selector actor answering"], t = time.time() - t, time.time()
    trainer = TrainerActor.options(**options).remote(checked, selector, splits, str(out), False)
    ray.get(trainer.progress.remote(0, 0), timeout=RUN_TIMEOUT_S)
    marks["trainer actor built"], t = time.time() - t, time.time()
    result = ray.get(trainer.run.remote(), timeout=RUN_TIMEOUT_S)
    returned = time.time()
    clock = result.clock
    marks["to the first step"] = clock.first_step_at - t
    marks["last step to the result"] = returned - clock.last_step_at
    release(trainer, selector)
    marks["release"], t = time.time() - returned, time.time()
    ray.shutdown()
    marks["ray.shutdown"] = time.time() - t
    return "  ".join(f"{name} {seconds:.2f} s" for name, seconds in marks.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="commit to compare with (default: HEAD)")
    parser.add_argument("--runs", type=int, default=3, help="jobs from each tree (default: 3)")
    parser.add_argument("--ray", default="local", help="the CLI's --ray (default: local, a private Ray)")
    parser.add_argument("--trace", action="store_true", help="the phases of one job from this tree, in sequence")
    parser.add_argument("extra", nargs="*", help="more CLI flags for the job (after --)")
    args = parser.parse_args(argv)
    if args.trace:
        with tempfile.TemporaryDirectory() as tmp:
            print(trace(Path(tmp) / "run"))
        return 0
    results = {"current": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"current": ROOT, "baseline": extract(args.baseline, Path(tmp) / "baseline")}
        for i in range(args.runs):
            for name in (("current", "baseline") if i % 2 == 0 else ("baseline", "current")):
                result = job(trees[name], Path(tmp) / f"{name}-{i}", args.ray, args.extra)
                results[name].append(result)
                rest = result["process_s"] - result["start_s"] - result["wall_s"] - result["stop_s"]
                print(f"  run {i} {name:<8} start {result['start_s']:6.2f} s  stop {result['stop_s']:6.2f} s  "
                      f"process {result['process_s']:6.2f} s  training {result['wall_s']:6.2f} s  "
                      f"rest {rest:5.2f} s", flush=True)
    current, baseline = medians(results["current"]), medians(results["baseline"])
    print(last_line(current, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
