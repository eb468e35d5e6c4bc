"""End to end: the real CLI as a subprocess, joining the session's Ray like a user's `ray start --head`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_datasets import write_cifar10, write_mnist

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 420


def run_cli(address: str | None, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it after ``ray start --head`` (``RAY_ADDRESS`` names the session's Ray)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.run([sys.executable, "-m", "trainer.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def read_run(out: Path) -> tuple[dict, list[dict], list[dict]]:
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return summary, epochs, rounds


def test_cli_runs_gradmatch_pb_on_the_running_cluster(ray_address, tmp_path):
    out = tmp_path / "run"
    done = run_cli(ray_address, "--dataset", "synthetic", "--model", "mlp", "--epochs", "8", "--select-every", "2",
                   "--kappa", "0.5", "--budget", "0.25", "--on-late", "wait", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary, epochs, rounds = read_run(out)
    assert summary["ray_address"] == ray_address  # joined the running cluster, started none
    assert summary["strategy"] == "gradmatch-pb" and summary["energy_j"] is None and summary["energy_note"]
    # warm start: kappa*T = 4 subset epochs after round(4 * 0.25) = 1 full epoch; rounds due at 1 and 3
    assert (summary["epochs_full"], summary["epochs_subset"]) == (1, 4) and len(epochs) == 5
    assert [r["due_epoch"] for r in rounds] == [1, 3]
    assert [r["status"] for r in rounds] == ["adopted", "adopted"] and summary["rounds"] == 2
    assert 0 <= summary["acc"] <= 100 and summary["wall_s"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["schedule"]["budget"] == 0.25 and config["selector"]["lam"] == 0.0  # PB: the reference's lambda
    # the cosine runs over the nominal epochs of T = 8: the full epoch at lr(0), the subset epochs at lr(4 .. 7)
    assert [e["lr"] for e in epochs] == pytest.approx([0.005 * (1 + math.cos(math.pi * t / 8)) for t in (0, 4, 5, 6, 7)])
    for key in ("strategy", "budget", "epochs", "acc", "wall_s", "stall_s", "selector_busy_s", "rounds",
                "rounds_rejected", "energy_j", "energy_note", "ray_address"):
        assert key in summary
    assert "test accuracy" in done.stdout and "rounds" in done.stdout
    assert "training" in done.stderr  # the progress bar


ROUND_STRATEGIES = ["random", "gradmatch", "gradmatch-pb", "craig", "craig-pb", "glister"]


@pytest.mark.parametrize("strategy", ["full", "random-online", *ROUND_STRATEGIES])
def test_every_strategy_runs_through_the_cli(ray_address, tmp_path, strategy):
    # warm start (kappa 0.5) exercises both phases; runs without warm start are covered below
    out = tmp_path / strategy
    done = run_cli(ray_address, "--dataset", "digits", "--model", "mlp", "--strategy", strategy, "--epochs", "4",
                   "--kappa", "0.5", "--select-every", "2", "--on-late", "wait", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary, epochs, rounds = read_run(out)
    assert summary["strategy"] == strategy and summary["n_train"] == 1258
    if strategy == "full":
        assert rounds == [] and all(e["phase"] == "full" and e["n_examples"] == 1258 for e in epochs)
        assert summary["acc"] > 30  # digits is easy: even 4 epochs learn something
        return
    sizes = {e["n_examples"] for e in epochs if e["phase"] == "subset"}
    if strategy == "random-online":  # a new random subset every epoch, no rounds
        assert rounds == [] and sizes == {126} and summary["rounds"] == 0 and summary["acc"] > 30
        return
    assert [r["status"] for r in rounds] == ["adopted"] * len(rounds) and rounds
    assert all(r["strategy"] == strategy for r in rounds)
    # 10% of 1258 = 126 examples; PB: 4 batches of 32, one of which may be the short batch of 10
    assert sizes == {126} if not strategy.endswith("-pb") else sizes <= {128, 106}
    assert 0 <= summary["redundant"] < 1
    if strategy.startswith("gradmatch"):
        assert all(r["target"] == "train" and r["grad_error"] is not None for r in rounds)


def test_full_earlystop_stops_at_the_wall_time_of_another_run(ray_address, tmp_path):
    reference = tmp_path / "reference"
    done = run_cli(ray_address, "--dataset", "digits", "--model", "mlp", "--strategy", "random", "--epochs", "30",
                   "--threads", "1", "--out", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    wall_s = read_run(reference)[0]["wall_s"]
    out = tmp_path / "earlystop"
    done = run_cli(ray_address, "--dataset", "digits", "--model", "mlp", "--strategy", "full-earlystop", "--match-run",
                   str(reference), "--epochs", "1000", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary, epochs, _ = read_run(out)
    assert summary["time_budget_s"] == pytest.approx(wall_s)
    assert summary["epochs_run"] == len(epochs) < 1000
    assert wall_s <= summary["wall_s"] < wall_s + 5  # stopped at the first step past the budget


def test_strategy_schedule_valid_and_imbalance(ray_address, tmp_path):
    out = tmp_path / "swap"
    config = tmp_path / "swap.yaml"
    config.write_text(
        "strategy_schedule:\n"
        "  - {epoch: 0, selector: {strategy: random}}\n"
        "  - {epoch: 4, selector: {strategy: gradmatch-pb, valid: true}}\n"
    )
    done = run_cli(ray_address, "--config", str(config), "--dataset", "digits", "--model", "mlp", "--epochs", "8", "--kappa", "0",
                   "--select-every", "2", "--on-late", "wait", "--imbalance-classes", "0.3", "--imbalance-drop",
                   "0.9", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary, _, rounds = read_run(out)
    assert [(r["due_epoch"], r["strategy"]) for r in rounds] == [(2, "random"), (4, "gradmatch-pb"), (6, "gradmatch-pb")]
    assert [r["target"] for r in rounds] == [None, "val", "val"]
    # the change governs the subsets adopted from epoch 4 on, so it reached the selector at epoch 3 (lead 1)
    assert summary["strategy_changes"] == [
        {"epoch": 4, "applied_epoch": 3, "strategy": "gradmatch-pb", "status": "applied"}]
    assert len(summary["imbalance"]["classes"]) == 3 and summary["n_train"] == summary["imbalance"]["n_kept"]


def test_cli_on_files_in_torchvision_mnist_layout(ray_address, tmp_path):
    write_mnist(tmp_path / "data", n_train=80, n_test=20, seed=0)
    out = tmp_path / "run"
    done = run_cli(ray_address, "--dataset", "mnist", "--data-root", str(tmp_path / "data"), "--epochs", "4",
                   "--batch-size", "8", "--select-every", "1", "--kappa", "0", "--budget", "0.25",
                   "--on-late", "wait", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary, epochs, rounds = read_run(out)
    assert summary["dataset"] == "mnist" and summary["model"] == "lenet"
    assert [r["status"] for r in rounds] == ["adopted"] * 3  # due at epochs 1, 2, 3
    assert all(e["n_examples"] <= 24 for e in epochs)  # 72 training images: 18 examples = 3 batches of 8


def test_cli_on_files_in_torchvision_cifar10_layout_with_resnet18(ray_address, tmp_path):
    write_cifar10(tmp_path / "data", n_train=40, n_test=10, seed=1)
    out = tmp_path / "run"
    done = run_cli(ray_address, "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--model", "resnet18",
                   "--epochs", "2", "--batch-size", "8", "--select-every", "1", "--kappa", "0",
                   "--budget", "0.5", "--on-late", "wait", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary, _, rounds = read_run(out)
    assert summary["dataset"] == "cifar10" and summary["model"] == "resnet18"
    assert [r["status"] for r in rounds] == ["adopted"]


def test_cli_missing_dataset_fails_clearly(ray_address, tmp_path):
    done = run_cli(ray_address, "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "r"))
    assert done.returncode != 0
    assert "cifar-10-batches-py" in done.stderr and "--download" in done.stderr


def test_cli_torchvision_model_on_an_imagefolder(ray_address, tmp_path):
    """A torchvision model by name on PNG files in ImageFolder layout (train and test folders, val split off)."""
    from fake_datasets import write_imagefolder

    write_imagefolder(tmp_path / "images", {"train": 22, "test": 4}, size=(16, 16))
    out = tmp_path / "run"
    done = run_cli(ray_address, "--dataset", f"imagefolder:{tmp_path / 'images'}", "--model", "mobilenet_v3_small",
                   "--epochs", "4", "--select-every", "1", "--kappa", "0.5", "--budget", "0.3",
                   "--batch-size", "8", "--on-late", "wait", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary, epochs, rounds = read_run(out)
    assert summary["model"] == "mobilenet_v3_small" and summary["dataset"].startswith("imagefolder:")
    assert summary["n_train"] == 66 - 7 and len(epochs) == summary["epochs_full"] + summary["epochs_subset"]
    assert rounds and all(r["status"] == "adopted" for r in rounds)
    import torch
    from torchvision.models import get_model

    state = torch.load(out / "model.pt", weights_only=True)
    assert set(get_model("mobilenet_v3_small", num_classes=3).state_dict()) == set(state)


EVAL_COLLAPSE = """
import math
from torch import nn


