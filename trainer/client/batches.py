"""Batches of any structure: datasets whose items are ``(input, label)`` or dicts, collated by the user's
``collate_fn``, and the example ids that let a batch find its weights.

The selection only needs, for a set of example ids, the model's inputs for those examples (the summary passes)
and each example's label. Items may be ``(input, int label, ...)`` tuples, where ``input`` is a tensor, a dict or
a tuple, or dicts holding the label under ``label_key``; the inputs of a collated dict batch are the batch without
that key, those of a collated tuple batch its first element.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class DatasetError(ValueError):
    """A dataset that cannot be used for selection; the message names the dataset and the rule."""


class IndexedDataset(Dataset):
    """``dataset`` whose item ``i`` is ``(i, dataset[i])``: with :func:`with_indices` as the ``collate_fn`` each
    batch arrives as ``(example ids, the batch your collate_fn makes)``, and the ids give the batch's weights."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class IndexedCollate:
    """Collates ``(i, item)`` pairs into ``(ids (B,) int64, collate_fn(items))`` (picklable for workers)."""

    def __init__(self, collate_fn: Callable | None = None):
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn is {type(collate_fn).__name__}, must be callable (items -> batch) or None")
        self.collate_fn = collate_fn or default_collate

    def __call__(self, pairs):
        return torch.tensor([int(i) for i, _ in pairs], dtype=torch.long), self.collate_fn([item for _, item in pairs])


def with_indices(collate_fn: Callable | None = None) -> IndexedCollate:
    """The ``collate_fn`` for an :class:`IndexedDataset`: ``(ids, collate_fn(items))``, ``collate_fn`` defaulting
    to PyTorch's ``default_collate``."""
    return IndexedCollate(collate_fn)


def split_batch(batch, label_key: str = "labels"):
    """``(inputs, labels)`` of a collated batch: a dict without / with only ``label_key``, or a sequence's first and
    second elements."""
    if isinstance(batch, Mapping):
        if label_key not in batch:
            raise KeyError(f"batch has keys {sorted(batch)}, needs the label key {label_key!r} (label_key=)")
        return {key: value for key, value in batch.items() if key != label_key}, batch[label_key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"batch is {type(batch).__name__}; must be a dict with {label_key!r} or (inputs, labels, ...)")


def item_label(item, label_key: str = "labels"):
    """The label of one dataset item: ``item[label_key]`` of a dict, ``item[1]`` of a tuple; None if it has none."""
    if isinstance(item, Mapping):
        return item.get(label_key)
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[1]
    return None


def _as_list(items):
    return items


class LoaderFetch:
    """The inputs of any example ids, read through a ``DataLoader``: ``num_workers`` processes load the items
    (each a share of the ids), the user's ``collate_fn`` makes one batch of them all, and the labels are dropped.

    A function of example ids as the summary passes take it (``trainer.client.summaries.Fetch``); picklable, so summary
    workers can hold it.
    """

    def __init__(self, dataset: Dataset, name: str, collate_fn: Callable | None = None, num_workers: int = 0,
                 label_key: str = "labels"):
        self.dataset, self.name, self.num_workers, self.label_key = dataset, name, num_workers, label_key
        self.collate_fn, self.stack = collate_fn or default_collate, collate_fn is None

    def items(self, ids) -> list:
        ids = [int(i) for i in ids]
        if self.num_workers == 0 or len(ids) < 2:
            return [self.dataset[i] for i in ids]
        pieces = [ids[start::self.num_workers] for start in range(min(self.num_workers, len(ids)))]
        loader = DataLoader(self.dataset, batch_sampler=pieces, num_workers=len(pieces), collate_fn=_as_list)
        loaded = {}
        for piece, items in zip(pieces, loader):
            loaded.update(zip(piece, items))
        return [loaded[i] for i in ids]

    def __call__(self, ids):
        try:
            items = self.items(ids)
            first = items[0] if items else None
            if self.stack and isinstance(first, (tuple, list)) and not isinstance(first[0], (Mapping, tuple)):
                return torch.stack([torch.as_tensor(item[0]) for item in items])  # (input, label): inputs stacked
            return split_batch(self.collate_fn(items), self.label_key)[0]
        except (RuntimeError, TypeError, KeyError, ValueError) as exc:
            raise DatasetError(f"{self.name}: items cannot be collated into a batch of inputs: "
                               f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None


class WithForward(torch.nn.Module):
    """``model`` called as ``forward(model, inputs)``: lets the summary passes (and summary workers, which copy
    the model) run a model whose call is not ``model(inputs)`` / ``model(**inputs)``. Holds the model, does not
    change it."""

    def __init__(self, model: torch.nn.Module, forward: Callable):
        super().__init__()
        self.model, self.call = model, forward

    def forward(self, inputs):
        output = self.call(self.model, inputs)
        return output if isinstance(output, torch.Tensor) else getattr(output, "logits", output)


__all__ = ["DatasetError", "IndexedDataset", "IndexedCollate", "LoaderFetch", "WithForward", "item_label", "split_batch",
           "with_indices"]
