"""The fitted decision record: ``run.dir/decision.json``, written by predict with the submission it describes.

Predict fits its decision on the OOF predictions (``predict.threshold``: per-class thresholds, one threshold or a
top k, and the labels-per-image bounds) and applies it to the test scores. The record keeps what a later stage
needs without the OOF files or another pass over them::

    strategy          the strategy applied (``predict.threshold``, or what ``auto`` chose); requested: the setting
    decision          thresholds (one per class) or top_k, min_labels, max_labels: exactly as applied
    refit_on_test     true for ``rate``: its thresholds are fitted on the scores they are applied to, from
    label_rate        the per-class label rates it matches
    metric            the competition metric's column name (macro_f1, f2_samples, ...)
    oof_in_sample     the strategy's OOF estimate fitted and scored on the same rows
    oof_cross_fold    fitted on the other folds' rows: the honest estimate of the test score
    runs              the experiments (run folder or score tables, weight as applied, folds) ensembled, and for a
                      run folder each fold's checkpoint as predict read it (size and sha256: a bundle ships only
                      those very bytes); checkpoint: best or last
    ensemble          null with the hand weights and no comparison; else how the runs were combined
                      (src.ensemble): method, weights (per run, or runs x classes), stack coefficients, why,
                      fitted_on (oof or holdout) and every way's cross-fold estimate
    holdout_in_sample, holdout_cross_fold   with data.holdout: the strategy's estimates on it (what chose it)
    submission        the path predict wrote and the sha256 of its bytes
    overrides         predict.overrides: the duplicates file, how many test rows took a labelled duplicate's labels,
                      and per row its Id, labels, the Ids they came from and the distance (null when off)
    pseudo_labels     the pseudo-label sources (src.pseudo) the runs' folds trained on, each with its provenance: the
                      prediction that made it (run folder, decision.json and submission sha256), thresholds, rows
                      kept and dropped (null when none)
    config            the resolved config predict ran with (after the label vocabulary set data.num_classes)

``src.submit`` checks a submission against it (same bytes, same config) and logs the estimate; ``src.bundle``
ships it, so a notebook applies the same decision to its own test scores. Floats survive JSON exactly (repr
round trip), so the bundle's thresholds are the very ones predict applied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import Config, PipelineError, RunRef, flatten_saved
from src.metrics import get_metric
from src.run_folder import RunFolder
from src.thresholds import Decision, ThresholdInputs, decision_for

DECISION_FILE = "decision.json"
# Strategies whose decision is fitted on the scores it is applied to: a bundle fits them again on its test scores.
REFIT_ON_TEST = ("rate",)
# Keys that do not change what predict writes (the submission's path: its bytes are checked instead); a submission
# made under other values still belongs to the run.
IGNORED_KEYS = ("kaggle", "wandb", "tune", "submission.path", "predict.force", "predict.batch_size",
                "train.num_workers", "train.device")


def decision_path(folder: str | Path) -> Path:
    """Where the record of a run folder (or an inference bundle) lives."""
    return RunFolder(folder).root / DECISION_FILE


def csv_sha256(frame: pd.DataFrame) -> str:
    """The sha256 of the bytes ``frame.to_csv(path, index=False)`` writes (the same text, encoded as UTF-8)."""
    return hashlib.sha256(frame.to_csv(index=False).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decision_record(cfg: Config, strategy: str, decision: Decision, result: dict, label_rate: np.ndarray,
                    refs: Sequence[RunRef], submission: pd.DataFrame, ensemble: dict | None = None,
                    run_weights: Sequence[float] | None = None, holdout: dict | None = None,
                    checkpoints: Sequence[list[dict]] | None = None, overrides: dict | None = None,
                    pseudo_labels: list[dict] | None = None) -> dict:
    """The record of one prediction: ``result`` is the strategy's entry of ``compare_strategies`` on OOF
    (``holdout``: on data.holdout); ``ensemble``: how the runs were combined when not by hand weights alone
    (``src.ensemble.Blend.record``), ``run_weights`` the weights applied (default: the hand weights);
    ``checkpoints`` per experiment, each fold's checkpoint as predict read it (``{"fold", "size", "sha256"}``);
    ``overrides``: the test rows that took a labelled near-duplicate's labels (predict.overrides);
    ``pseudo_labels``: the provenance of each pseudo-label source the runs trained on."""
    thresholds = None if decision.thresholds is None else np.broadcast_to(
        np.asarray(decision.thresholds, dtype=float), (len(label_rate),)).tolist()
    weights = list(run_weights) if run_weights is not None else [ref.weight for ref in refs]
    checkpoints = list(checkpoints) if checkpoints is not None else [[] for _ in refs]
    runs = [{"dir": ref.dir, "weight": weight, "folds": [c["fold"] for c in used], "checkpoints": used}
            if ref.dir is not None else
            {"dir": None, "scores": ref.scores.model_dump(), "weight": weight, "folds": []}
            for ref, weight, used in zip(refs, weights, checkpoints)]
    extra = {} if holdout is None else {"holdout_in_sample": float(holdout["in_sample"]),
                                        "holdout_cross_fold": float(holdout["cross_fold"])}
    return {
        "strategy": strategy,
        "requested": cfg.predict.threshold,
        "decision": {"thresholds": thresholds, "min_labels": decision.min_labels, "max_labels": decision.max_labels,
                     "top_k": decision.top_k},
        "refit_on_test": strategy in REFIT_ON_TEST,
        "label_rate": np.asarray(label_rate, dtype=float).tolist() if strategy in REFIT_ON_TEST else None,
        "metric": get_metric(cfg.metric).label,
        "oof_in_sample": float(result["in_sample"]),
        "oof_cross_fold": float(result["cross_fold"]),
        **extra,
        "runs": runs,
        "ensemble": ensemble,
        "checkpoint": cfg.predict.checkpoint,
        "submission": {"path": cfg.submission.path, "sha256": csv_sha256(submission), "rows": len(submission)},
        "overrides": overrides,
        "pseudo_labels": pseudo_labels or None,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
    }


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` to exactly ``path`` (a temp name from Staging or write_atomic is fine)."""
    path.write_text(json.dumps(record, indent=1) + "\n")


