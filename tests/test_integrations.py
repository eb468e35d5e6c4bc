"""The integrations without extra packages: the batch sampler for a user's own DataLoader, and batches that are
not one tensor (dicts, tuples, a collate_fn, a forward callable). Real training on CPU against the real selector."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from trainer.api import AdaptiveSubset, DatasetError
from trainer.integrations.sampler import IndexedDataset, with_indices
from trainer.client.layers import ModelError

from loops import weighted_step
from test_api import Blobs, Net, train


def sampler_run(strategy, num_workers=0, seen=None, **options):
    """Train Net on Blobs through a DataLoader of the user's, fed by the client's batch sampler."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = Blobs()
    with AdaptiveSubset(model, data, strategy=strategy, budget=0.2, epochs=10, select_every=2, kappa=0.5,
                        batch_size=16, seed=3, **options) as subset:
        loader = DataLoader(IndexedDataset(data), batch_sampler=subset.batch_sampler(), collate_fn=with_indices(),
                            num_workers=num_workers)
        for epoch in range(subset.epoch_plan.total):
            assert len(loader) > 0
            n_batches = len(loader)
            batches = 0
            for ids, (x, y) in loader:
                w = subset.weights(ids)
                assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
                if seen is not None:
                    seen.setdefault(epoch, []).append(ids)
                weighted_step(model, opt, x, y, w)
                batches += 1
            assert batches == n_batches, (epoch, batches, n_batches)
        summary, records = subset.summary(), subset.records
        current = subset.subset
    accuracy = (model(data.x).argmax(1) == data.y).float().mean().item()
    return summary, records, current, [p.detach().clone() for p in model.parameters()], accuracy


@pytest.mark.ray
@pytest.mark.parametrize("strategy", ["gradmatch-pb", "gradmatch"])
def test_the_batch_sampler_trains_on_the_adopted_subset_as_the_own_iterator_does(ray_address, strategy):
    seen = {}
    summary, records, current, params, accuracy = sampler_run(strategy, seen=seen)
    assert [r["status"] for r in records] == ["adopted"] * 3, records
    assert summary["epochs_run"] == 6 and summary["steps"] == sum(map(len, seen.values()))
    assert sorted(torch.cat(seen[0]).tolist()) == list(range(400))  # the full epoch of the warm start
    last = torch.cat(seen[5])
    assert sorted(last.tolist()) == sorted(torch.cat(current.batches).tolist())  # the adopted subset, once each
    if strategy == "gradmatch-pb":  # the chosen fixed mini-batches, as they are
        assert sorted(map(sorted, (b.tolist() for b in seen[5]))) == sorted(map(sorted, (b.tolist()
                                                                                 for b in current.batches)))
    assert accuracy > 0.6  # chance: 0.25

    torch.manual_seed(0)  # the same run through the client's own iterator: the same steps, the same model
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with AdaptiveSubset(model, Blobs(), strategy=strategy, budget=0.2, epochs=10, select_every=2, kappa=0.5,
                        batch_size=16, seed=3) as subset:
        train(subset, model, opt)
    assert all(torch.allclose(a, b.detach(), atol=1e-6) for a, b in zip(params, model.parameters()))


@pytest.mark.ray
def test_the_batch_sampler_works_with_loader_workers(ray_address):
    summary, records, _, _, accuracy = sampler_run("gradmatch-pb", num_workers=1)
    assert [r["status"] for r in records] == ["adopted"] * 3 and accuracy > 0.9


@pytest.mark.ray
def test_weights_of_ids_outside_the_epoch_are_refused(ray_address):
    data = Blobs()
    with AdaptiveSubset(Net(), data, strategy="gradmatch-pb", budget=0.2, epochs=10, select_every=2, kappa=0.5,
                        batch_size=16) as subset:
        with pytest.raises(RuntimeError, match="no epoch started yet"):
            subset.weights(torch.tensor([0]))
        sampler = subset.batch_sampler()
        list(iter(sampler))  # epoch 0: full
        batches = list(iter(sampler))  # epoch 1: the initial random subset
        inside = set(i for b in batches for i in b)
        outside = next(i for i in range(400) if i not in inside)
        with pytest.raises(ValueError, match=f"example {outside} is not in epoch 1's batches"):
            subset.weights(torch.tensor([outside]))
        with pytest.raises(IndexError, match="must be example ids in"):
            subset.weights([400])


