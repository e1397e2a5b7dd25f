"""How the runs of an ensemble become one score matrix (``predict.weights``, ``predict.stack``), and the honest
comparison of the ways to do it.

- ``hand``: the weighted mean with ``predict.runs[].weight`` (the default, what predict always did);
- ``equal``: every run weight 1;
- ``search``: non-negative weights (sum 1) maximising the competition metric after the decision strategy on the
  rows they are fitted on. The metric after a decision is a step function of the weights (a gradient method such
  as ``scipy.optimize.minimize`` sees flat ground), so the search is a coordinate search on the simplex: each run's
  share is tried at every point of :data:`SHARE_GRID` with the others scaled to fill the rest, in rounds until
  nothing improves, from equal weights (a tie keeps the current weights). ``predict.weights_per_class``: one weight
  per run and class, each class keeping the share that gives its best F-beta (the metric's ``class_beta``; the
  per-class part of macro F1), all classes searched at once;
- ``stack``: per class a logistic regression (scikit-learn) over the runs' logits of that class (and with
  ``predict.stack_other_classes`` every class's mean logit: label co-occurrence). The decision on top of it is
  fitted on cross-fitted scores (:data:`INNER_PARTS` seeded parts of the rows it was fitted on, each scored by a
  model fitted on the other parts): never on scores of rows the model saw.

:func:`compare_blends` gives each way an in-sample estimate (blend and decision fitted and scored on all rows) and
a cross-fold one: for each fold, the blend and the decision are fitted on the other folds' rows only and applied
to this fold's; the metric of the pooled counts is the honest estimate. :func:`choose_blend`'s ``auto`` takes the
best cross-fold estimate, a tie going to the simpler way (:data:`BLEND_SIMPLICITY`).

Fitting a blend holds the rows it is fitted on in memory (float32): above :data:`BLEND_MAX_CELLS` scores (rows x
classes x runs; Inclusive Images' 340 k x 7 178 OOF is 2.4 G per run) predict says so and keeps the hand weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np

from src.config import PipelineError, PredictConfig
from src.metrics import DecisionCounts, Metric, best_thresholds, decision_counts, take_rows
from src.score_table import ScoreRows, combine_scores
from src.thresholds import ThresholdInputs, decision_for, pseudo_folds

# Simplest first, by what a way fits: nothing (the user's weights), nothing, a weight per run (or per run and
# class), a model per class. Of equal cross-fold estimates auto takes the simplest.
BLEND_SIMPLICITY = ("hand", "equal", "search", "stack")
# A run's share of the weights tried by the search (the others scaled to fill the rest).
SHARE_GRID = np.linspace(0.0, 1.0, 11)
SEARCH_ROUNDS = 4
# A candidate must beat the current weights by more than this to replace them (sums in another order differ in
# the last bits; a tie keeps the simpler, current weights).
IMPROVEMENT = 1e-9
# The stack's decision is fitted on scores cross-fitted over this many seeded parts of its rows.
INNER_PARTS = 5
# Scores (rows x classes x runs) a blend is fitted on in memory at most: 400 MB of float32.
BLEND_MAX_CELLS = 100_000_000
LOGIT_EPS = 1e-6
# predict.stack_other_classes gives each class's model every class's score: m models of m + r inputs.
STACK_OTHER_MAX_CLASSES = 200


def check_blend_config(cfg: PredictConfig, num_classes: int) -> None:
    """Refuse, before any scoring, a stack over every class's scores that the class count makes impractical."""
    if cfg.stack != "none" and cfg.stack_other_classes and num_classes > STACK_OTHER_MAX_CLASSES:
        raise PipelineError(f"predict.stack_other_classes=true with {num_classes} classes: each class's model would "
                            f"take {num_classes} more inputs (at most {STACK_OTHER_MAX_CLASSES} classes); set it to "
                            "false")


def weighted_mean(weights: list, parts: list[np.ndarray]) -> np.ndarray:
    """An ensemble's scores: the runs' scores weighted by ``weights`` (numbers, or one array of per-class weights
    per run)."""
    return sum(weight * scores for weight, scores in zip(weights, parts)) / sum(weights)


@dataclass
class BlendSetting:
    """What a blend is tuned for: the decision strategy applied after it, its settings, the metric, the train
    label rates (``rate``) and the runs' configured weights (``hand``)."""

    strategy: str
    predict: PredictConfig
    metric: Metric
    label_rate: np.ndarray
    hand: np.ndarray


