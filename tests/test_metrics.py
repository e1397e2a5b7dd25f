"""Competition metrics against scikit-learn (dense and sparse truth, empty rows included), top-k and label
bounds, and the vectorised searches against brute force over the decisions they stand for."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import sparse
from sklearn.metrics import f1_score, fbeta_score

import src.metrics
from src.config import MetricConfig
from src.label_embedding import decode, decode_top_k, top_k
from src.metrics import (
    best_thresholds,
    bound_labels,
    count_labels,
    f1_curves,
    fbeta_from_counts,
    grid_bins,
    metric_curve,
    metric_score,
    precision_at_k,
    ranked_top,
    top_k_curve,
    top_labels,
)
from src.thresholds import GLOBAL_GRID, Decision


def sklearn_metric(name: str, truth: np.ndarray, predicted: np.ndarray, beta: float, zero_division: float) -> float:
    with warnings.catch_warnings():  # sklearn warns about ill-defined rows even with zero_division set
        warnings.simplefilter("ignore")
        if name == "fbeta_samples":
            return fbeta_score(truth, predicted, beta=beta, average="samples", zero_division=zero_division)
        return f1_score(truth, predicted, average=name.removesuffix("_f1"), zero_division=zero_division)


@st.composite
def truth_and_predictions(draw):
    n, m = draw(st.integers(1, 9)), draw(st.integers(2, 6))  # m >= 2: sklearn reads one column as binary
    truth = draw(arrays(bool, (n, m)))
    predicted = draw(arrays(bool, (n, m)))
    if draw(st.booleans()):  # make empty rows (no true and no predicted label) likely
        truth[0], predicted[0] = False, False
    return truth, predicted


@settings(max_examples=40, deadline=None)
@given(truth_and_predictions(), st.sampled_from(["macro_f1", "fbeta_samples", "micro_f1"]),
       st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.0, 1.0]))
def test_metrics_match_sklearn_with_dense_or_sparse_inputs(data, name, beta, zero_division):
    truth, predicted = data
    metric = MetricConfig(name=name, beta=beta, zero_division=zero_division)
    expected = sklearn_metric(name, truth, predicted, beta, zero_division)
    for t, p in [(truth, predicted), (sparse.csr_matrix(truth), predicted), (truth, sparse.csr_matrix(predicted)),
                 (sparse.csr_matrix(truth.astype(np.uint8)), sparse.csr_matrix(predicted))]:
        assert metric_score(metric, t, p) == pytest.approx(expected, abs=1e-12)


def test_sparse_truth_with_duplicates_and_explicit_zeros_counts_each_label_once():
    truth = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    predicted = np.array([[1, 1, 0], [0, 0, 1], [0, 1, 0]], bool)
    # (0, 0) stored twice, (1, 1) stored as an explicit zero
    messy = sparse.csr_matrix((np.array([1, 1, 1, 0, 1]), np.array([0, 0, 2, 1, 1]), np.array([0, 3, 4, 5])),
                              shape=(3, 3))
    for name in ("macro_f1", "fbeta_samples", "micro_f1"):
        metric = MetricConfig(name=name)
        assert metric_score(metric, messy, predicted) == pytest.approx(metric_score(metric, truth, predicted))


def direct_precision_at_k(truth: np.ndarray, scores: np.ndarray, k: int) -> float:
    """The definition, one row at a time: labels sorted by (-score, class index), the first k."""
    total = 0
    for row_true, row_scores in zip(truth, scores):
        top = sorted(range(len(row_scores)), key=lambda c: (-row_scores[c], c))[:k]
        total += sum(bool(row_true[c]) for c in top)
    return total / (len(truth) * k)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_precision_at_k_matches_the_definition_with_ties_short_rows_and_k_above_m(k):
    rng = np.random.default_rng(k)
    truth = rng.random((40, 5)) < 0.3  # many rows with fewer than k labels, some with none
    scores = np.round(rng.random((40, 5)), 1)  # ties
    expected = direct_precision_at_k(truth, scores, k)
    assert precision_at_k(truth, scores, k) == pytest.approx(expected)
    assert precision_at_k(sparse.csr_matrix(truth), scores, k) == pytest.approx(expected)
    assert metric_score(MetricConfig(name="precision_at_k", k=k), truth, None, scores) == pytest.approx(expected)


def test_top_labels_break_ties_towards_the_lower_class_and_take_exactly_k():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert top_labels(scores, 2).tolist() == [[True, True, False, False, False], [True, True, False, False, False]]
    assert ranked_top(scores, 3).tolist() == [[1, 0, 2], [0, 1, 2]]
    assert top_labels(scores, 9).all() and ranked_top(scores, 9).shape == (2, 5)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (7, 5), elements=st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0])),
       st.floats(0.1, 0.9), st.integers(0, 5), st.integers(1, 5))
def test_bound_labels_hold_on_every_row_and_keep_the_highest_scores(scores, threshold, low, high):
    low, high = min(low, high), max(low, high)
    plain = scores >= threshold
    bounded = bound_labels(scores, plain, low, high)
    count = bounded.sum(axis=1)
    assert ((count >= low) & (count <= high)).all()
    for row, before, after in zip(scores, plain, bounded):
        if low <= before.sum() <= high:
            assert (after == before).all()  # rows within bounds are left alone
        elif before.sum() < low:
            assert (after >= before).all() and row[after & ~before].min() >= row[~after].max(initial=-1)
        else:
            assert (after <= before).all() and row[after].min() >= row[before & ~after].max()


METRICS = [MetricConfig(name="macro_f1"), MetricConfig(name="fbeta_samples", beta=2.0),
           MetricConfig(name="micro_f1"), MetricConfig(name="precision_at_k", k=2),
           MetricConfig(name="fbeta_samples", beta=1.0, zero_division=1.0)]


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: f"{m.name}-{m.zero_division}")
@pytest.mark.parametrize("bounds", [(0, None), (1, None), (1, 2), (2, 3)])
def test_metric_curve_equals_the_metric_of_each_bounded_decision(metric, bounds):
    rng = np.random.default_rng(0)
    truth = rng.random((30, 6)) < 0.3
    scores = np.round(rng.random((30, 6)), 2).astype(np.float32)
    grid = np.linspace(0.05, 0.95, 19)
    brute = [metric_score(metric, truth, Decision(np.full(6, t), *bounds).apply(scores), scores) for t in grid]
    np.testing.assert_allclose(metric_curve(metric, truth, scores, grid, *bounds), brute, atol=1e-12)
    np.testing.assert_allclose(metric_curve(metric, sparse.csr_matrix(truth), scores, grid, *bounds), brute,
                               atol=1e-12)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: f"{m.name}-{m.zero_division}")
def test_top_k_curve_equals_the_metric_of_each_top_k(metric):
    rng = np.random.default_rng(1)
    truth = rng.random((30, 6)) < 0.3
    scores = np.round(rng.random((30, 6)), 1)  # ties: the curve must follow the same tie order as apply
    brute = [metric_score(metric, truth, Decision(None, top_k=k).apply(scores), scores) for k in range(1, 7)]
    np.testing.assert_allclose(top_k_curve(metric, truth, scores, 9), brute, atol=1e-12)  # capped at m
    np.testing.assert_allclose(top_k_curve(metric, sparse.csr_matrix(truth), scores, 9), brute, atol=1e-12)


def test_best_thresholds_for_f2_match_brute_force_and_blocks_change_nothing(monkeypatch):
    rng = np.random.default_rng(2)
    truth = rng.random((200, 5)) < np.linspace(0.4, 0.05, 5)
    scores = np.round(np.clip(0.3 * truth + rng.random((200, 5)) * 0.7, 0, 1), 2)
    thresholds, best = best_thresholds(truth, scores, beta=2.0)
    for c in range(5):
        candidates = np.unique(np.concatenate([scores[:, c], [2.0]]))
        kept = scores[:, c][None, :] >= candidates[:, None]  # every threshold at once
        tp = (kept & truth[:, c]).sum(axis=1)
        brute = np.max(5 * tp / (4 * truth[:, c].sum() + kept.sum(axis=1)))
        assert best[c] == pytest.approx(brute)
        assert fbeta_score(truth[:, c], scores[:, c] >= thresholds[c], beta=2.0) == pytest.approx(brute)
    monkeypatch.setattr(src.metrics, "BLOCK_ENTRIES", 400)  # two classes per block
    blocked = best_thresholds(sparse.csr_matrix(truth), scores, beta=2.0)
    np.testing.assert_array_equal(blocked[0], thresholds)
    np.testing.assert_array_equal(blocked[1], best)


def test_grid_bins_equal_searchsorted_at_and_around_every_threshold():
    grid = GLOBAL_GRID
    values = np.concatenate([grid, np.nextafter(grid, 2), np.nextafter(grid, -2), np.random.default_rng(3).random(999),
                             [-np.inf, np.inf, -3.0, 3.0, 0.0, 1.0]])
    for dtype in (np.float64, np.float32):
        v = values.astype(dtype)
        np.testing.assert_array_equal(grid_bins(grid, v), np.searchsorted(grid, v, side="right"))
    uneven = np.array([0.1, 0.2, 0.5, 0.9])
    np.testing.assert_array_equal(grid_bins(uneven, values), np.searchsorted(uneven, values, side="right"))


@pytest.mark.parametrize("k", [1, 3, 4, 7, 12, 15])
def test_one_top_k_breaks_ties_at_the_kth_place_like_a_stable_sort(k):
    # Integer scores in 0..4 over 12 labels: most rows have ties straddling the k-th place, where a partition
    # picks an arbitrary subset of the tied labels. The rule: lower class index first, as a stable sort.
    scores = np.random.default_rng(k).integers(0, 5, (2000, 12))
    reference = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ranked_top(scores, k), reference)
    np.testing.assert_array_equal(top_labels(scores, k).sum(axis=1), min(k, 12))
    indices, values = top_k(scores, k, chunk_rows=333)  # label_embedding's top-k is the same ranking
    np.testing.assert_array_equal(indices, reference)
    np.testing.assert_array_equal(values, np.take_along_axis(scores, reference, axis=1))


def test_decode_top_k_ranks_labels_never_seen_in_training_by_index():
    # Unseen labels (zero embedding rows) all decode to 0: with k above the seen labels they tie at the k-th
    # place, and the lower index goes first.
    rng = np.random.default_rng(4)
    E = rng.standard_normal((20, 6)).astype(np.float32)
    E[[2, 5, 9, 11, 13, 17, 19]] = 0
    outputs = rng.standard_normal((300, 6)).astype(np.float32)
    indices, values = decode_top_k(outputs, E, 16, chunk_rows=64)
    reference = np.argsort(-decode(outputs, E), axis=1, kind="stable")[:, :16]
    np.testing.assert_array_equal(indices, reference)
    assert (values[:, 13:] == 0).all() and (indices[:, 13:] == [2, 5, 9]).all()


def test_f1_curves_are_the_per_class_counts_of_the_macro_metric_curve():
    rng = np.random.default_rng(5)
    truth = rng.random((80, 7)) < 0.3
    truth[:, 6] = False  # no positives: F1 0 (or zero_division where nothing is predicted either)
    scores = np.round(rng.random((80, 7)), 2)
    grid = np.linspace(0, 1, 101)
    curves = f1_curves(truth, scores, grid)
    np.testing.assert_array_equal(curves.mean(axis=1), metric_curve(MetricConfig(name="macro_f1"), truth, scores, grid))
    np.testing.assert_array_equal(f1_curves(sparse.csr_matrix(truth), scores, grid), curves)
    for i in (0, 37, 100):
        expected = f1_score(truth, scores >= grid[i], average=None, zero_division=0)
        np.testing.assert_allclose(curves[i], expected, atol=1e-12)


def test_fbeta_from_counts_is_sklearns_formula_and_broadcasts():
    tp, true, predicted = np.array([0, 1, 2, 0]), np.array([0, 2, 2, 3]), np.array([0, 1, 4, 0])
    np.testing.assert_allclose(fbeta_from_counts(tp, true, predicted, 1.0, 0.5), [0.5, 2 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(fbeta_from_counts(tp, true, predicted, 2.0, 0.0), [0.0, 5 / 9, 10 / 12, 0.0])
    np.testing.assert_allclose(fbeta_from_counts(np.array([1, 2]), np.array([[2], [4]]), 3, 1.0, 0.0),
                               [[0.4, 0.8], [2 / 7, 4 / 7]])


def test_count_labels_reads_a_messy_sparse_matrix_once_canonical():
    dense = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    messy = sparse.csr_matrix((np.array([1, 1, 1, 0, 1]), np.array([0, 0, 2, 1, 1]), np.array([0, 3, 4, 5])),
                              shape=(3, 3))
    for axis in (0, 1, None):
        np.testing.assert_array_equal(count_labels(messy, axis), count_labels(dense, axis))
        np.testing.assert_array_equal(count_labels(dense.astype(np.uint8), axis), np.count_nonzero(dense, axis))
