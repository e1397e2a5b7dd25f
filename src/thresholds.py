"""Decision strategies by name (``predict.threshold``), compared on out-of-fold predictions by the
configured competition metric (a :class:`src.metrics.Metric`, which answers what a strategy asks of it).

A strategy maps (OOF truth, OOF scores, the scores to be decided, label rates) to a :class:`Decision`:
per-class thresholds, or a top k, plus the bounds on labels per image (``predict.min_labels``,
``predict.max_labels``). The Decision is what gets scored on OOF and what predict applies to test.

- ``fixed``: one threshold for every class (``predict.fixed_threshold``).
- ``oof_f1``: per class, the threshold maximising that class's F-beta with the metric's ``class_beta`` (F1,
  or ``metric.beta`` for per-image F-beta) on OOF scores, shrunk towards the ``global_oof`` threshold by
  ``predict.shrink``; classes with fewer than ``predict.min_positives`` OOF positives take the
  ``global_oof`` threshold (too rare to tune). The anchor comes from the scores themselves, so it suits
  sigmoid outputs and decoded label-embedding scores (where 0.5 means cosine 0) alike.
- ``rate``: per class, the threshold whose predicted-positive rate on the scores it is applied to equals
  the class's label rate in train (or ``predict.rate_table``).
- ``global_oof``: one threshold for every class, maximising the OOF metric of ``score >= t`` (the label
  bounds are applied afterwards, as for the strategies above).
- ``global_bounded``: one threshold for every class, maximising the OOF metric of the bounded decision
  itself (``score >= t``, then ``min_labels``..``max_labels`` labels per image): the decision that suits
  per-image F-beta.
- ``top_k``: each image's k highest-scoring labels, k in 1..``predict.max_labels`` (or a cap from the OOF
  label counts) maximising the OOF metric.

``auto`` (the default) is a choice among them, made by :func:`choose_strategy`: the strategy with the best
cross-fold OOF estimate, a tie going to the simpler one (:data:`SIMPLICITY`).

Every search is vectorised (src.metrics: a partition per row, a binning of every entry into the threshold
grid, one sort per column block), so a few thousand classes and tens of thousands of OOF rows take seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from src.config import MetricConfig, PredictConfig
from src.metrics import (
    DecisionCounts,
    Metric,
    best_thresholds,
    bound_labels,
    by_row_blocks,
    count_labels,
    decision_counts,
    get_metric,
    largest_per_column,
    take_rows,
    top_labels,
)

GLOBAL_GRID = np.linspace(0.005, 0.995, 199)
# top_k without predict.max_labels tries k up to this many times the mean OOF labels per image (at least
# TOP_K_MIN_CAP): per-image F2 rewards recall, so its best k lies above the mean label count, rarely far above.
TOP_K_CAP_FACTOR = 3.0
TOP_K_MIN_CAP = 10


@dataclass(frozen=True, eq=False)
class Decision:
    """How scores become labels: per-class thresholds then ``min_labels``..``max_labels`` labels per image,
    or each image's ``top_k`` highest-scoring labels (thresholds then unused)."""

    thresholds: np.ndarray | None = None
    min_labels: int = 1
    max_labels: int | None = None
    top_k: int | None = None

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Boolean n x m predictions for n x m scores: an array for an array, a sparse matrix (made a block of
        rows at a time) for scores read by rows."""
        return by_row_blocks(scores, self._decide_rows)

    def _decide_rows(self, scores: np.ndarray) -> np.ndarray:
        if self.top_k is not None:
            return top_labels(scores, self.top_k)
        return bound_labels(scores, scores >= self.thresholds, self.min_labels, self.max_labels)

    def class_thresholds(self, m: int) -> np.ndarray:
        """The per-class thresholds, NaN where the decision has none (top_k)."""
        return np.full(m, np.nan) if self.thresholds is None else np.broadcast_to(self.thresholds, (m,)).astype(float)

    def describe(self) -> str:
        """One line for the report: 'top 3', 'threshold 0.350, 1+ labels', 'per class 0.12..0.61, 1-5 labels'."""
        if self.top_k is not None:
            return f"top {self.top_k}"
        values = np.asarray(self.thresholds, dtype=float)
        low, high = float(values.min()), float(values.max())
        rule = f"threshold {low:.3f}" if low == high else f"per class {low:.3f}..{high:.3f}"
        if self.max_labels is not None:
            return f"{rule}, {self.min_labels}-{self.max_labels} labels"
        return f"{rule}, {self.min_labels}+ labels" if self.min_labels else rule


@dataclass
class ThresholdInputs:
    oof_true: np.ndarray  # n x m multi-hot, dense or scipy.sparse
    oof_scores: np.ndarray  # n x m: an array, or scores read by rows (src.score_table.ScoreRows)
    target_scores: np.ndarray  # the scores the decision will be applied to (OOF or test)
    label_rate: np.ndarray  # m: positive rate of each class in train (or the user's table)
    # Global thresholds already searched on these inputs (global_oof and oof_f1's anchor are the same search).
    searched: dict = field(default_factory=dict, repr=False)


def _bounded(thresholds: np.ndarray, cfg: PredictConfig) -> Decision:
    return Decision(np.asarray(thresholds, dtype=float), cfg.min_labels, cfg.max_labels)


def _global_threshold(inputs: ThresholdInputs, cfg: PredictConfig, metric: Metric, bounded: bool) -> float:
    """The grid threshold maximising the OOF metric (the first of equals), with or without the label bounds."""
    bounds = (cfg.min_labels, cfg.max_labels) if bounded else (0, None)
    key = (metric, bounds)  # a metric object is equal to another of its class with the same settings
    if key not in inputs.searched:
        curve = metric.curve(inputs.oof_true, inputs.oof_scores, GLOBAL_GRID, *bounds)
        inputs.searched[key] = float(GLOBAL_GRID[int(np.argmax(curve))])
    return inputs.searched[key]


def fixed(inputs: ThresholdInputs, cfg: PredictConfig, metric: Metric) -> Decision:
    return _bounded(np.full(inputs.oof_scores.shape[1], cfg.fixed_threshold), cfg)


def oof_f1(inputs: ThresholdInputs, cfg: PredictConfig, metric: Metric) -> Decision:
    m = inputs.oof_scores.shape[1]
    anchor = _global_threshold(inputs, cfg, metric, bounded=False)
    thresholds = np.full(m, anchor)
    tuned_classes = np.flatnonzero(count_labels(inputs.oof_true, 0) >= cfg.min_positives)  # the others: too rare
    if len(tuned_classes):
        truth = inputs.oof_true[:, tuned_classes] if len(tuned_classes) < m else inputs.oof_true
        tuned, _ = best_thresholds(truth, inputs.oof_scores, metric.class_beta, columns=tuned_classes)
        thresholds[tuned_classes] = cfg.shrink * tuned + (1 - cfg.shrink) * anchor
    return _bounded(thresholds, cfg)


def rate(inputs: ThresholdInputs, cfg: PredictConfig, metric: Metric) -> Decision:
    scores = inputs.target_scores
    n = scores.shape[0]
    keep = np.clip(np.rint(inputs.label_rate * n).astype(int), 0, n)  # samples to predict positive
    top, highest = largest_per_column(scores, np.stack([np.maximum(keep - 1, 0), np.zeros_like(keep)]))
    return _bounded(np.where(keep > 0, top, np.nextafter(highest, np.inf)), cfg)  # keep == 0: above every score


def global_oof(inputs: ThresholdInputs, cfg: PredictConfig, metric: Metric) -> Decision:
    threshold = _global_threshold(inputs, cfg, metric, bounded=False)
    return _bounded(np.full(inputs.oof_scores.shape[1], threshold), cfg)


def global_bounded(inputs: ThresholdInputs, cfg: PredictConfig, metric: Metric) -> Decision:
    threshold = _global_threshold(inputs, cfg, metric, bounded=True)
    return _bounded(np.full(inputs.oof_scores.shape[1], threshold), cfg)


def top_k_cap(oof_true, m: int, cfg: PredictConfig) -> int:
    """Largest k top_k tries: ``predict.max_labels``, else a multiple of the mean OOF labels per image."""
    if cfg.max_labels is not None:
        return min(cfg.max_labels, m)
    n = max(oof_true.shape[0], 1)
    mean_labels = float(count_labels(oof_true, None)) / n
    return min(m, max(TOP_K_MIN_CAP, math.ceil(TOP_K_CAP_FACTOR * mean_labels)))


def top_k(inputs: ThresholdInputs, cfg: PredictConfig, metric: Metric) -> Decision:
    m = inputs.oof_scores.shape[1]
    curve = metric.top_k_curve(inputs.oof_true, inputs.oof_scores, top_k_cap(inputs.oof_true, m, cfg))
    k = int(np.argmax(curve)) + 1  # the smallest of equally good k
    return Decision(None, k, k, top_k=k)


STRATEGIES = {"fixed": fixed, "oof_f1": oof_f1, "rate": rate, "global_oof": global_oof,
              "global_bounded": global_bounded, "top_k": top_k}
# Simplest first, by what a strategy fits: nothing; one threshold; one threshold knowing the label bounds; one k;
# a threshold per class from label rates (not from the OOF truth); a threshold per class tuned on OOF F1. Of
# strategies with equal cross-fold estimates, auto takes the simplest: it has the fewest ways to have been lucky.
SIMPLICITY = ("fixed", "global_oof", "global_bounded", "top_k", "rate", "oof_f1")
AUTO = "auto"
# Cross-fold estimates equal to this many decimals are a tie (the same decisions give the same score; sums in
# another order may differ in the last bits).
TIE_DECIMALS = 12


def decision_for(name: str, inputs: ThresholdInputs, cfg: PredictConfig,
                 metric: MetricConfig | Metric | None = None) -> Decision:
    """The decision of strategy ``name``, tuned for ``metric`` (a config section or a metric; default: macro-F1)."""
    return STRATEGIES[name](inputs, cfg, get_metric(metric))


def choose_strategy(requested: str, results: dict[str, dict]) -> tuple[str, str]:
    """The strategy to apply to test and why, in words for the report. ``auto``: the best ``cross_fold``
    estimate of :func:`compare_strategies`' ``results``, a tie going to the simpler strategy (``SIMPLICITY``);
    any other name is the configured strategy, taken as it is."""
    if requested != AUTO:
        return requested, f"configured (predict.threshold={requested})"

    def estimate(name: str) -> float:
        return round(results[name]["cross_fold"], TIE_DECIMALS)

    ranked = sorted(results, key=lambda name: (-estimate(name), SIMPLICITY.index(name)))
    best = ranked[0]
    tied = [name for name in ranked[1:] if estimate(name) == estimate(best)]
    behind = [f"{results[name]['cross_fold']:.3f} ({name})" for name in ranked[1:] if name not in tied]
    why = f"auto: best cross-fold OOF estimate {results[best]['cross_fold']:.3f}"
    if tied:
        why += f", tied with {', '.join(tied)}; ties go to the simpler strategy"
    return best, why + (f" vs {', '.join(behind)}" if behind else "")


def compare_strategies(oof_true, oof_scores: np.ndarray, oof_fold: np.ndarray, label_rate: np.ndarray,
                       cfg: PredictConfig, metric: MetricConfig | Metric | None = None) -> dict[str, dict]:
    """Every strategy on the OOF predictions, scored by ``metric`` (default: macro-F1), two ways:

    - ``in_sample``: decision fitted on all OOF rows and scored on the same rows (optimistic for the
      tuned strategies);
    - ``cross_fold``: for each fold, decision fitted on the other folds' OOF rows and applied to this
      fold's rows; the metric of the pooled predictions. This is the honest estimate of what the strategy
      will score on unseen data, and shows when tuning overfits.

    Each entry also holds the fitted ``decision``, its per-class ``thresholds`` (NaN for top_k), the in-sample
    ``per_class_f1`` and ``predicted_rate`` per class, and ``labels_per_image`` (mean, in-sample).

    Decisions are scored from their confusion counts (src.metrics.decision_counts), a block of rows at a time:
    no prediction matrix is made, so scores read by rows (many classes) are compared without n x m in memory.
    With one fold the cross-fold decision is the in-sample one (fitted on the same rows) and is not fitted twice.
    """
    metric = get_metric(metric)
    results = {}
    folds = np.unique(oof_fold)
    n, m = oof_scores.shape
    inputs = ThresholdInputs(oof_true, oof_scores, oof_scores, label_rate)
    splits = []  # (held rows, the inputs fitted on the other folds), shared by every strategy
    if len(folds) > 1:
        for fold in folds:
            held, fit = np.flatnonzero(oof_fold == fold), np.flatnonzero(oof_fold != fold)
            splits.append((held, ThresholdInputs(oof_true[fit], take_rows(oof_scores, fit),
                                                 take_rows(oof_scores, held), label_rate)))
    # A ranking metric reads the scores only: the same for every decision, computed once.
    ranking = metric.score(oof_true, None, oof_scores) if metric.ranks_scores else None
    for name in STRATEGIES:
        decision = decision_for(name, inputs, cfg, metric)
        counts = decision_counts(oof_true, oof_scores, decision.apply)
        cross = counts
        if splits:
            cross = DecisionCounts.assemble(n, [
                (held, decision_counts(oof_true[held], fold_inputs.target_scores,
                                       decision_for(name, fold_inputs, cfg, metric).apply))
                for held, fold_inputs in splits])
        results[name] = {"decision": decision, "thresholds": decision.class_thresholds(m),
                         "per_class_f1": counts.f1_per_class(),
                         "in_sample": metric.of_counts(counts) if ranking is None else ranking,
                         "cross_fold": metric.of_counts(cross) if ranking is None else ranking,
                         "predicted_rate": counts.predicted_class / n,
                         "labels_per_image": float(counts.predicted_row.mean())}
    return results
