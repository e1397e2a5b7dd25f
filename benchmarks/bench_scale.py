"""Inclusive Images at its real size on one machine: the whole pipeline on a synthetic 1.7 M x 7 178 label set,
time and peak memory per stage.

    .venv/bin/python -m benchmarks.bench_scale                # 1.7 M training images x 7 178 labels, 100 k test
    .venv/bin/python -m benchmarks.bench_scale --scale 0.25   # a quarter of the images (the labels unchanged)
    .venv/bin/python -m benchmarks.bench_scale --smoke        # 8 000 x 1 500 in seconds (the test suite runs it)

The data: power-law label sets with co-occurring groups (``benchmarks.bench_label_embedding.synthetic_labels``,
~7.3 labels per image) written as an Open Images label csv (``ImageID,Source,LabelName,Confidence``; one
verified negative per four positives) and a sample submission, fixed-width rows made with numpy; the images
are tiny random RGB arrays (``--size`` px) written straight into the packed cache (``src.pack``'s file names
and manifest; each sample's file stats [0, 0]) with no image files at all, so every stage reads the cache as
a source whose images are absent. They carry no signal: the model learns the label prior at most, which is
all a memory benchmark needs.

Stages, each in its own forked process (its peak resident memory is its own; ``RSS before`` is what the process
holds when the stage starts: the interpreter and the imported libraries):

- ``labels``: the label csv and sample submission;
- ``pack``: the packed cache of both sources, then ``src.pack.open_packed`` on a few rows (the format check);
- ``folds``: the folds stage's steps (labels read through the format, ``label_csr``, ``assign_folds`` with
  ``folds.method=fast``, the folds file), without the image validation of ``make_folds`` (there are no image
  files to check);
- ``train``: fold 0's parts (``build_parts``) and ``--steps`` optimizer steps of the real ``Trainer.train_epoch``
  on the epoch's first batches;
- ``validation``: the same process, ``Trainer.end_epoch``: validation over the whole held-out fold, its OOF score
  table, last.pt and best.pt;
- ``predict``: ``src.predict.predict`` with ``predict.folds=[0]``: the test images through the model, the fold
  and OOF ensemble, every decision strategy in-sample and cross-fold, the report and the submission;
- ``decision search``: ``src.thresholds.compare_strategies`` alone on the OOF table (inside predict above; timed
  here by itself).

The pipeline holds no n x m matrix in float32 (src.score_table.ScoreRows): the target is every stage at most
8 GB. Settings: ``configs/openimages_demo.yaml`` (per-image F2, ``global_bounded``, ``train.monitor=metric``) with
``test_resnet`` at ``--size`` px, 5 folds, CPU fp32, and ``predict.max_labels=20`` (a model trained for a few
steps scores every label alike; the cap keeps its submission at Inclusive Images' scale of labels per image).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.bench_label_embedding import synthetic_labels
from benchmarks.common import (
    GIB,
    REPO_ROOT,
    add_threads_option,
    limit_cpu_threads,
    peak_rss_gib,
    reset_peak_rss,
    status_gib,
    work_folder,
)
from src.config import Config, load_config
from src.data import label_csr, test_source, train_sources
from src.files import write_atomic
from src.folds import assign_folds
from src.formats import get_format, load_training_data
from src.metrics import count_labels
from src.pack import VERSION, array_path, csv_digest, fingerprint, manifest_path, open_packed, source_identity
from src.predict import predict
from src.run_folder import RunFolder
from src.score_table import read_score_table
from src.thresholds import compare_strategies
from src.tracking import Tracker
from src.train import Trainer, build_parts

FULL = {"train": 1_700_000, "test": 100_000, "labels": 7178}
SMOKE = {"train": 8_000, "test": 800, "labels": 1500}  # past CSV_MAX_CLASSES: float16 tables
RSS_TARGET_GIB = 8e9 / GIB  # the 8 GB
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
ROWS_PER_WRITE = 1 << 20


# -- the data ------------------------------------------------------------------------------------------------
def hex16(values: np.ndarray) -> np.ndarray:
    """n x 16 ASCII bytes: each uint64 in 16 lowercase hex digits (an Open Images ImageID)."""
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    return HEX[(values[:, None] >> shifts) & np.uint64(15)]


def digits(values: np.ndarray, width: int) -> np.ndarray:
    """n x ``width`` ASCII bytes: each value in decimal, zero-padded."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def text(*columns: np.ndarray | bytes) -> bytes:
    """Fixed-width csv rows: n x w byte columns and constant bytes side by side, each row ended by a newline."""
    n = next(len(c) for c in columns if isinstance(c, np.ndarray))
    parts = [c if isinstance(c, np.ndarray) else np.broadcast_to(np.frombuffer(c, np.uint8), (n, len(c)))
             for c in (*columns, b"\n")]
    return np.concatenate(parts, axis=1).tobytes()


