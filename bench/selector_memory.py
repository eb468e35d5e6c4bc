"""Selector memory against the bytes of the summaries it holds (issue 12, target: at most 2x).

Run from the repository root::

    python bench/selector_memory.py [--scale 1.0] [--seed 0]

For a mini-batch (PB) round and a per-example round it drives a ``service.selector.SelectorService`` as the
trainer does (request, then the gradient chunks one by one, then ``result``), in this process, with the
chunks' arrays made as they arrive and handed over (the selector holds the only reference, as with chunks
deserialised from Ray's object store). Measured side by side in one run:

- ``chunk_mb``: the bytes of every array in the round's chunks (ids, labels, rows or errors and features);
- ``traced_mb``: the peak of Python/numpy heap allocations (tracemalloc) from the first chunk to the answer;
- ``rss_mb``: the peak resident set above the level before the first chunk, sampled every millisecond
  (after a warm-up round, so imports, BLAS buffers and first-call costs are not counted).

``ratio = peak / chunk_mb``; the claim is ``traced ratio <= 2`` for both shapes. Each phase of the round (the
selector's ``_assemble``, the strategy's target, its OMP calls and matching errors, the full-gradient error of
the answer) is wrapped to report what it allocates above what was held when it started, so a ratio above 2
names the copies that cause it. Threads: one BLAS/OpenMP thread (threadpoolctl), as in ``bench/omp.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import service.selector as selector_module  # noqa: E402
import service.strategies as strategies_module  # noqa: E402
from protocol.messages import RoundRequest  # noqa: E402
from service.selector import SelectorService  # noqa: E402

CLAIM_RATIO = 2.0
MB = 1 << 20
# name: (strategy, ground, n_ground, n_classes, hidden, n_select, n_chunks)
SHAPES = {
    "pb": ("gradmatch-pb", "batch", 2500, 10, 512, 250, 10),  # 2500 batch rows of 10 + 10 * 512 floats
    "example": ("gradmatch", "example", 20000, 10, 512, 2000, 10),  # 20000 examples: errors (., 10), features (., 512)
}
PHASES = {  # module, function name, phase label
    (selector_module, "_assemble"): "assemble chunks",
    (selector_module, "gradient_errors"): "gradient errors",
    (strategies_module, "train_target"): "target",
    (strategies_module, "class_rows"): "class rows",
    (strategies_module, "_omp"): "OMP",
    (strategies_module, "residual_sq"): "matching error",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies n_ground and n_select (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic summaries (default 0)")
    return parser


class PhaseLog:
    """tracemalloc peak of each wrapped phase above what was allocated when it started; a wrapped function called
    inside another's phase counts in that phase.

    Each phase resets tracemalloc's peak, so the overall peak is folded together here: the peak before each
    phase, during it, and (read by the caller) after the last one.
    """

    def __init__(self):
        self.rows: dict[str, list] = {}  # label -> [calls, held at start (max), extra peak (max)]
        self.overall = 0
        self._originals: dict = {}
        self._inside = False

    @contextmanager
    def phase(self, label: str):
        held, before = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        try:
            yield
        finally:
            _, peak = tracemalloc.get_traced_memory()
            row = self.rows.setdefault(label, [0, 0, 0])
            row[0] += 1
            row[1], row[2] = max(row[1], held), max(row[2], peak - held)
            self.overall = max(self.overall, before, peak)
            tracemalloc.reset_peak()

    def wrap(self, module, name: str, label: str) -> None:
        function = self._originals[module, name] = getattr(module, name)

        def wrapped(*args, **kwargs):
            if self._inside:
                return function(*args, **kwargs)
            self._inside = True
            try:
                with self.phase(label):
                    return function(*args, **kwargs)
            finally:
                self._inside = False

        setattr(module, name, wrapped)

    def unwrap(self) -> None:
        for (module, name), function in self._originals.items():
            setattr(module, name, function)


class RssSampler:
    """Peak resident set size of this process, sampled every ``period_s`` seconds in a thread."""

    def __init__(self, period_s: float = 1e-3):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def make_chunk(shape: tuple, round_id: int, index: int, ids: np.ndarray, rng: np.random.Generator) -> dict:
    """One chunk as the trainer sends it: PB rows, or per-example errors and features (float32)."""
    _, ground, _, n_classes, hidden, _, _ = shape
    labels = rng.integers(0, n_classes, ids.size)
    chunk = {"round_id": round_id, "chunk_index": index, "ids": ids, "labels": labels}
    if ground == "batch":
        chunk["rows"] = (rng.standard_normal((ids.size, n_classes * (1 + hidden)), dtype=np.float32) + 0.1)
        return chunk
    logits = rng.standard_normal((ids.size, n_classes)).astype(np.float32)
    errors = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    errors[np.arange(ids.size), labels] -= 1.0
    chunk["errors"] = errors.astype(np.float32)
    chunk["features"] = np.maximum(rng.standard_normal((ids.size, hidden), dtype=np.float32), 0.0)
    return chunk


def request(shape: tuple, round_id: int, scale: float) -> dict:
    strategy, ground, n_ground, _, _, n_select, n_chunks = shape
    n_ground, n_select = int(n_ground * scale), max(1, int(n_select * scale))
    sizes = np.full(n_ground, 20) if ground == "batch" else None
    return RoundRequest(round_id=round_id, model_step=0, ground=ground, n_ground=n_ground, n_select=n_select,
                        n_chunks=n_chunks, seed=0, strategy=strategy, sizes=sizes).model_dump()


def run_round(service: SelectorService, shape: tuple, round_id: int, scale: float, seed: int) -> int:
    """Stream one round into ``service`` and wait for its answer; returns the bytes of its chunks."""
    asked = request(shape, round_id, scale)
    service.start_round(asked)
    rng, chunk_bytes = np.random.default_rng(seed), 0
    for index, ids in enumerate(np.array_split(rng.permutation(asked["n_ground"]), asked["n_chunks"])):
        chunk = make_chunk(shape, round_id, index, ids.astype(np.int64), rng)
        chunk_bytes += sum(v.nbytes for v in chunk.values() if isinstance(v, np.ndarray))
        service.add_chunk(chunk)
        del chunk  # the selector holds the only reference
    service.result(round_id, timeout_s=600)
    return chunk_bytes


def measure(name: str, scale: float, seed: int) -> dict:
    shape = SHAPES[name]
    service = SelectorService({"strategy": shape[0]})
    run_round(service, shape, 0, scale / 10, seed)  # warm-up: imports, BLAS buffers, first calls
    phases = PhaseLog()
    for (module, function), label in PHASES.items():
        phases.wrap(module, function, label)
    try:
        tracemalloc.start()
        with RssSampler() as rss:
            baseline = rss.peak
            start = time.perf_counter()
            chunk_bytes = run_round(service, shape, 1, scale, seed)
            wall_s = time.perf_counter() - start
        traced = max(tracemalloc.get_traced_memory()[1], phases.overall)
    finally:
        tracemalloc.stop()
        phases.unwrap()
    return {"name": name, "chunk": chunk_bytes, "traced": traced, "rss": rss.peak - baseline, "wall_s": wall_s,
            "phases": phases.rows}


def print_results(results: list[dict]) -> None:
    print(f"{'shape':>8} {'chunk_mb':>9} {'traced_mb':>9} {'ratio':>6} {'rss_mb':>8} {'ratio':>6} {'wall_s':>7}")
    for r in results:
        print(f"{r['name']:>8} {r['chunk'] / MB:>9.1f} {r['traced'] / MB:>9.1f} {r['traced'] / r['chunk']:>6.2f} "
              f"{r['rss'] / MB:>8.1f} {r['rss'] / r['chunk']:>6.2f} {r['wall_s']:>7.2f}")
    for r in results:
        print(f"\n{r['name']}: phase peaks (held when the phase started + what it allocated), x chunk bytes")
        for label, (calls, held, extra) in r["phases"].items():
            print(f"  {label:<20} calls {calls:>3}  held {held / r['chunk']:>5.2f}  +{extra / r['chunk']:>5.2f}"
                  f"  = {(held + extra) / r['chunk']:>5.2f}")


def main(args) -> None:
    threadpool_limits(limits=1)
    print(f"scale {args.scale}, seed {args.seed}, cpus {os.cpu_count()}, BLAS threads 1")
    results = [measure(name, args.scale, args.seed) for name in SHAPES]
    print_results(results)
    ratios = [r["traced"] / r["chunk"] for r in results]
    verdict = "PASS" if max(ratios) <= CLAIM_RATIO else "FAIL"
    shown = ", ".join(f"{r['name']}: {q:.2f}" for r, q in zip(results, ratios))
    print(f"\nclaim: selector peak (tracemalloc) <= {CLAIM_RATIO}x the chunk bytes it holds: {verdict} ({shown})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
