"""Selection sharded by class: the routing, the partial sums, and the answer equal to the single selector's.

Unit tests run the coordinator over plain ``ShardService`` objects (no Ray); the Ray tests run the real
coordinator and shard actors on the shared local Ray. Multi-node placement is in tests/test_cluster.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.optimize
from pydantic import ValidationError

from protocol.config import GradMatchSelector, RunConfig
from protocol.errors import RoundFailed, RunFailed
from protocol.messages import SubsetMessage
from protocol.receipts import Accepted, Rejection
from protocol.routes import (
    BatchMap, BatchPart, ExampleMap, ExamplePart, SummaryLayout, WholeChunks, range_columns, send_routed, split_chunk,
)
from service.coordinator import ShardedSelector
from service.ridge import ridge_weights
from service.routes import assign_classes, class_ranges, infer_n_classes
from service.selector import SELECTOR_CONFIG, SelectorService
from service.shard import ShardService
from service.strategies import class_rows

N_CLASSES, DIM, BATCH = 6, 5, 8


def summaries(n: int = 600, n_classes: int = N_CLASSES, dim: int = DIM, seed: int = 0):
    """Softmax errors and features of ``n`` examples, and the mean last-layer rows of batches of ``BATCH``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    features = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
    logits = features @ rng.normal(size=(dim, n_classes)) + rng.normal(size=(n, n_classes))
    errors = np.exp(logits - logits.max(axis=1, keepdims=True))
    errors /= errors.sum(axis=1, keepdims=True)
    errors[np.arange(n), labels] -= 1.0
    errors = errors.astype(np.float32)
    batches = rng.permutation(n).reshape(-1, BATCH)
    rows = np.stack([np.concatenate([errors[b].mean(0), (errors[b].T @ features[b]).ravel() / BATCH])
                     for b in batches]).astype(np.float32)
    batch_labels = np.array([np.bincount(labels[b], minlength=n_classes).argmax() for b in batches])
    return labels, errors, features, rows, batch_labels


LABELS, ERRORS, FEATURES, ROWS, BATCH_LABELS = summaries()
VAL_RNG = np.random.default_rng(5)
VALIDATION = {"logits": VAL_RNG.normal(size=(80, N_CLASSES)).astype(np.float32),
              "features": np.abs(VAL_RNG.normal(size=(80, DIM))).astype(np.float32),
              "labels": VAL_RNG.integers(0, N_CLASSES - 1, 80)}  # the last class has no validation example


def example_chunks(size: int = 100) -> list[dict]:
    return [{"ids": np.arange(s, min(s + size, len(LABELS))), "labels": LABELS[s:s + size],
             "errors": ERRORS[s:s + size], "features": FEATURES[s:s + size]} for s in range(0, len(LABELS), size)]


def batch_chunks(size: int = 16) -> list[dict]:
    return [{"ids": np.arange(s, min(s + size, len(ROWS))), "labels": BATCH_LABELS[s:s + size],
             "rows": ROWS[s:s + size]} for s in range(0, len(ROWS), size)]


def run_round(service, strategy: str, round_id: int = 0, order=None, validation: bool = False,
              chunks: list[dict] | None = None, routed: bool = False, counts: np.ndarray | None = None,
              n_select: int | None = None) -> dict:
    """One round: the request, the validation set if asked, the chunks in ``order``; returns the answer.

    ``routed``: the sender splits the chunks by the map ``routes`` hands out, asked before the request (on the
    actor the two calls race), and sends the parts straight to the shards."""
    pb = strategy.endswith("-pb")
    chunks = chunks or (batch_chunks() if pb else example_chunks())
    n = len(ROWS) if pb else len(LABELS)
    route = service.routes(round_id, layout_of(strategy, counts)) if routed else None
    assert route is None or isinstance(route, (ExampleMap, BatchMap)), route
    service.start_round({
        "round_id": round_id, "model_step": 1, "ground": "batch" if pb else "example", "n_ground": n,
        "n_select": n_select or n // 10, "n_chunks": len(chunks), "seed": 3, "strategy": strategy, "lr": 0.05,
        "sizes": np.full(n, BATCH) if pb else None, "with_validation": validation,
    })
    if validation:
        service.add_validation({"round_id": round_id, **VALIDATION})
    for i in order if order is not None else range(len(chunks)):
        chunk = {"round_id": round_id, "chunk_index": int(i), **chunks[i]}
        if route is None:
            service.add_chunk(chunk)
        else:
            assert isinstance(send_routed(route, service, chunk), Accepted)
    return service.result(round_id, timeout_s=60)


def selector_config(**fields):
    """The typed selector branch of a run config, as the launcher hands it to ``start_selector``."""
    return SELECTOR_CONFIG.validate_python(fields)


def layout_of(strategy: str, counts: np.ndarray | None = None) -> SummaryLayout:
    """What a summary worker tells ``routes`` of a round's summaries (per-example: the class counts)."""
    if strategy.endswith("-pb"):
        return SummaryLayout("batch", N_CLASSES, DIM, len(ROWS))
    counts = np.bincount(LABELS, minlength=N_CLASSES) if counts is None else counts
    return SummaryLayout("example", N_CLASSES, DIM, len(LABELS), counts)


def routed_round(service, strategy: str, **options) -> SubsetMessage:
    return run_round(service, strategy, routed=True, **options)


def sharded(config: dict, n_shards: int) -> ShardedSelector:
    return ShardedSelector({**config, "shards": n_shards}, [ShardService(i) for i in range(n_shards)])


GRAD_ERRORS = ("grad_error", "grad_error_rel", "grad_error_trained")


def assert_same_answer(single: SubsetMessage, other: SubsetMessage) -> None:
    np.testing.assert_array_equal(other.indices, single.indices)
    np.testing.assert_allclose(other.weights, single.weights, rtol=1e-6, atol=0)
    for key in GRAD_ERRORS:  # Eq. 1 is absolute (its scale is the target's): within 1e-6 of it, or relatively
        mine, theirs = getattr(single, key), getattr(other, key)
        assert mine is not None and theirs == pytest.approx(mine, abs=1e-6, rel=1e-6), key
    assert (other.n_padded, other.target) == (single.n_padded, single.target)


# --- who owns what -------------------------------------------------------------------------------

def test_assign_classes_deals_the_largest_classes_first_to_the_least_loaded_shard():
    owner = assign_classes(np.array([50, 10, 10, 10, 10, 5, 5, 0]), 3)
    loads = np.bincount(owner[owner >= 0], weights=[50, 10, 10, 10, 10, 5, 5], minlength=3)
    assert owner.tolist() == [0, 1, 2, 1, 2, 1, 2, -1]  # a class without examples gets no shard
    assert loads.tolist() == [50, 25, 25]


