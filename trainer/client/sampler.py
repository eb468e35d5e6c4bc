"""The adopted subset as a batch sampler for your own ``DataLoader``: your workers, pinning and ``collate_fn``.

.. code-block:: python

    from trainer import AdaptiveSubset
    from trainer.integrations.sampler import IndexedDataset, with_indices

    subset = AdaptiveSubset(model, train_set, strategy="gradmatch-pb", budget=0.1, epochs=200, batch_size=32)
    loader = DataLoader(IndexedDataset(train_set), batch_sampler=subset.batch_sampler(),
                        collate_fn=with_indices(my_collate), num_workers=4, pin_memory=True)
    with subset:
        for epoch in range(subset.epoch_plan.total):
            for ids, (x, y) in loader:          # each iter(loader) is one epoch: the rounds run there
                loss = (subset.weights(ids) * F.cross_entropy(model(x), y, reduction="none")).mean()

Each ``iter()`` of the sampler is an epoch boundary: it runs :meth:`trainer.api.AdaptiveSubset.next_epoch` (the
same round protocol as the client's own iterator, through its ``RoundClient``) and yields the epoch's mini-batches
of example ids, as the own iterator would make them: per-example subsets reshuffled by the run's seed, PB
subsets as the chosen fixed mini-batches, full epochs (warm start) over every example.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from trainer.client.batches import IndexedCollate, IndexedDataset, with_indices


class SubsetBatchSampler(Sampler):
    """Batch sampler over the epochs of an :class:`trainer.api.AdaptiveSubset` (``subset.batch_sampler()``).

    By default each ``iter()`` is the next epoch: it runs the boundary and yields that epoch's mini-batches (an
    ``iter()`` again before any batch was drawn, as a ``DataLoader`` with workers makes, yields the same epoch).
    With ``advance_on_iter=False`` a driver (the Lightning callback, the Hugging Face trainer) calls
    :meth:`advance` at each epoch boundary and every ``iter()`` yields the current epoch's batches.

    ``len()`` is the number of mini-batches of the epoch the next ``iter()`` yields (a full epoch's, or the
    subset's). :meth:`weights` maps a batch's example ids to their weights, scaled to mean 1 over the mini-batch,
    so ``(w * loss).mean()`` is the reference's ``sum w l / sum w`` per mini-batch.
    """

    def __init__(self, client, advance_on_iter: bool = True):
        self.client, self.advance_on_iter = client, advance_on_iter
        n = len(client.labels)
        self._weight = torch.zeros(n)  # this epoch's per-batch-normalised weight of each example
        self._member = torch.zeros(n, dtype=torch.bool)  # in this epoch's batches
        self.epoch: int | None = None  # the epoch last started here
        self._order: list[list[int]] | None = None  # its mini-batches
        self._drawn = False  # a batch of them was drawn

    def advance(self) -> bool:
        """Run the boundary before the next epoch (``AdaptiveSubset.next_epoch``) and lay out its mini-batches;
        False once every epoch of the plan has been trained."""
        client = self.client
        started = client.next_epoch()
        self._drawn = False
        if started is None:
            self._order = []
            return False
        self.epoch, subset = started
        order, weights = client.epoch_order(subset)
        self._weight.zero_()
        self._member.zero_()
        for ids, w in zip(order, weights):
            self._weight[ids] = w.float()
            self._member[ids] = True
        self._order = [ids.tolist() for ids in order]
        return True

    def __len__(self) -> int:
        if self._order is not None and not (self.advance_on_iter and self._drawn):
            return len(self._order)
        if not self.advance_on_iter:
            return 0
        client = self.client
        epoch = client.epoch + int(client._epoch_done or client._epoch_open)
        if epoch >= client.epoch_plan.total:
            return 0
        batch_size, n = client.config.train.batch_size, len(client.labels)
        if epoch < client.epoch_plan.full:
            return math.ceil(n / batch_size)
        subset = client.rounds.subset  # every subset of the run has the size of the initial one
        return len(subset.batches) if subset.fixed else math.ceil(subset.n_examples / batch_size)

    def __iter__(self):
        if self.advance_on_iter and (self._order is None or self._drawn):
            self.advance()
        elif self._order is None:
            raise RuntimeError("the subset's batch sampler was iterated before its first epoch started "
                               "(advance_on_iter=False: call advance() at each epoch boundary)")
        return self._batches(self._order, self.epoch)

    def _batches(self, order: list[list[int]], epoch: int):
        client = self.client
        for ids in order:
            self._drawn = True
            yield ids
            if self.advance_on_iter:  # a driver counts its own steps
                client.step += 1
        if self.advance_on_iter and client.epoch == epoch and client._epoch_open:
            client._epoch_done = True
            if epoch + 1 >= client.epoch_plan.total:
                client.finish()

    def weights(self, ids) -> torch.Tensor:
        """The weights of the examples ``ids`` (a batch from this sampler), on the ids' device."""
        device = ids.device if isinstance(ids, torch.Tensor) else self.client.device
        index = torch.as_tensor(ids, dtype=torch.long).cpu().reshape(-1)
        if self.epoch is None:
            raise RuntimeError("weights(ids): no epoch started yet; iterate the DataLoader that uses "
                               "subset.batch_sampler() first")
        if index.numel() and (index.min() < 0 or index.max() >= self._member.numel()):
            raise IndexError(f"weights(ids): ids in [{int(index.min())}, {int(index.max())}], must be example ids "
                             f"in [0, {self._member.numel()})")
        outside = index[~self._member[index]]
        if outside.numel():
            raise ValueError(f"weights(ids): example {int(outside[0])} is not in epoch {self.epoch}'s batches; pass "
                             "the ids of a batch from subset.batch_sampler() (IndexedDataset + with_indices)")
        return self._weight[index].to(device)


__all__ = ["IndexedCollate", "IndexedDataset", "SubsetBatchSampler", "with_indices"]
