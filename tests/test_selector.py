"""The selector service without Ray: streaming, background work, supersession, faults."""

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from protocol.errors import RoundFailed
from protocol.messages import RoundRequest, SubsetMessage
from protocol.receipts import Accepted, Rejection
from service.selector import RoundClock, SelectorService
from protocol.config import GradMatchPBSelector
from service.strategies import GroundSet, gradient_errors

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
ROWS = (RNG.normal(size=(30, 12)) + 0.3).astype(np.float32)


def request(round_id=0, n_chunks=3, n_select=4, strategy="gradmatch-pb"):
    return RoundRequest(round_id=round_id, model_step=7, ground="batch", n_ground=30, n_select=n_select,
                        n_chunks=n_chunks, seed=1, strategy=strategy).model_dump()


def chunk(round_id, index, ids):
    return {"round_id": round_id, "chunk_index": index, "ids": ids, "labels": np.zeros(len(ids)),
            "rows": ROWS[ids]}


def send_chunks(service, round_id, order=(2, 0, 1)):
    parts = np.array_split(np.arange(30), 3)
    for index in order:
        service.add_chunk(chunk(round_id, index, parts[index]))


def test_round_trip_with_chunks_before_the_request_and_out_of_order():
    service = SelectorService({"strategy": "gradmatch-pb"})
    send_chunks(service, 0, order=(2, 1))
    service.start_round(request())
    send_chunks(service, 0, order=(0,))
    answer = service.result(0, timeout_s=30)
    message = SubsetMessage.model_validate(answer, context={"request": RoundRequest(**request())})
    assert message.round_id == 0 and message.model_step == 7 and message.indices.size == 4
    assert service.status().answered == 1 and service.status().busy_s > 0


def test_answers_carry_the_cpu_time_of_the_round_apart_from_its_waits():
    service = SelectorService({"strategy": "gradmatch-pb", "delay_s": 0.3})
    service.start_round(request())
    send_chunks(service, 0)
    answer = service.result(0, timeout_s=30)
    # the delay is a sleep: it is in the wall seconds, not in the CPU seconds of the round's thread
    assert answer.busy_s >= 0.3 and 0 < answer.cpu_s < 0.3
    assert answer.cpu_s <= answer.busy_s - 0.3 + 0.01
    # a sleep gives the core up: that is not a preemption
    assert answer.preempted is None or 0 <= answer.preempted <= 10


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread preemption counts are Linux's")
def test_the_round_clock_counts_the_preemptions_of_a_thread_sharing_its_core():
    """A thread spinning on a core that another process also spins on is taken off it again and again: the clock
    counts those preemptions and leaves the time the thread waited out of its CPU seconds."""
    core = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    rival = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,), daemon=True)
    rival.start()
    try:
        os.sched_setaffinity(rival.pid, {core})
        os.sched_setaffinity(0, {core})  # this thread, on the rival's core
        time.sleep(0.3)  # the rival is up and spinning
        clock = RoundClock()
        _spin(0.4)
        wall_s, cpu_s, preempted = clock.read()
    finally:
        os.sched_setaffinity(0, before)
        rival.terminate()
        rival.join(timeout=10)
    assert preempted >= 5, (wall_s, cpu_s, preempted)
    assert cpu_s < 0.8 * wall_s  # half the core's time went to the rival
    alone = RoundClock()
    _spin(0.05)
    assert alone.read()[1] > 0.03


def test_plan_declares_needs():
    assert SelectorService({"strategy": "gradmatch-pb"}).plan().model_dump() == {
        "strategy": "gradmatch-pb", "rounds": True, "ground": "batch", "summaries": "batch",
        "needs_validation": False, "measure_only": False, "time_budget_s": None, "online": False}
    assert SelectorService({"strategy": "random-online"}).plan().online is True  # no rounds: the trainer draws
    assert SelectorService({"strategy": "gradmatch-pb", "valid": True}).plan().needs_validation is True
    assert SelectorService({"strategy": "full"}).plan().rounds is False
    assert SelectorService({"strategy": "random"}).plan().summaries == "example"  # for its grad_error
    assert SelectorService({"strategy": "random"}).plan().measure_only is True  # ... only
    assert SelectorService({"strategy": "full"}).plan().summaries == "none"
    assert SelectorService({"strategy": "gradmatch"}).plan().summaries == "example"
    assert SelectorService({"strategy": "glister"}).plan().needs_validation is True
    assert SelectorService({"strategy": "full-earlystop", "time_budget_s": 3}).plan().time_budget_s == 3


