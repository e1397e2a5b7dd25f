"""Study: label embedding (Chollet, arXiv 1607.05691) versus sigmoid outputs + BCE, same backbone, many labels.

    .venv/bin/python -m benchmarks.study_label_embedding [--labels 200] [--images 3000] [--epochs 8] [--dim 64]
                                                         [--out benchmarks/results/label_embedding_study]
    .venv/bin/python -m benchmarks.study_label_embedding --smoke [--out DIR]   # the whole study in seconds

The paper claims faster convergence and better top-k with label embeddings. This checks it on a task
built to have what the method exploits, co-occurrence structure among many labels:

* ``--labels`` labels in groups of ``--group-size``; each image draws one group (power law over groups,
  so a few groups are common and many rare) and 2-3 distinct labels inside it, so labels co-occur only
  within their group: exactly what the PMI matrix sees.
* The images come from the demo generator (``src.demo``): each label's glyph tiles one quadrant of the
  green channel (2-3 labels, all visible), distractor glyphs in the other channels.
* Label noise: ``--noise`` of the rows of ``train.csv`` lose one true label, gain one random label, or
  both (the image keeps the truth). Training (and the PMI fit) sees the noisy labels; every metric here
  is computed against the clean labels of the validation rows.

Both runs are the repository's own ``Trainer`` (``src.train.build_parts``) on fold 0 of ``src.folds.make_folds`` with
``configs/demo.yaml`` and identical settings (backbone, seed, epochs, batch, lr, augmentation); only
``loss.name`` differs (``bce`` or ``label_embedding``). After every epoch ``Trainer.validate()['probs']``
(sigmoid scores, or cosine similarities decoded to [0, 1]) is scored:

* P@k: the share of an image's k highest-scored labels that are true (k = 1, 3; with 2-3 true labels
  per image the best possible P@3 is the mean of min(#labels, 3) / 3, printed as the ceiling);
* macro-F1 at per-class thresholds tuned on the same validation fold (``src.metrics.best_thresholds``;
  in-sample, hence optimistic, equally for both) and at a fixed 0.5 (``src.metrics.decide``: at least
  one label per image). Macro averages run over the classes with a validation positive; classes
  without one would add a 0 to both methods alike.

Writes ``history.csv``, ``study.md`` and ``study.png`` (metric vs epoch, one line per method) to ``--out``;
the data set and the runs live in a temporary folder that is removed at the end (``--work`` keeps them).

``--smoke``: 10 labels, 32 images of 32 px, ``test_resnet``, one epoch of batch 8, embedding dim 4; the
outputs go to the temporary folder unless ``--out`` is given. Every code path of the study, no
meaningful figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import add_smoke_option
from src.cli import run_cli
from src.config import Config, PipelineError, load_config
from src.data import label_matrix
from src.demo import class_glyphs, render_image
from src.folds import make_folds
from src.images import write_rgby
from src.label_embedding import top_k
from src.metrics import best_thresholds, decide, f1_per_class
from src.train import Trainer, build_parts

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "label_embedding_study"
METHODS = {"bce": "sigmoid + BCE", "label_embedding": "label embedding"}
METRICS = {"p_at_1": "P@1", "p_at_3": "P@3", "macro_f1_tuned": "macro-F1 (tuned thresholds)",
           "macro_f1_05": "macro-F1 @ 0.5"}


# -- the task ------------------------------------------------------------------------------------------
def label_groups(num_labels: int, group_size: int) -> list[np.ndarray]:
    """Consecutive labels in groups of ``group_size`` (the last group takes any remainder)."""
    if num_labels < 2 * group_size:
        raise PipelineError(f"--labels {num_labels} is too few for groups of {group_size}")
    return np.array_split(np.arange(num_labels), num_labels // group_size)


def grouped_label_sets(n: int, groups: list[np.ndarray], rng: np.random.Generator,
                       exponent: float = 1.0) -> list[list[int]]:
    """Per image: one group drawn by a power law over groups, then 2 or 3 distinct labels inside it."""
    weights = 1.0 / np.arange(1, len(groups) + 1) ** exponent
    chosen = rng.choice(len(groups), size=n, p=weights / weights.sum())
    counts = rng.integers(2, 4, size=n)
    return [sorted(int(label) for label in rng.choice(groups[g], size=min(c, len(groups[g])), replace=False))
            for g, c in zip(chosen, counts)]


def corrupt(label_sets: list[list[int]], rate: float, num_labels: int,
            rng: np.random.Generator) -> tuple[list[list[int]], np.ndarray]:
    """Noisy copies: a ``rate`` share of the rows drops one true label, adds one random label, or both (a
    row keeps at least one label). Returns the noisy sets and which rows changed."""
    noisy, changed = [], np.zeros(len(label_sets), dtype=bool)
    for row, labels in enumerate(label_sets):
        labels = list(labels)
        if rng.random() < rate:
            kind = rng.integers(3)  # 0: drop, 1: add, 2: drop and add
            if kind in (0, 2) and len(labels) > 1:
                labels.remove(int(rng.choice(labels)))
            if kind in (1, 2):
                extra = int(rng.choice(np.setdiff1d(np.arange(num_labels), labels)))
                labels.append(extra)
            changed[row] = sorted(labels) != label_sets[row]
        noisy.append(sorted(labels))
    return noisy, changed


def write_study_dataset(root: Path, clean: list[list[int]], noisy: list[list[int]], n_test: int, size: int,
                        glyphs: np.ndarray, groups: list[np.ndarray], rng: np.random.Generator) -> None:
    """HPA layout under ``root``: train/ and test/ PNGs rendered from the clean labels, ``train.csv``
    with the noisy ones, ``sample_submission.csv``, and ``train_clean.csv`` (the truth, for scoring)."""
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    ids = [f"train{i:05d}" for i in range(len(clean))]
    for sample_id, labels in zip(ids, clean):
        write_rgby(root / "train", sample_id, render_image(labels, glyphs, size, rng))
    test_ids = [f"test{i:05d}" for i in range(n_test)]
    for sample_id, labels in zip(test_ids, grouped_label_sets(n_test, groups, rng)):
        write_rgby(root / "test", sample_id, render_image(labels, glyphs, size, rng))
    join = " ".join
    pd.DataFrame({"Id": ids, "Target": [join(map(str, s)) for s in noisy]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"Id": ids, "Target": [join(map(str, s)) for s in clean]}).to_csv(
        root / "train_clean.csv", index=False)
    pd.DataFrame({"Id": test_ids, "Predicted": "0"}).to_csv(root / "sample_submission.csv", index=False)


def study_config(data_dir: Path, work_dir: Path, args: argparse.Namespace, loss: str) -> Config:
    """configs/demo.yaml on the study data; the two methods differ only in ``loss.name``."""
    return load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"data.dir={data_dir}", f"data.num_classes={args.labels}", f"data.image_size={args.size}",
        f"folds.path={work_dir / 'folds.csv'}", f"folds.n_splits={args.folds}", "folds.rare_classes=warn",
        f"model.backbone={args.backbone}", "model.pretrained=false", f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}", "train.accum_steps=1", f"train.num_workers={args.workers}",
        "train.device=cpu",
        f"train.precision={args.precision}", f"train.seed={args.seed}", "wandb.mode=disabled",
        f"loss.name={loss}", f"loss.embedding_dim={args.dim}", f"run.dir={work_dir / loss}",
        f"submission.path={work_dir / 'submission.csv'}",
    ])


# -- scoring -------------------------------------------------------------------------------------------
def precision_at_k(truth: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Mean over images of the share of their ``k`` highest-scored labels that are true."""
    best, _ = top_k(scores, k)
    return float(np.take_along_axis(truth, best.astype(np.int64), axis=1).sum(axis=1).mean() / k)


