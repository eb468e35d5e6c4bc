"""OMP solver speed and accuracy against scikit-learn and the cost of one Gram product.

Run from the repository root::

    python bench/omp.py [--repeats 7] [--seed 0] [--threads 1] [--device cpu|cuda|auto] [--json FILE] [--small]

For each problem (gradient-like float32 matrices, see :func:`gradient_rows`) it measures, in one run,
the best of ``--repeats`` wall times of

- ours: ``service.omp.orthogonal_matching_pursuit`` with the paper's settings (lam=0.5, eps=1e-10,
  non-negative weights), each method forced (``gram``, ``rows``); ``ours`` is the time of the method that
  ``method="auto"`` (the cost model, ``service.omp.choose_method``) picks, the other shows whether it chose well;
- sklearn: ``sklearn.linear_model.orthogonal_mp_gram`` given ``Gram = A A^T`` and ``A b`` (its time
  includes the Gram product; it has no regulariser, returns signed weights, and may stop before
  ``k`` atoms when the Gram matrix is numerically singular);
- floor: one float32 ``A @ A.T``, the faster of numpy and torch (the least any Gram-based solver pays; on
  a CUDA run torch's on the GPU).

Each repeat times every contender in a rotating order; the best of ``--repeats`` is kept (after one untimed
warm-up call each).

Device: ``--device cuda`` (or ``auto`` where CUDA is visible) puts each problem's matrix and target on the GPU as
torch tensors: ours is given them (its large products, ``A A^T`` or ``A r``, run there; the pick loop stays float64
numpy on the CPU, ``service.omp``), and the floor is torch's ``A @ A.T`` on the GPU alone. Each timed call is
bracketed by ``torch.cuda.synchronize()``. scikit-learn is CPU-only and is skipped on a CUDA run (the table
shows ``-``; ``--device cpu`` compares with it). ``--device cuda`` without a visible CUDA device exits with
code 2 and one line saying so. ``--json FILE`` also writes the results (times, ratios, the claim) as JSON;
``--small`` runs one small problem instead of the three (a quick check of the bench itself, not a measurement).

Threads: ``--threads`` (default 1) caps every BLAS and OpenMP pool of the process (threadpoolctl) and torch's
intra-op pool (``torch.set_num_threads``) before anything is timed, so the floor and the solver run on the
same number of threads. One thread is the default because the test machine has 2 cores shared with other
processes (a second BLAS thread that has to wait for a busy core makes timings swing by 10x), and because in
a run the selector shares the 2 cores with the trainer. The pick loop itself always runs single-threaded.

Errors are relative, ``||A[S]^T w - b|| / ||b||`` in float64. The last line states the claim: ours within
``CLAIM_RATIO`` of the floor at every shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import orthogonal_mp_gram
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.omp import orthogonal_matching_pursuit  # noqa: E402

# (n_candidates, n_classes_in_rows, hidden_dim, n_select): dim = n_classes_in_rows * (1 + hidden_dim)
PROBLEMS = [
    (2500, 10, 512, 250),  # per-example gradients, all logits: 2500 x 5130
    (5000, 1, 512, 500),  # per-class, per-gradient: one logit column, 5000 x 513
    (3000, 10, 50, 300),  # small head: 3000 x 510
]
SMALL_PROBLEMS = [(400, 10, 10, 40)]  # --small: 400 x 110
CLAIM_RATIO = 1.3
DEVICES = ("cpu", "cuda", "auto")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per contender, best kept (default 7)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic gradients (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS, OpenMP and torch threads for every contender (default 1)")
    parser.add_argument("--device", default="cpu", choices=DEVICES,
                        help="where the problems' matrices and the floor's product live: cpu (default), cuda, or "
                        "auto (cuda where visible); scikit-learn runs only on a cpu run")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--small", action="store_true", help="one small problem instead of the three (a quick "
                        "check, not a measurement)")
    return parser


def resolve_device(choice: str) -> torch.device:
    """``--device`` as a torch device; ValueError (one line: the flag, the value, the rule) for ``cuda`` where
    no CUDA device is visible."""
    if choice not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {choice!r}")
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "--device cuda needs one, use --device cpu or auto")
    return torch.device("cuda:0" if choice == "cuda" or (choice == "auto" and cuda) else "cpu")


def gradient_rows(n: int, n_columns: int, hidden: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Last-layer cross-entropy gradients of a random ReLU network, and their sum as target.

    Each row is ``g_b (x) [1, h]`` flattened per logit column (bias first), with
    ``g_b = softmax(z) - onehot(y)``. With ``n_columns == 1`` every example has class 0 and only
    that logit's column is kept (the per-class, per-gradient variant).

    Returns
    -------
    rows : (n, n_columns * (1 + hidden)) float32
    target : (n_columns * (1 + hidden),) float32, the sum of the rows
    """
    rng = np.random.default_rng(seed)
    n_classes = max(n_columns, 10)
    x = rng.standard_normal((n, 32)).astype(np.float32)
    w1 = rng.standard_normal((32, hidden)).astype(np.float32) / np.sqrt(32)
    h = np.maximum(x @ w1, 0.0)  # (n, hidden)
    y = np.zeros(n, dtype=np.int64) if n_columns == 1 else rng.integers(0, n_classes, n)
    w2 = rng.standard_normal((hidden, n_classes)).astype(np.float32) / np.sqrt(hidden)
    z = h @ w2 + 2.0 * np.eye(n_classes, dtype=np.float32)[y]  # a partly trained classifier
    p = np.exp(z - z.max(axis=1, keepdims=True))
    g_b = p / p.sum(axis=1, keepdims=True) - np.eye(n_classes, dtype=np.float32)[y]  # (n, classes)
    g_b = g_b[:, :n_columns]
    h1 = np.concatenate([np.ones((n, 1), np.float32), h], axis=1)  # bias column first
    rows = (g_b[:, :, None] * h1[:, None, :]).reshape(n, -1).astype(np.float32)
    return np.ascontiguousarray(rows), rows.sum(axis=0, dtype=np.float64).astype(np.float32)


