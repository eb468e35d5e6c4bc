"""Who owns what in a sharded round: classes dealt to shards (per-example rounds) or class ranges of every
mini-batch row (PB rounds), fixed as a round's first chunk arrives (``routes_for``) or before its summaries are
made (``planned_routes``, for summary workers). The map balances the load only: any map gives the same subset.
Splitting a chunk by a map is ``protocol.routes``, which senders use too. docs/scaling.md.
"""

from __future__ import annotations

import threading

import numpy as np

from protocol.config import GlisterSelector
from protocol.messages import GradientChunk
from protocol.routes import (
    BatchMap, BatchPart, ExampleMap, ExamplePart, SummaryLayout, batch_parts, example_parts, range_columns,
)

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

    def split(self, chunk: GradientChunk, n_ground: int | None = None) -> list[ExamplePart | None]:
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
        return example_parts(chunk, shard_of, room)

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

    def plan(self, n_ground: int) -> ExampleMap:
        """The map for a sender that splits chunks itself (``split_chunk``)."""
        with self._lock:
            return ExampleMap(self.n_classes, self.owner.copy(), self._room(n_ground))

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

    def split(self, chunk: GradientChunk, n_ground: int | None = None) -> list[BatchPart]:
        """Each shard's columns of ``chunk``; with ``n_ground`` known, shards place rows by id."""
        if chunk.rows.shape[1] != self.width:
            raise ValueError(f"rows has {chunk.rows.shape[1]} columns, must be {self.width} as in the round's "
                             "first chunk")
        with self._lock:
            self.sent += len(chunk.ids)
        return batch_parts(chunk, self.columns, n_ground)

    def tally(self, labels: np.ndarray) -> np.ndarray:
        """Count a chunk that its sender split by this map itself (``split_chunk``); returns its rows per shard."""
        sizes = np.full(self.n_shards, labels.size, dtype=np.int64)
        with self._lock:
            self.sent += sizes
        return sizes

    def plan(self, n_ground: int) -> BatchMap:
        """The map for a sender that splits chunks itself (``split_chunk``)."""
        return BatchMap(self.n_classes, self.width, tuple(self.ranges), n_ground)

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


def planned_routes(n_shards: int, layout: SummaryLayout, config):
    """The routes of a round fixed before its summaries are made, from what their sender knows of them.

    Per-example classes are dealt by ``layout.counts`` (the ground set's, so no class appears later); PB rounds
    split the C classes into ranges as ``routes_for`` does. A string says why the round cannot be sharded.
    """
    if not isinstance(layout, SummaryLayout):
        raise TypeError(f"layout is a {type(layout).__name__}, must be a protocol.routes.SummaryLayout")
    kind, n_classes = layout.kind, int(layout.n_classes)
    if kind not in ("batch", "example") or n_classes < 1:
        raise ValueError(f"kind {kind!r} and n_classes {n_classes}: must be 'batch' or 'example' and >= 1")
    reason = too_many_shards(n_shards, n_classes)
    if reason is not None:
        return reason
    if kind == "batch":
        return BatchRoutes(n_shards, n_classes, n_classes * (1 + int(layout.n_features)))
    counts = np.asarray(layout.counts, dtype=np.int64)
    if counts.shape != (n_classes,) or (counts < 0).any():
        raise ValueError(f"counts has shape {counts.shape}, must be ({n_classes},) of counts >= 0")
    return ExampleRoutes(n_shards, n_classes, counts, one_shard=isinstance(config, ONE_SHARD))

