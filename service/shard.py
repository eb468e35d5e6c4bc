"""One shard of a sharded selector: holds the parts of a round routed to it and computes on its classes
(per-class solves, partial Gram matrices and products, error sums) for the coordinator
(``service.coordinator``). docs/scaling.md.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import numpy as np

from protocol.config import CraigSelector
from protocol.messages import RoundRequest, ValidationSet
from protocol.routes import BatchPart, ExamplePart, ShardPart
from service import craig
from service.strategies import (
    GroundSet, batch_error_sums, class_error_sums, class_rows, class_target, flat_gradient, run_omp, select_glister,
    train_target,
)

BLOCK_BYTES = 64 << 20  # float64 copies of row blocks (CRAIG-PB's Gram, the gradient sums) stay below this


@dataclass
class _ShardGround:
    """A shard's part of a round's summaries.

    ``ids`` ascend; the arrays hold their rows in storage order, ``positions`` (storage row of each id in
    ``ids``) when that is not the id order (None when it is).
    """

    ids: np.ndarray
    positions: np.ndarray | None = None
    labels: np.ndarray | None = None
    errors: np.ndarray | None = None  # (n_s, C) float32
    features: np.ndarray | None = None  # (n_s, D) float32
    rows: np.ndarray | None = None  # (n_batches, cols_s) float32, always in id order
    goal: np.ndarray | None = None  # GRAD-MATCH-PB: its part of the target, in the rows' dtype
    _by_class: tuple | None = field(default=None, repr=False)  # storage rows by class and where each class starts

    def stored(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Storage rows of ``ids`` (all ids when None), in the order given."""
        at = np.arange(len(self.ids)) if ids is None else np.searchsorted(self.ids, ids)
        return at if self.positions is None else self.positions[at]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ids, self.labels, self.errors, self.features, self.rows) if a is not None)

    def members(self, c: int) -> np.ndarray:
        """Storage rows of class ``c``'s examples, in ground id order."""
        if self._by_class is None:
            stored = self.stored()  # storage rows in id order
            by_class = stored[np.argsort(self.labels[stored], kind="stable")]  # by class, ids ascending within
            self._by_class = by_class, np.searchsorted(self.labels[by_class], np.arange(self.errors.shape[1] + 1))
        by_class, starts = self._by_class
        return by_class[starts[c]:starts[c + 1]]


class _Fill:
    """A shard's arrays of one round, written as its parts arrive: no list of parts, no stacking copy.

    A part that says ``n_rows`` (mini-batches, the request known) is written at the rows of its ids; others
    are appended in arrival order into arrays reserved for ``capacity`` rows, of which only the rows written
    take memory (an array that fills up is doubled).
    """

    def __init__(self, n_rows: int | None):
        self.by_id = n_rows
        self.arrays: dict[str, np.ndarray] = {}
        self.ids: list[np.ndarray] = []
        self.n = 0

    def put(self, part: ShardPart) -> None:
        ids = np.array(part.ids)
        capacity = part.capacity if isinstance(part, ExamplePart) else None  # a BatchPart's n_rows: see __init__
        start, stop = self.n, self.n + len(ids)
        for name, values in part.arrays().items():
            array = self.arrays.get(name)
            size = self.by_id if self.by_id is not None else max(stop, capacity or 0)
            if array is None:
                array = self.arrays[name] = np.empty((size, *values.shape[1:]), values.dtype)
            elif self.by_id is None and stop > len(array):
                grown = np.empty((max(stop, 2 * len(array)), *values.shape[1:]), values.dtype)
                grown[:start] = array[:start]
                array = self.arrays[name] = grown
            if self.by_id is not None:
                array[ids] = values
            else:
                array[start:stop] = values
        self.ids.append(ids)
        self.n = stop

    def ground(self) -> _ShardGround:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        if self.by_id is not None:
            if not np.array_equal(np.sort(ids), np.arange(self.by_id)):
                raise ValueError(f"holds {np.unique(ids).size} distinct of the {self.by_id} mini-batches")
            return _ShardGround(ids=np.arange(self.by_id), **self.arrays)
        arrays = {name: array[:self.n] for name, array in self.arrays.items()}
        positions = None if np.all(np.diff(ids) > 0) else np.argsort(ids, kind="stable")
        if positions is not None and "rows" in arrays:  # mini-batches sent before their request, out of order
            arrays["rows"], positions = arrays["rows"][positions], None
            ids = np.sort(ids)
        return _ShardGround(ids=ids if positions is None else ids[positions], positions=positions, **arrays)


