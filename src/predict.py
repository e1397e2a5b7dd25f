"""Stage 3: fold and experiment ensembles, TTA, threshold strategies, submission CSV and report.

    python -m src.predict [--config FILE] [key=value ...]

For each experiment (``predict.runs``, or just ``run.dir``) every fold checkpoint runs the test set
under the chosen D4 test-time views (``predict.tta``, reduced by ``predict.tta_reduce``); folds are
averaged, experiments combined with their weights. Out-of-fold predictions are combined the same way,
so thresholds are tuned on the very ensemble the submission uses. All threshold strategies are
compared on OOF (in-sample and cross-fold); ``predict.threshold`` picks the one applied to test.

Writes ``submission.path`` (validated, atomic), ``run.dir/test_probs.csv`` (for later ensembles) and
``run.dir/report/`` (report.md, strategies.csv, per_class.csv, PNG plots).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.config import (
    Config,
    PipelineError,
    RunRef,
    cli_parser,
    config_from_args,
    load_config,
    override,
    run_cli,
    write_atomic,
)
from src.data import RGBYDataset, label_matrix, load_test_table, load_train_table
from src.metrics import decide
from src.model import autocast, build_model, resolve_device
from src.report import (
    class_table,
    plot_f1_vs_threshold,
    plot_per_class_f1,
    plot_strategies,
    strategy_table,
    write_markdown,
)
from src.thresholds import ThresholdInputs, compare_strategies, thresholds_for
from src.tracking import Tracker
from src.train import OOF_FILES, load_checkpoint, output_scorer

D4_VIEWS = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def d4_view(images: torch.Tensor, view: str) -> torch.Tensor:
    """One of the 8 dihedral views of an N x C x H x W batch."""
    if view.startswith("flip"):
        images = torch.flip(images, dims=[3])
    turns = {"rot90": 1, "rot180": 2, "rot270": 3}.get(view.removeprefix("flip_"), 0)
    return torch.rot90(images, turns, dims=[2, 3]) if turns else images


def check_views(views: list[str]) -> None:
    unknown = [v for v in views if v not in D4_VIEWS]
    if unknown or not views:
        raise PipelineError(f"predict.tta: unknown or no view(s) {unknown}; choose from {list(D4_VIEWS)}")


@torch.no_grad()
def tta_scores(model: torch.nn.Module, loader: DataLoader, device: torch.device, precision: str,
               views: list[str], reduce: str, to_scores: Callable[[np.ndarray], np.ndarray], desc: str,
               progress: bool = True) -> np.ndarray:
    """Per-class scores (n x m) under each TTA view, reduced over views by mean or max. Views are made
    on the device from one loaded batch, so images are read and decoded once."""
    model.eval()
    batches = []
    for images, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        per_view = []
        for view in views:
            with autocast(device, precision):
                outputs = model(d4_view(images, view))
            per_view.append(to_scores(outputs.float().cpu().numpy()))
        stacked = np.stack(per_view)
        batches.append(stacked.mean(0) if reduce == "mean" else stacked.max(0))
    return np.concatenate(batches)


def fold_checkpoints(run_dir: Path, folds: list[int] | None, which: str) -> list[tuple[int, Path]]:
    """(fold, checkpoint) pairs of a run folder, all folds found unless ``folds`` lists some."""
    found = {int(p.parent.name.removeprefix("fold")): p for p in run_dir.glob(f"fold*/{which}.pt")
             if p.parent.name.removeprefix("fold").isdigit()}
    wanted = sorted(found) if folds is None else folds
    missing = [f for f in wanted if f not in found]
    if not found or missing:
        raise PipelineError(f"{run_dir}: no {which}.pt for fold(s) {missing or 'any'}; "
                            "train them first (bash scripts/train_fold.sh N)")
    return [(f, found[f]) for f in wanted]


def model_weights(ckpt: dict) -> dict:
    """The weights that were validated: the EMA copy when training kept one, else the model."""
    if ckpt.get("ema"):
        return {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
    return ckpt["model"]


def predict_run(cfg: Config, ref: RunRef, test_table: pd.DataFrame, train_table: pd.DataFrame,
                device: torch.device, progress: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Test scores of one experiment (mean over its folds) and its OOF scores (with a ``fold`` column)."""
    run_dir = Path(ref.dir)
    # The experiment's own backbone, size and loss; never fetch pretrained weights (the checkpoint has them).
    run_cfg = override(load_config(run_dir / "config.yaml"), **{"model.pretrained": False})
    if run_cfg.data.num_classes != cfg.data.num_classes:
        raise PipelineError(f"{run_dir}: trained for {run_cfg.data.num_classes} classes, "
                            f"this config has {cfg.data.num_classes}")
    if run_cfg.train.augment.d4 == 0 and set(cfg.predict.tta) - {"identity"}:
        print(f"warning: {run_dir} was trained without D4 augmentation; TTA views {cfg.predict.tta} show the "
              "model images unlike any it was trained on (consider predict.tta=[identity])")
    def loader_of(table: pd.DataFrame) -> DataLoader:
        dataset = RGBYDataset(table, cfg.data.num_classes, run_cfg.data.image_size)
        return DataLoader(dataset, batch_size=cfg.predict.batch_size, num_workers=cfg.train.num_workers,
                          pin_memory=device.type == "cuda")

    test_loader = loader_of(test_table)
    rows_by_id = train_table.set_index("Id")
    model = None
    fold_scores, oof_parts = [], []
    for fold, path in fold_checkpoints(run_dir, cfg.predict.folds, cfg.predict.checkpoint):
        weights = model_weights(load_checkpoint(path))
        if model is None:  # one network per experiment; each fold loads its weights into it
            model = build_model(run_cfg, out_dim=weights["head.weight"].shape[0]).to(device)
        model.load_state_dict(weights)
        to_scores = output_scorer(run_cfg, path.parent)
        views = (cfg.train.precision, cfg.predict.tta, cfg.predict.tta_reduce, to_scores)
        fold_scores.append(tta_scores(model, test_loader, device, *views, f"{run_dir.name} fold {fold}", progress))
        oof_path = path.parent / OOF_FILES[cfg.predict.checkpoint]
        if not oof_path.is_file():
            raise PipelineError(f"{oof_path} not found: fold {fold} of {run_dir} has no OOF predictions")
        oof = pd.read_csv(oof_path, dtype={"Id": str})
        if cfg.predict.oof_tta:
            val_rows = rows_by_id.loc[oof["Id"]].reset_index()
            oof.iloc[:, 1:] = tta_scores(model, loader_of(val_rows), device, *views,
                                         f"{run_dir.name} fold {fold} OOF", progress)
        oof.insert(1, "fold", fold)
        oof_parts.append(oof)
    return np.mean(fold_scores, axis=0), pd.concat(oof_parts, ignore_index=True)


