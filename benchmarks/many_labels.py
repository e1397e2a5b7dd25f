"""BCE against the PMI/SVD label embedding on a many-label set, end to end through the pipeline's stages.

    .venv/bin/python -m benchmarks.many_labels [--format openimages|csv] [--folds 0] [key=value ...]
    .venv/bin/python -m benchmarks.many_labels --smoke      # the same path on a tiny set, in seconds

The data is the many-label demo (``python -m src.demo --format openimages``: RGB JPEGs, 300 labels with
power-law frequencies and topic co-occurrence, hidden test labels in ``test_labels.csv``), written to the
config's ``data.dir`` when it is not there. One folds file for both rows (``src.folds.make_folds``); each
loss trains the folds given by ``--folds`` (default: fold 0 only, to keep the run short; ``all`` for every
fold) into its own run folder, predicts (``src.predict.predict`` with the config's metric and threshold
strategy), and its submission and test scores are scored against the hidden labels:

- P@1, P@3: precision of the 1 and 3 highest test scores (``src.metrics.precision_at_k``) — the ranking,
  independent of any threshold;
- F2: mean per-image F2 of the submission (Inclusive Images' metric, ``metric.name=fbeta_samples``);
- macro-F1 of the submission; the OOF figure of the chosen strategy (cross-fold) from the report;
- minutes of training and prediction.

Extra ``key=value`` arguments override both rows (e.g. ``train.epochs=4 model.backbone=resnet34``). Writes
``many_labels.csv`` and ``many_labels.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import REPO_ROOT
from src.config import MetricConfig, load_config
from src.data import label_csr
from src.demo import make_many_label_dataset
from src.folds import make_folds
from src.formats import load_test_table, load_training_data
from src.metrics import metric_score, precision_at_k
from src.predict import predict
from src.run_folder import RunFolder
from src.score_table import read_scores
from src.train import train

LOSSES = ("bce", "label_embedding")
SMOKE = ["data.image_size=32", "model.backbone=test_resnet", "train.epochs=1", "train.batch_size=8",
         "train.num_workers=0", "train.device=cpu", "train.precision=fp32", "folds.n_splits=2", "loss.embedding_dim=8"]


def truth_matrix(path: Path, ids: list[str], vocabulary, id_column: str, label_column: str):
    """Hidden test labels as a sparse matrix over the run's vocabulary (labels outside it dropped: no model
    could predict them)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False).set_index(id_column)
    index = vocabulary.index
    rows = [tuple(index[c] for c in frame.at[i, label_column].split() if c in index) for i in ids]
    return label_csr(rows, len(vocabulary))


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub table (3 decimals) without tabulate."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def score_run(cfg, submission: Path, test_ids: list[str], truth_path: Path) -> dict:
    folder = RunFolder(cfg.run.dir)
    vocabulary = folder.load_vocabulary()
    id_column, label_column = pd.read_csv(submission, nrows=0).columns[:2]
    truth = truth_matrix(truth_path, test_ids, vocabulary, id_column, label_column)
    scores = read_scores(folder.test_scores).set_index("Id").loc[test_ids].to_numpy(dtype=np.float32)
    predicted = truth_matrix(submission, test_ids, vocabulary, id_column, label_column)
    strategies = pd.read_csv(folder.report / "strategies.csv")
    chosen = strategies[strategies["chosen"] == "<-"].iloc[0]  # the strategy predict applied
    cross = [c for c in strategies.columns if c.endswith("cross_fold")]
    return {"P@1": precision_at_k(truth, scores, 1), "P@3": precision_at_k(truth, scores, 3),
            "F2": metric_score(MetricConfig(name="fbeta_samples", beta=2.0), truth, predicted),
            "macro-F1": metric_score(MetricConfig(name="macro_f1"), truth, predicted),
            "OOF (chosen, cross-fold)": float(chosen[cross[0]]) if cross else float("nan")}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("openimages", "csv"), default="openimages")
    parser.add_argument("--folds", default="0", help="comma-separated fold numbers, or 'all'")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the table goes (default: the run folders' parent)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, test model, one epoch: seconds")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both rows")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_file = REPO_ROOT / "configs" / f"{args.format}_demo.yaml"
        overrides = list(args.overrides)
        if args.smoke:
            overrides = [f"data.dir={work / 'data'}", f"folds.path={work / 'folds.csv'}",
                         f"data.cache_dir={work / 'cache'}", "wandb.mode=disabled", *SMOKE, *overrides]
        base = load_config(base_file, overrides)
        data = Path(base.data.dir)
        if not (data / base.data.train_csv).is_file():
            make_many_label_dataset(data, format=args.format, n_train=96 if args.smoke else 2000,
                                    n_test=24 if args.smoke else 300, size=32 if args.smoke else 64,
                                    num_labels=24 if args.smoke else 300, seed=0, progress=not args.smoke)
        make_folds(base, progress=False)
        out = args.out or (work if args.smoke else Path(base.run.dir).parent)
        rows = []
        for loss in LOSSES:
            run_dir = (work / "runs" if args.smoke else Path(base.run.dir).parent) / f"{Path(base.run.dir).name}_{loss}"
            # A rerun of the benchmark trains every fold again from scratch (train.overwrite).
            cfg = load_config(base_file, [*overrides, f"loss.name={loss}", f"run.dir={run_dir}",
                                          f"submission.path={run_dir / 'submission.csv'}", "predict.force=true",
                                          "train.overwrite=true"])
            _, table, _ = load_training_data(cfg)
            folds = range(cfg.folds.n_splits) if args.folds == "all" else [int(f) for f in args.folds.split(",")]
            start = time.perf_counter()
            for fold in folds:
                train(cfg, fold, progress=not args.smoke)
            cfg = load_config(base_file, [*overrides, f"loss.name={loss}", f"run.dir={run_dir}",
                                          f"submission.path={run_dir / 'submission.csv'}", "predict.force=true",
                                          f"predict.folds=[{','.join(map(str, folds))}]"])
            submission = predict(cfg, progress=False)
            minutes = (time.perf_counter() - start) / 60
            test_ids = load_test_table(cfg.data)["Id"].tolist()
            rows.append({"loss": loss, **score_run(cfg, submission, test_ids, data / "test_labels.csv"),
                         "minutes": minutes, "labels": len(RunFolder(run_dir).load_vocabulary()),
                         "train images": len(table)})
        result = pd.DataFrame(rows)
        out.mkdir(parents=True, exist_ok=True)
        result.to_csv(out / "many_labels.csv", index=False)
        table_md = markdown(result)
        (out / "many_labels.md").write_text(f"{args.format} demo, folds {args.folds}, overrides {overrides}\n\n"
                                            f"{table_md}\n")
        print(table_md)
        return result


if __name__ == "__main__":
    main()
