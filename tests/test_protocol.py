"""The contract: strict configs, and every invalid message rejected with an error naming its field."""

import numpy as np
import pytest
from pydantic import ValidationError

from protocol.config import RunConfig, ScheduleConfig
from protocol.messages import GradientChunk, RoundRequest, SubsetMessage, ValidationSet

REQUEST = RoundRequest(round_id=3, model_step=40, ground="batch", n_ground=10, n_select=3, n_chunks=1, seed=0,
                       strategy="gradmatch-pb")
GOOD = {"round_id": 3, "model_step": 40, "strategy": "gradmatch-pb", "indices": [4, 1, 7],
        "weights": [2.0, 1.0, 0.5], "grad_error": 0.1, "select_s": 0.01, "busy_s": 0.02}


def validate(**changes):
    return SubsetMessage.model_validate({**GOOD, **changes}, context={"request": REQUEST})


def test_valid_message_passes_and_keeps_arrays():
    message = validate()
    assert message.indices.dtype == np.int64 and message.indices.tolist() == [4, 1, 7]
    assert message.weights.dtype == np.float64


@pytest.mark.parametrize(
    "changes, field, rule",
    [
        ({"indices": [4, 4, 7]}, "indices", "unique"),
        ({"indices": [4, 1, 10]}, "indices", "[0, 10)"),
        ({"indices": [-1, 1, 7]}, "indices", "[0, 10)"),
        ({"weights": [1.0, -0.5, 1.0]}, "weights", ">= 0"),
        ({"weights": [1.0, float("nan"), 1.0]}, "weights", "finite"),
        ({"weights": [1.0, 2.0]}, "weights", "equal indices"),
        ({"weights": [0.0, 0.0, 0.0]}, "weights", "positive, finite sum"),
        ({"weights": [1e308, 1e308, 1e308]}, "weights", "positive, finite sum"),
        ({"n_padded": 4}, "n_padded", "must be <= the size"),
        ({"strategy": "random"}, "strategy", "must be 'gradmatch-pb' as asked"),
        ({"model_step": 41}, "model_step", "must be 40 as asked"),
        ({"round_id": 4}, "round_id", "must be 3"),
        ({"indices": [0, 1, 2, 3], "weights": [1, 1, 1, 1]}, "size", "budget of 3"),
        ({"indices": [], "weights": []}, "indices", "empty"),
        ({"indices": [1.5, 2, 3]}, "indices", "integers"),
        ({"extra": 1}, "extra", "Extra inputs"),
    ],
)
def test_invalid_message_names_field(changes, field, rule):
    with pytest.raises(ValidationError) as info:
        validate(**changes)
    text = str(info.value)
    assert field in text and rule in text


@pytest.mark.parametrize("field", ["grad_error", "grad_error_rel", "grad_error_trained"])
def test_gradient_errors_are_non_negative_finite_or_missing(field):
    assert getattr(validate(**{field: None}), field) is None
    assert getattr(validate(**{field: 0.0}), field) == 0.0
    assert getattr(validate(**{field: 12.5}), field) == 12.5  # Eq. 1 is absolute: no upper bound
    for bad in (-1e-9, float("nan"), float("inf")):
        with pytest.raises(ValidationError) as info:
            validate(**{field: bad})
        assert field in str(info.value)


def test_records_and_summaries_carry_the_three_gradient_errors():
    from protocol.records import RoundRecord, RunSummary

    errors = {"grad_error": 3.5, "grad_error_rel": 0.1, "grad_error_trained": 0.4}
    record = RoundRecord(round=0, strategy="gradmatch", model_step=0, trigger_epoch=0, due_epoch=1,
                         status="adopted", **errors)
    assert {k: record.model_dump()[k] for k in errors} == errors
    assert {k: RunSummary.model_fields[k].default for k in errors} == dict.fromkeys(errors)  # old runs: missing