def combine_runs(per_run: list[tuple[float, np.ndarray, pd.DataFrame]]) -> tuple[np.ndarray, pd.DataFrame]:
    """Weighted mean of test scores and of OOF scores over experiments (OOF on the Ids all share)."""
    total = sum(weight for weight, _, _ in per_run)
    test = sum(weight * scores for weight, scores, _ in per_run) / total
    common = set.intersection(*(set(oof["Id"]) for _, _, oof in per_run))
    if any(len(common) != len(oof) for _, _, oof in per_run):
        print(f"warning: experiments have different OOF Ids; thresholds use the {len(common)} they share")
    frames = [oof[oof["Id"].isin(common)].sort_values("Id").reset_index(drop=True) for _, _, oof in per_run]
    classes = [c for c in frames[0].columns if c not in ("Id", "fold")]
    combined = frames[0][["Id", "fold"]].copy()
    combined[classes] = sum(w * f[classes].to_numpy() for (w, _, _), f in zip(per_run, frames)) / total
    return test, combined


def label_rates(cfg: Config, train_labels: np.ndarray) -> np.ndarray:
    """Positive rate of each class in train, or the user's table (csv ``class,rate``)."""
    rates = train_labels.mean(axis=0)
    if cfg.predict.rate_table:
        table = pd.read_csv(cfg.predict.rate_table)
        if not {"class", "rate"} <= set(table.columns):
            raise PipelineError(f"{cfg.predict.rate_table}: expected columns class,rate")
        bad = table[(table["class"] < 0) | (table["class"] >= len(rates)) | (table["rate"] < 0) | (table["rate"] > 1)]
        if len(bad):
            raise PipelineError(f"{cfg.predict.rate_table}: row(s) {list(bad.index + 2)} have a class or rate "
                                "out of range")
        rates[table["class"].to_numpy()] = table["rate"].to_numpy()
    return rates


def format_labels(predicted: np.ndarray) -> list[str]:
    return [" ".join(map(str, np.flatnonzero(row))) for row in predicted]


def validate_submission(frame: pd.DataFrame, expected_ids: list[str], num_classes: int) -> None:
    """Every expected Id exactly once, in order; labels integers in range; nothing empty or NaN."""
    if list(frame.columns) != ["Id", "Predicted"]:
        raise PipelineError(f"submission columns are {list(frame.columns)}, expected ['Id', 'Predicted']; "
                            "nothing written")
    problems = []
    if frame.isna().any().any():
        problems.append(f"{int(frame.isna().any(axis=1).sum())} row(s) hold NaN")
    if frame["Id"].tolist() != list(expected_ids):
        dup = frame["Id"][frame["Id"].duplicated()].tolist()
        missing = sorted(set(expected_ids) - set(frame["Id"]))
        problems.append(f"Ids differ from sample_submission (duplicates {dup[:5]}, missing {missing[:5]})")
    for row, value in enumerate(frame["Predicted"].fillna("").astype(str), start=2):
        tokens = value.split()
        if not tokens or not all(t.isdigit() and int(t) < num_classes for t in tokens):
            problems.append(f"row {row}: labels {value!r} are not class indices in [0, {num_classes})")
            break
    if problems:
        raise PipelineError("submission failed validation, nothing written:\n  " + "\n  ".join(problems))


