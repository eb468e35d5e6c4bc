"""Unit tests of the OMP solver (paper Eq. 1, Algorithm 2): the mathematics, then the edges."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.omp import OMPResult, choose_method, omp_gram, orthogonal_matching_pursuit

METHODS = ("gram", "rows")
EPS64 = np.finfo(np.float64).eps
# random examples each run, no example database written into the working tree
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


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


def least_squares_oracle(rows: np.ndarray, b: np.ndarray, positive: bool) -> np.ndarray:
    """``argmin ||rows^T w - b||`` (``w >= 0`` if positive) by SVD (lstsq) or nnls, rows scaled to unit norm first

    (an independent solver; the scaling keeps it accurate on badly scaled rows, and the solution does not depend
    on it).
    """
    norms = np.linalg.norm(rows, axis=1)
    unit = rows / norms[:, None]
    v = scipy.optimize.nnls(unit.T, b)[0] if positive else np.linalg.lstsq(unit.T, b, rcond=None)[0]
    return v / norms


def hard_problem(kind: str, seed: int, n: int, dim: int, in_span: bool) -> tuple[np.ndarray, np.ndarray]:
    """Candidate rows that defeat a fixed pivot test, and a target inside or outside their span (float64).

    ``rank_deficient``: rank below ``min(n, dim)``; ``near_duplicate``: copies of rows moved by a relative
    ``10^-3 .. 10^-13``; ``badly_scaled``: row norms spread over ``10^-4 .. 10^4``.
    """
    rng = np.random.default_rng(seed)
    if kind == "rank_deficient":
        rank = int(rng.integers(1, min(n, dim)))
        A = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, dim))
    elif kind == "near_duplicate":
        base = rng.standard_normal(((n + 1) // 2, dim))
        copies = base[rng.integers(0, len(base), n - len(base))]
        moved = copies + 10.0 ** -rng.uniform(3, 13, (len(copies), 1)) * rng.standard_normal(copies.shape)
        A = rng.permutation(np.vstack([base, moved]))
    else:
        A = rng.standard_normal((n, dim)) * 10.0 ** rng.uniform(-4, 4, (n, 1))
    b = rng.uniform(0, 1, n) @ A if in_span else rng.standard_normal(dim) * np.linalg.norm(A) / np.sqrt(n)
    return A, b


@st.composite
def hard_problems(draw):
    n, dim = draw(st.integers(2, 24)), draw(st.integers(2, 16))
    A, b = hard_problem(draw(st.sampled_from(["rank_deficient", "near_duplicate", "badly_scaled"])),
                        draw(st.integers(0, 2**32 - 1)), n, dim, draw(st.booleans()))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    return A.astype(dtype), b.astype(dtype), draw(st.integers(1, n))


def check_exact_support(A, b, result: OMPResult, budget: int, positive: bool, from_gram: bool = False) -> None:
    """The properties OMP owes a problem without regulariser, whatever the conditioning of A.

    ``from_gram``: the result of ``omp_gram``, which sees only ``A A^T`` and so solves the normal equations
    (its fit is good to about ``cond(G_SS) * eps``, its error is checked by its own test).
    """
    A64, b64 = np.asarray(A, np.float64), np.asarray(b, np.float64)
    S, w = result.indices, result.weights
    assert len(set(S.tolist())) == len(S) <= budget
    assert (len(S) == budget) == (result.stop_reason == "budget")
    rows = A64[S]
    unit = rows / np.linalg.norm(rows, axis=1)[:, None]  # independence does not depend on the rows' scales
    assert np.linalg.matrix_rank(unit) == len(S)
    if positive:
        assert (w > 0).all()
    if len(S) == 0:
        return
    oracle = least_squares_oracle(rows, b64, positive)
    residual, oracle_residual = b64 - w @ rows, b64 - oracle @ rows
    b_sq = b64 @ b64
    # the weights are the optimum on S: same energy, same fitted vector, same contributions w_i ||A_i||
    fit_tol = 1e-6 + (10 * np.linalg.cond(rows @ rows.T) * EPS64 if from_gram else 0.0)
    assert residual @ residual <= oracle_residual @ oracle_residual + (1e-9 + fit_tol**2) * b_sq
    assert np.linalg.norm((w - oracle) @ rows) <= fit_tol * np.sqrt(b_sq)
    norms = np.linalg.norm(rows, axis=1)
    tol = 1e-7 + 1e2 * np.linalg.cond(unit) ** 2 * EPS64
    np.testing.assert_allclose(w * norms, oracle * norms, rtol=0, atol=tol * np.abs(oracle * norms).max())
    if not from_gram:
        assert result.error == pytest.approx(np.linalg.norm(residual) / np.sqrt(b_sq), rel=1e-9, abs=1e-12)
    if result.stop_reason == "tolerance":  # eps = 0: the residual is zero to the precision of the energies
        energy_tol = 1e3 * np.finfo(A.dtype).eps + 1e2 * np.linalg.cond(rows @ rows.T) * EPS64
        assert residual @ residual <= energy_tol * b_sq


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


@pytest.mark.parametrize("lam", [0.5, 0.0])
@pytest.mark.parametrize("positive", [True, False])
def test_omp_gram_agrees_with_the_gram_method(positive, lam):
    A, b = gradient_like(n=250, dim=40, seed=11)
    expected = orthogonal_matching_pursuit(A, b, 30, lam=lam, positive=positive, method="gram")
    got = omp_gram(A @ A.T, A @ b, float(b @ b), 30, lam=lam, positive=positive)
    assert got.method == "gram" and got.stop_reason == expected.stop_reason and got.n_iter == expected.n_iter
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.weights, expected.weights, rtol=1e-9)
    assert got.error == pytest.approx(expected.error, rel=1e-6)


def test_omp_gram_on_summed_partial_grams_equals_the_whole():
    # class shards hold column blocks of A; their Gram matrices and correlations add up to the whole ones
    A, b = gradient_like(n=200, dim=48, seed=14, dtype=np.float32)
    expected = orthogonal_matching_pursuit(A, b, 25, method="gram")
    blocks = np.split(np.arange(48), [12, 30])
    gram = sum(A[:, k].astype(np.float64) @ A[:, k].T.astype(np.float64) for k in blocks)
    correlation = sum(A[:, k].astype(np.float64) @ b[k].astype(np.float64) for k in blocks)
    got = omp_gram(gram, correlation, float(b.astype(np.float64) @ b), 25)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.weights, expected.weights, rtol=1e-5)  # float32 products vs float64 sums
    np.testing.assert_allclose(got.weights, oracle_weights(A, b, got.indices, 0.5, True), rtol=1e-9)


def test_omp_gram_accepts_float32_and_tensors():
    A, b = gradient_like(n=150, dim=30, seed=15, dtype=np.float32)
    gram, correlation, b_sq = A @ A.T, A @ b, float(b.astype(np.float64) @ b)
    from_numpy = omp_gram(gram, correlation, b_sq, 20)
    from_torch = omp_gram(torch.from_numpy(gram), torch.from_numpy(correlation), b_sq, 20)
    np.testing.assert_array_equal(from_numpy.indices, from_torch.indices)
    np.testing.assert_array_equal(from_numpy.indices, orthogonal_matching_pursuit(A, b, 20, method="gram").indices)
    assert from_numpy.error == pytest.approx(relative_error(A, b, from_numpy), abs=1e-3)  # energy in float32


def test_omp_gram_rejects_bad_input():
    gram, correlation = np.eye(4), np.ones(4)
    with pytest.raises(ValueError, match=r"^gram must be square"):
        omp_gram(np.ones((4, 3)), correlation, 1.0, 2)
    with pytest.raises(ValueError, match=r"^correlation must have shape \(4,\)"):
        omp_gram(gram, np.ones(3), 1.0, 2)
    with pytest.raises(ValueError, match=r"^gram contains 1 non-finite"):
        omp_gram(np.diag([1.0, np.nan, 1.0, 1.0]), correlation, 1.0, 2)
    with pytest.raises(ValueError, match=r"^target_sq_norm must be a finite number >= 0, got -1.0"):
        omp_gram(gram, correlation, -1.0, 2)
    with pytest.raises(ValueError, match=r"^n_select == 5, must be <= n_candidates == 4"):
        omp_gram(gram, correlation, 1.0, 5)


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


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("method", METHODS)
@PROPERTY_SETTINGS
@given(problem=hard_problems())
def test_without_regulariser_the_support_is_independent_and_the_weights_are_optimal(method, positive, problem):
    A, b, budget = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dependent candidates are banned with a warning
        result = orthogonal_matching_pursuit(A, b, budget, lam=0.0, eps=0.0, positive=positive, method=method)
    check_exact_support(A, b, result, budget, positive)


@pytest.mark.parametrize("positive", [True, False])
@PROPERTY_SETTINGS
@given(problem=hard_problems())
def test_omp_gram_residual_energy_matches_the_direct_residual(positive, problem):
    # omp_gram knows A only through A A^T: its error comes from the energy ||b||^2 - ||z||^2 - lam ||w||^2,
    # which a dependent atom accepted by the pivot test drives below zero (read as 0) while the true residual
    # stays large. The energy is a difference of nearly equal terms, good to about cond(G_SS) * eps * ||b||^2.
    A, b, budget = problem
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = omp_gram(A64 @ A64.T, A64 @ b64, float(b64 @ b64), budget, lam=0.0, eps=0.0, positive=positive)
    rows = A64[result.indices]
    cond = np.linalg.cond(rows @ rows.T) if len(rows) else 1.0
    direct = relative_error(A64, b64, result)
    assert result.error**2 == pytest.approx(direct**2, abs=1e-12 + 1e2 * cond * EPS64)
    check_exact_support(A64, b64, result, budget, positive, from_gram=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_budget_above_the_dimension_without_regulariser_stops_at_an_exact_fit(method, positive, dtype):
    # issue 9: 26 atoms came back for a 25-dimensional target, with weights far from least squares
    A, b = gradient_like(n=60, dim=25, seed=12, dtype=dtype)
    result = orthogonal_matching_pursuit(A, b, 30, lam=0.0, eps=0.0, positive=positive, method=method)
    assert len(result.indices) <= 25
    assert result.stop_reason == "tolerance"  # matched to the precision of A's products
    assert result.error < (1e-12 if dtype == np.float64 else 1e-3)
    check_exact_support(A, b, result, 30, positive)


def test_pivot_threshold_follows_the_conditioning_of_the_support():
    # a1, a2 are a near-duplicate pair (distance 0.01); a3 = (a2 - a1) / 0.01 lies in their span, a4 does not.
    # From float32 products a3's pivot comes out 1.7e-4 (not 0): G's rounding, amplified by the coefficients
    # x = Q^{-1} q = (-100, 100) of a3 in the pair. A fixed threshold (64 eps * G_ee) would accept a3.
    from service.omp import _precision
    from service.ridge import Cholesky

    A = np.array([[1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.5]], np.float32)
    G = (A @ A.T).astype(np.float64)
    factor = Cholesky(3, 0.0, _precision(A))
    assert factor.append(G[[0], 0], 1.0) and factor.append(G[[0, 1], 1], 1.0)
    row = np.linalg.solve(np.linalg.cholesky(G[:2, :2]), G[:2, 2])
    assert G[2, 2] - row @ row > 64 * np.finfo(np.float32).eps * G[2, 2]  # what a fixed threshold would accept
    assert not factor.append(G[[0, 1, 2], 2], 1.0)  # dependent: rejected, the factor unchanged
    assert factor.size == 2
    assert factor.append(G[[0, 1, 3], 3], 1.0)  # 0.5 away from the span: accepted
    np.testing.assert_allclose(factor.weights, np.linalg.solve(G[np.ix_([0, 1, 3], [0, 1, 3])], np.ones(3)),
                               rtol=1e-9)


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_target_outside_the_span_ends_early_with_a_warning(method, positive):
    rng = np.random.default_rng(13)
    A = rng.standard_normal((40, 8)) @ rng.standard_normal((8, 20))  # rank 8 in 20 dimensions
    b = rng.uniform(0, 1, 40) @ A + rng.standard_normal(20)  # reachable part + a part outside the span
    with pytest.warns(RuntimeWarning, match="only within rounding"):
        result = orthogonal_matching_pursuit(A, b, 15, lam=0.0, eps=0.0, positive=positive, method=method)
    assert result.stop_reason == "no_positive_correlation"
    assert len(result.indices) == 8
    check_exact_support(A, b, result, 15, positive)
    fit = np.linalg.lstsq(A.T, b, rcond=None)[0] @ A  # the best any weights on A can do
    assert result.error == pytest.approx(np.linalg.norm(b - fit) / np.linalg.norm(b), rel=1e-9)


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


@pytest.mark.parametrize("n_select", [0, -1, 2.5, True, "3", 21])
def test_bad_n_select_is_rejected(n_select):
    with pytest.raises(ValueError, match="n_select"):
        orthogonal_matching_pursuit(gaussian(n=20, dim=5), np.ones(5), n_select)
    if n_select == 21:
        with pytest.raises(ValueError, match=r"^n_select == 21, must be <= n_candidates == 20$"):
            orthogonal_matching_pursuit(gaussian(n=20, dim=5), np.ones(5), n_select)


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
    # narrow rows: the per-pick product with the chosen rows of G (n k^2 / 2) outweighs passes over a cached A
    assert choose_method(5000, 513, 500, 4) == "rows"
    assert choose_method(3000, 510, 300, 4) == "rows"
    assert choose_method(5000, 513, 20, 4) == "rows" and choose_method(500, 513, 250, 4) == "gram"
    A, b = gradient_like(n=50, dim=10)
    assert orthogonal_matching_pursuit(A, b, 5, gram_max_bytes=0).method == "rows"


# ---------------------------------------------------------------------------------------------------
# Devices


def keep_cpu_tensors_as_tensors(monkeypatch):
    """CPU float tensors normally run through numpy views; keep them as tensors to exercise the torch code
    that CUDA tensors take."""
    import service.arrays as arrays_module

    as_array = arrays_module.as_array
    monkeypatch.setattr(arrays_module, "as_array", lambda x, name: torch.as_tensor(as_array(x, name)))


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_torch_path_agrees_with_numpy_path(method, positive, monkeypatch):
    A, b = gradient_like(seed=8)
    expected = orthogonal_matching_pursuit(A, b, 20, positive=positive, method=method)
    keep_cpu_tensors_as_tensors(monkeypatch)
    got = orthogonal_matching_pursuit(A, b, 20, positive=positive, method=method)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.weights, expected.weights, rtol=1e-12)


@pytest.mark.parametrize("knob, value", [("KKT_RTOL", 1e-9), ("KKT_RTOL", -np.inf)])
@pytest.mark.parametrize("method", METHODS)
def test_torch_path_drops_atoms_as_the_numpy_path(method, knob, value, monkeypatch):
    # budget close to dim: atoms leave the support (row deletes), and with KKT_RTOL = -inf nnls rebuilds it
    import service.omp as omp_module

    monkeypatch.setattr(omp_module, knob, value)
    A, b = gradient_like(n=400, dim=30, seed=5)
    expected = orthogonal_matching_pursuit(A, b, 28, method=method)
    assert expected.n_iter > len(expected.indices)
    keep_cpu_tensors_as_tensors(monkeypatch)
    got = orthogonal_matching_pursuit(A, b, 28, method=method)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.weights, expected.weights, rtol=1e-12)
    from_gram = omp_gram(A @ A.T, A @ b, float(b @ b), 28)
    np.testing.assert_array_equal(from_gram.indices, expected.indices)


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
    from_gram = omp_gram(A32 @ A32.T, A32 @ A32.sum(0), float(A32.sum(0).double() @ A32.sum(0).double()), 30)
    assert len(set(from_gram.indices.tolist())) == 30 and (from_gram.weights > 0).all()