class ShardService:
    """One shard: keeps the parts of a round routed to it and computes on them; thread-safe.

    Parameters
    ----------
    index : int
        The shard's position among the coordinator's shards.
    device : str
        Where the large products run (``"cpu"`` or a CUDA device).
    """

    def __init__(self, index: int, device: str = "cpu"):
        self.index, self.device = index, device
        self._lock = threading.Lock()
        self._fills: dict[int, _Fill] = {}
        self._grounds: dict[int, _ShardGround] = {}
        self._latest = -1
        self._base_kib = status_kib("VmRSS")

    # receiving ---------------------------------------------------------------------------------
    def add_part(self, round_id: int, part: ShardPart) -> None:
        """Copy one part (``protocol.routes.ExamplePart`` or ``BatchPart``) into the round's arrays (the
        object-store copy is freed once this returns). Anything else is a ``TypeError`` that names it; the
        coordinator's wait on the call then fails the round."""
        if not isinstance(part, (ExamplePart, BatchPart)):
            raise TypeError(f"part: a {type(part).__name__}, must be a protocol.routes.ExamplePart or BatchPart")
        with self._lock:
            if round_id < self._latest:
                return  # a superseded round's late part
            if round_id > self._latest:
                self._latest = round_id
                self._drop_before(round_id)
                reset_peak()
            fill = self._fills.setdefault(round_id, _Fill(part.n_rows if isinstance(part, BatchPart) else None))
            fill.put(part)

    def gather(self, round_id: int, n_expected: int) -> int:
        """Close the round's arrays; they must hold the ``n_expected`` rows routed here. Returns their bytes."""
        with self._lock:
            fill = self._fills.pop(round_id, None) or _Fill(None)
        if fill.n != n_expected:
            raise ValueError(f"holds {fill.n} of the {n_expected} rows routed to it for round {round_id} "
                             "(restarted since they were sent?)")
        ground = fill.ground()
        with self._lock:
            self._grounds[round_id] = ground
        return ground.nbytes()

    def drop(self, round_id: int | None = None) -> None:
        """Forget round ``round_id`` (every round when None)."""
        with self._lock:
            for store in (self._fills, self._grounds):
                for key in [k for k in store if round_id is None or k == round_id]:
                    del store[key]

    # per-class strategies ----------------------------------------------------------------------
    def solve_classes(self, round_id: int, config, budgets: dict, validation: ValidationSet | None) -> dict:
        """GRAD-MATCH or CRAIG on each class ``c`` of ``budgets`` (``{c: k_c}``, ``k_c >= 1``).

        Returns ``{c: (local, weights)}``: positions among the class's examples (in ground id order) and
        their weights, before any padding.
        """
        ground = self._ground(round_id)
        answers = {}
        for c, k_c in budgets.items():
            members = ground.members(c)
            if isinstance(config, CraigSelector):
                gram = craig.gradient_gram(ground.errors[members], ground.features[members])
                answers[c] = craig.select_craig(gram, int(k_c))
            else:
                answers[c] = self._class_omp(config, ground, members, int(c), int(k_c), validation)
        return answers

    def _class_omp(self, config, ground, members, c: int, k_c: int, validation):
        rows = class_rows(ground.errors[members], ground.features[members], c)
        target = class_target(rows, c, validation if config.valid else None)
        if np.linalg.norm(target) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        result = run_omp(config, rows, target, k_c, self.device)
        return np.asarray(result.indices, dtype=np.int64), np.asarray(result.weights, dtype=np.float64)

    def select_whole(self, round_id: int, config, request: RoundRequest, validation) -> tuple:
        """A strategy that needs the whole ground set (GLISTER): ``(indices, weights, target)``."""
        ground = self._ground(round_id)
        at = ground.stored()
        whole = GroundSet(labels=ground.labels[at], errors=ground.errors[at], features=ground.features[at],
                          validation=validation)
        selection = select_glister(config, request, whole, self.device)
        return selection.indices, selection.weights, selection.target

    # PB strategies -----------------------------------------------------------------------------
    def gram(self, round_id: int, dtype: str, target: np.ndarray | None, sizes: np.ndarray | None) -> tuple:
        """``(A_s A_s^T, A_s b_s, ||b_s||^2)`` over this shard's columns.

        ``dtype == "float32"`` (GRAD-MATCH-PB): products in the rows' dtype with ``b_s`` rounded to it, as the
        single selector's OMP computes them; ``b_s`` is ``target`` or, when None, the training gradient of the
        columns. ``dtype == "float64"`` (CRAIG-PB): the float64 Gram matrix only (``A_s b_s`` and the norm None).
        """
        rows = self._ground(round_id).rows
        if dtype == "float64":
            return _gram64(rows), None, None
        goal = (train_target(rows, sizes) if target is None else np.asarray(target)).astype(rows.dtype)
        self._ground(round_id).goal = goal
        gram = _product(rows, rows, self.device)
        return gram, rows @ goal, float(goal.astype(np.float64) @ goal.astype(np.float64))

    def support(self, round_id: int, indices: np.ndarray) -> tuple:
        """Float64 ``(A_S A_S^T, A_S b)`` of the chosen rows over this shard's columns (the exact re-solve)."""
        ground = self._ground(round_id)
        rows = ground.rows[indices].astype(np.float64)
        return rows @ rows.T, rows @ ground.goal.astype(np.float64)

    # grad_error --------------------------------------------------------------------------------
    def error_sums(self, round_id: int, indices: np.ndarray, weights: np.ndarray, sizes: np.ndarray | None,
                   target: np.ndarray | None = None) -> dict:
        """Partial sums of the gradient errors (docs/metrics.md) over this shard's data, and its memory figures.

        Examples: ``indices`` are ground ids held here and ``weights`` their raw weights; returns ``full`` and
        ``subset``, ``service.strategies.example_sums`` of these examples ((C + C*D,) each). Mini-batches:
        ``indices`` and ``weights`` are the whole subset and ``target`` this shard's columns of Eq. 1's target
        (None: the training gradient); returns ``service.strategies.batch_error_sums`` over this shard's columns.
        """
        ground = self._ground(round_id)
        if ground.rows is not None:
            sums = batch_error_sums(ground.rows, sizes, indices, weights, target)
        else:
            local = ground.stored(indices)
            scaled = ground.errors[local].astype(np.float64) * np.asarray(weights, dtype=np.float64)[:, None]
            sums = {"full": _blocked_flat_gradient(ground.errors, ground.features),
                    "subset": flat_gradient(scaled, ground.features[local])}
        peak = status_kib("VmHWM")
        sums["peak_bytes"] = None if peak is None or self._base_kib is None else (peak - self._base_kib) * 1024
        sums["held_bytes"] = ground.nbytes()
        return sums

    def class_errors(self, round_id: int, picks: dict, validation: ValidationSet | None) -> dict:
        """Per-class GRAD-MATCH's Eq. 1 for classes held here (``service.strategies.class_error_sums``).

        ``picks`` is ``{c: (local, weights)}``: the final (padded) picks of class c as positions among its
        examples in ground id order, and their raw weights (empty for a class with none chosen).
        ``validation`` holds this shard's classes' validation examples, or None to match training gradients.
        Returns ``{c: (residual^2, ||target||^2)}``.
        """
        ground = self._ground(round_id)
        answers = {}
        for c, (local, weights) in picks.items():
            members = ground.members(c)
            answers[c] = class_error_sums(ground.errors[members], ground.features[members], int(c), local,
                                          np.asarray(weights, dtype=np.float64), validation)
        return answers

    def _ground(self, round_id: int) -> _ShardGround:
        with self._lock:
            ground = self._grounds.get(round_id)
        if ground is None:
            raise ValueError(f"holds no gathered data of round {round_id} (restarted since, or superseded)")
        return ground

    def _drop_before(self, round_id: int) -> None:
        for store in (self._fills, self._grounds):
            for key in [k for k in store if k < round_id]:
                del store[key]


