"""The own-loop client: a model and a dataset written here, a plain PyTorch loop, the real selector actor."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import AdaptiveSubset
from trainer.client.api import ConfigError, DatasetError
from trainer.client.layers import ModelError

from loops import weighted_step
from scripts import run_cluster_script, run_example


class Blobs(torch.utils.data.Dataset):
    """Four Gaussian blobs in 6-D; items are (tensor, int) like a user's dataset."""

    def __init__(self, n: int = 400, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 4
        centres = torch.randn(4, 6, generator=g) * 3
        self.x = centres[self.y] + torch.randn(n, 6, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))


def train(subset, model, opt, seen=None):
    for epoch, batches in subset:
        for x, y, w in batches:
            if seen is not None:
                seen.setdefault(epoch, []).append(w)
            weighted_step(model, opt, x, y, w)


@pytest.mark.ray
def test_own_loop_adopts_rounds_and_weights_have_mean_one(ray_address):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = {}
    with AdaptiveSubset(model, Blobs(), strategy="gradmatch-pb", budget=0.2, epochs=10, select_every=2, kappa=0.5,
                        batch_size=16, on_late="wait") as subset:
        train(subset, model, opt, seen)
        summary = subset.summary()
        records = subset.records
    assert [r["status"] for r in records] == ["adopted"] * 3, records
    assert summary["rounds"] == 3 and summary["epochs_run"] == 6 and summary["steps"] == sum(map(len, seen.values()))
    full, first_subset = torch.cat(seen[0]), torch.cat(seen[1])
    assert full.numel() == 400 and torch.all(full == 1)  # a full epoch: every example, weight 1
    assert first_subset.numel() <= 5 * 16 and first_subset.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert 0 <= records[0]["grad_error"] and summary["redundant"] == 0.0  # the full epoch trained on every example


@pytest.mark.ray
def test_the_step_on_a_yielded_batch_is_the_references_sum_w_l_over_sum_w(ray_address):
    """Non-uniform GRAD-MATCH weights, through the client, into a plain SGD step: checked by hand per batch."""
    torch.manual_seed(0)
    data = Blobs(240)
    model = Net()
    lr, checked = 0.05, 0
    with AdaptiveSubset(model, torch.utils.data.TensorDataset(data.x, data.y), strategy="gradmatch", budget=0.2,
                        epochs=6, select_every=2, kappa=0.5, batch_size=16) as subset:
        for epoch, batches in subset:
            raw = subset.subset.weights  # the adopted subset's weights as the selector sent them, per example
            for x, y, w in batches:
                ids = torch.cdist(x, data.x).argmin(1)
                assert torch.equal(data.x[ids], x)
                expected = [torch.zeros_like(p) for p in model.parameters()]
                for i, example in enumerate(ids):  # sum_i w_i grad l_i / sum_i w_i, one example at a time
                    model.zero_grad()
                    F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
                    share = float(raw[example] / raw[ids].sum()) if epoch >= subset.epoch_plan.full else 1 / len(ids)
                    expected = [e + share * p.grad for e, p in zip(expected, model.parameters())]
                before = [p.detach().clone() for p in model.parameters()]
                loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
                model.zero_grad()
                loss.backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= lr * p.grad
                for p, b, e in zip(model.parameters(), before, expected):
                    torch.testing.assert_close(p.detach() - b, -lr * e, rtol=1e-4, atol=1e-7)
                checked += epoch >= subset.epoch_plan.full and bool(raw[ids].std() > 0)
    assert subset.summary()["rounds"] >= 1
    assert checked > 0  # some batches really carried unequal weights


