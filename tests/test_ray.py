"""Ray integration: real selector and trainer actors on the shared local Ray.

Runs are small (synthetic 8x8 data, an MLP) but every part is real: actors, object store transfers,
gradient summaries, OMP, validation of each message on the trainer side.
"""

import time

import pytest
import ray

from protocol.config import RunConfig
from protocol.records import RunResult, RunSummary
from service.actor import SelectorActor
from trainer.builtin.actor import TrainerActor

pytestmark = pytest.mark.ray
RUN_TIMEOUT_S = 300


def make_config(selector: dict, **schedule) -> RunConfig:
    return RunConfig.model_validate({
        "seed": 3,
        "data": {"dataset": "synthetic", "synthetic_n": 1500},
        "model": {"name": "mlp"},
        "train": {"epochs": schedule.pop("epochs", 12), "batch_size": 32, "threads": 1, "eval_every": 4},
        "schedule": {"budget": 0.2, "kappa": 0, "select_every": 3, "lead": 1, **schedule},
        "selector": selector,
    })


def start(config: RunConfig):
    selector = SelectorActor.remote(config.selector)
    trainer = TrainerActor.remote(config, selector)
    return selector, trainer


def run(config: RunConfig) -> RunResult:
    selector, trainer = start(config)
    try:
        return ray.get(trainer.run.remote(), timeout=RUN_TIMEOUT_S)
    finally:
        ray.kill(trainer)
        ray.kill(selector)


def rounds_of(result):
    return result.progress.rounds


def test_round_trip_adopts_every_round(ray_address):
    result = run(make_config({"strategy": "gradmatch-pb"}, on_late="wait"))
    rounds, summary = rounds_of(result), result.summary
    assert type(result) is RunResult and type(summary) is RunSummary  # typed across the actor boundary
    assert result.clock.first_step_at < result.clock.last_step_at
    # 12 subset epochs, rounds due at 3, 6, 9
    assert [r["due_epoch"] for r in rounds] == [3, 6, 9]
    assert all(r["status"] == "adopted" for r in rounds), rounds
    assert summary.rounds == 3 and summary.rounds_rejected == 0
    # synthetic 1500 -> 1050 training examples; budget 210 examples = ceil(210 / 32) = 7 batches of 32
    # (one of the 33 batches is short: 26 examples)
    assert all(224 - 6 <= r["subset_size"] <= 224 for r in rounds)
    assert 0 <= rounds[0]["grad_error"] and 0 <= rounds[0]["grad_error_rel"] < 1
    assert rounds[0]["grad_error_trained"] >= 0
    epochs = result.progress.epochs
    assert [e["subset_round"] for e in epochs] == [None] * 3 + [0] * 3 + [1] * 3 + [2] * 3
    assert summary.selector_busy_s > 0
    assert all(r["adopted_epoch"] == r["due_epoch"] and r["staleness"] == 1 for r in rounds)


def test_trainer_keeps_stepping_while_a_slow_selector_works(ray_address):
    # the round starts at epoch 299 and is due at 300; epochs take 2-10 ms here, so a 0.25 s selection
    # is late by many epochs (the test needs an epoch shorter than 0.25 s) and is adopted within the 300
    # epochs left (it needs epochs longer than 0.25 s / 300 = 0.8 ms)
    config = make_config({"strategy": "gradmatch-pb", "delay_s": 0.25}, epochs=600, select_every=300, on_late="continue")
    result = run(config)
    first = rounds_of(result)[0]
    epochs = result.progress.epochs
    assert first["status"] == "adopted"
    # late: due at epoch 150, adopted at a later boundary, and no waiting was done for it
    assert first["adopted_epoch"] > first["due_epoch"] == 300
    assert first["stall_s"] == 0.0 and result.summary.stall_s == 0.0
    assert first["staleness"] == first["adopted_epoch"] - first["trigger_epoch"]
    # the trainer stepped through every epoch between the trigger and the adoption
    between = [e for e in epochs if first["trigger_epoch"] <= e["epoch"] < first["adopted_epoch"]]
    assert len(between) == first["adopted_epoch"] - first["trigger_epoch"]
    assert sum(e["train_s"] for e in between) > 0
    assert first["selector_s"] >= 0.25
    assert epochs[first["adopted_epoch"]]["subset_round"] == 0
    assert epochs[first["adopted_epoch"] - 1]["subset_round"] is None  # the old subset until then


def test_on_late_wait_stalls_and_records_it(ray_address):
    config = make_config({"strategy": "random", "delay_s": 1.0}, epochs=6, select_every=3, on_late="wait")
    result = run(config)
    rounds = rounds_of(result)
    assert all(r["status"] == "adopted" and r["adopted_epoch"] == r["due_epoch"] for r in rounds)
    assert all(r["stall_s"] > 0.3 for r in rounds)
    assert result.summary.stall_s == pytest.approx(sum(r["stall_s"] for r in rounds))


@pytest.mark.parametrize("fault, field", [("wrong_round", "round_id"), ("index_out_of_range", "indices"),
                                          ("negative_weight", "weights")])
