"""Are rounds on time? N default runs in a row: rounds skipped or adopted late, and the spread of the
selector's time per round.

    python bench/rounds_on_time.py [--runs 10] [-- extra trainer.run flags]

Each run is the real ``python -m trainer.run`` with the defaults (GRAD-MATCH-PB, MNIST-5k, LeNet, T = 200)
in a subprocess, one after another. Claim: over all runs no round is skipped or adopted late, and the
selector's time per round (``selector_s``) varies by less than 3x (max / min over every adopted round).
Last line: ``rounds_on_time: runs=N rounds=R skipped=S late=L selector_s_min=a selector_s_max=b ratio=c
same_round_ratio=d``: ``ratio`` is max / min over every adopted round, ``same_round_ratio`` the largest max / min
of one round index over the runs (round i of every run solves a problem of the same kind and size, so
this one shows the machine's jitter apart from how the problems differ from round to round).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(out: Path, extra: list[str]) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "trainer.run", "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs in a row (default: 10)")
    parser.add_argument("extra", nargs="*", help="flags passed to every trainer.run (after --)")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            records = one_run(Path(tmp) / f"run{i}", args.extra)
            rounds += records
            times = [r["selector_s"] for r in records if r["status"] == "adopted"]
            print(f"run {i}: {len(records)} rounds, statuses {[r['status'] for r in records]}, "
                  f"late {sum(r['adopted_epoch'] is not None and r['adopted_epoch'] > r['due_epoch'] for r in records)}, "
                  f"selector_s {min(times, default=0):.4f}..{max(times, default=0):.4f}", flush=True)
    adopted = [r for r in rounds if r["status"] == "adopted"]
    skipped = sum(r["status"] == "skipped" for r in rounds)
    late = sum(r["adopted_epoch"] > r["due_epoch"] for r in adopted)
    times = [r["selector_s"] for r in adopted]
    ratio = max(times) / min(times) if times and min(times) > 0 else float("inf")
    by_round: dict[int, list[float]] = {}
    for r in adopted:
        by_round.setdefault(r["round"], []).append(r["selector_s"])
    for index, values in sorted(by_round.items()):
        print(f"round {index}: selector_s {min(values):.4f}..{max(values):.4f} over {len(values)} runs, "
              f"max/min {max(values) / min(values):.2f}")
    same_round = max((max(v) / min(v) for v in by_round.values() if min(v) > 0), default=float("inf"))
    ok = skipped == 0 and late == 0 and ratio < 3 and len(adopted) == len(rounds)
    print(f"claim (no round skipped or late, selector time within 3x): {'PASS' if ok else 'FAIL'}")
    print(f"rounds_on_time: runs={args.runs} rounds={len(rounds)} skipped={skipped} late={late} "
          f"selector_s_min={min(times, default=0):.4f} selector_s_max={max(times, default=0):.4f} ratio={ratio:.2f} "
          f"same_round_ratio={same_round:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