@pytest.mark.parametrize("n_classes, n_shards", [(6, 2), (7, 3), (10, 4), (3, 3)])
def test_class_ranges_split_the_columns_of_a_row_once(n_classes, n_shards):
    width = n_classes * (1 + DIM)
    ranges = class_ranges(n_classes, n_shards)
    sizes = [c1 - c0 for c0, c1 in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    columns = np.concatenate([np.r_[bias, weight] for bias, weight in
                              (range_columns(c0, c1, n_classes, width) for c0, c1 in ranges)])
    np.testing.assert_array_equal(np.sort(columns), np.arange(width))
    first = range_columns(*ranges[0], n_classes, width)
    assert first[0] == slice(0, sizes[0]) and first[1] == slice(n_classes, n_classes + sizes[0] * DIM)


def test_partial_gram_matrices_over_class_columns_add_up_to_the_whole():
    rows = ROWS.astype(np.float64)
    gram = np.zeros((len(rows), len(rows)))
    for c0, c1 in class_ranges(N_CLASSES, 4):
        bias, weight = range_columns(c0, c1, N_CLASSES, rows.shape[1])
        part = np.concatenate([rows[:, bias], rows[:, weight]], axis=1)
        gram += part @ part.T
    np.testing.assert_allclose(gram, rows @ rows.T, rtol=1e-12, atol=1e-15)


def test_the_class_count_of_batch_rows_is_read_off_their_zero_sum_bias():
    few = BATCH_LABELS.copy()
    few[:] = np.minimum(few, 2)  # labels up to 2 only: 3, 4 divide the width too, but their blocks do not sum to 0
    assert ROWS.shape[1] % 3 == 0 and ROWS.shape[1] % 4 == 0
    assert infer_n_classes(ROWS, few) == N_CLASSES
    assert infer_n_classes(ROWS, BATCH_LABELS) == N_CLASSES
    noise = np.random.default_rng(1).normal(size=ROWS.shape).astype(np.float32)
    assert infer_n_classes(noise, few) == 3  # not softmax rows: the smallest divisor above the labels
    with pytest.raises(ValueError, match="not C \\(1 \\+ D\\)"):
        infer_n_classes(ROWS[:, :7], np.full(len(ROWS), 3))  # C >= 4 must divide 7 with D >= 1


def test_ridge_weights_are_the_exact_nonnegative_optimum():
    rng = np.random.default_rng(2)
    rows, target = rng.normal(size=(5, 30)), rng.normal(size=30)
    gram, correlation = rows @ rows.T, rows @ target
    free = ridge_weights(gram, correlation, 0.5, positive=False)
    np.testing.assert_allclose(free, np.linalg.solve(gram + 0.5 * np.eye(5), correlation), rtol=1e-10)
    stacked = np.vstack([rows.T, np.sqrt(0.5) * np.eye(5)])
    oracle = scipy.optimize.nnls(stacked, np.concatenate([target, np.zeros(5)]))[0]
    assert (free < 0).any()  # the constraint binds
    np.testing.assert_allclose(ridge_weights(gram, correlation, 0.5, positive=True), oracle, atol=1e-10)


# --- the answer equals the single selector's -----------------------------------------------------

CASES = [
    ("gradmatch", {}, False),
    ("gradmatch", {"eps": 1e3}, False),  # OMP stops early in every class: padding, class by class
    ("gradmatch", {"valid": True}, True),
    ("craig", {}, False),
    ("random", {}, False),
    ("glister", {}, True),
    ("gradmatch-pb", {}, False),
    ("gradmatch-pb", {"valid": True}, True),
    ("craig-pb", {}, False),
]


@pytest.mark.parametrize("strategy, options, validation", CASES, ids=[f"{s}{o}" for s, o, _ in CASES])
@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_sharded_selection_equals_the_single_selector(strategy, options, validation, n_shards):
    config = {"strategy": strategy, **options}
    single = run_round(SelectorService(config), strategy, validation=validation)
    chunks = batch_chunks() if strategy.endswith("-pb") else example_chunks()
    order = np.random.default_rng(n_shards).permutation(len(chunks))  # chunks arrive in any order
    answer = run_round(sharded(config, n_shards), strategy, validation=validation, order=order)
    assert_same_answer(single, answer)
    assert 0 < single.grad_error and 0 < single.grad_error_rel < 2 and 0 < single.grad_error_trained < 2
    assert len(single.indices) == (len(ROWS) if "pb" in strategy else 600) // 10


@pytest.mark.parametrize("options, validation", [({}, False), ({"valid": True}, True), ({"eps": 1e3}, False)])
@pytest.mark.parametrize("n_shards", [2, 3])
def test_gradmatch_classes_without_budget_count_in_eq1_as_in_the_single_selector(options, validation, n_shards):
    config = {"strategy": "gradmatch", **options}
    single = run_round(SelectorService(config), "gradmatch", validation=validation, n_select=4)  # 6 classes
    assert len(np.unique(LABELS[single.indices])) < N_CLASSES  # some classes choose nothing
    assert_same_answer(single, run_round(sharded(config, n_shards), "gradmatch", validation=validation, n_select=4))


def test_sharded_eq1_of_gradmatch_is_the_per_class_residual_of_its_padded_picks():
    config = {"strategy": "gradmatch", "eps": 1e3}  # every class stops early and pads with weight 1
    answer = run_round(sharded(config, 3), "gradmatch")
    assert answer.n_padded > 0 and 1.0 in answer.weights.tolist()
    residual_sq, target_sq = 0.0, 0.0
    for c in range(N_CLASSES):
        members = np.flatnonzero(LABELS == c)
        rows = class_rows(ERRORS[members], FEATURES[members], c)
        target = rows.astype(np.float64).sum(0)  # the class's training gradient in its own column
        mine = LABELS[answer.indices] == c
        local = np.searchsorted(members, answer.indices[mine])
        residual = answer.weights[mine] @ rows[local].astype(np.float64) - target
        residual_sq, target_sq = residual_sq + residual @ residual, target_sq + target @ target
    assert answer.grad_error == pytest.approx(np.sqrt(residual_sq), rel=1e-9)
    assert answer.grad_error_rel == pytest.approx(np.sqrt(residual_sq / target_sq), rel=1e-9)


@pytest.mark.parametrize("strategy", ["gradmatch-pb", "gradmatch"])
def test_chunks_before_their_request_and_out_of_order_give_the_same_answer(strategy):
    single = run_round(SelectorService({"strategy": strategy}), strategy)
    service = sharded({"strategy": strategy}, 2)
    chunks = batch_chunks() if strategy.endswith("-pb") else example_chunks()
    order = np.random.default_rng(7).permutation(len(chunks))
    for i in order[:3]:  # before the request: the shards append rows as they come and sort them at the end
        service.add_chunk({"round_id": 0, "chunk_index": int(i), **chunks[i]})
    assert_same_answer(single, run_round(service, strategy, order=order[3:]))


def test_the_padding_case_pads():
    answer = run_round(sharded({"strategy": "gradmatch", "eps": 1e3}, 3), "gradmatch")
    assert answer.n_padded > 0  # so the case above compares padded answers


def test_no_shard_holds_the_whole_ground_set():
    service = sharded({"strategy": "gradmatch"}, 3)
    run_round(service, "gradmatch")
    held = service.status().last_round.shard_held_bytes
    whole = LABELS.nbytes * 2 + ERRORS.nbytes + FEATURES.nbytes  # ids, labels, errors, features
    assert sum(held) == whole and max(held) < 0.5 * whole
    service = sharded({"strategy": "gradmatch-pb"}, 3)
    run_round(service, "gradmatch-pb")
    held = service.status().last_round.shard_held_bytes
    assert sum(held) == ROWS.nbytes + 3 * 8 * len(ROWS) and max(held) < 0.5 * ROWS.nbytes
    assert service.status().last_round.moved_bytes > ROWS.nbytes


def test_glister_runs_on_one_shard():
    service = sharded({"strategy": "glister"}, 3)
    run_round(service, "glister", validation=True)
    assert [b > 0 for b in service.status().last_round.shard_held_bytes] == [True, False, False]


def test_the_second_round_deals_classes_by_the_first_rounds_counts():
    service = sharded({"strategy": "gradmatch"}, 4)
    run_round(service, "gradmatch", round_id=0)
    run_round(service, "gradmatch", round_id=1)
    counts = np.bincount(LABELS, minlength=N_CLASSES)
    expected = np.bincount(assign_classes(counts, 4), weights=counts, minlength=4) * 8 * (4 + N_CLASSES + DIM) // 2
    held = np.array(service.status().last_round.shard_held_bytes)
    np.testing.assert_array_equal(held, expected)  # per example: id, label (int64), C + D float32


# --- senders that route by class themselves (the summary workers) -------------------------------

@pytest.mark.parametrize("strategy, options, validation", CASES, ids=[f"{s}{o}" for s, o, _ in CASES])
@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_chunks_split_by_their_sender_give_the_same_answer_and_no_row_reaches_the_coordinator(
        strategy, options, validation, n_shards):
    config = {"strategy": strategy, **options}
    single = run_round(SelectorService(config), strategy, validation=validation)
    whole = sharded(config, n_shards)
    through = run_round(whole, strategy, validation=validation)
    order = np.random.default_rng(n_shards).permutation(len(batch_chunks() if "pb" in strategy else example_chunks()))
    service = sharded(config, n_shards)
    direct = routed_round(service, strategy, validation=validation, order=order)
    assert_same_answer(single, direct)
    np.testing.assert_array_equal(direct.indices, through.indices)  # the chunks' path changes nothing
    np.testing.assert_array_equal(direct.weights, through.weights)
    assert whole.status().routed_bytes > 0 and whole.status().last_round.routed_bytes > 0
    status = service.status()
    assert status.routed_bytes == 0 and status.last_round.routed_bytes == 0
    summaries = ROWS.nbytes if "pb" in strategy else ERRORS.nbytes + FEATURES.nbytes
    assert status.last_round.moved_bytes > summaries  # the parts the sender delivered are counted


@pytest.mark.parametrize("strategy, options, validation",
                         [("gradmatch", {}, False), ("gradmatch", {"valid": True}, True), ("craig", {}, False)])
def test_the_answer_does_not_depend_on_which_shard_owns_a_class(strategy, options, validation):
    counts = np.bincount(LABELS, minlength=N_CLASSES)
    deals = [counts, np.array([100, 1, 1, 1, 1, 1]), np.array([1, 1, 1, 1, 1, 100])]
    maps, answers = [], []
    for dealt in deals:  # the map follows the counts it is dealt by; the rows are the same
        service = sharded({"strategy": strategy, **options}, 3)
        answers.append(routed_round(service, strategy, validation=validation, counts=dealt))
        maps.append(tuple(service.status().last_round.class_shards))
    assert len(set(maps)) == len(deals), maps
    for answer in answers[1:]:
        np.testing.assert_array_equal(answer.indices, answers[0].indices)
        np.testing.assert_array_equal(answer.weights, answers[0].weights)
        for key in GRAD_ERRORS:
            assert getattr(answer, key) == pytest.approx(getattr(answers[0], key), rel=1e-12)


def test_the_map_handed_out_is_fixed_for_the_round_and_splits_as_the_coordinator_would():
    service = sharded({"strategy": "gradmatch"}, 3)
    route = service.routes(0, layout_of("gradmatch"))
    assert service.routes(0, layout_of("gradmatch", np.ones(N_CLASSES, np.int64))).owner.tolist() == \
        route.owner.tolist() == assign_classes(np.bincount(LABELS, minlength=N_CLASSES), 3).tolist()
    assert [type(shard) for shard in route.shards] == [ShardService] * 3
    chunk = {"round_id": 0, "chunk_index": 0, **example_chunks()[0]}
    parts = split_chunk(route, chunk)
    assert all(isinstance(part, ExamplePart) for part in parts if part is not None)
    assert sum(len(part.ids) for part in parts if part is not None) == 100
    for shard, part in enumerate(parts):
        if part is not None:
            assert set(route.owner[part.labels]) == {shard}
    pb = service.routes(1, layout_of("gradmatch-pb"))
    assert list(pb.ranges) == class_ranges(N_CLASSES, 3) and pb.width == ROWS.shape[1]
    assert SelectorService({"strategy": "gradmatch"}).routes(0, layout_of("gradmatch")) == WholeChunks()
    assert service.routes(1, None) == WholeChunks()


def test_a_shard_takes_typed_parts_only():
    shard = ShardService(0)
    route = sharded({"strategy": "gradmatch-pb"}, 2).routes(0, layout_of("gradmatch-pb"))
    parts = split_chunk(route, {"round_id": 0, "chunk_index": 0, **batch_chunks(len(ROWS))[0]})  # every row
    assert [type(part) for part in parts] == [BatchPart, BatchPart] and parts[0].n_rows == len(ROWS)
    with pytest.raises(TypeError, match="part: a dict, must be a protocol.routes.ExamplePart or BatchPart"):
        shard.add_part(0, {"ids": parts[0].ids, "rows": parts[0].rows})
    shard.add_part(0, parts[0])
    assert shard.gather(0, len(parts[0].ids)) == parts[0].rows.nbytes + 8 * len(ROWS)  # ids of every row


def test_a_chunk_that_does_not_fit_the_map_is_refused_by_its_sender():
    route = sharded({"strategy": "gradmatch-pb"}, 2).routes(0, layout_of("gradmatch-pb"))
    chunk = batch_chunks()[0]
    with pytest.raises(ValueError, match=f"rows of {ROWS.shape[1] - N_CLASSES} columns, the round's map is for "
                                         f"rows of {ROWS.shape[1]} columns"):
        split_chunk(route, {"round_id": 0, "chunk_index": 0, **chunk, "rows": chunk["rows"][:, :-N_CLASSES]})
    with pytest.raises(ValueError, match="example summaries, the round's map is for rows"):
        split_chunk(route, {"round_id": 0, "chunk_index": 0, **example_chunks()[0]})


def test_a_shard_that_lost_routed_parts_fails_the_round_and_the_next_round_is_whole():
    shards = [ShardService(i) for i in range(2)]
    service = ShardedSelector({"strategy": "gradmatch", "shards": 2}, shards)
    route = service.routes(0, layout_of("gradmatch"))
    service.start_round({"round_id": 0, "model_step": 1, "ground": "example", "n_ground": 600, "n_select": 60,
                         "n_chunks": 6, "seed": 3, "strategy": "gradmatch"})
    for i, chunk in enumerate(example_chunks()):
        if i == 3:
            shards[1].drop()  # as a restarted shard: what it was sent is gone
        send_routed(route, service, {"round_id": 0, "chunk_index": i, **chunk})
    with pytest.raises(RoundFailed, match=r"shard 1: .*holds \d+ of the \d+ rows routed to it for round 0") as info:
        service.result(0, timeout_s=30)
    assert info.value.kind == "shard_error"
    assert_same_answer(run_round(SelectorService({"strategy": "gradmatch"}), "gradmatch"),
                       routed_round(service, "gradmatch", round_id=1))


def test_chunks_split_by_a_map_the_coordinator_did_not_make_fail_the_round():
    route = sharded({"strategy": "gradmatch"}, 2).routes(0, layout_of("gradmatch"))
    service = sharded({"strategy": "gradmatch"}, 2)  # as a coordinator restarted after it handed out the map
    service.start_round({"round_id": 0, "model_step": 1, "ground": "example", "n_ground": 600, "n_select": 60,
                         "n_chunks": 6, "seed": 3, "strategy": "gradmatch"})
    answer = send_routed(route, service, {"round_id": 0, "chunk_index": 0, **example_chunks()[0]})
    assert answer == Rejection(subject="chunk 0", round_id=0, rule="split by a class map this coordinator did not "
                               "make (restarted since the round began?)")
    with pytest.raises(RoundFailed, match="did not make"):
        service.result(0, timeout_s=30)


@pytest.mark.parametrize("strategy", ["gradmatch", "gradmatch-pb"])
def test_a_map_for_more_shards_than_classes_is_refused_with_the_reason_and_fails_the_round(strategy):
    service = sharded({"strategy": strategy}, 7)
    answer = service.routes(0, layout_of(strategy))
    assert isinstance(answer, Rejection) and answer.subject == "summary layout"
    assert answer.rule.startswith(f"--shards 7 (selector.shards) is more than the {N_CLASSES} classes")
    assert service.routes(0, layout_of(strategy)).rule == f"round 0 failed: {answer.reason}"  # asked again
    with pytest.raises(RoundFailed, match=r"--shards 7 \(selector.shards\) is more than"):
        service.result(0, timeout_s=30, request_grace_s=30)


# --- bad input and faults ------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["gradmatch", "gradmatch-pb"])
def test_more_shards_than_classes_fails_the_round_naming_the_flag_and_the_classes(strategy):
    with pytest.raises(RoundFailed, match=rf"--shards 7 \(selector.shards\) is more than the {N_CLASSES} classes"):
        run_round(sharded({"strategy": strategy}, 7), strategy)


def test_a_shard_that_lost_its_parts_fails_the_round_and_the_next_round_is_whole():
    shards = [ShardService(i) for i in range(2)]
    service = ShardedSelector({"strategy": "gradmatch", "shards": 2}, shards)
    service.start_round({"round_id": 0, "model_step": 1, "ground": "example", "n_ground": 600, "n_select": 60,
                         "n_chunks": 6, "seed": 3, "strategy": "gradmatch"})
    chunks = example_chunks()
    for i in range(3):
        service.add_chunk({"round_id": 0, "chunk_index": i, **chunks[i]})
    shards[1].drop()  # as a restarted shard: what it was sent is gone
    for i in range(3, 6):
        service.add_chunk({"round_id": 0, "chunk_index": i, **chunks[i]})
    with pytest.raises(RoundFailed, match=r"shard 1: .*holds \d+ of the \d+ rows routed to it for round 0") as info:
        service.result(0, timeout_s=30)
    assert info.value.kind == "shard_error"
    assert_same_answer(run_round(SelectorService({"strategy": "gradmatch"}), "gradmatch"),
                       run_round(service, "gradmatch", round_id=1))


def test_chunks_that_change_shape_mid_round_fail_it():
    service = sharded({"strategy": "gradmatch-pb"}, 2)
    chunks = batch_chunks()
    chunks[1] = {**chunks[1], "rows": chunks[1]["rows"][:, :-N_CLASSES]}
    with pytest.raises(RoundFailed, match=f"rows has {ROWS.shape[1] - N_CLASSES} columns, must be {ROWS.shape[1]}"):
        run_round(service, "gradmatch-pb", chunks=chunks)


def test_a_per_batch_strategy_sent_example_summaries_fails_as_the_single_selector_does():
    reasons = []
    for service in (SelectorService({"strategy": "gradmatch-pb"}), sharded({"strategy": "gradmatch-pb"}, 2)):
        service.start_round({"round_id": 0, "model_step": 1, "ground": "batch", "n_ground": 600, "n_select": 60,
                             "n_chunks": 6, "seed": 3, "strategy": "gradmatch-pb"})
        for i, chunk in enumerate(example_chunks()):
            service.add_chunk({"round_id": 0, "chunk_index": i, **chunk})
        with pytest.raises(RoundFailed) as failure:
            service.result(0, timeout_s=30)
        reasons.append((failure.value.kind, failure.value.reason))
    assert reasons[0] == reasons[1] == ("failed",
                                        "ValueError: gradmatch-pb needs rows in its ground set, none were sent")


def test_placement_options_are_validated_with_their_names():
    assert GradMatchSelector(shards=2, shard_resources=("a", "b")).shard_resources == ("a", "b")
    with pytest.raises(ValidationError, match="shards"):
        GradMatchSelector(shards=0)
    with pytest.raises(ValidationError, match=r"shard_resources has 1 entries, must have one per shard \(shards =="):
        GradMatchSelector(shards=2, shard_resources=("a",))
    with pytest.raises(ValidationError, match="must name custom node resources"):
        GradMatchSelector(shard_resources=("GPU",))
    with pytest.raises(ValidationError, match="shard_placement"):
        GradMatchSelector(shard_placement="ANYWHERE")


def test_the_shards_flag_sets_the_selector_field():
    from trainer.cli import ConfigError, parse_config

    assert parse_config(["--shards", "3", "--strategy", "craig"]).selector.shards == 3
    assert RunConfig().selector.shards == 1
    with pytest.raises(ConfigError, match="--shards"):
        parse_config(["--shards", "0"])


# --- the real actors on the shared local Ray -----------------------------------------------------

@pytest.mark.ray
def test_sharded_actor_answers_like_the_single_selector_and_survives_a_lost_shard(ray_address):
    import ray
    from ray.util.placement_group import placement_group_table

    from trainer.client.cluster import release, start_selector

    selector = start_selector(selector_config(strategy="gradmatch", shards=2, shard_cpus=0.01))
    try:
        expected = run_round(SelectorService({"strategy": "gradmatch"}), "gradmatch")

        def remote_round(round_id, kill_after=None):
            chunks = example_chunks()
            selector.start_round.remote({"round_id": round_id, "model_step": 1, "ground": "example",
                                         "n_ground": 600, "n_select": 60, "n_chunks": 6, "seed": 3,
                                         "strategy": "gradmatch"})
            for i, chunk in enumerate(chunks):
                if i == kill_after:  # once the chunks before are with the shards (else a restart gets them all)
                    ray.get(selector.__ray_call__.remote(
                        lambda self: self.calls.settle(round_id, time.monotonic() + 30)), timeout=60)
                    shards = ray.get(selector.__ray_call__.remote(lambda self: self.calls.shards), timeout=30)
                    ray.kill(shards[1], no_restart=False)
                    time.sleep(0.5)
                ref = selector.add_chunk.remote({"round_id": round_id, "chunk_index": i, **chunk})
                if kill_after is not None and i < kill_after:
                    ray.get(ref, timeout=60)
            return ray.get(selector.result.remote(round_id, 60), timeout=90)

        assert_same_answer(expected, remote_round(0))
        with pytest.raises(RoundFailed, match=r"shard 1: .*holds \d+ of the \d+ rows routed to it for round 1"):
            remote_round(1, kill_after=3)
        assert_same_answer(expected, remote_round(2))  # on the restarted shard
        status = ray.get(selector.status.remote(), timeout=30)
        assert status.shards == 2 and status.answered == 2 and status.last_round.moved_bytes > 0
        group = ray.get(selector.__ray_call__.remote(lambda self: self._group.id.hex()), timeout=30)
        ray.get(selector.stop.remote(), timeout=30)
        assert placement_group_table()[group]["state"] == "REMOVED"
    finally:
        release(selector)


@pytest.mark.ray
def test_parts_sent_straight_to_the_shard_actors_give_the_same_answer_and_a_lost_shard_fails_the_round(
        ray_address):
    import ray

    from trainer.client.cluster import release, start_selector

    selector = start_selector(selector_config(strategy="gradmatch-pb", shards=2, shard_cpus=0.01))
    try:
        expected = run_round(SelectorService({"strategy": "gradmatch-pb"}), "gradmatch-pb")

        def remote_round(round_id, kill_after=None):
            route = ray.get(selector.routes.remote(round_id, layout_of("gradmatch-pb")), timeout=30)
            chunks, n = batch_chunks(), len(ROWS)
            selector.start_round.remote({"round_id": round_id, "model_step": 1, "ground": "batch", "n_ground": n,
                                         "n_select": n // 10, "n_chunks": len(chunks), "seed": 3,
                                         "strategy": "gradmatch-pb", "lr": 0.05, "sizes": np.full(n, BATCH)})
            for i, chunk in enumerate(chunks):
                if i == kill_after:  # once the parts before are with the shards (else a restart gets them all)
                    ray.get(selector.__ray_call__.remote(
                        lambda self: self.calls.settle(round_id, time.monotonic() + 30)), timeout=60)
                    ray.kill(route.shards[1], no_restart=False)
                    time.sleep(0.5)
                ref = send_routed(route, selector, {"round_id": round_id, "chunk_index": i, **chunk})
                if kill_after is not None and i < kill_after:
                    assert isinstance(ray.get(ref, timeout=60), Accepted)
            return ray.get(selector.result.remote(round_id, 60), timeout=90)

        assert_same_answer(expected, remote_round(0))
        status = ray.get(selector.status.remote(), timeout=30)
        assert status.routed_bytes == 0 and status.last_round.moved_bytes > ROWS.nbytes
        with pytest.raises(RoundFailed, match=r"shard 1: .*holds \d+ of the \d+ rows routed to it for round 1"):
            remote_round(1, kill_after=3)
        assert_same_answer(expected, remote_round(2))  # on the restarted shard
        assert ray.get(selector.status.remote(), timeout=30).routed_bytes == 0
        ray.get(selector.stop.remote(), timeout=30)
    finally:
        release(selector)


@pytest.mark.ray
def test_a_restarted_coordinator_reuses_its_placement_group(ray_address):
    import ray
    from ray.util.placement_group import placement_group_table

    from trainer.client.cluster import release, start_selector

    selector = start_selector(selector_config(strategy="craig", shards=2, shard_cpus=0.01))
    try:
        group = ray.get(selector.__ray_call__.remote(lambda self: self._group.id.hex()), timeout=30)
        ray.kill(selector, no_restart=False)  # as the round client does with a selector that does not answer
        deadline = time.monotonic() + 60
        while True:
            try:
                again = ray.get(selector.__ray_call__.remote(lambda self: self._group.id.hex()), timeout=30)
                break
            except ray.exceptions.RayActorError:
                assert time.monotonic() < deadline, "the coordinator did not come back"
                time.sleep(0.5)
        assert again == group and isinstance(ray.get(selector.placed.remote(30), timeout=60), Accepted)
        assert_same_answer(run_round(SelectorService({"strategy": "craig"}), "craig"),
                           _actor_round(selector, "craig"))
        ray.get(selector.stop.remote(), timeout=30)
        assert placement_group_table()[group]["state"] == "REMOVED"
    finally:
        release(selector)


def _actor_round(selector, strategy: str) -> dict:
    import ray

    chunks = example_chunks()
    selector.start_round.remote({"round_id": 0, "model_step": 1, "ground": "example", "n_ground": 600,
                                 "n_select": 60, "n_chunks": len(chunks), "seed": 3, "strategy": strategy})
    for i, chunk in enumerate(chunks):
        selector.add_chunk.remote({"round_id": 0, "chunk_index": i, **chunk})
    return ray.get(selector.result.remote(0, 60), timeout=90)


@pytest.mark.ray
def test_shards_that_cannot_be_placed_fail_before_anything_starts(ray_address, monkeypatch):
    import service.actor
    from trainer.client.cluster import start_selector

    monkeypatch.setattr(service.actor, "SHARD_PLACE_TIMEOUT_S", 3.0)
    with pytest.raises(RunFailed, match=r"--shards 2: the 2 shards \(selector.shards\) could not be placed within 3 s"
                                        r": they ask for 2 x \{'CPU': 0.01, 'no-such-node': 1.0\}"):
        start_selector(selector_config(strategy="craig", shards=2, shard_cpus=0.01,
                                       shard_resources=["no-such-node", "no-such-node"]))


@pytest.mark.ray
def test_a_users_own_loop_drives_the_sharded_selector_unchanged(ray_address):
    import ray
    import torch
    import torch.nn.functional as F
    from torch import nn

    from trainer.client.api import AdaptiveSubset

    generator = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 4
    x = (torch.randn(4, 6, generator=generator) * 3)[y] + torch.randn(240, 6, generator=generator)
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with AdaptiveSubset(model, data, strategy="gradmatch-pb", shards=2, shard_cpus=0.01, budget=0.25, epochs=6,
                        select_every=2, kappa=0.5, batch_size=16, on_late="wait") as subset:
        assert ray.get(subset.selector.status.remote(), timeout=30).shards == 2
        for _, batches in subset:
            for xb, yb, wb in batches:
                loss = (wb * F.cross_entropy(model(xb), yb, reduction="none")).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        records = subset.records
    assert [r["status"] for r in records] == ["adopted"] * len(records) and len(records) >= 1, records
    assert all(0 <= r["grad_error"] and 0 <= r["grad_error_rel"] < 2 and 0 <= r["grad_error_trained"] < 2
               for r in records)
