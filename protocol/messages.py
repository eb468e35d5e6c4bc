"""Messages that cross the trainer/selector boundary (docs/design.md §3).

Every message is validated where it is received: the selector validates requests and chunks, the
trainer validates each ``SubsetMessage`` against the round it asked for, passing the request as
validation context (``SubsetMessage.model_validate(payload, context={"request": request})``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from protocol.arrays import Float32Matrix, Float64Vector, Int64Vector
from protocol.config import Strict

Ground = Literal["batch", "example"]


class ArrayMessage(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


Summaries = Literal["none", "batch", "example"]


class StrategyPlan(Strict):
    """What a strategy needs from the trainer, declared by the selector; the trainer computes only that."""

    strategy: str
    rounds: bool = Field(description="False for strategies that train on everything (FULL, FULL-EARLYSTOP)")
    ground: Ground = "example"
    summaries: Summaries = Field(
        "none", description="batch: mean last-layer gradient rows per mini-batch; example: per-example factors"
    )
    needs_validation: bool = Field(False, description="validation logits, features and labels each round")
    measure_only: bool = Field(
        False, description="the summaries only measure grad_error (RANDOM): their time is left out of wall_s"
    )
    time_budget_s: float | None = Field(None, description="stop training after this much wall time")
    online: bool = Field(
        False, description="no rounds: the trainer draws a seeded random subset every subset epoch (RANDOM-ONLINE)"
    )


class RoundRequest(ArrayMessage):
    """The trainer asks for round ``round_id``; ``n_chunks`` gradient chunks follow."""

    round_id: int = Field(ge=0)
    model_step: int = Field(ge=0, description="optimizer steps taken when the snapshot was made")
    ground: Ground
    n_ground: int = Field(ge=1, description="size of the ground set (examples or batches)")
    n_select: int = Field(ge=1, description="exact number of ground elements to choose")
    n_chunks: int = Field(ge=0)
    seed: int = Field(ge=0)
    strategy: str = Field(description="the strategy the trainer believes the selector runs")
    sizes: Int64Vector | None = Field(None, description="(n_ground,) examples per ground element")
    lr: float | None = Field(None, ge=0, description="learning rate at the snapshot (GLISTER's look-ahead)")
    with_validation: bool = Field(False, description="a ValidationSet message follows")

    @model_validator(mode="after")
    def _consistent(self) -> "RoundRequest":
        if self.n_select > self.n_ground:
            raise ValueError(f"n_select == {self.n_select}, must be <= n_ground ({self.n_ground})")
        if self.sizes is not None:
            if self.sizes.shape != (self.n_ground,):
                raise ValueError(f"sizes has shape {self.sizes.shape}, must be ({self.n_ground},)")
            if self.sizes.size and self.sizes.min() < 1:
                raise ValueError("sizes must all be >= 1")
        return self


def _unique(name: str, values: np.ndarray) -> np.ndarray:
    unique, counts = np.unique(values, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"{name} must be unique; repeated: {unique[counts > 1][:5].tolist()}")
    return values


def _non_negative(name: str, values: np.ndarray) -> np.ndarray:
    if values.size and values.min() < 0:
        raise ValueError(f"{name} must be >= 0, got min {values.min()}")
    return values


def _check_rows(name: str, array: np.ndarray | None, n: int) -> None:
    if array is None:
        return
    if array.shape[0] != n:
        raise ValueError(f"{name} has {array.shape[0]} rows, must equal ids ({n})")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(f"{name} contain {bad} non-finite values; gradient summaries must be finite")


class GradientChunk(ArrayMessage):
    """A slice of the ground set's gradient summaries for ground elements ``ids``.

    Mini-batches carry ``rows`` (n, C + C*D): each batch's mean last-layer gradient. Examples carry the
    factors of theirs, ``errors`` (n, C) = softmax(z) - onehot(y) and ``features`` (n, D), the input of
    the last layer: the gradient is ``errors ⊗ [1, features]``. Validated with the round's request as context
    (``context={"request": request}``), the chunk must also belong to that round and its ground set.
    """

    round_id: int = Field(ge=0)
    chunk_index: int = Field(ge=0)
    ids: Int64Vector
    labels: Int64Vector
    rows: Float32Matrix | None = None
    errors: Float32Matrix | None = None
    features: Float32Matrix | None = None

    @field_validator("ids")
    @classmethod
    def _ids_valid(cls, ids: np.ndarray) -> np.ndarray:
        return _unique("ids", _non_negative("ids", ids))

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, labels: np.ndarray) -> np.ndarray:
        return _non_negative("labels", labels)

    @model_validator(mode="after")
    def _aligned(self, info: ValidationInfo) -> "GradientChunk":
        n = self.ids.shape[0]
        if self.labels.shape[0] != n:
            raise ValueError(f"labels has {self.labels.shape[0]} entries, must equal ids ({n})")
        given = [name for name in ("rows", "errors", "features") if getattr(self, name) is not None]
        if given not in (["rows"], ["errors", "features"]):
            what = " and ".join(given) + " given" if given else "rows, errors and features all missing"
            raise ValueError(f"{what}: a chunk carries either rows, or errors and features")
        for name in given:
            _check_rows(name, getattr(self, name), n)
        request = (info.context or {}).get("request")
        if request is not None:
            if self.round_id != request.round_id:
                raise ValueError(f"round_id == {self.round_id}, must be {request.round_id} as asked")
            if self.chunk_index >= request.n_chunks:
                raise ValueError(f"chunk_index == {self.chunk_index}, must be < n_chunks ({request.n_chunks})")
            if n and self.ids.max() >= request.n_ground:
                raise ValueError(f"ids must be in [0, {request.n_ground}), got max {self.ids.max()}")
        return self


class ValidationSet(ArrayMessage):
    """What the validation set looks like to the last layer at the snapshot."""

    round_id: int = Field(ge=0)
    logits: Float32Matrix
    features: Float32Matrix
    labels: Int64Vector

    @model_validator(mode="after")
    def _aligned(self) -> "ValidationSet":
        n = self.labels.shape[0]
        if n == 0:
            raise ValueError("labels must not be empty: the validation set is empty")
        _check_rows("logits", self.logits, n)
        _check_rows("features", self.features, n)
        if self.labels.min() < 0 or self.labels.max() >= self.logits.shape[1]:
            raise ValueError(f"labels must be in [0, {self.logits.shape[1]})")
        return self


class SubsetMessage(ArrayMessage):
    """A round's answer: ``indices`` into the ground set and their ``weights``.

    The selector returns the model itself; the trainer validates it again where it arrives, against the round
    it asked for (``model_validate(message, context={"request": request})``): instances are always revalidated,
    so an answer built without validation (the selector's injected faults) is caught there too.
    """

    model_config = ConfigDict(revalidate_instances="always")

    round_id: int = Field(ge=0)
    model_step: int = Field(ge=0)
    strategy: str
    indices: Int64Vector
    weights: Float64Vector
    grad_error: float | None = Field(
        None, ge=0, description="paper Eq. 1 with the raw weights: ||sum_S w_i g_i - target|| over the gradient the "
        "strategy matched (docs/metrics.md)"
    )
    grad_error_rel: float | None = Field(None, ge=0, description="grad_error / ||target||")
    grad_error_trained: float | None = Field(
        None, ge=0, description="the subset as trained against the full training gradient, relative"
    )
    n_padded: int = Field(0, ge=0, description="elements added at random because the solver stopped early")
    target: Literal["train", "val"] | None = Field(None, description="the gradient that was matched")
    select_s: float = Field(ge=0, description="seconds the strategy computed")
    busy_s: float = Field(ge=0, description="seconds the selector worked on this round")
    cpu_s: float | None = Field(
        None, ge=0, description="CPU seconds of the selector's round thread: its work without waits for a core"
    )
    preempted: int | None = Field(
        None, ge=0, description="times the round thread was preempted for another runnable thread (Linux)"
    )

    @field_validator("indices")
    @classmethod
    def _indices_unique(cls, indices: np.ndarray) -> np.ndarray:
        return _unique("indices", indices)

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, weights: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(weights)):
            raise ValueError("weights must be finite")
        if weights.size and weights.min() < 0:
            raise ValueError(f"weights must be >= 0, got min {weights.min():.4g}")
        with np.errstate(over="ignore"):
            total = weights.sum()
        if weights.size and not 0 < total < np.inf:
            raise ValueError(f"weights must have a positive, finite sum (training divides by their mean), got {total}")
        return weights

    @model_validator(mode="after")
    def _matches_request(self, info: ValidationInfo) -> "SubsetMessage":
        if self.weights.shape != self.indices.shape:
            raise ValueError(
                f"weights has {self.weights.shape[0]} entries, must equal indices ({self.indices.shape[0]})"
            )
        if self.n_padded > self.indices.size:
            raise ValueError(f"n_padded == {self.n_padded}, must be <= the size ({self.indices.size})")
        request = (info.context or {}).get("request")
        if request is not None:
            _check_against(self, request)
        return self


def _check_against(message: SubsetMessage, request: RoundRequest) -> None:
    if message.round_id != request.round_id:
        raise ValueError(f"round_id == {message.round_id}, must be {request.round_id} as asked")
    if message.strategy != request.strategy:
        raise ValueError(f"strategy == {message.strategy!r}, must be {request.strategy!r} as asked")
    if message.model_step != request.model_step:
        raise ValueError(f"model_step == {message.model_step}, must be {request.model_step} as asked")
    if message.indices.size and (message.indices.min() < 0 or message.indices.max() >= request.n_ground):
        raise ValueError(
            f"indices must be in [0, {request.n_ground}), got range "
            f"[{message.indices.min()}, {message.indices.max()}]"
        )
    if message.indices.size > request.n_select:
        raise ValueError(
            f"indices has size {message.indices.size}, must be <= the budget of {request.n_select} "
            f"({request.ground} elements)"
        )
    if message.indices.size == 0:
        raise ValueError("indices must not be empty")