def test_status_answers_while_a_slow_round_runs():
    service = SelectorService({"strategy": "random", "delay_s": 1.0})
    service.start_round(request(n_chunks=0, strategy="random"))
    time.sleep(0.1)
    start = time.perf_counter()
    assert service.status().running == [0]
    assert time.perf_counter() - start < 0.5
    assert len(service.result(0, timeout_s=10).indices) == 4


def test_status_has_no_gpu_peak_on_the_cpu_and_asking_does_not_initialise_cuda():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request())
    send_chunks(service, 0)
    service.result(0, timeout_s=30)
    assert service.status().device == "cpu" and service.status().gpu_peak_bytes is None
    # a selector placed on a GPU that has not computed yet: nothing to report, and CUDA stays uninitialised
    code = ("import torch; from service.selector import SelectorService; "
            "peak = SelectorService({'strategy': 'random'}, device='cuda:0').status().gpu_peak_bytes; "
            "print(peak, torch.cuda.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_status_reports_the_gpu_peak_of_a_round_on_cuda():
    service = SelectorService({"strategy": "gradmatch-pb"}, device="cuda:0")
    service.start_round(request())
    send_chunks(service, 0)
    assert service.result(0, timeout_s=60).indices.size == 4
    peak = service.status().gpu_peak_bytes
    assert peak is not None and peak >= ROWS.nbytes
    assert peak == torch.cuda.max_memory_allocated("cuda:0")


def test_a_newer_round_supersedes_an_open_one():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(round_id=0))
    waiter = {}
    thread = threading.Thread(target=lambda: waiter.setdefault("error", _catch(service, 0)))
    thread.start()
    service.start_round(request(round_id=1))
    thread.join(5)
    assert waiter["error"] == ("superseded", "round 0: superseded by round 1")


def _catch(service, round_id):
    try:
        service.result(round_id, timeout_s=5)
    except RoundFailed as exc:
        return exc.kind, str(exc)
    return "no error"


def test_result_times_out_when_chunks_never_come():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request())
    with pytest.raises(RoundFailed, match="not answered within 0.2 s") as info:
        service.result(0, timeout_s=0.2)
    assert info.value.kind == "timeout"


def test_a_round_whose_chunks_stop_coming_fails_fast():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request())
    send_chunks(service, 0, order=(0, 2))
    start = time.perf_counter()
    with pytest.raises(RoundFailed, match="2 of 3 chunks arrived, then none for 0.3 s") as info:
        service.result(0, timeout_s=60, chunk_grace_s=0.3)
    assert time.perf_counter() - start < 5 and info.value.kind == "chunks_lost"


def test_chunks_must_cover_the_ground_set():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(n_chunks=2))
    parts = np.array_split(np.arange(30), 3)
    service.add_chunk(chunk(0, 0, parts[0]))
    service.add_chunk(chunk(0, 1, parts[0]))  # the same ids twice
    with pytest.raises(RoundFailed, match=r"chunk 1: ids \[0, 1, 2, 3, 4\] came before; every id must appear once") \
            as info:
        service.result(0, timeout_s=10)
    assert info.value.kind == "rejected"
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(round_id=1, n_chunks=2))
    service.add_chunk(chunk(1, 0, parts[0]))
    service.add_chunk(chunk(1, 1, parts[1]))  # ids 20..29 never come
    with pytest.raises(RoundFailed, match="chunks cover 20 distinct ids, must cover 0..29 once"):
        service.result(1, timeout_s=10)


@pytest.mark.parametrize("n_select", [1, 2, 4])
@pytest.mark.parametrize(
    "fault, match",
    [("wrong_round", "round_id == 1, must be 0"), ("index_out_of_range", "indices must be in"),
     ("negative_weight", "weights must be >= 0"), ("duplicate_index", "indices must be unique")],
)
def test_injected_faults_fail_the_receivers_validation_for_every_budget(fault, match, n_select):
    asked = request(n_chunks=0, n_select=n_select, strategy="random")
    clean = SelectorService({"strategy": "random"})
    clean.start_round(asked)
    SubsetMessage.model_validate(clean.result(0, timeout_s=10), context={"request": RoundRequest(**asked)})
    service = SelectorService({"strategy": "random", "fault": fault})
    service.start_round(asked)
    answer = service.result(0, timeout_s=10)
    with pytest.raises(ValidationError, match=match):
        SubsetMessage.model_validate(answer, context={"request": RoundRequest(**asked)})


