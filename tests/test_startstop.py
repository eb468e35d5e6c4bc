"""Start and stop times: from the command (or entering AdaptiveSubset) to the first training step, and from the
last step to the end, in the API's summary, in summary.json and in the CLI's table. No assertion on how long
they are (bench/ measures that): each is checked against instants taken around it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from protocol.records import RunSummary, StepClock
from trainer.client.api import AdaptiveSubset, StartStopClock
from trainer.launch.job import process_started_at, start_stop
from trainer.launch.run import format_summary, start_stop_text

ROOT = Path(__file__).resolve().parents[1]


def test_clock_counts_from_entry_to_first_step_and_from_last_step_to_close():
    clock = StartStopClock(began=100.0)
    assert clock.summary() == {"start_s": None, "stop_s": None}
    clock.first_step()
    first = clock.first_step_at
    clock.first_step()  # only the first counts
    assert clock.first_step_at == first and clock.summary()["start_s"] == pytest.approx(first - 100.0)
    clock.last_step()
    last = clock.last_step_at
    clock.last_step()  # close() after finish(): the last step stays the finish
    assert clock.last_step_at == last and clock.summary()["stop_s"] is None  # not closed yet
    time.sleep(0.01)
    clock.last_step(again=True)  # the end of each epoch's batches moves it on
    assert clock.last_step_at > last
    last = clock.last_step_at
    clock.closed()
    assert clock.summary()["stop_s"] == pytest.approx(clock.closed_at - last)


def test_start_stop_from_the_trainers_instants():
    assert start_stop(StepClock(first_step_at=12.5, last_step_at=40.0), began=10.0, ended=41.5) == \
        {"start_s": 2.5, "stop_s": 1.5}
    assert start_stop(None, 10.0, 20.0) == {"start_s": None, "stop_s": None}  # a run that never trained
    assert start_stop(StepClock(first_step_at=12.0), 10.0, 20.0)["stop_s"] is None


def test_process_start_is_before_the_program_runs():
    """A child reports its own start: after the parent launched it and before its first line ran."""
    before = time.time()
    code = "import time; t = time.time(); from trainer.launch.job import process_started_at; print(process_started_at(), t)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    started, first_line = map(float, done.stdout.split())
    resolution = 0.02  # /proc counts in clock ticks of 10 ms
    assert before - resolution <= started <= first_line + resolution
    assert process_started_at() < before


def test_summary_table_shows_start_and_stop():
    assert start_stop_text({"start_s": 2.345, "stop_s": 0.51}) == \
        "2.3 s from the command to the first step, 0.5 s from the last step to the end"
    assert start_stop_text({"start_s": None}).startswith("n/a from the command")
    assert RunSummary.model_fields["start_s"].default is None  # summaries written before these fields still load
    summary = {"status": "completed", "strategy": "gradmatch-pb", "dataset": "synthetic", "model": "mlp",
               "budget": 0.1, "epochs_run": 2, "epochs_full": 1, "epochs_subset": 1, "acc": 50.0, "wall_s": 3.0,
               "summary_s": 0.1, "stall_s": 0.0, "selector_busy_s": 0.2, "overlap": 1.0, "rounds": 1,
               "late_adoptions": 0, "rounds_rejected": 0, "rounds_skipped": 0, "energy_j": None,
               "energy_note": "n/a", "ray_address": "x", "start_s": 4.0, "stop_s": 1.25}
    line = next(row for row in format_summary(summary, Path("out")).splitlines() if row.startswith("start / stop"))
    assert line.endswith("4.0 s from the command to the first step, 1.2 s from the last step to the end")


@pytest.mark.ray
def test_own_loop_summary_has_start_and_stop(ray_address):
    torch.manual_seed(0)
    x, y = torch.randn(200, 6), torch.arange(200) % 4
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    entered = time.time()
    first_batch = last_step = None
    with AdaptiveSubset(model, TensorDataset(x, y), strategy="gradmatch-pb", budget=0.25, epochs=4, select_every=2,
                        kappa=0.5, batch_size=20) as subset:
        assert subset.summary()["start_s"] is None
        for _, batches in subset:
            for xb, yb, w in batches:
                first_batch = first_batch or time.time()
                loss = (w * F.cross_entropy(model(xb), yb, reduction="none")).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                last_step = time.time()
        assert subset.summary()["stop_s"] is None  # not closed yet
    closed = time.time()
    summary = subset.summary()
    assert 0 < summary["start_s"] <= first_batch - entered
    assert 0 <= summary["stop_s"] <= closed - last_step


@pytest.mark.e2e
def test_cli_writes_start_and_stop(tmp_path):
    """With a private Ray (--ray local), whose shutdown stop_s counts."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    began = time.time()
    done = subprocess.run([sys.executable, "-m", "trainer.run", "--dataset", "synthetic", "--model", "mlp",
                           "--epochs", "4", "--select-every", "2", "--budget", "0.25", "--threads", "1",
                           "--ray", "local", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    ended = time.time()
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert 0 < summary["start_s"] and 0 < summary["stop_s"]
    # the process started after `began`; its steps lasted at least the epochs' training time
    assert summary["start_s"] + summary["stop_s"] + sum(e["train_s"] for e in epochs) <= ended - began
    assert "start / stop" in done.stdout and "from the command to the first step" in done.stdout
    # the driver asked the selector for its GPU memory peak at the end: none on the CPU
    peak = summary["selector_gpu_peak_bytes"]
    assert peak is None if not torch.cuda.is_available() else peak > 0


def test_trainer_actor_loads_neither_sklearn_scipy_nor_the_selector():
    """What the trainer actor's process imports is on the path to the first step: the selector's code and
    scikit-learn (the driver makes the splits) stay out of it."""
    code = ("import sys, trainer.builtin.actor; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'pandas', 'service')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
