"""Threshold strategies by name (``predict.threshold``), compared on out-of-fold predictions.

- ``fixed``: one threshold for every class (``predict.fixed_threshold``).
- ``oof_f1``: per class, the threshold maximising that class's F1 on OOF scores, shrunk towards the
  ``global_oof`` threshold by ``predict.shrink``; classes with fewer than ``predict.min_positives`` OOF
  positives take the ``global_oof`` threshold (too rare to tune). The anchor comes from the scores
  themselves, so it suits sigmoid outputs and decoded label-embedding scores (where 0.5 means cosine 0)
  alike.
- ``rate``: per class, the threshold whose predicted-positive rate on the scores it is applied to equals
  the class's label rate in train (or ``predict.rate_table``).
- ``global_oof``: one threshold for every class, maximising OOF macro-F1.

Each strategy maps (OOF truth, OOF scores, the scores to be thresholded, label rates) to one threshold
per class. Every sample keeps at least one label (:func:`src.metrics.decide`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from src.config import PredictConfig
from src.metrics import best_thresholds, decide, f1_curves, f1_per_class

GLOBAL_GRID = np.linspace(0.005, 0.995, 199)


@dataclass
class ThresholdInputs:
    oof_true: np.ndarray  # n x m multi-hot
    oof_scores: np.ndarray  # n x m
    target_scores: np.ndarray  # the scores the thresholds will be applied to (OOF or test)
    label_rate: np.ndarray  # m: positive rate of each class in train (or the user's table)


def fixed(inputs: ThresholdInputs, cfg: PredictConfig) -> np.ndarray:
    return np.full(inputs.oof_scores.shape[1], cfg.fixed_threshold)


def oof_f1(inputs: ThresholdInputs, cfg: PredictConfig) -> np.ndarray:
    tuned, _ = best_thresholds(inputs.oof_true, inputs.oof_scores)
    anchor = global_oof(inputs, cfg)
    shrunk = cfg.shrink * tuned + (1 - cfg.shrink) * anchor
    too_rare = inputs.oof_true.sum(axis=0) < cfg.min_positives
    return np.where(too_rare, anchor, shrunk)


def rate(inputs: ThresholdInputs, cfg: PredictConfig) -> np.ndarray:
    scores = inputs.target_scores
    n = scores.shape[0]
    ranked = -np.sort(-scores, axis=0)  # descending per class
    keep = np.clip(np.rint(inputs.label_rate * n).astype(int), 0, n)  # samples to predict positive
    top = ranked[np.maximum(keep - 1, 0), np.arange(scores.shape[1])]
    return np.where(keep > 0, top, np.nextafter(ranked[0], np.inf))  # keep == 0: above every score


def global_oof(inputs: ThresholdInputs, cfg: PredictConfig) -> np.ndarray:
    macro = f1_curves(inputs.oof_true, inputs.oof_scores, GLOBAL_GRID).mean(axis=1)
    return np.full(inputs.oof_scores.shape[1], GLOBAL_GRID[int(np.argmax(macro))])


STRATEGIES = {"fixed": fixed, "oof_f1": oof_f1, "rate": rate, "global_oof": global_oof}


def thresholds_for(name: str, inputs: ThresholdInputs, cfg: PredictConfig) -> np.ndarray:
    """One threshold per class by strategy ``name``."""
    return STRATEGIES[name](inputs, cfg)


def compare_strategies(oof_true: np.ndarray, oof_scores: np.ndarray, oof_fold: np.ndarray,
                       label_rate: np.ndarray, cfg: PredictConfig) -> dict[str, dict]:
    """Every strategy on the OOF predictions, two ways:

    - ``in_sample``: thresholds fitted on all OOF rows and scored on the same rows (optimistic for the
      tuned strategies);
    - ``cross_fold``: for each fold, thresholds fitted on the other folds' OOF rows and applied to this
      fold's rows; pooled macro-F1. This is the honest estimate of what the strategy will score on
      unseen data, and shows when per-class tuning overfits.
    """
    results = {}
    folds = np.unique(oof_fold)
    for name in STRATEGIES:
        inputs = ThresholdInputs(oof_true, oof_scores, oof_scores, label_rate)
        thresholds = thresholds_for(name, inputs, cfg)
        predicted = decide(oof_scores, thresholds)
        cross = np.zeros_like(predicted)
        for fold in folds:
            held = oof_fold == fold
            fit = ~held if len(folds) > 1 else held
            fold_inputs = ThresholdInputs(oof_true[fit], oof_scores[fit], oof_scores[held], label_rate)
            cross[held] = decide(oof_scores[held], thresholds_for(name, fold_inputs, cfg))
        per_class = f1_per_class(oof_true, predicted)
        results[name] = {"thresholds": thresholds, "per_class_f1": per_class, "in_sample": float(per_class.mean()),
                         "cross_fold": float(f1_per_class(oof_true, cross).mean()),
                         "predicted_rate": predicted.mean(axis=0)}
    return results
