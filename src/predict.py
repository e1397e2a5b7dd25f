"""Stage 3: fold and experiment ensembles, TTA, threshold strategies, submission CSV and report.

    python -m src.predict [--config FILE] [key=value ...]

For each experiment (``predict.runs``, or just ``run.dir``) every fold checkpoint runs the test set
under the chosen D4 test-time views (``predict.tta``, reduced by ``predict.tta_reduce``); folds are
averaged, experiments combined with their weights (``predict.weights``: hand, equal, searched, or a stack:
src.ensemble, compared cross-fold). An experiment may be a pair of score tables made elsewhere
(``predict.runs[].scores``). Out-of-fold predictions are combined the same way, so thresholds are tuned on the very
ensemble the submission uses. All threshold strategies are compared on OOF (in-sample and cross-fold);
``predict.threshold`` picks the one applied to test (``auto``: the best cross-fold estimate, a tie going to the
simpler strategy). With ``data.holdout`` (labelled test-domain images that never train) the blend and the decision
are fitted on the holdout's scores instead, and the report shows OOF and holdout estimates side by side.

Writes ``submission.path`` (validated, atomic), ``run.dir/test_probs.csv`` (for later ensembles),
``run.dir/report/`` (report.md, strategies.csv, per_class.csv, PNG plots) and ``run.dir/decision.json`` (the
decision as applied, with the config and the submission's hash: src.decision_record).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src.checkpoint import load_fingerprinted, model_weights
from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, RunRef, override
from src.data import Vocabulary, label_csr, train_only_rows, with_vocabulary
from src.dataset import RGBYDataset, make_loader
from src.decision_record import REFIT_ON_TEST, decision_path, decision_record, write_record
from src.duplicates import apply_overrides, duplicate_overrides
from src.ensemble import (
    Blend,
    BlendSetting,
    as_arrays,
    blend_methods,
    check_blend_config,
    choose_blend,
    compare_blends,
)
from src.files import Staging, ensure_writable, ensure_writable_file, remove_stale_temps
from src.folds import read_folds_file
from src.formats import (
    label_separator,
    load_holdout_table,
    load_test_table,
    load_training_data,
    submission_columns,
    validate_submission,
)
from src.metrics import binary_csr, count_labels, get_metric, nonfinite_rows, take_rows
from src.model import build_model, check_views, infer, resolve_device
from src.pack import open_packed
from src.progress import note
from src.report import ensemble_table, listed_classes, metric_columns, write_report
from src.run_folder import RunFolder, run_vocabulary
from src.score_table import (
    ScoreRows,
    ScoreSink,
    class_columns,
    combine_scores,
    matching_rows,
    read_external_scores,
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
    scores = score_run(cfg, ref, test_table, train_table, device, progress)
    test = scores.test
    return (test if isinstance(test, np.ndarray) else test[:]), scores.oof.frame()


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
    """Class scores of every image of ``dataset``: the configured TTA views (of each crop view, ``predict.crops``, at
    the run's ``train.augment.crop``) and reduction, ``to_scores`` on the
    raw outputs; an array, or above ``CSV_MAX_CLASSES`` classes a float32 table in ``scratch`` filled batch by
    batch (see :class:`src.score_table.ScoreSink`)."""
    loader = make_loader(dataset, cfg.predict.batch_size, cfg.train.num_workers, cfg.train.seed, device)
    sink = ScoreSink(dataset.ids, cfg.data.num_classes, scratch, dtype=np.float32)
    try:
        infer(model, loader, device, precision=cfg.train.precision, channels_last=run_cfg.model.channels_last,
              views=cfg.predict.tta, reduce=cfg.predict.tta_reduce, to_scores=to_scores, desc=desc,
              progress=progress, into=sink.append, crops=cfg.predict.crops, crop=run_cfg.train.augment.crop)
    except BaseException:
        sink.abort()
        raise
    return sink.finish()


@dataclass
class RunScores:
    """One experiment's scores: test (mean over its folds), OOF, and ``data.holdout``'s (None without one)."""

    ref: RunRef
    test: np.ndarray | ScoreRows
    oof: OofScores
    holdout: np.ndarray | ScoreRows | None = None
    # Each fold's checkpoint as predict read it ({"fold", "size", "sha256"}); none for score tables made elsewhere.
    checkpoints: list[dict] = field(default_factory=list)


def score_run(cfg: Config, ref: RunRef, test_table: pd.DataFrame, train_table: pd.DataFrame, device: torch.device,
              progress: bool = True, scratch: Path | None = None, holdout_table: pd.DataFrame | None = None
              ) -> RunScores:
    """Test scores of one experiment (mean over its folds), its OOF scores, (with ``holdout_table``) the holdout's
    (mean over its folds, as test) and the checkpoints used (each fold's ``{"fold", "size", "sha256"}``: what the
    decision record keeps, so a bundle ships those very bytes). Above ``src.score_table.CSV_MAX_CLASSES`` classes
    each fold's test scores go to a float32 table in ``scratch`` as inference makes them and the OOF scores stay in
    the folds' tables; both are read a block of rows at a time."""
    folder = RunFolder(ref.dir)
    run_cfg = folder.load_config()  # the experiment's own backbone, size and loss
    if run_cfg.data.num_classes != cfg.data.num_classes:
        raise PipelineError(f"{folder.root}: trained for {run_cfg.data.num_classes} classes, "
                            f"this config has {cfg.data.num_classes}")
    if run_cfg.train.augment.d4 == 0 and set(cfg.predict.tta) - {"identity"}:
        note(f"warning: {folder.root} was trained without D4 augmentation; TTA views {cfg.predict.tta} show the "
             "model images unlike any it was trained on (consider predict.tta=[identity])")
    if cfg.predict.crops:
        if run_cfg.train.augment.crop is None:
            raise PipelineError(f"predict.crops={cfg.predict.crops}: {folder.root} was trained without "
                                "train.augment.crop (no crop size); set predict.crops=0 (the whole image)")
        if not cfg.predict.oof_tta:
            note(f"note: predict.crops={cfg.predict.crops} scores test images by crops, but the OOF scores the "
                 "thresholds are tuned on are training's, of whole images; predict.oof_tta=true scores them alike")

    # The packed cache at this experiment's image size, if there is one (and it is fresh).
    data_cfg = cfg.data.model_copy(update={"image_size": run_cfg.data.image_size})

    def dataset_of(table: pd.DataFrame, packed: bool = True) -> RGBYDataset:
        return RGBYDataset(table, cfg.data.num_classes, run_cfg.data.image_size,
                           packed=open_packed(data_cfg, table) if packed else None, channels=run_cfg.model.in_chans)

    def scores_of(model: torch.nn.Module, dataset: RGBYDataset, to_scores, desc: str) -> np.ndarray | ScoreRows:
        return score_dataset(cfg, run_cfg, model, dataset, to_scores, device, desc, progress, scratch)

    test_set = dataset_of(test_table)  # once per experiment: every fold scores the same images
    # The holdout is never packed (src.pack packs the training and test sources): its images are read.
    holdout_set = None if holdout_table is None else dataset_of(holdout_table, packed=False)
    rows_by_id = train_table.set_index("Id")
    fold_scores, oof_ids, oof_folds, oof_parts, holdout_scores = [], [], [], [], []
    checkpoints = folder.fold_checkpoints(cfg.predict.folds, cfg.predict.checkpoint)
    untrained = sorted(set(range(run_cfg.folds.n_splits)) - {fold for fold, _ in checkpoints})
    if cfg.predict.folds is None and untrained:
        note(f"warning: {folder.root}: fold(s) {untrained} of {run_cfg.folds.n_splits} have no "
             f"{cfg.predict.checkpoint}.pt; predicting with the {len(checkpoints)} trained one(s) "
             "(set predict.folds to choose on purpose)")
    paths, used = dict(checkpoints), []

    def fold_weights() -> Iterator[tuple[int, dict]]:
        for fold, path in checkpoints:
            ckpt, fingerprint = load_fingerprinted(path)
            used.append({"fold": fold, **fingerprint})
            yield fold, model_weights(ckpt)

    for fold, model in fold_networks(run_cfg, fold_weights(), device):
        path = paths[fold]
        to_scores = folder.output_scorer(run_cfg, fold)
        name = f"{folder.root.name} fold {fold}"
        fold_scores.append(require_finite(scores_of(model, test_set, to_scores, name), f"{path}: test scores"))
        if holdout_set is not None:
            holdout_scores.append(require_finite(scores_of(model, holdout_set, to_scores, f"{name} holdout"),
                                                 f"{path}: holdout scores"))
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
    holdout = combine_scores(holdout_scores, fold_mean) if holdout_scores else None
    oof = OofScores(np.concatenate(oof_ids), np.concatenate(oof_folds), stack_scores(oof_parts))
    return RunScores(ref, test, oof, holdout, used)


def pseudo_sources(runs: list[RunScores]) -> list[dict]:
    """The provenance of each pseudo-label source (src.pseudo) the folds predict used trained on, once each."""
    found = {}
    for run in runs:
        for used in run.checkpoints:
            for source in RunFolder(run.ref.dir).pseudo_labels(used["fold"]):
                found.setdefault((source["csv"], source.get("csv_sha256")), source)
    return list(found.values())


def fold_mean(parts: list[np.ndarray]) -> np.ndarray:
    """An experiment's test scores: the mean over its folds."""
    return np.mean(parts, axis=0)


def score_pair(cfg: Config, ref: RunRef, test_table: pd.DataFrame, train_table: pd.DataFrame,
               vocabulary: Vocabulary, holdout_table: pd.DataFrame | None = None) -> RunScores:
    """The scores of an experiment made elsewhere (``predict.runs[].scores``), checked against the data: OOF Ids
    must be training Ids (their folds read from ``folds.path``), the test table must hold every test Id and the
    holdout table every holdout Id; columns must name the run's labels. A bad file stops with one line naming it
    and its first bad Id or label."""
    pair = ref.scores
    codes = vocabulary.codes
    oof_ids, oof_scores = read_external_scores(Path(pair.oof), codes)
    unknown = ~pd.Index(oof_ids).isin(train_table["Id"])
    if unknown.any():
        raise PipelineError(f"{pair.oof}: Id {oof_ids[np.argmax(unknown)]!r} is not a training Id "
                            f"({int(unknown.sum())} such rows)")
    folds = read_folds_file(cfg).set_index("Id")["fold"]
    missing = ~pd.Index(oof_ids).isin(folds.index)
    if missing.any():
        raise PipelineError(f"{pair.oof}: Id {oof_ids[np.argmax(missing)]!r} has no fold in {cfg.folds.path}")
    oof = OofScores(np.asarray(oof_ids, dtype=object), folds.loc[list(oof_ids)].to_numpy(),
                    require_finite(oof_scores, f"{pair.oof}: OOF scores"))

    def in_order(path: str | None, table: pd.DataFrame, what: str) -> np.ndarray | ScoreRows:
        if path is None:
            raise PipelineError(f"predict.runs entry {ref.name}: data.holdout is set, so its scores need "
                                "scores.holdout (the holdout's scores in the same format)")
        ids, scores = read_external_scores(Path(path), codes)
        return take_rows(scores, matching_rows(Path(path), ids, table["Id"].tolist(), what))

    test = require_finite(in_order(pair.test, test_table, "test"), f"{pair.test}: test scores")
    holdout = None if holdout_table is None else in_order(pair.holdout, holdout_table, "holdout")
    return RunScores(ref, test, oof, holdout)


def align_oof(runs: list[OofScores]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """The OOF Ids every experiment holds (in the first experiment's row order), their folds, and for each
    experiment which of its rows they are (None: all, in order)."""
    common = set.intersection(*(set(oof.ids) for oof in runs))
    if any(len(common) != len(oof) for oof in runs):
        note(f"warning: experiments have different OOF Ids; thresholds use the {len(common)} they share")
    first = runs[0]
    keep = np.flatnonzero([sample_id in common for sample_id in first.ids])
    ids = first.ids[keep]
    rows = [pd.Index(oof.ids).get_indexer(ids) for oof in runs]
    rows = [None if len(at) == len(oof) and np.array_equal(at, np.arange(len(at))) else at
            for at, oof in zip(rows, runs)]
    return ids, first.folds[keep], rows


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
                      progress: bool = True, scratch: Path | None = None, holdout_table: pd.DataFrame | None = None,
                      vocabulary: Vocabulary | None = None) -> list[RunScores]:
    """The scores of every experiment of ``predict.runs`` (or just ``run.dir``): run folders scored here, score
    tables made elsewhere read and checked."""
    refs = cfg.predict.runs or [RunRef(dir=cfg.run.dir)]
    vocabulary = vocabulary or Vocabulary.numbered(cfg.data.num_classes)
    return [score_run(cfg, ref, test_table, train_table, device, progress, scratch, holdout_table)
            if ref.dir is not None else score_pair(cfg, ref, test_table, train_table, vocabulary, holdout_table)
            for ref in refs]


def ids_truth(ids: np.ndarray, train_table: pd.DataFrame, num_classes: int):
    """The true labels of training rows ``ids`` (a sparse binary matrix)."""
    truth_by_id = dict(zip(train_table["Id"], train_table["labels"]))
    unknown = [i for i in ids if i not in truth_by_id]
    if unknown:
        raise PipelineError(f"OOF Ids not in the training data (e.g. {unknown[:3]}): run dirs and data.dir disagree")
    return label_csr([truth_by_id[i] for i in ids], num_classes)


@dataclass
class FittedBlend:
    """The blend applied and the decision fitted on its scores: ``blends`` and ``blend_why`` hold the comparison of
    the ways of combining the runs (None when only the hand weights were asked for, or fitting was too big);
    ``scores`` are the fitted rows' blended scores the decision was fitted on, ``results`` the strategies compared
    on them, ``chosen`` and ``why`` the strategy applied."""

    blend: Blend
    scores: np.ndarray | ScoreRows
    results: dict[str, dict]
    chosen: str
    why: str
    blends: dict[str, dict] | None = None
    blend_why: str | None = None

    def record(self, cfg: Config, fitted_on: str) -> dict | None:
        """decision.json's ``ensemble``: None when nothing was compared (the hand weights, as always)."""
        if self.blends is None:
            return None
        return {**self.blend.record(), "requested": cfg.predict.weights, "stack_requested": cfg.predict.stack,
                "why": self.blend_why, "fitted_on": fitted_on,
                "cross_fold": {name: r["cross_fold"] for name, r in self.blends.items()}}


def fit_blend_and_decision(cfg: Config, truth, parts: list[np.ndarray | ScoreRows], folds: np.ndarray,
                           train_rate: np.ndarray, hand_weights: np.ndarray) -> FittedBlend:
    """How the runs' scores (``parts``, the rows of ``truth``: OOF or the holdout) become one, and the decision on
    it: the strategies compared on the hand-weighted mean; with ``predict.weights``/``predict.stack`` set, every
    way of combining compared cross-fold for the strategy chosen (src.ensemble.compare_blends), and the strategies
    compared again on the chosen blend's scores when it is not the hand weights."""
    blend = Blend("hand", hand_weights)
    scores = blend.combine(parts)
    results = compare_strategies(truth, scores, folds, train_rate, cfg.predict, cfg.metric)
    chosen, why = choose_strategy(cfg.predict.threshold, results)
    methods = blend_methods(cfg.predict, len(parts))
    if methods == ["hand"]:
        return FittedBlend(blend, scores, results, chosen, why)
    arrays = as_arrays(parts)
    if arrays is None:
        note(f"warning: predict.weights={cfg.predict.weights}, predict.stack={cfg.predict.stack}: fitting a blend "
             f"holds {parts[0].shape[0]} x {parts[0].shape[1]} scores of {len(parts)} runs in memory, above "
             "src.ensemble.BLEND_MAX_CELLS; the hand weights are applied")
        return FittedBlend(blend, scores, results, chosen, why)
    setting = BlendSetting(chosen, cfg.predict, get_metric(cfg.metric), train_rate, hand_weights)
    blends = compare_blends(truth, arrays, folds, methods, setting)
    method, blend_why = choose_blend(cfg.predict, blends)
    if method != "hand":
        blend = blends[method]["blend"]
        scores = blend.fitted  # for a stack, cross-fitted: never scores of rows its model saw
        results = compare_strategies(truth, scores, folds, train_rate, cfg.predict, cfg.metric)
        chosen, why = choose_strategy(cfg.predict.threshold, results)
    return FittedBlend(blend, scores, results, chosen, why, blends, blend_why)


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
    return (f"Experiments: {', '.join(f'{r.name} (weight {r.weight})' for r in refs)}; "
            f"TTA {cfg.predict.tta}{f' x {cfg.predict.crops} crops' if cfg.predict.crops else ''} "
            f"({cfg.predict.tta_reduce}); {len(oof)} OOF rows, {n_test} test rows. "
            f"Metric: {get_metric(cfg.metric).title}. Chosen strategy: **{chosen}**. Cross-fold scores fit the "
            "decision on the other folds' OOF rows: the honest estimate of the test score."
            + (f" Only one fold's OOF rows: cross-fold fits on {PSEUDO_FOLDS - 1} of {PSEUDO_FOLDS} random parts of "
               "them and scores the last." if len(np.unique(oof.folds)) < 2 else ""))


def track(cfg: Config, out_dir: Path, strategies: pd.DataFrame, classes: pd.DataFrame, plots: dict[str, Path]) -> None:
    """The OOF comparison (keys named after the metric, e.g. ``oof/f2_samples_cross_fold/top_k``), the
    per-class table (when it is short enough to read) and report figures to W&B."""
    tracker = Tracker(cfg, out_dir, name=f"{out_dir.name}-predict", group=out_dir.name, job_type="predict")
    try:
        columns = [*metric_columns(cfg.metric), *(column for column in metric_columns(cfg.metric, "holdout")
                                                   if column in strategies.columns)]
        tracker.log({f"{column.split('_')[0]}/{column.split('_', 1)[1]}/{row['strategy']}": row[column]
                     for _, row in strategies.iterrows() for column in columns})
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
    check_blend_config(cfg.predict, m)
    # Read before any inference: a missing or stale duplicates file stops predict at once.
    overrides = duplicate_overrides(cfg, test_table, train_table) if cfg.predict.overrides else None

    # Many-class scores made here (each fold's test scores, re-scored OOF rows) go to a scratch folder as inference
    # makes them and are read back a block of rows at a time; the folder goes when predict ends (its finalizer on
    # an error; remove_stale_temps after a kill). Labels stay sparse: 1.7 M x 7 178 dense would be 12 GB.
    scratch = tempfile.TemporaryDirectory(prefix="scores-", suffix=f".{os.getpid()}.tmp", dir=cfg.run.dir)
    holdout_table = load_holdout_table(cfg.data, vocabulary, train_table)
    runs = score_experiments(cfg, test_table, train_table, device, progress, Path(scratch.name), holdout_table,
                             vocabulary)
    refs = [run.ref for run in runs]
    ids, folds, rows = align_oof([run.oof for run in runs])
    oof_parts = [run.oof.scores if at is None else take_rows(run.oof.scores, at) for run, at in zip(runs, rows)]
    oof_true = ids_truth(ids, train_table, m)
    # The competition's label rates: a train-only source (another distribution) is left out, as from the OOF rows.
    train_labels = label_csr(train_table["labels"][~train_only_rows(cfg.data, train_table)], m)
    train_rate = label_rates(cfg, train_labels, vocabulary)
    # The rows the blend and the decision are fitted on: the holdout when there is one (the test domain), else OOF.
    if holdout_table is None:
        fit_true, fit_parts, fit_folds = oof_true, oof_parts, folds
    else:
        fit_true, fit_parts = label_csr(holdout_table["labels"], m), [run.holdout for run in runs]
        fit_folds = np.zeros(len(holdout_table), int)  # random parts of it for the cross-fold estimates
    fitted = fit_blend_and_decision(cfg, fit_true, fit_parts, fit_folds, train_rate,
                                    np.array([ref.weight for ref in refs]))
    blend, fit_scores, results, chosen, why = fitted.blend, fitted.scores, fitted.results, fitted.chosen, fitted.why
    test_scores = blend.combine([run.test for run in runs])
    if holdout_table is None:
        oof_scores, oof_results = fit_scores, results
    else:  # OOF beside the holdout: the holdout-fitted blend on the OOF rows, every strategy compared there too
        oof_scores = blend.combine(oof_parts)
        oof_results = compare_strategies(oof_true, oof_scores, folds, train_rate, cfg.predict, cfg.metric)
    oof = OofScores(ids, folds, oof_scores)
    # The comparison's in-sample decision; only the rate strategy reads the scores it is applied to, so it is
    # fitted again on the test scores.
    decision = results[chosen]["decision"] if chosen not in REFIT_ON_TEST else decision_for(
        chosen, ThresholdInputs(fit_true, fit_scores, test_scores, train_rate), cfg.predict, cfg.metric)
    predicted = decision.apply(test_scores)
    if overrides is not None:
        predicted = apply_overrides(predicted, overrides)
    submission = make_submission(test_table, predicted, vocabulary, submission_columns(cfg.data),
                                 label_separator(cfg.data))
    degenerate = degenerate_reasons(predicted, train_labels)
    fitted_on = "oof" if holdout_table is None else "holdout"
    ensembles = None if fitted.blends is None else ensemble_table(fitted.blends, blend.method, fitted_on, cfg.metric)

    # All outputs as one set (staged, then renamed into place): the run-folder outputs first, the submission
    # last. A failure on the way leaves every previous output as it was.
    out = RunFolder(cfg.run.dir)
    header = report_header(cfg, refs, oof, len(test_table), chosen, decision)
    if fitted.blends is not None:
        header += f"\n\nEnsemble: **{blend.describe()}** ({fitted.blend_why}); the ways compared are in ensembles.csv."
    if holdout_table is not None:
        header += (f"\n\nHoldout: {len(holdout_table)} labelled test-domain rows (data.holdout); the blend and the "
                   "decision are fitted on them and chosen by their holdout estimates (the holdout columns; "
                   "cross-fold: random parts of the holdout); the OOF columns score the same blend on the OOF rows.")
    if overrides is not None:
        header += (f"\n\nOverrides (predict.overrides): {len(overrides.rows)} of {len(test_table)} test rows take the "
                   f"labels of a labelled near-duplicate ({cfg.folds.duplicates_path}) instead of the decision.")
    if degenerate:
        header += "\n\n**Warning: the submission looks degenerate:** " + "; ".join(degenerate) + "."
    with Staging() as staging:
        staging.file(score_file(out.test_scores, m), lambda tmp: write_score_table(tmp, test_table["Id"], test_scores))
        test_rate = count_labels(predicted, 0) / predicted.shape[0]
        strategies, classes, plots = write_report(out.report, header, oof_results, chosen, oof_true, oof_scores,
                                                  train_rate, test_rate, staging, cfg.metric, why,
                                                  holdout=None if holdout_table is None else results,
                                                  ensembles=ensembles)
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
        record = decision_record(cfg, chosen, decision, oof_results[chosen], train_rate, refs, submission,
                                 ensemble=fitted.record(cfg, fitted_on), run_weights=blend.run_weights,
                                 holdout=None if holdout_table is None else results[chosen],
                                 checkpoints=[run.checkpoints for run in runs], overrides=overridden,
                                 pseudo_labels=pseudo_sources(runs))
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