def _logit(scores: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(scores, dtype=np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(clipped / (1 - clipped))


@dataclass(eq=False)
class LogisticStack:
    """Per class c: ``sigmoid(own[c] . logit(s_1c..s_rc) + other[c] . logit(mean scores) + intercept[c])``: one
    scikit-learn LogisticRegression per class, kept as its coefficients. A class with one label value in the rows
    it was fitted on averages the runs' logits instead (nothing to learn from)."""

    own: np.ndarray  # m x r
    intercept: np.ndarray  # m
    other: np.ndarray | None = None  # m x m, with predict.stack_other_classes

    @classmethod
    def fit(cls, truth, parts: list[np.ndarray], other_classes: bool = False) -> LogisticStack:
        from sklearn.linear_model import LogisticRegression  # scikit-learn only when stacking is asked for

        r, m = len(parts), parts[0].shape[1]
        own, intercept = np.full((m, r), 1.0 / r), np.zeros(m)
        other = np.zeros((m, m)) if other_classes else None
        logits = [_logit(part) for part in parts]
        mean_logit = _logit(np.mean(parts, axis=0)) if other_classes else None
        dense = truth.toarray() if hasattr(truth, "toarray") else np.asarray(truth)
        for c in range(m):
            y = dense[:, c]
            if y.min() == y.max():
                continue
            features = np.stack([logit[:, c] for logit in logits], axis=1)
            if other_classes:
                features = np.concatenate([features, mean_logit], axis=1)
            model = LogisticRegression(max_iter=500).fit(features, y)
            own[c], intercept[c] = model.coef_[0, :r], model.intercept_[0]
            if other_classes:
                other[c] = model.coef_[0, r:]
        return cls(own, intercept, other)

    def predict(self, parts: list[np.ndarray]) -> np.ndarray:
        """The stacked scores of the rows of ``parts`` (one array per run, the same rows)."""
        z = sum(self.own[:, i] * _logit(part) for i, part in enumerate(parts)) + self.intercept
        if self.other is not None:
            z = z + _logit(np.mean(parts, axis=0)) @ self.other.T
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


@dataclass(eq=False)
class Blend:
    """One way of combining the runs' scores: weights (one per run, or runs x classes) or a stack. ``fitted``: the
    scores of the rows it was fitted on that a decision is fitted on (for a stack, cross-fitted)."""

    method: str
    weights: np.ndarray | None = None
    stack: LogisticStack | None = None
    fitted: np.ndarray | ScoreRows | None = field(default=None, repr=False)

    def combine(self, parts: list[np.ndarray | ScoreRows], index: list | None = None) -> np.ndarray | ScoreRows:
        """The blend of the same rows of every run's scores (``index``: which rows of each part, as
        :func:`src.score_table.combine_scores`); tables are combined a block of rows at a time."""
        if self.stack is not None:
            return combine_scores(parts, self.stack.predict, index)
        weights = self.weights.tolist() if self.weights.ndim == 1 else list(self.weights)
        return combine_scores(parts, partial(weighted_mean, weights), index)

    @property
    def run_weights(self) -> list[float] | None:
        """One weight per run (summing to what they sum to), or None for per-class weights and stacks."""
        return None if self.stack is not None or self.weights.ndim != 1 else [float(w) for w in self.weights]

    def describe(self) -> str:
        """'hand 1, 3', 'search 0.9, 0.1', 'search per class (mean 0.62, 0.38)', 'stack logistic'."""
        if self.stack is not None:
            return "stack logistic" + (" with the other classes" if self.stack.other is not None else "")
        if self.weights.ndim == 2:
            share = self.weights / self.weights.sum(axis=0)
            return f"{self.method} per class (mean {', '.join(f'{w:.2f}' for w in share.mean(axis=1))})"
        return f"{self.method} {', '.join(f'{w:.3g}' for w in self.weights)}"

    def record(self) -> dict:
        """The blend as decision.json keeps it."""
        weights = None if self.weights is None else self.weights.tolist()
        # The m x m coefficients on the other classes are left out: 7 178 classes would make 51 M numbers.
        stack = None if self.stack is None else {
            "own": self.stack.own.tolist(), "intercept": self.stack.intercept.tolist(),
            "other_classes": self.stack.other is not None}
        return {"method": self.method, "describe": self.describe(), "weights": weights, "stack": stack}


def decided_score(truth, scores: np.ndarray, setting: BlendSetting) -> float:
    """The metric of ``setting.strategy``'s decision fitted and scored on (``truth``, ``scores``)."""
    metric = setting.metric
    if metric.ranks_scores:
        return float(metric.score(truth, None, scores))
    decision = decision_for(setting.strategy, ThresholdInputs(truth, scores, scores, setting.label_rate),
                            setting.predict, metric)
    return float(metric.of_counts(decision_counts(truth, scores, decision.apply)))


def _with_share(weights: np.ndarray, run: int, share: float) -> np.ndarray:
    """``weights`` (runs x ..., each column summing to 1) with run ``run``'s share set to ``share`` and the other
    runs scaled to fill the rest (equally where they held nothing)."""
    rest = 1.0 - weights[run]
    scaled = np.where(rest > 0, weights * (1.0 - share) / np.where(rest > 0, rest, 1.0),
                      (1.0 - share) / max(len(weights) - 1, 1))
    scaled[run] = share
    return scaled


def search_weights(truth, parts: list[np.ndarray], setting: BlendSetting) -> np.ndarray:
    """Non-negative weights summing to 1, one per run, maximising :func:`decided_score` of the weighted mean:
    the coordinate search on the simplex (module docstring), from equal weights."""
    r = len(parts)
    weights = np.full(r, 1.0 / r)
    best = decided_score(truth, weighted_mean(weights.tolist(), parts), setting)
    for _ in range(SEARCH_ROUNDS):
        improved = False
        for run in range(r):
            for share in SHARE_GRID:
                candidate = _with_share(weights, run, share)
                score = decided_score(truth, weighted_mean(candidate.tolist(), parts), setting)
                if score > best + IMPROVEMENT:
                    weights, best, improved = candidate, score, True
        if not improved:
            break
    return weights


def search_class_weights(truth, parts: list[np.ndarray], setting: BlendSetting) -> np.ndarray:
    """Non-negative runs x classes weights (each class's summing to 1) maximising each class's best F-beta
    (``metric.class_beta``, src.metrics.best_thresholds): every class searched at once, each keeping its own
    best share."""
    r, m = len(parts), parts[0].shape[1]
    beta = setting.metric.class_beta

    def class_scores(weights: np.ndarray) -> np.ndarray:
        return best_thresholds(truth, weighted_mean(list(weights), parts), beta)[1]

    weights = np.full((r, m), 1.0 / r)
    best = class_scores(weights)
    for _ in range(SEARCH_ROUNDS):
        improved = False
        for run in range(r):
            for share in SHARE_GRID:
                candidate = _with_share(weights, run, share)
                score = class_scores(candidate)
                better = score > best + IMPROVEMENT
                if better.any():
                    weights[:, better], best[better], improved = candidate[:, better], score[better], True
        if not improved:
            break
    return weights


def cross_fitted_stack(truth, parts: list[np.ndarray], other_classes: bool, seed: int = 0) -> np.ndarray:
    """Stacked scores of every row from a model fitted on the other :data:`INNER_PARTS` seeded parts of the rows:
    what a decision on top of a stack is fitted on."""
    n = parts[0].shape[0]
    inner = pseudo_folds(np.zeros(n, int), seed) if n >= 2 else np.zeros(n, int)
    out = np.empty(parts[0].shape, np.float32)
    for part in np.unique(inner):
        held, fit = np.flatnonzero(inner == part), np.flatnonzero(inner != part)
        if len(fit) == 0:
            fit = held
        stack = LogisticStack.fit(truth[fit], [p[fit] for p in parts], other_classes)
        out[held] = stack.predict([p[held] for p in parts])
    return out


def fit_blend(method: str, truth, parts: list[np.ndarray], setting: BlendSetting) -> Blend:
    """Blend ``method`` fitted on these rows only (``parts``: one array per run, the rows of ``truth``)."""
    if method == "stack":
        other = setting.predict.stack_other_classes
        stack = LogisticStack.fit(truth, parts, other)
        return Blend(method, stack=stack, fitted=cross_fitted_stack(truth, parts, other))
    if method == "hand":
        weights = np.asarray(setting.hand, dtype=float)
    elif method == "equal":
        weights = np.ones(len(parts))
    elif setting.predict.weights_per_class:
        weights = search_class_weights(truth, parts, setting)
    else:
        weights = search_weights(truth, parts, setting)
    blend = Blend(method, weights)
    blend.fitted = blend.combine(parts)
    return blend


def _decided_counts(truth_fit, fitted: np.ndarray, truth_held, held: np.ndarray, setting: BlendSetting):
    """Counts of ``setting.strategy``'s decision fitted on (truth_fit, fitted) and applied to ``held``."""
    inputs = ThresholdInputs(truth_fit, fitted, held, setting.label_rate)
    decision = decision_for(setting.strategy, inputs, setting.predict, setting.metric)
    return decision_counts(truth_held, held, decision.apply)


def as_arrays(parts: list[np.ndarray | ScoreRows], max_cells: int = BLEND_MAX_CELLS) -> list[np.ndarray] | None:
    """The runs' scores as arrays to fit a blend on (tables read whole, float32), or None above ``max_cells``
    scores (rows x classes x runs)."""
    n, m = parts[0].shape
    if n * m * len(parts) > max_cells:
        return None
    return [part if isinstance(part, np.ndarray) else part[:] for part in parts]


def compare_blends(truth, parts: list[np.ndarray], folds: np.ndarray, methods: list[str],
                   setting: BlendSetting) -> dict[str, dict]:
    """Each blend of ``methods`` on the rows of ``truth`` (``parts``: each run's scores of them), two ways:
    ``in_sample`` (blend and decision fitted and scored on every row) and ``cross_fold`` (for each fold of
    ``folds``, or of :func:`src.thresholds.pseudo_folds`' parts for one fold's rows, blend and decision fitted on
    the other folds' rows and applied to this fold's; the metric of the pooled counts). Each entry also holds the
    ``blend`` fitted on every row."""
    metric = setting.metric
    folds = pseudo_folds(folds)
    n = truth.shape[0]
    results = {}
    for method in methods:
        blend = fit_blend(method, truth, parts, setting)
        if metric.ranks_scores:
            in_sample = metric.score(truth, None, blend.fitted)
        else:
            in_sample = metric.of_counts(_decided_counts(truth, blend.fitted, truth, blend.fitted, setting))
        pieces, held_scores = [], np.empty(parts[0].shape, np.float32)
        for fold in np.unique(folds):
            held, fit = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
            if len(fit) == 0:  # one part only: nothing to fit on but itself
                fit = held
            fold_blend = fit_blend(method, truth[fit], [take_rows(p, fit) for p in parts], setting)
            scores = fold_blend.combine([take_rows(p, held) for p in parts])
            held_scores[held] = scores
            pieces.append((held, _decided_counts(truth[fit], fold_blend.fitted, truth[held], scores, setting)))
        cross = (metric.score(truth, None, held_scores) if metric.ranks_scores
                 else metric.of_counts(DecisionCounts.assemble(n, pieces)))
        results[method] = {"blend": blend, "in_sample": float(in_sample), "cross_fold": float(cross)}
    return results


def blend_methods(cfg: PredictConfig, runs: int) -> list[str]:
    """The ways compared for this config: none but hand by default (nothing compared); else hand and equal weights
    with two runs or more, search when asked for (or auto), stack when set."""
    methods = ["hand"]
    if runs > 1 and cfg.weights != "hand":
        methods.append("equal")
        if cfg.weights in ("search", "auto"):
            methods.append("search")
    if cfg.stack != "none":
        methods.append("stack")
    return methods


def choose_blend(cfg: PredictConfig, results: dict[str, dict]) -> tuple[str, str]:
    """The blend to apply and why: ``auto``: the best cross-fold estimate, a tie going to the simpler way; a
    stack when ``predict.stack`` names one; else the configured weights."""
    if cfg.weights != "auto":
        method = "stack" if "stack" in results else cfg.weights if cfg.weights in results else "hand"
        setting = f"predict.stack={cfg.stack}" if method == "stack" else f"predict.weights={cfg.weights}"
        return method, f"configured ({setting})"

    def estimate(name: str) -> float:
        return round(results[name]["cross_fold"], 12)

    ranked = sorted(results, key=lambda name: (-estimate(name), BLEND_SIMPLICITY.index(name)))
    best = ranked[0]
    behind = ", ".join(f"{results[name]['cross_fold']:.3f} ({name})" for name in ranked[1:])
    why = f"auto: best cross-fold estimate {results[best]['cross_fold']:.3f}"
    return best, why + (f" vs {behind}" if behind else "")