def test_invalid_message_is_rejected_and_training_goes_on(ray_address, fault, field):
    result = run(make_config({"strategy": "random", "fault": fault}, on_late="wait"))
    rounds = rounds_of(result)
    assert [r["status"] for r in rounds] == ["rejected"] * 3
    assert all(field in r["reason"] for r in rounds)
    epochs = result.progress.epochs
    assert len(epochs) == 12 and all(e["subset_round"] is None for e in epochs)  # the initial subset throughout
    assert result.summary.rounds_rejected == 3 and result.summary.rounds == 0


def run_killing_the_selector_mid_round(config: RunConfig, no_restart: bool) -> dict:
    """Run ``config``, killing the selector once its first round is under way; the trainer's result."""
    selector, trainer = start(config)
    try:
        run_ref = trainer.run.remote()
        deadline = time.monotonic() + 120
        while not ray.get(selector.status.remote(), timeout=30).running:
            assert time.monotonic() < deadline, "no round started"
            time.sleep(0.05)
        ray.kill(selector, no_restart=no_restart)
        return ray.get(run_ref, timeout=RUN_TIMEOUT_S)
    finally:
        ray.kill(trainer)
        ray.kill(selector)


def test_selector_killed_mid_round_does_not_stop_the_run(ray_address):
    config = make_config({"strategy": "gradmatch-pb", "delay_s": 2.0}, epochs=12, select_every=4, on_late="wait")
    result = run_killing_the_selector_mid_round(config, no_restart=False)
    rounds = rounds_of(result)
    assert rounds[0]["status"] == "failed" and "restarted" in rounds[0]["reason"]
    assert rounds[-1]["status"] == "adopted"  # asked of the restarted selector
    assert len(result.progress.epochs) == 12 and result.summary.acc > 0


@pytest.mark.parametrize("on_loss", ["fail", "continue"])
def test_a_selector_killed_for_good_mid_round_is_lost_whatever_error_ray_raises(ray_address, on_loss):
    """Killed for good while it works on a round, the selector's answer arrives as some ``RayActorError``
    (not necessarily ``ActorDiedError``): the run says the selector is lost and follows --on-selector-loss."""
    config = make_config({"strategy": "gradmatch-pb", "delay_s": 2.0}, epochs=12, select_every=4, on_late="wait",
                         on_selector_loss=on_loss)
    result = run_killing_the_selector_mid_round(config, no_restart=True)
    summary, rounds = result.summary, rounds_of(result)
    assert summary.selector_lost and "selector lost for good" in summary.selector_lost, rounds
    assert rounds[0]["status"] == "failed" and "selector lost for good" in rounds[0]["reason"]
    if on_loss == "fail":
        assert summary.status == "failed" and "selector lost for good" in summary.reason
        assert len(result.progress.epochs) < 12
    else:
        assert summary.status == "completed" and len(result.progress.epochs) == 12
        assert all(r["status"] == "skipped" for r in rounds[1:])


def test_any_actor_error_of_a_dead_selector_means_it_is_gone_for_good(ray_address):
    """``ActorUnavailableError`` and a plain ``RayActorError`` count as a loss when the GCS holds the actor as
    DEAD, and not while it lives (a restart is coming); other errors never do."""
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    from trainer.client.rounds import RoundClient, actor_dead

    selector = SelectorActor.remote(make_config({"strategy": "random"}).selector.model_dump())
    ray.get(selector.status.remote(), timeout=60)
    client = RoundClient.__new__(RoundClient)  # only the selector handle is needed here
    client.selector = selector
    unavailable = ActorUnavailableError("connection lost", selector._actor_id.binary())
    assert actor_dead(selector) is False and not client._gone_for_good(unavailable)
    ray.kill(selector, no_restart=True)
    deadline = time.monotonic() + 60
    while not actor_dead(selector):
        assert time.monotonic() < deadline, "the killed selector never showed as DEAD"
        time.sleep(0.1)
    assert client._gone_for_good(unavailable) and client._gone_for_good(RayActorError())
    assert not client._gone_for_good(GetTimeoutError("slow"))


def test_rounds_overtaken_by_a_slow_selector_are_skipped(ray_address):
    # a round every epoch, each taking ~0.3 s while an epoch takes a few ms: most boundaries pass while
    # a round is out; those rounds are skipped instead of being run late one per epoch
    config = make_config({"strategy": "random", "delay_s": 0.3}, epochs=400, select_every=1, on_late="continue")
    rounds = rounds_of(run(config))
    statuses = [r["status"] for r in rounds]
    assert statuses.count("skipped") > statuses.count("adopted") >= 1
    started = [r for r in rounds if r["status"] != "skipped"]
    assert all(b["trigger_epoch"] > a["trigger_epoch"] for a, b in zip(started, started[1:]))
    assert len(rounds) == 399  # every slot is accounted for: rounds due at epochs 1..399


def test_a_round_that_never_returns_times_out_and_restarts_the_selector(ray_address):
    config = make_config({"strategy": "random", "delay_s": 30.0}, epochs=9, select_every=3, on_late="wait",
                         round_timeout_s=1.0)
    result = run(config)
    rounds = rounds_of(result)
    assert [r["status"] for r in rounds] == ["timeout", "timeout"]
    assert all("selector restarted" in r["reason"] and 0.9 < r["stall_s"] < 10 for r in rounds), rounds
    assert len(result.progress.epochs) == 9