def best_times(fns: dict, repeats: int, sync=None) -> tuple[dict, dict]:
    """Best wall time of each callable over ``repeats`` rounds, and each one's last return value.

    Every callable runs once untimed first (allocator and thread-pool warm-up); each round then runs
    all of them, in an order rotated round by round so that none always follows the same neighbour.
    ``sync`` (``torch.cuda.synchronize`` on a CUDA run) is called before each timed call starts and before it
    is stopped, so that work queued on the GPU is counted where it was asked for.
    """
    sync = sync or (lambda: None)
    outputs = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            outputs[name] = fns[name]()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def relative_error(rows: np.ndarray, target: np.ndarray, indices, weights) -> float:
    approx = np.asarray(weights, np.float64) @ rows[np.asarray(indices)].astype(np.float64)
    target64 = target.astype(np.float64)
    return float(np.linalg.norm(approx - target64) / np.linalg.norm(target64))


def run_sklearn(rows: np.ndarray, target: np.ndarray, n_select: int):
    """scikit-learn's OMP on the Gram matrix (computed here, inside the timing): indices, weights."""
    gram = rows @ rows.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it may stop early on dependent atoms
        coef = orthogonal_mp_gram(gram, rows @ target, n_nonzero_coefs=n_select, copy_Gram=False)
    indices = np.flatnonzero(coef)
    return indices, coef[indices]


