"""PyTorch Lightning: a tiny LightningModule trained for a few epochs on CPU through AdaptiveSubsetCallback."""

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from trainer.integrations.lightning import AdaptiveSubsetCallback, weighted_loss  # noqa: E402

from scripts import run_example  # noqa: E402
from test_api import Blobs, Net  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net()
        self.ids_per_epoch: dict[int, list[torch.Tensor]] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        ids, (x, y) = batch
        self.ids_per_epoch.setdefault(self.current_epoch, []).append(ids.cpu())
        return weighted_loss(self, F.cross_entropy(self(x), y, reduction="none"), ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def make_trainer(callback, **options):
    return pl.Trainer(max_epochs=callback.epochs, callbacks=[callback], reload_dataloaders_every_n_epochs=1,
                      accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **options)


@pytest.mark.ray
@pytest.mark.parametrize("strategy, num_workers", [("gradmatch-pb", 0), ("gradmatch", 1)])
def test_lightning_trains_on_the_adopted_subsets(ray_address, strategy, num_workers, tmp_path):
    torch.manual_seed(0)
    data = Blobs()
    model = Module()
    callback = AdaptiveSubsetCallback(data, strategy=strategy, budget=0.2, epochs=10, select_every=2, kappa=0.5,
                                      batch_size=16, seed=3, num_workers=num_workers, tensorboard=str(tmp_path / "tb"))
    assert callback.epochs == 6
    make_trainer(callback).fit(model, callback.dataloader())
    assert [r["status"] for r in callback.records] == ["adopted"] * 3, callback.records
    assert callback.summary["epochs_run"] == 6 and callback.summary["steps"] == sum(map(len,
                                                                                      model.ids_per_epoch.values()))
    seen = {epoch: torch.cat(ids) for epoch, ids in model.ids_per_epoch.items()}
    assert sorted(seen) == list(range(6))
    assert sorted(seen[0].tolist()) == list(range(400))  # the warm start's full epoch
    for epoch in range(1, 6):  # the subsets: 80 examples, each once per epoch
        assert len(seen[epoch]) == len(set(seen[epoch].tolist())) == 80, (epoch, len(seen[epoch]))
    assert callback.seen_per_epoch == [400] + [80] * 5
    final = set(seen[5].tolist())
    adopted = callback.subset.subset  # the last adopted subset is what the last epoch trained on
    assert final == set(torch.cat(adopted.batches).tolist())
    accuracy = (model(data.x).argmax(1) == data.y).float().mean().item()
    assert accuracy > 0.6  # chance: 0.25
    # tensorboard=: each epoch's loss and the optimizer's learning rate, read back as TensorBoard reads them
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    reader = accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    reader.Reload()
    lrs = [(event.step, event.value) for event in reader.Scalars("epoch/lr")]
    assert lrs == [(epoch, pytest.approx(0.05)) for epoch in range(6)]
    assert [event.step for event in reader.Scalars("epoch/loss")] == list(range(6))


def test_lightning_settings_are_checked_in_one_line():
    callback = AdaptiveSubsetCallback(Blobs(), strategy="gradmatch-pb", budget=0.2, epochs=10, select_every=2,
                                      kappa=0.5, batch_size=16)
    with pytest.raises(ValueError, match="max_epochs 10: this schedule trains 6 epochs"):
        pl.Trainer(max_epochs=10, callbacks=[callback], reload_dataloaders_every_n_epochs=1, logger=False,
                   enable_progress_bar=False).fit(Module(), callback.dataloader())
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs 0: must be 1"):
        pl.Trainer(max_epochs=6, callbacks=[callback], logger=False,
                   enable_progress_bar=False).fit(Module(), callback.dataloader())
    with pytest.raises(ValueError, match=r"dataloader\(shuffle=...\): the subset makes the batches"):
        callback.dataloader(shuffle=True)


@pytest.mark.ray
def test_the_lightning_example_runs(ray_address):
    import re

    stdout = run_example("lightning_loop.py", ray_address, timeout_s=400)
    accuracy = float(re.search(r"test accuracy ([\d.]+) %", stdout).group(1))
    rounds = int(re.search(r"'rounds': (\d+)", stdout).group(1))
    assert accuracy > 80 and rounds >= 1, stdout
