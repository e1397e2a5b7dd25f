"""Competition metrics, label decisions, and vectorised threshold searches, shared by training (validation) and
prediction.

Each competition metric is one object (:class:`Metric`) in one registry (:data:`METRICS`, by ``metric.name``;
:func:`get_metric` makes it from the config): it answers every question a stage asks of a metric (its score of
predictions or of a decision's counts, its value over a global threshold or a top k, the F-beta a per-class
search aims at, whether decisions matter, its names in reports), and no stage tells metrics apart by name. A
new metric is one class registered there.

A sample is predicted positive for a class when its score is ``>=`` the class threshold. Truth and
predictions are boolean n x m matrices, dense numpy arrays or scipy.sparse (csr) matrices: the metrics
never densify a sparse one, so a many-label truth matrix stays small. Scores are finite: an n x m array, or a
matrix read a block of rows at a time (``src.score_table.ScoreRows``: ``scores[a:b]``, ``scores[:, cols]``,
``take(index)``), which every search here reads in row blocks or column slabs, never whole; decisions on one
come back as a sparse matrix, and :func:`decision_counts` scores a decision without making it at all.

Conventions are scikit-learn's, with ``zero_division`` a number:

- ``macro_f1`` (:class:`MacroF1`): ``f1_score(average="macro", zero_division=z)``: every column counts; a
  class with no true and no predicted sample scores ``z``.
- ``fbeta_samples`` (:class:`FbetaSamples`): ``fbeta_score(average="samples", beta=b, zero_division=z)``: an
  image with no true and no predicted label scores ``z``; one with predictions but no true label (or the
  reverse) scores 0.
- ``micro_f1`` (:class:`MicroF1`): ``f1_score(average="micro", zero_division=z)``: ``z`` only when nothing is
  true or predicted.
- ``precision_at_k`` (:class:`PrecisionAtK`): the share of each image's k highest-scoring labels that are
  true, averaged over images (ties and images with fewer than k labels: see the class).

"The k highest-scoring labels" of a row is one order everywhere (:func:`top_labels`, :func:`ranked_top`,
the label bounds of :func:`bound_labels`, ``src.label_embedding.top_k``): by score, ties broken towards the
lower class index, as a stable sort by descending score would.

Every F-beta (F1 included) is computed from counts by :func:`fbeta_from_counts`. Truth matrices are
canonicalised once, where they enter a public function (``_prepare``); the helpers below take them prepared.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from scipy import sparse

from src.config import MetricConfig

# Row blocks of about this many matrix entries bound the temporaries of the row-wise searches (a few
# bytes each), whatever n and m are.
BLOCK_ENTRIES = 1 << 22
# The column-wise searches read scores that are not an array (src.score_table.ScoreRows) in slabs of columns of
# about this many entries (float32: 512 MB), one pass over the rows per slab.
SLAB_ENTRIES = 1 << 27


# -- counting on dense or sparse boolean matrices ------------------------------------------------------------
def binary_csr(matrix, dtype: np.dtype = np.uint8) -> sparse.csr_matrix:
    """A canonical CSR copy of a dense or sparse label matrix with every stored non-zero set to 1 (``dtype``):
    repeats merged, explicit zeros dropped, classes sorted within each row."""
    binary = sparse.csr_matrix(matrix, dtype=dtype, copy=True)
    binary.sum_duplicates()
    binary.eliminate_zeros()
    binary.data[:] = 1
    return binary


def _nonzero(matrix) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the True entries, row-major, of a dense array or a canonical csr matrix."""
    if sparse.issparse(matrix):
        rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
        return rows, matrix.indices.astype(np.int64)
    return np.nonzero(matrix)


