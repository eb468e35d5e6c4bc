"""What a summary worker is asked to do and what it answers (``trainer.client.workers``).

A round's summary pass is cut into jobs, one chunk each: ``BatchJob`` (the mean last-layer gradient rows of
some of the round's mini-batches) or ``ExampleJob`` (the per-example factors of a run of the ground set). The
worker answers each call with a ``WorkerReport``. Frozen dataclasses, as the jobs carry tensors of example ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from pydantic import Field

from protocol.config import Strict


@dataclass(frozen=True, eq=False)  # tensors: compared by identity
class BatchJob:
    """Chunk ``index``: the rows of mini-batches ``start ..`` of the round, each given by its example ids."""

    index: int
    start: int
    batches: list


@dataclass(frozen=True, eq=False)
class ExampleJob:
    """Chunk ``index``: the factors of the round's ground elements ``start .. stop - 1``; ``ids`` their example
    ids (None: the examples of those numbers)."""

    index: int
    start: int
    stop: int
    ids: object = None


SummaryJob = Union[BatchJob, ExampleJob]


class WorkerReport(Strict):
    """A summary worker's answer for one round: where it ran, the chunks it sent and the seconds it took."""

    node: str = Field(description="the Ray node id the worker runs on")
    n_chunks: int = Field(ge=0, description="chunks made and sent (0: the round took no summaries)")
    seconds: float = Field(ge=0, description="seconds from the call to the last chunk sent")
