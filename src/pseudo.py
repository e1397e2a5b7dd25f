"""Pseudo-labels: a finished prediction's confident test labels, as a train-only source for the next round.

    python -m src.pseudo [--config FILE] [--out DIR] [--precision 0.95] [--min-positives 5] [key=value ...]

Reads what ``python -m src.predict`` wrote for ``cfg`` (``run.dir/decision.json`` and the test scores beside it)
and the OOF scores and truth that prediction used (each run's fold score tables, blended with the weights the
record applied). Per class, the threshold is the lowest OOF score ``t`` at which the OOF rows scoring ``>= t``
reach ``--precision`` (with at least ``--min-positives`` true positives among them: a precision measured on a
handful of rows is noise); a class that never gets there gets no pseudo-labels. A test row keeps the labels whose
score clears its class's threshold, and a row with no confident label is DROPPED: kept as an all-negative row it
would teach the next model that every class it was unsure of is absent.

Writes, in ``--out`` (default ``run.dir/pseudo/``), ``pseudo_labels.csv`` in the dataset's own layout (what its
format reads back: hpa ``Id,Target``) and ``pseudo_labels.csv.provenance.json`` (the run folder, the sha256 of
decision.json, of the submission and of the csv, the thresholds, the precision target, rows kept and dropped,
per-class counts), and prints the ``data.extra`` entry that trains on it (``role: train_only``: every fold trains
on it, none validates on it). Training copies the provenance into each fold folder, and the next prediction's
decision.json and submission message name it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, RunRef
from src.data import Vocabulary, with_vocabulary
from src.decision_record import config_differences, csv_sha256, decision_path, file_sha256, read_record
from src.ensemble import Blend
from src.files import Staging, ensure_writable
from src.formats import get_format, load_test_table, load_training_data
from src.metrics import binary_csr, by_row_blocks, take_rows
from src.predict import OofScores, align_oof, ids_truth, score_pair
from src.progress import note
from src.run_folder import RunFolder, provenance_path, run_vocabulary
from src.score_table import ScoreRows, read_score_table, score_file, stack_scores

DEFAULT_PRECISION = 0.95
DEFAULT_MIN_POSITIVES = 5
CSV_NAME = "pseudo_labels.csv"
# Score entries sorted at once when thresholds are fitted on scores read by rows (a column slab of them).
SLAB_ENTRIES = 1 << 24


def precision_thresholds(truth, scores: np.ndarray | ScoreRows, precision: float = DEFAULT_PRECISION,
                         min_positives: int = DEFAULT_MIN_POSITIVES) -> np.ndarray:
    """Per class, the lowest score ``t`` such that the rows scoring ``>= t`` hold at least ``min_positives`` true
    positives at a precision ``>= precision``; ``inf`` where no ``t`` does (the class gets no pseudo-labels).
    ``truth``: the n x m labels (dense or sparse); ``scores``: an array, or scores read by rows (column slabs)."""
    n, m = scores.shape
    thresholds = np.full(m, np.inf)
    width = max(1, SLAB_ENTRIES // max(n, 1))
    for start in range(0, m, width):
        cols = slice(start, min(start + width, m))
        slab = np.asarray(scores[:, cols], dtype=np.float64)
        true = truth[:, cols]
        true = true.toarray() if sparse.issparse(true) else np.asarray(true)
        order = np.argsort(-slab, axis=0, kind="stable")
        ranked = np.take_along_axis(slab, order, axis=0)
        positives = np.cumsum(np.take_along_axis(true, order, axis=0) > 0, axis=0)
        kept = np.arange(1, n + 1)[:, None]
        # Only the last row of a run of equal scores is a threshold: ``>= t`` keeps the whole run.
        last_of_tie = np.ones_like(ranked, dtype=bool)
        last_of_tie[:-1] = ranked[:-1] != ranked[1:]
        ok = last_of_tie & (positives >= min_positives) & (positives / kept >= precision)
        lowest = n - 1 - np.argmax(ok[::-1], axis=0)  # the last qualifying rank: the lowest score
        found = ok.any(axis=0)
        thresholds[cols][found] = ranked[lowest[found], np.flatnonzero(found)]
    return thresholds


def confident_labels(scores: np.ndarray | ScoreRows, thresholds: np.ndarray) -> sparse.csr_matrix:
    """Each row's labels whose score clears its class's threshold (a sparse boolean matrix)."""
    return binary_csr(by_row_blocks(scores, lambda block: block >= thresholds))


def recorded_oof(cfg: Config, record: dict, train_table: pd.DataFrame, test_table: pd.DataFrame,
                 vocabulary: Vocabulary) -> OofScores:
    """The blended OOF scores the recorded prediction fitted its decision on: each run's fold score tables (the
    folds and checkpoint it read), or a score pair's OOF table, blended with the weights it applied."""
    ensemble = record.get("ensemble") or {}
    if ensemble.get("stack") is not None:
        raise PipelineError(f"{decision_path(cfg.run.dir)}: a stacked prediction (predict.stack) fitted its decision "
                            "on cross-fitted OOF scores it does not keep; pseudo-label a prediction with "
                            "predict.stack=none")
    if cfg.predict.oof_tta:
        note("note: predict.oof_tta=true: the thresholds are fitted on the folds' own OOF scores (training's, "
             "without the test-time views predict re-scored them with)")
    refs = cfg.predict.runs or [RunRef(dir=cfg.run.dir)]
    runs = []
    for ref, recorded in zip(refs, record["runs"]):
        if ref.dir is None:
            runs.append(score_pair(cfg, ref, test_table, train_table, vocabulary).oof)
            continue
        folder, ids, folds, parts = RunFolder(ref.dir), [], [], []
        for fold in recorded["folds"]:
            fold_ids, scores = read_score_table(folder.oof(fold, record["checkpoint"]))
            ids.append(fold_ids)
            folds.append(np.full(len(fold_ids), fold))
            parts.append(scores)
        runs.append(OofScores(np.concatenate(ids), np.concatenate(folds), stack_scores(parts)))
    ids, folds, rows = align_oof(runs)
    parts = [run.scores if at is None else take_rows(run.scores, at) for run, at in zip(runs, rows)]
    weights = ensemble.get("weights") or [run["weight"] for run in record["runs"]]
    return OofScores(ids, folds, Blend("recorded", np.asarray(weights, dtype=float)).combine(parts))