def measure(problem, repeats: int, seed: int, device: torch.device = torch.device("cpu")) -> dict:
    n, n_columns, hidden, n_select = problem
    rows, target = gradient_rows(n, n_columns, hidden, seed)
    on_cpu = device.type == "cpu"
    if on_cpu:  # numpy in, as the selector's CPU strategies give it
        A, b = rows, target
        tensor = torch.from_numpy(rows)
        contenders = {"floor_numpy": lambda: rows @ rows.T, "floor_torch": lambda: tensor @ tensor.T}
    else:  # device tensors in: ours runs its large products there
        A, b = torch.from_numpy(rows).to(device), torch.from_numpy(target).to(device)
        contenders = {"floor_torch": lambda: A @ A.T}
    contenders["gram"] = lambda: orthogonal_matching_pursuit(A, b, n_select, method="gram")
    contenders["rows"] = lambda: orthogonal_matching_pursuit(A, b, n_select, method="rows")
    if on_cpu:
        contenders["sklearn"] = lambda: run_sklearn(rows, target, n_select)
    times, out = best_times(contenders, repeats, sync=None if on_cpu else torch.cuda.synchronize)
    floor_by = "numpy" if on_cpu and times["floor_numpy"] <= times["floor_torch"] else "torch"
    method = orthogonal_matching_pursuit(A, b, n_select).method  # what method="auto" runs
    ours = out[method]
    sklearn_s = sklearn_err = None
    if on_cpu:
        sk_idx, sk_w = out["sklearn"]
        sklearn_s, sklearn_err = times["sklearn"], relative_error(rows, target, sk_idx, sk_w)
    return {
        "shape": rows.shape, "k": n_select, "device": str(device), "floor_s": times[f"floor_{floor_by}"],
        "floor_by": floor_by, "ours_s": times[method], "gram_s": times["gram"], "rows_s": times["rows"],
        "sklearn_s": sklearn_s, "ours_err": ours.error, "sklearn_err": sklearn_err, "method": ours.method,
        "n_selected": ours.indices.size, "stop": ours.stop_reason,
        "same_support": np.array_equal(out["gram"].indices, out["rows"].indices),
    }


def print_table(results: list[dict]) -> None:
    print(f"{'shape':>10} {'k':>4} {'floor_s':>8} {'ours_s':>7} {'ours/floor':>10} {'method':>6} {'gram/fl':>7} "
          f"{'rows/fl':>7} {'sklearn/fl':>10} {'ours_err':>8} {'skl_err':>8} {'selected':>8} {'stop':>7} "
          f"{'same_S':>6} floor_by")
    for r in results:
        shape, floor = f"{r['shape'][0]}x{r['shape'][1]}", r["floor_s"]
        print(f"{shape:>10} {r['k']:>4} {floor:>8.4f} {r['ours_s']:>7.4f} {r['ours_s'] / floor:>10.3f} "
              f"{r['method']:>6} {r['gram_s'] / floor:>7.3f} {r['rows_s'] / floor:>7.3f} "
              f"{_ratio(r['sklearn_s'], floor):>10} {r['ours_err']:>8.4f} {_number(r['sklearn_err']):>8} "
              f"{r['n_selected']:>8} {r['stop']:>7} {str(r['same_support']):>6} {r['floor_by']}")


def _ratio(seconds, floor: float) -> str:
    return "-" if seconds is None else f"{seconds / floor:.3f}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def claim(results: list[dict]) -> tuple[str, dict]:
    """The claim line (ours within ``CLAIM_RATIO`` of the floor at every shape) and ours over the floor by shape."""
    ratios = {f"{r['shape'][0]}x{r['shape'][1]}": r["ours_s"] / r["floor_s"] for r in results}
    verdict = "PASS" if max(ratios.values()) <= CLAIM_RATIO else "FAIL"
    shown = ", ".join(f"{shape}: {q:.3f}" for shape, q in ratios.items())
    where = f" on {results[0]['device']}" if results and results[0]["device"] != "cpu" else ""
    return f"claim: ours <= {CLAIM_RATIO}x floor{where} at every shape: {verdict} ({shown})", ratios


def main(args) -> int:
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threadpool_limits(limits=args.threads)  # every BLAS and OpenMP pool of the process
    torch.set_num_threads(args.threads)
    where = "cpu" if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)}); sklearn " \
        "skipped (CPU-only)"
    print(f"torch {torch.__version__}, threads {args.threads} (torch {torch.get_num_threads()}), "
          f"cpus {os.cpu_count()}, repeats {args.repeats}, seed {args.seed}, device {where}")
    problems = SMALL_PROBLEMS if args.small else PROBLEMS
    results = [measure(problem, args.repeats, args.seed, device) for problem in problems]
    print_table(results)
    line, ratios = claim(results)
    if args.json:
        rows = [{**r, "shape": list(r["shape"]), "n_selected": int(r["n_selected"]),
                 "same_support": bool(r["same_support"])} for r in results]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "claim": line, "claim_ratio": CLAIM_RATIO,
                                               "ours_over_floor": ratios, "results": rows}, indent=2))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
