"""Last-layer gradient summaries, computed without autograd (docs/design.md §4).

For cross-entropy on logits ``z = W h + b`` the gradient of one example's loss is
``g_b = softmax(z) - onehot(y)`` for the bias and ``g_b ⊗ h`` for ``W``. A row of a summary is laid out
as ``[g_b (C), (g_b ⊗ h) flattened row-major (C*D)]``, the order of ``cat([bias.grad, weight.grad.flatten()])``.

The forward passes run under ``torch.inference_mode`` and, with a low ``summary_precision``, under
``torch.autocast`` (bfloat16 or float16); the errors and features are taken to float32 before anything is
accumulated (``summary_dtype`` picks the dtype, docs/performance.md measures what it does to selection).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from trainer.client.layers import last_linear, model_logits

Fetch = Callable[[torch.Tensor], object]  # example ids (n,) -> inputs of those examples: (n, ...), a dict, a tuple
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # ScheduleConfig.summary_precision
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of a CPU that computes bfloat16 natively


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16); without it autocast to
    bfloat16 emulates and is slower than float32."""
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def summary_dtype(precision: str, device: torch.device | str, cpu_bf16: bool | None = None,
                  cuda_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of the summary passes on ``device``; None: float32, no autocast.

    ``fp32``: None. ``bf16`` / ``fp16``: that dtype. ``auto``: on CUDA bfloat16 where the GPU supports it, else
    float16; on the CPU bfloat16 where it computes bfloat16 natively (``cpu_has_bf16``), else float32;
    elsewhere float32. ``cpu_bf16`` and ``cuda_bf16`` stand in for the hardware checks (tests).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"summary_precision == {precision!r}, must be one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision in LOW_DTYPES:
        return LOW_DTYPES[precision]
    if precision == "fp32":
        return None
    if kind == "cuda":
        bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return torch.bfloat16 if bf16 else torch.float16
    if kind == "cpu":
        return torch.bfloat16 if (cpu_has_bf16() if cpu_bf16 is None else cpu_bf16) else None
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what a ``summary_dtype`` answer is called in records."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def summary_mode(device: torch.device | str, dtype: torch.dtype | None):
    """The context of a summary forward pass: inference mode, and autocast to ``dtype`` unless it is None."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if dtype is not None:
        stack.enter_context(torch.autocast(torch.device(device).type, dtype=dtype))
    return stack


def to_device(batch, device: torch.device, pin: bool = False):
    """A batch (a tensor, or dicts, lists and tuples of them) on ``device``; anything else as it is.

    ``pin``: a CPU tensor bound for a GPU goes through pinned memory (``needs_pinning``), so that its copy is
    asynchronous (the summary passes)."""
    if isinstance(batch, torch.Tensor):
        if pin and needs_pinning(batch, device):
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, pin) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device, pin) for value in batch)
    return batch


def needs_pinning(tensor: torch.Tensor, device: torch.device | str) -> bool:
    """Whether ``tensor`` should be pinned before its copy to ``device``: a CPU tensor, not pinned yet, for CUDA."""
    return torch.device(device).type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned()


def as_fetch(inputs) -> Fetch:
    """A tensor of inputs, or already a function of example ids, as a function of example ids."""
    return inputs if callable(inputs) else (lambda ids: inputs[ids])


class LastLayerTap:
    """Captures the input of the model's classifier layer (its last ``nn.Linear`` unless named) on every forward."""

    def __init__(self, model: nn.Module, layer: nn.Linear | None = None):
        self.layer = layer if layer is not None else last_linear(model)
        self.inputs: torch.Tensor | None = None
        self._handle = self.layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.inputs = args[0].detach()

    def close(self) -> None:
        self._handle.remove()


def logit_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``softmax(z) - onehot(y)``: (B, C) float32, the bias gradient of each example."""
    errors = torch.softmax(logits.float(), dim=1)
    errors[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
    return errors


def example_gradients(errors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per-example last-layer gradients: (B, C) errors and (B, D) features -> (B, C + C*D)."""
    outer = errors.unsqueeze(2) * features.float().unsqueeze(1)  # (B, C, D)
    return torch.cat([errors, outer.flatten(1)], dim=1)


def batch_gradients(errors: torch.Tensor, features: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean last-layer gradient of each mini-batch.

    errors : (nb, Bmax, C) with zero rows as padding; features : (nb, Bmax, D); sizes : (nb,).
    Returns (nb, C + C*D): the gradient of each batch's mean loss.
    """
    scale = 1.0 / sizes.to(errors.dtype).unsqueeze(1)
    bias = errors.sum(dim=1) * scale
    weight = torch.bmm(errors.transpose(1, 2), features.float()).flatten(1) * scale
    return torch.cat([bias, weight], dim=1)


def forward_tapped(model: nn.Module, tap: LastLayerTap, x, dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the classifier's inputs of ``x``, in inference mode (autocast to ``dtype`` unless None):
    as autocast left them, the callers take them to float32."""
    with summary_mode(tap.layer.weight.device, dtype):
        logits = model_logits(model, x)
        return logits, tap.inputs


@torch.no_grad()
def batch_summaries(
    model: nn.Module,
    x,
    y: torch.Tensor,
    batches: list[torch.Tensor],
    chunk_rows: int,
    device: torch.device,
    layer: nn.Linear | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch_ids, labels, rows)`` chunks of per-batch gradient summaries.

    ``x`` is the inputs (n, ...) or a function of example ids returning them; ``y`` the (n,) labels. The model
    runs in eval mode (no dropout, running batch-norm statistics) on un-augmented data; ``chunk_rows`` batches
    are forwarded together, under autocast to ``dtype`` unless it is None (float32). Labels are the batch's
    majority class.
    """
    fetch = as_fetch(x)
    with _EvalTap(model, layer) as tap:
        for start in range(0, len(batches), chunk_rows):
            group = batches[start:start + chunk_rows]
            ids = torch.arange(start, start + len(group))
            yield ids, _majority_labels(y, group), _group_rows(model, tap, fetch, y, group, device, dtype).cpu()


@torch.inference_mode()
def _group_rows(model, tap, fetch: Fetch, y, group: list[torch.Tensor], device, dtype=None) -> torch.Tensor:
    sizes = torch.tensor([len(b) for b in group])
    width = int(sizes.max())
    flat = torch.cat(group)
    logits, features = forward_tapped(model, tap, to_device(fetch(flat), device, pin=True), dtype)
    errors = logit_errors(logits, y[flat].to(device))
    features = features.float()
    slot = torch.cat([torch.arange(len(b)) + i * width for i, b in enumerate(group)]).to(device)
    padded_e = errors.new_zeros(len(group) * width, errors.shape[1]).index_copy_(0, slot, errors)
    padded_h = features.new_zeros(len(group) * width, features.shape[1]).index_copy_(0, slot, features)
    return batch_gradients(
        padded_e.view(len(group), width, -1), padded_h.view(len(group), width, -1), sizes.to(device)
    )


def _majority_labels(y: torch.Tensor, group: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.mode(y[b]).values for b in group])


@torch.no_grad()
def example_summaries(
    model: nn.Module, x, y: torch.Tensor, chunk_rows: int, device: torch.device, layer: nn.Linear | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(example_ids, labels, errors (n, C), features (n, D))`` chunks over all ``len(y)`` examples.

    ``x`` is the inputs or a function of example ids returning them. Per-example gradients stay factored
    (``errors ⊗ [1, features]``): C + D numbers per example instead of C * (D + 1). Eval mode, no augmentation,
    no autograd; autocast to ``dtype`` unless it is None, errors and features in float32.
    """
    fetch, n = as_fetch(x), int(y.shape[0])
    with _EvalTap(model, layer) as tap:
        for start in range(0, n, chunk_rows):
            ids = torch.arange(start, min(start + chunk_rows, n))
            errors, features = _example_rows(model, tap, to_device(fetch(ids), device, pin=True), y[ids].to(device),
                                             dtype)
            yield ids, y[ids].cpu(), errors.cpu(), features.cpu()


@torch.inference_mode()
def _example_rows(model, tap, x, y, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    logits, features = forward_tapped(model, tap, x, dtype)
    return logit_errors(logits, y), features.float()


@torch.no_grad()
def validation_view(model: nn.Module, x, batch_size: int, device: torch.device, n: int | None = None,
                    layer: nn.Linear | None = None, dtype: torch.dtype | None = None):
    """The validation set as the last layer sees it: ``(logits (m, C), features (m, D))`` on the CPU.

    ``x`` is the (m, ...) inputs, or a function of example ids returning them with ``n = m`` given.
    """
    fetch, n = as_fetch(x), (x.shape[0] if n is None else n)
    logits, features = [], []
    with _EvalTap(model, layer) as tap:
        for start in range(0, n, batch_size):
            ids = torch.arange(start, min(start + batch_size, n))
            z, h = forward_tapped(model, tap, to_device(fetch(ids), device, pin=True), dtype)
            logits.append(z.float().cpu())
            features.append(h.float().cpu())
    return torch.cat(logits), torch.cat(features)


class SummarySource:
    """What a summary pass reads: the model (and its classifier layer), and the examples by id.

    Parameters
    ----------
    model : nn.Module
        The model being trained; summaries are computed from its current weights in eval mode.
    train_inputs : tensor (n, ...) or callable
        The training inputs without augmentation, or a function of example ids returning them.
    train_labels : (n,) int64 tensor
    device : torch.device
        Where the model computes.
    val_inputs, val_labels : optional
        The validation set, for strategies that match its gradient.
    layer : nn.Linear, optional
        The classifier layer (default: the model's last ``nn.Linear``).
    precision : str
        ``summary_precision``: auto, fp32, bf16 or fp16 (``summary_dtype`` resolves it for ``device``).
    """

    def __init__(self, model, train_inputs, train_labels, device, val_inputs=None, val_labels=None, layer=None,
                 val_batch: int = 1024, precision: str = "fp32"):
        self.model, self.train_inputs, self.train_labels, self.device = model, train_inputs, train_labels, device
        self.val_inputs, self.val_labels, self.layer, self.val_batch = val_inputs, val_labels, layer, val_batch
        self.precision, self.dtype = precision, summary_dtype(precision, device)

    def batch_chunk(self, group: list[torch.Tensor], start: int) -> dict:
        """The chunk of mini-batches ``start .. start + len(group) - 1`` (their example ids in ``group``)."""
        (ids, labels, rows), = batch_summaries(self.model, self.train_inputs, self.train_labels, group, len(group),
                                               self.device, self.layer, self.dtype)
        return {"ids": (ids + start).numpy(), "labels": labels.cpu().numpy(), "rows": rows.numpy()}

    def example_chunk(self, start: int, stop: int, ids: torch.Tensor | None = None) -> dict:
        """The chunk of ground elements ``start .. stop - 1``: the examples of those ids, or, for a pool,
        the examples ``ids`` (one per element)."""
        fetch, y = as_fetch(self.train_inputs), self.train_labels
        examples = torch.arange(start, stop) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        (_, labels, errors, features), = example_summaries(self.model, lambda local: fetch(examples[local]),
                                                           y[examples], stop - start, self.device, self.layer,
                                                           self.dtype)
        return {"ids": np.arange(start, stop, dtype=np.int64), "labels": labels.numpy(), "errors": errors.numpy(),
                "features": features.numpy()}

    def batch_chunks(self, batches: list[torch.Tensor], chunk_rows: int) -> Iterator[dict]:
        for start in range(0, len(batches), chunk_rows):
            yield self.batch_chunk(batches[start:start + chunk_rows], start)

    def example_chunks(self, chunk_rows: int, ids: torch.Tensor | None = None) -> Iterator[dict]:
        """All the examples in chunks, or those of ``ids`` (a pool), numbered 0 .. len(ids) - 1."""
        n = int(self.train_labels.shape[0]) if ids is None else len(ids)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            yield self.example_chunk(start, stop, None if ids is None else ids[start:stop])

    def validation(self) -> dict:
        if self.val_labels is None or len(self.val_labels) == 0:
            raise ValueError("the strategy matches the validation gradient, but no validation set was given")
        logits, features = validation_view(self.model, self.val_inputs, self.val_batch, self.device,
                                           n=int(self.val_labels.shape[0]), layer=self.layer, dtype=self.dtype)
        return {"logits": logits.numpy(), "features": features.numpy(), "labels": self.val_labels.cpu().numpy()}


class _EvalTap:
    """Context: the model in eval mode with a tap on its classifier layer; restores the mode afterwards."""

    def __init__(self, model: nn.Module, layer: nn.Linear | None = None):
        self.model, self.layer = model, layer

    def __enter__(self) -> LastLayerTap:
        self.was_training = self.model.training
        self.model.eval()
        self.tap = LastLayerTap(self.model, self.layer)
        return self.tap

    def __exit__(self, *exc) -> None:
        self.tap.close()
        self.model.train(self.was_training)