def _product(a: np.ndarray, b: np.ndarray, device: str) -> np.ndarray:
    """``a @ b.T`` where the shard computes (numpy on the CPU, torch on a GPU)."""
    if device == "cpu":
        return a @ b.T
    import torch

    a_t = torch.from_numpy(a).to(device)
    b_t = a_t if b is a else torch.from_numpy(b).to(device)
    return (a_t @ b_t.T).cpu().numpy()


def _gram64(rows: np.ndarray) -> np.ndarray:
    """Float64 ``rows rows^T``, column block by column block (no float64 copy of all rows): (n, n)."""
    n, width = rows.shape
    gram = np.zeros((n, n))
    step = max(1, BLOCK_BYTES // max(1, 8 * n))
    for start in range(0, width, step):
        block = rows[:, start:start + step].astype(np.float64)
        gram += block @ block.T
    return gram


def _blocked_flat_gradient(errors: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``flat_gradient`` of all rows, a block of rows at a time (float64 copies of one block only)."""
    step = max(1, BLOCK_BYTES // max(1, 8 * (errors.shape[1] + features.shape[1])))
    total = np.zeros(errors.shape[1] * (1 + features.shape[1]))
    for start in range(0, len(errors), step):
        total += flat_gradient(errors[start:start + step], features[start:start + step])
    return total


def status_kib(name: str) -> int | None:
    """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{name}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak() -> None:
    """Restart the peak resident size (VmHWM) from the current one (Linux >= 4.0); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass

