"""Generated ``SubsetMessage`` and ``GradientChunk`` payloads against an oracle written here from the rules of the
round (docs/design.md §3), not from ``protocol/``: no invalid payload is accepted, every valid one is, and every
rejection is a ``ValidationError`` that names only fields the oracle finds at fault.

Each case starts from a valid payload for a generated ``RoundRequest`` and applies up to three mutations (wrong
round, duplicate or out-of-range indices, negative/NaN/inf weights, wrong lengths, other dtypes and shapes, ...).
Some mutations keep the payload valid (an exact float index, int weights); the oracle, which sees only the final
payload, decides.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol.messages import GradientChunk, RoundRequest, SubsetMessage

N_SUBSET_CASES = 5500
N_CHUNK_CASES = 4500
INT64_MIN, INT64_END = -(2**63), 2**63
FLOAT32_MAX = float(np.finfo(np.float32).max)
SUBSET_REQUIRED = {"round_id", "model_step", "strategy", "indices", "weights", "select_s", "busy_s"}
SUBSET_FIELDS = SUBSET_REQUIRED | {"grad_error", "n_padded", "target"}
MATRICES = ("rows", "errors", "features")
CHUNK_REQUIRED = {"round_id", "chunk_index", "ids", "labels"}
CHUNK_FIELDS = CHUNK_REQUIRED | set(MATRICES)
# How a sender may encode an array: "list" is plain Python, the rest numpy dtypes or broken containers.
ENCODINGS = ("list", "int64", "int32", "uint64", "float64", "float32", "bool", "complex", "str", "object",
             "scalar", "column", "ragged", "none")
MATRIX_ENCODINGS = ("list", "int64", "float64", "float32", "bool", "complex", "str", "flat", "cube", "ragged")
CASES_RUN: Counter = Counter()
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- how payloads are encoded

@dataclass
class Encoded:
    """An array field as a sender put it: the payload value, its container kind, shape, and flat contents."""

    value: Any
    kind: str
    shape: tuple
    values: list


def encode(values: list, kind: str) -> Encoded:
    """Encode a flat list of numbers as ``kind`` (a numpy dtype when construction fails falls back to a list)."""
    if kind == "none":
        return Encoded(None, kind, (), [])
    if kind == "scalar":
        return Encoded(values[0] if values else 0, kind, (), values[:1])
    if kind == "ragged":
        return Encoded([list(values), list(values) + [0]], kind, (), values)
    if kind == "list":
        return Encoded(list(values), kind, (len(values),), list(values))
    shape = (len(values), 1) if kind == "column" else (len(values),)
    dtype = {"column": None, "object": object, "str": None}.get(kind, kind)
    try:
        with np.errstate(all="ignore"):
            array = np.array(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError, TypeError):
        return encode(values, "list")
    if kind == "str":
        array = array.astype(str)
    return Encoded(array, kind, array.shape, array.ravel().tolist())


def encode_matrix(rows: list[list[float]], n_cols: int, kind: str) -> Encoded:
    """Encode an (n, n_cols) matrix given as rows; an empty Python list is 1-D, as it has no column count."""
    flat = [v for row in rows for v in row]
    if kind == "ragged" and rows:
        return Encoded([row + [0.0] * (i % 2) for i, row in enumerate(rows)] + [[0.0] * (n_cols + 1)], kind, (), flat)
    if kind in ("list", "ragged"):
        return Encoded([list(row) for row in rows], "list", (len(rows), n_cols) if rows else (0,), flat)
    shape = {"flat": (len(flat),), "cube": (len(rows), n_cols, 1)}.get(kind, (len(rows), n_cols))
    dtype = None if kind in ("flat", "cube", "str") else kind
    try:
        with np.errstate(all="ignore"):
            array = np.array(flat, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError):
        return encode_matrix(rows, n_cols, "list")
    if kind == "str":
        array = array.astype(str)
    return Encoded(array, kind, array.shape, array.ravel().tolist())


def payload_of(fields: dict) -> dict:
    return {k: v.value if isinstance(v, Encoded) else v for k, v in fields.items()}


# --------------------------------------------------------------------------- the oracle

def whole(value) -> bool:
    """A number pydantic's int field takes: an int or an integral float (never a bool, None or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value == int(value)


def real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_vector(field: Encoded | None) -> list[int] | None:
    """The int64 values of a 1-D integer array, or None when ``field`` is not one."""
    if field is None or field.kind in ("none", "scalar", "ragged") or len(field.shape) != 1:
        return None
    if not field.values:
        return []
    if field.kind in ("bool", "complex", "str", "object"):
        return None
    if not all(isinstance(v, (int, float)) and whole(v) and INT64_MIN <= int(v) < INT64_END for v in field.values):
        return None
    return [int(v) for v in field.values]


def real_array(field: Encoded | None, ndim: int, limit: float = math.inf) -> list[float] | None:
    """The values of a real array of rank ``ndim`` whose finite values are within ``limit``, else None."""
    if field is None or field.kind in ("none", "scalar", "ragged") or len(field.shape) != ndim:
        return None
    if field.values and field.kind in ("complex", "str", "object"):
        return None
    values = [float(v) for v in field.values]
    return None if any(math.isfinite(v) and abs(v) > limit for v in values) else values


def subset_faults(fields: dict, request: RoundRequest) -> set[str]:
    """Fields of a SubsetMessage payload that break a rule of the round it answers (empty: valid)."""
    bad = (set(fields) - SUBSET_FIELDS) | (SUBSET_REQUIRED - set(fields))
    for name in ("round_id", "model_step"):
        if name in fields and not (whole(fields[name]) and fields[name] == getattr(request, name)):
            bad.add(name)
    if "strategy" in fields and fields["strategy"] != request.strategy:
        bad.add("strategy")
    indices = int_vector(fields.get("indices"))
    if "indices" in fields and (
        indices is None or len(set(indices)) != len(indices) or not 1 <= len(indices) <= request.n_select
        or any(not 0 <= i < request.n_ground for i in indices)
    ):
        bad.add("indices")
    weights = real_array(fields.get("weights"), 1)
    if "weights" in fields:
        if weights is None or not all(math.isfinite(w) and w >= 0 for w in weights):
            bad.add("weights")
        elif weights and not 0 < sum_or_inf(weights) < math.inf:
            bad.add("weights")
        elif indices is not None and len(weights) != len(indices):
            bad.add("weights")
    if fields.get("grad_error") is not None and not (real(fields["grad_error"]) and fields["grad_error"] >= 0):
        bad.add("grad_error")
    padded = fields.get("n_padded", 0)
    if not (whole(padded) and 0 <= padded and (indices is None or padded <= len(indices))):
        bad.add("n_padded")
    if fields.get("target") not in (None, "train", "val"):
        bad.add("target")
    for name in ("select_s", "busy_s"):
        if name in fields and not (real(fields[name]) and fields[name] >= 0):
            bad.add(name)
    return bad


def sum_or_inf(values: list[float]) -> float:
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def chunk_faults(fields: dict, request: RoundRequest) -> set[str]:
    """Fields of a GradientChunk payload that break a rule of the round it belongs to (empty: valid)."""
    bad = (set(fields) - CHUNK_FIELDS) | (CHUNK_REQUIRED - set(fields))
    if "round_id" in fields and not (whole(fields["round_id"]) and fields["round_id"] == request.round_id):
        bad.add("round_id")
    index = fields.get("chunk_index")
    if "chunk_index" in fields and not (whole(index) and 0 <= index < request.n_chunks):
        bad.add("chunk_index")
    ids = int_vector(fields.get("ids"))
    if "ids" in fields and (
        ids is None or len(set(ids)) != len(ids) or any(not 0 <= i < request.n_ground for i in ids)
    ):
        bad.add("ids")
    labels = int_vector(fields.get("labels"))
    if "labels" in fields and (
        labels is None or any(v < 0 for v in labels) or (ids is not None and len(labels) != len(ids))
    ):
        bad.add("labels")
    given = [name for name in MATRICES if fields.get(name) is not None]
    if given not in (["rows"], ["errors", "features"]):
        bad |= set(MATRICES)
    for name in given:
        values = real_array(fields[name], 2, FLOAT32_MAX)
        if values is None or not all(math.isfinite(v) for v in values):
            bad.add(name)
        elif ids is not None and fields[name].shape[0] != len(ids):
            bad.add(name)
    return bad


LEADING_WORD = re.compile(r"^(?:Value error, )?([a-z_]+)")


