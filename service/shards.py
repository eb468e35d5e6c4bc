"""Selection sharded by class: a coordinator with the single selector's interface over S shard actors.

Per-class problems are independent, and a mini-batch's last-layer gradient splits into per-class blocks of
columns (bias column c and weight block c), so the work divides by class without changing the answer:

- GRAD-MATCH and CRAIG: each shard holds its classes' examples (``errors`` (n_s, C), ``features`` (n_s, D))
  and solves those classes; the coordinator computes the class budgets from all labels, as the single
  selector does, and merges (padding short classes with the round's generator, in class order).
- GRAD-MATCH-PB and CRAIG-PB: each shard holds every mini-batch's row restricted to its classes' columns,
  ``A_s`` (n_batches, |K_s| (1 + D)), and returns ``A_s A_s^T``, ``A_s b_s`` and ``||b_s||^2``; the coordinator
  sums them and runs the pursuit (``omp_gram``) or the facility location on the summed Gram matrix.
  GRAD-MATCH-PB's weights are then re-solved exactly on the support from float64 partial products.
- RANDOM needs no summaries to choose (the coordinator draws it); GLISTER's greedy couples all classes
  through the look-ahead step, so its whole ground set goes to shard 0.
- ``grad_error``, ``grad_error_rel`` and ``grad_error_trained`` (docs/metrics.md) are summed from per-shard
  partial sums for every strategy; per-class GRAD-MATCH's Eq. 1 from per-class residuals each shard computes
  for its classes' final (padded) picks.

Routing: a chunk from the trainer arrives at the coordinator, is split by shard and each part is sent to its
shard at once (Ray stores it in the object store); the coordinator keeps only the ids and labels. The class
map of such a round is fixed as its chunks arrive: classes are dealt to shards by the class counts of the
previous round (largest first, to the least-loaded shard), and a class not seen before goes to the
least-loaded shard when it first appears. PB rounds split the C classes into S contiguous ranges (every class
block has the same width). Summary workers instead ask for the round's map up front (``routes``: per-example
classes dealt by the ground set's class counts), split their chunks themselves and send the parts straight to
the shards, and only ids and labels to the coordinator (``send_routed``, ``add_routed``). The map balances the
load only: any map gives the same subset. See docs/scaling.md.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.optimize
from pydantic import ValidationError

from protocol.config import (
    CraigPBSelector, CraigSelector, GlisterSelector, GradMatchPBSelector, GradMatchSelector, RandomSelector,
)
from protocol.errors import RoundFailed, one_line
from protocol.messages import GradientChunk, RoundRequest, ValidationSet
from service import craig
from service.omp import omp_gram
from service.selector import (
    CHUNK_GRACE_S, REQUEST_GRACE_S, RoundClock, SelectorService, _Round,
)
from service.strategies import (
    GradientErrors, GroundSet, Selection, _omp, batch_error_sums, class_budgets, class_error_sums, class_picks,
    class_rows, class_target, flat_error_sums, flat_gradient, matched_in_class_columns, pad_selection, round_rng,
    select_glister, select_random, train_target, validation_target,
)

log = logging.getLogger(__name__)
DEFAULT_WAIT_S = 600.0  # a shard wait before the trainer has asked for the round's result (and so its deadline)
BLOCK_BYTES = 64 << 20  # float64 copies of row blocks (CRAIG-PB's Gram, the gradient sums) stay below this
ZERO_SUM_RTOL = 1e-4  # softmax errors sum to zero over the classes, to float32 rounding
ONE_SHARD = (GlisterSelector,)


# --- who owns what --------------------------------------------------------------------------------

def assign_classes(counts: np.ndarray, n_shards: int) -> np.ndarray:
    """Deal classes to shards, largest first, each to the shard with the fewest examples so far.

    Parameters
    ----------
    counts : (n_classes,) int array
        Examples per class; classes with 0 examples get no shard.
    n_shards : int
        Number of shards, ``>= 1``.

    Returns
    -------
    (n_classes,) int64 array
        The shard of each class, ``-1`` for classes without examples. Ties go to the smaller class index and
        then to the smaller shard, so the map is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.full(counts.size, -1, dtype=np.int64)
    load = np.zeros(n_shards, dtype=np.int64)
    for c in np.lexsort((np.arange(counts.size), -counts)):
        if counts[c] > 0:
            owner[c] = int(load.argmin())
            load[owner[c]] += counts[c]
    return owner


