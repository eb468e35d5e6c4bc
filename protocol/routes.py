"""How a chunk of summaries splits over the shards of a sharded selector, by a route both sides apply.

A sender that makes a round's summaries itself describes them first (``SummaryLayout``) and asks the selector
where they go (``routes``). The answer is a ``Route``: ``WholeChunks`` (send whole chunks to ``add_chunk``: the
single selector, or a coordinator that already mapped the round from whole chunks), a class map with the shard
handles (``ExampleMap``: the shard that owns each class, ``owner``, and the rows each shard should reserve,
``capacity``; ``BatchMap``: the class ranges each shard holds of every mini-batch row), or a
``protocol.receipts.Rejection`` (the round takes no summaries: it failed, or is over). The coordinator
(``service.coordinator``) splits the chunks it receives by the same map; summary workers
(``trainer.client.workers``) split theirs and send the parts straight to the shards and a ``RoutedChunk`` to the
coordinator (``send_routed``), so that no summary row passes through the coordinator. Both sides import this
module, neither imports the other. docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Union

import numpy as np

from protocol.messages import GradientChunk
from protocol.receipts import Rejection


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class SummaryLayout:
    """What a round's summaries will be, so that a coordinator can fix its class map before they are made.

    ``counts`` holds the ground set's examples per class (per-example rounds), so that no class appears later.
    """

    kind: Literal["batch", "example"]
    n_classes: int
    n_features: int
    n_ground: int
    counts: np.ndarray | None = None


@dataclass(frozen=True)
class WholeChunks:
    """The selector takes whole chunks at ``add_chunk``: it holds the summaries (or mapped the round itself)."""


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class ExampleMap:
    """A per-example round's class map: ``owner[c]`` is the shard of class c (-1: no examples), ``capacity[s]``
    the rows shard s reserves; ``shards`` are the shards' handles, in order."""

    n_classes: int
    owner: np.ndarray
    capacity: np.ndarray
    shards: tuple = field(default=(), compare=False)
    kind: Literal["example"] = "example"


@dataclass(frozen=True)
class BatchMap:
    """A PB round's map: shard s holds the columns of classes ``ranges[s]`` of every mini-batch row of ``width``
    columns; ``n_rows`` is the round's mini-batch count (rows are placed by id)."""

    n_classes: int
    width: int
    ranges: tuple[tuple[int, int], ...]
    n_rows: int | None
    shards: tuple = field(default=(), compare=False)
    kind: Literal["batch"] = "batch"


Route = Union[WholeChunks, ExampleMap, BatchMap, Rejection]


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class ExamplePart:
    """The examples of one chunk that one shard holds (``ShardService.add_part``), in the chunk's order: their
    ids, labels and per-example factors, and the rows the shard should reserve for the round (``capacity``)."""

    ids: np.ndarray
    labels: np.ndarray
    errors: np.ndarray
    features: np.ndarray
    capacity: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The summaries the shard stores, by name."""
        return {"labels": self.labels, "errors": self.errors, "features": self.features}


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class BatchPart:
    """One shard's columns of some mini-batch rows (``ShardService.add_part``): the rows' ids and columns, and the
    round's mini-batch count when known (``n_rows``: the shard then places rows by id; None: in arrival order)."""

    ids: np.ndarray
    rows: np.ndarray
    n_rows: int | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The summaries the shard stores, by name."""
        return {"rows": self.rows}


ShardPart = Union[ExamplePart, BatchPart]


@dataclass(frozen=True)
class Delivery:
    """One part of a chunk its sender delivered to a shard: the shard's index, the ref of its ``add_part`` call
    (None for a plain object, already called) and the part's bytes."""

    shard: int
    ref: object
    nbytes: int


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class RoutedChunk:
    """What the coordinator receives of a chunk whose parts went straight to the shards: its round, index, ids
    and labels, and where the parts went."""

    round_id: int
    chunk_index: int
    ids: np.ndarray
    labels: np.ndarray
    delivered: tuple[Delivery, ...]


def with_shards(route: ExampleMap | BatchMap, shards) -> ExampleMap | BatchMap:
    """``route`` handed out with the shards' handles."""
    return replace(route, shards=tuple(shards))


def range_columns(c0: int, c1: int, n_classes: int, width: int) -> tuple[slice, slice]:
    """Columns of classes ``[c0, c1)`` in a row ``[bias (C), weight (C*D) row-major]`` of ``width`` = C (1 + D)."""
    d = width // n_classes - 1
    return slice(c0, c1), slice(n_classes + c0 * d, n_classes + c1 * d)



