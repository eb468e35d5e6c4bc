"""The benchmarks' own arithmetic, on files of the shape a run writes."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(out: Path, phases_and_seconds, rounds):
    wall, lines = 0.0, []
    for epoch, (phase, seconds) in enumerate(phases_and_seconds):
        wall += seconds
        lines.append(json.dumps({"epoch": epoch, "phase": phase, "train_s": seconds, "wall_s": wall}))
    (out / "epochs.jsonl").write_text("\n".join(lines) + "\n")
    (out / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")


def test_inrun_cost_counts_what_selection_added_to_its_epochs_against_quiet_ones(tmp_path):
    overlap = load("overlap")
    # 4 full epochs of 1.0 s (the last one triggers round 0 and pays 0.3 s for it); subset epochs of 0.1 s, of
    # which epoch 5 triggers round 1 (its snapshot: +0.02 s) and the worker's pass of 0.25 s then slows
    # epochs 5-7 by 0.01 s each; epoch 9 adopts round 1 after a 0.05 s stall
    epochs = [("full", 1.0)] * 3 + [("full", 1.3), ("subset", 0.1), ("subset", 0.13), ("subset", 0.11),
                                     ("subset", 0.11), ("subset", 0.1), ("subset", 0.15)]
    rounds = [{"trigger_epoch": 3, "adopted_epoch": 4, "worker_s": None},
              {"trigger_epoch": 5, "adopted_epoch": 9, "worker_s": 0.25}]
    write_run(tmp_path, epochs, rounds)
    assert overlap.inrun_cost(tmp_path) == pytest.approx(0.3 + 0.03 + 0.01 + 0.01 + 0.05)


def test_paired_ratio_is_the_geometric_mean_of_the_seed_ratios_with_its_interval():
    overlap = load("overlap")
    runs_async = [{"wall_s": w} for w in (1.1, 1.2, 1.0)]
    runs_random = [{"wall_s": w} for w in (1.0, 1.0, 1.0)]
    centre, low, high = overlap.paired_ratio(runs_async, runs_random)
    assert centre == pytest.approx(math.exp((math.log(1.1) + math.log(1.2)) / 3))
    assert low < centre < high
    assert math.isnan(overlap.paired_ratio(runs_async[:1], runs_random[:1])[1])  # no interval from one seed


def test_report_gives_the_last_line_with_the_run_summaries_overlap():
    overlap = load("overlap")

    def runs(walls, accs, stall=0.0, busy=0.0, workers=0.0, cost=0.0):
        return [{"wall_s": w, "acc": a, "stall_s": stall, "selector_busy_s": busy, "workers_busy_s": workers,
                 "summary_s": 0.0, "inrun_cost_s": cost} for w, a in zip(walls, accs)]

    results = {"full": [], "random": runs([10.0, 10.0], [90.0, 92.0]),
               "gm_sync": runs([12.0, 12.0], [91.0, 93.0], stall=1.0, busy=0.5, workers=0.5),
               "gm_async": runs([10.5, 10.5], [91.0, 92.0], stall=0.25, busy=0.5, workers=0.5, cost=0.5)}
    table, last = overlap.report(results, 0.1, 1.0)
    fields = dict(item.split("=") for item in last.split())
    assert fields["budget"] == "0.1" and fields["overhead_async"] == "1.050" and fields["overhead_sync"] == "1.200"
    assert fields["overlap"] == "0.750"  # 1 - 0.25 / (0.5 selector + 0.5 workers)
    assert fields["overhead_async_paired"] == "1.050" and fields["overhead_async_inrun"] == "1.050"  # 10.5 / 10
    assert "PASS PASS" in table
    results["gm_async"] = runs([10.5, 10.5], [91.0, 92.0], stall=1.0, busy=0.5, workers=0.5)
    assert "overlap=0.000" in overlap.report(results, 0.1, 1.0)[1]  # a stall as long as the work: 0, not missing
