"""The classifier layer of any model: where the client taps the last-layer inputs and logits.

The selection works on last-layer gradients (docs/design.md §4): ``find_classifier`` finds the ``nn.Linear``
whose outputs are a model's logits (a user's model or one of ``trainer.builtin.models``), ``last_linear`` the
last linear layer of a feed-forward net.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model that cannot be built or used for selection; the message is one line naming it."""


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
    log.debug("find_classifier: %s, %d classes", kind, n_classes)
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
