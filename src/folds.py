"""Stage 1b: validate the data, then split it into multilabel-stratified folds.

    python -m src.folds [--config FILE] [key=value ...]

Writes ``folds.path`` (``Id,fold``), deterministic by ``folds.seed``, and prints how many samples of each
class every fold holds (a balance summary instead when there are many classes). Two stratifiers
(``folds.method``): iterstrat's MultilabelStratifiedKFold on a dense label matrix, for small data such as
HPA, and ``stratify_sparse``, the same iterative stratification (Sechidis et al. 2011) on a sparse matrix
with one vectorised step per label, for Open Images sizes (1.7 M x 7 178 in ~13 s on 2 cores; iterstrat
would take hours and the dense matrix alone is 12 GB). Only ``folds.path`` is written, so ``data.dir``
may be read-only (as on Kaggle). With ``folds.group_duplicates`` near-duplicate
images (perceptual hash of the green channel within ``folds.duplicate_distance`` bits) share a fold, so
duplicates do not leak between training and validation; with ``folds.group_column`` samples sharing a value of
that column (e.g. the antibody) do too, and both together group by connected components. Grouped by a column,
groups are stratified as weighted units (``stratify_groups``: their label counts and sizes).

Rows of a ``data.extra`` source with ``role: train_only`` take no part in the split: the file lists them with an
empty fold, and ``load_folds`` gives them ``TRAIN_ONLY`` (-1), so the training split of fold N is every row not
in fold N (train-only rows included) and its validation rows are competition rows only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError
from src.data import label_csr, train_only_rows, train_sources
from src.duplicates import duplicate_groups, image_hashes
from src.files import WriteError, write_atomic
from src.formats import get_format, load_training_data
from src.metrics import binary_csr
from src.progress import note
from src.validate import require_valid

# folds.method=auto runs iterstrat up to this many cells (groups x classes) and stratify_sparse above. iterstrat
# places samples one at a time in Python and recounts the remaining labels of all samples for every label it
# processes; measured here (2 shared cores): 0.7 s at 31k x 28 (HPA), 2.2 s at 105k x 28 (HPA + HPAv18),
# 2.5 s at 40k x 250, 21-38 s at 100k x 500, where the fast path takes 0.01-0.6 s with comparable balance
# (benchmarks/bench_folds.py). The switch keeps HPA on iterstrat, whose splits existing fold files were
# made with, and sends larger tables (past ~2 s of iterstrat) to the fast path.
AUTO_ITERSTRAT_MAX_CELLS = 4_000_000
FOLD_METHODS = ("iterstrat", "fast")


def resolve_method(method: str, n_samples: int, num_classes: int) -> str:
    """The stratifier ``folds.method`` stands for at this size: ``auto`` is iterstrat on small label
    matrices (at most AUTO_ITERSTRAT_MAX_CELLS cells), the fast sparse path otherwise."""
    if method == "auto":
        return "iterstrat" if n_samples * num_classes <= AUTO_ITERSTRAT_MAX_CELLS else "fast"
    if method not in FOLD_METHODS:
        raise PipelineError(f"folds.method={method!r}: expected auto, {' or '.join(FOLD_METHODS)}")
    return method


def _quotas(count: int, label_demand: np.ndarray, size_demand: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How many of ``count`` samples of one label each fold takes: what iterstrat's greedy loop (each sample to
    the fold that most wants the label, ties to the fold that most wants samples, then random) ends with,
    computed at once. The label's remaining demand is water-filled (folds already over their share get
    none), the whole parts are handed out, and the last < k samples go one at a time by the greedy rule."""
    k = len(label_demand)
    ranked = np.sort(label_demand)[::-1]
    level = 0.0
    for active in range(1, k + 1):  # the water level at which the top `active` folds absorb `count`
        level = (ranked[:active].sum() - count) / active
        if active == k or level >= ranked[active]:
            break
    quotas = np.floor(np.clip(label_demand - level, 0.0, None) + 1e-9).astype(np.int64)
    excess = int(quotas.sum()) - count
    if excess > 0:  # float error only: take back from the folds left furthest over their share
        for _ in range(excess):
            quotas[np.argmin(label_demand - quotas)] -= 1
    residual, sizes = label_demand - quotas, size_demand - quotas
    tie_break = rng.random(k)
    for _ in range(count - int(quotas.sum())):
        fold = np.lexsort((tie_break, sizes, residual))[-1]  # max residual, then max size demand, then random
        quotas[fold] += 1
        residual[fold] -= 1
        sizes[fold] -= 1
    return quotas


