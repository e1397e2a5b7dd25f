"""The pipeline learns on data it never saw: fold-0 macro-F1 of a fresh demo dataset vs simple baselines.

    .venv/bin/python -m benchmarks.bench_learning [--epochs N] [--train-images 1500] [--seed 123]
    .venv/bin/python -m benchmarks.bench_learning --smoke   # the whole script on a tiny run, in seconds

A new synthetic HPA-format dataset (``src.demo.make_demo_dataset``, a seed the repo's demo data does not
use, the generator's default 64 px layout) is written to a temp folder; folds are made with
``src.folds.make_folds``; fold 0 is trained with ``src.train.train`` from ``configs/demo.yaml`` with the
CLI-equivalent overrides ``data.dir``, ``folds.path``, ``run.dir`` (the temp folder) and
``model.backbone=resnet18``. Its fold-0 validation macro-F1 (from ``oof.csv``, the best epoch's
probabilities) is compared on the same validation samples with

- a pixel logistic regression: sklearn ``LogisticRegression`` one-vs-rest on the flattened, downsampled
  RGBY pixels of the same training samples (standardised);
- a constant predictor: every sample scored with the training label rates.

All are scored as ``Trainer.validate`` scores: macro-F1 at 0.5 (every sample keeps its top class) and at
per-class thresholds tuned on the validation set by ``src.metrics.best_thresholds`` (in-sample, as the
training loop reports it); plus "cross-tuned": thresholds tuned on one half of the validation samples and
applied to the other half, both ways (an honest figure for the tuned column).

``--smoke``: 48 images of 32 px, 6 classes, 2 folds, ``test_resnet``, one epoch of batch 8, 8 px pixels
for the logistic regression, W&B off: every code path of the script, no meaningful figure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from benchmarks.common import REPO_ROOT, add_smoke_option, add_threads_option, limit_cpu_threads, work_folder
from src.cli import run_cli
from src.config import load_config
from src.data import label_matrix
from src.demo import make_demo_dataset
from src.folds import load_folds, make_folds
from src.formats import load_train_table
from src.images import read_rgby
from src.metrics import best_thresholds, decide, f1_per_class
from src.train import train


def scores_of(truth: np.ndarray, probs: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Macro-F1 at 0.5, at thresholds tuned in-sample, and cross-tuned between two halves."""
    at_half = f1_per_class(truth, decide(probs, 0.5)).mean()
    tuned = best_thresholds(truth, probs)[1].mean()
    halves = np.random.default_rng(seed).permutation(len(truth)) % 2 == 0
    cross = np.zeros_like(truth, dtype=bool)
    for fit in (halves, ~halves):
        thresholds, _ = best_thresholds(truth[fit], probs[fit])
        cross[~fit] = decide(probs[~fit], thresholds)
    return {"macro_f1@0.5": float(at_half), "macro_f1_tuned": float(tuned),
            "macro_f1_cross_tuned": float(f1_per_class(truth, cross).mean())}


def pixel_features(table: pd.DataFrame, size: int) -> np.ndarray:
    """Each sample's RGBY image, downsampled (INTER_AREA) to size x size and flattened, in [0, 1]."""
    return np.stack([read_rgby(d, i, size).reshape(-1) for d, i in zip(table["image_dir"], table["Id"])]) / 255.0


def pixel_logistic_regression(train_x, train_y, val_x, c: float, seed: int) -> np.ndarray:
    """Validation probabilities of a one-vs-rest logistic regression on standardised pixels. A class with
    no positive (or no negative) training sample gets its training rate as a constant score."""
    scaler = StandardScaler().fit(train_x)
    train_x, val_x = scaler.transform(train_x), scaler.transform(val_x)
    probs = np.tile(train_y.mean(axis=0), (len(val_x), 1)).astype(float)
    learnable = [c_ for c_ in range(train_y.shape[1]) if 0 < train_y[:, c_].sum() < len(train_y)]
    model = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000, random_state=seed), n_jobs=1)
    model.fit(train_x, train_y[:, learnable])
    probs[:, learnable] = model.predict_proba(val_x)
    return probs