def class_ranges(n_classes: int, n_shards: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous class ranges ``[c0, c1)`` whose sizes differ by at most one (PB shards)."""
    bounds = np.linspace(0, n_classes, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def range_columns(c0: int, c1: int, n_classes: int, width: int) -> tuple[slice, slice]:
    """Columns of classes ``[c0, c1)`` in a row ``[bias (C), weight (C*D) row-major]`` of ``width`` = C (1 + D)."""
    d = width // n_classes - 1
    return slice(c0, c1), slice(n_classes + c0 * d, n_classes + c1 * d)


def infer_n_classes(rows: np.ndarray, labels: np.ndarray) -> int:
    """The class count C of mini-batch rows ``(m, C (1 + D))``, read off the rows themselves.

    C divides the width and exceeds every label; among such divisors it is the one whose bias block sums to
    zero in every row (softmax errors sum to zero over the classes). When no divisor passes (rows that are not
    softmax gradients) the smallest one is taken: the partial Gram matrices still add up to the whole one for
    any split of the columns, so only the balance between shards depends on it.
    """
    width = rows.shape[1]
    floor = int(labels.max()) + 1 if labels.size else 1
    candidates = [c for c in range(max(1, floor), width // 2 + 1) if width % c == 0]
    if not candidates:
        raise ValueError(f"rows have {width} columns, which is not C (1 + D) for any C > the largest label "
                         f"({floor - 1}) and D >= 1")
    for c in candidates:
        bias = rows[:, :c].astype(np.float64)
        scale = np.abs(bias).sum(axis=1)
        live = scale > 0
        if live.any() and np.all(np.abs(bias[live].sum(axis=1)) <= ZERO_SUM_RTOL * scale[live]):
            return c
    return candidates[0]


class ExampleRoutes:
    """Which shard owns each class of a per-example round; fixed as the round's chunks arrive.

    Classes with a count in ``hint`` (the previous round's class counts) are dealt by ``assign_classes``;
    a class first seen here goes to the shard with the least expected load. ``one_shard`` sends every class
    to shard 0 (GLISTER).
    """

    kind = "example"

    def __init__(self, n_shards: int, n_classes: int, hint: np.ndarray | None = None, one_shard: bool = False):
        self.n_shards, self.n_classes, self.one_shard = n_shards, n_classes, one_shard
        self.owner = np.full(n_classes, -1, dtype=np.int64)
        self.weight = np.zeros(n_classes, dtype=np.int64)  # expected examples per class
        self.hinted = not one_shard and hint is not None and hint.size == n_classes
        if one_shard:
            self.owner[:] = 0
        elif self.hinted:
            self.owner, self.weight = assign_classes(hint, n_shards), hint.astype(np.int64).copy()
        self.sent = np.zeros(n_shards, dtype=np.int64)
        self._routed = np.zeros(n_classes, dtype=np.int64)
        self._lock = threading.Lock()

    def split(self, chunk: GradientChunk, n_ground: int | None = None) -> list[dict | None]:
        """The parts of ``chunk`` per shard (None where a shard gets nothing); each part in ascending id order.

        Each part says how many rows its shard should make room for: the shard's expected load when the map
        comes from a previous round's counts, else the whole ground set (``n_ground``, when known).
        """
        if chunk.errors.shape[1] != self.n_classes:
            raise ValueError(f"errors has {chunk.errors.shape[1]} columns, must be {self.n_classes} as in the "
                             "round's first chunk")
        if chunk.labels.size and chunk.labels.max() >= self.n_classes:
            raise ValueError(f"labels must be < the {self.n_classes} classes of errors, got max {chunk.labels.max()}")
        with self._lock:
            present, counts = np.unique(chunk.labels, return_counts=True)
            self._routed[present] += counts
            self.weight[present] = np.maximum(self.weight[present], self._routed[present])
            for c in present[np.lexsort((present, -counts))]:
                if self.owner[c] < 0:
                    self.owner[c] = int(self.loads().argmin())
            shard_of = self.owner[chunk.labels]
            self.sent += np.bincount(shard_of, minlength=self.n_shards)
            room = self._room(n_ground)
        return _example_parts(chunk, shard_of, room)

    def tally(self, labels: np.ndarray) -> np.ndarray:
        """Count a chunk that its sender split by this map itself (``split_chunk``); returns its rows per shard.

        The map must already own every label (``planned_routes`` deals every class with examples up front).
        """
        if labels.size and labels.max() >= self.n_classes:
            raise ValueError(f"labels must be < the {self.n_classes} classes of the round's map, got max "
                             f"{labels.max()}")
        shard_of = self.owner[labels]
        if (shard_of < 0).any():
            raise ValueError(f"labels {np.unique(labels[shard_of < 0])[:5].tolist()} have no shard in the round's "
                             "class map (their classes had no examples when it was made)")
        sizes = np.bincount(shard_of, minlength=self.n_shards)
        with self._lock:
            present, counts = np.unique(labels, return_counts=True)
            self._routed[present] += counts
            self.sent += sizes
        return sizes

    def plan(self, n_ground: int) -> dict:
        """The map as plain data for a sender that splits chunks itself (``split_chunk``)."""
        with self._lock:
            return {"kind": self.kind, "n_classes": self.n_classes, "owner": self.owner.copy(),
                    "capacity": self._room(n_ground)}

    def loads(self) -> np.ndarray:
        """Expected examples per shard under the current map."""
        assigned = self.owner >= 0
        return np.bincount(self.owner[assigned], weights=self.weight[assigned], minlength=self.n_shards)

    def _room(self, n_ground: int | None) -> np.ndarray:
        """Rows each shard should reserve: its expected load when the map is dealt, else the whole ground set."""
        return self.loads().astype(np.int64) if self.hinted else np.full(self.n_shards, n_ground or 0)


class BatchRoutes:
    """PB rounds: shard s holds the columns of classes ``ranges[s]`` of every mini-batch."""

    kind = "batch"

    def __init__(self, n_shards: int, n_classes: int, width: int):
        self.n_shards, self.n_classes, self.width = n_shards, n_classes, width
        self.ranges = class_ranges(n_classes, n_shards)
        self.columns = [range_columns(c0, c1, n_classes, width) for c0, c1 in self.ranges]
        self.sent = np.zeros(n_shards, dtype=np.int64)
        self._lock = threading.Lock()

    def split(self, chunk: GradientChunk, n_ground: int | None = None) -> list[dict]:
        """Each shard's columns of ``chunk``; with ``n_ground`` known, shards place rows by id."""
        if chunk.rows.shape[1] != self.width:
            raise ValueError(f"rows has {chunk.rows.shape[1]} columns, must be {self.width} as in the round's "
                             "first chunk")
        with self._lock:
            self.sent += len(chunk.ids)
        return _batch_parts(chunk, self.columns, n_ground)

    def tally(self, labels: np.ndarray) -> np.ndarray:
        """Count a chunk that its sender split by this map itself (``split_chunk``); returns its rows per shard."""
        sizes = np.full(self.n_shards, labels.size, dtype=np.int64)
        with self._lock:
            self.sent += sizes
        return sizes

    def plan(self, n_ground: int) -> dict:
        """The map as plain data for a sender that splits chunks itself (``split_chunk``)."""
        return {"kind": self.kind, "n_classes": self.n_classes, "width": self.width, "ranges": list(self.ranges),
                "n_rows": n_ground}

    def slice(self, vector: np.ndarray, s: int) -> np.ndarray:
        """Shard ``s``'s entries of a full-width vector (C (1 + D),)."""
        bias, weight = self.columns[s]
        return np.concatenate([vector[bias], vector[weight]])


def too_many_shards(n_shards: int, n_classes: int) -> str | None:
    if n_shards > n_classes:
        return (f"--shards {n_shards} (selector.shards) is more than the {n_classes} classes of this round's "
                f"summaries: each shard owns at least one class; use --shards {n_classes} or fewer")
    return None


def routes_for(chunk: GradientChunk, n_shards: int, config, hint: np.ndarray | None):
    """The routes of a round, made from its first chunk; a string says why the round cannot be sharded."""
    if chunk.rows is not None:
        n_classes = infer_n_classes(chunk.rows, chunk.labels)
        return too_many_shards(n_shards, n_classes) or BatchRoutes(n_shards, n_classes, chunk.rows.shape[1])
    n_classes = chunk.errors.shape[1]
    return too_many_shards(n_shards, n_classes) or ExampleRoutes(n_shards, n_classes, hint,
                                                                   one_shard=isinstance(config, ONE_SHARD))


def planned_routes(n_shards: int, layout: dict, config):
    """The routes of a round fixed before its summaries are made, from what their sender knows of them.

    ``layout`` is ``{"kind": "batch" or "example", "n_classes": C, "n_features": D, "n_ground": n, "counts": (C,)
    examples per class (per-example rounds)}``. Per-example classes are dealt by ``counts`` (the ground set's,
    so no class appears later); PB rounds split the C classes into ranges as ``routes_for`` does. A string says
    why the round cannot be sharded.
    """
    kind, n_classes = layout["kind"], int(layout["n_classes"])
    if kind not in ("batch", "example") or n_classes < 1:
        raise ValueError(f"kind {kind!r} and n_classes {n_classes}: must be 'batch' or 'example' and >= 1")
    reason = too_many_shards(n_shards, n_classes)
    if reason is not None:
        return reason
    if kind == "batch":
        return BatchRoutes(n_shards, n_classes, n_classes * (1 + int(layout["n_features"])))
    counts = np.asarray(layout["counts"], dtype=np.int64)
    if counts.shape != (n_classes,) or (counts < 0).any():
        raise ValueError(f"counts has shape {counts.shape}, must be ({n_classes},) of counts >= 0")
    return ExampleRoutes(n_shards, n_classes, counts, one_shard=isinstance(config, ONE_SHARD))


def _example_parts(chunk, shard_of: np.ndarray, room: np.ndarray) -> list[dict | None]:
    """The examples of ``chunk`` per shard (None where a shard gets nothing), each in the chunk's order, with the
    rows its shard should make room for."""
    sizes = np.bincount(shard_of, minlength=len(room))
    order = np.argsort(shard_of, kind="stable")
    parts, start = [], 0
    for shard, size in enumerate(sizes):
        rows = order[start:start + size]
        start += size
        parts.append({"ids": chunk.ids[rows], "labels": chunk.labels[rows], "errors": chunk.errors[rows],
                      "features": chunk.features[rows], "capacity": int(room[shard])} if size else None)
    return parts


def _batch_parts(chunk, columns: list[tuple[slice, slice]], n_rows: int | None) -> list[dict]:
    """Each shard's columns of the mini-batch rows of ``chunk``; with ``n_rows`` known, shards place rows by id."""
    return [{"ids": chunk.ids, "rows": np.concatenate([chunk.rows[:, bias], chunk.rows[:, weight]], axis=1),
             **({"n_rows": n_rows} if n_rows else {})} for bias, weight in columns]


def split_chunk(route: dict, chunk) -> list[dict | None]:
    """The parts of ``chunk`` (a ``GradientChunk`` or its payload) per shard by ``route``, a map from
    ``ShardedSelector.routes``: the parts the coordinator itself would send for that map (None where a shard
    gets nothing). Raises ``ValueError`` for a chunk that does not fit the map."""
    chunk = GradientChunk.model_validate(chunk)
    n_classes = route["n_classes"]
    if route["kind"] == "batch":
        width = route["width"]
        if chunk.rows is None or chunk.rows.shape[1] != width:
            got = "example summaries" if chunk.rows is None else f"rows of {chunk.rows.shape[1]} columns"
            raise ValueError(f"chunk {chunk.chunk_index}: {got}, the round's map is for rows of {width} columns")
        columns = [range_columns(c0, c1, n_classes, width) for c0, c1 in route["ranges"]]
        return _batch_parts(chunk, columns, route["n_rows"])
    if chunk.errors is None or chunk.errors.shape[1] != n_classes:
        got = "mini-batch rows" if chunk.errors is None else f"errors of {chunk.errors.shape[1]} columns"
        raise ValueError(f"chunk {chunk.chunk_index}: {got}, the round's map is for errors of {n_classes} columns")
    owner = np.asarray(route["owner"])
    if chunk.labels.size and chunk.labels.max() >= n_classes:
        raise ValueError(f"chunk {chunk.chunk_index}: labels must be < the {n_classes} classes, got max "
                         f"{chunk.labels.max()}")
    shard_of = owner[chunk.labels]
    if (shard_of < 0).any():
        raise ValueError(f"chunk {chunk.chunk_index}: labels {np.unique(chunk.labels[shard_of < 0])[:5].tolist()} "
                         "have no shard in the round's class map")
    return _example_parts(chunk, shard_of, np.asarray(route["capacity"]))


def send_routed(route: dict, selector, chunk):
    """Send the parts of ``chunk`` straight to the shards of ``route`` (``ShardedSelector.routes``), and its
    round, index, ids and labels to the coordinator ``selector`` (``add_routed``) with the calls that carry the
    parts: no summary row passes through the coordinator. Nothing is waited for; the coordinator waits for the
    parts before its shards gather. ``selector`` and the shards are Ray actor handles, or in tests plain
    ``ShardedSelector`` and ``ShardService`` objects. Returns the ``add_routed`` call's ref (its answer for
    plain objects)."""
    chunk = GradientChunk.model_validate(chunk)
    delivered = []
    for index, part in enumerate(split_chunk(route, chunk)):
        if part is None:
            continue
        shard, size = route["shards"][index], _nbytes(part)
        if isinstance(shard, ShardService):
            shard.add_part(chunk.round_id, part)
            delivered.append((index, None, size))
        else:
            delivered.append((index, shard.add_part.remote(chunk.round_id, part), size))
    head = {"round_id": chunk.round_id, "chunk_index": chunk.chunk_index, "ids": chunk.ids, "labels": chunk.labels}
    if isinstance(selector, SelectorService):
        return selector.add_routed(head, delivered)
    return selector.add_routed.remote(head, delivered)  # the refs inside a list reach the coordinator as refs


# --- the shard ------------------------------------------------------------------------------------

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

    def put(self, part: dict) -> None:
        ids, capacity = np.array(part.pop("ids")), part.pop("capacity", None)
        part.pop("n_rows", None)  # the round's first part fixed how rows are placed
        start, stop = self.n, self.n + len(ids)
        for name, values in part.items():
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
        self._base_kib = _status_kib("VmRSS")

    # receiving ---------------------------------------------------------------------------------
    def add_part(self, round_id: int, part: dict) -> None:
        """Copy one part into the round's arrays (the object-store copy is freed once this returns)."""
        with self._lock:
            if round_id < self._latest:
                return  # a superseded round's late part
            if round_id > self._latest:
                self._latest = round_id
                self._drop_before(round_id)
                _reset_peak()
            fill = self._fills.setdefault(round_id, _Fill(part.get("n_rows")))
            fill.put(dict(part))

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
        result = _omp(config, rows, target, k_c, self.device)
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
        peak = _status_kib("VmHWM")
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


def _status_kib(name: str) -> int | None:
    """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{name}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> None:
    """Restart the peak resident size (VmHWM) from the current one (Linux >= 4.0); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


# --- calls on the shards --------------------------------------------------------------------------

def _nbytes(value) -> int:
    """Bytes of the arrays in ``value`` (nested tuples, lists and dicts)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class ShardCalls:
    """Calls on the shards: Ray actor handles in parallel with every wait bounded, or plain ``ShardService``
    objects in turn (tests without Ray). Counts the bytes of arrays that cross to and from the shards, per round
    (parts that senders delivered themselves included, as they report them).
    """

    def __init__(self, shards: list):
        self.shards = list(shards)
        self.remote = not isinstance(self.shards[0], ShardService)
        self.moved: dict[int, int] = {}
        self.seconds: dict[int, dict[str, float]] = {}  # round -> method -> wall seconds waited on the shards
        self._sent: dict[int, list] = {}
        self._lock = threading.Lock()

    def send(self, round_id: int, index: int, part: dict) -> None:
        """Deliver one part without waiting; ``settle`` checks the deliveries."""
        with self._lock:
            self.moved[round_id] = self.moved.get(round_id, 0) + _nbytes(part)
        if not self.remote:
            self.shards[index].add_part(round_id, part)
            return
        ref = self.shards[index].add_part.remote(round_id, part)
        with self._lock:
            self._sent.setdefault(round_id, []).append((index, ref))

    def expect(self, round_id: int, delivered: list) -> None:
        """Parts a sender delivered to the shards itself: ``(shard index, ref of its add_part call, bytes)`` each
        (the ref None for plain shards, already called). ``settle`` waits for them with the coordinator's own."""
        with self._lock:
            self.moved[round_id] = self.moved.get(round_id, 0) + sum(int(size) for _, _, size in delivered)
            if self.remote:
                self._sent.setdefault(round_id, []).extend((index, ref) for index, ref, _ in delivered)

    def settle(self, round_id: int, deadline: float) -> None:
        """Wait until every part of the round is delivered; a lost shard fails the round."""
        with self._lock:
            sent = self._sent.pop(round_id, [])
        began = time.monotonic()
        if sent:
            self._wait(round_id, sent, deadline)
        self._clock(round_id, "deliver", began)

    def each(self, round_id: int, method: str, args: dict[int, tuple], deadline: float) -> dict:
        """``shard.method(*args[i])`` on the shards ``i`` in ``args``, in parallel; ``{i: result}``."""
        with self._lock:
            self.moved[round_id] = self.moved.get(round_id, 0) + _nbytes(list(args.values()))
        began = time.monotonic()
        if not self.remote:
            results = {i: _local_call(round_id, i, getattr(self.shards[i], method), a) for i, a in args.items()}
        else:
            calls = [(i, getattr(self.shards[i], method).remote(*a)) for i, a in args.items()]
            results = self._wait(round_id, calls, deadline)
        with self._lock:
            self.moved[round_id] += _nbytes(list(results.values()))
        self._clock(round_id, method, began)
        return results

    def _clock(self, round_id: int, name: str, began: float) -> None:
        with self._lock:
            times = self.seconds.setdefault(round_id, {})
            times[name] = times.get(name, 0.0) + time.monotonic() - began

    def tell(self, method: str, *args) -> None:
        """``shard.method(*args)`` on every shard, not waited for (never raises)."""
        for shard in self.shards:
            try:
                getattr(shard, method).remote(*args) if self.remote else getattr(shard, method)(*args)
            except Exception as exc:  # a dead shard has nothing to forget
                log.debug("shard call %s failed: %s", method, one_line(exc))

    def forget(self, round_id: int) -> tuple[int, dict]:
        """Drop the round's bookkeeping; returns the bytes it moved and the seconds waited per call."""
        with self._lock:
            self._sent.pop(round_id, None)
            return self.moved.pop(round_id, 0), self.seconds.pop(round_id, {})

    @staticmethod
    def _wait(round_id: int, calls: list, deadline: float) -> dict:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        index_of = {ref: i for i, ref in calls}
        pending, results = [ref for _, ref in calls], {}
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left))
            if not ready:
                i = index_of[pending[0]]
                raise RoundFailed(round_id, f"shard {i} did not answer within {max(0.0, left):.0f} s "
                                            "(restarting, or its node gone?)")
            ref = ready[0]
            try:
                results[index_of[ref]] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except RayActorError as exc:
                raise RoundFailed(round_id, f"shard {index_of[ref]} lost: {one_line(exc)}") from None
            except (RayTaskError, GetTimeoutError) as exc:
                raise RoundFailed(round_id, f"shard {index_of[ref]}: {one_line(exc)}") from None
        return results


