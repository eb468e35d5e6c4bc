"""What a selector says of itself: its answer to ``status`` (``SelectorStatus``), read by attribute.

The single selector (``service.selector``) fills the common fields; the sharded coordinator
(``service.coordinator``) adds its shard count, the summary bytes that came through it and the last round's
traffic (``RoundTraffic``). docs/scaling.md.
"""

from __future__ import annotations

from pydantic import Field

from protocol.config import Strict


class RoundTraffic(Strict):
    """A sharded round's figures, kept once it is over: what crossed to and from the shards and where it waited."""

    round_id: int = Field(ge=0)
    moved_bytes: int = Field(ge=0, description="bytes of arrays sent to and received from the shards")
    routed_bytes: int = Field(ge=0, description="bytes of summaries that came through the coordinator (0: the "
                              "senders delivered them to the shards)")
    shard_s: dict[str, float] = Field(default_factory=dict, description="seconds the coordinator waited on the "
                                      "shards, per call (deliver, gather, solve_classes, gram, ...)")
    class_shards: list[int] | None = Field(None, description="the shard of each class (-1: none), per-example "
                                           "rounds; None for mini-batch rounds")
    shard_peak_bytes: list[int | None] | None = Field(None, description="each shard's memory peak over its start "
                                                      "(None where it cannot be read)")
    shard_held_bytes: list[int] | None = Field(None, description="bytes of the round's summaries each shard held")


class SelectorStatus(Strict):
    """A selector's state: its strategy, the rounds running, the rounds answered and the seconds spent."""

    strategy: str = Field(description="the strategy rounds asked from now on run")
    running: list[int] = Field(default_factory=list, description="rounds whose selection is running")
    answered: int = Field(0, ge=0, description="rounds answered so far")
    busy_s: float = Field(0.0, ge=0, description="seconds spent on rounds so far")
    stopped: bool = Field(False, description="stopped: every open round failed, new ones are refused")
    device: str = Field(description="where strategies compute")
    gpu_peak_bytes: int | None = Field(None, ge=0, description="the most bytes torch's allocator held at once on the "
                                       "selector's CUDA device in its process (torch.cuda.max_memory_allocated); "
                                       "None on the CPU or before CUDA was used in that process")
    shards: int | None = Field(None, ge=1, description="shards of a sharded selector; None for the single one")
    routed_bytes: int | None = Field(None, ge=0, description="bytes of summaries that came through the coordinator, "
                                     "all rounds (sharded selector)")
    last_round: RoundTraffic | None = Field(None, description="the last sharded round's traffic (None before any)")
