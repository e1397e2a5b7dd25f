"""The prediction report for many classes and a per-image metric: columns named after the metric, every
class in per_class.csv, the most frequent ones in report.md and the plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

import src.report
from src.config import MetricConfig, PredictConfig
from src.report import MAX_CLASSES_LISTED, write_report
from src.thresholds import choose_strategy, compare_strategies


def test_many_class_report_follows_the_metric_and_caps_what_people_read(tmp_path, monkeypatch):
    monkeypatch.setattr(src.report, "MAX_CLASSES_PLOTTED", 4)  # small multiples are slow to draw, and 4 show it
    rng = np.random.default_rng(0)
    n, m = 240, MAX_CLASSES_LISTED + 10
    rates = 0.3 / np.arange(1, m + 1) ** 0.7  # power-law label frequencies
    truth = rng.random((n, m)) < rates
    scores = np.clip(0.4 * truth + 0.6 * rng.random((n, m)), 0, 1)
    metric = MetricConfig(name="fbeta_samples", beta=2.0)
    oof_true = sparse.csr_matrix(truth)
    results = compare_strategies(oof_true, scores, np.arange(n) % 3, truth.mean(axis=0),
                                 PredictConfig(max_labels=6), metric)
    strategies, classes, plots = write_report(tmp_path / "report", "header", results, "top_k", oof_true, scores,
                                              truth.mean(axis=0), truth.mean(axis=0), metric=metric,
                                              reason="configured (predict.threshold=top_k)")
    saved = pd.read_csv(tmp_path / "report" / "strategies.csv", keep_default_na=False)
    assert list(saved.columns[1:3]) == ["oof_f2_samples_in_sample", "oof_f2_samples_cross_fold"]
    assert saved.loc[saved["chosen"] == "<-", "strategy"].tolist() == ["top_k"]
    assert saved["oof_f2_samples_in_sample"].tolist() == [r["in_sample"] for r in results.values()]
    per_class = pd.read_csv(tmp_path / "report" / "per_class.csv")
    assert len(per_class) == m and per_class["threshold"].isna().all()  # top_k has no thresholds
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"The {MAX_CLASSES_LISTED} most frequent of {m} classes" in report and "mean per-image F2" in report
    assert "Applied to test: **top_k**: configured (predict.threshold=top_k)." in report
    rows = report.split("## Per class")[1].split("```")[1].strip().splitlines()[1:]
    listed = [int(row.split()[0]) for row in rows]
    support = truth.sum(axis=0)
    assert len(listed) == MAX_CLASSES_LISTED and support[listed].min() >= np.delete(support, listed).max()
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_says_which_strategy_auto_applied_and_why(tmp_path, monkeypatch):
    monkeypatch.setattr(src.report, "MAX_CLASSES_PLOTTED", 2)
    rng = np.random.default_rng(1)
    truth = rng.random((120, 5)) < 0.3
    scores = np.clip(0.4 * truth + 0.6 * rng.random((120, 5)), 0, 1)
    results = compare_strategies(truth, scores, np.arange(120) % 3, truth.mean(axis=0), PredictConfig())
    chosen, why = choose_strategy("auto", results)
    write_report(tmp_path / "report", "header", results, chosen, truth, scores, truth.mean(axis=0),
                 truth.mean(axis=0), reason=why)
    saved = pd.read_csv(tmp_path / "report" / "strategies.csv", keep_default_na=False)
    assert saved.loc[saved["chosen"] == "<-", "strategy"].tolist() == [chosen]
    assert saved["oof_macro_f1_cross_fold"].max() == results[chosen]["cross_fold"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"Applied to test: **{chosen}**: auto: best cross-fold OOF estimate" in report