def _local_call(round_id: int, index: int, method, args: tuple):
    try:
        return method(*args)
    except Exception as exc:
        raise RoundFailed(round_id, f"shard {index}: {one_line(exc)}") from None


# --- selection from the shards (the coordinator's side) -------------------------------------------

@dataclass
class ShardedRound:
    """What the coordinator knows of a round once its chunks are in: the labels in ground id order."""

    round_id: int
    request: RoundRequest
    labels: np.ndarray
    routes: ExampleRoutes | BatchRoutes | None
    validation: ValidationSet | None
    deadline: object  # () -> float, monotonic seconds
    stats: dict = field(default_factory=dict)


def select_sharded(config, job: ShardedRound, calls: ShardCalls) -> Selection:
    """Run ``config``'s strategy on the shards (which first stack the round's parts).

    The result equals ``service.strategies`` on the whole ground set (the same indices, weights to rounding).
    """
    if job.routes is None:  # no summaries were sent
        if not isinstance(config, RandomSelector):
            raise ValueError(f"{config.strategy} needs summaries in its ground set, none were sent")
        return select_random(config, job.request, None)
    wanted = "batch" if isinstance(config, (GradMatchPBSelector, CraigPBSelector)) else "example"
    if job.routes.kind != wanted:
        what = "rows" if wanted == "batch" else "errors"
        raise ValueError(f"{config.strategy} needs {what} in its ground set, none were sent")
    deadline = job.deadline()
    calls.each(job.round_id, "gather", {i: (job.round_id, int(n)) for i, n in enumerate(job.routes.sent)}, deadline)
    if isinstance(config, GradMatchPBSelector):
        selection = _gradmatch_pb(config, job, calls)
    elif isinstance(config, CraigPBSelector):
        selection = _craig_pb(config, job, calls)
    elif isinstance(config, (GradMatchSelector, CraigSelector)):
        selection = _per_class(config, job, calls)
    elif isinstance(config, GlisterSelector):
        indices, weights, target = calls.each(
            job.round_id, "select_whole", {0: (job.round_id, config, job.request, job.validation)}, job.deadline())[0]
        selection = Selection(indices, weights, target=target)
    else:
        selection = select_random(config, job.request, None)
    return selection


