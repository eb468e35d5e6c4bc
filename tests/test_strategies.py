"""Strategies as plain functions: RANDOM's seeding, padding, and GRAD-MATCH-PB's matching."""

import numpy as np
import pytest

from protocol.config import GradMatchPBSelector, RandomSelector
from protocol.messages import RoundRequest
from service.strategies import (
    GroundSet, matching_error, pad_selection, select_gradmatch_pb, select_random, subset_gradient_error,
    train_target,
)


def request(n_ground, n_select, round_id=0, seed=0, sizes=None, ground="batch"):
    return RoundRequest(round_id=round_id, model_step=0, ground=ground, n_ground=n_ground, n_select=n_select,
                        strategy="any",
                        n_chunks=1, seed=seed, sizes=sizes)


def test_random_is_seeded_per_round():
    config = RandomSelector()
    a = select_random(config, request(100, 10, round_id=1), None)
    b = select_random(config, request(100, 10, round_id=1), None)
    c = select_random(config, request(100, 10, round_id=2), None)
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)
    assert a.indices.size == 10 and np.unique(a.indices).size == 10 and np.all(a.weights == 1)


def test_train_target_weights_batches_by_size():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    sizes = np.array([4, 4, 2])
    # example sum = 4*[1,0] + 4*[0,1] + 2*[2,2] = [8, 8]; mean = [0.8, 0.8]; times 3 batches
    np.testing.assert_allclose(train_target(rows, sizes), [2.4, 2.4])
    np.testing.assert_allclose(train_target(rows, None), [3.0, 3.0])


def test_padding_fills_exactly_on_the_same_scale():
    rng = np.random.default_rng(0)
    indices, weights, n = pad_selection(np.array([3, 5]), np.array([2.0, 4.0]), 10, 5, rng)
    assert n == 3 and indices.size == 5 and np.unique(indices).size == 5
    assert np.all(weights[2:] == 3.0)
    indices, weights, n = pad_selection(np.array([], dtype=np.int64), np.array([]), 10, 4, rng)
    assert n == 4 and np.all(weights == 2.5)


def test_gradmatch_pb_finds_a_planted_combination():
    # the other 38 batches come in opposite pairs, so the full gradient is exactly rows 5 + 17 + 33
    rng = np.random.default_rng(1)
    rows = np.zeros((41, 30), dtype=np.float32)
    rows[[5, 17, 33]] = rng.normal(size=(3, 30))
    others = np.setdiff1d(np.arange(41), [5, 17, 33])
    half = rng.normal(size=(19, 30)) * 0.5
    rows[others[:19]], rows[others[19:]] = half, -half
    sizes = np.full(41, 8)
    np.testing.assert_allclose(train_target(rows, sizes), rows[[5, 17, 33]].sum(0), rtol=1e-5, atol=1e-6)
    selection = select_gradmatch_pb(GradMatchPBSelector(lam=1e-6), request(41, 5, sizes=sizes),
                                    GroundSet(labels=np.zeros(41), rows=rows))
    assert {5, 17, 33} <= set(selection.indices.tolist())
    assert selection.indices.size == 5 and np.unique(selection.indices).size == 5
    planted = {int(i): w for i, w in zip(selection.indices, selection.weights) if i in (5, 17, 33)}
    np.testing.assert_allclose(sorted(planted.values()), [1.0, 1.0, 1.0], atol=1e-4)
    # what OMP chose matches exactly; elements padded after an early stop (at the end) may add error
    solved = selection.indices.size - selection.n_padded
    assert solved >= 3 and set(selection.indices[:solved].tolist()) >= {5, 17, 33}
    target = train_target(rows, sizes)
    assert matching_error(rows, target, selection.indices[:solved], selection.weights[:solved]) < 1e-4
    if selection.n_padded == 0:
        assert selection.match_error < 1e-4


def test_gradmatch_pb_error_is_the_returned_subsets():
    rng = np.random.default_rng(2)
    rows = (rng.normal(size=(60, 20)) + 0.5).astype(np.float32)
    selection = select_gradmatch_pb(GradMatchPBSelector(), request(60, 6), GroundSet(labels=np.zeros(60), rows=rows))
    target = train_target(rows, None)
    assert selection.indices.size == 6
    assert selection.match_error == pytest.approx(matching_error(rows, target, selection.indices, selection.weights))
    assert selection.match_error < 0.5
    assert np.all(selection.weights > 0)


