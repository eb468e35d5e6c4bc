"""One command for a machine with one CUDA GPU: the project's GPU paths, run and summed up in one results file.

    python -m bench.device [--out bench-device.json] [--work DIR] [--dry-run]

In order, each step a subprocess with its own time limit (about 7 minutes in all):

1. ``default``: ``python -m trainer.run`` with its defaults (MNIST-5k, LeNet, GRAD-MATCH-PB, 200 epochs) and a
   private Ray: the trainer and the selector share one placement-group bundle on the GPU
   (``trainer.client.cluster.actor_options``);
2. ``resnet18``: ResNet-18 on ``cifar-shaped`` generated images, 10 % budget, ``--summary-precision auto``;
3. ``overlap``: ``bench/overlap.py --budgets 0.1 --seeds 0 --skip-full`` (one seed: the time limit);
4. ``omp``: ``bench/omp.py --repeats 3 --device cuda``: the problems on the GPU, ours over torch's ``A @ A.T``
   there (scikit-learn, CPU-only, is skipped).

The results file (JSON) holds the GPU's name, each step's return code and seconds, and: the jobs' wall time,
summary passes' share of it, ``start_s`` / ``stop_s``, device, precision and the selector's GPU memory peak
(``selector_gpu_peak_bytes``, from the selector's status at the end of the job); the overlap benchmark's last line
as fields (``overhead_async``, ``overlap``...); the OMP benchmark's claim line and, as figures, ours over the
floor on the GPU by shape (``ours_over_floor``) with each shape's times. ``--dry-run`` writes the plan
without running anything (it works without a GPU). Without a visible CUDA GPU the command refuses to run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470  # the steps' limits together: under 8 minutes


def plan(work: Path) -> list[dict]:
    """The steps: name, command, time limit and, for jobs, their run directory."""
    cli = [sys.executable, "-m", "trainer.run", "--ray", "local"]
    return [
        {"name": "default", "command": [*cli, "--out", str(work / "default")], "timeout_s": 150,
         "run": str(work / "default")},
        {"name": "resnet18", "command": [*cli, "--dataset", "cifar-shaped", "--model", "resnet18", "--epochs", "20",
                                         "--select-every", "5", "--budget", "0.1", "--summary-precision", "auto",
                                         "--out", str(work / "resnet18")],
         "timeout_s": 120, "run": str(work / "resnet18")},
        {"name": "overlap", "command": [sys.executable, "bench/overlap.py", "--budgets", "0.1", "--seeds", "0",
                                        "--skip-full"], "timeout_s": 150},
        {"name": "omp", "command": [sys.executable, "bench/omp.py", "--repeats", "3", "--device", "cuda", "--json",
                                    str(work / "omp.json")], "timeout_s": 50, "results": str(work / "omp.json")},
    ]


def fields(line: str) -> dict:
    """``key=value`` items of a benchmark's last line, numbers as floats where they parse."""
    out = {}
    for item in line.split():
        if "=" in item:
            key, value = item.split("=", 1)
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def job_figures(run: Path) -> dict:
    """What a job's summary.json says about the GPU path: wall time, the summary passes' share of it, start and
    stop, the device, the selector's GPU memory peak."""
    summary = json.loads((run / "summary.json").read_text())
    wall = summary.get("wall_s") or 0.0
    return {"status": summary.get("status"), "wall_s": wall, "summary_s": summary.get("summary_s"),
            "summary_share": summary["summary_s"] / wall if wall else None, "stall_s": summary.get("stall_s"),
            "overlap": summary.get("overlap"), "acc": summary.get("acc"), "device": summary.get("device"),
            "start_s": summary.get("start_s"), "stop_s": summary.get("stop_s"),
            "selector_gpu_peak_bytes": summary.get("selector_gpu_peak_bytes")}


def omp_figures(path: Path) -> dict:
    """What bench/omp.py's ``--json`` file says: the device, ours over the floor by shape, each shape's times."""
    data = json.loads(path.read_text())
    keep = ("shape", "k", "floor_s", "ours_s", "method", "gram_s", "rows_s", "ours_err", "stop")
    return {"device": data["device"], "ours_over_floor": data["ours_over_floor"],
            "shapes": [{key: r.get(key) for key in keep} for r in data["results"]]}


def run_step(step: dict) -> dict:
    began = time.perf_counter()
    try:
        done = subprocess.run(step["command"], cwd=ROOT, capture_output=True, text=True, timeout=step["timeout_s"],
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = 124, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or ""), "timed out"
    result = {"name": step["name"], "rc": rc, "seconds": time.perf_counter() - began}
    lines = [line for line in stdout.splitlines() if line.strip()]
    if step["name"] == "overlap" and lines:
        result["figures"] = fields(lines[-1])
    elif step["name"] == "omp" and lines:
        result["claim"] = lines[-1]
        if rc == 0:
            result["figures"] = omp_figures(Path(step["results"]))
    elif "run" in step and rc == 0:
        result["figures"] = job_figures(Path(step["run"]))
    if rc != 0:
        result["stderr_tail"] = stderr[-2000:]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-device.json", help="results file (default: bench-device.json)")
    parser.add_argument("--work", default=None, help="folder for the jobs' run directories (default: a new one "
                        "beside --out)")
    parser.add_argument("--dry-run", action="store_true", help="write the plan only (no GPU needed)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = (Path(args.work) if args.work else out.with_suffix("").with_name(out.stem + "-runs")).resolve()
    steps = plan(work)
    assert sum(s["timeout_s"] for s in steps) <= BUDGET_S
    if args.dry_run:
        out.write_text(json.dumps({"plan": [{**s, "command": " ".join(s["command"])} for s in steps]}, indent=2))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; bench/device.py is for a machine with one (--dry-run shows the plan)",
              file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(), "steps": []}
    for step in steps:
        results["steps"].append(run_step(step))
        out.write_text(json.dumps(results, indent=2))  # what ran so far survives a later failure
        print(f"{step['name']}: rc {results['steps'][-1]['rc']} in {results['steps'][-1]['seconds']:.0f} s", flush=True)
    return 0 if all(s["rc"] == 0 for s in results["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