def example_parts(chunk, shard_of: np.ndarray, room: np.ndarray) -> list[ExamplePart | None]:
    """The examples of ``chunk`` per shard (None where a shard gets nothing), each in the chunk's order, with the
    rows its shard should make room for."""
    sizes = np.bincount(shard_of, minlength=len(room))
    order = np.argsort(shard_of, kind="stable")
    parts, start = [], 0
    for shard, size in enumerate(sizes):
        rows = order[start:start + size]
        start += size
        parts.append(ExamplePart(ids=chunk.ids[rows], labels=chunk.labels[rows], errors=chunk.errors[rows],
                                 features=chunk.features[rows], capacity=int(room[shard])) if size else None)
    return parts


def batch_parts(chunk, columns: list[tuple[slice, slice]], n_rows: int | None) -> list[BatchPart]:
    """Each shard's columns of the mini-batch rows of ``chunk``; with ``n_rows`` known, shards place rows by id."""
    return [BatchPart(ids=chunk.ids, rows=np.concatenate([chunk.rows[:, bias], chunk.rows[:, weight]], axis=1),
                      n_rows=int(n_rows) if n_rows else None) for bias, weight in columns]


def split_chunk(route: ExampleMap | BatchMap, chunk) -> list[ShardPart | None]:
    """The parts of ``chunk`` (a ``GradientChunk`` or its payload) per shard by ``route``, a map from
    ``ShardedSelector.routes``: the parts the coordinator itself would send for that map (None where a shard
    gets nothing). Raises ``ValueError`` for a chunk that does not fit the map."""
    chunk = GradientChunk.model_validate(chunk)
    n_classes = route.n_classes
    if isinstance(route, BatchMap):
        width = route.width
        if chunk.rows is None or chunk.rows.shape[1] != width:
            got = "example summaries" if chunk.rows is None else f"rows of {chunk.rows.shape[1]} columns"
            raise ValueError(f"chunk {chunk.chunk_index}: {got}, the round's map is for rows of {width} columns")
        columns = [range_columns(c0, c1, n_classes, width) for c0, c1 in route.ranges]
        return batch_parts(chunk, columns, route.n_rows)
    if chunk.errors is None or chunk.errors.shape[1] != n_classes:
        got = "mini-batch rows" if chunk.errors is None else f"errors of {chunk.errors.shape[1]} columns"
        raise ValueError(f"chunk {chunk.chunk_index}: {got}, the round's map is for errors of {n_classes} columns")
    owner = np.asarray(route.owner)
    if chunk.labels.size and chunk.labels.max() >= n_classes:
        raise ValueError(f"chunk {chunk.chunk_index}: labels must be < the {n_classes} classes, got max "
                         f"{chunk.labels.max()}")
    shard_of = owner[chunk.labels]
    if (shard_of < 0).any():
        raise ValueError(f"chunk {chunk.chunk_index}: labels {np.unique(chunk.labels[shard_of < 0])[:5].tolist()} "
                         "have no shard in the round's class map")
    return example_parts(chunk, shard_of, np.asarray(route.capacity))


def send_routed(route: ExampleMap | BatchMap, selector, chunk):
    """Send the parts of ``chunk`` straight to the shards of ``route`` (``ShardedSelector.routes``), and a
    ``RoutedChunk`` (its round, index, ids and labels, and the calls that carry the parts) to the coordinator
    ``selector`` (``add_routed``): no summary row passes through the coordinator. Nothing is waited for; the
    coordinator waits for the parts before its shards gather. ``selector`` and the shards are Ray actor handles,
    or in tests plain ``ShardedSelector`` and ``ShardService`` objects. Returns the ``add_routed`` call's ref
    (its answer, ``Accepted`` or a ``Rejection``, for plain objects)."""
    chunk = GradientChunk.model_validate(chunk)
    delivered = []
    for index, part in enumerate(split_chunk(route, chunk)):
        if part is None:
            continue
        shard, size = route.shards[index], nbytes(part)
        remote = getattr(shard.add_part, "remote", None)  # a Ray actor handle's method; None for a plain object
        if remote is None:
            shard.add_part(chunk.round_id, part)
            delivered.append(Delivery(index, None, size))
        else:
            delivered.append(Delivery(index, remote(chunk.round_id, part), size))
    routed = RoutedChunk(chunk.round_id, chunk.chunk_index, chunk.ids, chunk.labels, tuple(delivered))
    remote = getattr(selector.add_routed, "remote", None)
    if remote is None:
        return selector.add_routed(routed)
    return remote(routed)  # the refs inside reach the coordinator as refs


def nbytes(value) -> int:
    """Bytes of the arrays in ``value`` (nested tuples, lists and dicts, and shard parts)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (ExamplePart, BatchPart)):
        return value.ids.nbytes + nbytes(value.arrays())
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0

