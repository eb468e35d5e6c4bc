"""The GPU paths, checked on a CPU where they can be: the bench/device.py plan and its parsing, bench/omp.py's
``--device`` (its refusal without CUDA, a small CPU run), the bundle the trainer and the selector share on a GPU (a
Ray that declares one), the trainer's device choice."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.builtin.actor import pick_device

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load_device():
    spec = importlib.util.spec_from_file_location("bench_device", ROOT / "bench" / "device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_fits_eight_minutes_and_runs_each_gpu_path(tmp_path):
    device = load_device()
    steps = device.plan(tmp_path)
    assert sum(s["timeout_s"] for s in steps) <= device.BUDGET_S < 8 * 60
    assert [s["name"] for s in steps] == ["default", "resnet18", "overlap", "omp"]
    resnet = " ".join(steps[1]["command"])
    assert "--dataset cifar-shaped --model resnet18" in resnet and "--summary-precision auto" in resnet
    assert all("--ray local" in " ".join(s["command"]) for s in steps[:2])
    omp = " ".join(steps[3]["command"])
    assert "bench/omp.py" in omp and "--device cuda" in omp and f"--json {steps[3]['results']}" in omp


def test_dry_run_writes_the_plan_without_a_gpu(tmp_path):
    device = load_device()
    out = tmp_path / "results.json"
    assert device.main(["--out", str(out), "--dry-run"]) == 0
    assert [s["name"] for s in json.loads(out.read_text())["plan"]] == ["default", "resnet18", "overlap", "omp"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu(tmp_path):
    assert load_device().main(["--out", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()


def test_figures_from_a_jobs_summary_and_a_benchmarks_last_line(tmp_path):
    device = load_device()
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "wall_s": 40.0, "summary_s": 10.0,
                                                       "stall_s": 0.5, "overlap": 0.9, "acc": 97.0,
                                                       "device": "cuda:0", "start_s": 5.0, "stop_s": 2.0,
                                                       "selector_gpu_peak_bytes": 123456}))
    figures = device.job_figures(tmp_path)
    assert figures["summary_share"] == 0.25 and figures["device"] == "cuda:0" and figures["start_s"] == 5.0
    assert figures["selector_gpu_peak_bytes"] == 123456
    assert device.fields("budget=0.1 overhead_async=1.040 overhead_async_ci95=0.9..1.1 acc_async=97.00") == \
        {"budget": 0.1, "overhead_async": 1.04, "overhead_async_ci95": "0.9..1.1", "acc_async": 97.0}


def run_omp_bench(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/omp.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_omp_bench_refuses_cuda_without_one_in_one_line(tmp_path):
    done = run_omp_bench("--device", "cuda", "--small", "--json", str(tmp_path / "omp.json"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: --device cuda: no CUDA device is visible (torch.cuda.is_available() is False); --device cuda needs "
        "one, use --device cpu or auto"]
    assert not (tmp_path / "omp.json").exists()
    assert run_omp_bench("--device", "gpu").returncode == 2  # not a choice: argparse's usage error


def test_omp_bench_small_cpu_run_and_its_figures(tmp_path):
    out = tmp_path / "omp.json"
    done = run_omp_bench("--device", "cpu", "--small", "--repeats", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "device cpu" in lines[0] and "sklearn/fl" in lines[1]
    assert lines[2].split()[0] == "400x110" and lines[2].split()[-1] in ("numpy", "torch")
    assert lines[-1].startswith("claim: ours <= 1.3x floor at every shape: ")
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["claim"] == lines[-1]
    (row,) = data["results"]
    assert row["shape"] == [400, 110] and row["n_selected"] == 40 and row["sklearn_s"] > 0
    assert data["ours_over_floor"]["400x110"] == pytest.approx(row["ours_s"] / row["floor_s"])
    figures = load_device().omp_figures(out)
    assert figures["device"] == "cpu" and figures["shapes"][0]["method"] in ("gram", "rows")
    assert figures["ours_over_floor"] == data["ours_over_floor"]


def test_omp_bench_device_choice():
    spec = importlib.util.spec_from_file_location("bench_omp", ROOT / "bench" / "omp.py")
    omp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(omp)
    assert omp.get_args_parser().parse_args([]).device == "cpu"
    assert omp.resolve_device("cpu") == torch.device("cpu")
    assert omp.resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device must be one of cpu, cuda, auto, got 'tpu'"):
        omp.resolve_device("tpu")


@needs_cuda
def test_omp_bench_small_cuda_run(tmp_path):
    out = tmp_path / "omp.json"
    done = run_omp_bench("--device", "cuda", "--small", "--repeats", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sklearn skipped (CPU-only)" in done.stdout.splitlines()[0]
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert data["device"] == "cuda:0" and row["device"] == "cuda:0" and row["floor_by"] == "torch"
    assert row["sklearn_s"] is None and row["n_selected"] == 40 and row["ours_err"] < 1
    assert " on cuda:0 at every shape" in data["claim"]


def test_trainer_device_choice():
    assert pick_device("cpu", [0]) == torch.device("cpu")
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert pick_device("auto", [0]) == expected  # a GPU Ray assigned, if CUDA sees one
    assert pick_device("auto", []) == torch.device("cpu")  # none assigned: the CPU, even where CUDA sees one
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            pick_device("cuda", [])


def test_trainer_and_selector_share_one_gpu_bundle():
    """In a Ray that declares one GPU (no real one needed), both actors get half of one bundle's GPU."""
    code = """
import json, ray
from trainer.client.cluster import actor_options
ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
options = actor_options("auto")
group = options.pop("placement_group")
print(json.dumps({"num_gpus": options["num_gpus"], "num_cpus": options["num_cpus"],
                  "bundles": group.bundle_specs, "index": options["scheduling_strategy"].placement_group_bundle_index,
                  "cpu_only": actor_options("cpu")}))
ray.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["num_gpus"] == 0.5 and answer["num_cpus"] == 0 and answer["index"] == 0
    assert answer["bundles"] == [{"GPU": 1.0}]
    assert answer["cpu_only"] == {"num_cpus": 0, "num_gpus": 0}
