"""Selection from the shards, the coordinator's side: calls on the shards (``ShardCalls``), and each strategy
run on their partial results (``select_sharded``, ``sharded_gradient_errors``), equal to the single
selector's answer on the whole ground set. docs/scaling.md.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from protocol.config import CraigPBSelector, GradMatchPBSelector, GradMatchSelector
from protocol.errors import RoundFailed, one_line
from protocol.messages import RoundRequest, ValidationSet
from protocol.routes import ShardPart, nbytes
from service import craig
from service.omp import omp_gram
from service.ridge import ridge_weights
from service.routes import BatchRoutes, ExampleRoutes
from service.shard import ShardService
from service.strategies import (
    GradientErrors, Selection, class_budgets, class_picks, flat_error_sums, matched_in_class_columns, pad_selection,
    round_rng, select_random, validation_target,
)

log = logging.getLogger(__name__)


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

    def send(self, round_id: int, index: int, part: ShardPart) -> None:
        """Deliver one part without waiting; ``settle`` checks the deliveries."""
        with self._lock:
            self.moved[round_id] = self.moved.get(round_id, 0) + nbytes(part)
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
            self.moved[round_id] = self.moved.get(round_id, 0) + nbytes(list(args.values()))
        began = time.monotonic()
        if not self.remote:
            results = {i: _local_call(round_id, i, getattr(self.shards[i], method), a) for i, a in args.items()}
        else:
            calls = [(i, getattr(self.shards[i], method).remote(*a)) for i, a in args.items()]
            results = self._wait(round_id, calls, deadline)
        with self._lock:
            self.moved[round_id] += nbytes(list(results.values()))
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
                raise RoundFailed(round_id, "shard_timeout", f"shard {i} did not answer within "
                                  f"{max(0.0, left):.0f} s (restarting, or its node gone?)")
            ref = ready[0]
            try:
                results[index_of[ref]] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except RayActorError as exc:
                raise RoundFailed(round_id, "shard_lost", f"shard {index_of[ref]} lost: {one_line(exc)}") from None
            except GetTimeoutError as exc:
                raise RoundFailed(round_id, "shard_timeout", f"shard {index_of[ref]}: {one_line(exc)}") from None
            except RayTaskError as exc:
                raise RoundFailed(round_id, "shard_error", f"shard {index_of[ref]}: {one_line(exc)}") from None
        return results


def _local_call(round_id: int, index: int, method, args: tuple):
    try:
        return method(*args)
    except Exception as exc:
        raise RoundFailed(round_id, "shard_error", f"shard {index}: {one_line(exc)}") from None


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


def select_sharded(config, job: ShardedRound, calls: ShardCalls, run) -> Selection:
    """Run ``config``'s strategy on the shards (which first stack the round's parts): ``run`` is its sharded
    variant (``service.registry``), one of the ``sharded_*`` functions below.

    The result equals ``service.strategies`` on the whole ground set (the same indices, weights to rounding).
    """
    if job.routes is None:  # no summaries were sent
        if not config.measure_only:
            raise ValueError(f"{config.strategy} needs summaries in its ground set, none were sent")
        return run(config, job, calls)
    wanted = config.ground
    if job.routes.kind != wanted:
        what = "rows" if wanted == "batch" else "errors"
        raise ValueError(f"{config.strategy} needs {what} in its ground set, none were sent")
    deadline = job.deadline()
    calls.each(job.round_id, "gather", {i: (job.round_id, int(n)) for i, n in enumerate(job.routes.sent)}, deadline)
    return run(config, job, calls)


def sharded_random(config, job: ShardedRound, calls: ShardCalls) -> Selection:
    """RANDOM: the coordinator draws it (the summaries, if any, only measure its error)."""
    return select_random(config, job.request, None)


def sharded_whole(config, job: ShardedRound, calls: ShardCalls) -> Selection:
    """GLISTER: its greedy couples all classes, so shard 0 holds the whole ground set and selects."""
    indices, weights, target = calls.each(
        job.round_id, "select_whole", {0: (job.round_id, config, job.request, job.validation)}, job.deadline())[0]
    return Selection(indices, weights, target=target)


def sharded_per_class(config, job: ShardedRound, calls: ShardCalls) -> Selection:
    """GRAD-MATCH and CRAIG: each shard solves its classes; the coordinator merges them in class order."""
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


def sharded_gradmatch_pb(config: GradMatchPBSelector, job: ShardedRound, calls: ShardCalls) -> Selection:
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


def sharded_craig_pb(config: CraigPBSelector, job: ShardedRound, calls: ShardCalls) -> Selection:
    parts = calls.each(job.round_id, "gram", {i: (job.round_id, "float64", None, None)
                                              for i in range(job.routes.n_shards)}, job.deadline())
    gram = _summed(parts, 0)
    indices, weights = craig.select_craig(0.5 * (gram + gram.T), job.request.n_select)
    return Selection(np.asarray(indices, dtype=np.int64), np.asarray(weights, dtype=np.float64))


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

