"""Low-precision summary passes against float32 on real rounds: pass time and selection quality, side by side.

    python bench/precision.py [--cases mnist5k:lenet cifar-shaped:resnet18] [--precision bf16] [--rounds 2]
                              [--epochs-between 1] [--seeds 0 1] [--synthetic-n 600] [--repeats 4] [--threads 1]

For each case (``dataset:model``) two models are trained from seeds ``s0`` and ``s1`` on the whole training
set (SGD, the run's defaults), and at each of ``--rounds`` round points (every ``--epochs-between`` epochs)
seed ``s0``'s model makes the round's summary pass in float32 and in ``--precision`` (autocast), and
GRAD-MATCH-PB and GRAD-MATCH (per example) choose a subset from each (the selector's own strategy functions, the run's default budget 10 %
unless ``--budget``). Seed ``s1``'s model makes a float32 pass at the same point: the overlap of its subset
with ``s0``'s float32 one is what two float32 runs from different seeds share (the mini-batches of PB are one
partition for both, so that their overlap is comparable). Reported per round and strategy:

- ``time_ratio``: the low-precision pass's seconds over the float32 pass's (the per-example pass, one forward
  over the ground set), the median over ``--repeats`` back-to-back pairs whose order alternates (after one
  untimed pass of each); ``fp32_s`` and ``low_s`` are the medians of each;
- ``error_ratio``: the gradient error of the low-precision subset over the float32 subset's, both measured
  against the float32 summaries (GRAD-MATCH's matching error, relative): within 1.05 is the claim;
- ``overlap_low``: share of the float32 subset that the low-precision subset also chose;
- ``overlap_seeds``: the same share between the float32 subsets of seeds s0 and s1: the claim is
  ``overlap_low >= overlap_seeds``.

The last lines: one per case, ``case=D:M precision=P time_ratio=X error_ratio_max=Y overlap_low_min=Z
overlap_seeds_max=W claim=PASS|FAIL``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from protocol.config import DataConfig, GradMatchPBSelector, GradMatchSelector, TrainConfig  # noqa: E402
from service.strategies import select_gradmatch, select_gradmatch_pb  # noqa: E402
from trainer.builtin.models import build_model  # noqa: E402
from trainer.builtin.training import make_optimizer  # noqa: E402
from trainer.client.schedule import batch_budget, budget_size  # noqa: E402
from trainer.client.subsets import fixed_batches  # noqa: E402
from trainer.client.summaries import SummarySource  # noqa: E402
from trainer.data.splits import load_splits  # noqa: E402

CLAIM_ERROR = 1.05


def train_epochs(model, optimizer, x, y, epochs: int, batch_size: int, generator: torch.Generator) -> None:
    model.train()
    for _ in range(epochs):
        for ids in torch.randperm(len(y), generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            optimizer.step()


def timed(fn):
    began = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - began


def ground(source: SummarySource, batches: list, n: int) -> tuple[tuple[SimpleNamespace, SimpleNamespace], float]:
    """The round's two ground sets as the selector receives them (mini-batch rows, per-example factors) and the
    seconds of the per-example pass."""
    chunk = source.batch_chunk(batches, 0)
    pb = SimpleNamespace(labels=chunk["labels"], rows=chunk["rows"], validation=None)
    ex, seconds = timed(lambda: source.example_chunk(0, n))
    per_example = SimpleNamespace(labels=ex["labels"], errors=ex["errors"], features=ex["features"], validation=None)
    return (pb, per_example), seconds


def error_on(strategy: str, truth, selection) -> float:
    """The matching error of ``selection`` measured on the float32 summaries ``truth``."""
    from service.strategies import class_rows, matching_error, residual_sq, train_target

    if strategy == "gradmatch-pb":
        return matching_error(truth.rows, train_target(truth.rows, truth.sizes), selection.indices, selection.weights)
    where = {int(i): k for k, i in enumerate(selection.indices)}
    missed = total = 0.0
    for c in np.unique(truth.labels):
        members = np.flatnonzero(truth.labels == c)
        rows = class_rows(truth.errors[members], truth.features[members], int(c))
        target = rows.astype(np.float64).sum(axis=0)
        local = np.array([i for i, m in enumerate(members) if int(m) in where], dtype=np.int64)
        weights = np.array([selection.weights[where[int(members[i])]] for i in local])
        missed += residual_sq(rows, target, local, weights)
        total += float(target @ target)
    return float(np.sqrt(missed / total))


def select(strategy: str, ground_set, request):
    if strategy == "gradmatch-pb":
        return select_gradmatch_pb(GradMatchPBSelector(), request, ground_set)
    return select_gradmatch(GradMatchSelector(), request, ground_set)


def share(a, b) -> float:
    a, b = set(np.asarray(a.indices).tolist()), set(np.asarray(b.indices).tolist())
    return len(a & b) / max(1, len(a))


def run_case(case: str, args) -> dict:
    dataset, model_name = case.split(":")
    splits = load_splits(DataConfig(dataset=dataset, synthetic_n=args.synthetic_n), args.seeds[0])
    x, y = splits.train_x, splits.train_y
    n, defaults = int(y.shape[0]), TrainConfig()
    k = budget_size(args.budget, n)
    batches = fixed_batches(n, defaults.batch_size, args.seeds[0])
    sizes = np.array([len(b) for b in batches])
    requests = {
        "gradmatch-pb": SimpleNamespace(n_ground=len(batches), n_select=batch_budget(k, defaults.batch_size, len(batches)),
                                        sizes=sizes, seed=0, round_id=0),
        "gradmatch": SimpleNamespace(n_ground=n, n_select=k, sizes=None, seed=0, round_id=0),
    }
    models, optimizers, generators = [], [], []
    for seed in args.seeds[:2]:
        torch.manual_seed(seed)
        model = build_model(model_name, splits.in_shape, splits.n_classes)
        models.append(model)
        optimizers.append(make_optimizer(model, defaults.lr, defaults.momentum, defaults.weight_decay))
        generators.append(torch.Generator().manual_seed(seed))
    rows = []
    for round_id in range(args.rounds):
        for model, optimizer, generator in zip(models, optimizers, generators):
            train_epochs(model, optimizer, x, y, args.epochs_between, defaults.batch_size, generator)
        sources = {p: SummarySource(models[0], x, y, torch.device("cpu"), precision=p) for p in ("fp32", args.precision)}
        grounds = {p: ground(sources[p], batches, n)[0] for p in ("fp32", args.precision)}  # also a warm-up
        seconds = {"fp32": [], args.precision: []}
        for repeat in range(args.repeats):  # pairs, in alternating order: fp32 first, then low first
            order = ("fp32", args.precision) if repeat % 2 == 0 else (args.precision, "fp32")
            for p in order:
                seconds[p].append(timed(lambda: sources[p].example_chunk(0, n))[1])
        ratios = [low / full for low, full in zip(seconds[args.precision], seconds["fp32"])]
        other, _ = ground(SummarySource(models[1], x, y, torch.device("cpu")), batches, n)
        for i, strategy in enumerate(("gradmatch-pb", "gradmatch")):
            truth = grounds["fp32"][i]
            truth.sizes = sizes
            request = requests[strategy]
            fp32 = select(strategy, truth, request)
            low = select(strategy, grounds[args.precision][i], request)
            seeds = select(strategy, other[i], request)
            row = {"round": round_id, "strategy": strategy,
                   "time_ratio": statistics.median(ratios),
                   "fp32_s": statistics.median(seconds["fp32"]), "low_s": statistics.median(seconds[args.precision]),
                   "error_fp32": error_on(strategy, truth, fp32), "error_low": error_on(strategy, truth, low),
                   "overlap_low": share(low, fp32), "overlap_seeds": share(seeds, fp32)}
            row["error_ratio"] = row["error_low"] / row["error_fp32"] if row["error_fp32"] > 0 else 1.0
            rows.append(row)
            print(f"  {case} round {round_id} {strategy:<13} pass fp32 {row['fp32_s']:.3f} s {args.precision} "
                  f"{row['low_s']:.3f} s (ratio {row['time_ratio']:.3f})  error fp32 {row['error_fp32']:.4f} "
                  f"{args.precision} {row['error_low']:.4f} (ratio {row['error_ratio']:.3f})  overlap "
                  f"{args.precision}/fp32 {row['overlap_low']:.3f}, seed {args.seeds[1]}/seed {args.seeds[0]} "
                  f"{row['overlap_seeds']:.3f}", flush=True)
    return {"case": case, "rows": rows}


def summary_line(result: dict, precision: str) -> str:
    rows = result["rows"]
    time_ratio = statistics.median(r["time_ratio"] for r in rows[::2])  # one timing per round (both rows share it)
    error_max = max(r["error_ratio"] for r in rows)
    passed = all(r["error_ratio"] <= CLAIM_ERROR and r["overlap_low"] >= r["overlap_seeds"] for r in rows)
    return (f"case={result['case']} precision={precision} time_ratio={time_ratio:.3f} "
            f"error_ratio_max={error_max:.3f} overlap_low_min={min(r['overlap_low'] for r in rows):.3f} "
            f"overlap_seeds_max={max(r['overlap_seeds'] for r in rows):.3f} claim={'PASS' if passed else 'FAIL'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["mnist5k:lenet", "cifar-shaped:resnet18"],
                        help="dataset:model pairs (default: mnist5k:lenet cifar-shaped:resnet18)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="low precision (default: bf16)")
    parser.add_argument("--rounds", type=int, default=2, help="round points per case (default: 2)")
    parser.add_argument("--epochs-between", type=int, default=1, help="training epochs before each round (default: 1)")
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="the two model seeds (default: 0 1)")
    parser.add_argument("--budget", type=float, default=0.1, help="subset budget (default: 0.1)")
    parser.add_argument("--synthetic-n", type=int, default=600,
                        help="examples of the generated data sets, cifar-shaped (default: 600)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="timed pairs of passes per round, alternating which goes first (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as a 2-core trainer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [summary_line(run_case(case, args), args.precision) for case in args.cases]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
