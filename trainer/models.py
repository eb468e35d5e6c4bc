"""Classifier networks by name, and a way to find any classifier's last linear layer.

The selection algorithms work on last-layer gradients (DESIGN.md §4), so every model here ends in an
``nn.Linear`` that :func:`last_linear` finds; it also works for torchvision classifiers built elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from protocol.config import MODELS

LENET_MIN_SIDE = 4


def build_model(name: str, in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """Build an untrained classifier.

    Parameters
    ----------
    name : str
        ``"lenet"``, ``"mlp"`` or ``"resnet18"``.
    in_shape : tuple of int
        ``(C, H, W)`` of one input image.
    n_classes : int
        Number of output logits.

    Returns
    -------
    nn.Module
        Maps a batch (B, C, H, W) to logits (B, n_classes).
    """
    if name not in _BUILDERS:
        raise ValueError(f"model == {name!r}, must be one of {', '.join(MODELS)}")
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape == {tuple(in_shape)}, must be (C, H, W) with positive sizes")
    if n_classes < 1:
        raise ValueError(f"n_classes == {n_classes}, must be >= 1")
    return _BUILDERS[name](tuple(int(s) for s in in_shape), int(n_classes))


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in ``model.modules()`` order: the classifier layer of a feed-forward net.

    Parameters
    ----------
    model : nn.Module
        Any network.

    Returns
    -------
    nn.Linear
        Its last linear layer (``weight`` of shape (n_classes, D)).
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear layer to use as classifier")
    return linears[-1]


class LeNet(nn.Module):
    """LeNet-5 style: conv 6@5x5, max-pool, conv 16@5x5, max-pool, fc 120, fc 84, fc n_classes (ReLU).

    The first convolution keeps the spatial size (padding 2); the second does too when its input is
    smaller than 10 pixels a side, so 8x8 images still leave a feature map. The flatten size comes
    from a dummy forward pass.
    """

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int):
        super().__init__()
        n_chan, height, width = in_shape
        if min(height, width) < LENET_MIN_SIDE:
            raise ValueError(f"in_shape == {in_shape}: lenet needs H and W >= {LENET_MIN_SIDE}")
        pad2 = 0 if min(height, width) // 2 >= 10 else 2
        self.features = nn.Sequential(
            nn.Conv2d(n_chan, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(n_flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n_classes)."""
        return self.classifier(self.features(x))


def _build_lenet(in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    return LeNet(in_shape, n_classes)


def _build_mlp(in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """Flatten, 256, 128, n_classes with ReLU between."""
    n_in = in_shape[0] * in_shape[1] * in_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(n_in, 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, n_classes),
    )


def _build_resnet18(in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """torchvision's ResNet-18, CIFAR-style stem: 3x3 stride-1 conv1 on C channels, no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=n_classes)
    model.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
    model.maxpool = nn.Identity()
    return model


_BUILDERS = {"lenet": _build_lenet, "mlp": _build_mlp, "resnet18": _build_resnet18}
