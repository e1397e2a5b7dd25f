"""Multilabel-stratified folds at Google Inclusive Images scale: time, peak memory and balance.

    python -m benchmarks.bench_folds            # 100k x 500: random, iterstrat, fast; then 1.7 M x 7 178
    python -m benchmarks.bench_folds --smoke    # the whole script on tiny tables, in seconds

Data: the synthetic label table of ``benchmarks.bench_label_embedding`` (power-law label frequencies,
co-occurring groups of labels, ~7.3 labels per image), the same seed for every method, so each size's
methods split the same table. At the comparison size (100 000 x 500, where iterstrat takes ~15-30 s) the
table has a random split (sklearn ``KFold``, the baseline), iterstrat (``folds.method=iterstrat``) and the
fast sparse path (``folds.method=fast``); at the Inclusive Images size (1.7 M x 7 178, full mode only) the
random split and the fast path, ``label_csr`` from the label tuples the data tables hold, and the data stage
itself: ``src.formats.read_train_labels`` on the same table written as an Open Images label csv (positives plus
one verified negative per four; writing it is not timed).

Each row runs in its own forked child process, so the rows' memory does not mix: ``RSS before`` is the
child's resident memory when the timed step starts (the modules the folds stage imports plus the label
table), ``peak RSS`` its peak during the step (Linux ``/proc/self/clear_refs`` resets it; elsewhere
``ru_maxrss``, the peak so far). Balance, from ``src.folds.balance``: LD and ED of Sechidis et al. (2011;
label distribution and examples distribution, 0 is perfect), the largest and the mean over classes with
at least k samples of max over folds |count - n_c/k| / (n_c/k), and (class, fold) pairs left empty.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.model_selection import KFold

from benchmarks.bench_label_embedding import as_label_column, synthetic_labels
from benchmarks.common import GIB, peak_rss_gib, reset_peak_rss, status_gib
from src.config import load_config
from src.data import label_csr
from src.folds import assign_folds, balance
from src.formats import read_train_labels

TIME_TARGET_S, RSS_TARGET_GIB = 120.0, 8e9 / GIB  # the 8 GB
METHODS = {
    "random KFold (baseline)": "random",
    "iterstrat (folds.method=iterstrat)": "iterstrat",
    "fast (folds.method=fast)": "fast",
    "label_csr (label tuples -> csr)": "label_csr",
    "read labels csv (openimages format)": "read_openimages",
}


def label_table(n: int, m: int, seed: int) -> sparse.csr_matrix:
    """The synthetic n x m binary label matrix (bench_label_embedding's generator)."""
    indptr, indices = synthetic_labels(n, m, seed)
    return sparse.csr_matrix((np.ones(len(indices), dtype=np.uint8), indices, indptr), shape=(n, m))


def random_folds(n: int, n_splits: int, seed: int) -> np.ndarray:
    folds = np.empty(n, dtype=np.int64)
    for fold, (_, val_index) in enumerate(KFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(n))):
        folds[val_index] = fold
    return folds