def test_message_without_context_checks_only_intrinsic_rules():
    SubsetMessage.model_validate({**GOOD, "round_id": 9, "indices": [100, 200, 300]})
    with pytest.raises(ValidationError, match="unique"):
        SubsetMessage.model_validate({**GOOD, "indices": [1, 1, 2]})


def test_chunk_rows_must_align_and_be_finite():
    ok = {"round_id": 0, "chunk_index": 0, "ids": [0, 1], "labels": [3, 4], "rows": np.ones((2, 5))}
    assert GradientChunk.model_validate(ok).rows.dtype == np.float32
    with pytest.raises(ValidationError, match=r"labels has 1 entries, must equal ids \(2\)"):
        GradientChunk.model_validate({**ok, "labels": [3]})
    with pytest.raises(ValidationError, match="either rows, or errors and features"):
        GradientChunk.model_validate({**ok, "errors": np.ones((2, 3)), "features": np.ones((2, 4))})
    with pytest.raises(ValidationError, match="either rows, or errors and features"):
        GradientChunk.model_validate({**ok, "rows": None, "errors": np.ones((2, 3))})
    factored = GradientChunk.model_validate({**ok, "rows": None, "errors": np.ones((2, 3)), "features": np.ones((2, 4))})
    assert factored.errors.shape == (2, 3)
    with pytest.raises(ValidationError, match="features has 1 rows, must equal ids"):
        GradientChunk.model_validate({**ok, "rows": None, "errors": np.ones((2, 3)), "features": np.ones((1, 4))})
    rows = np.ones((2, 5))
    rows[1, 2] = np.inf
    with pytest.raises(ValidationError, match="non-finite"):
        GradientChunk.model_validate({**ok, "rows": rows})
    with pytest.raises(ValidationError, match="2-D"):
        GradientChunk.model_validate({**ok, "rows": np.ones(2)})


def test_validation_set_rules():
    good = {"round_id": 1, "logits": np.zeros((3, 4)), "features": np.ones((3, 5)), "labels": [0, 3, 1]}
    assert ValidationSet.model_validate(good).labels.tolist() == [0, 3, 1]
    with pytest.raises(ValidationError, match=r"labels must be in \[0, 4\)"):
        ValidationSet.model_validate({**good, "labels": [0, 4, 1]})
    with pytest.raises(ValidationError, match="features has 2 rows"):
        ValidationSet.model_validate({**good, "features": np.ones((2, 5))})
    with pytest.raises(ValidationError, match="validation set is empty"):
        ValidationSet.model_validate({**good, "logits": np.zeros((0, 4)), "features": np.zeros((0, 5)), "labels": []})


def test_request_rules():
    with pytest.raises(ValidationError, match="n_select == 11, must be <= n_ground"):
        RoundRequest(round_id=0, model_step=0, ground="batch", n_ground=10, n_select=11, n_chunks=0, seed=0,
                     strategy="random")
    with pytest.raises(ValidationError, match="sizes has shape"):
        RoundRequest(round_id=0, model_step=0, ground="batch", n_ground=3, n_select=1, n_chunks=0, seed=0,
                     strategy="random", sizes=[1, 2])


def test_config_is_strict_and_frozen():
    with pytest.raises(ValidationError, match="Extra inputs"):
        RunConfig.model_validate({"train": {"epoch": 3}})
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate({"selector": {"strategy": "gradmatch-pb", "lam": -1}})
    assert "selector.gradmatch-pb.lam" in str(info.value)
    with pytest.raises(ValidationError, match="strategy"):
        RunConfig.model_validate({"selector": {"strategy": "nope"}})
    with pytest.raises(ValidationError, match="lam"):
        RunConfig.model_validate({"selector": {"strategy": "random", "lam": 0.5}})
    config = RunConfig()
    with pytest.raises(ValidationError):
        config.seed = 3


def test_lead_beyond_interval_is_rejected():
    with pytest.raises(ValidationError, match="lead == 5, must be <= select_every"):
        ScheduleConfig(lead=5, select_every=2)