def stratify_sparse(labels, n_splits: int, seed: int) -> np.ndarray:
    """Fold index per row of a binary n x m label matrix (scipy sparse or dense), by iterative
    stratification (Sechidis et al. 2011, as iterstrat), vectorised per label.

    Like iterstrat it repeatedly takes the label with the fewest not-yet-assigned samples and spreads those
    samples over the folds by each fold's remaining demand for that label (ties: the fold that most wants
    samples), then counts them against the demands of all their other labels. Unlike iterstrat, one label's
    samples are placed in one step (``_quotas`` gives the per-fold counts its per-sample loop would reach;
    which samples go where is random), and the remaining counts are updated from the sparse rows just
    placed instead of recounting the whole matrix: ~ nnz + m^2 work, not n x m per label. Samples without
    labels fill the folds' remaining sizes last. Deterministic by ``seed``."""
    matrix = binary_csr(labels)
    n, m = matrix.shape
    if n < n_splits:
        raise PipelineError(f"only {n} sample group(s) for {n_splits} folds")
    rng = np.random.default_rng(seed)
    # Rows are visited in a random order fixed by the seed: a label's samples in column order are then a
    # random sample order, and the first ones go to the first fold with a quota.
    order = rng.permutation(n)
    matrix = matrix[order]
    by_label = matrix.tocsc()
    support = np.diff(by_label.indptr).astype(np.int64)
    label_demand = np.outer(support, np.full(n_splits, 1.0 / n_splits))  # m x k samples still wanted
    size_demand = np.full(n_splits, n / n_splits)
    remaining = support.copy()  # per label: samples with it not yet in a fold
    # Among labels with equally few remaining samples the pick is random, as in iterstrat.
    label_tie_break = rng.random(m) * 0.5
    fold = np.full(n, -1, dtype=np.int64)
    while True:
        pending = remaining > 0
        if not pending.any():
            break
        label = int(np.argmin(np.where(pending, remaining + label_tie_break, np.inf)))
        rows = by_label.indices[by_label.indptr[label]:by_label.indptr[label + 1]]
        rows = rows[fold[rows] < 0]
        quotas = _quotas(len(rows), label_demand[label], size_demand, rng)
        placed = np.repeat(np.arange(n_splits), quotas)
        fold[rows] = placed
        size_demand -= quotas
        block = matrix[rows]  # the placed samples' labels, all of them
        per_label_fold = np.bincount(block.indices.astype(np.int64) * n_splits
                                     + np.repeat(placed, np.diff(block.indptr)),
                                     minlength=m * n_splits).reshape(m, n_splits)
        label_demand -= per_label_fold
        remaining -= per_label_fold.sum(axis=1)
        remaining[label] = 0  # already 0 by the count above; set anyway so the loop always ends
    unlabelled = np.flatnonzero(fold < 0)
    if len(unlabelled):
        fold[unlabelled] = np.repeat(np.arange(n_splits),
                                     _quotas(len(unlabelled), size_demand, size_demand, rng))
    result = np.empty(n, dtype=np.int64)
    result[order] = fold
    return result


