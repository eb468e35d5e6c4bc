"""Subsets as the client hands them out: fixed mini-batches of example ids, one weight per example.

The PB ground set is a seeded partition of the training ids (``fixed_batches``); a round's answer becomes a
``Subset`` (``subset_from_batches``, ``subset_from_examples``); each mini-batch's weights are scaled to mean 1
(``batch_weights``) before the weighted loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def fixed_batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The PB ground set: a seeded partition of ``range(n)`` into batches of ``batch_size`` (last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(order, batch_size))


def shuffled_batches(ids: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Split ``ids`` into mini-batches after a seeded shuffle (per-example subsets and FULL)."""
    return list(torch.split(ids[torch.randperm(ids.numel(), generator=generator)], batch_size))


def batch_weights(weights: torch.Tensor) -> torch.Tensor:
    """A mini-batch's weights (B,) scaled to mean 1 over the batch: ``mean(w * l)`` is then ``sum w l / sum w``.

    A batch whose weights sum to 0 (or are not finite) trains unweighted.
    """
    total = weights.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.ones_like(weights)
    return weights * (weights.numel() / total)


@dataclass
class Subset:
    """The examples trained on: mini-batches of example ids with one weight per example."""

    batches: list[torch.Tensor]  # fixed batches (PB) or the subset's ids as one tensor to reshuffle
    weights: torch.Tensor  # (n_train,) float32 weight of each example, 0 outside the subset
    fixed: bool  # True: train the batches as they are (PB); False: reshuffle ids each epoch
    round: int | None = None

    @property
    def n_examples(self) -> int:
        return int(sum(b.numel() for b in self.batches))

    @property
    def mean_weight(self) -> float:
        ids = torch.cat(self.batches)
        return float(self.weights[ids].mean())

    def epoch_batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        if self.fixed:
            order = torch.randperm(len(self.batches), generator=generator)
            return [self.batches[i] for i in order]
        return shuffled_batches(torch.cat(self.batches), batch_size, generator)


def subset_from_batches(batches: list[torch.Tensor], chosen, weights, n_train: int, round_id: int | None) -> Subset:
    """A PB subset: the chosen fixed batches, each example carrying its batch's weight."""
    example_w = torch.zeros(n_train)
    picked = [batches[int(i)] for i in chosen]
    for ids, w in zip(picked, weights):
        example_w[ids] = float(w)
    return Subset(picked, example_w, fixed=True, round=round_id)


def subset_from_examples(ids, weights, n_train: int, round_id: int | None) -> Subset:
    example_w = torch.zeros(n_train)
    ids = torch.tensor(np.asarray(ids), dtype=torch.long)  # a copy: message arrays are read-only
    example_w[ids] = torch.tensor(np.asarray(weights), dtype=torch.float32)
    return Subset([ids], example_w, fixed=False, round=round_id)


def full_subset(n_train: int) -> Subset:
    return Subset([torch.arange(n_train)], torch.ones(n_train), fixed=False)
