"""Watching a run: TensorBoard event files read back with TensorBoard's own reader, Ray metrics read back from the
node's Prometheus endpoint (no dashboard needed), the dashboard flag, and a run without pyJoules."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from protocol.records import RoundRecord
from trainer import AdaptiveSubset
from trainer.cli import ConfigError, parse_args, parse_config
from trainer.client.watch import TensorBoard
from trainer.launch.run import main

from loops import weighted_step
from scripts import ROOT
from test_api import Blobs, Net

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator
ENERGY_NA = "n/a (pyJoules not installed: pip install 'gradmatch[energy]')"
METRICS_WAIT_S = 90.0  # Ray exports a process's metrics every few seconds
EXPORT_S = 10.0  # how often Ray exports them (its metrics_report_interval_ms default)


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``logdir`` as ``(step, value)`` pairs, read by TensorBoard's EventAccumulator."""
    reader = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def expected(records: list[dict], step: str, fields: dict[str, str]) -> dict[str, list[tuple[int, float]]]:
    out = {tag: [(r[step], float(r[key])) for r in records if r.get(key) is not None] for key, tag in fields.items()}
    return {tag: series for tag, series in out.items() if series}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for tag, series in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in series], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag  # float32 on disk


EPOCH_TAGS = {"loss": "epoch/loss", "lr": "epoch/lr", "val_acc": "epoch/accuracy"}
ROUND_TAGS = {"stall_s": "round/stall_s", "selector_s": "round/selector_s", "grad_error": "round/grad_error",
              "subset_size": "round/subset_size"}


# --- Ray metrics, as Prometheus scrapes them from the node ---------------------------------------------------------

