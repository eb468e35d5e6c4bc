"""The weighted training loop's pieces: epoch plan, fixed mini-batches, weighted loss, one epoch.

All plain functions on tensors; the trainer actor only schedules them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import augment_batch


@dataclass(frozen=True)
class EpochPlan:
    """``full`` epochs on all data (warm start or FULL) followed by ``subset`` epochs."""

    full: int
    subset: int

    @property
    def total(self) -> int:
        return self.full + self.subset


def plan_epochs(epochs: int, kappa: float, budget: float, rounds: bool) -> EpochPlan:
    """Warm start of paper A.2.1: ``T_s = kappa*T`` subset epochs after ``T_f = T_s*k/n`` full ones.

    ``kappa == 0`` means no warm start: all ``T`` epochs on subsets. Strategies without rounds (FULL)
    train ``T`` full epochs. A warm start has at least one full epoch.
    """
    if not rounds:
        return EpochPlan(full=epochs, subset=0)
    if kappa == 0:
        return EpochPlan(full=0, subset=epochs)
    subset = max(1, round(kappa * epochs))
    return EpochPlan(full=max(1, round(subset * budget)), subset=subset)


def fixed_batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The PB ground set: a seeded partition of ``range(n)`` into batches of ``batch_size`` (last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(order, batch_size))


def shuffled_batches(ids: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Split ``ids`` into mini-batches after a seeded shuffle (per-example subsets and FULL)."""
    return list(torch.split(ids[torch.randperm(ids.numel(), generator=generator)], batch_size))


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, mean_weight: float) -> torch.Tensor:
    """Per-example cross-entropy times ``weight / mean_weight``, averaged over the batch.

    ``mean_weight`` is the mean example weight of the whole subset, so the mean step size equals
    unweighted training while relative weights inside and across batches are kept.
    """
    losses = F.cross_entropy(logits, labels, reduction="none")
    return (losses * (weights / mean_weight)).mean()


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
    ids = torch.as_tensor(ids, dtype=torch.long)
    example_w[ids] = torch.as_tensor(weights, dtype=torch.float32)
    return Subset([ids], example_w, fixed=False, round=round_id)


def full_subset(n_train: int) -> Subset:
    return Subset([torch.arange(n_train)], torch.ones(n_train), fixed=False)


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, total_steps: int):
    """SGD with momentum and weight decay, cosine-annealed over the optimizer steps actually taken."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return optimizer, schedule


def train_epoch(model, optimizer, schedule, x, y, subset: Subset, batch_size: int, augment: bool, generator,
                stop=None) -> tuple[float, int]:
    """One epoch over ``subset``; returns (mean loss, optimizer steps). ``stop()`` true ends it early."""
    model.train()
    mean_weight = subset.mean_weight
    weights = subset.weights.to(x.device)
    total, steps = 0.0, 0
    for ids in subset.epoch_batches(batch_size, generator):
        ids = ids.to(x.device)
        inputs = augment_batch(x[ids], generator) if augment else x[ids]
        loss = weighted_loss(model(inputs), y[ids], weights[ids], mean_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += float(loss.detach())
        steps += 1
        if stop is not None and stop():
            break
    return total / max(steps, 1), steps


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        correct += int((model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])