def pseudo_labels(cfg: Config, out: str | Path | None = None, precision: float = DEFAULT_PRECISION,
                  min_positives: int = DEFAULT_MIN_POSITIVES, progress: bool = True) -> Path:
    """Write the pseudo-label source of ``cfg``'s finished prediction (its csv and provenance) into ``out``
    (default ``run.dir/pseudo/``); returns the csv's path."""
    if not 0 < precision <= 1:
        raise PipelineError(f"--precision {precision}: expected a precision in (0, 1]")
    if min_positives < 1:
        raise PipelineError(f"--min-positives {min_positives}: expected at least 1")
    folder = RunFolder(cfg.run.dir)
    record = read_record(folder.root)
    out = Path(out) if out is not None else folder.pseudo
    ensure_writable(out, "pseudo-labels")
    csv_path = out / CSV_NAME
    if csv_path.exists() and not provenance_path(csv_path).is_file():  # replace only what src.pseudo wrote
        raise PipelineError(f"{csv_path} exists and has no {provenance_path(csv_path).name} beside it: it was not "
                            "written by src.pseudo; choose another --out, or move it away")
    vocabulary = run_vocabulary(cfg)
    cfg, train_table, _ = load_training_data(with_vocabulary(cfg, vocabulary), vocabulary)
    differences = config_differences(record["config"], cfg.model_dump(mode="json"))
    if differences:
        raise PipelineError(f"{decision_path(folder.root)} was written under another config than this one "
                            f"({'; '.join(differences[:4])}): pseudo-label with the config that predicted, or run "
                            "`python -m src.predict` with this one")
    test_table = load_test_table(cfg.data)
    scores_path = score_file(folder.test_scores, cfg.data.num_classes)
    if not scores_path.is_file() or scores_path.stat().st_mtime_ns > decision_path(folder.root).stat().st_mtime_ns:
        raise PipelineError(f"{scores_path} is missing or newer than {decision_path(folder.root)}: the latest "
                            "`python -m src.predict` did not finish; run it again")
    test_ids, test_scores = read_score_table(scores_path)
    if list(test_ids) != test_table["Id"].tolist():
        raise PipelineError(f"{scores_path}: its Ids are not the sample submission's; run `python -m src.predict` "
                            "again")

    oof = recorded_oof(cfg, record, train_table, test_table, vocabulary)
    thresholds = precision_thresholds(ids_truth(oof.ids, train_table, cfg.data.num_classes), oof.scores, precision,
                                      min_positives)
    labels = confident_labels(test_scores, thresholds)
    kept = np.flatnonzero(np.diff(labels.indptr) > 0)
    if not len(kept):  # a csv of a header alone is no source: training would refuse it
        raise PipelineError(f"no test row has a label at OOF precision >= {precision:g} (thresholds for "
                            f"{int(np.isfinite(thresholds).sum())} of {len(thresholds)} classes): nothing written; "
                            "lower --precision or --min-positives")
    bounds = labels.indptr.tolist()
    codes = [tuple(vocabulary.codes[c] for c in labels.indices[bounds[row]:bounds[row + 1]]) for row in kept]
    images = Path(cfg.data.dir) / cfg.data.test_images
    frame = get_format(cfg.data).label_csv(cfg.data, test_table.iloc[kept], codes, images)

    per_class = np.asarray(labels.sum(axis=0)).ravel()
    decision = decision_path(folder.root)
    provenance = {
        "made_by": "python -m src.pseudo",
        "run_dir": str(folder.root),
        "decision": str(decision),
        "decision_sha256": file_sha256(decision),
        "submission": record["submission"],
        "strategy": record["strategy"],
        "precision": precision,
        "min_positives": min_positives,
        "oof_rows": len(oof),
        "thresholds": {code: float(t) for code, t in zip(vocabulary.codes, thresholds) if np.isfinite(t)},
        "classes_without_threshold": int((~np.isfinite(thresholds)).sum()),
        "rows": {"test": len(test_table), "kept": len(kept), "dropped": len(test_table) - len(kept)},
        "labels": int(labels.nnz),
        "per_class": {code: int(k) for code, k in zip(vocabulary.codes, per_class) if k},
        "images": str(images),
        "csv_sha256": csv_sha256(frame),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with Staging() as staging:
        staging.file(csv_path, lambda tmp: frame.to_csv(tmp, index=False))
        staging.file(provenance_path(csv_path),
                     lambda tmp: tmp.write_text(json.dumps(provenance, indent=1) + "\n"))
        staging.commit()
    if progress:
        print(f"thresholds at OOF precision >= {precision:g} (at least {min_positives} true positive(s)) for "
              f"{len(provenance['thresholds'])} of {len(thresholds)} classes; {len(kept)} of {len(test_table)} test "
              f"rows kept with {labels.nnz} labels, {len(test_table) - len(kept)} rows without a confident label "
              "dropped (not kept as all-negative)")
        print(f"wrote {csv_path} and {provenance_path(csv_path)}")
        extra = extra_sources(cfg, csv_path, images)
        print("train the next round on it (the config's data.extra sources, then this one), in the config file:")
        print(f"data:\n  extra: {extra}")
        print(f"or on the command line: 'data.extra={extra}'")
    return csv_path


def extra_sources(cfg: Config, csv_path: Path, images: Path) -> str:
    """``data.extra`` as one YAML flow list: the config's extra sources, then the pseudo-label source."""
    entries = [extra.model_dump() for extra in cfg.data.extra]
    entries.append({"csv": str(csv_path), "images": str(images), "role": "train_only"})
    return "[" + ", ".join("{" + ", ".join(f"{key}: {json.dumps(value)}" for key, value in entry.items()) + "}"
                           for entry in entries) + "]"


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", help="the output folder (default: run.dir/pseudo/)")
    parser.add_argument("--precision", type=float, default=DEFAULT_PRECISION,
                        help="the OOF precision each class's threshold must reach (default %(default)s)")
    parser.add_argument("--min-positives", type=int, default=DEFAULT_MIN_POSITIVES,
                        help="true positives the OOF rows above a threshold must hold (default %(default)s)")
    args = parser.parse_args()
    pseudo_labels(config_from_args(args), args.out, args.precision, args.min_positives)


if __name__ == "__main__":
    run_cli(main)
