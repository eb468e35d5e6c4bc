"""The built-in trainer's step: the weighted loss, the optimizer, the learning-rate schedule, evaluation.

All plain functions on tensors; the trainer actor only schedules them. The subsets they train on are
``trainer.client.subsets``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
    (``trainer.client.schedule.EpochPlan.nominal``). ``per == "step"``: the same curve over the run's ``total_steps``
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
