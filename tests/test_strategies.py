"""Strategies as plain functions: RANDOM's seeding, padding, and GRAD-MATCH-PB's matching."""

import numpy as np
import pytest

from protocol.config import GradMatchPBSelector, RandomSelector
from protocol.messages import RoundRequest
from service.strategies import (
    GroundSet, gradient_errors, matching_error, pad_selection, select_gradmatch_pb, select_random, train_target,
)


def request(n_ground, n_select, round_id=0, seed=0, sizes=None, ground="batch"):
    return RoundRequest(round_id=round_id, model_step=0, ground=ground, n_ground=n_ground, n_select=n_select,
                        strategy="any",
                        n_chunks=1, seed=seed, sizes=sizes)


def test_random_is_one_seeded_subset_for_the_whole_run():
    """RANDOM is the reference's fixed random subset: every round answers the same, and it is the subset the
    trainer starts a cold run on (the same seed stream)."""
    from protocol.config import RANDOM_STREAM

    config = RandomSelector()
    a = select_random(config, request(100, 10, round_id=1), None)
    b = select_random(config, request(100, 10, round_id=2), None)
    c = select_random(config, request(100, 10, round_id=1, seed=8), None)
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)
    assert a.indices.size == 10 and np.unique(a.indices).size == 10 and np.all(a.weights == 1)
    initial = np.sort(np.random.default_rng([0, RANDOM_STREAM]).choice(100, size=10, replace=False))
    assert np.array_equal(a.indices, initial)


def test_train_target_weights_batches_by_size():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    sizes = np.array([4, 4, 2])
    # example sum = 4*[1,0] + 4*[0,1] + 2*[2,2] = [8, 8]; mean = [0.8, 0.8]; times 3 batches
    np.testing.assert_allclose(train_target(rows, sizes), [2.4, 2.4])
    np.testing.assert_allclose(train_target(rows, None), [3.0, 3.0])


