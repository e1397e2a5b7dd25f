"""Threshold search and decision strategies against brute-force references and constructed OOF sets whose
best decision is known; the default config against the figures of the previous release."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from sklearn.metrics import f1_score

from benchmarks.bench_thresholds import synthetic_oof
from src.config import ConfigError, MetricConfig, PredictConfig, build_config
from src.metrics import best_thresholds, decide, f1_curves, f1_per_class, fbeta_samples
from src.thresholds import (
    GLOBAL_GRID,
    SIMPLICITY,
    STRATEGIES,
    ThresholdInputs,
    choose_strategy,
    compare_strategies,
    decision_for,
)


def thresholds_for(name, inputs, cfg, metric=None):
    return decision_for(name, inputs, cfg, metric).thresholds


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
        kept = scores[:, c][None, :] >= candidates[:, None]  # every candidate threshold at once
        tp = (kept & truth[:, c].astype(bool)).sum(axis=1)
        brute = np.max(2 * tp / (truth[:, c].sum() + kept.sum(axis=1)))
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
    assert set(results) == {"fixed", "oof_f1", "rate", "global_oof", "global_bounded", "top_k"}
    # fixed fits nothing, so both estimates agree; tuning in-sample is never worse than cross-fold here.
    assert results["fixed"]["in_sample"] == pytest.approx(results["fixed"]["cross_fold"])
    assert results["oof_f1"]["in_sample"] >= results["oof_f1"]["cross_fold"]
    expected = f1_per_class(truth, decide(scores, results["oof_f1"]["thresholds"])).mean()
    assert results["oof_f1"]["in_sample"] == pytest.approx(expected)


# Figures of the previous release (macro-F1, four strategies), computed before decisions and metrics became
# configurable: the default config must give exactly these, so nothing changes for existing users.
PREVIOUS_RELEASE = {
    "make_oof": {"fixed": (0.4932881512476058, 0.4932881512476058, 3.0),
                 "oof_f1": (0.6024198049996744, 0.5812925178926968, 3.8741812291007913),
                 "rate": (0.5635431299907292, 0.5573070024217127, 3.769822221738469),
                 "global_oof": (0.550118486143449, 0.550118486143449, 4.2)},
    "hpa_like": {"fixed": (0.5659567712223293, 0.5659567712223293, 14.0),
                 "oof_f1": (0.6101630418386937, 0.5902183722482466, 15.744699090719223),
                 "rate": (0.5950630331915585, 0.5920026898973424, 15.307122230529785),
                 "global_oof": (0.5854380531820887, 0.5835092031258033, 16.099999999999998)},
}


@pytest.mark.parametrize("dataset", ["make_oof", "hpa_like"])
def test_default_config_reproduces_the_previous_release(dataset):
    if dataset == "make_oof":
        truth, scores = make_oof(n=400, seed=6)
        folds = np.arange(400) % 4
    else:  # power-law label rates and 6-decimal probabilities, as HPA's oof.csv
        truth, scores = synthetic_oof(3000, 28, seed=3)
        folds = np.random.default_rng(1).integers(0, 5, 3000)
    results = compare_strategies(truth, scores, folds, truth.mean(axis=0), build_config({}).predict,
                                 build_config({}).metric)
    for name, (in_sample, cross_fold, threshold_sum) in PREVIOUS_RELEASE[dataset].items():
        assert results[name]["in_sample"] == in_sample, name  # exactly: same decisions, same arithmetic
        assert results[name]["cross_fold"] == cross_fold, name
        assert results[name]["thresholds"].sum() == pytest.approx(threshold_sum, rel=1e-6), name


def ranked_oof(n=120, m=10, positives=3, seed=7):
    """Every image has exactly ``positives`` true labels, and they outrank its other labels; the score
    levels differ between images, so no single threshold separates them all."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, m), bool)
    for row in truth:
        row[rng.choice(m, positives, replace=False)] = True
    level = rng.uniform(0.1, 0.8, (n, 1))  # per image
    scores = np.where(truth, level + rng.uniform(0.1, 0.2, (n, m)), level * rng.uniform(0.3, 0.9, (n, m)))
    return truth, np.clip(scores, 0, 1)


@pytest.mark.parametrize("metric", [MetricConfig(name="fbeta_samples", beta=2.0), MetricConfig(name="micro_f1"),
                                    MetricConfig(name="macro_f1")], ids=lambda m: m.name)