def test_gradmatch_pb_needs_summaries():
    with pytest.raises(ValueError, match="gradmatch-pb needs rows"):
        select_gradmatch_pb(GradMatchPBSelector(), request(10, 2), None)


# --- the paper's other strategies ---------------------------------------------------------------

from protocol.config import CraigPBSelector, CraigSelector, GlisterSelector, GradMatchSelector  # noqa: E402
from protocol.messages import ValidationSet  # noqa: E402
from service import craig  # noqa: E402
from service.omp import choose_method  # noqa: E402
from service.glister import glister_greedy  # noqa: E402
from service.strategies import (  # noqa: E402
    GRAM_MAX_BYTES, IMPLEMENTATIONS, class_budgets, class_rows, class_target, flat_gradient, implementation,
    select_craig, select_craig_pb, select_glister, select_gradmatch, softmax_errors, validation_target,
)


def example_ground(n=120, n_classes=4, dim=6, seed=0, validation=None):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    logits = rng.normal(size=(n, n_classes))
    errors = softmax_errors(logits, labels).astype(np.float32)
    features = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
    return GroundSet(labels=labels, errors=errors, features=features, validation=validation)


def validation_set(m=40, n_classes=4, dim=6, seed=1):
    rng = np.random.default_rng(seed)
    return ValidationSet(round_id=0, logits=rng.normal(size=(m, n_classes)),
                         features=np.abs(rng.normal(size=(m, dim))), labels=np.arange(m) % n_classes)


@pytest.mark.parametrize(
    "counts, budget",
    [([50, 50, 50], 10), ([1, 1, 1, 1, 1], 3), ([7, 0, 3, 1], 5), ([10, 10, 10, 10], 3), ([3, 2], 100),
     ([500, 5, 5, 0, 0, 1], 17), ([1, 1], 2)],
)
def test_class_budgets_sum_exactly(counts, budget):
    out = class_budgets(np.array(counts), budget)
    assert out.sum() == min(budget, sum(counts))
    assert np.all(out <= np.array(counts)) and np.all(out >= 0)
    # proportional within one unit (before capping) for uncapped classes
    share = min(budget, sum(counts)) * np.array(counts) / sum(counts)
    assert np.all(np.abs(out - share)[np.array(counts) > out] < 1 + 1e-9)


def test_gradmatch_is_per_class_with_exact_budget():
    ground = example_ground()
    selection = select_gradmatch(GradMatchSelector(), request(120, 10, ground="example"), ground)
    assert selection.indices.size == 10 and np.unique(selection.indices).size == 10
    per_class = np.bincount(ground.labels[selection.indices], minlength=4)
    assert per_class.tolist() == class_budgets(np.bincount(ground.labels), 10).tolist()  # 3, 3, 2, 2
    assert np.all(selection.weights > 0) and 0 <= selection.match_error < 1 and selection.target == "train"


def test_gradmatch_recovers_a_planted_class_combination():
    # only two class-0 examples keep a non-zero own-column gradient, so the class target (the sum of
    # the own-column rows) is exactly their sum: OMP must pick both with weight 1
    ground = example_ground(n=40, n_classes=2)
    errors = ground.errors.copy()
    members = np.flatnonzero(ground.labels == 0)
    others = members[2:]
    errors[others, 0] = 0.0
    errors[members[0], 0], errors[members[1], 0] = -0.5, -0.25
    planted = GroundSet(labels=ground.labels, errors=errors, features=ground.features)
    rows = class_rows(errors[members], ground.features[members], 0)
    target = class_target(rows, 0, None)
    np.testing.assert_allclose(target, rows[:2].astype(np.float64).sum(0), rtol=1e-6)
    selection = select_gradmatch(GradMatchSelector(lam=1e-8), request(40, 4, ground="example"), planted)
    weights = dict(zip(selection.indices.tolist(), selection.weights))
    assert {members[0], members[1]} <= set(weights)
    np.testing.assert_allclose([weights[members[0]], weights[members[1]]], [1.0, 1.0], atol=1e-4)


def test_valid_matches_the_validation_gradient():
    validation = validation_set()
    target = validation_target(validation, n_ground=120)
    errors = softmax_errors(validation.logits, validation.labels)
    expected = 120 / 40 * np.concatenate([errors.sum(0), (errors.T @ validation.features).ravel()])
    np.testing.assert_allclose(target, expected, rtol=1e-6)
    np.testing.assert_allclose(flat_gradient(errors, validation.features), expected * 40 / 120, rtol=1e-6)


