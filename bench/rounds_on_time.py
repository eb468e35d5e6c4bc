"""Are rounds on time? N default runs in a row: rounds skipped or adopted late, and the spread of the
selector's time per round.

    python bench/rounds_on_time.py [--runs 10] [-- extra trainer.run flags]
    python bench/rounds_on_time.py --alone 200

Each run is the real ``python -m trainer.run`` with the defaults (GRAD-MATCH-PB, MNIST-5k, LeNet, T = 200)
in a subprocess, one after another. Claim: over all runs no round is skipped or adopted late, and the
selector's time per round (``selector_s``) varies by less than 3x (max / min over every adopted round).
Last line: ``rounds_on_time: runs=N rounds=R skipped=S late=L selector_s_min=a selector_s_max=b ratio=c
same_round_ratio=d``: ``ratio`` is max / min over every adopted round, ``same_round_ratio`` the largest max / min
of one round index over the runs (round i of every run solves a problem of the same kind and size, so
this one shows the machine's jitter apart from how the problems differ from round to round), ``cpu_ratio``
max / min of the CPU seconds of the selector's round thread (``selector_cpu_s``: the work itself, without the
time the thread waited for a core). It also prints how often the round thread was preempted
(``selector_preempted``: another runnable thread took its core), which is where a round's wall time goes
beyond its CPU time.

``--alone N`` runs N identical rounds of the default run's size (110 mini-batches of LeNet's last layer,
850 values each, 11 chosen) through the selector service in this process, one thread, no Ray and no
trainer, and prints the same ratios: the spread of a fixed amount of work on this machine.
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


def alone(n_rounds: int) -> int:
    """``n_rounds`` identical GRAD-MATCH-PB rounds through ``SelectorService`` in this process."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    sys.path.insert(0, str(ROOT))
    from protocol.messages import RoundRequest
    from service.selector import SelectorService

    torch.set_num_threads(1)
    threadpool_limits(1)
    rng = np.random.default_rng(0)
    n, c, d, k = 110, 10, 84, 11
    errors, features = rng.normal(size=(n, c)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
    rows = np.concatenate([errors, (errors[:, :, None] * features[:, None, :]).reshape(n, -1)], axis=1)
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.warm_up()
    wall, cpu = [], []
    for r in range(n_rounds):
        request = RoundRequest(round_id=r, model_step=0, ground="batch", n_ground=n, n_select=k, n_chunks=1, seed=0,
                               strategy="gradmatch-pb", sizes=np.full(n, 32, np.int64), lr=0.01)
        service.start_round(request.model_dump())
        service.add_chunk({"round_id": r, "chunk_index": 0, "ids": np.arange(n), "labels": np.arange(n) % c,
                           "rows": rows})
        answer = service.result(r, 60)
        wall.append(answer.busy_s)
        cpu.append(answer.cpu_s)
    wall_a, cpu_a = np.array(wall), np.array(cpu)
    print(f"rounds_alone: rounds={n_rounds} selector_s_min={wall_a.min():.4f} selector_s_median={np.median(wall_a):.4f} "
          f"selector_s_max={wall_a.max():.4f} ratio={wall_a.max() / wall_a.min():.2f} "
          f"cpu_ratio={cpu_a.max() / cpu_a.min():.2f} within_3x_of_min={np.mean(wall_a < 3 * wall_a.min()):.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs in a row (default: 10)")
    parser.add_argument("--alone", type=int, default=0, metavar="N",
                        help="instead: N identical rounds in this process, without Ray or a trainer (default: off)")
    parser.add_argument("extra", nargs="*", help="flags passed to every trainer.run (after --)")
    args = parser.parse_args()
    if args.alone:
        return alone(args.alone)
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
    cpu = [r["selector_cpu_s"] for r in adopted if r.get("selector_cpu_s")]
    cpu_ratio = max(cpu) / min(cpu) if cpu else float("nan")
    waited = [r["selector_s"] - r["selector_cpu_s"] for r in adopted if r.get("selector_cpu_s") is not None]
    print(f"selector CPU time of the round thread: {min(cpu, default=0):.4f}..{max(cpu, default=0):.4f} s, "
          f"max/min {cpu_ratio:.2f}; wall minus CPU (waits for a core, sleeps): "
          f"{min(waited, default=0):.4f}..{max(waited, default=0):.4f} s")
    counted = [r for r in adopted if r.get("selector_preempted") is not None and r.get("selector_cpu_s") is not None]
    if counted:
        worst = max(counted, key=lambda r: r["selector_s"] - r["selector_cpu_s"])
        print(f"preemptions of the round thread (another runnable thread took its core): "
              f"{sum(r['selector_preempted'] > 0 for r in counted)} of {len(counted)} rounds preempted, "
              f"{min(r['selector_preempted'] for r in counted)}..{max(r['selector_preempted'] for r in counted)} "
              f"times; the round that waited longest ({worst['selector_s'] - worst['selector_cpu_s']:.4f} s) was "
              f"preempted {worst['selector_preempted']} times")
    ok = skipped == 0 and late == 0 and ratio < 3 and len(adopted) == len(rounds)
    print(f"claim (no round skipped or late, selector time within 3x): {'PASS' if ok else 'FAIL'}")
    print(f"rounds_on_time: runs={args.runs} rounds={len(rounds)} skipped={skipped} late={late} "
          f"selector_s_min={min(times, default=0):.4f} selector_s_max={max(times, default=0):.4f} ratio={ratio:.2f} "
          f"same_round_ratio={same_round:.2f} cpu_ratio={cpu_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
