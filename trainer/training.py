"""The weighted training loop's pieces: fixed mini-batches, weighted loss, subsets, the learning-rate schedule.

All plain functions on tensors; the trainer actor only schedules them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn



def fixed_batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The PB ground set: a seeded partition of ``range(n)`` into batches of ``batch_size`` (last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(order, batch_size))


def shuffled_batches(ids: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Split ``ids`` into mini-batches after a seeded shuffle (per-example subsets and FULL)."""
    return list(torch.split(ids[torch.randperm(ids.numel(), generator=generator)], batch_size))


def weighted_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  w: torch.Tensor, reduce=None) -> torch.Tensor:
    """One optimizer step on ``mean_i(w_i * CE(model(x)_i, y_i))``; returns the loss before the step.

    ``w`` (B,) are the batch's weights normalised to mean 1 over the batch (``batch_weights``), so the loss is
    the reference's ``sum_i w_i l_i / sum_i w_i``: no step is larger than an unweighted one. A non-finite
    loss is returned without a step, so the model keeps its last finite state. Data-parallel, ``reduce``
    averages the loss over the ranks first, so that every rank makes the same decision.
    """
    loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
    total = reduce(loss) if reduce is not None else loss.detach()
    if torch.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return total.detach()


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


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum and weight decay (paper A.3.2)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def cosine_lr(lr0: float, t: int, t_max: int) -> float:
    """Cosine annealing: ``lr0 * (1 + cos(pi * t / t_max)) / 2`` for ``t = 0 .. t_max - 1``."""
    return 0.5 * lr0 * (1.0 + math.cos(math.pi * min(t, t_max) / max(1, t_max)))


class CosineSchedule:
    """The learning rate of every step: annealed per nominal epoch (the reference's) or per optimizer step.

    ``per == "epoch"``: ``lr(e) = lr0 (1 + cos(pi t / T)) / 2`` held for the whole epoch, where ``t =
    nominal(e)`` is the nominal epoch that trained epoch ``e`` stands for and ``T = n_epochs`` the epoch
    budget: a warm run's subset phase continues the curve where a run of T epochs would be
    (``trainer.rounds.EpochPlan.nominal``). ``per == "step"``: the same curve over the run's ``total_steps``
    optimizer steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr0: float, per: str, n_epochs: int, total_steps: int,
                 nominal=None):
        self.optimizer, self.lr0, self.per = optimizer, lr0, per
        self.n_epochs, self.total_steps = n_epochs, total_steps
        self.nominal = nominal or (lambda epoch: epoch)

    def _set(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def start_epoch(self, epoch: int, step: int) -> None:
        self._set(cosine_lr(self.lr0, self.nominal(epoch) if self.per == "epoch" else step,
                            self.n_epochs if self.per == "epoch" else self.total_steps))

    def after_step(self, step: int) -> None:
        if self.per == "step":
            self._set(cosine_lr(self.lr0, step, self.total_steps))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


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


@torch.no_grad()
def dominant_prediction(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> tuple[int, float]:
    """The class the model in eval mode predicts most often on ``x``, and its share of the predictions."""
    was_training = model.training
    model.eval()
    predicted = torch.cat([model(x[start:start + batch_size]).argmax(1) for start in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    counts = torch.bincount(predicted)
    return int(counts.argmax()), float(counts.max()) / max(1, predicted.numel())
