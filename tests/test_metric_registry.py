"""A metric is one object in one registry: a toy metric registered there (and nowhere else) drives the decision
search, the ``auto`` choice and the prediction report, and every number they give is that metric's
(scikit-learn's Jaccard). The schema names exactly the registered metrics."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import jaccard_score

import src.report
from src.config import MetricConfig, PredictConfig
from src.metrics import METRICS, ClassMetric, RowMetric, get_metric
from src.report import write_report
from src.thresholds import (
    GLOBAL_GRID,
    STRATEGIES,
    Decision,
    ThresholdInputs,
    choose_strategy,
    compare_strategies,
    decision_for,
)


def jaccard_of_counts(tp, true, predicted, zero_division: float) -> np.ndarray:
    union = np.asarray(true, float) + np.asarray(predicted, float) - tp
    out = np.full(np.broadcast_shapes(np.shape(tp), union.shape), float(zero_division))
    return np.divide(np.asarray(tp, float), union, out=out, where=union > 0)


@dataclass(frozen=True)
class JaccardSamples(RowMetric):
    """Toy: mean over images of |predicted ∩ true| / |predicted ∪ true|."""

    zero_division: float
    name: ClassVar[str] = "jaccard_samples"

    @property
    def title(self) -> str:
        return "mean per-image Jaccard"

    def of_row_counts(self, tp, true, predicted) -> np.ndarray:
        return jaccard_of_counts(tp, true, predicted, self.zero_division)


@dataclass(frozen=True)
class JaccardMacro(ClassMetric):
    """Toy: mean over classes of each class's Jaccard index."""

    zero_division: float
    name: ClassVar[str] = "jaccard_macro"

    @property
    def title(self) -> str:
        return "macro-Jaccard"

    def of_class_counts(self, tp, true, predicted) -> np.ndarray:
        return jaccard_of_counts(tp, true, predicted, self.zero_division).mean(axis=-1)


def sklearn_jaccard(average: str, truth: np.ndarray, predicted) -> float:
    predicted = predicted.toarray() if hasattr(predicted, "toarray") else np.asarray(predicted)
    with warnings.catch_warnings():  # ill-defined rows or classes score zero_division, as the toy does
        warnings.simplefilter("ignore")
        return float(jaccard_score(truth, predicted.astype(bool), average=average, zero_division=0.0))


def synthetic_oof(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, m = 90, 6
    truth = rng.random((n, m)) < np.linspace(0.5, 0.08, m)
    truth[:4] = False  # images with no label: Jaccard's zero_division
    scores = np.round(np.clip(0.35 * truth + 0.65 * rng.random((n, m)), 0, 1), 2)
    return truth, scores, np.arange(n) % 3


@pytest.mark.parametrize("toy, average", [(JaccardSamples, "samples"), (JaccardMacro, "macro")])
def test_a_registered_toy_metric_drives_the_search_auto_and_the_report(toy, average, tmp_path, monkeypatch):
    monkeypatch.setitem(METRICS, toy.name, toy)  # the one place a new metric goes
    monkeypatch.setattr(src.report, "MAX_CLASSES_PLOTTED", 3)  # fewer bars: quicker to draw
    cfg_metric = MetricConfig(name=toy.name)
    assert get_metric(cfg_metric) == toy(0.0) and get_metric(toy.name) == toy(0.0)
    truth, scores, folds = synthetic_oof()
    rate = truth.mean(axis=0)
    predict_cfg = PredictConfig(max_labels=4)
    results = compare_strategies(truth, scores, folds, rate, predict_cfg, cfg_metric)

    def score(predicted) -> float:
        return sklearn_jaccard(average, truth, predicted)

    # The searches maximise the toy metric: the global thresholds and the top k are its argmax (first of equals).
    plain = [score(scores >= t) for t in GLOBAL_GRID]
    assert results["global_oof"]["decision"].thresholds[0] == GLOBAL_GRID[int(np.argmax(plain))]
    bounded = [score(Decision(np.full(6, t), 1, 4).apply(scores)) for t in GLOBAL_GRID]
    assert results["global_bounded"]["decision"].thresholds[0] == GLOBAL_GRID[int(np.argmax(bounded))]
    by_k = [score(Decision(None, top_k=k).apply(scores)) for k in range(1, 5)]
    assert results["top_k"]["decision"].top_k == int(np.argmax(by_k)) + 1
    assert len(set(np.round(plain, 9))) > 1 and max(plain) != max(by_k)  # the searches had something to choose

    # Every estimate is the toy metric of the decisions: in-sample, and cross-fold (fitted on the other folds).
    for name in STRATEGIES:
        assert results[name]["in_sample"] == pytest.approx(score(results[name]["decision"].apply(scores)), abs=1e-12)
        pooled = np.zeros_like(truth)
        for fold in np.unique(folds):
            held, fit = folds == fold, folds != fold
            inputs = ThresholdInputs(truth[fit], scores[fit], scores[held], rate)
            pooled[held] = decision_for(name, inputs, predict_cfg, cfg_metric).apply(scores[held])
        assert results[name]["cross_fold"] == pytest.approx(score(pooled), abs=1e-12), name

    chosen, why = choose_strategy("auto", results)
    assert results[chosen]["cross_fold"] == max(r["cross_fold"] for r in results.values())
    strategies, _, _ = write_report(tmp_path / "report", "header", results, chosen, truth, scores, rate, rate,
                                    metric=cfg_metric, reason=why)
    saved = pd.read_csv(tmp_path / "report" / "strategies.csv", keep_default_na=False)
    in_sample, cross_fold = f"oof_{toy.name}_in_sample", f"oof_{toy.name}_cross_fold"
    assert saved[in_sample].tolist() == [r["in_sample"] for r in results.values()]
    assert saved[cross_fold].tolist() == [r["cross_fold"] for r in results.values()]
    assert saved.loc[saved["chosen"] == "<-", "strategy"].tolist() == [chosen]
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"## Decision strategies (OOF {toy(0.0).title}, `metric.name={toy.name}`)" in report


def test_the_config_accepts_exactly_the_registered_metrics(monkeypatch):
    # Registering a metric is all a new one needs: the config checks metric.name against the registry.
    for name in METRICS:
        assert MetricConfig(name=name).name == name
    with pytest.raises(ValueError, match=r"unknown metric 'jaccard_samples'; expected one of"):
        MetricConfig(name="jaccard_samples")
    monkeypatch.setitem(METRICS, JaccardSamples.name, JaccardSamples)
    assert MetricConfig(name=JaccardSamples.name).name == "jaccard_samples"


def test_an_unknown_metric_name_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown metric 'jaccard'; expected one of \['fbeta_samples'"):
        get_metric("jaccard")
