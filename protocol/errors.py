"""Failures that cross the actor boundary, as types that carry their data.

Ray re-raises an actor's exception on ``ray.get`` as a ``RayTaskError`` that is also an instance of the
original class, so the trainer side catches these by type (``except RoundFailed``), never by their text.
``one_line`` turns any exception into the single line a user or a record sees.
"""

from __future__ import annotations

from typing import Literal, get_args

FailureKind = Literal[
    "stopped",  # the selector was stopped (or is stopping): it takes no more rounds
    "superseded",  # a newer round was asked before this one was answered
    "timeout",  # not answered within the round's timeout
    "unknown_round",  # the selector never saw the round's request (restarted since it was asked)
    "chunks_lost",  # the round's chunks stopped coming before they were complete (lost to a restart)
    "rejected",  # a message of the round was refused (``protocol.receipts.Rejection``: field, value, rule)
    "shard_lost",  # a shard of the sharded selector died while the round needed it
    "shard_timeout",  # a shard did not answer within the round's deadline
    "shard_error",  # a shard's call raised (it lacks the round's parts, or its computation failed)
    "failed",  # the strategy (or the coordinator's own step) raised
]
FAILURE_KINDS: tuple[str, ...] = get_args(FailureKind)


class RoundFailed(RuntimeError):
    """Round ``round_id`` could not be answered: ``kind`` says what went wrong (one of ``FAILURE_KINDS``), and
    ``detail`` says it in one line; ``reason`` is that line, ``str(exc)`` the line with the round named."""

    def __init__(self, round_id: int | None, kind: FailureKind, detail: str):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"kind == {kind!r}, must be one of {', '.join(FAILURE_KINDS)}")
        self.round_id = round_id
        self.kind = kind
        self.detail = detail
        super().__init__(f"round {round_id}: {detail}" if round_id is not None else detail)

    @property
    def reason(self) -> str:
        """The one line a round record carries."""
        return self.detail

    def __reduce__(self):  # picklable with its fields, so Ray carries them across
        return (type(self), (self.round_id, self.kind, self.detail))


class RunFailed(RuntimeError):
    """A run stopped because it could not go on as asked (non-finite loss, selector lost, a write failed)."""

    def __init__(self, reason: str, epoch: int | None = None):
        self.reason = reason
        self.epoch = epoch
        super().__init__(reason)

    def __reduce__(self):
        return (type(self), (self.reason, self.epoch))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The one line that explains ``exc``: its own reason when it carries one, else its last message line.

    Ray wraps an actor's exception in a traceback dump whose last non-empty line is the cause
    (``RoundFailed: round 3: ...``); the cause's own ``reason`` is preferred when the type is known.
    """
    cause = getattr(exc, "cause", None)  # RayTaskError keeps the original exception here
    for candidate in (exc, cause):
        reason = getattr(candidate, "reason", None)
        if isinstance(reason, str) and reason:
            return reason[:limit]
    if hasattr(exc, "errors") and callable(exc.errors):  # a pydantic ValidationError
        try:
            parts = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()]
            return "; ".join(parts)[:limit]
        except (TypeError, KeyError):
            pass
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:limit]