def write_openimages_csv(folder: Path, n: int, m: int, seed: int) -> Path:
    """The synthetic table as an Open Images image-level label csv (ImageID,Source,LabelName,Confidence), with
    one verified negative (Confidence 0) per four positives, as the real file mixes them."""
    indptr, indices = synthetic_labels(n, m, seed)
    rng = np.random.default_rng(seed)
    image = np.repeat(np.arange(n), np.diff(indptr))
    negatives = rng.integers(0, n, len(indices) // 4)
    ids = np.char.mod("%016x", rng.permutation(np.arange(n, dtype=np.int64) * 7919 + 12345))
    codes = np.char.add("/m/0", np.char.mod("%05d", np.arange(m)))
    frame = pd.DataFrame({"ImageID": ids[np.concatenate([image, negatives])], "Source": "verification",
                          "LabelName": codes[np.concatenate([indices, rng.integers(0, m, len(negatives))])],
                          "Confidence": np.r_[np.ones(len(image), np.int8), np.zeros(len(negatives), np.int8)]})
    path = folder / "train_human_labels.csv"
    frame.to_csv(path, index=False)
    return path


def run_case(kind: str, n: int, m: int, n_splits: int, seed: int) -> dict:
    """Make the table, time one step on it (peak RSS reset first), then measure the split's balance."""
    if kind == "read_openimages":  # the data stage: csv -> table of label tuples -> vocabulary -> class indices
        with tempfile.TemporaryDirectory() as tmp:
            write_openimages_csv(Path(tmp), n, m, seed)
            cfg = load_config(None, ["data.format=openimages", f"data.dir={tmp}",
                                     "data.train_csv=train_human_labels.csv", "data.num_classes=null"]).data
            reset_peak_rss()
            before = status_gib("VmRSS") or float("nan")
            start = time.perf_counter()
            table = read_train_labels(cfg)
            seconds = time.perf_counter() - start
            assert len(table.frame) <= n and len(table.vocabulary) <= m and not table.problems
            return {"s": seconds, "rss_before_gb": before, "rss_gb": peak_rss_gib()}
    if kind == "label_csr":
        indptr, indices = synthetic_labels(n, m, seed)
        column = as_label_column(indptr, indices)  # the data tables' form: a tuple of ints per image
        del indptr, indices
    else:
        labels = label_table(n, m, seed)
    reset_peak_rss()
    before = status_gib("VmRSS") or float("nan")
    start = time.perf_counter()
    if kind == "label_csr":
        labels = label_csr(column, m)
        folds = None
    elif kind == "random":
        folds = random_folds(n, n_splits, seed)
    else:
        folds = assign_folds(labels, n_splits, seed, method=kind)
    seconds = time.perf_counter() - start
    result = {"s": seconds, "rss_before_gb": before, "rss_gb": peak_rss_gib()}
    if folds is not None:
        result.update(balance(labels, folds, n_splits))
    return result


def _child(conn, *args) -> None:
    try:
        conn.send(run_case(*args))
    except BaseException as exc:  # reported by the parent, which has the terminal
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def run_isolated(*args) -> dict:
    """``run_case`` in a forked child (fresh peak RSS, nothing left over from other rows); in-process
    where fork is unavailable."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return run_case(*args)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, *args))
    process.start()
    send.close()
    result = receive.recv()
    process.join()
    if "error" in result:
        raise RuntimeError(f"bench_folds case {args}: {result['error']}")
    return result


def describe(n: int, m: int, n_splits: int, seed: int) -> str:
    labels = label_table(n, m, seed)
    support = np.bincount(labels.indices, minlength=m)
    return (f"{n:,} x {m:,}: {labels.nnz / n:.2f} labels per image, support min {support.min()}, median "
            f"{np.median(support):.0f}, max {support.max()}; classes with < {n_splits} samples: "
            f"{int((support < n_splits).sum())}; images without labels: {int((np.diff(labels.indptr) == 0).sum())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_700_000, help="the large size (fast path only)")
    parser.add_argument("--labels", type=int, default=7178)
    parser.add_argument("--compare-images", type=int, default=100_000, help="the size iterstrat runs at too")
    parser.add_argument("--compare-labels", type=int, default=500)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="check the script end to end in seconds (2 000 x 50, no large size); its figures "
                             "say nothing about performance")
    args = parser.parse_args(argv)
    k, seed = args.folds, args.seed
    sizes = [(args.compare_images, args.compare_labels, ["random", "iterstrat", "fast"])]
    if args.smoke:
        sizes = [(2000, 50, ["random", "iterstrat", "fast", "label_csr", "read_openimages"])]
        print("smoke run: a tiny label table to check the script; the figures below measure nothing")
    else:
        sizes.append((args.images, args.labels, ["random", "fast", "label_csr", "read_openimages"]))
    print(f"{k} folds, seed {seed}; {os.cpu_count()} CPUs")
    for n, m, _ in sizes:
        print(describe(n, m, k, seed))

    names = {kind: name for name, kind in METHODS.items()}
    rows = []
    for n, m, kinds in sizes:
        for kind in kinds:
            rows.append((names[kind], n, m, run_isolated(kind, n, m, k, seed)))

    header = (f"{'method':<36}{'n':>11}{'m':>7}{'seconds':>9}{'RSS before GiB':>15}{'peak RSS GiB':>13}"
              f"{'LD':>10}{'ED':>8}{'max dev':>9}{'mean dev':>10}{'empty':>7}")
    print("\n" + header)
    for name, n, m, r in rows:
        line = f"{name:<36}{n:>11,}{m:>7,}{r['s']:>9.2f}{r['rss_before_gb']:>15.2f}{r['rss_gb']:>13.2f}"
        if "LD" in r:
            line += (f"{r['LD']:>10.2e}{r['ED']:>8.1f}{r['max_dev']:>9.3f}{r['mean_dev']:>10.4f}"
                     f"{r['empty_pairs']:>7}")
        else:
            line += f"{'-':>10}{'-':>8}{'-':>9}{'-':>10}{'-':>7}"
        print(line)

    by = {(r[0], r[1], r[2]): r[3] for r in rows}
    n, m = sizes[0][:2]
    fast, iterstrat, rand = (by[(names[kind], n, m)] for kind in ("fast", "iterstrat", "random"))
    print(f"\nfast vs iterstrat at {n:,} x {m:,} (same table, same run): {fast['s']:.2f} s vs {iterstrat['s']:.2f} s "
          f"(ratio {iterstrat['s'] / fast['s']:.1f}x); LD {fast['LD']:.2e} vs {iterstrat['LD']:.2e} "
          f"(random {rand['LD']:.2e}); mean dev {fast['mean_dev']:.4f} vs {iterstrat['mean_dev']:.4f} "
          f"(random {rand['mean_dev']:.4f}); max dev {fast['max_dev']:.3f} vs {iterstrat['max_dev']:.3f} "
          f"(random {rand['max_dev']:.3f})")
    if not args.smoke:
        n, m = sizes[1][:2]
        large = by[(names["fast"], n, m)]
        to_csr = by[(names["label_csr"], n, m)]
        read = by[(names["read_openimages"], n, m)]
        peak = max(large["rss_gb"], to_csr["rss_gb"], read["rss_gb"])
        time_ok = "PASS" if large["s"] < TIME_TARGET_S else "MISS"
        memory_ok = "PASS" if peak < RSS_TARGET_GIB else "MISS"
        print(f"target at {n:,} x {m:,}: fast {large['s']:.1f} s < {TIME_TARGET_S:.0f} s {time_ok}; peak RSS "
              f"{peak:.2f} GiB < {RSS_TARGET_GIB:.2f} GiB (8 GB) {memory_ok} (label_csr {to_csr['s']:.1f} s and "
              f"reading the labels csv {read['s']:.1f} s, not in the 2 minutes)")


if __name__ == "__main__":
    main()
