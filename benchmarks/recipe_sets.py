"""The two real-image sets the recipes are chosen on, and how a submission is scored against their hidden labels.

- ``hpa``: ``benchmarks.real_images`` (HPA layout, 4 channels, textures and micrographs, 9 power-law classes);
- ``digits``: ``benchmarks.real_digits`` (csv layout, RGB, real handwriting, 10 uniform classes);
- ``digits_many``: the same handwriting as a many-label set in the Open Images layout (54 hierarchical labels:
  digits, digit-in-cell, digit count; a long tail), scored like Inclusive Images by mean per-image F2.

Both are built from images shipped inside installed wheels (scikit-image, scikit-learn); nothing is downloaded.
A set is written once per (kind, size, counts, seed) and reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, fbeta_score

from benchmarks.real_digits import CSV_KEYS, ORIENTED_KEYS, make_digits_dataset, make_digits_many
from benchmarks.real_images import make_real_dataset
from src.config import DataConfig
from src.formats import get_format, label_separator, submission_columns

KINDS = ("hpa", "digits", "digits_many")
MANY_LABEL = "digits_many"  # scored by per-image F2 with the many-label recipes; the others by macro-F1


def ensure_set(kind: str, folder: Path, n_train: int, n_test: int, size: int, seed: int = 0) -> list[str]:
    """Write the set to ``folder`` unless it is there; the data overrides that point a config at it."""
    folder = Path(folder)
    if not solution_file(kind, folder).is_file():
        if kind == "hpa":
            make_real_dataset(folder, n_train=n_train, n_test=n_test, size=size, num_classes=9, seed=seed,
                              progress=False)
        elif kind == "digits":
            make_digits_dataset(folder, n_train, n_test, size, seed)
        elif kind == MANY_LABEL:
            make_digits_many(folder, n_train, n_test, size, seed)
        else:
            raise SystemExit(f"unknown set {kind!r}; expected one of {KINDS}")
    keys = [f"data.dir={folder}", f"data.image_size={size}"]
    if kind == MANY_LABEL:  # the many-label configs are in its layout already
        return keys
    return keys + (["data.num_classes=9", "model.in_chans=4"] if kind == "hpa" else CSV_KEYS + ORIENTED_KEYS)


def solution_file(kind: str, folder: Path) -> Path:
    """The hidden test labels: in the training csv's columns, or (many-label) in the submission's."""
    return Path(folder) / ("test_labels.csv" if kind == MANY_LABEL else "test_solution.csv")


def set_metric(kind: str):
    """(name, scorer on multi-hot matrices) the set is judged by."""
    return ("per-image F2", per_image_f2) if kind == MANY_LABEL else ("macro-F1", macro_f1)


def oriented(kind: str) -> bool:
    """Whether the set's images have an up and a left (no flips or right-angle turns preserve the labels)."""
    return kind in ("digits", MANY_LABEL)  # handwriting; in the many-label set a flip also moves the cell labels


def label_sets(csv_path: Path, data: DataConfig, solution: bool = False) -> dict[str, set[str]]:
    """Id -> the set of label codes of a submission (or, with ``solution``, of a csv in the training layout)."""
    id_column, label_column = get_format(data).train_columns(data) if solution else submission_columns(data)
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    separator = label_separator(data)
    return {i: {c for c in str(cell).split(separator) if c} for i, cell in zip(frame[id_column], frame[label_column])}


def multi_hot(sets: list[set[str]], codes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(codes)}
    matrix = np.zeros((len(sets), len(codes)), np.uint8)
    for row, labels in enumerate(sets):
        matrix[row, [index[c] for c in labels if c in index]] = 1
    return matrix


def per_image_f2(truth: np.ndarray, predicted: np.ndarray) -> float:
    """sklearn's mean per-image F2 (Inclusive Images' metric; an image with nothing true nor predicted: 0)."""
    return float(fbeta_score(truth, predicted, beta=2.0, average="samples", zero_division=0))


def best_constant(train_y: np.ndarray, score) -> np.ndarray:
    """The best constant submission: one label set for every image, grown greedily from the commonest training
    labels while ``score`` on the training labels improves."""
    order, chosen, best = np.argsort(-train_y.sum(axis=0), kind="stable"), np.zeros(train_y.shape[1], np.uint8), 0.0
    for label in order:
        trial = chosen.copy()
        trial[label] = 1
        value = score(train_y, np.tile(trial, (len(train_y), 1)))
        if value <= best:
            break
        chosen, best = trial, value
    return chosen


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """sklearn's macro-F1 on multi-hot matrices (a class never true nor predicted counts 0)."""
    return float(f1_score(truth, predicted, average="macro", zero_division=0))
