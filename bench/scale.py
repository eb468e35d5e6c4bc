"""Sharded selection at scale: S = 1, 2, 4 shards on a simulated cluster, side by side in one run.

Run from the repository root::

    python bench/scale.py [--small] [--examples 100000] [--classes 100] [--dim 512] [--batch-size 64]

A ``ray.cluster_utils.Cluster`` on this machine: a head (no CPU; the coordinator, the single selector and
the driver's chunks live there) and one worker node of one CPU per shard of the largest S. The ground set is
synthetic but shaped like the real thing: softmax errors ``e = softmax(z) - onehot(y)`` of ``--examples``
examples of ``--classes`` balanced classes with non-negative features ``h`` of ``--dim`` values, and the
mean last-layer gradient rows ``[e, e ⊗ h]`` of its mini-batches of ``--batch-size``. For GRAD-MATCH (per
class, per example) and GRAD-MATCH-PB (per batch) it runs one round, as the trainer does (request, the chunks
of ``--chunk-examples``, then ``result``), against

- the single selector (``service.actor.SelectorActor``), the reference answer;
- the sharded selector with S shards (``--shards``, default 1,2,4), SPREAD over the worker nodes.

Measured per run: ``round_s``, the wall time from the request to the answer (routing and transfers
included; the chunks are already in the object store); ``peak_mb``, the largest shard's peak resident size
above its size before the round (the single selector's, for it); ``moved_mb``, the bytes of arrays that
crossed between the coordinator and its shards (the chunks' way in is the same for every S and not counted);
whether the answer is identical to the single selector's (same indices, weights within 1e-6 relative,
``grad_error``, ``grad_error_rel`` and ``grad_error_trained`` within 1e-6, relative to the value when it is
above 1: ``grad_error`` is absolute).

Claim, on the last line: ``identical=true``, and the peak memory per shard at S = 4 at most 0.35x that at
S = 1. Each shard computes with one BLAS thread; on a 2-core machine S = 4 shares two cores, so the time
does not fall below what two cores allow.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLAIM_PEAK_RATIO = 0.35
STRATEGIES = ("gradmatch-pb", "gradmatch")
SMALL = {"examples": 10_000, "classes": 20, "dim": 64}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help=f"a quick check at {SMALL} (default: off)")
    parser.add_argument("--examples", type=int, default=100_000, help="examples in the ground set (default 100000)")
    parser.add_argument("--classes", type=int, default=100, help="classes (default 100)")
    parser.add_argument("--dim", type=int, default=512, help="features D of the last layer (default 512)")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size of the PB rows (default 64)")
    parser.add_argument("--budget", type=float, default=0.1, help="subset size as a share (default 0.1)")
    parser.add_argument("--chunk-examples", type=int, default=1024, help="examples per chunk (default 1024)")
    parser.add_argument("--shards", default="1,2,4", help="shard counts to compare (default 1,2,4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic summaries (default 0)")
    return parser


# --- the synthetic ground set --------------------------------------------------------------------

def make_summaries(n: int, n_classes: int, dim: int, batch_size: int, seed: int) -> dict:
    """Softmax errors (n, C) and features (n, D) of balanced classes, and the PB rows of their mini-batches."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % n_classes)
    centres = rng.normal(size=(n_classes, dim)).astype(np.float32)
    features = np.maximum(centres[labels] + rng.normal(size=(n, dim)).astype(np.float32), 0)
    weight = (centres.T / np.sqrt(dim)).astype(np.float32)  # a half-trained head: right, but not sure
    logits = features @ weight + rng.normal(size=(n, n_classes)).astype(np.float32)
    errors = np.exp(logits - logits.max(axis=1, keepdims=True))
    errors /= errors.sum(axis=1, keepdims=True)
    errors[np.arange(n), labels] -= 1.0
    n_batches = -(-n // batch_size)
    rows = np.empty((n_batches, n_classes * (1 + dim)), dtype=np.float32)
    sizes = np.empty(n_batches, dtype=np.int64)
    batch_labels = np.empty(n_batches, dtype=np.int64)
    for b in range(n_batches):  # fixed consecutive batches of the shuffled examples
        e, h = errors[b * batch_size:(b + 1) * batch_size], features[b * batch_size:(b + 1) * batch_size]
        sizes[b] = len(e)
        rows[b, :n_classes] = e.mean(axis=0)
        rows[b, n_classes:] = (e.T @ h).ravel() / len(e)
        batch_labels[b] = np.bincount(labels[b * batch_size:(b + 1) * batch_size], minlength=n_classes).argmax()
    return {"labels": labels, "errors": errors.astype(np.float32), "features": features, "rows": rows,
            "sizes": sizes, "batch_labels": batch_labels}


def put_chunks(ray, data: dict, strategy: str, chunk_examples: int, batch_size: int) -> list:
    """The round's chunks, each put once in the object store (the same objects serve every run)."""
    if strategy.endswith("-pb"):
        step = max(1, chunk_examples // batch_size)
        return [ray.put({"round_id": 0, "chunk_index": i, "ids": np.arange(s, min(s + step, len(data["rows"]))),
                         "labels": data["batch_labels"][s:s + step], "rows": data["rows"][s:s + step]})
                for i, s in enumerate(range(0, len(data["rows"]), step))]
    n, step = len(data["labels"]), chunk_examples
    return [ray.put({"round_id": 0, "chunk_index": i, "ids": np.arange(s, min(s + step, n)),
                     "labels": data["labels"][s:s + step], "errors": data["errors"][s:s + step],
                     "features": data["features"][s:s + step]})
            for i, s in enumerate(range(0, n, step))]


# --- one round -----------------------------------------------------------------------------------

def _peak_reset(self) -> int:
    """Inside an actor: restart its peak resident size; returns its resident size in KiB."""
    from service.shard import reset_peak, status_kib

    reset_peak()
    return status_kib("VmRSS")


def _peak_read(self) -> int:
    from service.shard import status_kib

    return status_kib("VmHWM")


def run_round(ray, selector, strategy: str, chunks: list, n_ground: int, n_select: int, sizes) -> tuple[dict, float]:
    from protocol.messages import RoundRequest

    request = RoundRequest(round_id=0, model_step=1, ground="batch" if strategy.endswith("-pb") else "example",
                           n_ground=n_ground, n_select=n_select, n_chunks=len(chunks), seed=0, strategy=strategy,
                           sizes=sizes, lr=0.01)
    start = time.perf_counter()
    selector.start_round.remote(request.model_dump())
    for ref in chunks:
        selector.add_chunk.remote(ref)  # a top-level ref: Ray hands the selector the chunk itself
    answer = ray.get(selector.result.remote(0, 3000), timeout=3600)
    return answer, time.perf_counter() - start


def _single(ray, strategy: str, chunks: list, n_ground: int, n_select: int, sizes, head: dict) -> dict:
    from service.selector import SELECTOR_CONFIG
    from trainer.client.cluster import release, start_selector

    selector = start_selector(SELECTOR_CONFIG.validate_python({"strategy": strategy}), head)
    try:
        ray.get(selector.plan.remote(), timeout=300)
        base = ray.get(selector.__ray_call__.remote(_peak_reset), timeout=60)
        answer, seconds = run_round(ray, selector, strategy, chunks, n_ground, n_select, sizes)
        peak = ray.get(selector.__ray_call__.remote(_peak_read), timeout=60)
        return {"answer": answer, "round_s": seconds, "peak_mb": (peak - base) / 1024, "moved_mb": 0.0}
    finally:
        release(selector)


def _sharded(ray, strategy: str, n_shards: int, chunks: list, n_ground: int, n_select: int, sizes,
             head: dict) -> dict:
    from protocol.receipts import Rejection
    from service.actor import ShardedSelectorActor
    from trainer.client.cluster import release

    # started directly: ``start_selector`` starts the single selector for shards == 1
    config = {"strategy": strategy, "shards": n_shards, "shard_cpus": 0.5}
    selector = ShardedSelectorActor.options(**head).remote(config)
    try:
        placed = ray.get(selector.placed.remote(300), timeout=360)
        if isinstance(placed, Rejection):
            raise RuntimeError(placed.reason)
        nodes = ray.get(selector.shard_nodes.remote(300), timeout=360)
        answer, seconds = run_round(ray, selector, strategy, chunks, n_ground, n_select, sizes)
        last = ray.get(selector.status.remote(), timeout=60).last_round
        peaks = [p for p in last.shard_peak_bytes if p is not None]
        return {"answer": answer, "round_s": seconds, "peak_mb": max(peaks) / 2**20 if peaks else float("nan"),
                "moved_mb": last.moved_bytes / 2**20, "nodes": len(set(nodes)), "shard_s": last.shard_s}
    finally:
        ray.get(selector.stop.remote(), timeout=60)
        release(selector)


GRAD_ERRORS = ("grad_error", "grad_error_rel", "grad_error_trained")


def identical(reference: dict, other: dict) -> bool:
    if not np.array_equal(reference.indices, other.indices):
        return False
    close = np.allclose(other.weights, reference.weights, rtol=1e-6, atol=0)
    return bool(close and all(_near(other.get(key), reference.get(key)) for key in GRAD_ERRORS))


def _near(value: float | None, reference: float | None) -> bool:
    """Both missing, or within 1e-6 (relative to the reference when it is above 1)."""
    if value is None or reference is None:
        return value is reference
    return abs(value - reference) <= 1e-6 * max(1.0, abs(reference))


# --- the run -------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> None:
    if args.small:
        args.examples, args.classes, args.dim = SMALL["examples"], SMALL["classes"], SMALL["dim"]
    shard_counts = [int(s) for s in args.shards.split(",")]
    private = None if "RAY_TMPDIR" in os.environ else tempfile.mkdtemp(prefix="rs", dir="/tmp")
    if private:  # the cluster's address file stays private: no other program joins this cluster
        os.environ["RAY_TMPDIR"] = private
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    began = time.perf_counter()
    data = make_summaries(args.examples, args.classes, args.dim, args.batch_size, args.seed)
    print(f"ground set: {args.examples} examples, {args.classes} classes, D = {args.dim}; per example "
          f"{(data['errors'].nbytes + data['features'].nbytes) / 2**20:.0f} MB, PB {len(data['rows'])} batches of "
          f"{args.batch_size}: {data['rows'].nbytes / 2**20:.0f} MB (made in {time.perf_counter() - began:.1f} s)",
          flush=True)
    store = int(1.5 * (data["rows"].nbytes + data["errors"].nbytes + data["features"].nbytes)) + (200 << 20)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"head": 1}, "include_dashboard": False, "object_store_memory": store})
    try:
        for i in range(max(shard_counts)):
            cluster.add_node(num_cpus=1, resources={f"worker_{i}": 1}, object_store_memory=store // 2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        results = measure(ray, data, args, shard_counts)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if private:
            shutil.rmtree(private, ignore_errors=True)
    report(results, shard_counts)


def measure(ray, data: dict, args, shard_counts: list[int]) -> dict:
    head = {"num_cpus": 0, "num_gpus": 0, "resources": {"head": 0.01}}
    k = max(1, round(args.budget * args.examples))
    results = {}
    for strategy in STRATEGIES:
        pb = strategy.endswith("-pb")
        n_ground = len(data["rows"]) if pb else args.examples
        n_select = min(n_ground, -(-k // args.batch_size)) if pb else k
        sizes = data["sizes"] if pb else None
        chunks = put_chunks(ray, data, strategy, args.chunk_examples, args.batch_size)
        results[strategy, "single"] = _single(ray, strategy, chunks, n_ground, n_select, sizes, head)
        _print(strategy, "single", results[strategy, "single"], None)
        for s in shard_counts:
            run = _sharded(ray, strategy, s, chunks, n_ground, n_select, sizes, head)
            run["identical"] = identical(results[strategy, "single"]["answer"], run["answer"])
            results[strategy, s] = run
            _print(strategy, f"S={s}", run, results[strategy, "single"])
        del chunks
    return results


def _print(strategy: str, name: str, run: dict, single: dict | None) -> None:
    answer = run["answer"]
    same = "" if single is None else f"  identical {str(run['identical']).lower()}"
    nodes = f" on {run['nodes']} nodes" if "nodes" in run else ""
    print(f"{strategy:13s} {name:7s}{nodes:12s} round_s {run['round_s']:7.2f}  select_s {answer.select_s:7.2f}  "
          f"peak_mb {run['peak_mb']:8.1f}  moved_mb {run['moved_mb']:8.1f}  grad_error {answer.grad_error:.6f} "
          f"(rel {answer.grad_error_rel:.6f}, as trained {answer.grad_error_trained:.6f})"
          f"{same}", flush=True)
    if "shard_s" in run:  # where the coordinator waited on its shards
        print(" " * 22 + "waits: " + ", ".join(f"{k} {v:.2f} s" for k, v in run["shard_s"].items()), flush=True)


def report(results: dict, shard_counts: list[int]) -> None:
    select_s = [sum(results[s, n]["round_s"] for s in STRATEGIES) for n in shard_counts]
    peaks = [max(results[s, n]["peak_mb"] for s in STRATEGIES) for n in shard_counts]
    same = all(results[s, n]["identical"] for s in STRATEGIES for n in shard_counts)
    print()
    moved = [sum(results[s, n]["moved_mb"] for s in STRATEGIES) for n in shard_counts]
    print("per S, both strategies: " + ", ".join(
        f"S={n}: {t:.1f} s, peak {p:.0f} MB/shard ({p / peaks[0]:.2f}x S={shard_counts[0]}), moved {m:.0f} MB"
        for n, t, p, m in zip(shard_counts, select_s, peaks, moved)))
    if 1 in shard_counts and 4 in shard_counts:
        ratio = peaks[shard_counts.index(4)] / peaks[shard_counts.index(1)]
        print(f"claim: peak per shard at S = 4 is {ratio:.2f}x S = 1 (target <= {CLAIM_PEAK_RATIO}): "
              f"{'met' if ratio <= CLAIM_PEAK_RATIO else 'NOT met'}; identical={str(same).lower()}")
    print(f"scale: shards={','.join(map(str, shard_counts))} select_s={','.join(f'{t:.1f}' for t in select_s)} "
          f"peak_mb_per_shard={','.join(f'{p:.0f}' for p in peaks)} identical={str(same).lower()}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
