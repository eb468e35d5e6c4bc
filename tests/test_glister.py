"""Unit tests of GLISTER: gains checked against a real last layer differentiated by torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.glister import glister_greedy, step_sizes

N_TRAIN, N_VAL, C, D = 8, 5, 3, 4
LR = 0.7


class TinyProblem:
    """A last layer ``z = W h + b`` with training and validation examples, float64."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.W = torch.randn(C, D, generator=gen, dtype=torch.float64)
        self.b = torch.randn(C, generator=gen, dtype=torch.float64)
        self.h = torch.randn(N_TRAIN, D, generator=gen, dtype=torch.float64)
        self.y = torch.randint(0, C, (N_TRAIN,), generator=gen)
        self.h_val = torch.randn(N_VAL, D, generator=gen, dtype=torch.float64)
        self.y_val = torch.randint(0, C, (N_VAL,), generator=gen)
        self.train_grads = [self._example_grad(i) for i in range(N_TRAIN)]

    def _example_grad(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        W, b = self.W.clone().requires_grad_(), self.b.clone().requires_grad_()
        loss = F.cross_entropy((self.h[i] @ W.T + b)[None], self.y[i][None], reduction="sum")
        gW, gb = torch.autograd.grad(loss, (W, b))
        return gW, gb

    def inputs(self) -> dict:
        """The summaries a trainer would send, as numpy arrays."""
        z = self.h @ self.W.T + self.b
        errors = torch.softmax(z, dim=1) - F.one_hot(self.y, C).double()
        return dict(
            train_errors=errors.numpy(),
            train_features=self.h.numpy(),
            val_logits=(self.h_val @ self.W.T + self.b).numpy(),
            val_features=self.h_val.numpy(),
            val_labels=self.y_val.numpy(),
        )

    def direct_gains(self, chosen: list[int]) -> np.ndarray:
        """``lr * g_e . grad L_V(theta_S)``: explicit step on the chosen examples, then autograd."""
        W, b = self.W.clone(), self.b.clone()
        for s in chosen:
            W, b = W - LR * self.train_grads[s][0], b - LR * self.train_grads[s][1]
        W.requires_grad_(), b.requires_grad_()
        val_loss = F.cross_entropy(self.h_val @ W.T + b, self.y_val)  # mean over validation
        vW, vb = torch.autograd.grad(val_loss, (W, b))
        return np.array([LR * float((gW * vW).sum() + gb @ vb) for gW, gb in self.train_grads])


def direct_selection(problem: TinyProblem, budget: int, steps) -> tuple[list[int], list[float]]:
    """Reference selection: each step adds the top unchosen direct gains (ties to smaller index)."""
    picks, gains = [], []
    for size in step_sizes(budget, steps):
        gain = problem.direct_gains(picks)
        order = [i for i in np.argsort(-gain, kind="stable") if i not in picks][:size]
        picks += [int(i) for i in order]
        gains += [float(gain[i]) for i in order]
    return picks, gains


@pytest.mark.parametrize("seed", range(4))
def test_pure_greedy_picks_the_argmax_of_direct_gains(seed):
    problem = TinyProblem(seed)
    picks, gains = glister_greedy(**problem.inputs(), n_select=5, lr=LR)
    assert picks.dtype == np.int64 and gains.dtype == np.float64
    for step, pick in enumerate(picks):
        direct = problem.direct_gains(picks[:step].tolist())
        direct[picks[:step]] = -np.inf
        assert pick == int(np.argmax(direct))
        np.testing.assert_allclose(gains[step], direct[pick], rtol=1e-5, atol=1e-12)
    assert len(set(picks.tolist())) == 5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget,steps", [(6, 3), (5, 2), (7, 1)])
def test_several_picks_per_step_match_direct_gains(seed, budget, steps):
    problem = TinyProblem(seed)
    picks, gains = glister_greedy(**problem.inputs(), n_select=budget, lr=LR, steps=steps)
    expected_picks, expected_gains = direct_selection(problem, budget, steps)
    assert picks.tolist() == expected_picks
    np.testing.assert_allclose(gains, expected_gains, rtol=1e-5, atol=1e-12)
    assert len(picks) == budget and len(set(picks.tolist())) == budget


def test_the_choice_follows_the_validation_set():
    # the same training candidates scored against validation sets that differ only in their labels
    problem = TinyProblem(3)
    labels = problem.y_val.clone()
    choices = set()
    for shift in range(C):
        problem.y_val = (labels + shift) % C
        picks, _ = glister_greedy(**problem.inputs(), n_select=3, lr=LR)
        assert picks.tolist() == direct_selection(problem, 3, None)[0]
        choices.add(tuple(picks.tolist()))
    assert len(choices) == C


def test_float32_summaries_give_the_same_selection():
    problem = TinyProblem(11)
    inputs = problem.inputs()
    as32 = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in inputs.items()}
    picks64, gains64 = glister_greedy(**inputs, n_select=4, lr=LR)
    picks32, gains32 = glister_greedy(**as32, n_select=4, lr=LR)
    assert picks32.tolist() == picks64.tolist()
    np.testing.assert_allclose(gains32, gains64, rtol=1e-4, atol=1e-6)


def test_budget_beyond_n_picks_every_candidate_once():
    picks, _ = glister_greedy(**TinyProblem(0).inputs(), n_select=20, lr=LR, steps=3)
    assert sorted(picks.tolist()) == list(range(N_TRAIN))


def test_step_sizes():
    assert step_sizes(10, 3) == [4, 3, 3]
    assert step_sizes(4, None) == [1, 1, 1, 1]
    assert step_sizes(4, 9) == [1, 1, 1, 1]
    assert step_sizes(5, 1) == [5]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(n_select=0), "n_select must be an integer >= 1, got 0"),
        (dict(n_select=2.0), "n_select must be an integer >= 1"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
        (dict(lr=float("nan")), "lr must be a finite number > 0"),
        (dict(val_labels=np.array([0, 1, 2, 3, 0])), r"val_labels must lie in \[0, 3\)"),
        (dict(val_labels=np.zeros(5)), "val_labels must be integers"),
        (dict(val_features=np.zeros((5, 3))), "val_features must have shape"),
        (dict(val_logits=np.zeros((5, 2))), "val_logits must have C = 3 columns"),
        (dict(train_features=np.zeros((7, D))), "train_features must have one row per row"),
        (dict(train_errors=np.full((N_TRAIN, C), np.inf)), "train_errors must be finite"),
    ],
)
def test_bad_inputs_are_rejected(change, message):
    inputs = dict(TinyProblem(0).inputs(), n_select=3, lr=LR)
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        glister_greedy(**inputs)