def named_fields(exc: ValidationError) -> set[str]:
    """The field each error is about: its location, or, for a whole-model rule, the first word of its message."""
    names = set()
    for error in exc.errors():
        match = LEADING_WORD.match(error["msg"])
        names.add(str(error["loc"][0]) if error["loc"] else match.group(1) if match else "")
    return names


def check(model, fields: dict, faults: set[str], request: RoundRequest, label: str) -> None:
    """Validate the payload against ``request`` and compare the outcome with the oracle's ``faults``."""
    payload = payload_of(fields)
    try:
        message = model.model_validate(payload, context={"request": request})
    except ValidationError as exc:
        assert faults, f"valid {label} rejected: {exc}\n{payload!r}"
        named = named_fields(exc)
        assert named and named <= faults, f"{label} rejected for {named}, at fault: {faults}\n{exc}\n{payload!r}"
        CASES_RUN[f"{label} rejected"] += 1
        return
    assert not faults, f"invalid {label} accepted (at fault: {faults})\n{payload!r}"
    for name, field in fields.items():  # accepted arrays hold what was sent, nothing wrapped or dropped
        if isinstance(field, Encoded):
            sent = np.array(field.values, dtype=getattr(message, name).dtype).reshape(getattr(message, name).shape)
            assert np.array_equal(getattr(message, name), sent), (name, payload)
    CASES_RUN[f"{label} accepted"] += 1


# --------------------------------------------------------------------------- generators
# Hypothesis draws the mutations and a seed; the request and the values come from a generator seeded with it
# (drawing each number through hypothesis would make the file several times slower).

BAD_REALS = [-1.0, -1e-9, math.nan, math.inf, -math.inf]
SUBSET_MUTATIONS = ("round", "model_step", "strategy", "duplicate", "index_high", "index_negative", "index_huge",
                    "index_fraction", "index_nan", "too_many", "empty", "weight_negative", "weight_nan",
                    "weight_inf", "weights_zero", "weights_overflow", "weights_length", "encode_indices",
                    "encode_weights", "n_padded", "grad_error", "target", "seconds", "extra", "missing")
CHUNK_MUTATIONS = ("round", "chunk_index", "duplicate", "id_negative", "id_high", "id_huge", "label_negative",
                   "labels_length", "matrix_rows", "matrix_value", "matrix_encoding", "structure", "encode_ids",
                   "encode_labels", "extra", "missing")
LAYOUTS = ([], ["rows", "errors"], ["rows", "features"], ["errors"], ["features"], list(MATRICES), ["rows"],
           ["errors", "features"])


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def round_like(rng: np.random.Generator, right: int):
    return pick(rng, [right, float(right), right + 1, right - 1, right + 0.5, -1, None])


def request_from(rng: np.random.Generator) -> RoundRequest:
    n_ground = int(rng.integers(1, 31))
    return RoundRequest(
        round_id=int(rng.integers(6)), model_step=int(rng.integers(1001)), ground=pick(rng, ["batch", "example"]),
        n_ground=n_ground, n_select=int(rng.integers(1, n_ground + 1)), n_chunks=int(rng.integers(1, 5)), seed=0,
        strategy=pick(rng, ["gradmatch", "craig-pb", "random"]),
    )


def cases(mutations: tuple[str, ...]):
    """A seed (for the request and the values) and up to three mutation names."""
    return st.tuples(st.integers(0, 2**32 - 1), st.lists(st.sampled_from(mutations), max_size=3))


