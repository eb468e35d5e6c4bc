"""The selector: gathers a round's streamed chunks, runs the strategy in the background, answers.

``SelectorService`` is a plain, thread-safe class; ``service.actor.SelectorActor`` is the Ray shell
around it (a threaded actor, so cheap calls answer while a selection runs).

The trainer sends requests, chunks and validation sets without waiting for an answer, so a message that
fails validation here is not raised back to it: each call answers ``Accepted`` or a ``Rejection``
(``protocol.receipts``), the rejection fails its round, and ``result`` raises ``protocol.errors.RoundFailed``
with its reason at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from pydantic import Field, TypeAdapter, ValidationError

from protocol.config import SelectorConfig
from protocol.errors import FailureKind, RoundFailed
from protocol.messages import GradientChunk, RoundRequest, StrategyPlan, SubsetMessage, ValidationSet
from protocol.receipts import Accepted, Rejection
from protocol.routes import SummaryLayout, WholeChunks
from protocol.status import SelectorStatus
from service.registry import implementation
from service.strategies import GradientErrors, GroundSet, Selection, gradient_errors

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None

log = logging.getLogger(__name__)
REQUEST_GRACE_S = 10.0  # a round's request arrives right after the trainer asks for its result
CHUNK_GRACE_S = 30.0  # the trainer streams a round's chunks back to back; a longer silence means some were lost
SELECTOR_CONFIG = TypeAdapter(SelectorConfig)
_ROUND_ID = TypeAdapter(Annotated[int, Field(ge=0)])


class _GroundBuffer:
    """A round's summaries, filled chunk by chunk in ground-id order as they arrive.

    Each chunk is copied once into arrays of the whole ground set and then dropped, so a round holds its
    summaries once (not the chunks and a stacked copy of them).
    """

    FIELDS = ("labels", "rows", "errors", "features")

    def __init__(self, n_ground: int):
        self.n_ground = n_ground
        self.arrays: dict[str, np.ndarray] = {}
        self.filled: dict[str, int] = {}
        self.seen = np.zeros(n_ground, dtype=bool)

    def put(self, chunk: GradientChunk) -> None:
        ids = chunk.ids
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_ground):
            raise ValueError(f"chunk {chunk.chunk_index}: ids in [{ids.min()}, {ids.max()}], must be in "
                             f"[0, {self.n_ground})")
        if self.seen[ids].any():
            raise ValueError(f"chunk {chunk.chunk_index}: ids {ids[self.seen[ids]][:5].tolist()} came before; "
                             "every id must appear once")
        for name in self.FIELDS:
            values = getattr(chunk, name)
            if values is None:
                continue
            array = self.arrays.get(name)
            if array is None:
                array = self.arrays[name] = np.empty((self.n_ground, *values.shape[1:]), values.dtype)
            elif array.shape[1:] != values.shape[1:]:
                raise ValueError(f"chunk {chunk.chunk_index}: {name} has shape {values.shape}, other chunks "
                                 f"(n, {', '.join(map(str, array.shape[1:]))})")
            array[ids] = values
            self.filled[name] = self.filled.get(name, 0) + ids.size
        self.seen[ids] = True

    def ground(self, validation) -> GroundSet:
        n_seen = int(self.seen.sum())
        if n_seen != self.n_ground or any(count != self.n_ground for count in self.filled.values()):
            raise ValueError(f"chunks cover {n_seen} distinct ids, must cover 0..{self.n_ground - 1} once, each "
                             "with the same summaries")
        return GroundSet(**{name: self.arrays.get(name) for name in self.FIELDS}, validation=validation)


def _preemptions() -> int | None:
    """Involuntary context switches of the calling thread so far (Linux), else None."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw  # RUSAGE_THREAD: Linux
    except (AttributeError, OSError):  # no resource module, or no per-thread usage
        return None


@dataclass(frozen=True)
class RoundClock:
    """Where a round thread's time goes, from the moment it was started: wall and CPU seconds, and the
    times the thread was preempted (taken off its core for another runnable thread)."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.thread_time)
    switches: int | None = field(default_factory=_preemptions)

    def read(self) -> tuple[float, float, int | None]:
        """(wall seconds, CPU seconds, preemptions) since the start; call it from the round's own thread."""
        now = _preemptions()
        preempted = now - self.switches if now is not None and self.switches is not None else None
        return time.perf_counter() - self.wall, time.thread_time() - self.cpu, preempted


