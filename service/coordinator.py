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
import time

import numpy as np

from pydantic import ValidationError

from protocol.errors import RoundFailed, one_line
from protocol.messages import GradientChunk, RoundRequest, SubsetMessage
from protocol.receipts import Accepted, Rejection
from protocol.routes import Route, RoutedChunk, SummaryLayout, WholeChunks, with_shards
from protocol.status import RoundTraffic, SelectorStatus
from service.registry import implementation
from service.routes import BatchRoutes, ExampleRoutes, planned_routes, routes_for
from service.selector import (
    CHUNK_GRACE_S, REQUEST_GRACE_S, RoundClock, RoundState, SelectorService, payload_field, round_of,
)
from service.sharded import ShardCalls, ShardedRound, select_sharded, sharded_gradient_errors

log = logging.getLogger(__name__)
DEFAULT_WAIT_S = 600.0  # a shard wait before the trainer has asked for the round's result (and so its deadline)


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
        self._plans: dict[int, object] = {}  # round -> the map handed out by ``routes`` (senders split by it)
        self._routed: dict[int, int] = {}  # round -> bytes of summaries that came through this coordinator
        self._routed_total = 0
        self._last: RoundTraffic | None = None

    @property
    def n_shards(self) -> int:
        return len(self.calls.shards)

    def add_chunk(self, chunk) -> Accepted | Rejection:
        """Route one chunk to its shards; the coordinator keeps its ids and labels only.

        The round's bookkeeping (requests, repeats, supersession, the grace checks) is the single selector's:
        it receives the chunk without its summaries. Returns ``Accepted``, or the ``Rejection`` of an invalid
        chunk (its round then fails with it).
        """
        try:
            chunk = GradientChunk.model_validate(chunk)
        except ValidationError as exc:
            return self._reject(Rejection.invalid(f"chunk {payload_field(chunk, 'chunk_index')}", round_of(chunk),
                                                  exc))
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
            if isinstance(failure, Rejection):
                return failure
        return super().add_chunk(stub)

    def routes(self, round_id: int, layout: SummaryLayout | None = None) -> Route:
        """Fix round ``round_id``'s class map before its summaries are made, for senders that split them.

        ``layout`` says what the summaries will be (``planned_routes``). Returns the map (``ExampleMap`` or
        ``BatchMap``) with the shard handles: a sender splits each chunk by it and sends the parts to the shards
        and the rest to ``add_routed`` (``send_routed``). A ``Rejection``: the round takes no summaries (it
        failed, or is over); send nothing. ``WholeChunks``: send whole chunks to ``add_chunk`` (no ``layout``, or
        the round's map was already made from chunks that came whole). Asking again returns the same map.
        """
        failure = None
        with self._lock:
            state = self._rounds.get(round_id)
            if round_id < self._latest:
                return Rejection(subject="summary layout", round_id=round_id,
                                 rule=f"round {round_id} was superseded by round {self._latest}")
            if state is not None and state.done.is_set():
                return Rejection(subject="summary layout", round_id=round_id,
                                 rule=f"round {round_id} failed: {state.error.detail}" if state.error
                                 else f"round {round_id} is answered")
            if layout is None:
                return WholeChunks()
            plan = self._plans.get(round_id)
            if plan is None and round_id in self._routes and not isinstance(self._routes[round_id], str):
                return WholeChunks()
            if plan is None:
                try:
                    routes = self._routes_of(round_id, state, lambda config: planned_routes(
                        self.n_shards, layout, config))
                    if isinstance(routes, str):
                        failure = Rejection(subject="summary layout", round_id=round_id, rule=routes)
                    else:
                        plan = self._plans[round_id] = routes.plan(int(layout.n_ground))
                except (KeyError, TypeError, ValueError) as exc:
                    failure = Rejection(subject="summary layout", round_id=round_id, rule=one_line(exc))
                    self._routes[round_id] = failure.reason
        if failure is not None:
            return self._fail_round(failure)
        return with_shards(plan, self.calls.shards)

    def add_routed(self, routed: RoutedChunk) -> Accepted | Rejection:
        """A chunk whose summaries its sender split by ``routes``'s map and delivered to the shards itself.

        ``routed`` carries the chunk's ``round_id``, ``chunk_index``, ``ids`` and ``labels`` and where its parts
        went (``delivered``: the shard, the ref of its ``add_part`` call and the bytes of each part). The round's
        bookkeeping is as for ``add_chunk``, and its shards gather once these calls are done, as for parts the
        coordinator sent. Returns ``Accepted``, or the ``Rejection`` of the chunk (its round then fails with it).
        """
        subject = f"chunk {getattr(routed, 'chunk_index', None)}"
        try:
            if not isinstance(routed, RoutedChunk):
                raise TypeError(f"a {type(routed).__name__}, must be a protocol.routes.RoutedChunk")
            head = GradientChunk.model_validate({"round_id": routed.round_id, "chunk_index": routed.chunk_index,
                                                 "ids": routed.ids, "labels": routed.labels,
                                                 "rows": np.zeros((np.size(routed.ids), 0), np.float32)})
        except ValidationError as exc:
            return self._reject(Rejection.invalid(subject, round_of(routed), exc))
        except TypeError as exc:
            return self._reject(Rejection(subject=subject, round_id=round_of(routed), rule=str(exc)))
        with self._lock:
            state, _, skip = self._arrival(head)
            routes = self._routes.get(head.round_id) if head.round_id in self._plans else None
            if not skip and routes is not None:
                self._stubs[head.round_id][head.chunk_index] = (head.ids.copy(), head.labels.copy())  # no view pins
        if skip:
            return super().add_chunk(head)
        if routes is None:
            return self._fail_round(Rejection(subject=subject, round_id=head.round_id, rule=(
                "split by a class map this coordinator did not make (restarted since the round began?)")))
        try:
            sizes = routes.tally(head.labels)
            sent_to = sorted(int(delivery.shard) for delivery in routed.delivered)
            if sent_to != np.flatnonzero(sizes).tolist():
                raise ValueError(f"parts went to shards {sent_to}, its labels route to shards "
                                 f"{np.flatnonzero(sizes).tolist()}")
        except ValueError as exc:
            return self._fail_round(Rejection(subject=subject, round_id=head.round_id, rule=str(exc)))
        self.calls.expect(head.round_id, [(d.shard, d.ref, d.nbytes) for d in routed.delivered])
        return super().add_chunk(head)

    def _route(self, chunk: GradientChunk, routes, n_ground: int | None) -> Accepted | Rejection:
        """Send each shard its part of ``chunk``; a failure fails the round and is returned."""
        subject = f"chunk {chunk.chunk_index}"
        if isinstance(routes, str):
            return self._fail_round(Rejection(subject=subject, round_id=chunk.round_id, rule=routes))
        try:
            for index, part in enumerate(routes.split(chunk, n_ground)):
                if part is not None:
                    self.calls.send(chunk.round_id, index, part)
        except RoundFailed as exc:
            return self._fail_round(Rejection(subject=subject, round_id=chunk.round_id, rule=exc.reason))
        except ValueError as exc:
            return self._fail_round(Rejection(subject=subject, round_id=chunk.round_id, rule=str(exc)))
        return Accepted(round_id=chunk.round_id)

    def result(self, round_id: int, timeout_s: float, request_grace_s: float = REQUEST_GRACE_S,
               chunk_grace_s: float = CHUNK_GRACE_S) -> SubsetMessage:
        """As ``SelectorService.result``; the shards' waits of the round end by its deadline too."""
        with self._lock:
            self._deadlines[round_id] = time.monotonic() + timeout_s
        try:
            return super().result(round_id, timeout_s, request_grace_s, chunk_grace_s)
        finally:
            with self._lock:
                self._deadlines.pop(round_id, None)

    def status(self) -> SelectorStatus:
        """As ``SelectorService.status``, with the shard count, the bytes of summaries that came through this
        coordinator (``routed_bytes``, 0 while senders deliver them to the shards) and the last round's traffic
        and shard memory (``last_round``, None before the first round)."""
        status = super().status()
        with self._lock:
            return SelectorStatus.model_validate({**status.model_dump(), "shards": self.n_shards,
                                                  "routed_bytes": self._routed_total, "last_round": self._last})

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

    def _routes_of(self, round_id: int, state: RoundState | None, make):
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

    def _fail_round(self, rejection: Rejection) -> Rejection:
        """Fail the round of ``rejection`` with its reason."""
        log.warning("round %d: %s", rejection.round_id, rejection.reason)
        with self._lock:
            self._fail(self._rounds.setdefault(rejection.round_id, RoundState()), "rejected", rejection.reason)
        return rejection

    def _deadline_of(self, round_id: int, started: float):
        return lambda: self._deadlines.get(round_id, started + DEFAULT_WAIT_S)

    def _run(self, round_id: int, state: RoundState) -> None:
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
            selection = select_sharded(config, job, self.calls, implementation(config).sharded)
            select_s = time.perf_counter() - select_start
            errors = sharded_gradient_errors(config, job, self.calls, selection)
            answer, busy_s = self._answer(state, selection, errors, select_s, clock)
        except Exception as exc:  # the trainer is told, the service stays up
            kind, detail = ((exc.kind, exc.detail) if isinstance(exc, RoundFailed)
                            else ("failed", f"{type(exc).__name__}: {exc}"))
            log.warning("round %d failed: %s", round_id, detail)
            with self._lock:
                self._busy_s += clock.read()[0]
                self._fail(state, kind, detail)
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
            self._last = RoundTraffic(round_id=round_id, moved_bytes=moved, routed_bytes=routed, shard_s=seconds,
                                      class_shards=classes, **job.stats)


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
