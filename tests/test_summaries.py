"""Last-layer gradient summaries equal autograd's gradients of the last nn.Linear."""

import pytest
import torch
import torch.nn.functional as F

from trainer.builtin.models import build_model
from trainer.client.layers import last_linear
from trainer.client.summaries import LastLayerTap, batch_summaries, example_gradients, logit_errors


def autograd_rows(model, x, y):
    """Gradient of the mean cross-entropy over (x, y) w.r.t. the last layer, as [bias, weight]."""
    layer = last_linear(model)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([layer.bias.grad, layer.weight.grad.flatten()])


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("lenet", (1, 28, 28)), ("lenet", (3, 32, 32))])
def test_example_gradients_equal_autograd(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10).eval()
    x, y = torch.randn(6, *shape), torch.randint(0, 10, (6,))
    tap = LastLayerTap(model)
    with torch.no_grad():
        logits = model(x)
    rows = example_gradients(logit_errors(logits, y), tap.inputs)
    tap.close()
    for i in range(6):
        torch.testing.assert_close(rows[i], autograd_rows(model, x[i:i + 1], y[i:i + 1]), rtol=1e-4, atol=1e-6)


def test_batch_summaries_equal_autograd_per_batch():
    torch.manual_seed(1)
    model = build_model("mlp", (1, 8, 8), 10)
    model.train()  # must be switched to eval for the pass and restored
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,))
    batches = list(torch.split(torch.randperm(50), 8))  # last batch has 2 examples
    chunks = list(batch_summaries(model, x, y, batches, chunk_rows=3, device=torch.device("cpu")))
    assert model.training
    assert [len(ids) for ids, _, _ in chunks] == [3, 3, 1]
    ids = torch.cat([c[0] for c in chunks])
    rows = torch.cat([c[2] for c in chunks])
    assert ids.tolist() == list(range(len(batches)))
    model.eval()
    for b, batch in enumerate(batches):
        torch.testing.assert_close(rows[b], autograd_rows(model, x[batch], y[batch]), rtol=1e-4, atol=1e-6)


def test_summaries_ignore_dropout_and_batchnorm_updates():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.BatchNorm1d(12),
                                torch.nn.Dropout(0.5), torch.nn.Linear(12, 3))
    x, y = torch.randn(20, 1, 4, 4), torch.randint(0, 3, (20,))
    running = model[2].running_mean.clone()
    batches = list(torch.split(torch.arange(20), 5))
    first = torch.cat([r for _, _, r in batch_summaries(model, x, y, batches, 4, torch.device("cpu"))])
    second = torch.cat([r for _, _, r in batch_summaries(model, x, y, batches, 4, torch.device("cpu"))])
    torch.testing.assert_close(first, second)  # dropout off: deterministic
    torch.testing.assert_close(model[2].running_mean, running)  # eval mode: statistics untouched


def test_example_summaries_are_the_factors_of_autograds_gradients():
    from trainer.client.summaries import example_summaries, validation_view

    torch.manual_seed(3)
    model = build_model("lenet", (1, 28, 28), 10)
    x, y = torch.randn(7, 1, 28, 28), torch.randint(0, 10, (7,))
    chunks = list(example_summaries(model, x, y, chunk_rows=3, device=torch.device("cpu")))
    assert [c[0].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    errors = torch.cat([c[2] for c in chunks])
    features = torch.cat([c[3] for c in chunks])
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    model.eval()
    for i in range(7):
        torch.testing.assert_close(example_gradients(errors[i:i + 1], features[i:i + 1])[0],
                                   autograd_rows(model, x[i:i + 1], y[i:i + 1]), rtol=1e-4, atol=1e-6)
    logits, feats = validation_view(model, x, batch_size=4, device=torch.device("cpu"))
    torch.testing.assert_close(feats, features)
    torch.testing.assert_close(logits, model(x).detach())
