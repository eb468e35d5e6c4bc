"""Classifier networks by name, and a way to find any classifier's last linear layer.

The selection algorithms work on last-layer gradients (docs/design.md §4), so every model here ends in an
``nn.Linear`` that :func:`last_linear` finds; it also works for torchvision classifiers built elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from protocol.config import FACTORY, MODELS


class ModelError(ValueError):
    """A model that cannot be built or used for selection; the message is one line naming it."""

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
    than 3 channels are repeated or averaged to 3 by a fixed first layer (documented in the README).
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


def model_logits(model: nn.Module, inputs, forward: Callable | None = None) -> torch.Tensor:
    """The logits of ``model`` on a batch of ``inputs``: ``forward(model, inputs)`` when given, else
    ``model(**inputs)`` for a dict and ``model(inputs)`` otherwise; an output with ``.logits`` (Hugging Face)
    gives those."""
    if forward is not None:
        output = forward(model, inputs)
    else:
        output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return output if isinstance(output, torch.Tensor) else getattr(output, "logits", output)


def find_classifier(model: nn.Module, n_classes: int, sample=None, last_layer: nn.Linear | str | None = None,
                    forward: Callable | None = None) -> nn.Linear:
    """The ``nn.Linear`` whose outputs are the model's logits.

    The last ``nn.Linear`` with ``out_features == n_classes`` (or the module named by ``last_layer``, a module
    or its dotted name in ``model.named_modules()``). With ``sample``, one forward pass confirms that the
    model's output is that layer's output, shape (B, n_classes).
    """
    kind = type(model).__name__
    if isinstance(last_layer, str):
        layer = dict(model.named_modules()).get(last_layer)
        if layer is None:
            raise ModelError(f"last_layer == {last_layer!r}: {kind} has no module of that name")
    elif last_layer is not None:
        layer = last_layer
    else:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        fits = [m for m in linears if m.out_features == n_classes]
        if not fits:
            found = ", ".join(f"Linear({m.in_features}, {m.out_features})" for m in linears[-3:]) or "no nn.Linear"
            raise ModelError(f"model {kind}: no nn.Linear with out_features == {n_classes} (the number of classes); "
                             f"found {found}; name the classifier layer with last_layer=")
        layer = fits[-1]
    if not isinstance(layer, nn.Linear) or layer.out_features != n_classes:
        raise ModelError(f"last_layer of {kind} is {layer!r}, must be an nn.Linear with out_features == {n_classes}")
    if sample is not None:
        _confirm(model, layer, sample, kind, forward)
    return layer


@torch.no_grad()
def _confirm(model: nn.Module, layer: nn.Linear, sample, kind: str, forward: Callable | None = None) -> None:
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, output: seen.setdefault("out", output))
    was_training = model.training
    model.eval()
    try:
        output = model_logits(model, sample, forward)
    finally:
        handle.remove()
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[1] != layer.out_features:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(f"model {kind} returns {shape}, must return logits of shape (B, {layer.out_features})")
    if "out" not in seen or not torch.equal(seen["out"], output):
        raise ModelError(f"model {kind}: its output is not the output of its classifier layer {layer}; "
                         "the selection needs logits z = W h + b of a final nn.Linear (name it with last_layer=)")


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
