"""Unit tests of the OMP solver (paper Eq. 1, Algorithm 2): the mathematics, then the edges."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.optimize
import torch

from service.omp import OMPResult, choose_method, orthogonal_matching_pursuit

METHODS = ("gram", "rows")


def gaussian(n=300, dim=64, seed=0, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(dtype)


def gradient_like(n=200, dim=48, seed=0, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a shared positive direction, target = their sum (as a training gradient)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, dim)) + 0.5 * rng.standard_normal(dim)
    return rows.astype(dtype), rows.sum(axis=0).astype(dtype)


def oracle_weights(A, b, indices, lam, positive) -> np.ndarray:
    """Independent re-solve on the support: NNLS on ``[A_S^T; sqrt(lam) I] w = [b; 0]``, or ridge."""
    rows, b64 = np.asarray(A, dtype=np.float64)[indices], np.asarray(b, dtype=np.float64)
    if not positive:  # plain ridge: (A_S A_S^T + lam I) w = A_S b
        return np.linalg.solve(rows @ rows.T + lam * np.eye(len(indices)), rows @ b64)
    matrix = np.vstack([rows.T, np.sqrt(lam) * np.eye(len(indices))])
    return scipy.optimize.nnls(matrix, np.concatenate([b64, np.zeros(len(indices))]))[0]


def relative_error(A, b, result: OMPResult) -> float:
    A64, b64 = np.asarray(A, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(result.weights @ A64[result.indices] - b64) / np.linalg.norm(b64))


def regularised_energy(A, b, result: OMPResult, lam: float) -> float:
    A64, b64 = np.asarray(A, np.float64), np.asarray(b, np.float64)
    residual = result.weights @ A64[result.indices] - b64
    return float(residual @ residual + lam * result.weights @ result.weights)


# ---------------------------------------------------------------------------------------------------
# The mathematics


@pytest.mark.parametrize("method", METHODS)
def test_planted_sparse_combination_is_recovered(method):
    A = gaussian()
    b = 3 * A[7] + 2 * A[42] + A[100]
    exact = orthogonal_matching_pursuit(A, b, 3, lam=1e-6, method=method)
    assert set(exact.indices.tolist()) == {7, 42, 100}
    by_index = dict(zip(exact.indices.tolist(), exact.weights))
    np.testing.assert_allclose([by_index[7], by_index[42], by_index[100]], [3, 2, 1], rtol=1e-5)
    assert exact.error < 1e-6
    # a larger budget stops on the tolerance once the planted atoms are found
    early = orthogonal_matching_pursuit(A, b, 20, lam=1e-6, eps=1e-3, method=method)
    assert early.stop_reason == "tolerance"
    assert set(early.indices.tolist()) == {7, 42, 100}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_weights_are_the_exact_optimum_on_the_support(method, positive, dtype):
    A, b = gradient_like(dtype=dtype)
    result = orthogonal_matching_pursuit(A, b, 25, lam=0.5, positive=positive, method=method)
    expected = oracle_weights(A, b, result.indices, 0.5, positive)
    np.testing.assert_allclose(result.weights, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    if positive:
        assert (result.weights > 0).all()


@pytest.mark.parametrize("positive", [True, False])
def test_gram_and_rows_methods_agree(positive):
    A, b = gradient_like(n=250, dim=40, seed=1)
    gram = orthogonal_matching_pursuit(A, b, 30, positive=positive, method="gram")
    rows = orthogonal_matching_pursuit(A, b, 30, positive=positive, method="rows")
    assert (gram.method, rows.method) == ("gram", "rows")
    np.testing.assert_array_equal(gram.indices, rows.indices)
    np.testing.assert_allclose(gram.weights, rows.weights, rtol=1e-12)
    assert gram.stop_reason == rows.stop_reason


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_inputs_agree(dtype):
    A, b = gradient_like(seed=2, dtype=dtype)
    from_numpy = orthogonal_matching_pursuit(A, b, 20)
    from_torch = orthogonal_matching_pursuit(torch.from_numpy(A), torch.from_numpy(b), 20)
    np.testing.assert_array_equal(from_numpy.indices, from_torch.indices)
    np.testing.assert_allclose(from_numpy.weights, from_torch.weights, rtol=1e-12)
    assert from_numpy.error == pytest.approx(from_torch.error, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_selection_is_unique_within_budget_and_fills_it(method):
    A, b = gradient_like(seed=3)
    result = orthogonal_matching_pursuit(A, b, 30, method=method)
    assert result.indices.dtype == np.int64 and result.weights.dtype == np.float64
    assert len(set(result.indices.tolist())) == len(result.indices) == 30
    assert result.stop_reason == "budget"
    assert result.n_iter >= 30
    assert 0 <= result.indices.min() and result.indices.max() < A.shape[0]


@pytest.mark.parametrize("method", METHODS)
def test_error_matches_direct_recomputation(method):
    A, b = gradient_like(seed=4, dtype=np.float32)
    result = orthogonal_matching_pursuit(A, b, 15, method=method)
    assert 0 < result.error < 1
    assert result.error == pytest.approx(relative_error(A, b, result), rel=1e-10)


def test_nonnegative_solve_bans_a_redundant_first_pick():
    # Atom 2 correlates most with b and is picked first; once atoms 0 and 1 are in, matching b would
    # need a negative weight on atom 2, so the non-negative solve zeroes it and it is banned.
    A = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.6, 0.5]])
    b = np.array([1.0, 1.0, -0.3])
    for method in METHODS:
        result = orthogonal_matching_pursuit(A, b, 3, lam=1e-6, method=method)
        assert sorted(result.indices.tolist()) == [0, 1]
        assert (result.weights > 0).all()
        assert result.n_iter == 3  # atom 2 was picked, then left the support
        assert result.stop_reason == "exhausted"  # atom 2 is never picked again
        np.testing.assert_allclose(result.weights, [1, 1], rtol=1e-5)


def test_dropped_atoms_keep_the_support_full_and_positive():
    # budget close to dim: many picks push earlier atoms to zero weight
    A, b = gradient_like(n=400, dim=30, seed=5)
    result = orthogonal_matching_pursuit(A, b, 28)
    assert result.n_iter > len(result.indices)  # some atoms were dropped on the way
    assert (result.weights > 0).all()
    assert len(set(result.indices.tolist())) == len(result.indices)
    np.testing.assert_allclose(result.weights, oracle_weights(A, b, result.indices, 0.5, True), rtol=1e-8)


@pytest.mark.parametrize("knob, value", [("REFINE_STEPS", 0), ("KKT_RTOL", -np.inf)])
def test_fallback_solves_give_the_same_answer(knob, value, monkeypatch):
    # REFINE_STEPS = 0: the final weights come from the direct float64 solve instead of refinement.
    # KKT_RTOL = -inf: every non-negative solve in the loop is decided by nnls, not the warm start.
    import service.omp as omp_module

    A, b = gradient_like(n=400, dim=30, seed=5, dtype=np.float32)
    expected = orthogonal_matching_pursuit(A, b, 28)
    monkeypatch.setattr(omp_module, knob, value)
    got = orthogonal_matching_pursuit(A, b, 28)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.weights, expected.weights, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_error_does_not_grow_with_budget(seed):
    A, b = gradient_like(n=120, dim=40, seed=seed)
    lam = 0.5
    results = [orthogonal_matching_pursuit(A, b, k, lam=lam) for k in (1, 2, 4, 8, 16, 32)]
    energies = [regularised_energy(A, b, r, lam) for r in results]
    errors = [r.error for r in results]
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(energies, energies[1:]))
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(errors, errors[1:]))


# ---------------------------------------------------------------------------------------------------
# Degenerate input


@pytest.mark.parametrize("method", METHODS)
def test_duplicate_rows_give_unique_indices(method):
    A, b = gradient_like(n=60, dim=20, seed=6)
    doubled = np.vstack([A, A])
    result = orthogonal_matching_pursuit(doubled, b, 40, method=method)
    assert len(set(result.indices.tolist())) == len(result.indices)
    np.testing.assert_allclose(result.weights, oracle_weights(doubled, b, result.indices, 0.5, True), rtol=1e-8)


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_linearly_dependent_rows_without_regulariser_are_banned_with_a_warning(method, positive):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((3, 6))
    A = np.vstack([base, 0.3 * base[0] + 0.7 * base[1], base[2] - base[0], base])  # rank 3
    b = rng.standard_normal(6)  # outside the span: the residual never vanishes
    with pytest.warns(RuntimeWarning, match="linearly dependent"):
        result = orthogonal_matching_pursuit(A, b, A.shape[0], lam=0.0, positive=positive, method=method)
    assert len(set(result.indices.tolist())) == len(result.indices) <= 3
    assert np.linalg.matrix_rank(A[result.indices]) == len(result.indices)
    assert np.isfinite(result.weights).all()
    assert result.error == pytest.approx(relative_error(A, b, result), rel=1e-10)


def test_zero_target_warns_and_returns_empty():
    A = gaussian(n=20, dim=5)
    with pytest.warns(RuntimeWarning, match="target is zero"):
        result = orthogonal_matching_pursuit(A, np.zeros(5), 3)
    assert result.indices.size == 0 and result.weights.size == 0
    assert result.error == 0.0 and result.n_iter == 0


def test_no_positive_correlation_stops_early():
    A = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    result = orthogonal_matching_pursuit(A, np.array([-2.0, -1.0]), 3, lam=0.0)  # -e2 is unreachable
    assert result.stop_reason == "no_positive_correlation"
    assert result.indices.tolist() == [2]
    np.testing.assert_allclose(result.weights, [2.0])


# ---------------------------------------------------------------------------------------------------
# Validation


def test_nan_in_gradients_is_rejected_naming_the_array():
    A = gaussian(n=20, dim=5)
    A[3, 1] = np.nan
    A[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"A contains 2 non-finite values"):
        orthogonal_matching_pursuit(A, np.ones(5), 3)
    with pytest.raises(ValueError, match=r"^b contains 1 non-finite"):
        orthogonal_matching_pursuit(gaussian(n=20, dim=5), np.array([1, 2, np.nan, 0, 1.0]), 3)


@pytest.mark.parametrize("budget", [0, -1, 2.5, True, "3", 21])
def test_bad_budget_is_rejected(budget):
    with pytest.raises(ValueError, match="budget"):
        orthogonal_matching_pursuit(gaussian(n=20, dim=5), np.ones(5), budget)


@pytest.mark.parametrize("name, value", [("lam", -0.1), ("lam", float("nan")), ("eps", -1.0), ("eps", None)])
def test_bad_lam_or_eps_is_rejected(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        orthogonal_matching_pursuit(gaussian(n=20, dim=5), np.ones(5), 3, **{name: value})


def test_bad_shapes_and_method_are_rejected():
    A = gaussian(n=20, dim=5)
    with pytest.raises(ValueError, match=r"^A must be 2-D"):
        orthogonal_matching_pursuit(A[0], np.ones(5), 1)
    with pytest.raises(ValueError, match=r"^b must have shape \(dim,\) = \(5,\)"):
        orthogonal_matching_pursuit(A, np.ones(4), 1)
    with pytest.raises(ValueError, match="method must be one of"):
        orthogonal_matching_pursuit(A, np.ones(5), 1, method="fast")
    with pytest.raises(ValueError, match="gram_max_bytes"):
        orthogonal_matching_pursuit(A, np.ones(5), 1, method="gram", gram_max_bytes=100)


def test_cost_model_prefers_gram_for_small_ground_sets_and_respects_memory():
    assert choose_method(2500, 5130, 250, 4) == "gram"
    assert choose_method(100_000, 512, 100, 4) == "rows"  # n >> budget: one pass per pick is cheaper
    assert choose_method(2500, 5130, 250, 4, gram_max_bytes=2500 * 2500 * 4 - 1) == "rows"
    A, b = gradient_like(n=50, dim=10)
    assert orthogonal_matching_pursuit(A, b, 5, gram_max_bytes=0).method == "rows"


# ---------------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_torch_path_agrees_with_numpy_path(method, positive, monkeypatch):
    # CPU float tensors normally run through numpy views; keep them as tensors to exercise the torch
    # code that CUDA tensors take.
    import service.omp as omp_module

    as_array = omp_module._as_array
    A, b = gradient_like(seed=8)
    expected = orthogonal_matching_pursuit(A, b, 20, positive=positive, method=method)
    monkeypatch.setattr(omp_module, "_as_array", lambda x, name: torch.as_tensor(as_array(x, name)))
    got = orthogonal_matching_pursuit(A, b, 20, positive=positive, method=method)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.weights, expected.weights, rtol=1e-12)


def test_half_precision_tensors_are_kept_in_their_dtype():
    A, b = gradient_like(seed=9)
    result = orthogonal_matching_pursuit(torch.from_numpy(A).to(torch.bfloat16), torch.from_numpy(b), 20)
    assert len(set(result.indices.tolist())) == 20 and (result.weights > 0).all()
    assert result.error < 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_tensors_agree_with_cpu(method):
    A, b = gradient_like(n=300, dim=64, seed=7)
    on_cpu = orthogonal_matching_pursuit(A, b, 30, method=method)
    on_gpu = orthogonal_matching_pursuit(torch.from_numpy(A).cuda(), torch.from_numpy(b).cuda(), 30, method=method)
    np.testing.assert_array_equal(on_cpu.indices, on_gpu.indices)
    np.testing.assert_allclose(on_cpu.weights, on_gpu.weights, rtol=1e-10)
    A32 = torch.from_numpy(A.astype(np.float32)).cuda()
    result = orthogonal_matching_pursuit(A32, A32.sum(0), 30, method=method)
    assert len(set(result.indices.tolist())) == 30 and (result.weights > 0).all()
    np.testing.assert_allclose(
        result.weights, oracle_weights(A32.cpu().numpy(), A32.sum(0).cpu().numpy(), result.indices, 0.5, True),
        rtol=1e-8,
    )