def _lookup(matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``matrix[rows, cols]`` as booleans, for a dense array or a canonical csr matrix (binary search on
    its entries' flat positions, never a dense copy)."""
    if not sparse.issparse(matrix):
        return np.asarray(matrix)[rows, cols].astype(bool)
    m = matrix.shape[1]
    stored_rows, stored_cols = _nonzero(matrix)
    keys = stored_rows * m + stored_cols  # ascending: rows in order, sorted indices within a row
    wanted = np.asarray(rows, np.int64) * m + np.asarray(cols, np.int64)
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    return (keys[at] == wanted) if len(keys) else np.zeros(len(wanted), bool)


def _prepare(matrix):
    """The one canonical form of a label matrix: a boolean array, or a canonical boolean csr matrix."""
    return binary_csr(matrix, bool) if sparse.issparse(matrix) else np.asarray(matrix).astype(bool, copy=False)


def _counts(prepared, axis: int | None) -> np.ndarray:
    """:func:`count_labels` of a matrix already through ``_prepare`` (no second canonical copy)."""
    if sparse.issparse(prepared):
        if axis is None:
            return np.int64(prepared.nnz)
        rows, cols = _nonzero(prepared)
        return np.bincount(cols if axis == 0 else rows, minlength=prepared.shape[1 - axis]).astype(np.int64)
    return np.asarray(np.count_nonzero(prepared, axis=axis), dtype=np.int64)


def count_labels(matrix, axis: int | None) -> np.ndarray:
    """Counts of True (nonzero) entries of a dense or sparse matrix per column (0), per row (1) or in all
    (None), as int64."""
    # count_nonzero needs no boolean copy of a dense matrix; a sparse one is made canonical (repeats merged).
    return _counts(binary_csr(matrix, bool) if sparse.issparse(matrix) else np.asarray(matrix), axis)


def confusion_counts(y_true, y_pred, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, true labels, predicted labels) per column (``axis=0``), per row (``axis=1``) or in
    all (``None``), for two boolean n x m matrices, each dense or sparse."""
    y_true, y_pred = _prepare(y_true), _prepare(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"truth is {y_true.shape}, predictions are {y_pred.shape}")
    if not sparse.issparse(y_true) and not sparse.issparse(y_pred):
        tp = np.asarray((y_true & y_pred).sum(axis=axis), dtype=np.int64)
    else:  # walk the entries of the sparse one, look each up in the other
        walked, other = (y_true, y_pred) if sparse.issparse(y_true) else (y_pred, y_true)
        rows, cols = _nonzero(walked)
        hit = _lookup(other, rows, cols)
        if axis is None:
            tp = np.int64(hit.sum())
        else:
            tp = np.bincount(cols if axis == 0 else rows, weights=hit,
                             minlength=y_true.shape[1 - axis]).astype(np.int64)
    return tp, _counts(y_true, axis), _counts(y_pred, axis)


def fbeta_from_counts(tp, true, predicted, beta: float, zero_division: float):
    """F-beta from counts (arrays broadcast together), sklearn's way: (1 + b^2) tp / (b^2 true + predicted);
    ``zero_division`` where nothing is true or predicted. The one F-beta formula of the pipeline (F1: beta 1)."""
    b2 = beta * beta
    tp, denominator = np.asarray(tp, float), b2 * np.asarray(true, float) + np.asarray(predicted, float)
    out = np.full(np.broadcast_shapes(tp.shape, denominator.shape), float(zero_division))
    return np.divide((1 + b2) * tp, denominator, out=out, where=denominator > 0)


def f1_per_class(y_true, y_pred, zero_division: float = 0.0) -> np.ndarray:
    """F1 of each column of two boolean n x m matrices (dense or sparse)."""
    tp, true, predicted = confusion_counts(y_true, y_pred, axis=0)
    return fbeta_from_counts(tp, true, predicted, 1.0, zero_division)


# -- top k, row blocks and column slabs -------------------------------------------------------------------
def _top_block(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k highest scores of each row of one block (ties: lower class index first)."""
    n, m = scores.shape
    if k >= m:
        return np.ones((n, m), bool)
    if k <= 0:
        return np.zeros((n, m), bool)
    if k == 1:  # argmax takes the first of equal maxima: the lower class index, as below
        chosen = np.zeros((n, m), bool)
        chosen[np.arange(n), np.argmax(scores, axis=1)] = True
        return chosen
    kth = np.partition(scores, m - k, axis=1)[:, m - k][:, None]  # the k-th largest score of each row
    chosen = scores > kth
    tied = scores == kth
    room = k - chosen.sum(axis=1)  # places left for the scores equal to the k-th largest
    crowded = np.flatnonzero(tied.sum(axis=1) > room)  # rare: more ties than places
    chosen |= tied
    if len(crowded):  # keep the first `room` tied classes by index
        sub = tied[crowded]
        chosen[crowded] &= ~(sub & (np.cumsum(sub, axis=1) > room[crowded, None]))
    return chosen


def _row_blocks(n: int, m: int):
    step = max(1, BLOCK_ENTRIES // max(m, 1))
    return (slice(start, min(start + step, n)) for start in range(0, n, step))


def _column_slabs(scores, columns: np.ndarray | None = None):
    """(first column, slab) pairs that cover the columns ``columns`` (default all) of a score matrix: an array in
    one slab (itself when all columns, no copy), scores read by rows in slabs of about ``SLAB_ENTRIES`` entries."""
    if isinstance(scores, np.ndarray):
        yield 0, (scores if columns is None else scores[:, columns])
        return
    n, m = scores.shape
    columns = np.arange(m) if columns is None else np.asarray(columns)
    width = max(1, SLAB_ENTRIES // max(n, 1))
    for start in range(0, len(columns), width):
        chosen = columns[start : start + width]
        yield start, scores[:, slice(chosen[0], chosen[-1] + 1) if _consecutive(chosen) else chosen]


def _consecutive(columns: np.ndarray) -> bool:
    return len(columns) > 0 and int(columns[-1]) - int(columns[0]) == len(columns) - 1 and \
        bool((np.diff(columns) == 1).all())


def take_rows(scores, index: np.ndarray):
    """Rows ``index`` of a score matrix: an array's (a copy), or scores read by rows' (read when used)."""
    return scores[index] if isinstance(scores, np.ndarray) else scores.take(index)


def nonfinite_rows(scores) -> int:
    """How many rows of a score matrix hold NaN or inf (an array at once, other scores a block at a time)."""
    if isinstance(scores, np.ndarray):
        return int((~np.isfinite(scores)).any(axis=1).sum())
    return sum(int((~np.isfinite(scores[rows])).any(axis=1).sum()) for rows in _row_blocks(*scores.shape))


def by_row_blocks(scores, decide_block):
    """``decide_block`` (the boolean decisions of an array of score rows, made row by row) of a score matrix: of
    an array at once (a boolean array); of scores read by rows a block at a time, into a sparse csr matrix, so
    nothing n x m is held."""
    if isinstance(scores, np.ndarray):
        return decide_block(scores)
    n, m = scores.shape
    parts = [sparse.csr_matrix(decide_block(scores[rows])) for rows in _row_blocks(n, m)]
    return sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((0, m), dtype=bool)


def top_labels(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean n x m mask of each row's ``k`` highest-scoring labels (all m when k >= m); among equal
    scores the lower class index goes first, so exactly min(k, m) per row. Linear time (a partition, not a
    sort), in row blocks."""
    n, m = scores.shape
    mask = np.empty((n, m), bool)
    for rows in _row_blocks(n, m):
        mask[rows] = _top_block(scores[rows], k)
    return mask


def ranked_top(scores: np.ndarray, k: int) -> np.ndarray:
    """n x min(k, m) class indices: each row's k highest-scoring labels, best first (ties: lower index)."""
    n, m = scores.shape
    k = min(k, m)
    ranked = np.empty((n, k), np.int64)
    for rows in _row_blocks(n, m):
        block = scores[rows]
        # Each row has exactly k chosen entries; nonzero lists them row by row in increasing class order,
        # so a stable sort by descending score keeps the lower index first among ties.
        cols = np.nonzero(_top_block(block, k))[1].reshape(len(block), k)
        order = np.argsort(-np.take_along_axis(block, cols, axis=1), axis=1, kind="stable")
        ranked[rows] = np.take_along_axis(cols, order, axis=1)
    return ranked


# -- decisions -----------------------------------------------------------------------------------------------
def bound_labels(scores: np.ndarray, predicted: np.ndarray, min_labels: int = 1,
                 max_labels: int | None = None) -> np.ndarray:
    """``predicted`` with at least ``min_labels`` and at most ``max_labels`` labels per row: a row with too
    few gets its highest-scoring unpredicted labels added, a row with too many keeps its highest-scoring
    predicted ones. Only the rows out of bounds are touched. Returns a new array."""
    predicted = np.array(predicted, dtype=bool)
    count = predicted.sum(axis=1)
    few = np.flatnonzero(count < min_labels)
    if len(few):  # predicted labels rank above every other, so they all stay
        predicted[few] = top_labels(np.where(predicted[few], np.inf, scores[few]), min_labels)
    if max_labels is not None:
        many = np.flatnonzero(count > max_labels)
        if len(many):
            predicted[many] = top_labels(np.where(predicted[many], scores[many], -np.inf), max_labels)
    return predicted


def decide(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Boolean predictions: score >= threshold, and at least one label per sample (its top class); sparse for
    scores read by rows (:func:`by_row_blocks`)."""
    return by_row_blocks(scores, lambda block: bound_labels(block, block >= thresholds, 1, None))


class DecisionCounts:
    """The confusion counts of one decision on (truth, scores) that every decision metric is made of
    (:meth:`Metric.of_counts`): true labels, true positives and predicted labels per class and per row (int64).
    Counts of held-out parts add up (:meth:`assemble`), so cross-fold estimates need no prediction matrix
    either."""

    def __init__(self, true_class, tp_class, predicted_class, true_row, tp_row, predicted_row):
        self.true_class, self.tp_class, self.predicted_class = true_class, tp_class, predicted_class
        self.true_row, self.tp_row, self.predicted_row = true_row, tp_row, predicted_row

    @classmethod
    def assemble(cls, n: int, parts: list[tuple[np.ndarray, DecisionCounts]]) -> DecisionCounts:
        """The counts of n rows from those of disjoint parts (``(rows, counts)`` pairs covering every row)."""
        rows = [np.zeros(n, np.int64) for _ in range(3)]
        for held, part in parts:
            for whole, own in zip(rows, (part.true_row, part.tp_row, part.predicted_row)):
                whole[held] = own
        per_class = [sum(getattr(part, name) for _, part in parts) for name in
                     ("true_class", "tp_class", "predicted_class")]
        return cls(*per_class, *rows)

    def f1_per_class(self, zero_division: float = 0.0) -> np.ndarray:
        """:func:`f1_per_class` of the decision."""
        return fbeta_from_counts(self.tp_class, self.true_class, self.predicted_class, 1.0, zero_division)


def decision_counts(y_true, scores, decide_block) -> DecisionCounts:
    """The :class:`DecisionCounts` of ``decide_block`` (boolean decisions of an array of score rows, made row by
    row, such as ``Decision.apply``) on (``y_true``, ``scores``), a block of rows at a time: the same counts as
    the whole prediction matrix would give, without ever holding it."""
    y_true = _prepare(y_true)
    n, m = scores.shape
    tp_class, predicted_class = np.zeros(m, np.int64), np.zeros(m, np.int64)
    tp_row, predicted_row = np.zeros(n, np.int64), np.zeros(n, np.int64)
    true_rows, true_cols = _nonzero(y_true) if sparse.issparse(y_true) else (None, None)
    for rows in _row_blocks(n, m):
        predicted = np.asarray(decide_block(scores[rows]), dtype=bool)
        if true_rows is not None:
            in_block = slice(*np.searchsorted(true_rows, [rows.start, rows.stop]))
            t_rows, t_cols = true_rows[in_block] - rows.start, true_cols[in_block]
        else:
            t_rows, t_cols = np.nonzero(y_true[rows])
        hit = predicted[t_rows, t_cols]
        tp_class += np.bincount(t_cols[hit], minlength=m)
        tp_row[rows] = np.bincount(t_rows[hit], minlength=rows.stop - rows.start)
        predicted_class += np.count_nonzero(predicted, axis=0)
        predicted_row[rows] = np.count_nonzero(predicted, axis=1)
    return DecisionCounts(_counts(y_true, 0), tp_class, predicted_class, _counts(y_true, 1), tp_row, predicted_row)


# -- threshold searches --------------------------------------------------------------------------------------
def _dense_columns(y_true, cols: slice | np.ndarray) -> np.ndarray:
    """Dense boolean columns ``cols`` of the truth (one block at a time for a sparse truth)."""
    part = y_true[:, cols]
    return part.toarray().astype(bool) if sparse.issparse(part) else np.asarray(part).astype(bool)


def largest_per_column(scores: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """For each column c and each row r of the r x m ``ranks``, its ``ranks[r, c]``-th largest score (0: the
    largest): one sort per column, in blocks of columns (transposed, so the sort runs along memory)."""
    n, m = scores.shape
    ranks = np.atleast_2d(ranks)
    values = np.empty(ranks.shape, dtype=scores.dtype)
    for offset, slab in _column_slabs(scores):
        for block in _row_blocks(slab.shape[1], n):  # blocks of columns: ~40 bytes per entry held, bounded
            ascending = np.sort(slab[:, block].T, axis=1)
            cols = slice(offset + block.start, offset + block.stop)
            values[:, cols] = ascending[np.arange(len(ascending)), n - 1 - ranks[:, cols]]
        del slab  # before the next slab is read: one slab in memory at a time
    return values


def _search_rows(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.searchsorted(sorted_rows[r], v, side="left")`` for every pair (r, v) of ``rows`` (grouped: equal
    rows next to each other) and ``values``: one C-level search per row that has queries."""
    cut = np.empty(len(values), np.int64)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    for start, stop in zip(starts, np.r_[starts[1:], len(rows)]):
        cut[start:stop] = np.searchsorted(sorted_rows[rows[start]], values[start:stop], side="left")
    return cut


def best_thresholds(y_true, scores: np.ndarray, beta: float = 1.0,
                    columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the threshold that maximises that class's F-beta (F1 by default) on (y_true, scores), and
    that score.

    Exact: raising a cut past negatives only removes false positives, so the best cut sits right below one of
    the class's positive scores; those are the candidates, each scored from its rank in the sorted column
    (one vectorised binary search for all of them). The cost is one sort per column, done in blocks of
    columns (transposed, so the sort runs along memory) that keep memory bounded for thousands of classes; a
    sparse truth is densified one block at a time. Of equal scores the lowest threshold wins. Thresholds sit
    midway between the scores they separate. A class with no positives gets threshold 1 (never predicted)
    and score 0. ``columns``: search only these classes (``y_true`` holds just their columns); scores read by rows
    are read in slabs of columns, one pass each.
    """
    n = scores.shape[0]
    m = scores.shape[1] if columns is None else len(columns)
    thresholds, best_score = np.ones(m), np.zeros(m)
    for offset, slab in _column_slabs(scores, columns):
        for block in _row_blocks(slab.shape[1], n):  # blocks of columns: ~40 bytes per entry held, bounded
            _best_in_block(y_true, slab, block, offset, n, beta, thresholds, best_score)
        del slab  # before the next slab is read: one slab in memory at a time
    return thresholds, best_score


def _best_in_block(y_true, slab: np.ndarray, block: slice, offset: int, n: int, beta: float, thresholds: np.ndarray,
                   best_score: np.ndarray) -> None:
    """:func:`best_thresholds` of the columns ``block`` of one slab (columns ``offset + block`` of the truth)."""
    scores_t = np.ascontiguousarray(slab[:, block].T)  # one class per row
    if not np.isfinite(scores_t).all():
        raise ValueError("best_thresholds: scores hold NaN or inf; no threshold search on them")
    sorted_t = np.sort(scores_t, axis=1)
    block = slice(offset + block.start, offset + block.stop)
    pos_class, pos_sample = np.nonzero(_dense_columns(y_true, block).T)
    positives = np.bincount(pos_class, minlength=len(scores_t))
    # Each class's positive scores, ascending; a candidate per distinct value.
    order = np.lexsort((scores_t[pos_class, pos_sample], pos_class))
    cls, value = pos_class[order], scores_t[pos_class, pos_sample][order]
    rank_in_class = np.arange(len(cls)) - (np.cumsum(positives) - positives)[cls]
    first = np.ones(len(cls), bool)
    first[1:] = (cls[1:] != cls[:-1]) | (value[1:] != value[:-1])
    cls, value, tp = cls[first], value[first], positives[cls[first]] - rank_in_class[first]
    cut = _search_rows(sorted_t, cls, value)  # the first sample ranked at or above the candidate
    score = fbeta_from_counts(tp, positives[cls], n - cut, beta, 0.0)  # n - cut >= 1: never 0 / 0
    # Per class, the first (lowest) candidate reaching the class's best score.
    class_best = np.full(len(scores_t), -np.inf)
    np.maximum.at(class_best, cls, score)
    winners = np.flatnonzero(score == class_best[cls])
    winners = winners[np.unique(cls[winners], return_index=True)[1]]
    c, at_cut = cls[winners], cut[winners]
    at = sorted_t[c, at_cut]
    below = np.where(at_cut > 0, sorted_t[c, np.maximum(at_cut - 1, 0)], -np.inf)
    columns = np.arange(block.start, block.stop)[c]
    thresholds[columns] = np.where(at_cut > 0, (below + at) / 2, at)
    best_score[columns] = score[winners]


def f1_curves(y_true, scores: np.ndarray, grid: np.ndarray, zero_division: float = 0.0) -> np.ndarray:
    """F1 of every class at every threshold of the ascending ``grid`` (``score >= t``): a len(grid) x m
    matrix (for plots). The per-class counts of :func:`metric_curve`, so its macro curve is their mean."""
    y_true = _prepare(y_true)
    tp_at, pred_at = _class_counts_at(y_true, scores, grid)
    return fbeta_from_counts(tp_at, _counts(y_true, 0)[None, :], pred_at, 1.0, zero_division)


def _effective_scores(scores: np.ndarray, min_labels: int, max_labels: int | None) -> np.ndarray:
    """Scores whose plain threshold ``>= t`` gives the bounded decision at every global threshold t: the
    ``min_labels`` top labels of a row at +inf (always kept), those below its ``max_labels`` top at -inf
    (never kept). Exact: at a global threshold the predicted labels of a row are its top ones, so the
    bounds only ever add the next-ranked or drop the lowest-ranked."""
    effective = scores.astype(np.result_type(scores.dtype, np.float32))  # a copy; holds +-inf
    m = scores.shape[1]
    if min_labels > 0:
        effective[top_labels(scores, min_labels)] = np.inf
    if max_labels is not None and max_labels < m:
        effective[~top_labels(scores, max_labels)] = -np.inf
    return effective


def grid_bins(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many thresholds of the ascending ``grid`` each value passes (``grid[i] <= value``): exactly
    ``np.searchsorted(grid, values, side="right")``, more than 10x faster on an evenly spaced grid: the bin
    comes from arithmetic, and the few values within rounding distance of a threshold are searched."""
    g = len(grid)
    step = (grid[-1] - grid[0]) / (g - 1) if g > 1 else 0.0
    if g < 2 or step <= 0 or not np.allclose(np.diff(grid), step, rtol=1e-6, atol=0):
        return np.searchsorted(grid, values, side="right")
    dtype = np.result_type(values.dtype, np.float32)
    position = values * dtype.type(1 / step)  # in bins from grid[0]; float32 is ~1e-5 bins off at worst
    position -= dtype.type(grid[0] / step)
    np.clip(position, -1, g, out=position)  # also brings +-inf into range
    whole = np.floor(position)
    inside = position - whole
    near = np.flatnonzero((inside < 1e-3) | (inside > 1 - 1e-3))
    bins = whole.astype(np.int64)
    bins += 1
    bins.flat[near] = np.searchsorted(grid, values.flat[near], side="right")
    return bins


def _binned_blocks(y_true, scores: np.ndarray, grid: np.ndarray, min_labels: int, max_labels: int | None):
    """For each row block of the prepared truth and the scores: (rows, bins, true rows, true columns, true
    bins). ``bins[r, c]`` is how many thresholds of ``grid`` entry (r, c) passes under the bounded decision
    (``grid[i] <= score``, so it is kept at ``grid[i]`` when ``bins > i``); the true entries are listed with
    their rows relative to the block."""
    n, m = scores.shape
    true_rows, true_cols = _nonzero(y_true) if sparse.issparse(y_true) else (None, None)
    for rows in _row_blocks(n, m):
        bins = grid_bins(grid, _effective_scores(scores[rows], min_labels, max_labels))
        if sparse.issparse(y_true):
            in_block = slice(*np.searchsorted(true_rows, [rows.start, rows.stop]))
            t_rows, t_cols = true_rows[in_block] - rows.start, true_cols[in_block]
        else:
            t_rows, t_cols = np.nonzero(y_true[rows])
        yield rows, bins, t_rows, t_cols, bins[t_rows, t_cols]


def _kept_at(histogram: np.ndarray) -> np.ndarray:
    """Counts kept at each grid threshold from a k x (g + 1) histogram of bins: column i sums bins > i."""
    return np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _class_counts_at(y_true, scores: np.ndarray, grid: np.ndarray, min_labels: int = 0,
                     max_labels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, predicted) of every class at every threshold of ``grid`` under the bounded decision:
    two len(grid) x m int64 matrices, from one binning pass over the prepared truth and the scores."""
    m, g = scores.shape[1], len(grid)
    per_class_pred = np.zeros((m, g + 1), np.int64)
    per_class_tp = np.zeros((m, g + 1), np.int64)
    for _, bins, _, t_cols, true_bins in _binned_blocks(y_true, scores, grid, min_labels, max_labels):
        cols = np.broadcast_to(np.arange(m), bins.shape)
        per_class_pred += np.bincount((cols * (g + 1) + bins).ravel(), minlength=m * (g + 1)).reshape(m, g + 1)
        per_class_tp += np.bincount(t_cols * (g + 1) + true_bins, minlength=m * (g + 1)).reshape(m, g + 1)
    # Laid out g x m, so that a macro mean over classes sums each threshold's row in class order.
    return np.ascontiguousarray(_kept_at(per_class_tp).T), np.ascontiguousarray(_kept_at(per_class_pred).T)


# -- the competition metrics: one object each, registered by name --------------------------------------------
class Metric:
    """A competition metric with its settings, answering every question a stage asks of it: its score (of
    predictions, or of a decision's confusion counts, :meth:`of_counts`), its value over one global threshold
    (:meth:`curve`) and over each image's top k (:meth:`top_k_curve`), the F-beta that a per-class threshold
    search aims at (:attr:`class_beta`), whether a decision matters at all (:attr:`ranks_scores`), and its names
    in reports (:attr:`label`, :attr:`title`, :attr:`setting`).

    A metric is one frozen dataclass whose fields are the ``metric`` settings it reads (``beta``, ``k``,
    ``zero_division``), registered in :data:`METRICS` under its ``name`` (``metric.name``): adding one touches
    that class and that dict only. It derives from :class:`ClassMetric` (made of per-class counts) or
    :class:`RowMetric` (a mean over images of each image's counts) and gives the formula on counts, or from
    :class:`RankingMetric` (made of the scores' ranking) and gives :meth:`score`.
    """

    name: ClassVar[str]  # metric.name, the key in METRICS
    # True for a metric of the scores' ranking, not of a decision: every decision strategy scores the same by it.
    ranks_scores: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: MetricConfig) -> Metric:
        """The metric with the settings of the config's ``metric`` section that it reads (its fields)."""
        return cls(**{field.name: getattr(cfg, field.name) for field in fields(cls)})

    @property
    def label(self) -> str:
        """Short name for column and W&B keys: macro_f1, f2_samples, micro_f1, p_at_3."""
        return self.name

    @property
    def title(self) -> str:
        """Name for people: macro-F1, mean per-image F2, micro-F1, P@3."""
        raise NotImplementedError

    @property
    def setting(self) -> str:
        """The config setting that chose the metric, for the report: ``metric.name=fbeta_samples``."""
        return f"metric.name={self.name}"

    @property
    def class_beta(self) -> float:
        """The F-beta that a per-class threshold search maximises for this metric (``oof_f1``): F1 unless the
        metric weighs recall and precision otherwise."""
        return 1.0

    def score(self, y_true, y_pred, scores: np.ndarray | None = None) -> float:
        """The metric of boolean predictions against the truth (either dense or sparse); a ranking metric reads
        ``scores`` instead of the predictions."""
        raise NotImplementedError

    def of_counts(self, counts: DecisionCounts) -> float:
        """:meth:`score` of a decision from its confusion counts (:func:`decision_counts`)."""
        raise NotImplementedError

    def curve(self, y_true, scores: np.ndarray, grid: np.ndarray, min_labels: int = 0,
              max_labels: int | None = None) -> np.ndarray:
        """The metric of the decision "one global threshold t, then ``min_labels``..``max_labels`` labels per
        row" at every t of the ascending ``grid``: one pass over the matrix in row blocks, each entry binned once
        into the grid, the counts at every threshold from cumulative histograms (the cost of about one
        decision, not one per threshold)."""
        raise NotImplementedError

    def top_k_curve(self, y_true, scores: np.ndarray, max_k: int) -> np.ndarray:
        """The metric of "each row's k highest-scoring labels" for k = 1..max_k (capped at m): one partial sort
        of each row's top ``max_k``, then every k from cumulative counts."""
        raise NotImplementedError


def _top_k_hits(y_true, scores: np.ndarray, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``max_k`` (at most m) highest-scoring classes, best first, and whether each is true (prepared
    truth): two n x max_k matrices."""
    n = scores.shape[0]
    top = ranked_top(scores, max_k)
    return top, _lookup(y_true, np.repeat(np.arange(n), top.shape[1]), top.ravel()).reshape(top.shape)


class ClassMetric(Metric):
    """A metric made of per-class confusion counts (true positives, true labels, predicted labels)."""

    def of_class_counts(self, tp, true, predicted) -> np.ndarray:
        """The metric of per-class counts laid out along the last axis: one value per index of the others."""
        raise NotImplementedError

    def score(self, y_true, y_pred, scores: np.ndarray | None = None) -> float:
        return float(self.of_class_counts(*confusion_counts(y_true, y_pred, axis=0)))

    def of_counts(self, counts: DecisionCounts) -> float:
        return float(self.of_class_counts(counts.tp_class, counts.true_class, counts.predicted_class))

    def curve(self, y_true, scores: np.ndarray, grid: np.ndarray, min_labels: int = 0,
              max_labels: int | None = None) -> np.ndarray:
        y_true = _prepare(y_true)
        tp_at, pred_at = _class_counts_at(y_true, scores, grid, min_labels, max_labels)
        return self.of_class_counts(tp_at, _counts(y_true, 0)[None, :], pred_at)

    def top_k_curve(self, y_true, scores: np.ndarray, max_k: int) -> np.ndarray:
        m = scores.shape[1]
        y_true = _prepare(y_true)
        top, hits = _top_k_hits(y_true, scores, min(max_k, m))
        # The k-th ranked label of every row joins its class's predictions (and true positives if a hit).
        pred_per_class = np.zeros((top.shape[1], m), np.int64)
        tp_per_class = np.zeros((top.shape[1], m), np.int64)
        for j in range(top.shape[1]):
            pred_per_class[j] = np.bincount(top[:, j], minlength=m)
            tp_per_class[j] = np.bincount(top[:, j], weights=hits[:, j], minlength=m)
        pred_at, tp_at = np.cumsum(pred_per_class, axis=0), np.cumsum(tp_per_class, axis=0)
        return self.of_class_counts(tp_at, _counts(y_true, 0)[None, :], pred_at)


class RowMetric(Metric):
    """A metric that is the mean over images (rows) of each image's score from its own counts."""

    def of_row_counts(self, tp, true, predicted) -> np.ndarray:
        """Each row's score from its counts (arrays that broadcast together)."""
        raise NotImplementedError

    def score(self, y_true, y_pred, scores: np.ndarray | None = None) -> float:
        return float(self.of_row_counts(*confusion_counts(y_true, y_pred, axis=1)).mean())

    def of_counts(self, counts: DecisionCounts) -> float:
        return float(self.of_row_counts(counts.tp_row, counts.true_row, counts.predicted_row).mean())

    def curve(self, y_true, scores: np.ndarray, grid: np.ndarray, min_labels: int = 0,
              max_labels: int | None = None) -> np.ndarray:
        n, g = scores.shape[0], len(grid)
        row_score_sum = np.zeros(g)  # per-row counts at every threshold, then each row's score, a block at a time
        for rows, bins, t_rows, _, true_bins in _binned_blocks(_prepare(y_true), scores, grid, min_labels, max_labels):
            size = rows.stop - rows.start
            row_ids = np.broadcast_to(np.arange(size)[:, None], bins.shape)
            pred_hist = np.bincount((row_ids * (g + 1) + bins).ravel(), minlength=size * (g + 1)).reshape(size, g + 1)
            tp_hist = np.bincount(t_rows * (g + 1) + true_bins, minlength=size * (g + 1)).reshape(size, g + 1)
            true_per_row = np.bincount(t_rows, minlength=size)[:, None]
            row_score_sum += self.of_row_counts(_kept_at(tp_hist), true_per_row, _kept_at(pred_hist)).sum(axis=0)
        return row_score_sum / max(n, 1)

    def top_k_curve(self, y_true, scores: np.ndarray, max_k: int) -> np.ndarray:
        y_true = _prepare(y_true)
        top, hits = _top_k_hits(y_true, scores, min(max_k, scores.shape[1]))
        ks = np.arange(1, top.shape[1] + 1)
        return self.of_row_counts(np.cumsum(hits, axis=1), _counts(y_true, 1)[:, None], ks).mean(axis=0)


class RankingMetric(Metric):
    """A metric of the scores' ranking, not of a decision: every decision strategy scores the same by it."""

    ranks_scores: ClassVar[bool] = True

    def of_counts(self, counts: DecisionCounts) -> float:
        raise ValueError(f"{self.title} ranks the scores: a decision's counts do not give it")

    def curve(self, y_true, scores: np.ndarray, grid: np.ndarray, min_labels: int = 0,
              max_labels: int | None = None) -> np.ndarray:
        return np.full(len(grid), self.score(y_true, None, scores))

    def top_k_curve(self, y_true, scores: np.ndarray, max_k: int) -> np.ndarray:
        return np.full(min(max_k, scores.shape[1]), self.score(y_true, None, scores))


@dataclass(frozen=True)
class MacroF1(ClassMetric):
    """Mean over classes of each class's F1 (sklearn ``f1_score(average="macro")``; HPA): every column counts,
    one with no true and no predicted sample scoring ``zero_division``."""

    zero_division: float
    name: ClassVar[str] = "macro_f1"

    @property
    def title(self) -> str:
        return "macro-F1"

    def of_class_counts(self, tp, true, predicted) -> np.ndarray:
        return fbeta_from_counts(tp, true, predicted, 1.0, self.zero_division).mean(axis=-1)


@dataclass(frozen=True)
class MicroF1(ClassMetric):
    """F1 of all (sample, label) pairs pooled (sklearn ``f1_score(average="micro")``): ``zero_division`` only when
    nothing is true or predicted."""

    zero_division: float
    name: ClassVar[str] = "micro_f1"

    @property
    def title(self) -> str:
        return "micro-F1"

    def of_class_counts(self, tp, true, predicted) -> np.ndarray:
        return fbeta_from_counts(np.sum(tp, axis=-1), np.sum(true, axis=-1), np.sum(predicted, axis=-1), 1.0,
                                 self.zero_division)


@dataclass(frozen=True)
class FbetaSamples(RowMetric):
    """Mean over images of each image's F-beta (sklearn ``fbeta_score(average="samples")``; Inclusive Images and
    iMet with beta 2): an image with no true and no predicted label scores ``zero_division``, one with
    predictions but no true label (or the reverse) 0."""

    beta: float
    zero_division: float
    name: ClassVar[str] = "fbeta_samples"

    @property
    def label(self) -> str:
        return f"f{self.beta:g}_samples"

    @property
    def title(self) -> str:
        return f"mean per-image F{self.beta:g}"

    @property
    def class_beta(self) -> float:
        return self.beta  # per-image F-beta weighs recall as each class's F-beta does

    def of_row_counts(self, tp, true, predicted) -> np.ndarray:
        return fbeta_from_counts(tp, true, predicted, self.beta, self.zero_division)


@dataclass(frozen=True)
class PrecisionAtK(RankingMetric):
    """Mean over images of |top-k scores ∩ true labels| / k.

    The top k of a row are its k highest scores, ties broken towards the lower class index (so exactly k
    labels are taken even when scores tie; a different tie order can change the value). A row with fewer
    than k true labels (none included) still divides by k, so its best possible precision is |true| / k;
    with k > m every label is taken and the sum still divides by k.
    """

    k: int
    name: ClassVar[str] = "precision_at_k"

    @property
    def label(self) -> str:
        return f"p_at_{self.k}"

    @property
    def title(self) -> str:
        return f"P@{self.k}"

    def score(self, y_true, y_pred, scores: np.ndarray | None = None) -> float:
        if scores is None:
            raise ValueError("precision_at_k ranks scores: pass them")
        if self.k < 1:
            raise ValueError(f"precision_at_k: k must be at least 1, got {self.k}")
        y_true = _prepare(y_true)
        n = scores.shape[0]
        if n == 0:
            return 0.0
        top = ranked_top(scores, self.k)
        hits = _lookup(y_true, np.repeat(np.arange(n), top.shape[1]), top.ravel())
        return float(hits.sum() / (n * self.k))


# The competition metrics by metric.name: the only place that tells one from another.
METRICS: dict[str, type[Metric]] = {cls.name: cls for cls in (MacroF1, FbetaSamples, MicroF1, PrecisionAtK)}


def get_metric(metric: MetricConfig | Metric | str | None = None) -> Metric:
    """The metric object of the config's ``metric`` section (default: the schema's, macro-F1), or of a registered
    name with the schema's default settings; a metric object is returned as it is."""
    if isinstance(metric, Metric):
        return metric
    cfg = MetricConfig() if metric is None or isinstance(metric, str) else metric
    name = metric if isinstance(metric, str) else cfg.name
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
    return METRICS[name].from_config(cfg)


def metric_score(metric: MetricConfig | Metric, y_true, y_pred, scores: np.ndarray | None = None) -> float:
    """The configured competition metric (:func:`get_metric`) of boolean predictions against the truth (either
    dense or sparse); a ranking metric (``precision_at_k``) reads ``scores`` instead of the predictions."""
    return get_metric(metric).score(y_true, y_pred, scores)


def metric_curve(metric: MetricConfig | Metric, y_true, scores: np.ndarray, grid: np.ndarray, min_labels: int = 0,
                 max_labels: int | None = None) -> np.ndarray:
    """:meth:`Metric.curve` of the configured metric: its value at every global threshold of ``grid``, with
    ``min_labels``..``max_labels`` labels per row."""
    return get_metric(metric).curve(y_true, scores, grid, min_labels, max_labels)


def top_k_curve(metric: MetricConfig | Metric, y_true, scores: np.ndarray, max_k: int) -> np.ndarray:
    """:meth:`Metric.top_k_curve` of the configured metric: its value at each image's top k, k = 1..max_k."""
    return get_metric(metric).top_k_curve(y_true, scores, max_k)


def macro_f1(y_true, y_pred, zero_division: float = 0.0) -> float:
    """:class:`MacroF1` of two boolean n x m matrices (dense or sparse)."""
    return MacroF1(zero_division).score(y_true, y_pred)


def fbeta_samples(y_true, y_pred, beta: float = 2.0, zero_division: float = 0.0) -> float:
    """:class:`FbetaSamples` of two boolean n x m matrices (dense or sparse)."""
    return FbetaSamples(beta, zero_division).score(y_true, y_pred)


def precision_at_k(y_true, scores: np.ndarray, k: int) -> float:
    """:class:`PrecisionAtK` of the truth (dense or sparse) and the scores."""
    return PrecisionAtK(k).score(y_true, None, scores)
