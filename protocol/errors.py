"""Failures that cross the actor boundary, as types that carry their data.

Ray re-raises an actor's exception on ``ray.get`` as a ``RayTaskError`` that is also an instance of the
original class, so the trainer side catches these by type (``except RoundFailed``), never by their text.
``one_line`` turns any exception into the single line a user or a record sees.
"""

from __future__ import annotations


class RoundFailed(RuntimeError):
    """Round ``round_id`` could not be answered; ``reason`` says why in one line."""

    def __init__(self, round_id: int | None, reason: str):
        self.round_id = round_id
        self.reason = reason
        super().__init__(f"round {round_id}: {reason}" if round_id is not None else reason)

    def __reduce__(self):  # picklable with its fields, so Ray carries them across
        return (type(self), (self.round_id, self.reason))


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