def read_record(folder: str | Path) -> dict:
    """The record of a run folder (or bundle); a PipelineError saying what to run when there is none."""
    path = decision_path(folder)
    if not path.is_file():
        raise PipelineError(f"{path} not found: it is written by `python -m src.predict` (with the submission it "
                            "describes); run predict again")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}); run `python -m src.predict` again") from None
    missing = [key for key in ("strategy", "decision", "runs", "config", "submission") if key not in record]
    if missing:
        raise PipelineError(f"{path} lacks {missing}; run `python -m src.predict` again")
    return record


def record_decision(record: dict) -> Decision:
    """The Decision predict applied (for ``rate``, the one fitted on predict's own test scores)."""
    saved = record["decision"]
    thresholds = None if saved["thresholds"] is None else np.asarray(saved["thresholds"], dtype=float)
    return Decision(thresholds, saved["min_labels"], saved["max_labels"], saved["top_k"])


def apply_record(record: dict, scores: np.ndarray, cfg: Config) -> np.ndarray:
    """Boolean predictions for ``scores`` by the recorded decision; a strategy fitted on the scores it is applied
    to (``rate``) is fitted again on these, with the recorded label rates and ``cfg``'s label bounds."""
    if record.get("refit_on_test"):
        inputs = ThresholdInputs(None, None, scores, np.asarray(record["label_rate"], dtype=float))
        return decision_for(record["strategy"], inputs, cfg.predict, cfg.metric).apply(scores)
    return record_decision(record).apply(scores)


def config_differences(recorded: dict, current: dict) -> list[str]:
    """Each key (but ``IGNORED_KEYS``) whose value differs, as "key: <then> then, <now> now"; a key the record
    predates counts at its schema default (``flatten_saved``), as for a resumed checkpoint."""
    then, now = flatten_saved(recorded), flatten_saved(current)
    ignored = lambda key: any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)  # noqa: E731
    return [f"{key}: {then.get(key, '(absent)')!r} then, {now.get(key, '(absent)')!r} now"
            for key in sorted(set(then) | set(now)) if not ignored(key) and then.get(key) != now.get(key)]