def image_ids(first: int, count: int) -> np.ndarray:
    """Distinct random-looking 64-bit ids (an odd multiplier is a bijection modulo 2^64)."""
    return np.arange(first, first + count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def write_data(folder: Path, n_train: int, n_test: int, m: int, seed: int) -> None:
    """``train_human_labels.csv`` (positives, then one verified negative per four) and
    ``stage_1_sample_submission.csv``, written a million rows at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    indptr, indices = synthetic_labels(n_train, m, seed)
    rng = np.random.default_rng(seed + 1)
    ids = hex16(image_ids(0, n_train))
    with open(folder / "train_human_labels.csv", "wb") as out:
        out.write(b"ImageID,Source,LabelName,Confidence\n")
        image = np.repeat(np.arange(n_train), np.diff(indptr))
        negatives = rng.integers(0, n_train, len(indices) // 4)
        for rows, labels, confidence in ((image, indices, b"1"),
                                         (negatives, rng.integers(0, m, len(negatives)), b"0")):
            for start in range(0, len(rows), ROWS_PER_WRITE):
                part = slice(start, start + ROWS_PER_WRITE)
                out.write(text(ids[rows[part]], b",verification,/m/0", digits(labels[part], 5),
                               b"," + confidence))
    with open(folder / "stage_1_sample_submission.csv", "wb") as out:
        out.write(b"image_id,labels\n")
        out.write(text(hex16(image_ids(n_train, n_test)), b",/m/000000"))


def write_cache(cfg: Config, seed: int) -> list[Path]:
    """The packed cache of the training and test sources, as ``src.pack`` names and describes it (its helpers),
    with random images and no image files: rows in the order the format reads the source (the csv's order of
    first appearance, the sample submission's order)."""
    data = cfg.data
    size, channels = data.image_size, get_format(data).channels(cfg)
    rng = np.random.default_rng(seed + 2)
    written = []
    for source in train_sources(data) + [test_source(data)]:
        column = "ImageID" if source.name == "train" else "image_id"
        ids = pd.unique(pd.read_csv(source.csv, usecols=[column], dtype=str)[column]).tolist()
        shape = (len(ids), size, size, channels)
        path, manifest = array_path(data, source), manifest_path(data, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_bytes = size * size * channels
        digests = []
        with open(path, "wb") as out:
            for start in range(0, len(ids), ROWS_PER_WRITE // 8):
                block = rng.integers(0, 256, (min(ROWS_PER_WRITE // 8, len(ids) - start), sample_bytes), np.uint8)
                out.write(block.tobytes())
                digests += [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in block]
        identity = source_identity(data, source)
        meta = {"version": VERSION, "shape": list(shape), "ids": ids, "size": size, "csv": str(source.csv),
                "images": str(source.images), "ext": source.ext, "channels": channels, "format": data.format,
                "identity": {**identity, "channels": channels}, "fingerprint": fingerprint(identity),
                "csv_blake2b": csv_digest(source.csv), "packed_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "content_blake2b": hashlib.blake2b("".join(digests).encode(), digest_size=8).hexdigest(),
                "samples": [{"id": i, "files": [[0, 0]], "blake2b": d} for i, d in zip(ids, digests)]}
        text_of_manifest = json.dumps(meta)
        write_atomic(manifest, lambda tmp, text_of_manifest=text_of_manifest: tmp.write_text(text_of_manifest))
        fmt = get_format(data)
        probe = pd.DataFrame({"Id": ids[:3], "source": str(source.csv),
                              "files": [fmt.sample_files(data, source, i) for i in ids[:3]]})
        if open_packed(data, probe) is None:
            raise RuntimeError(f"src.pack.open_packed does not find the cache written at {path}")
        written.append(path)
    return written


def bench_config(work: Path, size: int, smoke: bool, overrides: list[str]) -> Config:
    """``configs/openimages_demo.yaml`` pointed at the synthetic data under ``work``, shrunk for the CPU."""
    return load_config(REPO_ROOT / "configs" / "openimages_demo.yaml", [
        f"data.dir={work / 'data'}", "data.class_descriptions=null", "data.trainable_labels=null",
        f"data.image_size={size}", f"data.cache_dir={work / 'cache'}", f"folds.path={work / 'folds.csv'}",
        "folds.n_splits=5", "folds.method=fast", "model.backbone=test_resnet", "model.in_chans=3",
        f"train.batch_size={32 if smoke else 64}", "train.accum_steps=1", "train.num_workers=0", "train.device=cpu",
        "train.precision=fp32", "train.epochs=1", "train.warmup_fraction=0", f"run.dir={work / 'run'}",
        f"submission.path={work / 'submission.csv'}", "wandb.mode=disabled", "predict.tta=[identity]",
        "predict.folds=[0]", "predict.force=true", "predict.max_labels=20", "predict.batch_size=256", *overrides])


# -- the stages (each in its own process) ---------------------------------------------------------------------
def stage_labels(cfg: Config, sizes: dict, seed: int) -> dict:
    write_data(Path(cfg.data.dir), sizes["train"], sizes["test"], sizes["labels"], seed)
    return {}


def stage_pack(cfg: Config, sizes: dict, seed: int) -> dict:
    paths = write_cache(cfg, seed)
    return {"note": f"{sum(p.stat().st_size for p in paths) / GIB:.2f} GiB of pixels"}


def stage_folds(cfg: Config, sizes: dict, seed: int) -> dict:
    cfg, table, _ = load_training_data(cfg)
    labels = label_csr(table["labels"], cfg.data.num_classes)
    folds = assign_folds(labels, cfg.folds.n_splits, cfg.folds.seed, method=cfg.folds.method)
    frame = pd.DataFrame({"Id": table["Id"], "fold": folds})
    write_atomic(Path(cfg.folds.path), lambda tmp: frame.to_csv(tmp, index=False))
    return {"note": f"{len(table):,} images, {cfg.data.num_classes:,} labels, {labels.nnz / len(table):.1f} per image"}


def stage_train(cfg: Config, steps: int, report) -> None:
    """Fold 0: ``steps`` optimizer steps, then its validation, OOF table and checkpoints (two measurements)."""
    start = time.perf_counter()
    parts = build_parts(cfg, fold=0, progress=False)
    trainer = Trainer(parts, progress=False)
    folder = RunFolder(parts.cfg.run.dir)
    folder.save_config(parts.cfg, 0, parts.vocabulary)
    batches = list(itertools.islice(trainer.epoch_batches(), steps * parts.cfg.train.accum_steps))
    trainer.train_epoch(batches)
    seconds = time.perf_counter() - start
    report("train", seconds, f"{len(parts.train_table):,} training rows; build_parts, the prior, {steps} steps")
    reset_peak_rss()
    before = status_gib("VmRSS") or float("nan")
    start = time.perf_counter()
    tracker = Tracker(parts.cfg, folder.fold(0), name="bench_scale", group="bench_scale")
    try:
        row = trainer.end_epoch(seconds, tracker)
    finally:
        tracker.finish()
    shape = f"{len(parts.val_table):,} x {parts.cfg.data.num_classes:,}"
    report("validation", time.perf_counter() - start, f"{shape}; F2 {row['metric_' + row['weights']]:.3f}", before)


def stage_predict(cfg: Config, sizes: dict, seed: int) -> dict:
    path = predict(cfg, progress=False)
    submission = pd.read_csv(path, dtype=str, keep_default_na=False)
    per_image = submission.iloc[:, 1].str.count(" ").mean() + 1
    return {"note": f"{len(submission):,} test rows, {per_image:.1f} labels per image"}


def stage_decisions(cfg: Config, sizes: dict, seed: int) -> dict:
    folder = RunFolder(cfg.run.dir)
    cfg, train_table, _ = load_training_data(cfg, folder.load_vocabulary())
    ids, scores = read_score_table(folder.oof(0, "best"))
    labels = dict(zip(train_table["Id"], train_table["labels"]))
    truth = label_csr([labels[i] for i in ids], cfg.data.num_classes)
    train_labels = label_csr(train_table["labels"], cfg.data.num_classes)
    rate = count_labels(train_labels, 0) / train_labels.shape[0]
    del labels, train_table, train_labels
    reset_peak_rss()
    before = status_gib("VmRSS") or float("nan")
    start = time.perf_counter()
    results = compare_strategies(truth, scores, np.zeros(len(ids), int), rate, cfg.predict, cfg.metric)
    best = max(results, key=lambda name: results[name]["cross_fold"])
    return {"s": time.perf_counter() - start, "rss_before_gib": before,
            "note": f"{len(ids):,} OOF rows; best {best} {results[best]['cross_fold']:.3f}"}


STAGES = {"labels": stage_labels, "pack": stage_pack, "folds": stage_folds, "train": None, "predict": stage_predict,
          "decision search": stage_decisions}
DESCRIPTIONS = {
    "labels": "labels csv (Open Images layout)", "pack": "packed cache (no image files)",
    "folds": "folds (fast stratifier)", "train": "train: build_parts + steps", "validation":
    "validation + OOF table + checkpoints", "predict": "predict (inference, ensemble, 6 strategies, submission)",
    "decision search": "decision search alone (in predict)"}


def _child(conn, name: str, cfg: Config, sizes: dict, seed: int, steps: int, threads: int) -> None:
    """Run one stage in this (forked) process and send back a row per measurement."""
    try:
        limit_cpu_threads(threads)
        reset_peak_rss()
        before = status_gib("VmRSS") or float("nan")

        def report(stage: str, seconds: float, note: str = "", rss_before: float = before) -> None:
            conn.send({"stage": stage, "s": seconds, "rss_before_gib": rss_before, "peak_gib": peak_rss_gib(),
                       "note": note})

        if name == "train":
            stage_train(cfg, steps, report)
        else:
            start = time.perf_counter()
            extra = STAGES[name](cfg, sizes, seed)
            report(name, extra.get("s", time.perf_counter() - start), extra.get("note", ""),
                   extra.get("rss_before_gib", before))
    except BaseException as exc:  # reported by the parent, which has the terminal
        conn.send({"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})
    finally:
        conn.send(None)
        conn.close()


def run_stage(name: str, *args) -> list[dict]:
    """One stage in a forked child: its peak memory is its own, and nothing stays behind in this process."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, name, *args))
    process.start()
    send.close()
    rows = []
    while (message := receive.recv()) is not None:
        if "error" in message:
            process.join()
            raise RuntimeError(f"bench_scale stage {name}: {message['error']}")
        rows.append(message)
    process.join()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the training and test images (default 1: 1.7 M and 100 k); labels unchanged")
    parser.add_argument("--labels", type=int, default=None, help=f"label count (default {FULL['labels']:,})")
    parser.add_argument("--size", type=int, default=8, help="image side in px (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the training stage "
                        "(default 50; smoke 4)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run (default all; later ones need the earlier ones' outputs "
                             "in --work-dir)")
    parser.add_argument("--work-dir", default=None, help="where the data and run go (kept); default a temp folder, "
                                                         "removed afterwards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE['train']:,} x {SMOKE['labels']:,} in seconds: checks the script; its figures "
                             "say nothing about scale")
    add_threads_option(parser)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    sizes = {"train": max(100, round(base["train"] * args.scale)), "test": max(10, round(base["test"] * args.scale)),
             "labels": args.labels or base["labels"]}
    steps = args.steps or (4 if args.smoke else 50)
    wanted = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    print(f"{sizes['train']:,} training images x {sizes['labels']:,} labels, {sizes['test']:,} test images, "
          f"{args.size} px; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"{args.threads} thread(s) per stage" + ("; smoke run: the figures measure nothing" if args.smoke else ""))
    rows = []
    with work_folder(args.work_dir, "bench_scale_") as work:
        cfg = bench_config(work, args.size, args.smoke, args.overrides)
        for name in wanted:
            rows += run_stage(name, cfg, sizes, args.seed, steps, args.threads)
            last = rows[-1]
            print(f"  done: {last['stage']} in {last['s']:.1f} s, peak RSS {last['peak_gib']:.2f} GiB", flush=True)

    header = f"{'stage':<58}{'seconds':>9}{'RSS before GiB':>16}{'peak RSS GiB':>14}  notes"
    print("\n" + header)
    for row in rows:
        print(f"{DESCRIPTIONS.get(row['stage'], row['stage']):<58}{row['s']:>9.1f}{row['rss_before_gib']:>16.2f}"
              f"{row['peak_gib']:>14.2f}  {row['note']}")
    peak = max(row["peak_gib"] for row in rows)
    worst = max(rows, key=lambda row: row["peak_gib"])["stage"]
    print(f"largest stage peak: {peak:.2f} GiB ({worst}) < {RSS_TARGET_GIB:.2f} GiB (8 GB): "
          f"{'PASS' if peak < RSS_TARGET_GIB else 'MISS'}")
    return rows


if __name__ == "__main__":
    main()
