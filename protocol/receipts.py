"""What a selector answers to a message it was sent: ``Accepted``, or a ``Rejection`` that says what was refused.

The trainer sends requests, chunks and validation sets without waiting for the answer, so a rejection also
fails its round (``protocol.errors.RoundFailed`` carries ``Rejection.reason``); a caller that does wait (tests,
the shard placement check) reads the answer by type: ``isinstance(answer, Rejection)``, never a bare string.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from protocol.config import Strict

VALUE_CHARS = 80  # a rejected value is shown up to this many characters


class Accepted(Strict):
    """The message was taken (a repeat or a superseded round's late message is taken and dropped)."""

    accepted: Literal[True] = True
    round_id: int | None = Field(None, description="the round the message belongs to, when known")


class Rejection(Strict):
    """A message refused where it arrived: what it was, the field and value at fault and the rule they broke."""

    accepted: Literal[False] = False
    subject: str = Field(description="what was refused: 'request', 'chunk 3', 'validation set', 'summary layout', ...")
    round_id: int | None = Field(None, description="the round it belongs to (and that fails with it), when known")
    field: str | None = Field(None, description="the dotted name of the field at fault, when one is")
    value: str | None = Field(None, description=f"that field's value, shown in at most {VALUE_CHARS} characters")
    rule: str = Field(description="what the value (or the message) must be, or why it cannot be taken")

    @property
    def reason(self) -> str:
        """The one line a round's failure and a record carry."""
        return f"{self.subject} rejected: {self.field + ': ' if self.field else ''}{self.rule}"

    @classmethod
    def invalid(cls, subject: str, round_id: int | None, exc) -> "Rejection":
        """The rejection of a message that failed validation (``exc``, a pydantic ``ValidationError``): its first
        error names the field, value and rule; further errors are appended to the rule."""
        errors = exc.errors()
        if not errors:
            return cls(subject=subject, round_id=round_id, rule=str(exc))
        first = errors[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        rest = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in errors[1:]]
        return cls(subject=subject, round_id=round_id, field=field,
                   value=shown(first.get("input")) if field else None, rule="; ".join([first["msg"], *rest]))


def shown(value) -> str:
    """``value`` in a few characters: arrays by shape and type, anything else by its (shortened) repr."""
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and type {value.dtype}"
    text = repr(value)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 3] + "..."