def _per_class(config, job: ShardedRound, calls: ShardCalls) -> Selection:
    classes, counts = np.unique(job.labels, return_counts=True)
    budgets = class_budgets(counts, job.request.n_select)
    owner = job.routes.owner
    asks = {i: {} for i in range(job.routes.n_shards)}
    for c, k_c in zip(classes, budgets):
        if k_c > 0:
            asks[int(owner[c])][int(c)] = int(k_c)
    valid = isinstance(config, GradMatchSelector) and config.valid
    if valid and job.validation is None:
        raise ValueError(f"{config.strategy} needs validation in its ground set, none were sent")
    args = {i: (job.round_id, config, ask, _validation_of(job.validation, owner, i) if valid else None)
            for i, ask in asks.items() if ask}
    answers = {c: answer for result in calls.each(job.round_id, "solve_classes", args, job.deadline()).values()
               for c, answer in result.items()}
    order = np.argsort(job.labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    rng = round_rng(job.request.seed, job.request.round_id)
    picked, weights, n_padded = [], [], 0
    for j, (c, k_c) in enumerate(zip(classes, budgets)):
        if k_c == 0:
            continue
        local, w = answers[int(c)]
        if isinstance(config, GradMatchSelector):  # as the single selector pads: class by class, one generator
            local, w, pad = pad_selection(local, w, int(counts[j]), int(k_c), rng)
            n_padded += pad
        picked.append(order[starts[j]:starts[j + 1]][local])
        weights.append(np.asarray(w, dtype=np.float64))
    target = ("val" if config.valid else "train") if isinstance(config, GradMatchSelector) else None
    return Selection(np.concatenate(picked).astype(np.int64), np.concatenate(weights), None, n_padded, target)


def _validation_of(validation: ValidationSet | None, owner: np.ndarray, shard: int) -> ValidationSet | None:
    """The validation examples of a shard's classes (None when it has none: its classes use the training target)."""
    if validation is None:
        return None
    mine = owner[validation.labels] == shard  # labels < C == owner.size (ValidationSet checks them)
    if not mine.any():
        return None
    return ValidationSet(round_id=validation.round_id, logits=validation.logits[mine],
                         features=validation.features[mine], labels=validation.labels[mine])


def _pb_targets(config, job: ShardedRound) -> dict[int, np.ndarray | None]:
    """Each shard's part of a validation target (None: the shard computes its training target)."""
    if not getattr(config, "valid", False):
        return {i: None for i in range(job.routes.n_shards)}
    if job.validation is None:
        raise ValueError(f"{config.strategy} needs validation in its ground set, none were sent")
    target = validation_target(job.validation, job.request.n_ground)
    return {i: job.routes.slice(target, i) for i in range(job.routes.n_shards)}


def _summed(parts: dict, position: int, dtype=np.float64) -> np.ndarray:
    """The sum of ``parts[i][position]`` over the shards, in shard order (so the rounding is reproducible)."""
    total = None
    for i in sorted(parts):
        value = np.asarray(parts[i][position], dtype=dtype)
        total = value.copy() if total is None else total + value
    return total


def _gradmatch_pb(config: GradMatchPBSelector, job: ShardedRound, calls: ShardCalls) -> Selection:
    """OMP on the summed Gram matrix, in the summaries' dtype as the single selector's, then an exact re-solve."""
    request, targets = job.request, _pb_targets(config, job)
    parts = calls.each(job.round_id, "gram", {i: (job.round_id, "float32", targets[i], request.sizes)
                                              for i in targets}, job.deadline())
    gram, correlation = _summed(parts, 0), _summed(parts, 1)
    target_sq = float(sum(parts[i][2] for i in sorted(parts)))
    dtype = np.asarray(parts[0][0]).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short answer is padded and reported
        result = omp_gram(gram.astype(dtype), correlation.astype(dtype), target_sq, request.n_select,
                          lam=config.lam, eps=config.eps, positive=config.positive)
    del gram
    indices, weights = np.asarray(result.indices, dtype=np.int64), np.zeros(0)
    if indices.size:
        support = calls.each(job.round_id, "support", {i: (job.round_id, indices) for i in targets}, job.deadline())
        weights = ridge_weights(_summed(support, 0), _summed(support, 1), config.lam, config.positive)
        if config.positive and not (weights > 0).all():
            indices, weights = indices[weights > 0], weights[weights > 0]
    indices, weights, n_padded = pad_selection(indices, weights, request.n_ground, request.n_select,
                                               round_rng(request.seed, request.round_id))
    return Selection(indices, weights, None, n_padded, "val" if config.valid else "train")


def _craig_pb(config: CraigPBSelector, job: ShardedRound, calls: ShardCalls) -> Selection:
    parts = calls.each(job.round_id, "gram", {i: (job.round_id, "float64", None, None)
                                              for i in range(job.routes.n_shards)}, job.deadline())
    gram = _summed(parts, 0)
    indices, weights = craig.select_craig(0.5 * (gram + gram.T), job.request.n_select)
    return Selection(np.asarray(indices, dtype=np.int64), np.asarray(weights, dtype=np.float64))


def ridge_weights(gram: np.ndarray, correlation: np.ndarray, lam: float, positive: bool) -> np.ndarray:
    """``argmin_w w^T G w - 2 p^T w + lam ||w||^2`` (``w >= 0`` if ``positive``) from the normal equations.

    Parameters
    ----------
    gram : (k, k) float64
        ``A_S A_S^T`` of the chosen rows.
    correlation : (k,) float64
        ``A_S b``.
    lam : float
        Ridge regulariser, ``>= 0``.
    positive : bool
        Non-negative weights (a non-negative least-squares solve when the free optimum has a weight <= 0).

    Returns
    -------
    (k,) float64
        The weights; with ``lam == 0`` and a singular ``gram``, a least-squares solution.
    """
    q = gram + lam * np.eye(len(gram))
    try:
        lower = scipy.linalg.cholesky(q, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(q)
        keep = values > values.max() * len(q) * np.finfo(float).eps
        root = np.sqrt(values[keep])[:, None] * vectors[:, keep].T  # root^T root = q on its range
        z = (vectors[:, keep].T @ correlation) / np.sqrt(values[keep])
        return scipy.optimize.nnls(root, z)[0] if positive else np.linalg.lstsq(root, z, rcond=None)[0]
    z = scipy.linalg.solve_triangular(lower, correlation, lower=True, check_finite=False)
    w = scipy.linalg.solve_triangular(lower.T, z, lower=False, check_finite=False)
    if positive and w.min() <= 0:
        w = scipy.optimize.nnls(lower.T, z)[0]
    return w


def sharded_gradient_errors(config, job: ShardedRound, calls: ShardCalls, selection: Selection) -> GradientErrors:
    """``service.strategies.gradient_errors`` from the shards' partial sums (docs/metrics.md); the shards report
    their memory figures with them (``job.stats``)."""
    weights = np.asarray(selection.weights, dtype=np.float64)
    if job.routes is None or weights.size == 0 or not np.isfinite(weights).all():
        return GradientErrors()
    indices = np.asarray(selection.indices, dtype=np.int64)
    if job.routes.kind == "batch":
        return GradientErrors.from_sums(**_batch_error_sums(config, job, calls, indices, weights))
    sums = _example_error_sums(job, calls, indices, weights)
    if matched_in_class_columns(config):
        sums.update(_class_error_sums(config, job, calls, indices, weights))
    return GradientErrors.from_sums(**sums)


def _batch_error_sums(config, job: ShardedRound, calls: ShardCalls, indices, weights) -> dict:
    """``batch_error_sums`` of the whole rows, added up from each shard's columns."""
    targets = _pb_targets(config, job)  # None (the training gradient) unless GRAD-MATCH-PB matched validation
    args = {i: (job.round_id, indices, weights, job.request.sizes, targets[i]) for i in range(job.routes.n_shards)}
    sums = _error_sums(job, calls, args)
    total = {key: float(sum(sums[i][key] for i in sorted(sums))) for key in ("residual_sq", "target_sq", "full_sq")}
    trained = [sums[i]["trained_sq"] for i in sorted(sums)]
    total["trained_sq"] = None if any(t is None for t in trained) else float(sum(trained))
    return total


def _example_error_sums(job: ShardedRound, calls: ShardCalls, indices, weights) -> dict:
    """``flat_error_sums`` from each shard's ``example_sums`` of the examples it holds."""
    shard_of = job.routes.owner[job.labels[indices]]
    args = {i: (job.round_id, indices[shard_of == i], weights[shard_of == i], None)
            for i in range(job.routes.n_shards) if job.routes.sent[i] > 0}
    sums = _error_sums(job, calls, args)
    full = sum(sums[i]["full"] for i in sorted(sums))
    subset = sum(sums[i]["subset"] for i in sorted(sums))
    return flat_error_sums(full, subset, len(job.labels), float(weights.sum()))


def _class_error_sums(config, job: ShardedRound, calls: ShardCalls, indices, weights) -> dict:
    """Per-class GRAD-MATCH's Eq. 1 residual and target, squared and summed over the classes in class order."""
    owner = job.routes.owner
    asks = {i: {} for i in range(job.routes.n_shards)}
    for c, pick in class_picks(job.labels, indices, weights).items():
        asks[int(owner[c])][c] = pick
    args = {i: (job.round_id, ask, _validation_of(job.validation, owner, i) if config.valid else None)
            for i, ask in asks.items() if ask}
    per_class = {c: sums for result in calls.each(job.round_id, "class_errors", args, job.deadline()).values()
                 for c, sums in result.items()}
    return {"residual_sq": float(sum(per_class[c][0] for c in sorted(per_class))),
            "target_sq": float(sum(per_class[c][1] for c in sorted(per_class)))}


def _error_sums(job: ShardedRound, calls: ShardCalls, args: dict) -> dict:
    """The shards' ``error_sums``; their memory figures go to ``job.stats``."""
    sums = calls.each(job.round_id, "error_sums", args, job.deadline())
    job.stats["shard_peak_bytes"] = [sums[i]["peak_bytes"] if i in sums else None for i in range(job.routes.n_shards)]
    job.stats["shard_held_bytes"] = [sums[i]["held_bytes"] if i in sums else 0 for i in range(job.routes.n_shards)]
    return sums


# --- the coordinator ------------------------------------------------------------------------------

class ShardedSelector(SelectorService):
    """The single selector's interface (``plan``, ``reconfigure``, ``start_round``, ``add_chunk``,
    ``add_validation``, ``result``, ``status``, ``stop``, ``routes``) over shards that hold the summaries, and
    ``add_routed`` for senders that deliver the summaries to the shards themselves.

    Parameters
    ----------
    config : dict or SelectorConfig
        One branch of the run config; ``shards`` is ``len(shards)``. The shard count and placement are fixed
        at start: a ``reconfigure`` changes the strategy only.
    shards : list of ShardService or of Ray actor handles to ``service.actor.ShardActor``
        The shards, in order.
    device : str
        Where the coordinator's pursuit runs (it is float64-light: a summed Gram matrix).
    """

    def __init__(self, config, shards: list, device: str = "cpu"):
        super().__init__(config, device)
        if not shards:
            raise ValueError("shards must hold at least one shard")
        self.calls = ShardCalls(shards)
        self._routes: dict[int, ExampleRoutes | BatchRoutes | str] = {}
        self._deadlines: dict[int, float] = {}
        self._hint: np.ndarray | None = None  # class counts of the last complete per-example round
        self._stubs: dict[int, dict[int, tuple]] = {}  # round -> chunk index -> (ids, labels) routed
        self._plans: dict[int, dict] = {}  # round -> the map handed out by ``routes`` (senders split by it)
        self._routed: dict[int, int] = {}  # round -> bytes of summaries that came through this coordinator
        self._routed_total = 0
        self._last: dict = {}

    @property
    def n_shards(self) -> int:
        return len(self.calls.shards)

    def add_chunk(self, chunk) -> str | None:
        """Route one chunk to its shards; the coordinator keeps its ids and labels only.

        The round's bookkeeping (requests, repeats, supersession, the grace checks) is the single selector's:
        it receives the chunk without its summaries. Returns None, or the reason an invalid chunk was rejected
        (its round then fails with it).
        """
        try:
            chunk = GradientChunk.model_validate(chunk)
        except ValidationError as exc:
            return self._reject(chunk, f"chunk {_field(chunk, 'chunk_index')} rejected: {one_line(exc)}")
        size = sum(a.nbytes for a in (chunk.rows, chunk.errors, chunk.features) if a is not None)
        stub = {"round_id": chunk.round_id, "chunk_index": chunk.chunk_index, "ids": chunk.ids.copy(),
                "labels": chunk.labels.copy(), "rows": np.zeros((len(chunk.ids), 0), np.float32)}  # no view pins it
        with self._lock:
            self._routed[chunk.round_id] = self._routed.get(chunk.round_id, 0) + size
            self._routed_total += size
            state, request, skip = self._arrival(chunk)
            if not skip:
                routes = self._routes_of(chunk.round_id, state, lambda config: routes_for(
                    chunk, self.n_shards, config, self._hint))
                self._stubs[chunk.round_id][chunk.chunk_index] = (stub["ids"], stub["labels"])
        if not skip:
            failure = self._route(chunk, routes, request.n_ground if request is not None else None)
            if failure is not None:
                return failure
        return super().add_chunk(stub)

    def routes(self, round_id: int, layout: dict | None = None) -> dict | str | None:
        """Fix round ``round_id``'s class map before its summaries are made, for senders that split them.

        ``layout`` says what the summaries will be (``planned_routes``). Returns the map as plain data with the
        shard handles (``"shards"``): a sender splits each chunk by it and sends the parts to the shards and the
        rest to ``add_routed`` (``send_routed``). A string: the round takes no summaries (it failed with that
        reason, or is over); send nothing. None: send whole chunks to ``add_chunk`` (no ``layout``, or the
        round's map was already made from chunks that came whole). Asking again returns the same map.
        """
        failure = None
        with self._lock:
            state = self._rounds.get(round_id)
            if round_id < self._latest:
                return f"superseded by round {self._latest}"
            if state is not None and state.done.is_set():
                return state.error or "already answered"
            if layout is None:
                return None
            plan = self._plans.get(round_id)
            if plan is None and round_id in self._routes and not isinstance(self._routes[round_id], str):
                return None
            if plan is None:
                try:
                    routes = self._routes_of(round_id, state, lambda config: planned_routes(
                        self.n_shards, layout, config))
                    if not isinstance(routes, str):
                        plan = self._plans[round_id] = routes.plan(int(layout["n_ground"]))
                except (KeyError, TypeError, ValueError) as exc:
                    routes = self._routes[round_id] = f"summary layout rejected: {one_line(exc)}"
                failure = routes if isinstance(routes, str) else None
        if failure is not None:
            return self._fail_round(round_id, failure)
        return {**plan, "shards": list(self.calls.shards)}

    def add_routed(self, chunk, delivered: list) -> str | None:
        """A chunk whose summaries its sender split by ``routes``'s map and delivered to the shards itself.

        ``chunk`` carries ``round_id``, ``chunk_index``, ``ids`` and ``labels`` only; ``delivered`` lists
        ``(shard index, ref of the add_part call, bytes)``, one per part. The round's bookkeeping is as for
        ``add_chunk``, and its shards gather once these calls are done, as for parts the coordinator sent.
        Returns None, or the reason the chunk was rejected (its round then fails with it).
        """
        try:
            head = GradientChunk.model_validate({**chunk, "rows": np.zeros((np.size(_field(chunk, "ids")), 0),
                                                                          np.float32)})
        except (ValidationError, TypeError) as exc:
            return self._reject(chunk, f"chunk {_field(chunk, 'chunk_index')} rejected: {one_line(exc)}")
        with self._lock:
            state, _, skip = self._arrival(head)
            routes = self._routes.get(head.round_id) if head.round_id in self._plans else None
            if not skip and routes is not None:
                self._stubs[head.round_id][head.chunk_index] = (head.ids.copy(), head.labels.copy())  # no view pins
        if skip:
            return super().add_chunk(head)
        if routes is None:
            return self._fail_round(head.round_id, f"chunk {head.chunk_index} was split by a class map this "
                                                   "coordinator did not make (restarted since the round began?)")
        try:
            sizes = routes.tally(head.labels)
            sent_to = sorted(int(index) for index, _, _ in delivered)
            if sent_to != np.flatnonzero(sizes).tolist():
                raise ValueError(f"parts went to shards {sent_to}, its labels route to shards "
                                 f"{np.flatnonzero(sizes).tolist()}")
        except ValueError as exc:
            return self._fail_round(head.round_id, f"chunk {head.chunk_index}: {exc}")
        self.calls.expect(head.round_id, delivered)
        return super().add_chunk(head)

    def _route(self, chunk: GradientChunk, routes, n_ground: int | None) -> str | None:
        """Send each shard its part of ``chunk``; a failure fails the round and is returned."""
        if isinstance(routes, str):
            return self._fail_round(chunk.round_id, routes)
        try:
            for index, part in enumerate(routes.split(chunk, n_ground)):
                if part is not None:
                    self.calls.send(chunk.round_id, index, part)
        except RoundFailed as exc:
            return self._fail_round(chunk.round_id, exc.reason)
        except ValueError as exc:
            return self._fail_round(chunk.round_id, f"chunk {chunk.chunk_index}: {exc}")
        return None

    def result(self, round_id: int, timeout_s: float, request_grace_s: float = REQUEST_GRACE_S,
               chunk_grace_s: float = CHUNK_GRACE_S) -> dict:
        """As ``SelectorService.result``; the shards' waits of the round end by its deadline too."""
        with self._lock:
            self._deadlines[round_id] = time.monotonic() + timeout_s
        try:
            return super().result(round_id, timeout_s, request_grace_s, chunk_grace_s)
        finally:
            with self._lock:
                self._deadlines.pop(round_id, None)

    def status(self) -> dict:
        """As ``SelectorService.status``, with the shard count, the bytes of summaries that came through this
        coordinator (``routed_bytes``, 0 while senders deliver them to the shards) and the last round's traffic
        and shard memory."""
        status = super().status()
        with self._lock:
            return {**status, "shards": self.n_shards, "routed_bytes": self._routed_total,
                    "last_round": dict(self._last)}

    def stop(self) -> None:
        super().stop()
        self.calls.tell("drop", None)

    # internals ---------------------------------------------------------------------------------
    def _arrival(self, chunk: GradientChunk) -> tuple:
        """``(state, request, skip)`` for an arriving chunk (under the lock): skip one of a superseded or closed
        round, one already routed, or one past the round's chunk count (the bookkeeping fails that round)."""
        state = self._rounds.get(chunk.round_id)
        request = state.request if state is not None else None
        routed = self._stubs.setdefault(chunk.round_id, {})
        skip = bool(chunk.round_id < self._latest or chunk.chunk_index in routed or (state and state.done.is_set())
                    or (request is not None and chunk.chunk_index >= request.n_chunks))
        return state, request, skip

    def _routes_of(self, round_id: int, state: _Round | None, make):
        """The round's routes, made by ``make(config)`` the first time (under the lock); older rounds' are dropped."""
        routes = self._routes.get(round_id)
        if routes is None:
            for old in [r for r in self._routes if r < round_id]:
                del self._routes[old]
                for store in (self._stubs, self._plans, self._routed):
                    store.pop(old, None)
                self.calls.forget(old)
            config = state.config if state is not None and state.config is not None else self.config
            routes = make(config)
            self._routes[round_id] = routes
        return routes

    def _fail_round(self, round_id: int, reason: str) -> str:
        log.warning("round %d: %s", round_id, reason)
        with self._lock:
            self._fail(self._rounds.setdefault(round_id, _Round()), reason)
        return reason

    def _deadline_of(self, round_id: int, started: float):
        return lambda: self._deadlines.get(round_id, started + DEFAULT_WAIT_S)

    def _run(self, round_id: int, state: _Round) -> None:
        clock = RoundClock()
        job = None
        try:
            with self._lock:
                routes = self._routes.get(round_id)
                stubs = self._stubs.pop(round_id, {})
            if isinstance(routes, str):
                raise ValueError(routes)
            labels = _labels(state.request, stubs)
            job = ShardedRound(round_id, state.request, labels, routes, state.validation,
                               self._deadline_of(round_id, time.monotonic()))
            state.validation = None
            if routes is not None:
                self.calls.settle(round_id, job.deadline())
            config = state.config
            select_start = time.perf_counter()
            selection = select_sharded(config, job, self.calls)
            select_s = time.perf_counter() - select_start
            errors = sharded_gradient_errors(config, job, self.calls, selection)
            answer, busy_s = self._answer(state, selection, errors, select_s, clock)
        except Exception as exc:  # the trainer is told, the service stays up
            reason = exc.reason if isinstance(exc, RoundFailed) else f"{type(exc).__name__}: {exc}"
            log.warning("round %d failed: %s", round_id, reason)
            with self._lock:
                self._busy_s += clock.read()[0]
                self._fail(state, reason)
            return
        finally:
            self._finish(round_id, job)
        self._deliver(state, answer, busy_s)

    def _finish(self, round_id: int, job: ShardedRound | None) -> None:
        """Free the shards' data of the round; keep its figures and, for per-example rounds, its class counts."""
        self.calls.tell("drop", round_id)
        with self._lock:
            routes = self._routes.pop(round_id, None)
            self._plans.pop(round_id, None)
            routed = self._routed.pop(round_id, 0)
            moved, seconds = self.calls.forget(round_id)
            if job is None:
                return
            if isinstance(routes, ExampleRoutes) and not routes.one_shard and job.labels.size:
                self._hint = np.bincount(job.labels, minlength=routes.n_classes)
            classes = routes.owner.tolist() if isinstance(routes, ExampleRoutes) else None
            self._last = {"round_id": round_id, "moved_bytes": moved, "routed_bytes": routed, "shard_s": seconds,
                          "class_shards": classes, **job.stats}


def _labels(request: RoundRequest, stubs: dict) -> np.ndarray:
    """The ground set's labels in ground id order from the routed chunks' ``(ids, labels)``; every id once."""
    if request.n_chunks == 0:
        return np.zeros(0, np.int64)
    missing = [i for i in range(request.n_chunks) if i not in stubs]
    if missing:
        raise ValueError(f"chunks {missing[:5]} were not routed (rejected, or repeated after a failure)")
    parts = [stubs[i] for i in range(request.n_chunks)]
    ids = np.concatenate([p[0] for p in parts])
    if ids.size != request.n_ground or not np.array_equal(np.sort(ids), np.arange(request.n_ground)):
        raise ValueError(
            f"chunks cover {np.unique(ids).size} distinct ids of {ids.size}, must cover 0..{request.n_ground - 1} once"
        )
    labels = np.empty(request.n_ground, dtype=np.int64)
    labels[ids] = np.concatenate([p[1] for p in parts])
    return labels


def _field(payload, name: str):
    return payload.get(name) if isinstance(payload, dict) else getattr(payload, name, None)
