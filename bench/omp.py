"""OMP solver speed and accuracy against scikit-learn and the cost of one Gram product.

Run from the repository root::

    python bench/omp.py [--repeats 3] [--seed 0]

For each problem (gradient-like float32 matrices, see :func:`gradient_rows`) it measures, in one run,
the best of ``--repeats`` wall times of

- ours: ``service.omp.orthogonal_matching_pursuit`` with the paper's settings (lam=0.5, eps=1e-10,
  non-negative weights);
- sklearn: ``sklearn.linear_model.orthogonal_mp_gram`` given ``Gram = A A^T`` and ``A b`` (its time
  includes the Gram product; it has no regulariser, returns signed weights, and may stop before
  ``k`` atoms when the Gram matrix is numerically singular);
- floor: one float32 ``A @ A.T``, the faster of numpy and torch (the least any Gram-based solver pays).

Each repeat times all four in a rotating order; the best of ``--repeats`` is kept (after one untimed
warm-up call each).

Errors are relative, ``||A[S]^T w - b|| / ||b||`` in float64. The last line states the claim.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.linear_model import orthogonal_mp_gram

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.omp import orthogonal_matching_pursuit  # noqa: E402

# (n_candidates, n_classes_in_rows, hidden_dim, budget): dim = n_classes_in_rows * (1 + hidden_dim)
PROBLEMS = [
    (2500, 10, 512, 250),  # per-example gradients, all logits: 2500 x 5130
    (5000, 1, 512, 500),  # per-class, per-gradient: one logit column, 5000 x 513
    (3000, 10, 50, 300),  # small head: 3000 x 510
]
CLAIM_SHAPE = (2500, 5130)
CLAIM_RATIO = 1.25


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, best kept (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic gradients (default 0)")
    return parser


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


def best_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time of each callable over ``repeats`` rounds, and each one's last return value.

    Every callable runs once untimed first (allocator and thread-pool warm-up); each round then runs
    all of them, in an order rotated round by round so that none always follows the same neighbour.
    """
    outputs = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            outputs[name] = fns[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def relative_error(rows: np.ndarray, target: np.ndarray, indices, weights) -> float:
    approx = np.asarray(weights, np.float64) @ rows[np.asarray(indices)].astype(np.float64)
    target64 = target.astype(np.float64)
    return float(np.linalg.norm(approx - target64) / np.linalg.norm(target64))


def run_sklearn(rows: np.ndarray, target: np.ndarray, budget: int):
    """scikit-learn's OMP on the Gram matrix (computed here, inside the timing): indices, weights."""
    gram = rows @ rows.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # it may stop early on dependent atoms
        coef = orthogonal_mp_gram(gram, rows @ target, n_nonzero_coefs=budget, copy_Gram=False)
    indices = np.flatnonzero(coef)
    return indices, coef[indices]


def measure(problem, repeats: int, seed: int) -> dict:
    n, n_columns, hidden, budget = problem
    rows, target = gradient_rows(n, n_columns, hidden, seed)
    tensor = torch.from_numpy(rows)
    times, out = best_times(
        {
            "floor_numpy": lambda: rows @ rows.T,
            "floor_torch": lambda: tensor @ tensor.T,
            "ours": lambda: orthogonal_matching_pursuit(rows, target, budget),
            "sklearn": lambda: run_sklearn(rows, target, budget),
        },
        repeats,
    )
    floor_by = "numpy" if times["floor_numpy"] <= times["floor_torch"] else "torch"
    ours, (sk_idx, sk_w) = out["ours"], out["sklearn"]
    return {
        "shape": rows.shape, "k": budget, "ours_s": times["ours"], "sklearn_s": times["sklearn"],
        "floor_s": times[f"floor_{floor_by}"], "floor_by": floor_by, "ours_err": ours.error,
        "sklearn_err": relative_error(rows, target, sk_idx, sk_w), "method": ours.method,
        "n_selected": ours.indices.size, "stop": ours.stop_reason,
    }


def print_table(results: list[dict]) -> None:
    header = (f"{'shape':>12} {'k':>5} {'ours_s':>8} {'sklearn_s':>9} {'floor_s':>8} {'ours/floor':>10} "
              f"{'ours_err':>9} {'sklearn_err':>11} {'method':>6} {'selected':>8} {'stop':>8} floor_by")
    print(header)
    for r in results:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        print(f"{shape:>12} {r['k']:>5} {r['ours_s']:>8.4f} {r['sklearn_s']:>9.4f} {r['floor_s']:>8.4f} "
              f"{r['ours_s'] / r['floor_s']:>10.3f} {r['ours_err']:>9.4f} {r['sklearn_err']:>11.4f} "
              f"{r['method']:>6} {r['n_selected']:>8} {r['stop']:>8} {r['floor_by']}")


def main(args) -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"repeats {args.repeats}, seed {args.seed}")
    results = [measure(problem, args.repeats, args.seed) for problem in PROBLEMS]
    print_table(results)
    claim = next(r for r in results if tuple(r["shape"]) == CLAIM_SHAPE)
    ratio = claim["ours_s"] / claim["floor_s"]
    verdict = "PASS" if ratio <= CLAIM_RATIO else "FAIL"
    print(f"claim: ours <= {CLAIM_RATIO}x floor at {CLAIM_SHAPE[0]}x{CLAIM_SHAPE[1]}: {verdict} (ratio={ratio:.3f})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
