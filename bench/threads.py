"""How many torch threads should the trainer actor use? The default (all cores but one) against all cores,
measured side by side in one run: RANDOM-WARM and GRAD-MATCH-PB-WARM, interleaved, on the same seeds.

    python bench/threads.py [--budget 0.1] [--epochs 200] [--seeds 0 1 2]

A trainer actor shares the machine with the selector actor and Ray's own processes. A thread pool as large
as the machine then waits at every parallel region for a core something else holds. Last line:
``threads: cores=C default=D wall_s_default=a wall_s_all_cores=b ratio=b/a`` (wall times are means over
strategies and seeds; ratio > 1: the default is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from protocol.config import RunConfig  # noqa: E402
from trainer.builtin.actor import default_threads  # noqa: E402
from trainer.client.cluster import connect_ray  # noqa: E402
from trainer.launch.job import execute  # noqa: E402

STRATEGIES = ("random", "gradmatch-pb")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.1, help="subset budget (default: 0.1)")
    parser.add_argument("--epochs", type=int, default=200, help="epoch budget T (default: 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = {"default": default_threads(), "all_cores": cores}
    started = connect_ray()
    walls: dict[tuple[str, str], list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                for strategy in STRATEGIES:
                    for name, threads in counts.items():
                        config = RunConfig.model_validate({
                            "seed": seed, "train": {"epochs": args.epochs, "threads": threads},
                            "schedule": {"budget": args.budget, "kappa": 0.5}, "selector": {"strategy": strategy},
                        })
                        out = Path(tmp) / f"{strategy}-{name}-{seed}"
                        out.mkdir()
                        summary = execute(config, out, show_progress=False)
                        walls.setdefault((strategy, name), []).append(summary["wall_s"])
                        print(f"  {strategy:<13} {name:<9} ({threads} threads) seed {seed}: wall {summary['wall_s']:6.2f} s"
                              f"  acc {summary['acc']:.2f}", flush=True)
    finally:
        if started:
            ray.shutdown()
    for (strategy, name), values in walls.items():
        print(f"{strategy:<13} {name:<9} mean wall {statistics.fmean(values):6.2f} s over {len(values)} seeds")
    mean = {name: statistics.fmean(w for (_, n), ws in walls.items() if n == name for w in ws) for name in counts}
    print(f"threads: cores={cores} default={counts['default']} wall_s_default={mean['default']:.2f} "
          f"wall_s_all_cores={mean['all_cores']:.2f} ratio={mean['all_cores'] / mean['default']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