def score(truth: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """P@1, P@3 and macro-F1 (tuned thresholds, and 0.5) over the classes with a positive in ``truth``."""
    present = truth.sum(axis=0) > 0
    _, tuned_f1 = best_thresholds(truth, probs)
    f1_half = f1_per_class(truth, decide(probs, 0.5))
    return {"p_at_1": precision_at_k(truth, probs, 1), "p_at_3": precision_at_k(truth, probs, 3),
            "macro_f1_tuned": float(tuned_f1[present].mean()), "macro_f1_05": float(f1_half[present].mean()),
            "labels_per_image_at_05": float((probs >= 0.5).sum(axis=1).mean())}


def group_purity(embedding: np.ndarray, groups: list[np.ndarray], neighbours: int = 4) -> float:
    """Share of each label's nearest labels (cosine, in the fitted embedding) that belong to its group."""
    group_of = np.empty(len(embedding), dtype=np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    seen = np.flatnonzero(embedding.any(axis=1))
    similarity = embedding[seen] @ embedding[seen].T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, :neighbours]
    return float((group_of[seen][nearest] == group_of[seen][:, None]).mean())


def run_method(cfg: Config, clean_truth: pd.DataFrame, groups: list[np.ndarray]) -> tuple[list[dict], dict]:
    """Train fold 0 epoch by epoch with the repository's Trainer; score each epoch against clean labels."""
    start = time.perf_counter()
    parts = build_parts(cfg, fold=0, progress=False)
    trainer = Trainer(parts, progress=False)
    truth_by_id = clean_truth.set_index("Id")["labels"]
    truth = label_matrix(truth_by_id.loc[parts.val_table["Id"]].tolist(), cfg.data.num_classes)
    noisy_truth = label_matrix(parts.val_table["labels"], cfg.data.num_classes)
    prior = label_matrix(parts.train_table["labels"], cfg.data.num_classes).mean(axis=0)
    info = {"setup_s": time.perf_counter() - start, "n_train": len(parts.train_table),
            "n_val": len(parts.val_table), "val_rows_noisy": int((truth != noisy_truth).any(axis=1).sum()),
            "val_classes_present": int((truth.sum(axis=0) > 0).sum()),
            "p_at_3_ceiling": float(np.minimum(truth.sum(axis=1), 3).mean() / 3),
            # What ranking every image by the training fold's label frequencies scores: the floor to beat.
            "prior": {f"p_at_{k}": precision_at_k(truth, np.broadcast_to(prior, truth.shape), k) for k in (1, 3)},
            "parameters": sum(p.numel() for p in parts.model.parameters())}
    if parts.embedding is not None:
        info["group_purity"] = group_purity(parts.embedding.embedding, groups)
    rows = []
    for epoch in range(1, cfg.train.epochs + 1):
        start = time.perf_counter()
        trainer.train_epoch(trainer.epoch_batches())
        train_s = time.perf_counter() - start
        metrics = trainer.validate()
        rows.append({"method": cfg.loss.name, "epoch": epoch, **score(truth, metrics["probs"]),
                     "train_s": train_s, "val_s": time.perf_counter() - start - train_s})
        print(f"  {cfg.loss.name} epoch {epoch}: " + "  ".join(f"{METRICS[k]} {rows[-1][k]:.3f}" for k in METRICS)
              + f"  ({train_s:.0f} s train, {rows[-1]['val_s']:.0f} s val)", flush=True)
    return rows, info


# -- report --------------------------------------------------------------------------------------------
def plot(history: pd.DataFrame, path: Path, title: str, floors: dict[str, float]) -> Path:
    """One panel per metric, metric vs epoch, one line per method (object-oriented matplotlib, no pyplot);
    ``floors``: a dashed line per metric, the label-frequency prior's score."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.5))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, name) in zip(axes, METRICS.items()):
        for method, label in METHODS.items():
            rows = history[history["method"] == method]
            ax.plot(rows["epoch"], rows[key], marker="o", label=label)
        if key in floors:
            ax.axhline(floors[key], color="grey", linestyle="--", label="label-frequency prior")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def first_epoch_reaching(history: pd.DataFrame, method: str, key: str, level: float) -> int | None:
    rows = history[(history["method"] == method) & (history[key] >= level)]
    return int(rows["epoch"].iloc[0]) if len(rows) else None


def markdown(history: pd.DataFrame, infos: dict[str, dict], args: argparse.Namespace, setup: dict,
             wall_s: float) -> str:
    """The study as markdown: setup, per-epoch table, final numbers, convergence, measured facts."""
    keys = list(METRICS)
    lines = ["# Label embedding vs sigmoid + BCE on a many-label synthetic task", "",
             f"Written by `python -m benchmarks.study_label_embedding {setup['argv']}` in {wall_s / 60:.1f} min "
             f"wall time ({setup['cpu']}, {args.threads} torch thread(s)).", "",
             "## Setup", "",
             f"- {args.labels} labels in {setup['n_groups']} groups; each image: one group (power law), "
             f"2-3 labels inside it; {setup['labels_per_image']:.2f} labels per image; label support in train.csv "
             f"min {setup['support_min']}, median {setup['support_median']:.0f}, max {setup['support_max']}.",
             f"- {args.images} images of {args.size} px (demo generator glyphs, "
             f"{setup['glyph_side']}x{setup['glyph_side']} cells); label noise in train.csv on "
             f"{setup['noisy_rows']} rows ({setup['noisy_rows'] / args.images:.1%}); scored on clean labels.",
             f"- fold 0 of {args.folds} (`src.folds.make_folds`): {infos['bce']['n_train']} training, "
             f"{infos['bce']['n_val']} validation images ({infos['bce']['val_rows_noisy']} of them with noisy "
             f"train.csv labels), {infos['bce']['val_classes_present']} classes with a validation positive.",
             f"- both: `{args.backbone}` from scratch, {args.epochs} epochs, {setup['training']}, seed {args.seed}, "
             f"precision {args.precision}; label embedding dim {args.dim} "
             f"(head {infos['label_embedding']['parameters'] - infos['bce']['parameters']:+,} parameters vs BCE).",
             f"- label embedding fitted on the (noisy) training fold: "
             f"{infos['label_embedding']['group_purity']:.0%} of each label's 4 nearest labels are in its group.",
             f"- P@3 ceiling (2-3 true labels per image): {infos['bce']['p_at_3_ceiling']:.3f}. Ranking every "
             f"image by the training fold's label frequencies (no image seen) scores P@1 "
             f"{infos['bce']['prior']['p_at_1']:.3f}, P@3 {infos['bce']['prior']['p_at_3']:.3f}.", "",
             "## Per epoch", "",
             "| epoch | " + " | ".join(f"{METRICS[k]} BCE | {METRICS[k]} LE" for k in keys) + " |",
             "|---:|" + "---:|" * (2 * len(keys))]
    wide = history.pivot(index="epoch", columns="method")
    for epoch in wide.index:
        cells = [f"{wide.loc[epoch, (k, m)]:.3f}" for k in keys for m in METHODS]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    last = wide.index.max()
    lines += ["", "BCE: sigmoid + BCE; LE: label embedding.", "", "## Final epoch", "",
              "| metric | BCE | label embedding | difference (LE - BCE) |", "|---|---:|---:|---:|"]
    for k in keys + ["labels_per_image_at_05"]:
        bce, le = wide.loc[last, (k, "bce")], wide.loc[last, (k, "label_embedding")]
        name = METRICS.get(k, "labels per image scoring >= 0.5")
        lines.append(f"| {name} | {bce:.3f} | {le:.3f} | {le - bce:+.3f} |")
    lines += ["", "## Convergence", "",
              "First epoch at which each method reaches 90% of the better final value of the two "
              "(\"-\": never within the run).", "", "| metric | 90% level | BCE | label embedding |",
              "|---|---:|---:|---:|"]
    for k in keys:
        level = 0.9 * max(wide.loc[last, (k, m)] for m in METHODS)
        epochs = [first_epoch_reaching(history, m, k, level) for m in METHODS]
        lines.append(f"| {METRICS[k]} | {level:.3f} | " + " | ".join("-" if e is None else str(e) for e in epochs)
                     + " |")
    seconds = history.groupby("method")[["train_s", "val_s"]].mean()
    lines += ["", "## Cost", "", "| method | train s / epoch | validation s / epoch |", "|---|---:|---:|"]
    lines += [f"| {METHODS[m]} | {seconds.loc[m, 'train_s']:.1f} | {seconds.loc[m, 'val_s']:.1f} |" for m in METHODS]
    lines += ["", "Timings are wall clock on a shared CPU whose load from other jobs varied during the run.", "",
              "One seed, one fold: differences of a few hundredths are within what another seed could change. "
              "Tuned thresholds are fitted on the validation fold they are scored on (optimistic for both).",
              "For the label embedding a score of 0.5 is cosine 0, not a calibrated probability, so its "
              "macro-F1 @ 0.5 is shown for completeness only.", "", "![metrics per epoch](study.png)", ""]
    return "\n".join(lines)


def training_setup(cfg: Config) -> str:
    """The training settings both methods share, in words, as the config sets them."""
    tc = cfg.train
    augmented = [name for name in ("d4", "shift_scale_rotate", "brightness_contrast", "gamma")
                 if getattr(tc.augment, name)]
    return (f"batch {tc.batch_size}, lr {tc.lr:g} (configs/demo.yaml: AdamW, warm-up over {tc.warmup_fraction:.0%} "
            f"of the steps + cosine, clip {tc.clip_grad}, augmentation {', '.join(augmented) or 'off'})")


# -- the study -----------------------------------------------------------------------------------------
def study(args: argparse.Namespace, work: Path) -> Path:
    """Build the data, train both methods, write history.csv, study.md and study.png; returns the markdown path."""
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else work / "results" if args.smoke else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    groups = label_groups(args.labels, args.group_size)
    glyphs = class_glyphs(args.labels, rng)
    clean = grouped_label_sets(args.images, groups, rng)
    noisy, changed = corrupt(clean, args.noise, args.labels, rng)
    data_dir = work / "data"
    start = time.perf_counter()
    write_study_dataset(data_dir, clean, noisy, args.test_images, args.size, glyphs, groups, rng)
    support = label_matrix(noisy, args.labels).sum(axis=0)
    print(f"data: {args.images} images, {args.labels} labels, {changed.sum()} noisy rows -> {data_dir} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    cfg = study_config(data_dir, work, args, "bce")
    make_folds(cfg, progress=False)
    clean_truth = pd.DataFrame({"Id": [f"train{i:05d}" for i in range(len(clean))], "labels": clean})

    history, infos = [], {}
    for method in METHODS:
        print(f"training {METHODS[method]} ...", flush=True)
        rows, infos[method] = run_method(study_config(data_dir, work, args, method), clean_truth, groups)
        history += rows
    history = pd.DataFrame(history)
    history.to_csv(out / "history.csv", index=False, float_format="%.4f")
    wall_s = time.perf_counter() - wall_start
    setup = {"argv": args.argv, "cpu": f"{os.cpu_count()} CPUs", "n_groups": len(groups),
             "labels_per_image": float(np.mean([len(s) for s in clean])), "support_min": int(support.min()),
             "support_median": float(np.median(support)), "support_max": int(support.max()),
             "glyph_side": glyphs.shape[1], "noisy_rows": int(changed.sum()), "training": training_setup(cfg)}
    plot(history, out / "study.png", f"{args.labels} labels, {args.images} images, {args.backbone}, "
                                     f"fold 0 of {args.folds}, label embedding dim {args.dim}, seed {args.seed}",
         infos["bce"]["prior"])
    path = out / "study.md"
    path.write_text(markdown(history, infos, args, setup, wall_s))
    print(pd.DataFrame(history).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wall time {wall_s / 60:.1f} min; wrote {out / 'history.csv'}, {out / 'study.png'}, {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=200, help="number of labels")
    parser.add_argument("--group-size", type=int, default=5, help="labels per co-occurrence group")
    parser.add_argument("--images", type=int, default=3000, help="training images (all folds)")
    parser.add_argument("--test-images", type=int, default=16, help="test images (only for a valid HPA layout)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--noise", type=float, default=0.1, help="share of train.csv rows with a corrupted label")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="label embedding dimension")
    parser.add_argument("--folds", type=int, default=3, help="folds (fold 0 validates)")
    parser.add_argument("--backbone", default="resnet18", help="timm backbone, the same for both methods")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    # One thread: on a small shared CPU, OpenMP threads spin-waiting for each other are several times slower
    # (resnet18, 64 px, batch 32 on 2 loaded cores: 84 img/s with 1 thread, 29 with 2).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="where the results go (default: benchmarks/results/label_embedding_study; "
                                      "with --smoke, the temporary folder)")
    parser.add_argument("--work", help="keep data and runs here (default: a temporary folder, removed)")
    add_smoke_option(parser, "10 labels, 32 images of 32 px, test_resnet, one epoch of batch 8, dim 4")
    args = parser.parse_args(argv)
    if args.smoke:
        args.labels, args.group_size, args.images, args.test_images, args.size = 10, 5, 32, 2, 32
        args.epochs, args.dim, args.folds, args.backbone, args.batch_size = 1, 4, 2, "test_resnet", 8
    args.argv = "--smoke" if args.smoke else " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("labels", "images", "epochs", "dim", "backbone", "seed"))
    if args.work:
        work = Path(args.work)
        shutil.rmtree(work / "data", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        study(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="study_label_embedding_") as tmp:
            study(args, Path(tmp))


if __name__ == "__main__":
    run_cli(main)