def test_padding_fills_exactly_with_weight_one():
    rng = np.random.default_rng(0)
    indices, weights, n = pad_selection(np.array([3, 5]), np.array([2.0, 4.0]), 10, 5, rng)
    assert n == 3 and indices.size == 5 and np.unique(indices).size == 5
    assert weights.tolist() == [2.0, 4.0, 1.0, 1.0, 1.0]  # as CORDS pads, not the chosen ones' mean (3)
    indices, weights, n = pad_selection(np.array([], dtype=np.int64), np.array([]), 10, 4, rng)
    assert n == 4 and np.all(weights == 1.0)
    indices, weights, n = pad_selection(np.array([1, 2]), np.array([7.0, 9.0]), 6, 3, rng, pool=np.array([1, 2, 4]))
    assert n == 1 and indices.tolist() == [1, 2, 4] and weights.tolist() == [7.0, 9.0, 1.0]


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
from service.registry import IMPLEMENTATIONS, implementation  # noqa: E402
from service.strategies import (  # noqa: E402
    GRAM_MAX_BYTES, class_budgets, class_rows, class_target, flat_gradient, select_craig, select_craig_pb,
    select_glister, select_gradmatch, softmax_errors, validation_target,
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
        assert plan.rounds == (name in ROUND_STRATEGIES)
        # RANDOM-ONLINE trains subsets without rounds: the trainer draws one every epoch, the selector never selects
        assert (implementation(config).select is not None) == (plan.rounds and not plan.online) and \
            plan.online == (name == "random-online")
        # every strategy that selects asks for the summaries its Table 8 error needs
        assert plan.summaries == ({"batch": "batch", "example": "example"}[plan.ground]
                                  if plan.rounds and not plan.online else "none")


# --- Table 8: Eq. 1 with the raw weights, and the error as trained ----------------------------------------

EXAMPLE_CONFIGS = {"random": RandomSelector(), "gradmatch": GradMatchSelector(), "craig": CraigSelector(),
                   "glister": GlisterSelector()}
BATCH_CONFIGS = {"gradmatch-pb": GradMatchPBSelector(), "craig-pb": CraigPBSelector()}


def tiny_examples():
    """Three examples, C = 2, D = 1: g_i = e_i ⊗ [1, h_i] in the layout [bias (2), weight (2)].

    g_0 = [0.5, -0.5, 1, -1], g_1 = [-0.25, 0.25, -1, 1], g_2 = [0.1, -0.1, 0, 0]; sum_U g = [0.35, -0.35, 0, 0].
    """
    errors = np.array([[0.5, -0.5], [-0.25, 0.25], [0.1, -0.1]])
    return GroundSet(labels=np.array([1, 0, 1]), errors=errors, features=np.array([[2.0], [4.0], [0.0]]))


def errors_of(config, ground, indices, weights, sizes=None):
    found = gradient_errors(config, ground, sizes, np.asarray(indices), np.asarray(weights, dtype=np.float64))
    return found.absolute, found.relative, found.trained


@pytest.mark.parametrize("name", ["random", "craig", "glister"])
def test_eq1_of_example_strategies_is_against_the_full_training_gradient(name):
    # S = {0} with w = 2: sum_S w g = [1, -1, 2, -2]; residual [0.65, -0.65, 2, -2]
    absolute, relative, trained = errors_of(EXAMPLE_CONFIGS[name], tiny_examples(), [0], [2.0])
    assert absolute == pytest.approx(np.sqrt(2 * 0.65 ** 2 + 8))
    assert relative == pytest.approx(np.sqrt(2 * 0.65 ** 2 + 8) / (0.35 * np.sqrt(2)))
    # as trained w^ = 3 whatever w: [1.5, -1.5, 3, -3] - [0.35, -0.35, 0, 0] = [1.15, -1.15, 3, -3]
    assert trained == pytest.approx(np.sqrt(1.15 ** 2 + 9) / 0.35)
    # raw weights count: w = 1 is another Eq. 1 error, the same error as trained
    absolute_1, _, trained_1 = errors_of(EXAMPLE_CONFIGS[name], tiny_examples(), [0], [1.0])
    assert absolute_1 == pytest.approx(np.linalg.norm([0.15, -0.15, 1, -1])) and trained_1 == pytest.approx(trained)


def test_eq1_of_gradmatch_is_per_class_in_the_class_column():
    # own-column rows [e_c, e_c h]: class 0 = {1}: [-0.25, -1]; class 1 = {0, 2}: [-0.5, -1], [-0.1, 0]
    # targets: class 0 [-0.25, -1], class 1 [-0.6, -1]. S = {0} with w = 2, none of class 0:
    # class 1 residual 2 [-0.5, -1] - [-0.6, -1] = [-0.4, -1] (1.16); class 0 residual -target (1.0625)
    absolute, relative, trained = errors_of(GradMatchSelector(), tiny_examples(), [0], [2.0])
    assert absolute == pytest.approx(np.sqrt(1.16 + 1.0625))
    assert relative == pytest.approx(np.sqrt(2.2225 / (1.0625 + 1.36)))
    assert trained == pytest.approx(np.sqrt(1.15 ** 2 + 9) / 0.35)  # as trained: the whole last layer


@pytest.mark.parametrize("name", ["gradmatch-pb", "craig-pb"])
def test_eq1_of_batches_is_against_the_training_target_over_the_rows(name):
    # sum_b s_b r_b = [6, 4], n = 8 examples; train_target = 3 [6, 4] / 8 = [2.25, 1.5]
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    ground, sizes = GroundSet(labels=np.zeros(3), rows=rows), np.array([4, 2, 2])
    # S = {0, 2} with w = (1, 2): sum_S w r = [3, 2]; residual [0.75, 0.5]
    absolute, relative, trained = errors_of(BATCH_CONFIGS[name], ground, [0, 2], [1.0, 2.0], sizes)
    assert absolute == pytest.approx(np.sqrt(0.8125)) and relative == pytest.approx(np.sqrt(0.8125 / 7.3125))
    # as trained each chosen batch's weight cancels: n mean(r_0, r_2) = 8 [1, 0.5] = [8, 4]; minus [6, 4]
    assert trained == pytest.approx(2 / np.sqrt(52))
    assert errors_of(BATCH_CONFIGS[name], ground, [0, 2], [5.0, 0.1], sizes)[2] == pytest.approx(trained)
    # without sizes every batch is one example: target [2, 2], sum_S w r = [3, 2]; as trained 3 [1, 0.5] - [2, 2]
    assert errors_of(BATCH_CONFIGS[name], ground, [0, 2], [1.0, 2.0])[:3:2] == pytest.approx(
        (1.0, np.sqrt(1.25) / np.sqrt(8)))


def test_eq1_of_gradmatch_pb_valid_is_against_the_validation_target():
    # one validation example, logits 0, label 0, h = 2: e = [-0.5, 0.5], flat [-0.5, 0.5, -1, 1]; x n_b = 2
    validation = ValidationSet(round_id=0, logits=np.zeros((1, 2)), features=np.array([[2.0]]), labels=np.array([0]))
    rows = np.array([[-1.0, 1.0, -2.0, 2.0], [1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    ground = GroundSet(labels=np.zeros(2), rows=rows, validation=validation)
    config = GradMatchPBSelector(valid=True)
    assert errors_of(config, ground, [0], [1.0])[:2] == pytest.approx((0.0, 0.0))  # row 0 is the target
    # S = {1} with w = 2: [2, 0, 0, 0] - [-1, 1, -2, 2] = [3, -1, 2, -2]
    absolute, relative, trained = errors_of(config, ground, [1], [2.0])
    assert absolute == pytest.approx(np.sqrt(18)) and relative == pytest.approx(np.sqrt(18 / 10))
    # as trained against the training gradient: 2 r_1 - (r_0 + r_1) = [2, -1, 2, -2] vs [0, 1, -2, 2]
    assert trained == pytest.approx(np.sqrt(13) / 3)
    # without valid the target is the training one, r_0 + r_1: residual [2, -1, 2, -2]
    assert errors_of(GradMatchPBSelector(), ground, [1], [2.0])[0] == pytest.approx(np.sqrt(13))


@pytest.mark.parametrize("name", list(EXAMPLE_CONFIGS))
def test_a_subset_that_reproduces_the_matched_gradient_reads_zero_examples(name):
    ground = example_ground(n=50)
    absolute, relative, trained = errors_of(EXAMPLE_CONFIGS[name], ground, np.arange(50), np.ones(50))
    assert absolute == pytest.approx(0, abs=1e-9) and relative == pytest.approx(0, abs=1e-9)
    assert trained == pytest.approx(0, abs=1e-12)
    # a planted duplicate: example 7 twice (as 7 and 8), the ground set without 8 but 7 with weight 2
    errors, features = ground.errors.copy(), ground.features.copy()
    errors[8], features[8] = errors[7], features[7]
    labels = ground.labels.copy()
    labels[8] = labels[7]
    twin = GroundSet(labels=labels, errors=errors, features=features)
    keep = np.setdiff1d(np.arange(50), [8])
    weights = np.where(keep == 7, 2.0, 1.0)
    absolute, relative, _ = errors_of(EXAMPLE_CONFIGS[name], twin, keep, weights)
    assert absolute == pytest.approx(0, abs=1e-6) and relative == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("name", list(BATCH_CONFIGS))
def test_a_subset_that_reproduces_the_matched_gradient_reads_zero_batches(name):
    rows = np.random.default_rng(4).normal(size=(9, 7)).astype(np.float32)
    sizes = np.array([8] * 8 + [3])
    ground = GroundSet(labels=np.zeros(9), rows=rows)
    # train_target = 9 sum_b s_b r_b / sum_b s_b: every batch with weight 9 s_b / 67
    absolute, relative, trained = errors_of(BATCH_CONFIGS[name], ground, np.arange(9), 9 * sizes / 67, sizes)
    assert absolute == pytest.approx(0, abs=1e-5) and relative == pytest.approx(0, abs=1e-6)
    # as trained, the whole set in equal batches trains like a full epoch, whatever the weights
    equal = np.full(9, 8)
    assert errors_of(BATCH_CONFIGS[name], ground, np.arange(9), np.linspace(1, 3, 9), equal)[2] == pytest.approx(
        0, abs=1e-6)
    # the planted combination of test_gradmatch_pb_finds_a_planted_combination: rows 5, 17, 33 with weight 1
    planted = np.random.default_rng(1)
    rows = np.zeros((41, 30), dtype=np.float32)
    rows[[5, 17, 33]] = planted.normal(size=(3, 30))
    half = planted.normal(size=(19, 30)) * 0.5
    others = np.setdiff1d(np.arange(41), [5, 17, 33])
    rows[others[:19]], rows[others[19:]] = half, -half
    absolute, relative, _ = errors_of(BATCH_CONFIGS[name], GroundSet(labels=np.zeros(41), rows=rows), [5, 17, 33],
                                      np.ones(3), np.full(41, 8))
    assert absolute == pytest.approx(0, abs=1e-5) and relative == pytest.approx(0, abs=1e-6)


def test_the_whole_set_with_equal_weights_trains_like_a_full_epoch():
    ground = example_ground(n=50)
    for scale in (1.0, 0.01, 40.0):
        assert errors_of(RandomSelector(), ground, np.arange(50), np.full(50, scale))[2] == pytest.approx(0, abs=1e-12)
    # unequal weights on the whole set are not the full gradient as trained
    assert errors_of(RandomSelector(), ground, np.arange(50), np.linspace(1, 3, 50))[2] > 1e-3
    # Eq. 1 counts the raw weights: the whole set at weight 2 is twice the target, an error of one target
    absolute, relative, _ = errors_of(RandomSelector(), ground, np.arange(50), np.full(50, 2.0))
    assert relative == pytest.approx(1.0)


def test_the_errors_agree_with_what_gradmatch_matched():
    ground = example_ground(n=80, n_classes=4, dim=5, seed=3)
    selection = select_gradmatch(GradMatchSelector(), request(80, 8, ground="example"), ground)
    absolute, relative, trained = errors_of(GradMatchSelector(), ground, selection.indices, selection.weights)
    assert relative == pytest.approx(selection.match_error, rel=1e-9)  # the strategy's own objective
    # as trained: the whole last layer with rescaled weights, a different number
    full_rows = np.stack([flat_gradient(ground.errors[i:i + 1], ground.features[i:i + 1]) for i in range(80)])
    rescaled = selection.weights * 80 / selection.weights.sum()
    assert trained == pytest.approx(matching_error(full_rows, full_rows.sum(0), selection.indices, rescaled), rel=1e-6)
    assert trained != pytest.approx(relative, rel=1e-3)
    rows = (np.random.default_rng(2).normal(size=(60, 20)) + 0.5).astype(np.float32)
    batches = GroundSet(labels=np.zeros(60), rows=rows)
    pb = select_gradmatch_pb(GradMatchPBSelector(), request(60, 6), batches)
    assert errors_of(GradMatchPBSelector(), batches, pb.indices, pb.weights)[1] == pytest.approx(pb.match_error)


def test_gradient_errors_need_summaries():
    for ground in (None, GroundSet(labels=np.zeros(3))):
        assert errors_of(RandomSelector(), ground, [0], [1.0]) == (None, None, None)
    # a zero target has no relative error
    zero = GroundSet(labels=np.zeros(2), rows=np.zeros((2, 4), np.float32))
    assert errors_of(CraigPBSelector(), zero, [0], [1.0]) == (0.0, None, None)


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