@pytest.mark.ray
def test_the_same_seed_gives_the_same_subsets_and_model_by_default(ray_address):
    """Default adoption waits for a round computed at a fixed epoch: two runs of one config are identical."""
    def run():
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with AdaptiveSubset(model, Blobs(), strategy="gradmatch", budget=0.1, epochs=12, select_every=2, kappa=0.5,
                            batch_size=16, seed=4) as subset:
            train(subset, model, opt)
            weights = subset.subset.weights.clone()
        return subset.records, weights, [p.detach().clone() for p in model.parameters()]

    (records_a, weights_a, params_a), (records_b, weights_b, params_b) = run(), run()
    keys = ("round", "status", "trigger_epoch", "adopted_epoch", "subset_size", "grad_error")
    assert len(records_a) >= 3 and all(r["status"] == "adopted" for r in records_a)
    assert [{k: r[k] for k in keys} for r in records_a] == [{k: r[k] for k in keys} for r in records_b]
    assert torch.equal(weights_a, weights_b) and weights_a.std() > 0
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


@pytest.mark.ray
@pytest.mark.parametrize("guard, blown, undone", [(True, (500.0, 500.0), True), (True, (500.0,), False),
                                                  (False, (500.0, 500.0), False), (True, (500.0, 100.0), False)])
def test_the_divergence_guard_undoes_a_subset_that_blows_the_loss_up(ray_address, guard, blown, undone):
    """The loss of the epochs after the first adoption is reported as ``blown``: stuck high for two epochs (a
    collapse), the guard brings back the subset trained before; for one epoch, falling fast (the usual jump of a
    new subset's loss), or with the guard off, it does not."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with AdaptiveSubset(model, Blobs(), strategy="gradmatch-pb", budget=0.2, epochs=12, select_every=4, kappa=0.5,
                        batch_size=16, divergence_guard=guard) as subset:
        rounds_trained = []
        for epoch, batches in subset:
            total = 0.0
            for x, y, w in batches:
                total += weighted_step(model, opt, x, y, w)
            first_adopted = subset.records[0]["adopted_epoch"] if subset.records else None
            after = epoch - first_adopted if first_adopted is not None else -1
            rounds_trained.append(subset.subset.round)
            subset.report_loss(blown[after] if 0 <= after < len(blown) else total)
        summary = subset.summary()
    first = subset.records[0]
    assert first["status"] == "adopted" and first["round"] == 0
    assert summary["rounds_harmful"] == int(undone)
    after = rounds_trained[first["adopted_epoch"] + 2]  # the epoch after the two reported epochs
    if undone:
        event = summary["harmful"][0]
        assert event["round"] == 0 and event["epoch"] == first["adopted_epoch"] + 1 and event["loss"] > event["bound"]
        assert after is None  # back to the subset trained before round 0: the initial random one
    else:
        assert after == 0


TWO_CLIENTS = """
import json, sys
import torch
import torch.nn.functional as F
from test_api import Blobs, Net, train
from trainer import AdaptiveSubset

first = AdaptiveSubset(Net(), Blobs(), strategy="random", budget=0.25, epochs=4, select_every=1, kappa=0)
model = Net()
second = AdaptiveSubset(model, Blobs(), strategy="gradmatch-pb", budget=0.2, epochs=6, select_every=2, kappa=0.5,
                        batch_size=16, ray="local")
first.close()  # the Ray both use was started by the first: it must stay up for the second
with second:
    train(second, model, torch.optim.SGD(model.parameters(), lr=0.05))
json.dump({"rounds": second.summary()["rounds"], "statuses": [r["status"] for r in second.records]},
          open(sys.argv[1], "w"))
