"""The training step the client tests run on each weighted batch of ``AdaptiveSubset``."""

from __future__ import annotations

import torch.nn.functional as F


def weighted_step(model, opt, x, y, w) -> float:
    """One SGD step on the weighted mean of the per-example cross-entropy; returns the loss."""
    loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()