def stratify_groups(counts, sizes: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold index per group, from each group's label counts (a g x m matrix, dense or sparse: how many of its
    samples have each label) and its size in samples: iterative stratification (Sechidis et al. 2011) over
    weighted units, which neither iterstrat nor ``stratify_sparse`` takes (both count a group once).

    The label with the fewest samples not yet placed comes first; its groups, largest first, go one at a time
    to the fold that most wants that label (in samples), ties to the fold that most wants samples, then random;
    each placed group counts all its samples against every fold demand. Groups without labels fill the folds'
    remaining sizes last, largest first. A Python step per group: ~10 us each, 31k groups in a fraction of a
    second. Deterministic by ``seed``."""
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    n_groups, m = counts.shape
    if n_groups < n_splits:
        raise PipelineError(f"only {n_groups} sample group(s) for {n_splits} folds")
    rng = np.random.default_rng(seed)
    support = np.asarray(counts.sum(axis=0)).ravel()
    label_demand = np.outer(support, np.full(n_splits, 1.0 / n_splits))  # m x k samples still wanted
    size_demand = np.full(n_splits, sizes.sum() / n_splits)
    remaining = support.copy()
    by_label = counts.tocsc()
    label_tie_break = rng.random(m) * 0.5  # below one sample: only breaks ties between equally rare labels
    fold = np.full(n_groups, -1, dtype=np.int64)

    def place(group: int, wanted: np.ndarray) -> None:
        target = int(np.lexsort((rng.random(n_splits), size_demand, wanted))[-1])
        fold[group] = target
        a, b = counts.indptr[group], counts.indptr[group + 1]
        label_demand[counts.indices[a:b], target] -= counts.data[a:b]
        remaining[counts.indices[a:b]] -= counts.data[a:b]
        size_demand[target] -= sizes[group]

    while (remaining > 0.5).any():
        label = int(np.argmin(np.where(remaining > 0.5, remaining + label_tie_break, np.inf)))
        a, b = by_label.indptr[label], by_label.indptr[label + 1]
        members, amount = by_label.indices[a:b], by_label.data[a:b]
        waiting = fold[members] < 0
        members, amount = members[waiting], amount[waiting]
        for group in members[np.lexsort((rng.random(len(members)), -amount))].tolist():
            place(group, label_demand[label])
        remaining[label] = 0  # every group with it is placed (float sums can leave a residue)
    unlabelled = np.flatnonzero(fold < 0)
    for group in unlabelled[np.lexsort((rng.random(len(unlabelled)), -sizes[unlabelled]))].tolist():
        place(group, size_demand)
    return fold


def assign_folds(labels, n_splits: int, seed: int, groups: np.ndarray | None = None,
                 method: str = "iterstrat", weighted: bool = False) -> np.ndarray:
    """Fold index per sample, stratified over the binary ``labels`` (dense n x m array or scipy sparse);
    a group stays in one fold. ``method``: ``iterstrat``, ``fast`` (``stratify_sparse``) or ``auto``
    (``resolve_method``). Groups are stratified as units labelled with the union of their samples' labels, or,
    ``weighted``, by their label counts and sizes (``stratify_groups``; ``method`` is then not used)."""
    if groups is None:
        groups = np.arange(labels.shape[0])
    n_groups = int(groups.max()) + 1
    if n_groups < n_splits:
        raise PipelineError(f"only {n_groups} sample group(s) for {n_splits} folds")
    if weighted:
        members = sparse.csr_matrix((np.ones(len(groups)), (groups, np.arange(len(groups)))),
                                    shape=(n_groups, len(groups)))
        return stratify_groups(members @ binary_csr(labels), np.bincount(groups, minlength=n_groups),
                               n_splits, seed)[groups]
    method = resolve_method(method, n_groups, labels.shape[1])
    if method == "fast":
        members = sparse.csr_matrix((np.ones(len(groups), dtype=np.uint8), (groups, np.arange(len(groups)))),
                                    shape=(n_groups, len(groups)))
        group_labels = members @ binary_csr(labels)  # counts; stratify_sparse binarises
        return stratify_sparse(group_labels, n_splits, seed)[groups]
    if sparse.issparse(labels):
        labels = labels.toarray()  # iterstrat needs it dense: only small matrices come here
    group_labels = np.zeros((n_groups, labels.shape[1]), dtype=np.uint8)
    np.maximum.at(group_labels, groups, labels)
    group_fold = np.empty(n_groups, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, val_index) in enumerate(splitter.split(np.zeros(n_groups), group_labels)):
        group_fold[val_index] = fold
    return group_fold[groups]


def union_groups(*groupings: np.ndarray) -> np.ndarray:
    """Group index per sample linking two samples that share a group in any of ``groupings`` (each a group
    index per sample): the connected components, numbered 0.. in order of first appearance."""
    n = len(groupings[0])
    rows, cols, offset = [], [], n
    for groups in groupings:
        rows.append(np.arange(n))
        cols.append(offset + groups)
        offset += int(groups.max()) + 1 if n else 0
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = sparse.csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(offset, offset))
    _, component = connected_components(graph, directed=False)
    _, first, inverse = np.unique(component[:n], return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def column_groups(cfg: Config, table: pd.DataFrame) -> np.ndarray:
    """Group index per row of ``table`` by its value of ``folds.group_column``, read from ``folds.group_csv``
    (columns Id and the group column) or else from the training label csvs the rows come from (the format's Id
    column). A row without a value (absent Id, empty cell) is a group of its own, and noted."""
    column = cfg.folds.group_column
    if cfg.folds.group_csv:
        files = [(Path(cfg.folds.group_csv), "Id")]
    else:
        used, id_column = set(table["source"]), get_format(cfg.data).train_columns(cfg.data)[0]
        files = [(source.csv, id_column) for source in train_sources(cfg.data) if str(source.csv) in used]
    values: dict[str, str] = {}
    for path, id_column in files:
        try:
            header = pd.read_csv(path, nrows=0).columns
        except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{path} (folds.group_column={column!r}): not a readable csv "
                                f"({type(exc).__name__})") from None
        if id_column not in header or column not in header:
            raise PipelineError(f"{path}: no column {column!r} (folds.group_column) or {id_column!r} (the Id); it has "
                                f"{list(header)[:10]}. Name an existing column, or give folds.group_csv (Id,{column})")
        frame = pd.read_csv(path, usecols=[id_column, column], dtype=str, keep_default_na=False)
        frame = frame.apply(lambda cells: cells.str.strip()).drop_duplicates()
        frame = frame[frame[column] != ""]
        twice = frame[id_column].duplicated()
        if twice.any():
            raise PipelineError(f"{path}: Id {frame[id_column][twice].iloc[0]!r} has more than one value of {column!r} "
                                "(folds.group_column): a sample belongs to one group")
        values.update(zip(frame[id_column], frame[column]))
    value = table["Id"].map(values)
    codes = pd.factorize(value)[0]  # NaN (no value): -1
    alone = np.flatnonzero(codes < 0)
    if len(alone):
        note(f"note: {len(alone)} sample(s) have no {column!r} (folds.group_column) in {files[0][0]}"
             f"{' ...' if len(files) > 1 else ''}: each is a group of its own")
        codes[alone] = codes.max() + 1 + np.arange(len(alone))
    return codes


def fold_groups(cfg: Config, table: pd.DataFrame, progress: bool = True) -> np.ndarray | None:
    """The groups that ``folds.group_duplicates`` and ``folds.group_column`` ask for (their union when both),
    a group index per row of ``table``; None when neither is set."""
    groupings = []
    if cfg.folds.group_duplicates:
        groupings.append(duplicate_groups(image_hashes(table, get_format(cfg.data), progress),
                                          cfg.folds.duplicate_distance))
        print(f"duplicate grouping: {len(table)} samples in {groupings[-1].max() + 1} groups")
    if cfg.folds.group_column:
        groupings.append(column_groups(cfg, table))
        print(f"grouping by {cfg.folds.group_column}: {len(table)} samples in {groupings[-1].max() + 1} groups")
    if len(groupings) == 2:
        groupings = [union_groups(*groupings)]
        print(f"both groupings together: {groupings[0].max() + 1} groups")
    return groupings[0] if groupings else None


def fold_counts(labels, folds: np.ndarray, n_splits: int | None = None) -> np.ndarray:
    """Samples of each class in each fold (m x k), from a dense or sparse label matrix without densifying it."""
    n_splits = int(folds.max()) + 1 if n_splits is None else n_splits
    membership = sparse.csr_matrix((np.ones(len(folds), dtype=np.int64), (np.arange(len(folds)), folds)),
                                   shape=(len(folds), n_splits))
    matrix = sparse.csr_matrix(labels, dtype=np.int64)
    return np.asarray((matrix.T @ membership).todense())


def balance(labels, folds: np.ndarray, n_splits: int) -> dict[str, float]:
    """Balance measures of a split. ``LD`` and ``ED``: label and examples distribution (Sechidis et al.
    2011; 0 is perfect): LD averages over classes and folds |p_fold - p_all| of each class's
    positive/negative ratio, ED the folds' |size - n/k|. ``max_dev`` and ``mean_dev``: over the classes with
    at least k samples, the largest |fold count - n_c/k| / (n_c/k) of each class, its maximum and mean.
    ``empty_pairs``: (class, fold) pairs with no sample of a class that has at least k."""
    counts = fold_counts(labels, folds, n_splits).astype(np.float64)
    support = counts.sum(axis=1)
    sizes = np.bincount(folds, minlength=n_splits).astype(np.float64)
    n = float(len(folds))
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        # A class in every sample (or a fold of only that class) has no negatives: its ratio is skipped.
        fold_ratio = counts[present] / (sizes[None, :] - counts[present])
        all_ratio = support[present] / (n - support[present])
        gaps = np.abs(fold_ratio - all_ratio[:, None])
    gaps = gaps[np.isfinite(gaps).all(axis=1)]
    ld = float(gaps.mean()) if gaps.size else 0.0
    ed = float(np.abs(sizes - n / n_splits).mean())
    stratifiable = support >= n_splits
    expected = support[stratifiable, None] / n_splits
    deviation = (np.abs(counts[stratifiable] - expected) / expected).max(axis=1)
    return {"LD": ld, "ED": ed,
            "max_dev": float(deviation.max()) if deviation.size else 0.0,
            "mean_dev": float(deviation.mean()) if deviation.size else 0.0,
            "empty_pairs": int((counts[stratifiable] == 0).sum())}


# load_folds' fold of a train-only row: trained on in every fold (folds != N), validated in none (folds == N).
TRAIN_ONLY = -1
# Up to this many classes make_folds prints the full class x fold table; above, a balance summary.
PRINT_TABLE_MAX_CLASSES = 100


def fold_table(labels, folds: np.ndarray) -> pd.DataFrame:
    """Samples per (class, fold), plus the fold sizes, for printing (dense or sparse ``labels``)."""
    n_splits = int(folds.max()) + 1
    counts = fold_counts(labels, folds, n_splits)
    table = pd.DataFrame(counts, columns=[f"fold{f}" for f in range(n_splits)])
    table.index.name = "class"
    table["total"] = counts.sum(axis=1)
    table.loc["samples"] = [int((folds == f).sum()) for f in range(n_splits)] + [len(folds)]
    return table


def _listing(classes: list[tuple[int, int]], shown: int = 20) -> str:
    """``class c: n, ...`` for the first ``shown`` classes (thousands of rare classes make one long line)."""
    text = ", ".join(f"class {c}: {n}" for c, n in classes[:shown])
    return text + (f", ... and {len(classes) - shown} more" if len(classes) > shown else "")


def make_folds(cfg: Config, progress: bool = True) -> pd.DataFrame:
    """Validate the data, split it into folds and write ``cfg.folds.path``; returns ``Id,fold`` (rows of train-only
    sources with no fold). The folds need only the labels: a source whose image files are all absent (a packed
    cache used without them) is noted, not refused, unless ``folds.group_duplicates`` needs its images."""
    require_valid(cfg, progress=progress, absent_ok=True)
    cfg, table, _ = load_training_data(cfg)  # openimages/csv: data.num_classes from the label vocabulary
    train_only = train_only_rows(cfg.data, table)
    competition = table[~train_only].reset_index(drop=True)  # the rows that are split and validated on
    # Sparse whatever the size: 1.7 M x 7 178 dense would be 12 GB; iterstrat densifies its (small) input.
    labels = label_csr(competition["labels"], cfg.data.num_classes)
    support = np.bincount(labels.indices, minlength=cfg.data.num_classes)
    rare = [(c, int(n)) for c, n in enumerate(support) if 0 < n < cfg.folds.n_splits]
    if rare:
        message = (f"{len(rare)} class(es) have fewer samples than folds.n_splits={cfg.folds.n_splits} "
                   f"({_listing(rare)}); some validation folds will have none of them.")
        if cfg.folds.rare_classes == "error":
            raise PipelineError(message + " Lower folds.n_splits, or set folds.rare_classes=warn to "
                                          "accept it (their per-fold F1 is then undefined).")
        note(f"warning: {message} Kept, as folds.rare_classes=warn asks.")
    absent = np.flatnonzero(support == 0).tolist()
    if absent:
        shown = ", ".join(map(str, absent[:20])) + (f", ... ({len(absent)} in all)" if len(absent) > 20 else "")
        note(f"warning: class(es) [{shown}] have no {'competition ' if train_only.any() else ''}training samples")
    groups = fold_groups(cfg, competition, progress)
    n_units = len(competition) if groups is None else int(groups.max()) + 1
    weighted = cfg.folds.group_column is not None
    method = "stratify_groups" if weighted else resolve_method(cfg.folds.method, n_units, cfg.data.num_classes)
    print(f"stratifying {n_units} {'samples' if groups is None else 'sample groups'} x {cfg.data.num_classes} "
          f"classes with {method} (folds.method={cfg.folds.method}{', folds.group_column' if weighted else ''})")
    folds = assign_folds(labels, cfg.folds.n_splits, cfg.folds.seed, groups, method=method, weighted=weighted)
    fold_column = folds
    if train_only.any():  # an empty cell: trained on in every fold (load_folds: TRAIN_ONLY)
        fold_column = pd.array(np.full(len(table), pd.NA, dtype=object), dtype="Int64")
        fold_column[np.flatnonzero(~train_only)] = folds
        print(f"{int(train_only.sum())} train-only sample(s) (data.extra role train_only): no fold, trained on "
              "in every fold")
    result = pd.DataFrame({"Id": table["Id"], "fold": fold_column})
    path = Path(cfg.folds.path)
    try:
        write_atomic(path, lambda tmp: result.to_csv(tmp, index=False))
    except WriteError as exc:
        raise PipelineError(f"cannot write folds file {path}: {exc.reason}") from exc
    if progress:
        if cfg.data.num_classes <= PRINT_TABLE_MAX_CLASSES:
            print(fold_table(labels, folds).to_string())
        else:
            stats = balance(labels, folds, cfg.folds.n_splits)
            sizes = np.bincount(folds, minlength=cfg.folds.n_splits).tolist()
            print(f"fold sizes {sizes}; classes with at least {cfg.folds.n_splits} samples "
                  f"({int((support >= cfg.folds.n_splits).sum())}): fold counts at most {stats['max_dev']:.1%} off "
                  f"n_c/k (a class's largest miss, mean over classes {stats['mean_dev']:.1%}), "
                  f"{stats['empty_pairs']} (class, fold) pairs empty; label distribution LD {stats['LD']:.2e}")
        print(f"wrote {path} ({len(result)} samples, {cfg.folds.n_splits} folds)")
    return result


def read_folds_file(cfg: Config) -> pd.DataFrame:
    """The folds file (``Id``, ``fold`` as numbers; an empty or non-numeric fold cell is NaN: no fold), or a
    PipelineError saying how to make it."""
    path = Path(cfg.folds.path)
    if not path.is_file():
        raise PipelineError(f"folds file {path} not found: make it first with "
                            "`python -m src.folds [--config FILE] [key=value ...]` (same config as training)")
    try:
        folds = pd.read_csv(path, dtype={"Id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"folds file {path} is empty or not a csv ({type(exc).__name__}); "
                            "remake it with `python -m src.folds`") from None
    if list(folds.columns[:2]) != ["Id", "fold"]:
        raise PipelineError(f"{path}: expected columns Id,fold, found {list(folds.columns)}")
    # An empty or non-numeric fold cell counts as no fold (it would otherwise fail as a bare ValueError).
    return folds.assign(fold=pd.to_numeric(folds["fold"], errors="coerce"))


def require_fold(cfg: Config, fold: int) -> None:
    """Refuse a fold number the folds file does not have (a check before any work: reads the file only)."""
    numbers = sorted(int(n) for n in read_folds_file(cfg)["fold"].dropna().unique())
    if fold not in numbers:
        have = f"folds {numbers[0]}..{numbers[-1]}" if numbers else "no folds"
        raise PipelineError(f"fold {fold} does not exist in {cfg.folds.path} ({have})")


def load_folds(cfg: Config, table: pd.DataFrame) -> np.ndarray:
    """Fold index for each row of ``table``, read from ``cfg.folds.path`` (the folds stage writes it); ``TRAIN_ONLY``
    for a row of a train-only source, whose fold cell is empty (or which the file does not list: the split of the
    competition rows does not depend on it). Every other row must have a fold."""
    path, folds = Path(cfg.folds.path), read_folds_file(cfg)
    by_id = {sample_id: int(fold) for sample_id, fold in zip(folds["Id"], folds["fold"]) if pd.notna(fold)}
    train_only = train_only_rows(cfg.data, table)
    missing = [sample_id for sample_id, only in zip(table["Id"], train_only) if not only and sample_id not in by_id]
    if missing:
        raise PipelineError(f"{path}: {len(missing)} training Id(s) have no fold (e.g. {missing[:3]}); "
                            "the data changed since the folds were made: rerun `python -m src.folds`")
    split = [sample_id for sample_id, only in zip(table["Id"], train_only) if only and sample_id in by_id]
    if split:
        raise PipelineError(f"{path}: {len(split)} Id(s) of train-only source(s) have a fold (e.g. {split[:3]}): the "
                            "folds were made while their data.extra role was folds; rerun `python -m src.folds`")
    return np.array([TRAIN_ONLY if only else by_id[sample_id] for sample_id, only in zip(table["Id"], train_only)],
                    dtype=np.int64)


def main() -> None:
    make_folds(config_from_args(cli_parser(__doc__.splitlines()[0]).parse_args()))


if __name__ == "__main__":
    run_cli(main)
