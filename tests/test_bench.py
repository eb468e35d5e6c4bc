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


def test_overlap_runs_resnet18_on_cifar_shaped_data_with_a_precision():
    overlap = load("overlap")
    args = overlap.argparse.Namespace(select_every=2, summary_workers=0, lead=1, pool_x=None, dataset="cifar-shaped",
                                      model="resnet18", epochs=4, threads=1, synthetic_n=300, summary_precision="bf16")
    for mode in overlap.MODES:
        config = overlap.config(mode, args, seed=0, budget=0.1)
        assert (config.data.dataset, config.data.synthetic_n, config.model.name) == ("cifar-shaped", 300, "resnet18")
        assert config.schedule.summary_precision == "bf16"
    args.summary_precision = args.synthetic_n = None
    config = overlap.config("gm_async", args, seed=0, budget=0.1)
    assert config.data.synthetic_n == 2000 and config.schedule.summary_precision == overlap.RunConfig().schedule.summary_precision


def test_precision_summary_line_claims_error_and_overlap():
    precision = load("precision")
    rows = [{"time_ratio": 0.5, "error_ratio": 1.01, "overlap_low": 0.9, "overlap_seeds": 0.3},
            {"time_ratio": 0.5, "error_ratio": 0.99, "overlap_low": 0.8, "overlap_seeds": 0.4}]
    line = precision.summary_line({"case": "mnist5k:lenet", "rows": rows}, "bf16")
    fields = dict(item.split("=", 1) for item in line.split())
    assert fields == {"case": "mnist5k:lenet", "precision": "bf16", "time_ratio": "0.500", "error_ratio_max": "1.010",
                      "overlap_low_min": "0.800", "overlap_seeds_max": "0.400", "claim": "PASS"}
    rows[1]["error_ratio"] = 1.06  # beyond 5 %
    assert precision.summary_line({"case": "c", "rows": rows}, "bf16").endswith("claim=FAIL")
    rows[1]["error_ratio"], rows[0]["overlap_low"] = 1.0, 0.2  # less overlap than two fp32 seeds share
    assert precision.summary_line({"case": "c", "rows": rows}, "bf16").endswith("claim=FAIL")


def test_cifar_shaped_data_is_generated_images_of_cifars_shape():
    from protocol.config import DataConfig
    from trainer.data.splits import load_splits

    splits = load_splits(DataConfig(dataset="cifar-shaped", synthetic_n=200), seed=3)
    again = load_splits(DataConfig(dataset="cifar-shaped", synthetic_n=200), seed=3)
    assert splits.in_shape == (3, 32, 32) and splits.n_classes == 10 and not splits.augment
    assert len(splits.train_y) + len(splits.val_y) + len(splits.test_y) == 200
    assert (splits.train_x == again.train_x).all()
    assert set(splits.train_y.tolist()) == set(range(10))


def test_startup_last_line_is_the_ratio_of_the_medians():
    startup = load("startup")
    runs = [{"start_s": s, "stop_s": t, "process_s": 10.0, "wall_s": 1.0} for s, t in ((4.0, 2.0), (6.0, 1.0), (5.0, 3.0))]
    current = startup.medians(runs)
    assert (current["start_s"], current["stop_s"]) == (5.0, 2.0)
    baseline = {"start_s": 10.0, "stop_s": 2.5}
    fields = dict(item.split("=") for item in startup.last_line(current, baseline).split())
    assert fields["start_ratio"] == "0.500" and fields["stop_ratio"] == "0.800"
    assert fields["baseline_start_s"] == "10.00" and fields["start_s"] == "5.00"


def test_startup_extracts_a_commit_as_plain_files(tmp_path):
    startup = load("startup")
    tree = startup.extract("HEAD", tmp_path / "new")
    assert (tree / "trainer" / "run.py").is_file() and not (tree / ".git").exists()
