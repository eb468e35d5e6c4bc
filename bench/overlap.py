"""Does selection overlap training? FULL, RANDOM and GRAD-MATCH-PB-WARM, synchronous and asynchronous,
measured side by side in one run on one machine (same data, model, epochs, budget and seeds).

    python bench/overlap.py [--budgets 0.01 0.05 0.1] [--epochs 200] [--seeds 0 1 2] [--summary-workers W]
                            [--lead E|auto] [--pool-x M] [--model resnet18 --dataset cifar-shaped --synthetic-n N]
                            [--summary-precision P]

``--dataset cifar-shaped`` is generated 32x32x3 images (``--synthetic-n`` of them, no download), for a network
where the summary pass matters (``--model resnet18``).

Prints each configuration's wall time, then overhead = wall_s / wall_s(RANDOM) for both GRAD-MATCH modes,
speedup vs FULL, stall time, selector and summary-worker busy time and overlap = 1 - stall / (selector busy +
workers busy), and ends with one line per
budget: ``budget=B overhead_async=X overhead_sync=Y overlap=Z speedup_vs_full=W acc_async=A acc_sync=B``.
Claim: overhead_async <= 1.05 at every budget, and the asynchronous accuracy within one standard deviation
(over seeds) of the synchronous one. ``--summary-workers W`` makes GRAD-MATCH's summary passes on W Ray
actors from a model snapshot (the trainer keeps training); RANDOM's measure-only summary pass is left out of
its wall time either way. ``--pool-x M`` makes the asynchronous run summarise and choose from a random pool of
M times the budget each round (``--pool``); the synchronous run stays the paper's, over the whole training set,
so the accuracy is compared against it. Beside the ratio of mean wall times, ``overhead_async_paired`` is the
geometric mean of the seed-by-seed ratios and ``overhead_async_ci95`` its 95% t-interval: identical runs differ by
10-20% on a small shared machine, and the interval says whether a figure near 1.05 is resolved at all (more
``--seeds`` narrow it). ``overhead_async_inrun`` estimates the same overhead inside each asynchronous run, free
of that drift: the epochs in which the trainer worked for selection, or which ran beside a summary worker's
pass, against the run's quiet epochs (``inrun_cost``); it cannot see a cost that slows every epoch alike.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import scipy.stats  # noqa: E402

from protocol.config import RunConfig  # noqa: E402
from trainer.client.cluster import connect_ray  # noqa: E402
from trainer.client.rounds import RoundStats, overlap  # noqa: E402
from trainer.launch.job import execute  # noqa: E402

MODES = {
    "full": {"selector": {"strategy": "full"}},
    "random": {"selector": {"strategy": "random"}, "schedule": {"kappa": 0.5}},
    "gm_sync": {"selector": {"strategy": "gradmatch-pb"}, "schedule": {"kappa": 0.5, "lead": 0}},
    # waits when a subset is late, so that a selection slower than an epoch shows up as stall
    "gm_async": {"selector": {"strategy": "gradmatch-pb"}, "schedule": {"kappa": 0.5, "lead": 1, "on_late": "wait"}},
}


def pool_of(args, budget: float) -> float:
    """The asynchronous run's --pool: ``--pool-x`` times the budget, at most the whole set."""
    return min(1.0, args.pool_x * budget) if args.pool_x else 1.0


def config(mode: str, args, seed: int, budget: float) -> RunConfig:
    schedule = {"budget": budget, "select_every": args.select_every, **MODES[mode].get("schedule", {})}
    if mode.startswith("gm_"):
        schedule["summary_workers"] = args.summary_workers
    if args.summary_precision is not None:
        schedule["summary_precision"] = args.summary_precision
    if mode == "gm_async":
        schedule["lead"] = args.lead
        schedule["pool"] = pool_of(args, budget)
    tree = {
        "seed": seed,
        "data": {"dataset": args.dataset, **({"synthetic_n": args.synthetic_n} if args.synthetic_n else {})},
        "model": {"name": args.model},
        "train": {"epochs": args.epochs, "threads": args.threads},
        "schedule": schedule,
        "selector": MODES[mode]["selector"],
    }
    return RunConfig.model_validate(tree)