def test_top_k_picks_three_when_every_image_has_three_positives_ranked_first(metric):
    truth, scores = ranked_oof()
    results = compare_strategies(truth, scores, np.arange(len(truth)) % 3, truth.mean(axis=0), PredictConfig(),
                                 metric)
    assert results["top_k"]["decision"].top_k == 3
    assert results["top_k"]["in_sample"] == results["top_k"]["cross_fold"] == 1.0
    assert results["top_k"]["labels_per_image"] == 3
    assert np.isnan(results["top_k"]["thresholds"]).all()
    # The per-image score levels defeat any single threshold.
    assert results["global_oof"]["in_sample"] < 0.95


def test_global_bounded_tunes_its_threshold_knowing_the_minimum_label_rule():
    # Half the images: one positive at 0.2 over negatives at 0.1; the other half: one positive at 0.8 over
    # three negatives at 0.5. A threshold in (0.5, 0.8] is perfect once every empty row gets its top label; a
    # threshold tuned without that rule stays below 0.2 to catch the first half, and over-predicts the second.
    n, m = 40, 5
    truth = np.zeros((n, m), bool)
    scores = np.zeros((n, m))
    truth[:20, 0], scores[:20, 0], scores[:20, 1:] = True, 0.2, 0.1
    truth[20:, 1], scores[20:, 1], scores[20:, 2:] = True, 0.8, 0.5
    metric = MetricConfig(name="fbeta_samples")
    results = compare_strategies(truth, scores, np.arange(n) % 2, truth.mean(axis=0), PredictConfig(), metric)
    bounded = results["global_bounded"]["decision"].thresholds[0]
    assert 0.5 < bounded <= 0.8 and results["global_bounded"]["in_sample"] == 1.0
    assert results["global_oof"]["decision"].thresholds[0] <= 0.2
    assert results["global_oof"]["in_sample"] == pytest.approx((1 + 5 / 8) / 2)  # F2 of 1 right + 3 wrong: 5/8


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_label_bounds_hold_on_every_row_for_every_strategy(name):
    truth, scores = make_oof(n=200, m=8, seed=8)
    cfg = PredictConfig(min_labels=2, max_labels=3, fixed_threshold=0.3)
    inputs = ThresholdInputs(truth, scores, scores[::-1], truth.mean(axis=0))
    count = decision_for(name, inputs, cfg, MetricConfig(name="fbeta_samples")).apply(scores[::-1]).sum(axis=1)
    assert count.min() >= 2 and count.max() <= 3
    if name != "top_k":  # unbounded, the strategies would give some rows fewer or more
        loose = decision_for(name, inputs, PredictConfig(fixed_threshold=0.3),
                             MetricConfig(name="fbeta_samples")).apply(scores[::-1]).sum(axis=1)
        assert loose.min() < 2 or loose.max() > 3


def test_min_above_max_labels_is_a_config_error():
    with pytest.raises(ConfigError, match="max_labels"):
        build_config({"predict": {"min_labels": 3, "max_labels": 2}})


def test_sparse_truth_gives_the_same_comparison_as_dense():
    truth, scores = make_oof(n=300, m=8, seed=9)
    folds = np.arange(300) % 3
    metric = MetricConfig(name="fbeta_samples")
    cfg = PredictConfig(max_labels=4)
    dense = compare_strategies(truth, scores, folds, truth.mean(axis=0), cfg, metric)
    csr = compare_strategies(sparse.csr_matrix(truth), scores, folds, truth.mean(axis=0), cfg, metric)
    for name in STRATEGIES:
        assert csr[name]["in_sample"] == pytest.approx(dense[name]["in_sample"])
        assert csr[name]["cross_fold"] == pytest.approx(dense[name]["cross_fold"])
        np.testing.assert_array_equal(csr[name]["thresholds"], dense[name]["thresholds"])
        expected = fbeta_samples(truth, csr[name]["decision"].apply(scores), beta=2.0)
        assert csr[name]["in_sample"] == pytest.approx(expected)


def test_per_class_strategy_tunes_f2_thresholds_where_a_class_has_enough_positives():
    truth, scores = make_oof(seed=10)
    truth[:, 5] = 0
    truth[:3, 5] = 1  # 3 positives: below min_positives
    metric = MetricConfig(name="fbeta_samples", beta=2.0)
    inputs = ThresholdInputs(truth, scores, scores, truth.mean(axis=0))
    cfg = PredictConfig(min_positives=5)
    result = thresholds_for("oof_f1", inputs, cfg, metric)
    tuned_f2, _ = best_thresholds(truth[:, :5], scores[:, :5], beta=2.0)
    np.testing.assert_array_equal(result[:5], tuned_f2)
    assert result[5] == thresholds_for("global_oof", inputs, cfg, metric)[0]
    # F2 favours recall: its thresholds sit at or below the F1 ones.
    assert (tuned_f2 <= best_thresholds(truth[:, :5], scores[:, :5])[0]).all()


