"""Threshold search and strategies against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from src.config import PredictConfig
from src.metrics import best_thresholds, decide, f1_curves, f1_per_class
from src.thresholds import GLOBAL_GRID, ThresholdInputs, compare_strategies, thresholds_for


def make_oof(n=300, m=6, seed=0, quantize=False):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, m)) < np.linspace(0.4, 0.03, m)
    scores = np.clip(0.35 * truth + rng.random((n, m)) * 0.7, 0, 1)
    if quantize:  # many ties, as with low-precision outputs
        scores = np.round(scores, 1)
    return truth.astype(np.uint8), scores


@pytest.mark.parametrize("quantize", [False, True])
def test_best_thresholds_match_brute_force(quantize):
    truth, scores = make_oof(quantize=quantize)
    thresholds, best = best_thresholds(truth, scores)
    for c in range(truth.shape[1]):
        candidates = np.unique(np.concatenate([scores[:, c], [2.0]]))
        brute = max(f1_score(truth[:, c], scores[:, c] >= t, zero_division=0) for t in candidates)
        assert best[c] == pytest.approx(brute)
        # The returned threshold realises that F1.
        assert f1_score(truth[:, c], scores[:, c] >= thresholds[c], zero_division=0) == pytest.approx(brute)


def test_best_thresholds_class_without_positives():
    truth, scores = make_oof()
    truth[:, 2] = 0
    thresholds, best = best_thresholds(truth, scores)
    assert best[2] == 0.0 and thresholds[2] == 1.0


def test_f1_curves_match_sklearn():
    truth, scores = make_oof(n=120, m=4, seed=1)
    grid = np.linspace(0, 1, 11)
    curves = f1_curves(truth, scores, grid)
    for i, t in enumerate(grid):
        for c in range(4):
            assert curves[i, c] == pytest.approx(f1_score(truth[:, c], scores[:, c] >= t, zero_division=0))


def test_decide_keeps_at_least_one_label():
    scores = np.array([[0.1, 0.3, 0.2], [0.9, 0.8, 0.1], [0.05, 0.01, 0.02]])
    predicted = decide(scores, 0.5)
    assert predicted.sum(axis=1).min() >= 1
    assert predicted[0].tolist() == [False, True, False]  # top class when nothing passes
    assert predicted[1].tolist() == [True, True, False]
    assert predicted[2].tolist() == [True, False, False]


def test_fixed_and_global_oof():
    truth, scores = make_oof(seed=2)
    cfg = PredictConfig(fixed_threshold=0.4)
    inputs = ThresholdInputs(truth, scores, scores, truth.mean(axis=0))
    assert np.all(thresholds_for("fixed", inputs, cfg) == 0.4)
    chosen = thresholds_for("global_oof", inputs, cfg)
    assert np.all(chosen == chosen[0])
    brute = [f1_score(truth, scores >= t, average="macro", zero_division=0) for t in GLOBAL_GRID]
    assert chosen[0] == pytest.approx(GLOBAL_GRID[int(np.argmax(brute))])


@pytest.mark.parametrize("offset", [0.0, 0.4])
def test_oof_f1_shrinks_towards_the_global_threshold_and_falls_back_to_it_for_rare_classes(offset):
    truth, scores = make_oof(seed=3)
    scores = scores * 0.6 + offset  # offset 0.4: scores in [0.4, 1], as decoded label-embedding scores are
    truth[:, 5] = 0
    truth[:3, 5] = 1  # 3 positives: below min_positives=5
    tuned, _ = best_thresholds(truth, scores)
    cfg = PredictConfig(shrink=0.7, fixed_threshold=0.5, min_positives=5)
    inputs = ThresholdInputs(truth, scores, scores, truth.mean(0))
    anchor = thresholds_for("global_oof", inputs, cfg)[0]
    result = thresholds_for("oof_f1", inputs, cfg)
    assert result[5] == anchor
    np.testing.assert_allclose(result[:5], 0.7 * tuned[:5] + 0.3 * anchor)
    # The rare class is not predicted for most samples, whatever the score range.
    assert (scores[:, 5] >= result[5]).mean() < 0.5


def test_rate_matches_label_rate_on_target_scores():
    truth, scores = make_oof(seed=4)
    rng = np.random.default_rng(5)
    target = rng.random((500, truth.shape[1]))
    rates = np.array([0.3, 0.1, 0.02, 0.0, 0.5, 1.0])
    thresholds = thresholds_for("rate", ThresholdInputs(truth, scores, target, rates), PredictConfig())
    predicted_rate = (target >= thresholds).mean(axis=0)
    np.testing.assert_allclose(predicted_rate, np.rint(rates * 500) / 500)


def test_compare_strategies_cross_fold():
    truth, scores = make_oof(n=400, seed=6)
    folds = np.arange(400) % 4
    results = compare_strategies(truth, scores, folds, truth.mean(0), PredictConfig())
    assert set(results) == {"fixed", "oof_f1", "rate", "global_oof"}
    # fixed fits nothing, so both estimates agree; tuning in-sample is never worse than cross-fold here.
    assert results["fixed"]["in_sample"] == pytest.approx(results["fixed"]["cross_fold"])
    assert results["oof_f1"]["in_sample"] >= results["oof_f1"]["cross_fold"]
    expected = f1_per_class(truth, decide(scores, results["oof_f1"]["thresholds"])).mean()
    assert results["oof_f1"]["in_sample"] == pytest.approx(expected)