def inrun_cost(out: Path) -> float:
    """Seconds selection added to one run's epochs, estimated inside the run: over the epochs in which the trainer
    worked for selection (a round's trigger and adoption epochs: snapshot, its own summary pass, stall) or which
    ran while a summary worker made a pass, the excess of their time over the median epoch of the same phase
    with none of that. Immune to the machine's drift between runs; blind to a cost that slows every epoch alike.
    """
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    end = {e["epoch"]: e["wall_s"] for e in epochs}
    active = set()
    for r in rounds:
        active.add(r["trigger_epoch"])
        if r.get("adopted_epoch") is not None:
            active.add(r["adopted_epoch"])
        if r.get("worker_s"):
            start = end.get(r["trigger_epoch"] - 1, 0.0)
            active |= {e["epoch"] for e in epochs if e["wall_s"] - e["train_s"] < start + r["worker_s"]
                       and e["wall_s"] > start}
    cost = 0.0
    for phase in {e["phase"] for e in epochs}:
        quiet = [e["train_s"] for e in epochs if e["phase"] == phase and e["epoch"] not in active]
        if quiet:
            baseline = statistics.median(quiet)
            cost += sum(e["train_s"] - baseline for e in epochs if e["phase"] == phase and e["epoch"] in active)
    return cost


def measure(args, budget: float, full: list[dict] | None) -> dict[str, list[dict]]:
    """Every mode for every seed, interleaved so that drifts of the machine hit all modes alike."""
    results = {mode: [] for mode in MODES}
    if full is not None:
        results["full"] = full
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in MODES:
                if mode == "full" and (full is not None or args.skip_full
                                       or (seed != args.seeds[0] and not args.full_every_seed)):
                    continue
                out = Path(tmp) / f"{mode}-{seed}"
                out.mkdir()
                summary = execute(config(mode, args, seed, budget), out, show_progress=False)
                if mode == "gm_async":
                    summary["inrun_cost_s"] = inrun_cost(out)
                results[mode].append(summary)
                print(f"  {mode:<9} seed {seed}: wall {summary['wall_s']:7.2f} s  acc {summary['acc']:6.2f}  "
                      f"stall {summary['stall_s']:.3f} s  busy {summary['selector_busy_s']:.3f} s  "
                      f"workers {summary['workers_busy_s']:.3f} s  "
                      f"summaries {summary['summary_s']:.3f} s"
                      + (f"  in-run selection cost {summary['inrun_cost_s']:.3f} s" if "inrun_cost_s" in summary else ""),
                      flush=True)
    return results


def mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in runs) if runs else float("nan")


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def lead_arg(value: str):
    return value if value == "auto" else int(value)


def paired_ratio(async_runs: list[dict], random_runs: list[dict]) -> tuple[float, float, float]:
    """The asynchronous run's wall time over RANDOM-WARM's, seed by seed: (geometric mean, low, high) of a 95%
    t-interval on the log ratios. Each seed's two runs are measured back to back, so a drift of the machine
    over the benchmark cancels in the pair; the interval says how far identical runs disagree here."""
    logs = [math.log(a["wall_s"] / r["wall_s"]) for a, r in zip(async_runs, random_runs)]
    centre = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(centre), float("nan"), float("nan")
    half = scipy.stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


