"""Stage 3: fold and experiment ensembles, TTA, threshold strategies, submission CSV and report.

    python -m src.predict [--config FILE] [key=value ...]

For each experiment (``predict.runs``, or just ``run.dir``) every fold checkpoint runs the test set
under the chosen D4 test-time views (``predict.tta``, reduced by ``predict.tta_reduce``); folds are
averaged, experiments combined with their weights. Out-of-fold predictions are combined the same way,
so thresholds are tuned on the very ensemble the submission uses. All threshold strategies are
compared on OOF (in-sample and cross-fold); ``predict.threshold`` picks the one applied to test (``auto``:
the best cross-fold estimate, a tie going to the simpler strategy).

Writes ``submission.path`` (validated, atomic), ``run.dir/test_probs.csv`` (for later ensembles),
``run.dir/report/`` (report.md, strategies.csv, per_class.csv, PNG plots) and ``run.dir/decision.json`` (the
decision as applied, with the config and the submission's hash: src.decision_record).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src.checkpoint import load_checkpoint, model_weights
from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, RunRef, override
from src.data import Vocabulary, label_csr, train_only_rows, with_vocabulary
from src.dataset import RGBYDataset, make_loader
from src.decision_record import REFIT_ON_TEST, decision_path, decision_record, write_record
from src.duplicates import apply_overrides, duplicate_overrides
from src.files import Staging, ensure_writable, ensure_writable_file, remove_stale_temps
from src.formats import label_separator, load_test_table, load_training_data, submission_columns, validate_submission
from src.metrics import binary_csr, count_labels, get_metric, nonfinite_rows
from src.model import build_model, check_views, infer, resolve_device
from src.pack import open_packed
from src.progress import note
from src.report import listed_classes, metric_columns, write_report
from src.run_folder import RunFolder, run_vocabulary
from src.score_table import (
    ScoreRows,
    ScoreSink,
    class_columns,
    combine_scores,
    read_score_table,
    score_file,
    stack_scores,
    write_score_table,
)
from src.thresholds import (
    AUTO,
    PSEUDO_FOLDS,
    Decision,
    ThresholdInputs,
    choose_strategy,
    compare_strategies,
    decision_for,
)
from src.tracking import Tracker


def require_finite(scores: np.ndarray | ScoreRows, what: str) -> np.ndarray | ScoreRows:
    """``scores`` unchanged, or a PipelineError (exit 2) before anything is written: a submission made of
    NaN scores would look valid and be worthless."""
    bad = nonfinite_rows(scores)
    if bad:
        raise PipelineError(f"{what}: {bad} of {len(scores)} rows hold NaN or infinite "
                            "scores (diverged weights?); nothing written, the previous submission is kept")
    return scores


def commonest_set_share(labels) -> float:
    """The share of the rows of a label matrix (dense or sparse) that hold its most common label set."""
    rows = binary_csr(labels)
    bounds = rows.indptr.tolist()
    counts = Counter(rows.indices[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:]))
    return max(counts.values()) / rows.shape[0] if rows.shape[0] else 0.0


def degenerate_reasons(predicted: np.ndarray, train_labels: np.ndarray, far: float = 3.0) -> list[str]:
    """Why a submission looks degenerate: the same label set on nearly every row where training has no such
    set, or predicted label rates more than ``far`` times off the training rates on most classes. Either
    matrix dense or sparse (1.7 M x 7 178 training labels are never made dense)."""
    reasons = []
    if predicted.shape[0] >= 10:
        share, train_share = commonest_set_share(predicted), commonest_set_share(train_labels)
        if share >= 0.9 and train_share < share / 2:
            reasons.append(f"{share:.0%} of the rows get the same label set (the most common set in training "
                           f"covers {train_share:.0%})")
    train_rate = count_labels(train_labels, 0) / train_labels.shape[0]
    test_rate = count_labels(predicted, 0) / predicted.shape[0]
    seen = train_rate > 0
    ratio = (test_rate[seen] + 1e-9) / train_rate[seen]
    off = (ratio > far) | (ratio < 1 / far)
    if seen.sum() >= 2 and off.mean() > 0.5:
        reasons.append(f"the predicted label rate is more than {far:g}x off the training rate for {int(off.sum())} "
                       f"of {int(seen.sum())} classes")
    return reasons


@dataclass
class OofScores:
    """Out-of-fold predictions: each row's Id and fold, and the n x m scores: an array, or for many classes
    scores read a block of rows at a time (src.score_table.ScoreRows: the folds' float16 tables, never loaded)."""

    ids: np.ndarray
    folds: np.ndarray
    scores: np.ndarray | ScoreRows

    def __len__(self) -> int:
        return len(self.ids)

    def frame(self) -> pd.DataFrame:
        """One table: Id, fold, one column per class (for a few classes, or a few rows)."""
        values = self.scores if isinstance(self.scores, np.ndarray) else self.scores[:]
        return pd.concat([pd.DataFrame({"Id": self.ids, "fold": self.folds}),
                          pd.DataFrame(values, columns=class_columns(values.shape[1]))], axis=1)


def predict_run(cfg: Config, ref: RunRef, test_table: pd.DataFrame, train_table: pd.DataFrame,
                device: torch.device, progress: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Test scores of one experiment (mean over its folds) and its OOF scores as one table (Id, fold, one column
    per class): :func:`score_run` for a few classes."""
    test, oof = score_run(cfg, ref, test_table, train_table, device, progress)
    return (test if isinstance(test, np.ndarray) else test[:]), oof.frame()


def fold_networks(run_cfg: Config, fold_weights: Iterable[tuple[int, dict]],
                  device: torch.device) -> Iterator[tuple[int, torch.nn.Module]]:
    """``(fold, network)`` for each fold's weights: one network per experiment, each fold's weights loaded into it
    in turn (float16 weights are copied into the float32 parameters)."""
    model = None
    for fold, weights in fold_weights:
        if model is None:
            model = build_model(run_cfg, out_dim=weights["head.weight"].shape[0]).to(device)
            if run_cfg.model.channels_last:
                model = model.to(memory_format=torch.channels_last)
        model.load_state_dict(weights)
        yield fold, model


def score_dataset(cfg: Config, run_cfg: Config, model: torch.nn.Module, dataset: RGBYDataset, to_scores,
                  device: torch.device, desc: str, progress: bool = True,
                  scratch: Path | None = None) -> np.ndarray | ScoreRows:
    """Class scores of every image of ``dataset``: the configured TTA views and reduction, ``to_scores`` on the
    raw outputs; an array, or above ``CSV_MAX_CLASSES`` classes a float32 table in ``scratch`` filled batch by
    batch (see :class:`src.score_table.ScoreSink`)."""
    loader = make_loader(dataset, cfg.predict.batch_size, cfg.train.num_workers, cfg.train.seed, device)
    sink = ScoreSink(dataset.ids, cfg.data.num_classes, scratch, dtype=np.float32)
    try:
        infer(model, loader, device, precision=cfg.train.precision, channels_last=run_cfg.model.channels_last,
              views=cfg.predict.tta, reduce=cfg.predict.tta_reduce, to_scores=to_scores, desc=desc,
              progress=progress, into=sink.append)
    except BaseException:
        sink.abort()
        raise
    return sink.finish()


def score_run(cfg: Config, ref: RunRef, test_table: pd.DataFrame, train_table: pd.DataFrame, device: torch.device,
              progress: bool = True, scratch: Path | None = None) -> tuple[np.ndarray | ScoreRows, OofScores]:
    """Test scores of one experiment (mean over its folds) and its OOF scores. Above
    ``src.score_table.CSV_MAX_CLASSES`` classes each fold's test scores go to a float32 table in ``scratch`` as
    inference makes them and the OOF scores stay in the folds' tables; both are read a block of rows at a time."""
    folder = RunFolder(ref.dir)
    run_cfg = folder.load_config()  # the experiment's own backbone, size and loss
    if run_cfg.data.num_classes != cfg.data.num_classes:
        raise PipelineError(f"{folder.root}: trained for {run_cfg.data.num_classes} classes, "
                            f"this config has {cfg.data.num_classes}")
    if run_cfg.train.augment.d4 == 0 and set(cfg.predict.tta) - {"identity"}:
        note(f"warning: {folder.root} was trained without D4 augmentation; TTA views {cfg.predict.tta} show the "
             "model images unlike any it was trained on (consider predict.tta=[identity])")

    # The packed cache at this experiment's image size, if there is one (and it is fresh).
    data_cfg = cfg.data.model_copy(update={"image_size": run_cfg.data.image_size})

    def dataset_of(table: pd.DataFrame) -> RGBYDataset:
        return RGBYDataset(table, cfg.data.num_classes, run_cfg.data.image_size, packed=open_packed(data_cfg, table),
                           channels=run_cfg.model.in_chans)

    def scores_of(model: torch.nn.Module, dataset: RGBYDataset, to_scores, desc: str) -> np.ndarray | ScoreRows:
        return score_dataset(cfg, run_cfg, model, dataset, to_scores, device, desc, progress, scratch)

    test_set = dataset_of(test_table)  # once per experiment: every fold scores the same images
    rows_by_id = train_table.set_index("Id")
    fold_scores, oof_ids, oof_folds, oof_parts = [], [], [], []
    checkpoints = folder.fold_checkpoints(cfg.predict.folds, cfg.predict.checkpoint)
    untrained = sorted(set(range(run_cfg.folds.n_splits)) - {fold for fold, _ in checkpoints})
    if cfg.predict.folds is None and untrained:
        note(f"warning: {folder.root}: fold(s) {untrained} of {run_cfg.folds.n_splits} have no "
             f"{cfg.predict.checkpoint}.pt; predicting with the {len(checkpoints)} trained one(s) "
             "(set predict.folds to choose on purpose)")
    paths = dict(checkpoints)
    fold_weights = ((fold, model_weights(load_checkpoint(path))) for fold, path in checkpoints)
    for fold, model in fold_networks(run_cfg, fold_weights, device):
        path = paths[fold]
        to_scores = folder.output_scorer(run_cfg, fold)
        name = f"{folder.root.name} fold {fold}"
        fold_scores.append(require_finite(scores_of(model, test_set, to_scores, name), f"{path}: test scores"))
        oof_path = folder.oof(fold, cfg.predict.checkpoint)
        ids, scores = read_score_table(oof_path)
        if cfg.predict.oof_tta:
            val_rows = rows_by_id.loc[ids].reset_index()
            rescored = scores_of(model, dataset_of(val_rows), to_scores, f"{name} OOF")
            scores = rescored.astype(scores.dtype) if isinstance(rescored, np.ndarray) else rescored
        oof_ids.append(ids)
        oof_folds.append(np.full(len(ids), fold))
        oof_parts.append(require_finite(scores, f"{oof_path}: OOF scores"))
    test = combine_scores(fold_scores, fold_mean)
    return test, OofScores(np.concatenate(oof_ids), np.concatenate(oof_folds), stack_scores(oof_parts))


def fold_mean(parts: list[np.ndarray]) -> np.ndarray:
    """An experiment's test scores: the mean over its folds."""
    return np.mean(parts, axis=0)


def weighted_mean(weights: list[float], parts: list[np.ndarray]) -> np.ndarray:
    """An ensemble's scores: the experiments' scores weighted by ``experiments[].weight``."""
    return sum(weight * scores for weight, scores in zip(weights, parts)) / sum(weights)


def combine_runs(per_run: list[tuple[float, np.ndarray | ScoreRows, OofScores]]
                 ) -> tuple[np.ndarray | ScoreRows, OofScores]:
    """Weighted mean of test scores and of OOF scores over experiments (OOF on the Ids all share, in the first
    experiment's row order); tables are combined a block of rows at a time as they are read."""
    weights = [weight for weight, _, _ in per_run]
    test = combine_scores([scores for _, scores, _ in per_run], partial(weighted_mean, weights))
    common = set.intersection(*(set(oof.ids) for _, _, oof in per_run))
    if any(len(common) != len(oof) for _, _, oof in per_run):
        note(f"warning: experiments have different OOF Ids; thresholds use the {len(common)} they share")
    first = per_run[0][2]
    keep = np.flatnonzero([sample_id in common for sample_id in first.ids])
    ids = first.ids[keep]
    rows = [pd.Index(oof.ids).get_indexer(ids) for _, _, oof in per_run]
    rows = [None if len(at) == len(oof) and np.array_equal(at, np.arange(len(at))) else at
            for at, (_, _, oof) in zip(rows, per_run)]
    scores = combine_scores([oof.scores for _, _, oof in per_run], partial(weighted_mean, weights), rows)
    return test, OofScores(ids, first.folds[keep], scores)


def label_rates(cfg: Config, train_labels: np.ndarray, vocabulary: Vocabulary | None = None) -> np.ndarray:
    """Positive rate of each class in train, or the user's table (csv ``class,rate``; ``class`` is the label
    as the data writes it: a class index for hpa, a label id or name for openimages and csv)."""
    rates = count_labels(train_labels, 0) / train_labels.shape[0]  # dense or sparse labels
    if cfg.predict.rate_table:
        vocabulary = vocabulary or Vocabulary.numbered(len(rates))
        table = pd.read_csv(cfg.predict.rate_table, dtype={"class": str})
        if not {"class", "rate"} <= set(table.columns):
            raise PipelineError(f"{cfg.predict.rate_table}: expected columns class,rate")
        index = table["class"].str.strip().map(vocabulary.index)
        rate = pd.to_numeric(table["rate"], errors="coerce")
        bad = table[index.isna() | ~rate.between(0, 1)]
        if len(bad):
            raise PipelineError(f"{cfg.predict.rate_table}: row(s) {list(bad.index + 2)} name a label outside the "
                                f"run's vocabulary (such as {vocabulary.codes[0]!r}) or a rate outside [0, 1]")
        rates[index.astype(int).to_numpy()] = rate.to_numpy()
    return rates


def format_labels(predicted: np.ndarray, vocabulary: Vocabulary, separator: str = " ") -> list[str]:
    """Each row's predicted labels (a dense or sparse boolean matrix) as the submission writes them."""
    rows = binary_csr(predicted)
    bounds, indices = rows.indptr.tolist(), rows.indices
    return [vocabulary.decode(indices[a:b].tolist(), separator) for a, b in zip(bounds[:-1], bounds[1:])]


def score_experiments(cfg: Config, test_table: pd.DataFrame, train_table: pd.DataFrame, device: torch.device,
                      progress: bool = True, scratch: Path | None = None
                      ) -> tuple[np.ndarray | ScoreRows, OofScores, list[RunRef]]:
    """Test and OOF scores of the ensemble: every experiment of ``predict.runs`` (or just ``run.dir``)."""
    refs = cfg.predict.runs or [RunRef(dir=cfg.run.dir)]
    per_run = [(ref.weight, *score_run(cfg, ref, test_table, train_table, device, progress, scratch)) for ref in refs]
    return *combine_runs(per_run), refs


def oof_truth(oof: OofScores, train_table: pd.DataFrame, num_classes: int) -> tuple:
    """The OOF rows' true labels (a sparse binary matrix) and their scores, row for row."""
    truth_by_id = dict(zip(train_table["Id"], train_table["labels"]))
    unknown = [i for i in oof.ids if i not in truth_by_id]
    if unknown:
        raise PipelineError(f"OOF Ids not in the training data (e.g. {unknown[:3]}): run dirs and data.dir disagree")
    return label_csr([truth_by_id[i] for i in oof.ids], num_classes), oof.scores


def make_submission(test_table: pd.DataFrame, predicted: np.ndarray, vocabulary: Vocabulary,
                    columns: tuple[str, str] = ("Id", "Predicted"), separator: str = " ") -> pd.DataFrame:
    """The submission table in the sample submission's columns (hpa ``Id,Predicted`` with class indices;
    openimages ``image_id,labels`` with label ids; csv the configured columns with label names joined by
    ``separator``), validated."""
    labels = format_labels(predicted, vocabulary, separator)
    submission = pd.DataFrame({columns[0]: test_table["Id"], columns[1]: labels})
    validate_submission(submission, test_table["Id"].tolist(), vocabulary, columns, separator)
    return submission


def report_header(cfg: Config, refs: list[RunRef], oof: OofScores, n_test: int, chosen: str,
                  decision: Decision | None = None) -> str:
    """The report's opening paragraph: what was ensembled, the metric, the chosen strategy and decision."""
    chosen += f" ({decision.describe()})" if decision is not None else ""
    chosen += f", by predict.threshold={AUTO}" if cfg.predict.threshold == AUTO else ""
    return (f"Experiments: {', '.join(f'{r.dir} (weight {r.weight})' for r in refs)}; "
            f"TTA {cfg.predict.tta} ({cfg.predict.tta_reduce}); {len(oof)} OOF rows, {n_test} test rows. "
            f"Metric: {get_metric(cfg.metric).title}. Chosen strategy: **{chosen}**. Cross-fold scores fit the "
            "decision on the other folds' OOF rows: the honest estimate of the test score."
            + (f" Only one fold's OOF rows: cross-fold fits on {PSEUDO_FOLDS - 1} of {PSEUDO_FOLDS} random parts of "
               "them and scores the last." if len(np.unique(oof.folds)) < 2 else ""))


def track(cfg: Config, out_dir: Path, strategies: pd.DataFrame, classes: pd.DataFrame, plots: dict[str, Path]) -> None:
    """The OOF comparison (keys named after the metric, e.g. ``oof/f2_samples_cross_fold/top_k``), the
    per-class table (when it is short enough to read) and report figures to W&B."""
    tracker = Tracker(cfg, out_dir, name=f"{out_dir.name}-predict", group=out_dir.name, job_type="predict")
    try:
        tracker.log({f"oof/{column.removeprefix('oof_')}/{row['strategy']}": row[column]
                     for _, row in strategies.iterrows() for column in metric_columns(cfg.metric)})
        if len(listed_classes(classes)) == len(classes):  # thousands of classes: per_class.csv only
            tracker.log_per_class("oof/per_class", {"f1": classes["f1"].to_numpy(),
                                                    "threshold": classes["threshold"].to_numpy()})
        tracker.log_images({f"report/{name}": path for name, path in plots.items()})
    finally:
        tracker.finish()


def predict(cfg: Config, progress: bool = True) -> Path:
    """Ensemble, TTA, threshold comparison, submission and report; returns the submission path."""
    check_views(cfg.predict.tta)
    ensure_writable(cfg.run.dir, "prediction outputs")  # before any inference
    ensure_writable_file(cfg.submission.path, "submission.path")
    for folder in (cfg.run.dir, Path(cfg.submission.path).parent):  # what a killed predict left (never a live one's)
        remove_stale_temps(folder)
    device = resolve_device(cfg.train.device)
    vocabulary = run_vocabulary(cfg)  # the runs' labels, unchanged; training labels outside it are reported
    cfg, train_table, _ = load_training_data(with_vocabulary(cfg, vocabulary), vocabulary)
    test_table = load_test_table(cfg.data)
    m = cfg.data.num_classes
    # Read before any inference: a missing or stale duplicates file stops predict at once.
    overrides = duplicate_overrides(cfg, test_table, train_table) if cfg.predict.overrides else None

    # Many-class scores made here (each fold's test scores, re-scored OOF rows) go to a scratch folder as inference
    # makes them and are read back a block of rows at a time; the folder goes when predict ends (its finalizer on
    # an error; remove_stale_temps after a kill). Labels stay sparse: 1.7 M x 7 178 dense would be 12 GB.
    scratch = tempfile.TemporaryDirectory(prefix="scores-", suffix=f".{os.getpid()}.tmp", dir=cfg.run.dir)
    test_scores, oof, refs = score_experiments(cfg, test_table, train_table, device, progress, Path(scratch.name))
    oof_true, oof_scores = oof_truth(oof, train_table, m)
    # The competition's label rates: a train-only source (another distribution) is left out, as from the OOF rows.
    train_labels = label_csr(train_table["labels"][~train_only_rows(cfg.data, train_table)], m)
    train_rate = label_rates(cfg, train_labels, vocabulary)
    results = compare_strategies(oof_true, oof_scores, oof.folds, train_rate, cfg.predict, cfg.metric)
    chosen, why = choose_strategy(cfg.predict.threshold, results)
    # The comparison's in-sample decision; only the rate strategy reads the scores it is applied to, so it is
    # fitted again on the test scores.
    decision = results[chosen]["decision"] if chosen not in REFIT_ON_TEST else decision_for(
        chosen, ThresholdInputs(oof_true, oof_scores, test_scores, train_rate), cfg.predict, cfg.metric)
    predicted = decision.apply(test_scores)
    if overrides is not None:
        predicted = apply_overrides(predicted, overrides)
    submission = make_submission(test_table, predicted, vocabulary, submission_columns(cfg.data),
                                 label_separator(cfg.data))
    degenerate = degenerate_reasons(predicted, train_labels)

    # All outputs as one set (staged, then renamed into place): the run-folder outputs first, the submission
    # last. A failure on the way leaves every previous output as it was.
    out = RunFolder(cfg.run.dir)
    header = report_header(cfg, refs, oof, len(test_table), chosen, decision)
    if overrides is not None:
        header += (f"\n\nOverrides (predict.overrides): {len(overrides.rows)} of {len(test_table)} test rows take the "
                   f"labels of a labelled near-duplicate ({cfg.folds.duplicates_path}) instead of the decision.")
    if degenerate:
        header += "\n\n**Warning: the submission looks degenerate:** " + "; ".join(degenerate) + "."
    with Staging() as staging:
        staging.file(score_file(out.test_scores, m), lambda tmp: write_score_table(tmp, test_table["Id"], test_scores))
        test_rate = count_labels(predicted, 0) / predicted.shape[0]
        strategies, classes, plots = write_report(out.report, header, results, chosen, oof_true, oof_scores,
                                                  train_rate, test_rate, staging, cfg.metric, why)
        if degenerate and not cfg.predict.force:
            staging.commit()  # the report shows what went wrong; the submission is not replaced
            raise PipelineError(
                f"the submission looks degenerate: {'; '.join(degenerate)}. The model has probably learned little "
                f"(see the history's beats_prior column and {plots['label_rates']}); nothing written to the "
                "submission, the previous one is kept. Write it anyway with `python -m src.predict --force` "
                "(predict.force=true).")
        # The decision as applied, the config and the submission's hash, beside it: src.submit checks against it,
        # src.bundle ships it.
        overridden = None if overrides is None else overrides.record(test_table["Id"], vocabulary,
                                                                     cfg.folds.duplicates_path)
        record = decision_record(cfg, chosen, decision, results[chosen], train_rate, refs, submission, overridden)
        staging.file(decision_path(out.root), lambda tmp: write_record(tmp, record))
        sub_path = staging.file(cfg.submission.path, lambda tmp: submission.to_csv(tmp, index=False))
        staging.commit()
    scratch.cleanup()
    if degenerate:
        note(f"warning: the submission looks degenerate: {'; '.join(degenerate)}; written anyway (predict.force)")
    track(cfg, out.root, strategies, classes, plots)

    if progress:
        print(strategies.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"applied to test: {chosen}: {why}")
        listed = listed_classes(classes)
        print(f"\nper class ({chosen}" + (f"; the {len(listed)} most frequent of {len(classes)}" if
                                          len(listed) < len(classes) else "") + "):")
        print(listed.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\nwrote {sub_path} ({len(submission)} rows, {count_labels(predicted, 1).mean():.2f} labels per image), "
              f"{out.test_scores} and the report in {out.report}/"
              + (f"; {len(overrides.rows)} row(s) took a duplicate's labels" if overrides is not None else ""))
    return sub_path


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="write a degenerate-looking submission anyway "
                        "(same as predict.force=true)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    predict(override(cfg, **{"predict.force": True}) if args.force else cfg)


if __name__ == "__main__":
    run_cli(main)
