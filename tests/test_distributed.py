"""Data-parallel training with Ray Train (``--workers N``): exact shares, bad input, real two-worker runs."""

import json

import pytest
import ray
import torch
import torch.nn.functional as F
from torch import nn

from protocol.config import RunConfig
from trainer.builtin.distributed import ClusterRefused, check_cluster, check_workers, latest_checkpoint
from trainer.client.group import Group
from trainer.client.subsets import batch_weights
from trainer.launch.job import execute

from scripts import run_cluster_script, run_example


# --- the shares of a batch -------------------------------------------------------------------------

def _grads(model, x, y, w):
    model.zero_grad()
    (w * F.cross_entropy(model(x), y, reduction="none")).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def _reference_grads(model, x, y, w):
    """The reference implementation's step: ``sum_i w_i l_i / sum_i w_i`` over the mini-batch."""
    model.zero_grad()
    (torch.dot(F.cross_entropy(model(x), y, reduction="none"), w) / w.sum()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("batch,world", [(32, 2), (31, 2), (7, 3), (2, 3)])
def test_the_mean_of_the_ranks_gradients_is_the_whole_batch_gradient(batch, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    weights = torch.rand(50) * 3
    ids = torch.randperm(50)[:batch]
    whole = _reference_grads(model, x[ids], y[ids], weights[ids])
    normalised = batch_weights(weights[ids])
    per_rank, covered = [], []
    for rank in range(world):
        share, w = Group(rank, world).part(ids, normalised)
        per_rank.append(_grads(model, x[share], y[share], w))
        if w.abs().sum() > 0:
            covered.append(share)
    ddp_mean = [sum(g[i] for g in per_rank) / world for i in range(len(whole))]  # what DDP's all-reduce makes
    for a, b in zip(ddp_mean, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sorted(torch.cat(covered).tolist()) == sorted(ids.tolist())  # every example once, none twice


# --- bad input -------------------------------------------------------------------------------------

def _config(**train) -> RunConfig:
    return RunConfig.model_validate({"train": {"epochs": 4, **train}, "schedule": {"select_every": 1}})


def test_more_summary_workers_than_cpus_is_refused_before_any_waits():
    config = RunConfig.model_validate({"schedule": {"summary_workers": 1000}})
    problem = check_cluster(config, {"CPU": 2.0})
    assert problem.startswith("--summary-workers 1000: more summary workers than the 2 CPUs")
    assert check_cluster(RunConfig.model_validate({"schedule": {"summary_workers": 2}}), {"CPU": 2.0}) is None


def test_bad_worker_requests_are_refused_naming_the_flag():
    assert check_cluster(_config(workers=1), {"CPU": 1}) is None and check_workers(_config(workers=1)) is None
    assert check_cluster(_config(workers=2), {"CPU": 2}) is None and check_workers(_config(workers=2)) is None
    too_many = check_cluster(_config(workers=3), {"CPU": 2})
    assert "--workers 3" in too_many and "needs 3 CPU" in too_many and "has 2" in too_many
    gpus = check_cluster(_config(workers=2, device="cuda"), {"CPU": 16, "GPU": 1})
    assert "--workers 2" in gpus and "2 GPU" in gpus and "has 1" in gpus
    batch = check_workers(_config(workers=8, batch_size=4))
    assert "--workers 8" in batch and "--batch-size" in batch
    early = RunConfig.model_validate({"train": {"workers": 2}, "selector": {"strategy": "full-earlystop",
                                                                           "time_budget_s": 5}})
    assert "full-earlystop" in check_workers(early)
    # auto uses GPUs only when there is one per worker
    assert check_cluster(_config(workers=2), {"CPU": 2, "GPU": 1}) is None


def test_the_cli_refuses_workers_above_the_batch_before_ray_starts(tmp_path, capsys):
    from trainer.launch.run import main

    code = main(["--dataset", "synthetic", "--workers", "9", "--batch-size", "8", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--workers 9" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused in the checks before the run directory and Ray


# --- real runs on the shared local Ray (2 CPUs: two workers of one CPU each) --------------------------

def _run_config(workers: int, out, **schedule) -> RunConfig:
    out.mkdir(exist_ok=True)
    return RunConfig.model_validate({
        "seed": 3, "out": str(out),
        "data": {"dataset": "synthetic"},
        "model": {"name": "mlp"},
        "train": {"epochs": 6, "batch_size": 32, "workers": workers, "threads": 1, "eval_every": 2,
                  "checkpoint_every": 2, "device": "cpu"},
        "schedule": {"budget": 0.2, "kappa": 0.5, "select_every": 1, "lead": 0, **schedule},
        "selector": {"strategy": "gradmatch-pb"},
    })


@pytest.mark.ray
def test_two_workers_take_the_same_steps_as_one(ray_address, tmp_path):
    one = execute(_run_config(1, tmp_path / "one"), tmp_path / "one", show_progress=False)
    two = execute(_run_config(2, tmp_path / "two"), tmp_path / "two", show_progress=False)
    assert one["status"] == two["status"] == "completed", (one["reason"], two["reason"])
    assert two["rounds"] >= 2 and two["rounds"] == one["rounds"] and two["rounds_rejected"] == 0
    assert two["steps"] == one["steps"]  # a step is one whole mini-batch, whatever the number of workers
    assert abs(two["acc"] - one["acc"]) <= 3.0
    epochs = [[json.loads(line) for line in (tmp_path / name / "epochs.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert len(epochs[1]) == len(epochs[0]) == 4  # T_f = 1 full + kappa T = 3 subset epochs
    # the first (full) epoch starts from the same weights on the same batches: the same mean loss
    assert epochs[1][0]["loss"] == pytest.approx(epochs[0][0]["loss"], rel=1e-4)
    assert two["workers"] == 2 and len(two["worker_nodes"]) == 2 and all(two["worker_nodes"])
    assert (tmp_path / "two" / "model.pt").is_file()
    state = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert all(not k.startswith("module.") for k in state)  # the plain model's weights, not DDP's
    assert latest_checkpoint(tmp_path / "two") is not None  # through Ray Train's checkpoints


@pytest.mark.ray
def test_a_stopped_two_worker_run_resumes_from_ray_trains_checkpoint(ray_address, tmp_path):
    config, out = _run_config(2, tmp_path / "run"), tmp_path / "run"

    class StopAtOnce:  # what trainer.run's signal handler does, without a signal
        def attach(self, trainer):
            trainer.request_stop.remote("stopped by test")

    first = execute(config, out, show_progress=False, stopper=StopAtOnce())
    assert first["status"] == "interrupted" and first["epochs_run"] < 4, first
    assert latest_checkpoint(out) is not None
    second = execute(config, out, show_progress=False, resume=True)
    assert second["status"] == "completed", second["reason"]
    epochs = [json.loads(line)["epoch"] for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert epochs == list(range(4))  # nothing trained twice, nothing lost


@pytest.mark.ray
def test_workers_that_cannot_be_placed_fail_the_run_with_the_reason(ray_address, tmp_path):
    config = _run_config(2, tmp_path / "r")
    with pytest.raises(ClusterRefused, match="--workers 3: needs 3 CPU"):
        execute(config.model_copy(update={"train": config.train.model_copy(update={"workers": 3})}),
                tmp_path / "r", show_progress=False)


@pytest.mark.ray
def test_the_ray_train_example_trains_an_own_loop_on_two_workers(ray_address):
    import re

    stdout = run_example("ray_train_loop.py", ray_address)
    found = re.search(r"test accuracy ([\d.]+) %, rounds (\d+), steps (\d+), trained weights: 4 tensors", stdout)
    assert found, stdout[-2000:]
    assert float(found.group(1)) > 80 and int(found.group(2)) >= 1


# --- on a multi-node cluster simulated on one machine ---------------------------------------------------

@pytest.fixture(scope="module")
def cluster_run() -> dict:
    """A two-worker run on a head without CPUs and two nodes of one CPU each (this file run as a script)."""
    return run_cluster_script(__file__, 600, prefix="rt")


def test_two_ray_train_workers_on_two_nodes_adopt_rounds(cluster_run):
    summary = cluster_run["summary"]
    assert summary["status"] == "completed", summary["reason"]
    nodes = summary["worker_nodes"]
    assert len(set(nodes)) == 2 and set(nodes) == set(cluster_run["worker_nodes"])  # one per node, none on the head
    assert summary["rounds"] >= 2 and summary["rounds_rejected"] == 0
    assert summary["acc"] > 80  # the synthetic task; one worker on one node reaches the same (test above)


def _cluster_scenario(out: str) -> None:
    from pathlib import Path

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        run = Path(out).parent / "run"
        summary = execute(_run_config(2, run), run, show_progress=False)
        Path(out).write_text(json.dumps({"summary": summary, "worker_nodes": [n.node_id for n in nodes]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    import sys

    _cluster_scenario(sys.argv[1])
