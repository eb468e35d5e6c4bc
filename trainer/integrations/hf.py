"""GRAD-MATCH subsets in the Hugging Face ``Trainer``: :class:`AdaptiveSubsetTrainer` selects over a map-style
dataset of dicts (or a ``datasets.Dataset``), trains each epoch on the adopted subset and weights the loss.

.. code-block:: python

    from trainer.integrations.hf import AdaptiveSubsetTrainer

    trainer = AdaptiveSubsetTrainer(model=model, args=TrainingArguments(..., num_train_epochs=30),
                                    train_dataset=train, subset=dict(strategy="gradmatch-pb", budget=0.1,
                                                                     select_every=5, kappa=0.5))
    trainer.train()
    print(trainer.subset_summary)

``num_train_epochs`` is the epoch budget T (``epochs=``), ``per_device_train_batch_size`` the batch size and
``seed`` the run's seed; ``subset`` holds the other options of ``trainer.api.AdaptiveSubset``. With a warm start
(``kappa``) the run trains fewer epochs than T (full epochs, then subsets) and stops after them; the learning-rate
schedule spans the optimizer steps those epochs take. The loss is the batch's weighted cross-entropy on the
model's logits, ``sum w l / sum w`` per mini-batch. One process; labels under ``"labels"``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.client.api import AdaptiveSubset, build_config
from trainer.integrations.common import epoch_plan, require
from trainer.client.batches import IndexedDataset

transformers = require("transformers", "trainer.integrations.hf", "hf")

IDS_KEY = "example_ids"
_OWN = {"epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size", "seed": "seed"}


class _WithIds:
    """Collates ``(i, item)`` pairs with the Trainer's collator, the example ids under ``example_ids``."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, pairs):
        batch = self.collator([item for _, item in pairs])
        batch[IDS_KEY] = torch.tensor([int(i) for i, _ in pairs], dtype=torch.long)
        return batch


class AdaptiveSubsetTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains on GRAD-MATCH subsets.

    Parameters
    ----------
    subset : dict
        Options of ``trainer.api.AdaptiveSubset`` (``strategy``, ``budget``, ``select_every``, ``kappa``, ``lead``,
        ``on_late``, ``summary_set``, ``val_set``, ``last_layer``...), except ``epochs``, ``batch_size`` and
        ``seed``, which come from the ``TrainingArguments``.
    *args, **kwargs
        Those of ``transformers.Trainer``.
    """

    def __init__(self, *args, subset: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        options = dict(subset or {})
        for name, argument in _OWN.items():
            if name in options:
                raise ValueError(f"subset {name}={options[name]!r}: set by TrainingArguments({argument}=...)")
        epochs = self.args.num_train_epochs
        if epochs != int(epochs) or epochs < 1:
            raise ValueError(f"num_train_epochs {epochs}: must be a whole number of epochs >= 1 (the epoch budget)")
        if self.args.max_steps > 0:
            raise ValueError(f"max_steps {self.args.max_steps}: the subset schedule fixes the steps; leave max_steps "
                             "unset and give num_train_epochs")
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ValueError(f"world_size {self.args.world_size}, n_gpu {self.args.n_gpu}: AdaptiveSubsetTrainer "
                             "trains in one process on one device")
        options.update(epochs=int(epochs), batch_size=self.args.per_device_train_batch_size, seed=self.args.seed)
        self.subset_options = options
        self.subset_config = build_config(None, {k: v for k, v in options.items() if k not in _CLIENT_ARGUMENTS})
        self.plan = epoch_plan(self.subset_config)
        self.args.num_train_epochs = self.plan.total  # a warm start trains fewer epochs than the budget
        self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps
        self.client: AdaptiveSubset | None = None
        self.sampler = None
        self.subset_summary: dict | None = None
        self.subset_records: list[dict] = []
        self.seen_per_epoch: list[int] = []
        self._loss = [0.0, 0]
        self.add_callback(_Boundaries(self))

    # data --------------------------------------------------------------------------------------
    def _client(self) -> AdaptiveSubset:
        if self.client is None:
            dataset = self.train_dataset
            options = {k: v for k, v in self.subset_options.items()}
            options.setdefault("n_classes", getattr(getattr(self.model, "config", None), "num_labels", None))
            self.client = AdaptiveSubset(self.model, dataset, collate_fn=self._collator(),
                                         num_workers=self.args.dataloader_num_workers, **options)
            self.sampler = self.client.batch_sampler(advance_on_iter=False)
            self.sampler.advance()  # epoch 0
        return self.client

    def _dataset(self):
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("AdaptiveSubsetTrainer: training requires a train_dataset")
        datasets = _optional("datasets")
        if datasets is not None and isinstance(dataset, datasets.Dataset) and self.args.remove_unused_columns:
            dataset = self._remove_unused_columns(dataset, description="training")
            self.train_dataset = dataset
        return dataset

    def _collator(self):
        collator = self.data_collator
        datasets = _optional("datasets")
        if not (datasets is not None and isinstance(self.train_dataset, datasets.Dataset)):
            collator = self._get_collator_with_removed_columns(collator, description="training")
        return collator

    def get_train_dataloader(self):
        dataset = self._dataset()
        self._client()
        loader = torch.utils.data.DataLoader(
            IndexedDataset(dataset), batch_sampler=self.sampler, collate_fn=_WithIds(self._collator()),
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def planned_steps(self) -> int:
        """Optimizer steps of the whole schedule: full epochs of every example, then the subset's epochs."""
        client, batch_size = self._client(), self.args.per_device_train_batch_size
        accumulate = self.args.gradient_accumulation_steps
        subset = client.rounds.subset  # every subset has the size of the first
        subset_batches = len(subset.batches) if subset.fixed else math.ceil(subset.n_examples / batch_size)
        full_batches = math.ceil(len(client.labels) / batch_size)
        return (self.plan.full * math.ceil(full_batches / accumulate)
                + self.plan.subset * math.ceil(subset_batches / accumulate))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        return super().create_scheduler(self.planned_steps(), optimizer)

    # the loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        ids = inputs.pop(IDS_KEY, None)
        if ids is None or not model.training:  # evaluation batches: the model's own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        loss = (self.client.weights(ids) * losses).mean()
        value = float(loss.detach())
        if math.isfinite(value):
            self._loss[0] += value * len(ids)
        self._loss[1] += len(ids)
        return (loss, outputs) if return_outputs else loss

    # life cycle --------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.close_subset()

    def close_subset(self) -> None:
        """Keep the summary and the records, release the selector (and the Ray started for it)."""
        if self.client is not None and self.subset_summary is None:
            self.subset_summary, self.subset_records = self.client.summary(), list(self.client.records)
            self.client.close()


class _Boundaries(transformers.TrainerCallback):
    """At each epoch end: the epoch's mean loss to the divergence guard, then the boundary before the next."""

    def __init__(self, trainer: AdaptiveSubsetTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.client is not None:
            self.trainer.client.step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        total, count = trainer._loss
        trainer.seen_per_epoch.append(count)
        if count:
            optimizer = getattr(trainer, "optimizer", None)
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None  # for tensorboard=
            trainer.client.report_loss(total / count, lr=lr)
        trainer._loss = [0.0, 0]
        if not trainer.sampler.advance():
            control.should_training_stop = True
        return control


def _optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        return None


_CLIENT_ARGUMENTS = {"config", "summary_set", "val_set", "last_layer", "n_classes", "selector", "phase", "group", "ray",
                     "forward", "label_key"}

__all__ = ["AdaptiveSubsetTrainer"]