# --- batches that are not one tensor -------------------------------------------------------------

class DictBlobs(torch.utils.data.Dataset):
    """Blobs as dict items ({"x": ..., "mask": ..., "labels": int}), like a tokenised text dataset."""

    def __init__(self, n=400):
        self.blobs = Blobs(n)

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        x, y = self.blobs[i]
        return {"x": x, "mask": torch.ones(6), "labels": y}


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x, mask):
        return self.net(x * mask)


def collate_dicts(items):
    """A user's collate_fn: stacks the dicts' tensors, labels as int64."""
    return {"x": torch.stack([it["x"] for it in items]), "mask": torch.stack([it["mask"] for it in items]),
            "labels": torch.tensor([it["labels"] for it in items])}


@pytest.mark.ray
@pytest.mark.parametrize("num_workers", [0, 2])
def test_dict_batches_train_through_the_own_iterator_and_the_summaries(ray_address, num_workers):
    torch.manual_seed(0)
    model = DictNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with AdaptiveSubset(model, DictBlobs(), strategy="gradmatch", budget=0.2, epochs=10, select_every=2, kappa=0.5,
                        batch_size=16, collate_fn=collate_dicts, num_workers=num_workers) as subset:
        assert subset.layer is model.net.head
        for epoch, batches in subset:
            for x, y, w in batches:
                assert set(x) == {"x", "mask"}
                loss = (w * F.cross_entropy(model(**x), y, reduction="none")).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        records = subset.records
    assert [r["status"] for r in records] == ["adopted"] * 3, records
    assert all(r["grad_error"] is not None for r in records)
    blobs = DictBlobs().blobs
    assert (model(blobs.x, torch.ones(6)).argmax(1) == blobs.y).float().mean() > 0.5  # chance: 0.25


class TupleNet(nn.Module):
    """Takes (features, scale) and returns an object with .logits, as a Hugging Face model does."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, pair):
        x, scale = pair
        return type("Out", (), {"logits": self.net(x * scale)})()


class TupleBlobs(torch.utils.data.Dataset):
    def __init__(self):
        self.blobs = Blobs()

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        x, y = self.blobs[i]
        return (x, torch.ones(1)), y


@pytest.mark.ray
def test_tuple_inputs_with_a_forward_callable(ray_address):
    torch.manual_seed(0)
    model = TupleNet()
    with AdaptiveSubset(model, TupleBlobs(), strategy="gradmatch-pb", budget=0.2, epochs=6, select_every=2, kappa=0.5,
                        batch_size=16, forward=lambda m, inputs: m(inputs)) as subset:
        for epoch, batches in subset:
            for x, y, w in batches:
                assert isinstance(x, (tuple, list)) and len(x) == 2
        assert [r["status"] for r in subset.records] == ["adopted"] * 2


def test_bad_batch_options_are_refused_in_one_line():
    with pytest.raises(TypeError, match="collate_fn is int, must be callable"):
        AdaptiveSubset(Net(), Blobs(), collate_fn=3, budget=0.2, epochs=10, select_every=2, batch_size=16)
    with pytest.raises(DatasetError, match=r"train_set\[0\] is dict; .*under 'label'"):
        AdaptiveSubset(DictNet(), DictBlobs(), label_key="label", budget=0.2, epochs=10, select_every=2, batch_size=16)
    with pytest.raises(DatasetError, match="summary_set: items cannot be collated"):
        AdaptiveSubset(DictNet(), DictBlobs(), collate_fn=lambda items: 42, budget=0.2, epochs=10, select_every=2,
                       batch_size=16)
    with pytest.raises(ModelError, match="model DictNet returns"):
        AdaptiveSubset(DictNet(), DictBlobs(), collate_fn=collate_dicts, forward=lambda m, b: m(**b)[:, :2],
                       budget=0.2, epochs=10, select_every=2, batch_size=16)