def subset_fields(request: RoundRequest, mutations: list[str], rng: np.random.Generator) -> dict:
    """A valid answer to ``request``, then ``mutations`` applied to it."""
    size = int(rng.integers(1, request.n_select + 1))
    indices = rng.permutation(request.n_ground)[:size].tolist()
    weights = (rng.uniform(0, 10, size) * (rng.random(size) < 0.8)).tolist()
    weights[0] = weights[0] or 1.0
    fields: dict = {"round_id": request.round_id, "model_step": request.model_step, "strategy": request.strategy,
                    "grad_error": pick(rng, [None, 0.0, 0.25]), "n_padded": int(rng.integers(0, size + 1)),
                    "target": pick(rng, [None, "train", "val"]), "select_s": 0.5, "busy_s": 0.75}
    kinds = {"indices": pick(rng, ["list", "int64"]), "weights": pick(rng, ["list", "float64"])}
    for m in mutations:
        CASES_RUN[f"subset tried {m}"] += 1
        i, j = (int(rng.integers(len(v))) if v else 0 for v in (indices, weights))
        if m == "round":
            fields["round_id"] = round_like(rng, request.round_id)
        elif m == "model_step":
            fields["model_step"] = round_like(rng, request.model_step)
        elif m == "strategy":
            fields["strategy"] = pick(rng, ["glister", "", 7, None, request.strategy.upper()])
        elif m == "duplicate" and len(indices) > 1:
            indices[i] = indices[(i + 1) % len(indices)]
        elif m == "index_high" and indices:
            indices[i] = request.n_ground + int(rng.integers(4))
        elif m == "index_negative" and indices:
            indices[i] = -int(rng.integers(1, 4))
        elif m == "index_huge" and indices:
            indices[i] = pick(rng, [2**63, 2**64 - 1, 1e19, -1e19, 2.0**63])
        elif m == "index_fraction" and indices:
            indices[i] = indices[i] + 0.5
        elif m == "index_nan" and indices:
            indices[i] = pick(rng, [math.nan, math.inf])
        elif m == "too_many":
            extra = int(rng.integers(1, 4))
            indices += [request.n_ground + k if rng.random() < 0.5 else k for k in range(extra)]
            weights += [1.0] * extra
        elif m == "empty":
            indices, weights = [], []
        elif m == "weight_negative" and weights:
            weights[j] = -pick(rng, [1e-12, 0.5, 3.0])
        elif m == "weight_nan" and weights:
            weights[j] = math.nan
        elif m == "weight_inf" and weights:
            weights[j] = pick(rng, [math.inf, -math.inf])
        elif m == "weights_zero":
            weights = [0.0] * len(weights)
        elif m == "weights_overflow" and weights:
            weights = [1e308] * max(2, len(weights)) if rng.random() < 0.5 else [1e308] + weights[1:]
        elif m == "weights_length":
            weights = weights[:-1] if weights and rng.random() < 0.5 else weights + [1.0]
        elif m in ("encode_indices", "encode_weights"):
            kinds[m.removeprefix("encode_")] = pick(rng, ENCODINGS)
        elif m == "n_padded":
            fields["n_padded"] = pick(rng, [-1, len(indices), len(indices) + 1, 1.5, None])
        elif m == "grad_error":
            fields["grad_error"] = pick(rng, [None, 0.0, 3.0, *BAD_REALS])
        elif m == "target":
            fields["target"] = pick(rng, [None, "train", "val", "test", ""])
        elif m == "seconds":
            fields[pick(rng, ["select_s", "busy_s"])] = pick(rng, [0, 2.5, *BAD_REALS, None])
        elif m == "extra":
            fields[pick(rng, ["extra", "indexes", "weight"])] = 1
    fields["indices"], fields["weights"] = encode(indices, kinds["indices"]), encode(weights, kinds["weights"])
    if "missing" in mutations:
        fields.pop(pick(rng, sorted(SUBSET_FIELDS)))
    return fields