def test_valid_changes_what_gradmatch_matches():
    ground = example_ground(validation=validation_set(seed=1))
    other = example_ground(validation=validation_set(seed=9))
    req = request(120, 12, ground="example")
    train = select_gradmatch(GradMatchSelector(), req, ground)
    valid = select_gradmatch(GradMatchSelector(valid=True), req, ground)
    valid_other = select_gradmatch(GradMatchSelector(valid=True), req, other)
    assert valid.target == "val" and train.target == "train"
    assert set(valid.indices.tolist()) != set(train.indices.tolist())
    assert set(valid.indices.tolist()) != set(valid_other.indices.tolist())
    # the per-class val target is the class's validation gradient scaled to the class size
    in_train = ground.labels == 2
    target = class_target(class_rows(ground.errors[in_train], ground.features[in_train], 2), 2, ground.validation)
    val = ground.validation
    in_class = val.labels == 2
    val_rows = class_rows(softmax_errors(val.logits[in_class], val.labels[in_class]), val.features[in_class], 2)
    np.testing.assert_allclose(target, 30 * val_rows.astype(np.float64).mean(0), rtol=1e-6)


def test_craig_is_per_class_and_weights_count_the_class():
    ground = example_ground()
    selection = select_craig(CraigSelector(), request(120, 8, ground="example"), ground)
    assert selection.indices.size == 8 and np.unique(selection.indices).size == 8
    assert selection.weights.sum() == pytest.approx(120)
    for c in range(4):
        in_class = ground.labels[selection.indices] == c
        assert selection.weights[in_class].sum() == pytest.approx(30)


def test_craig_pb_weights_sum_to_the_number_of_batches():
    rows = np.random.default_rng(3).normal(size=(25, 9)).astype(np.float32)
    selection = select_craig_pb(CraigPBSelector(), request(25, 5), GroundSet(labels=np.zeros(25), rows=rows))
    assert selection.indices.size == 5 and selection.weights.sum() == pytest.approx(25)


def test_glister_uses_the_validation_set_and_weights_one():
    ground = example_ground(validation=validation_set())
    req = RoundRequest(round_id=0, model_step=0, ground="example", n_ground=120, n_select=9, n_chunks=1,
                       strategy="glister",
                       seed=0, lr=0.05, with_validation=True)
    selection = select_glister(GlisterSelector(greedy_steps=3), req, ground)
    assert selection.indices.size == 9 and np.all(selection.weights == 1) and selection.target == "val"
    with pytest.raises(ValueError, match="needs validation"):
        select_glister(GlisterSelector(), req, example_ground())


def test_glister_steps_by_the_learning_rate_it_is_sent():
    ground = example_ground(validation=validation_set())
    asked = dict(round_id=0, model_step=0, ground="example", n_ground=120, n_select=6, n_chunks=1,
                 strategy="glister", seed=0, with_validation=True)
    for lr in (None, 0.0):
        with pytest.raises(ValueError, match=f"lr == {lr}, glister needs the initial learning rate"):
            select_glister(GlisterSelector(), RoundRequest(**asked, lr=lr), ground)
    val = ground.validation
    for lr in (0.05, 30.0):
        expected, _ = glister_greedy(ground.errors, ground.features, val.logits, val.features, val.labels, 6, lr, 2)
        selection = select_glister(GlisterSelector(greedy_steps=2), RoundRequest(**asked, lr=lr), ground)
        assert selection.indices.tolist() == expected.tolist()


def one_class_validation(c, m=30, n_classes=4, dim=6, seed=2):
    rng = np.random.default_rng(seed)
    return ValidationSet(round_id=0, logits=rng.normal(size=(m, n_classes)),
                         features=np.abs(rng.normal(size=(m, dim))), labels=np.full(m, c))


@pytest.mark.parametrize("c", range(4))
def test_glister_chooses_for_the_validation_set_it_is_given(c):
    # a validation set of class c only: the examples whose step lowers its loss most are class c's own
    req = RoundRequest(round_id=0, model_step=0, ground="example", n_ground=120, n_select=10, n_chunks=1,
                       strategy="glister", seed=0, lr=0.05, with_validation=True)
    ground = example_ground(validation=one_class_validation(c))
    selection = select_glister(GlisterSelector(greedy_steps=10), req, ground)
    assert ground.labels[selection.indices].tolist() == [c] * 10  # a zeroed or constant set fails c > 0


