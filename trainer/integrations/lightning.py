"""GRAD-MATCH subsets in PyTorch Lightning: a ``Callback`` runs the rounds at the epoch boundaries and feeds the
adopted subset through the training ``DataLoader``; :func:`weighted_loss` weights the loss in ``training_step``.

.. code-block:: python

    from trainer.integrations.lightning import AdaptiveSubsetCallback, weighted_loss

    class Model(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            ids, (x, y) = batch                                   # the example ids come first
            return weighted_loss(self, F.cross_entropy(self(x), y, reduction="none"), ids)

    subset = AdaptiveSubsetCallback(train_set, strategy="gradmatch-pb", budget=0.1, epochs=200, select_every=20,
                                    kappa=0.5, batch_size=32)
    trainer = pl.Trainer(max_epochs=subset.epochs, callbacks=[subset], reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, subset.dataloader(num_workers=4, pin_memory=True))
    print(subset.summary)

The callback starts the :class:`trainer.api.AdaptiveSubset` in ``on_fit_start`` (the module on its device), runs
the boundary before epoch ``e + 1`` in ``on_train_epoch_end`` of epoch ``e`` (so the length Lightning reads when
it reloads the loader is the new epoch's), reports each epoch's mean weighted loss to the divergence guard, and
releases the selector when fitting ends or fails. Single process: data-parallel Lightning is not supported here.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from trainer.client.api import AdaptiveSubset, build_config
from trainer.integrations.common import epoch_plan, require
from trainer.client.batches import IndexedDataset, with_indices

pl = require("lightning.pytorch", "trainer.integrations.lightning", "lightning")


class AdaptiveSubsetCallback(pl.Callback):
    """Selection rounds for a ``lightning.pytorch.Trainer``.

    Parameters
    ----------
    train_set : Dataset
        Map-style, items ``(input, int label)`` or dicts with the label under ``label_key``.
    collate_fn, num_workers, pin_memory
        For :meth:`dataloader` and the summary passes.
    **options
        Everything else ``trainer.api.AdaptiveSubset`` takes (``strategy``, ``budget``, ``epochs``, ``select_every``,
        ``kappa``, ``batch_size``, ``seed``, ``summary_set``, ``val_set``, ``last_layer``, ``forward``...). Checked
        here, before the Trainer starts.
    """

    def __init__(self, train_set: Dataset, *, collate_fn=None, num_workers: int = 0, pin_memory: bool = False,
                 **options):
        self.train_set, self.collate_fn, self.num_workers, self.pin_memory = train_set, collate_fn, num_workers, \
            pin_memory
        self.options = options
        fields = {k: v for k, v in options.items() if k not in _CLIENT_ARGUMENTS}
        self.config = build_config(options.get("config"), fields)
        self.plan = epoch_plan(self.config)
        self.subset: AdaptiveSubset | None = None
        self.summary: dict | None = None  # the client's summary, kept when fitting ends
        self.records: list[dict] = []
        self.seen_per_epoch: list[int] = []  # examples trained on in each epoch (weighted_loss calls)
        self._loss = [0.0, 0]

    @property
    def epochs(self) -> int:
        """The epochs this schedule trains: ``Trainer(max_epochs=...)``."""
        return self.plan.total

    def dataloader(self, **loader_options) -> DataLoader:
        """The training ``DataLoader``: batches ``(example ids, collate_fn(items))`` of the current epoch's subset.
        ``loader_options`` (``num_workers``, ``pin_memory``, ``persistent_workers``...) go to the ``DataLoader``;
        ``batch_size``, ``shuffle``, ``sampler`` and ``drop_last`` are the subset's."""
        taken = sorted(set(loader_options) & {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"})
        if taken:
            raise ValueError(f"dataloader({taken[0]}=...): the subset makes the batches; pass batch_size= to "
                             "AdaptiveSubsetCallback and leave shuffle, sampler and drop_last out")
        loader_options.setdefault("num_workers", self.num_workers)
        loader_options.setdefault("pin_memory", self.pin_memory)
        return DataLoader(IndexedDataset(self.train_set), batch_sampler=_Deferred(self),
                          collate_fn=with_indices(self.collate_fn), **loader_options)

    # the hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.max_epochs != self.epochs:
            raise ValueError(f"Trainer max_epochs {trainer.max_epochs}: this schedule trains {self.epochs} epochs "
                             f"({self.plan.full} full + {self.plan.subset} on subsets of the epochs "
                             f"{self.config.train.epochs}); use Trainer(max_epochs=callback.epochs)")
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(f"Trainer reload_dataloaders_every_n_epochs "
                             f"{trainer.reload_dataloaders_every_n_epochs}: must be 1, so that every epoch's loader "
                             "has that epoch's length (full epochs and subsets differ)")
        if trainer.world_size > 1:
            raise ValueError(f"Trainer world_size {trainer.world_size}: AdaptiveSubsetCallback trains in one process")
        if self.subset is None:
            self.subset = AdaptiveSubset(pl_module, self.train_set, collate_fn=self.collate_fn,
                                         num_workers=self.num_workers, **self.options)
            self.sampler = self.subset.batch_sampler(advance_on_iter=False)
            self.sampler.advance()  # epoch 0: its loader is made next

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.subset.step += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        total, count = self._loss
        self.seen_per_epoch.append(count)
        if count:
            optimizers = getattr(trainer, "optimizers", None) or []
            lr = optimizers[0].param_groups[0]["lr"] if optimizers else None  # for tensorboard=
            self.subset.report_loss(total / count, lr=lr)
        self._loss = [0.0, 0]
        self.sampler.advance()  # the boundary before the next epoch (after the last: the run's end)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def close(self) -> None:
        """Keep the summary and records, release the selector (and the Ray started for it)."""
        if self.subset is not None and self.summary is None:
            self.summary, self.records = self.subset.summary(), list(self.subset.records)
            self.subset.close()

    # the loss ----------------------------------------------------------------------------------
    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """The weights of a batch's examples (mean 1 over the mini-batch), on the ids' device."""
        return self.subset.weights(ids)

    def weighted_loss(self, losses: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``mean(w * losses)``: the reference's ``sum w l / sum w`` of the mini-batch. ``losses`` are per example
        (``reduction="none"``)."""
        if losses.dim() != 1 or losses.shape[0] != len(ids):
            raise ValueError(f"weighted_loss: losses of shape {tuple(losses.shape)}, must be one per example of the "
                             f"batch ({len(ids)},): use reduction='none'")
        loss = (self.weights(ids) * losses).mean()
        value = float(loss.detach())
        if math.isfinite(value):
            self._loss[0] += value * len(ids)
        self._loss[1] += len(ids)
        return loss


def weighted_loss(module, losses: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """In ``training_step``: the batch's weighted loss, through the Trainer's :class:`AdaptiveSubsetCallback`."""
    callbacks = [c for c in module.trainer.callbacks if isinstance(c, AdaptiveSubsetCallback)]
    if len(callbacks) != 1:
        raise RuntimeError(f"weighted_loss: the Trainer has {len(callbacks)} AdaptiveSubsetCallback, must have "
                           "exactly one (Trainer(callbacks=[...]))")
    return callbacks[0].weighted_loss(losses, ids)


class _Deferred(torch.utils.data.Sampler):
    """The callback's batch sampler, before and after the client exists (the loader is made before fitting)."""

    def __init__(self, callback: AdaptiveSubsetCallback):
        self.callback = callback

    def _sampler(self):
        if self.callback.subset is None:
            raise RuntimeError("the subset's DataLoader was used before fitting started; pass it to "
                               "trainer.fit(..., train_dataloaders=callback.dataloader()) with the callback")
        return self.callback.sampler

    def __len__(self) -> int:
        return len(self._sampler())

    def __iter__(self):
        return iter(self._sampler())


_CLIENT_ARGUMENTS = {"config", "summary_set", "val_set", "last_layer", "n_classes", "selector", "phase", "group", "ray",
                     "forward", "label_key", "pin_memory"}

__all__ = ["AdaptiveSubsetCallback", "weighted_loss"]