def test_a_crashing_strategy_fails_the_round_not_the_service():
    service = SelectorService({"strategy": "random", "fault": "crash"})
    service.start_round(request(n_chunks=0, strategy="random"))
    with pytest.raises(RoundFailed, match="injected fault"):
        service.result(0, timeout_s=10)
    assert service.status().stopped is False


def test_bad_config_names_the_field():
    with pytest.raises(ValidationError, match="delay_s"):
        SelectorService({"strategy": "random", "delay_s": -1})


def test_superseded_rounds_leave_no_state_behind():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(round_id=0))
    service.start_round(request(round_id=1))
    send_chunks(service, 0)  # late chunks of the superseded round are dropped
    send_chunks(service, 1)
    service.result(1, timeout_s=30)
    assert service._rounds == {}


def test_a_round_never_asked_of_this_selector_fails_fast():
    service = SelectorService({"strategy": "random"})
    start = time.perf_counter()
    with pytest.raises(RoundFailed, match="unknown to this selector") as info:
        service.result(5, timeout_s=60, request_grace_s=0.2)
    assert time.perf_counter() - start < 5 and info.value.kind == "unknown_round"


def test_reconfigure_takes_effect_from_the_next_round():
    service = SelectorService({"strategy": "random", "delay_s": 0.5})
    service.start_round(request(round_id=0, n_chunks=0, strategy="random"))
    plan = service.reconfigure({"strategy": "gradmatch-pb"})
    assert plan.strategy == "gradmatch-pb" and plan.summaries == "batch"
    assert service.result(0, timeout_s=10).strategy == "random"  # asked before the change
    service.start_round(request(round_id=1))
    send_chunks(service, 1)
    assert service.result(1, timeout_s=30).strategy == "gradmatch-pb"
    service.start_round(request(round_id=2, n_chunks=0, strategy="random"))  # the trainer's view is stale
    with pytest.raises(RoundFailed, match="asked of strategy 'random', but this selector runs 'gradmatch-pb'") as info:
        service.result(2, timeout_s=10)
    assert info.value.kind == "rejected"
    with pytest.raises(ValidationError, match="lam"):
        service.reconfigure({"strategy": "gradmatch-pb", "lam": -1})
    assert service.status().strategy == "gradmatch-pb"


def test_round_failed_survives_pickling_with_its_fields():
    service = SelectorService({"strategy": "random", "fault": "crash"})
    service.start_round(request(round_id=3, n_chunks=0, strategy="random"))
    with pytest.raises(RoundFailed) as info:
        service.result(3, timeout_s=10)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is RoundFailed and isinstance(copy, RuntimeError)
    assert (copy.round_id, copy.kind, copy.reason) == (3, "failed", "RuntimeError: injected fault: crash")
    assert str(copy) == "round 3: RuntimeError: injected fault: crash"


def test_round_failed_names_a_kind_it_knows():
    with pytest.raises(ValueError, match="kind == 'lost', must be one of stopped, superseded, timeout"):
        RoundFailed(1, "lost", "gone")
    assert str(RoundFailed(None, "stopped", "selector stopped")) == "selector stopped"


def test_a_stopped_selector_fails_open_rounds_and_refuses_new_ones():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(round_id=0))
    service.stop()
    with pytest.raises(RoundFailed, match="round 0: selector stopped") as open_round:
        service.result(0, timeout_s=10)
    with pytest.raises(RoundFailed, match="round 1: selector stopped") as new_round:
        service.start_round(request(round_id=1))
    assert open_round.value.kind == new_round.value.kind == "stopped"


def _fails_at_once(service, round_id, match):
    start = time.perf_counter()
    with pytest.raises(RoundFailed, match=match) as info:
        service.result(round_id, timeout_s=60, chunk_grace_s=60, request_grace_s=60)
    assert time.perf_counter() - start < 2 and info.value.round_id == round_id
    return info.value.reason


