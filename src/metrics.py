"""Macro-F1 and vectorised threshold search, shared by training (validation) and prediction.

A sample is predicted positive for a class when its score is ``>=`` the class threshold. F1 of a class
with no positives and no predictions is 0 (sklearn's ``zero_division=0``).
"""

from __future__ import annotations

import numpy as np


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 of each column of two boolean n x m matrices."""
    y_true, y_pred = y_true.astype(bool), y_pred.astype(bool)
    tp = (y_true & y_pred).sum(axis=0)
    denominator = y_true.sum(axis=0) + y_pred.sum(axis=0)
    return np.divide(2 * tp, denominator, out=np.zeros(y_true.shape[1]), where=denominator > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(f1_per_class(y_true, y_pred).mean())


def _sorted_columns(y_true: np.ndarray, scores: np.ndarray):
    order = np.argsort(scores, axis=0)  # ties need no stable order: cuts inside them are masked out
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    sorted_true = np.take_along_axis(y_true.astype(np.int64), order, axis=0)
    # tp_from[i, c]: positives among the samples ranked i..n-1 of class c (those kept by a cut at i).
    tp_from = np.vstack([np.cumsum(sorted_true[::-1], axis=0)[::-1], np.zeros((1, y_true.shape[1]), np.int64)])
    return sorted_scores, tp_from


def best_thresholds(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the threshold that maximises that class's F1 on (y_true, scores), and that F1.

    Exact and vectorised: every cut between two distinct sorted scores is a candidate, so an n x m
    matrix costs one sort (31k x 28 in well under a second). Thresholds sit midway between the scores
    they separate. A class with no positives gets threshold 1 (never predicted) and F1 0.
    """
    n, m = scores.shape
    if not np.isfinite(scores).all():
        raise ValueError("best_thresholds: scores hold NaN or inf; no threshold search on them")
    sorted_scores, tp_from = _sorted_columns(y_true, scores)
    positives = tp_from[0]
    predicted = n - np.arange(n)[:, None]  # a cut at i predicts the n - i highest scores
    f1 = 2 * tp_from[:n] / (predicted + positives)
    # A cut inside a run of tied scores cannot be realised by any threshold.
    tied = np.vstack([np.zeros((1, m), bool), sorted_scores[1:] == sorted_scores[:-1]])
    f1[tied] = -1.0
    best = np.argmax(f1, axis=0)
    cols = np.arange(m)
    below = np.where(best > 0, sorted_scores[np.maximum(best - 1, 0), cols], -np.inf)
    at = sorted_scores[best, cols]
    thresholds = np.where(best > 0, (below + at) / 2, at)
    best_f1 = f1[best, cols]
    no_positives = positives == 0
    thresholds[no_positives], best_f1[no_positives] = 1.0, 0.0
    return thresholds, best_f1


def f1_curves(y_true: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """F1 of every class at every threshold of ``grid``: a len(grid) x m matrix (for plots and
    the one-global-threshold search)."""
    n, m = scores.shape
    sorted_scores, tp_from = _sorted_columns(y_true, scores)
    positives = tp_from[0]
    curves = np.empty((len(grid), m))
    for c in range(m):
        cut = np.searchsorted(sorted_scores[:, c], grid, side="left")
        tp, predicted = tp_from[cut, c], n - cut
        denominator = predicted + positives[c]
        curves[:, c] = np.divide(2 * tp, denominator, out=np.zeros(len(grid)), where=denominator > 0)
    return curves


def decide(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Boolean predictions: score >= threshold, and at least one label per sample (its top class)."""
    predicted = scores >= thresholds
    empty = ~predicted.any(axis=1)
    predicted[empty, np.argmax(scores[empty], axis=1)] = True
    return predicted