def metrics() -> list[tuple[str, dict, float]]:
    """``(name, labels, value)`` of every ``ray_gradmatch_*`` sample this process exported."""
    import ray

    worker = ray.get_runtime_context().get_worker_id()
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = re.match(r"^(ray_gradmatch_\w+)\{(.*)\} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2)))
            if labels.get("WorkerId") == worker:
                samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def value(samples, name: str, strategy: str) -> float:
    return sum(v for n, labels, v in samples if n == f"ray_{name}" and labels.get("strategy") == strategy)


def settled_metrics(export_s: float = EXPORT_S) -> list[tuple[str, dict, float]]:
    """The samples once everything this process recorded before the call is exported: a scrape that stayed the
    same for longer than one export period (an earlier test's client in this process may still be in flight)."""
    deadline = time.monotonic() + METRICS_WAIT_S
    samples, since = metrics(), time.monotonic()
    while time.monotonic() - since <= export_s + 1.0 and time.monotonic() < deadline:
        time.sleep(1.0)
        now = metrics()
        if now != samples:
            samples, since = now, time.monotonic()
    return samples


def wait_for(check, timeout_s: float = METRICS_WAIT_S):
    """Scrape until ``check(samples)`` holds; returns the last samples (the caller asserts on them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = metrics()
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1.0)


# --- the CLI --------------------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_a_cli_run_writes_its_records_to_tensorboard_and_ray_metrics(ray_address, tmp_path, capsys):
    """A real run (driver in this process, on the session's Ray): the event files hold exactly the scalars of
    epochs.jsonl and rounds.jsonl, and the node exports the rounds' counters and gauges tagged with the strategy."""
    before = settled_metrics()
    config = tmp_path / "eval.yaml"
    config.write_text("train:\n  eval_every: 2\n")
    out, board = tmp_path / "run", tmp_path / "tb"
    assert main(["--dataset", "synthetic", "--model", "mlp", "--epochs", "8", "--select-every", "2", "--kappa", "0.5",
                 "--budget", "0.25", "--on-late", "wait", "--threads", "1", "--config", str(config),
                 "--tensorboard", str(board), "--out", str(out)]) == 0, capsys.readouterr().err[-3000:]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds] == ["adopted", "adopted"]
    assert sum(e["val_acc"] is not None for e in epochs) >= 2  # accuracy is written for the epochs evaluated
    assert json.loads((out / "config.json").read_text())["tensorboard"] == str(board)
    got = scalars(board)
    assert_same(got, {**expected(epochs, "epoch", EPOCH_TAGS), **expected(rounds, "round", ROUND_TAGS)})
    assert {"epoch/accuracy", "round/grad_error", "round/subset_size"} <= set(got)

    strategy, last = "gradmatch-pb", rounds[-1]
    adopted_before = value(before, "gradmatch_rounds_adopted_total", strategy)
    after = wait_for(lambda s: value(s, "gradmatch_rounds_adopted_total", strategy) >= adopted_before + 2
                     and value(s, "gradmatch_round_grad_error", strategy) == pytest.approx(last["grad_error"]))
    assert value(after, "gradmatch_rounds_adopted_total", strategy) == adopted_before + 2
    for name, key in (("gradmatch_round_stall_seconds", "stall_s"), ("gradmatch_round_selector_seconds", "selector_s"),
                      ("gradmatch_round_grad_error", "grad_error"), ("gradmatch_round_subset_size", "subset_size")):
        assert value(after, name, strategy) == pytest.approx(last[key]), name


def test_tensorboard_flag_and_its_bad_values(tmp_path, capsys):
    assert parse_config(["--tensorboard", "tb/a"]).tensorboard == "tb/a"
    assert parse_config([]).tensorboard is None
    with pytest.raises(ConfigError, match=r"^--tensorboard '  ': must name a directory$"):
        parse_config(["--tensorboard", "  "])
    taken = tmp_path / "file"
    taken.write_text("")
    assert main(["--tensorboard", str(taken), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --tensorboard {str(taken)!r}: exists and is not a directory"
    assert not (tmp_path / "run").exists()


def test_a_tensorboard_directory_the_system_refuses_is_one_line(tmp_path, capsys):
    from trainer.client.watch import TensorBoard

    refused = "/proc/gradmatch-tb"  # /proc takes no new directories, even from root
    assert main(["--tensorboard", refused, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --tensorboard {refused!r}: cannot create it (No such file or "
                                               "directory); must be a writable directory")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^tensorboard= '/proc/gradmatch-tb': cannot create it"):
        TensorBoard(refused, what="tensorboard=")


def test_a_missing_tensorboard_package_fails_at_once_naming_the_extra(tmp_path, capsys, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "error: --tensorboard needs tensorboard: pip install 'gradmatch[tensorboard]'"
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
    with pytest.raises(ImportError, match=r"^tensorboard= needs tensorboard: pip install 'gradmatch\[tensorboard\]'$"):
        AdaptiveSubset(Net(), Blobs(), tensorboard=str(tmp_path / "tb"), epochs=4)  # before any Ray starts


def test_a_resumed_run_rewrites_its_records_once(tmp_path):
    """A resumed run's records come back whole: its writer hides what the interrupted one wrote."""
    first = [{"epoch": e, "loss": 2.0 - e / 10, "lr": 0.01, "val_acc": None} for e in range(3)]
    board = TensorBoard(str(tmp_path), what="test")
    board.epochs(first)
    board.close()
    again = [{**r, "loss": r["loss"] / 2} for r in first] + [{"epoch": 3, "loss": 0.5, "lr": 0.005, "val_acc": 80.0}]
    board = TensorBoard(str(tmp_path), rewrite=True, what="test")
    board.epochs(again)
    board.close()
    assert_same(scalars(tmp_path), expected(again, "epoch", EPOCH_TAGS))


# --- the Python API -------------------------------------------------------------------------------------------------

@pytest.mark.ray
def test_the_api_writes_rounds_and_reported_epochs_and_counts_a_harmful_round(ray_address, tmp_path):
    """``tensorboard=`` in a user's loop: the rounds as ``subset.records`` has them, the epochs as the loop reported
    them; a subset the divergence guard undid is counted by the harmful counter."""
    strategy = "gradmatch"
    harmful_before = value(settled_metrics(), "gradmatch_rounds_harmful_total", strategy)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reported = []
    with AdaptiveSubset(model, Blobs(), strategy=strategy, budget=0.2, epochs=12, select_every=4, kappa=0.5,
                        batch_size=16, on_late="wait", tensorboard=str(tmp_path / "tb")) as subset:
        for epoch, batches in subset:
            total = 0.0
            for x, y, w in batches:
                total += weighted_step(model, opt, x, y, w)
            adopted = subset.records[0]["adopted_epoch"] if subset.records else None
            blown = adopted is not None and 0 <= epoch - adopted < 2  # a collapse the guard undoes
            record = {"epoch": epoch, "loss": 500.0 if blown else total, "lr": 0.05, "val_acc": 50.0 + epoch}
            reported.append(record)
            subset.report_loss(record["loss"], lr=record["lr"], acc=record["val_acc"])
        summary = subset.summary()
        records = subset.records
    assert summary["rounds_harmful"] == 1 and records
    assert_same(scalars(tmp_path / "tb"), {**expected(reported, "epoch", EPOCH_TAGS),
                                           **expected(records, "round", ROUND_TAGS)})
    after = wait_for(lambda s: value(s, "gradmatch_rounds_harmful_total", strategy) >= harmful_before + 1)
    assert value(after, "gradmatch_rounds_harmful_total", strategy) == harmful_before + 1


@pytest.mark.ray
def test_rounds_not_adopted_count_as_rejected(ray_address):
    """Real ``RoundRecord``s through the publisher: rejected, failed and timed-out rounds are counted as rejected,
    unused and skipped ones by neither counter; the gauges keep the latest value each round holds."""
    from trainer.client.watch import RayMetrics

    strategy = "craig"
    base = dict(strategy=strategy, model_step=10, trigger_epoch=1, due_epoch=2)
    records = [RoundRecord(round=i, status=status, stall_s=0.25 * i, selector_s=1.5 if status != "skipped" else None,
                           **base).model_dump()
               for i, status in enumerate(["rejected", "failed", "timeout", "unused", "skipped"])]
    before = settled_metrics()
    publisher = RayMetrics()
    publisher.rounds(records)
    counts = {kind: value(before, f"gradmatch_rounds_{kind}_total", strategy) for kind in ("adopted", "rejected")}
    after = wait_for(lambda s: value(s, "gradmatch_rounds_rejected_total", strategy) >= counts["rejected"] + 3
                     and value(s, "gradmatch_round_stall_seconds", strategy) == 1.0)
    assert value(after, "gradmatch_rounds_rejected_total", strategy) == counts["rejected"] + 3
    assert value(after, "gradmatch_rounds_adopted_total", strategy) == counts["adopted"]
    assert value(after, "gradmatch_round_stall_seconds", strategy) == 1.0  # the skipped round's, the last
    assert value(after, "gradmatch_round_selector_seconds", strategy) == 1.5  # the skipped round has none


# --- the dashboard --------------------------------------------------------------------------------------------------

def run_cli(*args: str, env: dict | None = None, timeout_s: float = 420) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if "RAY_ADDRESS" not in (env or {}):
        full.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "trainer.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s, env=full)


def test_the_dashboard_flag_is_not_part_of_the_config():
    assert parse_args(["--dashboard"])["dashboard"] is True and "dashboard" not in parse_args([])
    assert parse_config(["--dashboard"]) == parse_config([])


@pytest.mark.ray
@pytest.mark.parametrize("how", ["RAY_ADDRESS", "--ray"])
def test_the_dashboard_is_refused_when_joining_a_cluster(ray_address, tmp_path, how):
    flags, env = (["--ray", ray_address], {}) if how == "--ray" else ([], {"RAY_ADDRESS": ray_address})
    done = run_cli("--dashboard", *flags, "--dataset", "synthetic", "--model", "mlp", "--epochs", "2",
                   "--out", str(tmp_path / "run"), env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: --dashboard: this run joins the Ray cluster at {ray_address}")
    assert "belongs to the cluster: start it with `ray start --head --dashboard-host 127.0.0.1`" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_a_private_ray_with_its_dashboard_and_without_pyjoules(tmp_path):
    """``--ray local --dashboard``: the address printed is on 127.0.0.1; pyJoules hidden from the driver and
    every Ray worker (an import blocker first on PYTHONPATH), the run completes and reports its energy as n/a."""
    blocker = tmp_path / "blocked" / "pyJoules"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pyJoules'\", name='pyJoules')\n")
    ray_tmp = tempfile.mkdtemp(prefix="gmw", dir="/tmp")  # its own RAY_TMPDIR: short, apart from other Rays
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), str(ROOT)]), "RAY_TMPDIR": ray_tmp}
    try:
        done = run_cli("--ray", "local", "--dashboard", "--dataset", "synthetic", "--model", "mlp", "--epochs", "2",
                       "--kappa", "0", "--select-every", "1", "--threads", "1", "--out", str(tmp_path / "run"),
                       env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+ \(this machine only\)$", done.stderr, re.M), done.stderr
    assert re.search(rf"^energy\s+{re.escape(ENERGY_NA)}$", done.stdout, re.M), done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["energy_j"] is None and summary["energy_note"] == "pyJoules not installed: pip install 'gradmatch[energy]'"
    assert "dashboard http://127.0.0.1:" in summary["ray"]