def test_a_rejected_chunk_fails_its_round_at_once_with_the_reason():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(round_id=2))
    parts = np.array_split(np.arange(30), 3)
    bad = chunk(2, 1, parts[1])
    bad["rows"] = bad["rows"].copy()
    bad["rows"][0, 3] = np.nan
    assert service.add_chunk(chunk(2, 0, parts[0])) == Accepted(round_id=2)
    answer = service.add_chunk(bad)
    assert isinstance(answer, Rejection) and (answer.subject, answer.round_id) == ("chunk 1", 2)
    assert answer.reason == _fails_at_once(service, 2, "chunk 1 rejected: .*rows contain 1 non-finite values")
    assert service._rounds == {}  # nothing left behind


def test_a_rejection_before_the_request_fails_the_round_it_names():
    service = SelectorService({"strategy": "gradmatch-pb"})
    bad = chunk(0, 0, np.arange(10))
    bad["labels"] = np.zeros(3)  # misaligned with ids
    assert "labels has 3 entries, must equal ids (10)" in service.add_chunk(bad).reason
    service.start_round(request(round_id=0))
    send_chunks(service, 0, order=(1, 2))
    _fails_at_once(service, 0, "chunk 0 rejected: .*labels has 3 entries")


def test_a_chunk_with_an_unreadable_round_id_fails_the_newest_open_round():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(round_id=4))
    bad = chunk(4, 0, np.arange(10))
    bad["round_id"] = "four"
    answer = service.add_chunk(bad)
    assert (answer.field, answer.value, answer.round_id) == ("round_id", "'four'", None)
    assert answer.rule.startswith("Input should be a valid integer")
    _fails_at_once(service, 4, "chunk 0 rejected: round_id: ")


def test_an_unreadable_rejection_before_any_round_fails_the_next_round_asked():
    service = SelectorService({"strategy": "random"})
    service.add_validation({"round_id": -1, "logits": np.zeros((2, 3)), "features": np.zeros((2, 4)),
                            "labels": np.array([0, 1])})
    service.start_round(request(round_id=0, n_chunks=0, strategy="random"))
    _fails_at_once(service, 0, "validation set rejected: round_id: ")
    service.start_round(request(round_id=1, n_chunks=0, strategy="random"))  # only that one round fails
    assert len(service.result(1, timeout_s=10).indices) == 4


def test_a_rejected_request_fails_its_round_at_once():
    service = SelectorService({"strategy": "gradmatch-pb"})
    asked = dict(request(round_id=1), n_select=31)
    answer = service.start_round(asked)
    assert answer.subject == "request" and "n_select == 31, must be <= n_ground (30)" in answer.rule
    _fails_at_once(service, 1, "request rejected: .*n_select == 31")


def test_a_rejected_validation_set_fails_its_round_at_once():
    service = SelectorService({"strategy": "glister"})
    service.start_round(RoundRequest(round_id=0, model_step=0, ground="example", n_ground=30, n_select=3,
                                     n_chunks=0, seed=0, strategy="glister", lr=0.1, with_validation=True)
                        .model_dump())
    service.add_validation({"round_id": 0, "logits": np.full((2, 3), np.inf), "features": np.zeros((2, 4)),
                            "labels": np.array([0, 1])})
    _fails_at_once(service, 0, "validation set rejected: .*logits contain 6 non-finite values")


def test_answers_carry_the_three_gradient_errors():
    service = SelectorService({"strategy": "gradmatch-pb"})
    service.start_round(request(n_select=5))
    send_chunks(service, 0)
    answer = service.result(0, timeout_s=30)
    expected = gradient_errors(GradMatchPBSelector(), GroundSet(labels=np.zeros(30), rows=ROWS), None,
                               answer.indices, answer.weights)
    assert (answer.grad_error, answer.grad_error_rel, answer.grad_error_trained) == pytest.approx(
        (expected.absolute, expected.relative, expected.trained))
    assert 0 < answer.grad_error_rel < 1 and 0 < answer.grad_error_trained < 1
    norm = np.linalg.norm(ROWS.astype(np.float64).sum(0))  # the training target of batches without sizes
    assert answer.grad_error == pytest.approx(answer.grad_error_rel * norm)


@pytest.mark.parametrize("strategy", ["random", "gradmatch", "gradmatch-pb", "craig", "craig-pb", "glister"])
def test_warm_up_runs_each_strategy_cleanly(strategy, caplog):
    """The warm-up goes through the strategy's real code path on a tiny round; a failure there would be logged."""
    service = SelectorService({"strategy": strategy})
    with caplog.at_level("ERROR"):
        assert service.warm_up() > 0
    assert not [r for r in caplog.records if "warm-up" in r.getMessage()]
