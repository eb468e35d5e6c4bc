"""Models: logits of the right shape for every data set's input, and the classifier layer found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.builtin.models import build_model
from trainer.client.layers import last_linear

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def _logits(model: nn.Module, in_shape, n_batch: int = 2) -> torch.Tensor:
    x = torch.randn(n_batch, *in_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("in_shape", SHAPES)
@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_small_models_give_logits(name, in_shape):
    model = build_model(name, in_shape, n_classes=7)
    logits = _logits(model, in_shape, n_batch=3)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("in_shape", [(3, 32, 32), (1, 8, 8)])
def test_resnet18_gives_logits_with_cifar_stem(in_shape):
    model = build_model("resnet18", in_shape, n_classes=10)
    assert _logits(model, in_shape).shape == (2, 10)
    assert model.conv1.in_channels == in_shape[0]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_lenet_layers():
    model = build_model("lenet", (1, 28, 28), n_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]


def test_mlp_layers():
    model = build_model("mlp", (3, 32, 32), n_classes=5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 256), (256, 128), (128, 5)]


@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_last_linear_is_the_classifier(name):
    model = build_model(name, (1, 8, 8), n_classes=4)
    layer = last_linear(model)
    assert layer.out_features == 4
    hidden = {}
    layer.register_forward_hook(lambda m, inp, out: hidden.update(out=out))
    logits = _logits(model, (1, 8, 8))
    assert torch.equal(hidden["out"], logits)  # its output is the model's output


def test_last_linear_of_resnet18_is_fc():
    model = build_model("resnet18", (3, 32, 32), n_classes=10)
    assert last_linear(model) is model.fc


def test_last_linear_without_linear_raises():
    with pytest.raises(ValueError, match="Sequential has no nn.Linear"):
        last_linear(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="'vgg'.*lenet, mlp, resnet18"):
        build_model("vgg", (1, 28, 28), 10)


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match=r"in_shape == \(28, 28\)"):
        build_model("mlp", (28, 28), 10)
    with pytest.raises(ValueError, match="lenet needs H and W >= 4"):
        build_model("lenet", (1, 3, 3), 10)


def test_torchvision_models_by_name_on_small_inputs():
    """Any torchvision classifier by name; 1-channel 28x28 inputs go through a fixed channel repeat."""
    from trainer.client.layers import find_classifier

    model = build_model("mobilenet_v3_small", (1, 28, 28), 10)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    assert model(x).shape == (2, 10)
    layer = find_classifier(model, 10, x)
    assert layer.out_features == 10 and layer is last_linear(model)


def test_model_factory_and_its_errors(tmp_path, monkeypatch):
    from trainer.builtin.models import check_model_name
    from trainer.client.layers import ModelError

    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def small(in_shape, n_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], n_classes))\n"
        "def broken(in_shape, n_classes):\n"
        "    return 'not a module'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mynets:small", (1, 8, 8), 10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ModelError, match=r"--model 'mynets:broken': returned str, must return a torch.nn.Module"):
        build_model("mynets:broken", (1, 8, 8), 10)
    with pytest.raises(ModelError, match=r"mynets has no callable 'absent'"):
        check_model_name("mynets:absent")
    with pytest.raises(ModelError, match=r"not a torchvision classification model"):
        check_model_name("resnet_9000")
