"""Mixed-precision summary passes: the dtype each device gets, inference mode, the flag, and what low precision
does to selection on a planted problem (docs/performance.md has the benchmark on real rounds)."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protocol.config import GradMatchPBSelector, GradMatchSelector, RunConfig
from service.strategies import matching_error, run_omp, select_gradmatch, train_target
from trainer.builtin.models import build_model
from trainer.cli import ConfigError, parse_config
from trainer.client.api import build_config
from trainer.client.summaries import (
    SummarySource, batch_summaries, cpu_flags, example_summaries, needs_pinning, precision_name, summary_dtype,
    summary_mode, to_device,
)
from trainer.data.sources import make_synthetic

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- which dtype, where ------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, device, cpu_bf16, cuda_bf16, expected", [
    ("fp32", CPU, True, True, None),
    ("fp32", CUDA, True, True, None),
    ("bf16", CPU, False, False, torch.bfloat16),
    ("fp16", CUDA, True, True, torch.float16),
    ("auto", CUDA, False, True, torch.bfloat16),   # Ampere and later
    ("auto", CUDA, False, False, torch.float16),   # older GPUs: no bfloat16
    ("auto", CPU, True, False, torch.bfloat16),    # AVX512-BF16 / AMX
    ("auto", CPU, False, True, None),              # emulated bfloat16 is slower than float32
    ("auto", "cuda:1", False, True, torch.bfloat16),
    ("auto", "mps", True, True, None),
])
def test_summary_dtype_per_device(precision, device, cpu_bf16, cuda_bf16, expected):
    assert summary_dtype(precision, device, cpu_bf16=cpu_bf16, cuda_bf16=cuda_bf16) == expected


def test_summary_dtype_refuses_unknown_precision():
    with pytest.raises(ValueError, match="summary_precision == 'half'"):
        summary_dtype("half", CPU)


def test_cpu_flags_read_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 fma\nbugs\t: none\n")
    assert {"avx512_bf16", "fma"} <= cpu_flags(str(info))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_precision_names():
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_summary_mode_is_inference_mode_and_autocast():
    layer = torch.nn.Linear(4, 3)
    with summary_mode(CPU, torch.bfloat16):
        out = layer(torch.randn(2, 4))
        assert torch.is_inference_mode_enabled()
    assert out.dtype == torch.bfloat16 and out.is_inference()
    with summary_mode(CPU, None):
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.float32 and out.is_inference()
    assert not torch.is_inference_mode_enabled()


def test_pinning_only_for_cpu_tensors_bound_for_cuda():
    x = torch.randn(3, 2)
    assert needs_pinning(x, CUDA) and needs_pinning(x, "cuda:1")
    assert not needs_pinning(x, CPU)
    moved = to_device({"a": x, "b": [x, 3]}, CPU, pin=True)  # on the CPU: nothing pinned, nothing copied
    assert moved["a"] is x and moved["b"][0] is x and moved["b"][1] == 3


@needs_cuda
def test_pinned_copy_to_cuda():
    moved = to_device(torch.randn(3, 2), CUDA, pin=True)
    assert moved.device.type == "cuda"
    assert not needs_pinning(torch.randn(2).pin_memory(), CUDA)


# --- the flag ----------------------------------------------------------------------------------------

def test_flag_keyword_and_config_field():
    assert parse_config(["--summary-precision", "bf16"]).schedule.summary_precision == "bf16"
    assert build_config(None, {"summary_precision": "fp32"}).schedule.summary_precision == "fp32"
    assert RunConfig().schedule.summary_precision in ("auto", "fp32", "bf16", "fp16")
    with pytest.raises(ConfigError, match="summary_precision|summary-precision"):
        parse_config(["--summary-precision", "int8"])


def test_source_resolves_its_precision():
    model = build_model("mlp", (1, 8, 8), 10)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    assert SummarySource(model, x, y, CPU, precision="bf16").dtype == torch.bfloat16
    assert SummarySource(model, x, y, CPU, precision="fp32").dtype is None
    chunk = SummarySource(model, x, y, CPU, precision="bf16").example_chunk(0, 8)
    assert chunk["errors"].dtype == np.float32 and chunk["features"].dtype == np.float32


def test_low_precision_summaries_are_float32_without_a_graph():
    torch.manual_seed(0)
    model = build_model("lenet", (1, 28, 28), 10)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    batches = list(torch.split(torch.arange(40), 8))
    (_, _, rows), = batch_summaries(model, x, y, batches, 5, CPU, dtype=torch.bfloat16)
    (_, _, rows32), = batch_summaries(model, x, y, batches, 5, CPU)
    assert rows.dtype == torch.float32 and not rows.requires_grad and model.training
    assert not torch.equal(rows, rows32)  # autocast did run in bfloat16
    assert (rows - rows32).norm() / rows32.norm() < 0.05


# --- what it does to selection: a planted problem ------------------------------------------------------

@functools.lru_cache(maxsize=None)
def planted(n: int = 1600) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = make_synthetic(n, seed=0)
    return torch.from_numpy(xs), torch.from_numpy(ys)


@functools.lru_cache(maxsize=None)
def planted_model(seed: int) -> torch.nn.Module:
    """An MLP trained for two epochs on the planted classes from seed ``seed`` (its own init and order)."""
    x, y = planted()
    torch.manual_seed(seed)
    model = build_model("mlp", tuple(x.shape[1:]), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for ids in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            optimizer.step()
    return model


def pb_selection(model, x, y, batches, dtype, reference_rows=None):
    """GRAD-MATCH-PB's OMP on the summaries made in ``dtype``; its error against the float32 summaries."""
    (_, _, rows), = batch_summaries(model, x, y, batches, len(batches), CPU, dtype=dtype)
    rows = rows.numpy()
    sizes = np.array([len(b) for b in batches])
    config = GradMatchPBSelector()
    result = run_omp(config, rows, train_target(rows, sizes), len(batches) // 10, "cpu")
    truth = rows if reference_rows is None else reference_rows
    error = matching_error(truth, train_target(truth, sizes), result.indices, result.weights)
    return set(result.indices.tolist()), error, rows


def example_selection(model, x, y, dtype):
    (_, labels, errors, features), = example_summaries(model, x, y, len(y), CPU, dtype=dtype)
    ground = SimpleNamespace(labels=labels.numpy(), errors=errors.numpy(), features=features.numpy(), validation=None)
    request = SimpleNamespace(n_select=len(y) // 10, seed=0, round_id=0, n_ground=len(y))
    return ground, select_gradmatch(GradMatchSelector(), request, ground)


def overlap(a: set, b: set) -> float:
    return len(a & b) / len(a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_pb_selection_is_as_good_as_fp32(dtype):
    """Gradient error within 5 % of fp32's (both measured on the fp32 summaries); subsets that overlap fp32's at
    least as much as two fp32 runs from different seeds overlap each other."""
    x, y = planted()
    batches = list(torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).split(16))
    model = planted_model(0)
    fp32, error32, rows32 = pb_selection(model, x, y, batches, None)
    low, error_low, _ = pb_selection(model, x, y, batches, dtype, reference_rows=rows32)
    other, _, _ = pb_selection(planted_model(1), x, y, batches, None)
    assert error_low <= 1.05 * error32, (error_low, error32)
    assert overlap(low, fp32) >= overlap(other, fp32), (overlap(low, fp32), overlap(other, fp32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_example_selection_is_as_good_as_fp32(dtype):
    x, y = planted()
    model = planted_model(0)
    ground32, fp32 = example_selection(model, x, y, None)
    _, low = example_selection(model, x, y, dtype)
    _, other = example_selection(planted_model(1), x, y, None)
    errors = {}
    for name, selection in (("fp32", fp32), ("low", low)):  # both on the fp32 summaries, per class as GRAD-MATCH
        errors[name] = per_class_error(ground32, selection)
    assert errors["low"] <= 1.05 * errors["fp32"], errors
    chosen = lambda s: set(s.indices.tolist())  # noqa: E731
    assert overlap(chosen(low), chosen(fp32)) >= overlap(chosen(other), chosen(fp32))


def per_class_error(ground, selection) -> float:
    """GRAD-MATCH's per-class matching error of ``selection`` on ``ground``'s summaries."""
    from service.strategies import class_rows, residual_sq

    missed = total = 0.0
    for c in np.unique(ground.labels):
        members = np.flatnonzero(ground.labels == c)
        rows = class_rows(ground.errors[members], ground.features[members], int(c))
        target = rows.astype(np.float64).sum(axis=0)
        local = np.flatnonzero(np.isin(members, selection.indices))
        missed += residual_sq(rows, target, local, _weights_of(selection, members[local]))
        total += float(target @ target)
    return float(np.sqrt(missed / total))


def _weights_of(selection, ids) -> np.ndarray:
    where = {int(i): k for k, i in enumerate(selection.indices)}
    return np.array([selection.weights[where[int(i)]] for i in ids])


@needs_cuda
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_cuda_summaries_close_to_fp32(precision):
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10).to(CUDA)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    rows = {}
    for name in ("fp32", precision):
        source = SummarySource(model, x, y, CUDA, precision=name)
        rows[name] = source.batch_chunk(list(torch.arange(64).split(16)), 0)["rows"]
    assert np.linalg.norm(rows[precision] - rows["fp32"]) / np.linalg.norm(rows["fp32"]) < 0.05