# A tiny run of the same code path (the sizes of tests/conftest.py's tiny config).
SMOKE_OVERRIDES = ["data.num_classes=6", "folds.n_splits=2", "folds.rare_classes=warn", "train.batch_size=8",
                   "train.num_workers=0", "train.device=cpu", "wandb.mode=disabled"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--seed", type=int, default=123, help="demo generator seed (the repo's demo data uses 0)")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=64, help="generated image side (generator default 64)")
    parser.add_argument("--epochs", type=int, help="default: the config's train.epochs")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--pixel-size", type=int, default=32, help="logistic regression: downsampled side")
    parser.add_argument("--lr-c", type=float, default=0.01, help="logistic regression: inverse L2 strength")
    add_threads_option(parser)
    parser.add_argument("--work-dir", help="keep the dataset and run here (default: a temp folder, removed)")
    parser.add_argument("--progress", action="store_true", help="show the training progress bars")
    add_smoke_option(parser, "48 images of 32 px, 6 classes, 2 folds, test_resnet, one epoch")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_images, args.image_size, args.epochs, args.pixel_size = 48, 32, 1, 8
        args.backbone = "test_resnet"
        args.overrides = SMOKE_OVERRIDES + args.overrides
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_cpu_threads(args.threads)
    with work_folder(args.work_dir, "bench_learning_") as work_dir:
        # train.overwrite: a reused --work-dir trains again from scratch.
        overrides = [f"data.dir={work_dir / 'data'}", f"folds.path={work_dir / 'folds.csv'}",
                     f"run.dir={work_dir / 'run'}", f"model.backbone={args.backbone}", "train.overwrite=true"]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        cfg = load_config(args.config, overrides + args.overrides)
        start = time.perf_counter()
        data_dir = make_demo_dataset(cfg.data.dir, n_train=args.train_images, n_test=20, size=args.image_size,
                                     num_classes=cfg.data.num_classes, seed=args.seed, progress=False)
        print(f"data        {args.train_images} images, {args.image_size} px, {cfg.data.num_classes} classes, "
              f"seed {args.seed} -> {data_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
        make_folds(cfg, progress=False)
        table = load_train_table(cfg.data)
        folds = load_folds(cfg, table)
        train_table, val_table = table[folds != 0], table[folds == 0]
        n_classes = cfg.data.num_classes
        train_y = label_matrix(train_table["labels"], n_classes)
        val_y = label_matrix(val_table["labels"], n_classes)
        print(f"folds       {cfg.folds.n_splits}; fold 0: {len(train_table)} train, {len(val_table)} validation; "
              f"validation classes without positives: {int((val_y.sum(axis=0) == 0).sum())}", flush=True)

        print(f"training    {cfg.model.backbone}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
              f"{cfg.train.precision}, device {cfg.train.device}, {torch.get_num_threads()} torch threads ...",
              flush=True)
        start = time.perf_counter()
        result = train(cfg, fold=0, progress=args.progress)
        train_seconds = time.perf_counter() - start
        history = pd.read_csv(Path(result["run_dir"]) / "history.csv")
        print(history.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        oof = pd.read_csv(Path(result["run_dir"]) / "oof.csv", dtype={"Id": str}).set_index("Id")
        pipeline_probs = oof.loc[val_table["Id"]].to_numpy(dtype=float)

        start = time.perf_counter()
        lr_probs = pixel_logistic_regression(pixel_features(train_table, args.pixel_size), train_y,
                                             pixel_features(val_table, args.pixel_size), args.lr_c, args.seed)
        lr_seconds = time.perf_counter() - start
        constant_probs = np.tile(train_y.mean(axis=0), (len(val_table), 1))

        rows = {
            f"pipeline ({cfg.model.backbone}, best epoch {result['best_epoch']})": scores_of(val_y, pipeline_probs),
            f"pixel logistic regression ({args.pixel_size} px)": scores_of(val_y, lr_probs),
            "constant (train label rates)": scores_of(val_y, constant_probs),
        }
        print(f"\nfold-0 validation ({len(val_table)} samples never trained on), macro-F1 over {n_classes} classes")
        print(f"{'predictor':<44}{'@0.5':>8}{'tuned':>8}{'cross-tuned':>13}")
        for name, score in rows.items():
            print(f"{name:<44}{score['macro_f1@0.5']:>8.4f}{score['macro_f1_tuned']:>8.4f}"
                  f"{score['macro_f1_cross_tuned']:>13.4f}")
        reported = result.get("best_score")
        print(f"(train() reported best {result['monitor']} {reported:.4f}; training {train_seconds:.0f} s, "
              f"logistic regression {lr_seconds:.0f} s)")
        pipeline, pixels = list(rows.values())[:2]
        margin = pipeline["macro_f1_cross_tuned"] - pixels["macro_f1_cross_tuned"]
        verdict = "the pipeline learns beyond the pixel baseline" if margin > 0 else "NOT better than pixels"
        print(f"pipeline - pixel logistic regression (cross-tuned macro-F1): {margin:+.4f} -> {verdict}")


if __name__ == "__main__":
    run_cli(main)