def test_large_classes_never_build_an_n_by_n_gram():
    assert choose_method(50_000, 513, 5_000, 4, gram_max_bytes=GRAM_MAX_BYTES) == "rows"
    assert choose_method(2_500, 5_130, 250, 4, gram_max_bytes=GRAM_MAX_BYTES) == "gram"


def test_every_strategy_is_implemented_and_named_once():
    from protocol.config import (
        FULL, FULL_EARLYSTOP, PAPER_NAMES, ROUND_STRATEGIES, SELECTOR_TABLE, STRATEGIES, SelectorConfig,
        strategy_name,
    )
    from pydantic import TypeAdapter

    assert set(IMPLEMENTATIONS) == set(SELECTOR_TABLE)
    assert len(set(STRATEGIES)) == len(STRATEGIES) == len(SELECTOR_TABLE) and set(PAPER_NAMES) == set(STRATEGIES)
    assert (FULL, FULL_EARLYSTOP) == ("full", "full-earlystop") and PAPER_NAMES["gradmatch-pb"] == "GRAD-MATCH-PB"
    assert set(STRATEGIES) - set(ROUND_STRATEGIES) == {FULL, FULL_EARLYSTOP}
    adapter = TypeAdapter(SelectorConfig)
    for selector in SELECTOR_TABLE:
        name = strategy_name(selector)
        config = adapter.validate_python({"strategy": name, **({"time_budget_s": 1} if name == FULL_EARLYSTOP else {})})
        assert type(config) is selector
        plan = implementation(config).plan(config)
        assert plan.rounds == (name in ROUND_STRATEGIES) == (implementation(config).select is not None)
        # every strategy that selects asks for the summaries its Table 8 error needs
        assert plan.summaries == ({"batch": "batch", "example": "example"}[plan.ground] if plan.rounds else "none")


# --- Table 8: the gradient error of a subset as it is trained --------------------------------------------

def test_gradient_error_of_a_planted_example_subset():
    # three examples with C = 2, D = 1: g_i = e_i ⊗ [1, h_i] in the layout [bias (2), weight (2)]
    errors = np.array([[0.5, -0.5], [-0.25, 0.25], [0.1, -0.1]])
    features = np.array([[2.0], [4.0], [0.0]])
    ground = GroundSet(labels=np.array([1, 0, 1]), errors=errors, features=features)
    # g_0 = [0.5, -0.5, 1, -1]; g_1 = [-0.25, 0.25, -1, 1]; g_2 = [0.1, -0.1, 0, 0]
    # full sum = [0.35, -0.35, 0, 0], norm 0.35 sqrt 2
    # S = {0} with any weight: w^ = 3, so the subset sum is [1.5, -1.5, 3, -3]
    # difference [1.15, -1.15, 3, -3]: error = sqrt(2 * 1.15^2 + 2 * 9) / (0.35 sqrt 2) = sqrt(1.3225 + 9) / 0.35
    expected = np.sqrt(1.15 ** 2 + 9) / 0.35
    for weight in (1.0, 7.5):
        assert subset_gradient_error(ground, None, np.array([0]), np.array([weight])) == pytest.approx(expected)
    # S = {1, 2} with weights 1 and 3: w^ = (0.75, 2.25); sum = 0.75 g_1 + 2.25 g_2
    subset = 0.75 * np.array([-0.25, 0.25, -1, 1]) + 2.25 * np.array([0.1, -0.1, 0, 0])
    expected = np.linalg.norm(subset - np.array([0.35, -0.35, 0, 0])) / (0.35 * np.sqrt(2))
    assert subset_gradient_error(ground, None, np.array([1, 2]), np.array([1.0, 3.0])) == pytest.approx(expected)


