"""Classifier networks by name: LeNet, an MLP, a CIFAR-style ResNet-18, torchvision's, or a factory.

The selection algorithms work on last-layer gradients (docs/design.md §4), so every model here ends in an
``nn.Linear`` that ``trainer.client.layers.last_linear`` finds.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from protocol.config import FACTORY, MODELS
from trainer.client.layers import ModelError

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
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape == {tuple(in_shape)}, must be (C, H, W) with positive sizes")
    if n_classes < 1:
        raise ValueError(f"n_classes == {n_classes}, must be >= 1")
    in_shape, n_classes = tuple(int(s) for s in in_shape), int(n_classes)
    if name in _BUILDERS:
        return _BUILDERS[name](in_shape, n_classes)
    if FACTORY.match(name):
        return _from_factory(name, in_shape, n_classes)
    return _from_torchvision(name, in_shape, n_classes)


def check_model_name(name: str) -> None:
    """Fail early (before Ray starts) on a model name that cannot be built: unknown or not importable."""
    if name in _BUILDERS:
        return
    if FACTORY.match(name):
        _import_factory(name)
        return
    from torchvision.models import list_models
    import torchvision.models as tvm

    if name not in list_models(module=tvm):
        raise ModelError(f"--model {name!r}: not one of {', '.join(MODELS)}, not a torchvision classification model "
                         f"(torchvision.models.list_models()), and not package.module:function")


def _import_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of user code is reported in one line
        raise ModelError(f"--model {spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ModelError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    return function


def _from_factory(spec: str, in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """``package.module:function``, called as ``function(in_shape, n_classes)``, must return an ``nn.Module``."""
    model = _import_factory(spec)(in_shape, n_classes)
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec!r}: returned {type(model).__name__}, must return a torch.nn.Module")
    return model


def _from_torchvision(name: str, in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """A torchvision classification model, untrained, with ``n_classes`` outputs.

    torchvision's ImageNet models downsample by 32; small inputs (28x28, 32x32) still work because every
    classification model ends in adaptive pooling, though with a 1x1 final feature map. Inputs with other
    than 3 channels are repeated or averaged to 3 by a fixed first layer (documented in docs/guide.md).
    """
    check_model_name(name)
    from torchvision.models import get_model

    model = get_model(name, weights=None, num_classes=n_classes)
    if in_shape[0] != 3:
        model = nn.Sequential(_ToRGB(in_shape[0]), model)
    return model


class _ToRGB(nn.Module):
    """Maps C input channels to the 3 a torchvision model expects: repeat one channel, average others."""

    def __init__(self, n_channels: int):
        super().__init__()
        self.n_channels = n_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_channels == 1:
            return x.expand(-1, 3, -1, -1)
        return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


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