def write_csv_atomic(frame: pd.DataFrame, path: Path, **kwargs) -> Path:
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, **kwargs))


def predict(cfg: Config, progress: bool = True) -> Path:
    """Ensemble, TTA, threshold comparison, submission and report; returns the submission path."""
    check_views(cfg.predict.tta)
    device = resolve_device(cfg.train.device)
    test_table = load_test_table(cfg.data)
    train_table = load_train_table(cfg.data)
    m = cfg.data.num_classes
    refs = cfg.predict.runs or [RunRef(dir=cfg.run.dir)]
    per_run = [(ref.weight, *predict_run(cfg, ref, test_table, train_table, device, progress)) for ref in refs]
    test_scores, oof = combine_runs(per_run)

    truth_by_id = dict(zip(train_table["Id"], train_table["labels"]))
    unknown = [i for i in oof["Id"] if i not in truth_by_id]
    if unknown:
        raise PipelineError(f"OOF Ids not in the training data (e.g. {unknown[:3]}): run dirs and data.dir disagree")
    oof_true = label_matrix([truth_by_id[i] for i in oof["Id"]], m)
    oof_scores = oof[[str(c) for c in range(m)]].to_numpy()
    train_rate = label_rates(cfg, label_matrix(train_table["labels"], m))
    results = compare_strategies(oof_true, oof_scores, oof["fold"].to_numpy(), train_rate, cfg.predict)

    chosen = cfg.predict.threshold
    thresholds = thresholds_for(chosen, ThresholdInputs(oof_true, oof_scores, test_scores, train_rate), cfg.predict)
    predicted = decide(test_scores, thresholds)
    submission = pd.DataFrame({"Id": test_table["Id"], "Predicted": format_labels(predicted)})
    validate_submission(submission, test_table["Id"].tolist(), m)
    out_dir = Path(cfg.run.dir)
    sub_path = write_csv_atomic(submission, Path(cfg.submission.path))
    probs = pd.DataFrame(test_scores, columns=[str(c) for c in range(m)])
    probs.insert(0, "Id", test_table["Id"].values)
    write_csv_atomic(probs, out_dir / "test_probs.csv", float_format="%.6f")

    report_dir = out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    strategies = strategy_table(results, chosen)
    classes = class_table(results, chosen, oof_true.sum(axis=0), train_rate, predicted.mean(axis=0))
    write_csv_atomic(strategies, report_dir / "strategies.csv")
    write_csv_atomic(classes, report_dir / "per_class.csv")
    plots = {
        "strategies": plot_strategies(strategies, report_dir / "strategies.png"),
        "per_class_f1": plot_per_class_f1(results, oof_true.sum(axis=0), report_dir / "per_class_f1.png"),
        "f1_vs_threshold": plot_f1_vs_threshold(oof_true, oof_scores, results, chosen,
                                                report_dir / "f1_vs_threshold.png"),
    }
    header = (f"Experiments: {', '.join(f'{r.dir} (weight {r.weight})' for r in refs)}; "
              f"TTA {cfg.predict.tta} ({cfg.predict.tta_reduce}); {len(oof)} OOF rows, {len(test_table)} test rows. "
              f"Chosen strategy: **{chosen}**. Cross-fold scores fit thresholds on the other folds' OOF rows: "
              "the honest estimate of the test score."
              + (" Only one fold's OOF rows: cross-fold equals in-sample." if oof["fold"].nunique() < 2 else ""))
    write_markdown(report_dir / "report.md", header, strategies, classes, plots)

    tracker = Tracker(cfg, out_dir, name=f"{out_dir.name}-predict", group=out_dir.name, job_type="predict")
    try:
        tracker.log({f"oof/{k}/{row['strategy']}": row[f"oof_macro_f1_{k}"]
                     for _, row in strategies.iterrows() for k in ("in_sample", "cross_fold")})
        tracker.log_per_class("oof/per_class", {"f1": classes["f1"].to_numpy(),
                                                "threshold": classes["threshold"].to_numpy()})
        tracker.log_images({f"report/{name}": path for name, path in plots.items()})
    finally:
        tracker.finish()

    if progress:
        print(strategies.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"\nper class ({chosen}):")
        print(classes.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\nwrote {sub_path} ({len(submission)} rows, {predicted.sum(axis=1).mean():.2f} labels per image), "
              f"{out_dir / 'test_probs.csv'} and the report in {report_dir}/")
    return sub_path


def main() -> None:
    predict(config_from_args(cli_parser(__doc__.splitlines()[0]).parse_args()))


if __name__ == "__main__":
    run_cli(main)