def test_config_round_trips_through_json():
    config = RunConfig.model_validate({"selector": {"strategy": "random", "delay_s": 1.5}, "seed": 4})
    assert RunConfig.model_validate_json(config.model_dump_json()) == config


# --- the types cross real actors ------------------------------------------------------------------------

@pytest.mark.ray
def test_the_selectors_answers_cross_a_real_actor_as_protocol_types(ray_address):
    import ray

    from protocol.errors import RoundFailed
    from protocol.receipts import Accepted
    from protocol.status import SelectorStatus
    from service.selector import SELECTOR_CONFIG
    from trainer.client.cluster import release, start_selector
    from trainer.launch.job import selector_gpu_peak

    selector = start_selector(SELECTOR_CONFIG.validate_python({"strategy": "random"}))
    asked = RoundRequest(round_id=0, model_step=2, ground="example", n_ground=50, n_select=5, n_chunks=0, seed=0,
                         strategy="random")
    try:
        status = ray.get(selector.status.remote(), timeout=60)
        assert type(status) is SelectorStatus
        assert (status.strategy, status.answered, status.shards, status.last_round) == ("random", 0, None, None)
        assert status.device == "cpu" and status.gpu_peak_bytes is None
        assert selector_gpu_peak(selector) is None  # what the driver puts in the summary: None on the CPU
        assert type(ray.get(selector.start_round.remote(asked.model_dump()), timeout=60)) is Accepted
        answer = ray.get(selector.result.remote(0, 30), timeout=60)
        assert type(answer) is SubsetMessage and answer.indices.size == 5
        assert SubsetMessage.model_validate(answer, context={"request": asked}).round_id == 0
        assert ray.get(selector.status.remote(), timeout=60).answered == 1

        ray.get(selector.reconfigure.remote({"strategy": "random", "fault": "crash"}), timeout=60)
        selector.start_round.remote(asked.model_copy(update={"round_id": 1}).model_dump())
        with pytest.raises(RoundFailed) as failed:
            ray.get(selector.result.remote(1, 30), timeout=60)
        assert (failed.value.round_id, failed.value.kind, failed.value.reason) == (
            1, "failed", "RuntimeError: injected fault: crash")

        ray.get(selector.stop.remote(), timeout=60)
        with pytest.raises(RoundFailed) as stopped:
            ray.get(selector.start_round.remote(asked.model_copy(update={"round_id": 2}).model_dump()), timeout=60)
        assert (stopped.value.round_id, stopped.value.kind, stopped.value.reason) == (2, "stopped", "selector stopped")
    finally:
        release(selector)
    assert selector_gpu_peak(selector) is None  # a selector gone does not fail the run's summary


@pytest.mark.ray
def test_rank_zeros_push_is_answered_with_a_receipt_that_carries_the_stop_request(ray_address):
    import ray

    from protocol.receipts import Accepted, Rejection
    from protocol.records import Progress
    from trainer.builtin.distributed import DistributedTrainerActor

    sink = DistributedTrainerActor.remote(RunConfig(), None, None, None)
    try:
        epoch = {"epoch": 0, "phase": "full", "steps": 3, "n_examples": 96, "loss": 1.5, "lr": 0.05, "train_s": 0.1,
                 "wall_s": 0.1}
        answer = ray.get(sink.push.remote(Progress(epoch=1, total=4, loss=1.5, epochs=[epoch])), timeout=60)
        assert type(answer) is Accepted
        seen = ray.get(sink.progress.remote(), timeout=60)
        assert type(seen) is Progress and (seen.epoch, seen.total, seen.epochs) == (1, 4, [epoch])
        ray.get(sink.request_stop.remote("stopped by SIGINT"), timeout=60)
        answer = ray.get(sink.push.remote(Progress(epoch=2, total=4)), timeout=60)
        assert type(answer) is Rejection and answer.rule == "stopped by SIGINT"
        with pytest.raises(TypeError, match="state: a dict, must be a protocol.records.Progress"):
            ray.get(sink.push.remote({"epoch": 3, "total": 4}), timeout=60)
    finally:
        ray.kill(sink)