def chunk_fields(request: RoundRequest, mutations: list[str], rng: np.random.Generator) -> dict:
    """A valid chunk of ``request``'s round (rows, or errors and features), then ``mutations`` applied to it."""
    ids = rng.permutation(request.n_ground)[:int(rng.integers(0, min(6, request.n_ground) + 1))].tolist()
    n_classes, n_features = int(rng.integers(1, 5)), int(rng.integers(0, 4))
    labels = rng.integers(0, n_classes, len(ids)).tolist()
    widths = {"rows": n_classes * (1 + n_features), "errors": n_classes, "features": n_features}
    matrices = {name: rng.uniform(-2, 2, (len(ids), w)).tolist() for name, w in widths.items()}
    layout = pick(rng, [["rows"], ["errors", "features"]])
    kinds = {name: pick(rng, ["list", "float32", "float64"]) for name in MATRICES}
    kinds.update(ids=pick(rng, ["list", "int64"]), labels=pick(rng, ["list", "int64"]))
    fields: dict = {"round_id": request.round_id, "chunk_index": int(rng.integers(request.n_chunks))}
    for m in mutations:
        CASES_RUN[f"chunk tried {m}"] += 1
        i, target = int(rng.integers(len(ids))) if ids else 0, pick(rng, MATRICES)
        if m == "round":
            fields["round_id"] = round_like(rng, request.round_id)
        elif m == "chunk_index":
            fields["chunk_index"] = pick(rng, [request.n_chunks, request.n_chunks + 2, -1, 0.0, 0.5, None])
        elif m == "duplicate" and len(ids) > 1:
            ids[i] = ids[(i + 1) % len(ids)]
        elif m == "id_negative" and ids:
            ids[i] = -int(rng.integers(1, 4))
        elif m == "id_high" and ids:
            ids[i] = request.n_ground + int(rng.integers(4))
        elif m == "id_huge" and ids:
            ids[i] = pick(rng, [2**63, 2**64 - 1, 1e19, 2.0**63])
        elif m == "label_negative" and labels:
            labels[int(rng.integers(len(labels)))] = -int(rng.integers(1, 4))
        elif m == "labels_length":
            labels = labels[:-1] if labels and rng.random() < 0.5 else labels + [0]
        elif m == "matrix_rows":
            rows = matrices[target]
            matrices[target] = rows[:-1] if rows and rng.random() < 0.5 else rows + [[0.5] * widths[target]]
        elif m == "matrix_value" and matrices[target] and widths[target]:
            row = pick(rng, matrices[target])
            row[int(rng.integers(len(row)))] = pick(rng, [math.nan, math.inf, -math.inf, 1e39, -1e39, 3e38, 1e30])
        elif m == "matrix_encoding":
            kinds[target] = pick(rng, MATRIX_ENCODINGS)
        elif m == "structure":
            layout = pick(rng, LAYOUTS)
        elif m in ("encode_ids", "encode_labels"):
            kinds[m.removeprefix("encode_")] = pick(rng, ENCODINGS)
        elif m == "extra":
            fields[pick(rng, ["extra", "id", "row"])] = 1
    fields["ids"], fields["labels"] = encode(ids, kinds["ids"]), encode(labels, kinds["labels"])
    for name in layout:
        fields[name] = encode_matrix(matrices[name], widths[name], kinds[name])
    if "missing" in mutations:
        fields.pop(pick(rng, sorted(CHUNK_REQUIRED)))
    return fields


# --------------------------------------------------------------------------- the properties

@settings(max_examples=N_SUBSET_CASES, **SETTINGS)
@given(cases(SUBSET_MUTATIONS))
def check_subset_messages(case) -> None:
    seed, mutations = case
    rng = np.random.default_rng(seed)
    request = request_from(rng)
    fields = subset_fields(request, mutations, rng)
    check(SubsetMessage, fields, subset_faults(fields, request), request, "subset")


@settings(max_examples=N_CHUNK_CASES, **SETTINGS)
@given(cases(CHUNK_MUTATIONS))
def check_gradient_chunks(case) -> None:
    seed, mutations = case
    rng = np.random.default_rng(seed)
    request = request_from(rng)
    fields = chunk_fields(request, mutations, rng)
    check(GradientChunk, fields, chunk_faults(fields, request), request, "chunk")


def _cases(label: str) -> tuple[int, int]:
    return CASES_RUN[f"{label} accepted"], CASES_RUN[f"{label} rejected"]


def test_subset_messages_accepted_exactly_when_valid():
    CASES_RUN.clear()
    check_subset_messages()
    accepted, rejected = _cases("subset")
    assert accepted + rejected >= N_SUBSET_CASES
    assert min(accepted, rejected) >= N_SUBSET_CASES // 10, CASES_RUN  # both outcomes well represented
    assert all(CASES_RUN[f"subset tried {m}"] >= 50 for m in SUBSET_MUTATIONS), CASES_RUN


def test_gradient_chunks_accepted_exactly_when_valid():
    CASES_RUN.clear()
    check_gradient_chunks()
    accepted, rejected = _cases("chunk")
    assert accepted + rejected >= N_CHUNK_CASES
    assert min(accepted, rejected) >= N_CHUNK_CASES // 10, CASES_RUN
    assert all(CASES_RUN[f"chunk tried {m}"] >= 50 for m in CHUNK_MUTATIONS), CASES_RUN