def test_auto_is_the_default_and_applies_the_best_cross_fold_estimate_not_the_best_in_sample():
    assert build_config({}).predict.threshold == "auto"
    truth, scores = synthetic_oof(3000, 28, seed=3)  # the hpa_like set above: oof_f1 wins in-sample only
    folds = np.random.default_rng(1).integers(0, 5, 3000)
    results = compare_strategies(truth, scores, folds, truth.mean(axis=0), PredictConfig())
    chosen, why = choose_strategy("auto", results)
    cross_fold = {name: r["cross_fold"] for name, r in results.items()}
    assert chosen == max(cross_fold, key=cross_fold.get) == "rate"
    assert max(results, key=lambda name: results[name]["in_sample"]) == "oof_f1"
    assert why.startswith(f"auto: best cross-fold OOF estimate {cross_fold['rate']:.3f} vs ")
    assert f"{cross_fold['oof_f1']:.3f} (oof_f1)" in why and "tied" not in why


def fake_results(**cross_fold):
    """compare_strategies' results as choose_strategy reads them: a cross-fold estimate per strategy."""
    return {name: {"cross_fold": cross_fold.get(name, 0.5)} for name in STRATEGIES}


def test_auto_gives_a_tie_to_the_simpler_strategy():
    assert sorted(SIMPLICITY) == sorted(STRATEGIES)  # every strategy has a place in the order
    chosen, why = choose_strategy("auto", fake_results(oof_f1=0.7, global_oof=0.7, rate=0.69))
    assert chosen == "global_oof" and "tied with oof_f1" in why and "0.690 (rate)" in why
    assert choose_strategy("auto", fake_results(top_k=0.8, rate=0.8))[0] == "top_k"
    # Equal up to the last bits (the same decisions, summed in another order) is still a tie.
    assert choose_strategy("auto", fake_results(oof_f1=0.7, global_bounded=0.7 - 1e-15))[0] == "global_bounded"
    assert choose_strategy("auto", fake_results(oof_f1=0.7, global_bounded=0.7 - 1e-9))[0] == "oof_f1"
    # A ranking metric scores every strategy alike: the simplest is applied.
    assert choose_strategy("auto", {name: {"cross_fold": 0.4} for name in STRATEGIES})[0] == "fixed"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_named_strategy_is_applied_whatever_the_comparison_says(name):
    results = fake_results(**{other: 0.9 for other in STRATEGIES if other != name})
    assert choose_strategy(name, results) == (name, f"configured (predict.threshold={name})")


def test_scores_read_by_rows_give_the_same_comparison_and_decisions_as_an_array(tmp_path, monkeypatch):
    """Many classes: OOF scores stay in their table and every search reads it in row blocks or column slabs (here
    small ones, so each search crosses several); the results are the array's, to the bit."""
    import src.metrics
    from src.score_table import ScoreTableWriter

    monkeypatch.setattr(src.metrics, "BLOCK_ENTRIES", 5000)
    monkeypatch.setattr(src.metrics, "SLAB_ENTRIES", 3000 * 7)
    truth, scores = synthetic_oof(3000, 28, seed=3)
    scores = scores.astype(np.float32)
    folds = np.sort(np.random.default_rng(1).integers(0, 5, 3000))  # a table's rows come fold by fold
    writer = ScoreTableWriter(tmp_path / "oof.npz", [str(i) for i in range(3000)], 28, np.float32)
    writer.append(scores)
    table = writer.close()
    for metric in (MetricConfig(), MetricConfig(name="fbeta_samples"), MetricConfig(name="precision_at_k", k=2)):
        cfg = PredictConfig(min_labels=2, max_labels=4) if metric.name == "fbeta_samples" else PredictConfig()
        dense = compare_strategies(truth, scores, folds, truth.mean(axis=0), cfg, metric)
        rows = compare_strategies(sparse.csr_matrix(truth), table, folds, truth.mean(axis=0), cfg, metric)
        for name in STRATEGIES:
            for key in ("in_sample", "cross_fold", "labels_per_image"):
                assert rows[name][key] == dense[name][key], (metric.name, name, key)
            for key in ("thresholds", "per_class_f1", "predicted_rate"):
                np.testing.assert_array_equal(rows[name][key], dense[name][key])
            predicted = rows[name]["decision"].apply(table)
            assert sparse.issparse(predicted)
            np.testing.assert_array_equal(predicted.toarray(), dense[name]["decision"].apply(scores))
