"""Stage 1b: validate the data, then split it into multilabel-stratified folds.

    python -m src.folds [--config FILE] [key=value ...]

Writes ``folds.path`` (``Id,fold``) with iterstrat's MultilabelStratifiedKFold, deterministic by
``folds.seed``, and prints how many samples of each class every fold holds. Only ``folds.path`` is
written, so ``data.dir`` may be read-only (as on Kaggle). With ``folds.group_duplicates`` near-duplicate
images (perceptual hash of the green channel within ``folds.duplicate_distance`` bits) share a fold, so
duplicates do not leak between training and validation.
"""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from PIL import Image
from scipy.cluster.hierarchy import DisjointSet
from tqdm import tqdm

from src.config import Config, PipelineError, cli_parser, config_from_args, run_cli, write_atomic
from src.data import channel_paths, label_matrix, load_train_table
from src.validate import require_valid


def green_hashes(table: pd.DataFrame, progress: bool = True) -> np.ndarray:
    """64-bit perceptual hash (imagehash.phash) of each sample's green channel, as uint64."""
    hashes = np.zeros(len(table), dtype=np.uint64)
    rows = zip(table["image_dir"], table["Id"], table["ext"])
    for row, (image_dir, sample_id, ext) in enumerate(tqdm(rows, total=len(table), desc="hashing green channels",
                                                           disable=not progress, mininterval=1.0)):
        with Image.open(channel_paths(image_dir, sample_id, ext)[1]) as green:
            bits = imagehash.phash(green).hash.flatten()
        hashes[row] = np.packbits(bits).view(">u8")[0]
    return hashes


def duplicate_groups(hashes: np.ndarray, max_distance: int, chunk: int = 2048) -> np.ndarray:
    """Group id per sample: samples whose hashes differ in at most ``max_distance`` bits are linked
    (transitively). Pairwise Hamming distances are computed in chunks, so 31k images take seconds."""
    groups = DisjointSet(range(len(hashes)))
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk, None] ^ hashes[None, :]
        rows, cols = np.nonzero(np.bitwise_count(block) <= max_distance)
        for i, j in zip(rows + start, cols):
            if i < j:
                groups.merge(int(i), int(j))
    roots = np.array([groups[i] for i in range(len(hashes))])
    return np.unique(roots, return_inverse=True)[1]


def assign_folds(labels: np.ndarray, n_splits: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per sample, stratified over the multi-hot ``labels``; a group stays in one fold."""
    if groups is None:
        groups = np.arange(len(labels))
    n_groups = int(groups.max()) + 1
    group_labels = np.zeros((n_groups, labels.shape[1]), dtype=np.uint8)
    np.maximum.at(group_labels, groups, labels)
    if n_groups < n_splits:
        raise PipelineError(f"only {n_groups} sample group(s) for {n_splits} folds")
    group_fold = np.empty(n_groups, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, val_index) in enumerate(splitter.split(np.zeros(n_groups), group_labels)):
        group_fold[val_index] = fold
    return group_fold[groups]


def fold_table(labels: np.ndarray, folds: np.ndarray) -> pd.DataFrame:
    """Samples per (class, fold), plus the fold sizes, for printing."""
    n_splits = int(folds.max()) + 1
    counts = np.stack([labels[folds == f].sum(axis=0) for f in range(n_splits)], axis=1)
    table = pd.DataFrame(counts, columns=[f"fold{f}" for f in range(n_splits)])
    table.index.name = "class"
    table["total"] = counts.sum(axis=1)
    table.loc["samples"] = [int((folds == f).sum()) for f in range(n_splits)] + [len(folds)]
    return table


def make_folds(cfg: Config, progress: bool = True) -> pd.DataFrame:
    """Validate the data, split it into folds and write ``cfg.folds.path``; returns ``Id,fold``."""
    require_valid(cfg, progress=progress)
    table = load_train_table(cfg.data)
    labels = label_matrix(table["labels"], cfg.data.num_classes)
    support = labels.sum(axis=0)
    rare = [(c, int(n)) for c, n in enumerate(support) if 0 < n < cfg.folds.n_splits]
    if rare:
        listing = ", ".join(f"class {c}: {n}" for c, n in rare)
        message = (f"{len(rare)} class(es) have fewer samples than folds.n_splits={cfg.folds.n_splits} "
                   f"({listing}); some validation folds will have none of them.")
        if cfg.folds.rare_classes == "error":
            raise PipelineError(message + " Lower folds.n_splits, or set folds.rare_classes=warn to "
                                          "accept it (their per-fold F1 is then undefined).")
        print(f"warning: {message} Kept, as folds.rare_classes=warn asks.")
    absent = [c for c, n in enumerate(support) if n == 0]
    if absent:
        print(f"warning: class(es) {absent} have no training samples")
    groups = None
    if cfg.folds.group_duplicates:
        groups = duplicate_groups(green_hashes(table, progress), cfg.folds.duplicate_distance)
        print(f"duplicate grouping: {len(table)} samples in {groups.max() + 1} groups")
    folds = assign_folds(labels, cfg.folds.n_splits, cfg.folds.seed, groups)
    result = pd.DataFrame({"Id": table["Id"], "fold": folds})
    path = Path(cfg.folds.path)
    try:
        write_atomic(path, lambda tmp: result.to_csv(tmp, index=False))
    except OSError as exc:
        raise PipelineError(f"cannot write folds file {path}: {exc}") from exc
    if progress:
        print(fold_table(labels, folds).to_string())
        print(f"wrote {path} ({len(result)} samples, {cfg.folds.n_splits} folds)")
    return result


def load_folds(cfg: Config, table: pd.DataFrame) -> np.ndarray:
    """Fold index for each row of ``table``, read from ``cfg.folds.path`` (the folds stage writes it)."""
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
    fold_numbers = pd.to_numeric(folds["fold"], errors="coerce")
    by_id = {sample_id: int(fold) for sample_id, fold in zip(folds["Id"], fold_numbers) if pd.notna(fold)}
    missing = [sample_id for sample_id in table["Id"] if sample_id not in by_id]
    if missing:
        raise PipelineError(f"{path}: {len(missing)} training Id(s) have no fold (e.g. {missing[:3]}); "
                            "the data changed since the folds were made: rerun `python -m src.folds`")
    return np.array([by_id[sample_id] for sample_id in table["Id"]], dtype=np.int64)


def main() -> None:
    make_folds(config_from_args(cli_parser(__doc__.splitlines()[0]).parse_args()))


if __name__ == "__main__":
    run_cli(main)