"""


def test_closing_one_client_leaves_the_ray_another_client_uses(tmp_path):
    """Two clients in one program share the private Ray the first started; it is shut down with the last."""
    script = tmp_path / "two_clients.py"
    script.write_text(TWO_CLIENTS)
    result = run_cluster_script(str(script), timeout_s=300, prefix="two")
    assert result["rounds"] == 2 and result["statuses"] == ["adopted", "adopted"], result


@pytest.mark.ray
def test_selection_state_of_another_data_set_size_is_refused(ray_address):
    with AdaptiveSubset(Net(), Blobs(400), strategy="random", budget=0.25, epochs=4, select_every=2, kappa=0) as a:
        state = a.state_dict()
    with AdaptiveSubset(Net(), Blobs(200), strategy="random", budget=0.25, epochs=4, select_every=2, kappa=0) as b:
        with pytest.raises(ValueError, match="selection state of a training set of 400 examples, this client's has 200"):
            b.load_state_dict(state)


@pytest.mark.ray
def test_state_dict_resumes_selection(ray_address):
    def client(model):
        return AdaptiveSubset(model, Blobs(), strategy="random", budget=0.25, epochs=8, select_every=2, kappa=0,
                              batch_size=20, lead=0, seed=5)

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with client(model) as first:
        for epoch, batches in first:
            for x, y, w in batches:
                pass
            if epoch == 3:
                state = first.state_dict()
                break
        subset_at_3 = first.subset
    with client(Net()) as second:
        second.load_state_dict(state)
        assert second.epoch == 4 and second.step == state["step"]
        assert torch.equal(second.rounds.subset.weights, subset_at_3.weights)
        train(second, second.model, torch.optim.SGD(second.model.parameters(), lr=0.05))
        records = second.records
    assert [r["due_epoch"] for r in records] == [2, 4, 6] and all(r["status"] == "adopted" for r in records)
    del opt


class NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(x)


class SoftmaxOut(Net):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)


class Pairs(Blobs):
    def __getitem__(self, i):
        return self.x[i]


@pytest.mark.parametrize("make, error, words", [
    (lambda: (NoHead(), Blobs()), ModelError, ["NoHead", "out_features == 4", "last_layer="]),
    (lambda: (SoftmaxOut(), Blobs()), ModelError, ["SoftmaxOut", "not the output of its classifier layer"]),
    (lambda: (Net(), Pairs()), DatasetError, ["train_set[0]", "(input, int label)"]),
    (lambda: (Net(), torch.utils.data.TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))),
     DatasetError, ["train_set", "empty"]),
])
def test_bad_models_and_datasets_fail_before_ray(make, error, words):
    model, data = make()
    with pytest.raises(error) as info:
        AdaptiveSubset(model, data, n_classes=4 if not isinstance(data, Pairs) else None)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_labels_and_summary_set_are_checked():
    data = Blobs()
    with pytest.raises(DatasetError, match=r"labels in \[0, 3\], must be in \[0, 2\)"):
        AdaptiveSubset(Net(), data, n_classes=2)
    with pytest.raises(DatasetError, match="summary_set has 10 examples, must have as many as train_set"):
        AdaptiveSubset(Net(), data, summary_set=Blobs(10))


@pytest.mark.parametrize("options, expected", [
    ({"budget": 1.5}, "budget 1.5: Input should be less than or equal to 1"),
    ({"strategy": "nope"}, "strategy 'nope': must be one of"),
    ({"strategy": "random", "lam": 0.1}, "lam: not an option of strategy 'random'"),
    ({"lr": float("nan")}, "lr nan: Input should be a finite number"),
    ({"pool": 0.05, "budget": 0.2, "batch_size": 20}, "pool=0.05: a pool of 1 of the 20 mini-batches leaves nothing"),
    ({"select_every": 50, "epochs": 10, "kappa": 0}, "select_every=50: no selection round fits in the 10 subset "
                                                     "epochs of epochs=10 (kappa=0); use a smaller select_every"),
])
def test_invalid_options_are_one_line_config_errors(options, expected):
    with pytest.raises(ConfigError) as info:
        AdaptiveSubset(Net(), Blobs(), **options)
    assert expected in str(info.value) and "\n" not in str(info.value)


def wait_until_dead(actor, timeout_s: float = 60.0) -> None:
    import time

    import ray

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            ray.get(actor.status.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the actor was still answering {timeout_s:g} s after ray.kill")


@pytest.mark.ray
@pytest.mark.parametrize("on_loss", ["fail", "continue"])
def test_a_selector_gone_for_good_is_said_loudly(ray_address, on_loss):
    from protocol.errors import RunFailed

    import ray

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    subset = AdaptiveSubset(model, Blobs(200), strategy="gradmatch-pb", budget=0.2, epochs=8, select_every=2,
                            kappa=0, batch_size=20, lead=0, on_selector_loss=on_loss)
    try:
        epochs = []
        with pytest.raises(RunFailed) if on_loss == "fail" else contextlib.nullcontext():
            for epoch, batches in subset:
                epochs.append(epoch)
                for x, y, w in batches:
                    weighted_step(model, opt, x, y, w)
                if epoch == 2:
                    ray.kill(subset.selector, no_restart=True)
                    wait_until_dead(subset.selector)  # ray.kill returns at once; round 1 must meet a dead actor
        summary, records = subset.summary(), subset.records
    finally:
        subset.close()
    assert "selector lost for good" in summary["selector_lost"]
    assert records[0]["status"] == "adopted" and records[1]["status"] == "failed"
    if on_loss == "fail":
        assert epochs == [0, 1, 2, 3]  # the round due at 4 finds the selector gone: the run stops there
    else:
        assert epochs == list(range(8)) and [r["status"] for r in records[2:]] == ["skipped"]
        assert "selector lost for good" in records[2]["reason"]


@pytest.mark.ray
def test_the_own_loop_example_runs(ray_address):
    import re

    stdout = run_example("own_loop.py", ray_address, timeout_s=300)
    accuracy = float(re.search(r"test accuracy ([\d.]+) %", stdout).group(1))
    rounds = int(re.search(r"'rounds': (\d+)", stdout).group(1))
    assert accuracy > 80 and rounds >= 1, stdout


@pytest.mark.ray
def test_lead_auto_starts_rounds_early_enough_for_the_time_they_took(ray_address):
    """Epochs of ~40 ms and a selector that takes 0.4 s: with lead 1 a round is late by about ten epochs.
    With lead auto the first round (untimed) is late, and every later one starts early enough to be on time."""
    import time

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with AdaptiveSubset(model, Blobs(), strategy="gradmatch-pb", delay_s=0.4, budget=0.25, epochs=80,
                        select_every=20, kappa=0, batch_size=20, lead="auto", on_late="continue") as subset:
        for epoch, batches in subset:
            for x, y, w in batches:
                weighted_step(model, opt, x, y, w)
            time.sleep(0.04)
        records = subset.records
    assert [r["status"] for r in records] == ["adopted"] * 3, records
    first, *later = records
    assert first["trigger_epoch"] == first["due_epoch"] - 1 and first["adopted_epoch"] > first["due_epoch"]
    for r in later:
        assert r["adopted_epoch"] == r["due_epoch"], records  # on time
        assert 2 <= r["due_epoch"] - r["trigger_epoch"] <= 20, records  # started early, not before the last boundary


@pytest.mark.ray
def test_state_dict_with_a_round_out_loads_with_weights_only(ray_address, tmp_path):
    """A state taken while a round is out (its answer held) holds tensors and plain types only."""
    def client(model):
        return AdaptiveSubset(model, Blobs(), strategy="gradmatch-pb", budget=0.2, epochs=8, select_every=2, kappa=0,
                              batch_size=16, lead=1, on_late="wait", seed=5)

    with client(Net()) as first:
        for epoch, batches in first:
            for x, y, w in batches:
                pass
            if epoch == 1:  # round 0 started at epoch 1, due at 2
                state = first.state_dict()
                break
    assert state["rounds"]["pending"] is not None and state["rounds"]["pending"]["payload"] is not None
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    with client(Net()) as second:
        second.load_state_dict(loaded)
        train(second, second.model, torch.optim.SGD(second.model.parameters(), lr=0.05))
        records = second.records
    assert [r["status"] for r in records] == ["adopted"] * 3, records


@pytest.mark.ray
def test_a_loop_stopped_early_records_no_round_it_never_reached(ray_address):
    """Stopped after epoch 2, the rounds due at 4 and 6 were never reached: no record says they were skipped."""
    with AdaptiveSubset(Net(), Blobs(), strategy="random", budget=0.25, epochs=8, select_every=2, kappa=0,
                        batch_size=20, lead=0, seed=5) as subset:
        for epoch, batches in subset:
            for x, y, w in batches:
                pass
            if epoch == 2:
                break
        subset.finish()
        records = subset.records
    assert [(r["round"], r["status"]) for r in records] == [(0, "adopted")], records