def test_gradient_error_of_planted_batches_counts_their_examples():
    # batch b has s_b examples with mean gradient r_b; full sum = sum_b s_b r_b = [4, 0] + [0, 2] + [2, 2] = [6, 4]
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    sizes = np.array([4, 2, 2])
    ground = GroundSet(labels=np.zeros(3), rows=rows)
    # S = {0, 2} weights (1, 2): examples weighted 1 (4 of them) and 2 (2 of them); sum_S w s = 8, n = 8
    # subset sum = 8 * (1 * 4 * [1, 0] + 2 * 2 * [1, 1]) / 8 = [8, 4]; error = ||[2, 0]|| / ||[6, 4]||
    error = subset_gradient_error(ground, sizes, np.array([0, 2]), np.array([1.0, 2.0]))
    assert error == pytest.approx(2 / np.sqrt(52))
    # without sizes every batch counts as one example: full = [2, 2]; subset = 3 * ([1, 0] + 2 [1, 1]) / 3 = [3, 2]
    assert subset_gradient_error(ground, None, np.array([0, 2]), np.array([1.0, 2.0])) == pytest.approx(1 / np.sqrt(8))


@pytest.mark.parametrize("scale", [1.0, 0.01, 40.0])
def test_the_whole_set_with_equal_weights_scores_zero(scale):
    ground = example_ground(n=50)
    every = np.arange(50)
    assert subset_gradient_error(ground, None, every, np.full(50, scale)) == pytest.approx(0, abs=1e-12)
    rows = np.random.default_rng(4).normal(size=(9, 7)).astype(np.float32)
    sizes = np.array([8] * 8 + [3])
    batches = GroundSet(labels=np.zeros(9), rows=rows)
    assert subset_gradient_error(batches, sizes, np.arange(9), np.full(9, scale)) == pytest.approx(0, abs=1e-6)
    # unequal weights on the whole set are not the full gradient
    weights = np.linspace(1, 3, 50)
    assert subset_gradient_error(ground, None, every, weights) > 1e-3


def test_gradient_error_uses_every_column_not_the_class_column():
    # gradmatch's own matching error looks at each class's own logit column; the comparable error sees all
    ground = example_ground(n=80, n_classes=4, dim=5, seed=3)
    selection = select_gradmatch(GradMatchSelector(), request(80, 8, ground="example"), ground)
    full_rows = np.stack([flat_gradient(ground.errors[i:i + 1], ground.features[i:i + 1]) for i in range(80)])
    weights = selection.weights * 80 / selection.weights.sum()
    expected = matching_error(full_rows, full_rows.sum(0), selection.indices, weights)
    error = subset_gradient_error(ground, None, selection.indices, selection.weights)
    assert error == pytest.approx(expected, rel=1e-6)
    assert error != pytest.approx(selection.match_error, rel=1e-3)


def test_gradient_error_needs_summaries():
    assert subset_gradient_error(None, None, np.array([0]), np.array([1.0])) is None
    assert subset_gradient_error(GroundSet(labels=np.zeros(3)), None, np.array([0]), np.array([1.0])) is None


# --- which examples were chosen ------------------------------------------------------------------------

def shuffled_ground(seed=5):
    """Unequal, shuffled classes (sizes 37, 5, 18, 60), so an index mix-up changes the classes chosen."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(4), [37, 5, 18, 60]))
    errors = softmax_errors(rng.normal(size=(120, 4)), labels).astype(np.float32)
    features = np.abs(rng.normal(size=(120, 6))).astype(np.float32)
    return GroundSet(labels=labels, errors=errors, features=features)


@pytest.mark.parametrize("select, config", [(select_gradmatch, GradMatchSelector()), (select_craig, CraigSelector())])
def test_per_class_budgets_hold_for_the_examples_chosen(select, config):
    ground = shuffled_ground()
    selection = select(config, request(120, 13, ground="example"), ground)
    budgets = class_budgets(np.bincount(ground.labels), 13)
    assert budgets.tolist() == [4, 1, 2, 6]
    assert np.unique(selection.indices).size == 13
    chosen_classes = ground.labels[selection.indices]
    assert np.bincount(chosen_classes, minlength=4).tolist() == budgets.tolist()
    # each chosen example is a member of its class, and each class's choice is that class's own selection
    for c in range(4):
        members = np.flatnonzero(ground.labels == c)
        chosen = selection.indices[chosen_classes == c]
        assert set(chosen.tolist()) <= set(members.tolist())
        if select is select_craig:
            local, _ = craig.select_craig(craig.gradient_gram(ground.errors[members], ground.features[members]),
                                          int(budgets[c]))
            assert sorted(chosen.tolist()) == sorted(members[local].tolist())