@dataclass(frozen=True)
class Failure:
    """Why a round failed: a ``protocol.errors.FailureKind`` and the line that says it."""

    kind: FailureKind
    detail: str


@dataclass
class RoundState:
    request: RoundRequest | None = None
    chunks: dict[int, GradientChunk] = field(default_factory=dict)  # arrived before the request
    received: set = field(default_factory=set)  # chunk indices arrived
    buffer: _GroundBuffer | None = None
    validation: ValidationSet | None = None
    config: object = None  # the strategy config in force when the round was asked
    strategy: object = None
    last_input: float = field(default_factory=time.monotonic)  # when a request or chunk last arrived
    started: bool = False
    answer: SubsetMessage | None = None
    error: Failure | None = None  # why the round failed: raised by ``result`` as ``RoundFailed``
    done: threading.Event = field(default_factory=threading.Event)


def gpu_peak_bytes(device: str) -> int | None:
    """``torch.cuda.max_memory_allocated`` of ``device`` in this process: None for a CPU device, or when CUDA was
    never initialised here (asking must not initialise it: nothing was allocated on it by this process)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated(device))


class SelectorService:
    """Answers selection rounds with validated ``SubsetMessage`` payloads.

    Parameters
    ----------
    config : dict or SelectorConfig
        One branch of the run config, discriminated by ``strategy``.
    device : str
        Where strategies compute (``"cpu"`` or a CUDA device); chunks arrive as numpy either way.
    """

    def __init__(self, config, device: str = "cpu"):
        self.config = SELECTOR_CONFIG.validate_python(config)
        self.device = device
        self._strategy = implementation(self.config)
        self._lock = threading.Lock()
        self._rounds: dict[int, RoundState] = {}
        self._busy_s = 0.0
        self._answered = 0
        self._stopped = False
        self._latest = -1  # newest round asked; older rounds are superseded
        self._unclaimed: Rejection | None = None  # a rejection that came before any round it could belong to

    def warm_up(self) -> float:
        """One tiny round of the configured strategy, so imports and first-call costs (kernel set-up, thread
        pools) are paid before the run's clock starts rather than in its first round; returns the seconds."""
        start = time.perf_counter()
        config = self.config
        plan = self._strategy.plan(config)
        if not plan.rounds:
            return 0.0
        rng = np.random.default_rng(0)
        n, c, d = 12, 3, 4
        labels = np.arange(n) % c
        errors, features = rng.normal(size=(n, c)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
        rows = np.concatenate([errors, (errors[:, :, None] * features[:, None, :]).reshape(n, -1)], axis=1)
        validation = ValidationSet(round_id=0, logits=rng.normal(size=(6, c)).astype(np.float32),
                                   features=rng.normal(size=(6, d)).astype(np.float32), labels=np.arange(6) % c)
        request = RoundRequest(round_id=0, model_step=0, ground=plan.ground, n_ground=n, n_select=3, n_chunks=1,
                               seed=0, strategy=config.strategy, sizes=np.ones(n, np.int64) if plan.ground == "batch"
                               else None, lr=0.01, with_validation=plan.needs_validation)
        ground = GroundSet(labels=labels.astype(np.int64), rows=rows if plan.summaries == "batch" else None,
                           errors=errors if plan.summaries == "example" else None,
                           features=features if plan.summaries == "example" else None,
                           validation=validation if plan.needs_validation else None)
        try:
            self._strategy.select(config, request, ground, self.device)
        except Exception:  # a warm-up never stops the selector; a real round would report the failure
            log.exception("warm-up of %s failed", config.strategy)
        return time.perf_counter() - start

    # cheap calls -------------------------------------------------------------------------------
    def plan(self) -> StrategyPlan:
        """What the configured strategy needs from the trainer."""
        return self._strategy.plan(self.config)

    def reconfigure(self, config) -> StrategyPlan:
        """Swap the strategy for rounds asked from now on (open rounds keep theirs); returns the new plan."""
        config = SELECTOR_CONFIG.validate_python(config)
        with self._lock:
            self.config, self._strategy = config, implementation(config)
        log.info("reconfigured to %s", config.strategy)
        return self.plan()

    def status(self) -> SelectorStatus:
        """The selector's state: its strategy, the rounds running and answered, the seconds spent, its GPU memory
        peak (``gpu_peak_bytes``)."""
        with self._lock:
            running = [r for r, state in self._rounds.items() if state.started and not state.done.is_set()]
            return SelectorStatus(strategy=self.config.strategy, running=running, answered=self._answered,
                                  busy_s=self._busy_s, stopped=self._stopped, device=self.device,
                                  gpu_peak_bytes=gpu_peak_bytes(self.device))

    def stop(self) -> None:
        """Fail every open round and refuse new ones."""
        with self._lock:
            self._stopped = True
            for state in self._rounds.values():
                self._fail(state, "stopped", "selector stopped")

    def routes(self, round_id: int, layout: SummaryLayout | None = None) -> WholeChunks:
        """Where round ``round_id``'s summaries go: whole chunks to ``add_chunk`` (this selector holds them).

        The sharded coordinator (``service.coordinator.ShardedSelector.routes``) answers with a class map instead, by
        which senders deliver the summaries to its shards themselves; ``layout`` describes the summaries for it.
        """
        return WholeChunks()

    # the round ---------------------------------------------------------------------------------
    def start_round(self, request) -> Accepted | Rejection:
        """Open a round; an older open round is superseded (its answer would be stale).

        Returns ``Accepted``, or the ``Rejection`` of an invalid request (its round then fails with it).
        """
        try:
            request = RoundRequest.model_validate(request)
        except ValidationError as exc:
            return self._reject(Rejection.invalid("request", round_of(request), exc))
        with self._lock:
            if self._stopped:
                raise RoundFailed(request.round_id, "stopped", "selector stopped")
            for round_id, state in list(self._rounds.items()):
                if round_id < request.round_id:
                    self._fail(state, "superseded", f"superseded by round {request.round_id}")
                    del self._rounds[round_id]
            state = self._rounds.setdefault(request.round_id, RoundState())
            state.request = request
            state.last_input = time.monotonic()
            if request.n_chunks:
                state.buffer = _GroundBuffer(request.n_ground)
                for chunk in state.chunks.values():
                    self._place(state, chunk)
                state.chunks = {}
            state.config, state.strategy = self.config, self._strategy
            self._latest = max(self._latest, request.round_id)
            if self._unclaimed is not None:
                self._fail(state, "rejected", self._unclaimed.reason)
                self._unclaimed = None
            if request.strategy != self.config.strategy:
                rejection = Rejection(subject="request", round_id=request.round_id, field="strategy",
                                      value=repr(request.strategy), rule=f"this selector runs {self.config.strategy!r} "
                                      "(restarted since a reconfigure?)")
                self._fail(state, "rejected", f"round asked of strategy {request.strategy!r}, but this selector runs "
                                  f"{self.config.strategy!r} (restarted since a reconfigure?)")
                return rejection
            self._maybe_start(request.round_id, state)
        return Accepted(round_id=request.round_id)

    def add_chunk(self, chunk) -> Accepted | Rejection:
        """Store one chunk; chunks may arrive before their request or out of order.

        Returns ``Accepted``, or the ``Rejection`` of an invalid chunk (its round then fails with it).
        """
        try:
            chunk = GradientChunk.model_validate(chunk)
        except ValidationError as exc:
            return self._reject(Rejection.invalid(f"chunk {payload_field(chunk, 'chunk_index')}", round_of(chunk),
                                                  exc))
        accepted = Accepted(round_id=chunk.round_id)
        with self._lock:
            if chunk.round_id < self._latest:
                return accepted  # a superseded round's late chunk
            state = self._rounds.setdefault(chunk.round_id, RoundState())
            if state.request is not None and chunk.chunk_index >= state.request.n_chunks:
                self._fail(state, "rejected",
                           f"chunk_index == {chunk.chunk_index}, must be < {state.request.n_chunks}")
                return Rejection(subject=f"chunk {chunk.chunk_index}", round_id=chunk.round_id, field="chunk_index",
                                 value=str(chunk.chunk_index), rule=f"must be < {state.request.n_chunks}")
            if chunk.chunk_index in state.received:
                return accepted  # a repeated delivery of a chunk already placed
            state.received.add(chunk.chunk_index)
            if state.buffer is not None:
                self._place(state, chunk)
            else:
                state.chunks[chunk.chunk_index] = chunk
            state.last_input = time.monotonic()
            self._maybe_start(chunk.round_id, state)
        return accepted

    def add_validation(self, validation) -> Accepted | Rejection:
        """Store the validation set's last-layer view for a round that asked for it.

        Returns ``Accepted``, or the ``Rejection`` of an invalid validation set (its round then fails with it).
        """
        try:
            validation = ValidationSet.model_validate(validation)
        except ValidationError as exc:
            return self._reject(Rejection.invalid("validation set", round_of(validation), exc))
        with self._lock:
            if validation.round_id >= self._latest:
                state = self._rounds.setdefault(validation.round_id, RoundState())
                state.validation = validation
                self._maybe_start(validation.round_id, state)
        return Accepted(round_id=validation.round_id)

    def result(self, round_id: int, timeout_s: float, request_grace_s: float = REQUEST_GRACE_S,
               chunk_grace_s: float = CHUNK_GRACE_S) -> SubsetMessage:
        """Block until round ``round_id`` is answered; return its ``SubsetMessage``.

        A round whose request does not arrive within ``request_grace_s`` is unknown here (its request
        went to an earlier incarnation of a restarted selector), and one whose chunks stop coming for
        ``chunk_grace_s`` before they are complete lost some to such a restart: both fail at once
        instead of waiting for ``timeout_s``.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        with self._lock:
            state = self._rounds.setdefault(round_id, RoundState())
        try:
            while not state.done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                self._check_progress(round_id, state, start, deadline, request_grace_s, chunk_grace_s)
            if state.error is not None:
                raise RoundFailed(round_id, state.error.kind, state.error.detail)
            return state.answer
        finally:
            with self._lock:
                if self._rounds.get(round_id) is state:
                    del self._rounds[round_id]

    # internals ---------------------------------------------------------------------------------
    @staticmethod
    def _check_progress(round_id, state: RoundState, start, deadline, request_grace_s, chunk_grace_s) -> None:
        now = time.monotonic()
        if now >= deadline:
            raise RoundFailed(round_id, "timeout", f"not answered within {deadline - start:g} s")
        if state.request is None and now - start > request_grace_s:
            raise RoundFailed(round_id, "unknown_round", "unknown to this selector (restarted since it was asked)")
        if state.request is not None and not state.started and now - state.last_input > chunk_grace_s:
            raise RoundFailed(
                round_id, "chunks_lost", f"{len(state.received)} of {state.request.n_chunks} chunks arrived, then "
                f"none for {chunk_grace_s} s (lost to a selector restart?)"
            )

    def _reject(self, rejection: Rejection) -> Rejection:
        """Fail the round an invalid message belongs to: its own round id when readable, else the newest open one.

        With no open round the rejection waits for the next round to be asked (its message came first).
        """
        log.warning("%s", rejection.reason)
        round_id = rejection.round_id
        with self._lock:
            if round_id is None:
                open_rounds = [r for r, state in self._rounds.items() if not state.done.is_set()]
                if not open_rounds:
                    self._unclaimed = rejection
                    return rejection
                round_id = max(open_rounds)
            if round_id >= self._latest:
                self._fail(self._rounds.setdefault(round_id, RoundState()), "rejected", rejection.reason)
        return rejection

    def _place(self, state: RoundState, chunk: GradientChunk) -> None:
        try:
            state.buffer.put(chunk)
        except ValueError as exc:
            self._fail(state, "rejected", str(exc))

    def _fail(self, state: RoundState, kind: FailureKind, detail: str) -> None:
        if not state.done.is_set():
            state.error = Failure(kind, detail)
            state.done.set()

    def _maybe_start(self, round_id: int, state: RoundState) -> None:
        request = state.request
        if state.started or request is None or state.done.is_set():
            return
        if len(state.received) < request.n_chunks or (request.with_validation and state.validation is None):
            return
        state.started = True
        threading.Thread(
            target=self._run, args=(round_id, state), name=f"select-{round_id}", daemon=True
        ).start()

    def _run(self, round_id: int, state: RoundState) -> None:
        clock = RoundClock()
        try:
            ground = _assemble(state.request, state.buffer, state.validation)
            state.buffer, state.validation = None, None
            select_start = time.perf_counter()
            config = state.config
            selection = state.strategy.select(config, state.request, ground, self.device)
            select_s = time.perf_counter() - select_start
            errors = gradient_errors(config, ground, state.request.sizes, selection.indices, selection.weights)
            log.debug("round %d: %s, the strategy's own matching error %s", round_id, errors, selection.match_error)
            answer, busy_s = self._answer(state, selection, errors, select_s, clock)
        except Exception as exc:  # the trainer is told, the service stays up
            log.exception("round %d failed", round_id)
            with self._lock:
                self._busy_s += clock.read()[0]
                self._fail(state, "failed", f"{type(exc).__name__}: {exc}")
            return
        self._deliver(state, answer, busy_s)

    @staticmethod
    def _answer(state: RoundState, selection: Selection, errors: GradientErrors, select_s: float,
                clock: RoundClock) -> tuple[SubsetMessage, float]:
        """The round's validated answer (after the configured delay and fault) and the seconds it took.

        ``clock`` was started by the round's thread: the message carries the wall seconds, the CPU seconds of
        that thread (its work, without the time it waited for a core) and how often it was preempted."""
        config = state.config
        _, cpu_s, preempted = clock.read()
        if config.delay_s:
            time.sleep(config.delay_s)
        busy_s = clock.read()[0]
        answer = _message(config.strategy, state.request, selection, errors, select_s, busy_s, cpu_s, preempted)
        return _inject_fault(config.fault, answer, state.request), busy_s

    def _deliver(self, state: RoundState, answer: SubsetMessage, busy_s: float) -> None:
        with self._lock:
            self._busy_s += busy_s
            self._answered += 1
            if not state.done.is_set():
                state.answer = answer
                state.done.set()


def _assemble(request: RoundRequest, buffer: _GroundBuffer | None, validation) -> GroundSet | None:
    """The round's ground set; every id must have appeared exactly once."""
    if request.n_chunks == 0:
        return GroundSet(labels=np.zeros(0, np.int64), validation=validation) if validation else None
    return buffer.ground(validation)


def payload_field(payload, name: str):
    return payload.get(name) if isinstance(payload, dict) else getattr(payload, name, None)


def round_of(payload) -> int | None:
    """The round id of a message that failed validation, when it is itself a valid round id."""
    try:
        return _ROUND_ID.validate_python(payload_field(payload, "round_id"))
    except ValidationError:
        return None


def _message(strategy: str, request: RoundRequest, selection: Selection, errors: GradientErrors,
             select_s: float, busy_s: float, cpu_s: float | None = None,
             preempted: int | None = None) -> SubsetMessage:
    return SubsetMessage.model_validate(
        {
            "round_id": request.round_id,
            "model_step": request.model_step,
            "strategy": strategy,
            "indices": selection.indices,
            "weights": selection.weights,
            **errors.fields(),
            "n_padded": selection.n_padded,
            "target": selection.target,
            "select_s": select_s,
            "busy_s": busy_s,
            "cpu_s": cpu_s,
            "preempted": preempted,
        },
        context={"request": request},
    )


def _inject_fault(fault: str, answer: SubsetMessage, request: RoundRequest) -> SubsetMessage:
    """Corrupt an answer on purpose (config ``fault``), after its own validation; invalid for any size >= 1.

    The corrupt answer is a ``SubsetMessage`` built without validation (``model_copy``), so that only the
    receiver's validation (``trainer.client.rounds``) can catch it."""
    if fault == "none":
        return answer
    indices, weights = answer.indices.copy(), answer.weights.copy()
    update = {}
    if fault == "wrong_round":
        update["round_id"] = answer.round_id + 1
    elif fault == "index_out_of_range":
        indices[0] = request.n_ground
    elif fault == "negative_weight":
        weights[0] = -1.0
    elif fault == "duplicate_index":  # appended, so a one-element answer is corrupted too
        indices, weights = np.append(indices, indices[0]), np.append(weights, weights[0])
    elif fault == "crash":
        raise RuntimeError("injected fault: crash")
    return answer.model_copy(update={"indices": indices, "weights": weights, **update})