def report(results: dict[str, list[dict]], budget: float, pool: float) -> tuple[str, str]:
    wall = {mode: mean(runs, "wall_s") for mode, runs in results.items()}
    stall = mean(results["gm_async"], "stall_s")
    busy = mean(results["gm_async"], "selector_busy_s")
    workers = mean(results["gm_async"], "workers_busy_s")
    acc_async = [r["acc"] for r in results["gm_async"]]
    acc_sync = [r["acc"] for r in results["gm_sync"]]
    std_sync = statistics.stdev(acc_sync) if len(acc_sync) > 1 else float("nan")
    figures = {
        "overhead_async": wall["gm_async"] / wall["random"],
        "overhead_sync": wall["gm_sync"] / wall["random"],
        "overlap": nan_if_none(overlap(RoundStats(stall_s=stall, selector_busy_s=busy, workers_busy_s=workers))),
        "speedup_vs_full": wall["full"] / wall["gm_async"] if results["full"] else float("nan"),
        "acc_async": statistics.fmean(acc_async),
        "acc_sync": statistics.fmean(acc_sync),
    }
    lines = [f"{'mode':<10}{'wall_s':>9}{'acc':>8}{'stall_s':>9}{'busy_s':>8}{'wrk_s':>8}{'summ_s':>8}"]
    for mode, runs in results.items():
        lines.append(f"{mode:<10}{wall[mode]:9.2f}{mean(runs, 'acc'):8.2f}{mean(runs, 'stall_s'):9.3f}"
                     f"{mean(runs, 'selector_busy_s'):8.3f}{mean(runs, 'workers_busy_s'):8.3f}"
                     f"{mean(runs, 'summary_s'):8.3f}")
    lines.append(f"sync stall {mean(results['gm_sync'], 'stall_s'):.3f} s; async stall {stall:.3f} s of "
                 f"{busy + workers:.3f} s selection work (selector {busy:.3f} s, summary workers {workers:.3f} s); "
                 f"acc std over seeds (sync) {std_sync:.2f}")
    paired, low, high = paired_ratio(results["gm_async"], results["random"])
    lines.append(f"overhead_async seed by seed: {paired:.3f} (geometric mean), 95% interval {low:.3f}..{high:.3f} "
                 f"over {len(results['random'])} seeds")
    inrun = statistics.fmean(r["wall_s"] / (r["wall_s"] - r["inrun_cost_s"]) for r in results["gm_async"])
    lines.append(f"overhead_async estimated inside each run (epochs slowed by selection over quiet epochs): {inrun:.3f}")
    checks = [figures["overhead_async"] <= 1.05, abs(figures["acc_async"] - figures["acc_sync"]) <= std_sync]
    lines.append(f"claim at budget {budget:g} (overhead_async <= 1.05, |acc_async - acc_sync| <= std): "
                 f"{' '.join('PASS' if c else 'FAIL' for c in checks)}")
    last = f"budget={budget:g} " + " ".join(f"{k}={v:.3f}" if "acc" not in k else f"{k}={v:.2f}"
                                            for k, v in figures.items()) + f" acc_std_sync={std_sync:.2f} pool={pool:g}" \
        + f" overhead_async_paired={paired:.3f} overhead_async_ci95={low:.3f}..{high:.3f}" \
        + f" overhead_async_inrun={inrun:.3f}"
    return "\n".join(lines), last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.1],
                        help="subset budgets (default: 0.01 0.05 0.1)")
    parser.add_argument("--summary-workers", type=int, default=0,
                        help="summary workers of the GRAD-MATCH runs (default: 0, the trainer makes the passes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="trainer threads (default: the trainer's, all cores but one)")
    parser.add_argument("--epochs", type=int, default=200, help="epoch budget T (default: 200)")
    parser.add_argument("--select-every", type=int, default=20, help="R (default: 20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--dataset", default="mnist5k", help="data set (default: mnist5k)")
    parser.add_argument("--model", default="lenet", help="model (default: lenet)")
    parser.add_argument("--synthetic-n", type=int, default=None,
                        help="examples of a generated data set (synthetic, cifar-shaped; default: the config's)")
    parser.add_argument("--summary-precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                        help="summary passes' precision of every run (default: the config's)")
    parser.add_argument("--full-every-seed", action="store_true", help="run FULL for every seed (default: first)")
    parser.add_argument("--skip-full", action="store_true", help="leave FULL out (speedup_vs_full is then nan)")
    parser.add_argument("--lead", type=lead_arg, default=1,
                        help="lead of the asynchronous GRAD-MATCH run, epochs or 'auto' (default: 1)")
    parser.add_argument("--pool-x", type=float, default=None,
                        help="the asynchronous run's --pool as a multiple of the budget (default: none, pool 1)")
    args = parser.parse_args()
    started = connect_ray()
    lasts, full = [], None
    try:
        for budget in args.budgets:
            print(f"budget {budget:g}", flush=True)
            results = measure(args, budget, full)
            full = results["full"]  # FULL does not depend on the budget: measured once
            table, last = report(results, budget, pool_of(args, budget))
            print(table, flush=True)
            lasts.append(last)
    finally:
        if started:
            ray.shutdown()
    print("\n".join(lasts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