def make(in_shape, n_classes):
    # BatchNorm whose running statistics never move (momentum 0) after a layer whose outputs sit near 500:
    # normalised by the batch while training, but not at all in eval mode, where one class wins every input
    first = nn.Linear(math.prod(in_shape), 32)
    first.bias.data.fill_(500.0)
    return nn.Sequential(nn.Flatten(), first, nn.BatchNorm1d(32, momentum=0.0), nn.ReLU(), nn.Linear(32, n_classes))
"""


def test_a_model_degenerate_in_eval_mode_is_reported(tmp_path):
    (tmp_path / "collapse_model.py").write_text(EVAL_COLLAPSE)
    # a private Ray: its workers import the model's module from the driver's PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{tmp_path}"
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "trainer.run", "--ray", "local", "--dataset", "digits",
                           "--model", "collapse_model:make",
                           "--epochs", "4", "--select-every", "2", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    summary, _, _ = read_run(out)
    assert len(summary["notes"]) == 1 and "BatchNorm running statistics" in summary["notes"][0], summary["notes"]
    assert done.stderr.count("warning: eval mode: at epoch") == 1


def test_an_untrained_model_predicting_one_class_is_not_called_degenerate():
    from trainer.builtin.core import degenerate_note

    # the grid's case: LeNet at epoch 4 of a 5 % subset, still at chance (ln 10 = 2.30), predicts one class
    assert degenerate_note(4, 8, 1.0, 0.1, 2.29, 10) is None
    assert degenerate_note(4, 8, 1.0, 0.1, float("nan"), 10) is None
    # the same predictions while training to a low loss: eval mode is what breaks it
    note = degenerate_note(4, 8, 1.0, 0.1, 0.2, 10)
    assert note is not None and note.startswith("eval mode: at epoch 4 the model predicts class 8 for 100 %")
    assert degenerate_note(4, 8, 0.85, 0.1, 0.2, 10) is None  # under DEGENERATE_SHARE
    assert degenerate_note(4, 1, 0.95, 0.8, 0.2, 10) is None  # the labels themselves are that concentrated
