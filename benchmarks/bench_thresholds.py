"""Threshold search speed: ``src.metrics.best_thresholds`` and ``src.thresholds.compare_strategies``.

    .venv/bin/python -m benchmarks.bench_thresholds [--rows 31072 --classes 28] [--skip-large]
    .venv/bin/python -m benchmarks.bench_thresholds --smoke   # the whole script on tiny matrices, in seconds

On a synthetic out-of-fold matrix of HPA's size (31 072 samples x 28 classes, power-law label rates,
probabilities rounded to 6 decimals as ``oof.csv`` stores them, so ties occur), against a brute-force
baseline measured in the same run: per class, sklearn's ``f1_score`` at each of ``--grid`` candidate
thresholds. Target: each of best_thresholds and compare_strategies under one second.

Then a many-label size (default 100 000 x 7 178). best_thresholds holds several n x m int64/float64
arrays at once, so the script first measures its peak memory per matrix entry on the small size and, if
the large size would not fit in ``--memory-fraction`` of the available memory, shrinks the number of
classes until it does, and says so. The brute force there is timed on a few classes and extrapolated.

``--smoke``: 2 000 x 8 and 5 000 x 50, a 5-threshold grid, one call per figure: every code path of the
script, no meaningful figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from src.config import PredictConfig, run_cli
from src.demo import label_rates
from src.metrics import best_thresholds
from src.thresholds import compare_strategies

TARGET_SECONDS = 1.0


def synthetic_oof(n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n x m bool truth, n x m float32 probabilities): power-law label rates, informative but noisy
    scores, rounded to 6 decimals like the probabilities in oof.csv."""
    rng = np.random.default_rng(seed)
    truth = rng.random((n, m), dtype=np.float32) < label_rates(m).astype(np.float32)
    logits = rng.standard_normal((n, m), dtype=np.float32)
    logits += np.where(truth, np.float32(0.5), np.float32(-2.0))  # tuned macro-F1 ~0.6, as HPA OOF
    scores = np.round(1 / (1 + np.exp(-logits)), 6)
    return truth, scores


def brute_force_thresholds(truth: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The usual competition-kernel search: per class, sklearn F1 at every grid threshold."""
    m = truth.shape[1]
    thresholds, best_f1 = np.empty(m), np.empty(m)
    for c in range(m):
        f1s = [f1_score(truth[:, c], scores[:, c] >= t, zero_division=0) for t in grid]
        best = int(np.argmax(f1s))
        thresholds[c], best_f1[c] = grid[best], f1s[best]
    return thresholds, best_f1


def best_of(repeats: int, fn):
    """(median seconds over ``repeats`` calls, last result)."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def peak_bytes(fn) -> int:
    """Peak memory numpy allocates while ``fn()`` runs (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere a conservative 8 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def verdict(seconds: float) -> str:
    return "met" if seconds < TARGET_SECONDS else "NOT met"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=31072, help="OOF samples (HPA train: 31 072)")
    parser.add_argument("--classes", type=int, default=28)
    parser.add_argument("--folds", type=int, default=5, help="folds for compare_strategies' cross-fold scores")
    parser.add_argument("--grid", type=int, default=100, help="brute force: candidate thresholds per class")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    parser.add_argument("--large-rows", type=int, default=100_000)
    parser.add_argument("--large-classes", type=int, default=7178)
    parser.add_argument("--brute-classes", type=int, default=10,
                        help="large size: classes the brute force is timed on (then extrapolated)")
    parser.add_argument("--memory-fraction", type=float, default=0.5,
                        help="large size: keep best_thresholds' predicted peak under this share of free memory")
    parser.add_argument("--skip-large", action="store_true")
    # Not benchmarks.common's add_smoke_option: that module imports the training stack (timm, W&B, ...),
    # which this script does not need.
    parser.add_argument("--smoke", action="store_true",
                        help="check the script end to end in seconds (2 000 x 8 and 5 000 x 50 matrices, 5 thresholds "
                             "per class, one call per figure); its figures say nothing about performance")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.classes, args.grid, args.repeats = 2000, 8, 5, 1
        args.large_rows, args.large_classes, args.brute_classes = 5000, 50, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        print("smoke run: tiny matrices to check the script; the figures below measure nothing")
    grid = np.linspace(0.01, 0.99, args.grid)
    n, m = args.rows, args.classes
    truth, scores = synthetic_oof(n, m)
    print(f"OOF matrix  {n} x {m}, {truth.sum(axis=1).mean():.2f} labels per sample, "
          f"rarest class {truth.sum(axis=0).min()} positives", flush=True)

    exact_s, (_, exact_f1) = best_of(args.repeats, lambda: best_thresholds(truth, scores))
    brute_s, (_, brute_f1) = best_of(1, lambda: brute_force_thresholds(truth, scores, grid))
    oof_fold = np.random.default_rng(1).integers(0, args.folds, n)
    compare_s, results = best_of(args.repeats, lambda: compare_strategies(
        truth, scores, oof_fold, truth.mean(axis=0), PredictConfig()))
    print(f"\n{'':<44}{'seconds':>10}{'macro-F1':>10}{'speed-up':>10}")
    brute_name = f"brute force (sklearn f1_score, {args.grid} thr/class)"
    print(f"{brute_name:<44}{brute_s:>10.3f}{brute_f1.mean():>10.4f}{1.0:>10.1f}")
    print(f"{'best_thresholds (exact, vectorised)':<44}{exact_s:>10.3f}{exact_f1.mean():>10.4f}"
          f"{brute_s / exact_s:>10.1f}")
    compare_name = f"compare_strategies ({len(results)} strategies x {args.folds} folds)"
    print(f"{compare_name:<44}{compare_s:>10.3f}{'(below)':>10}")
    if exact_f1.mean() + 1e-12 < brute_f1.mean():
        print("WARNING: the exact search found a lower macro-F1 than the grid: it is not exact")
    print(f"target < {TARGET_SECONDS:.0f} s: best_thresholds {verdict(exact_s)}, "
          f"compare_strategies {verdict(compare_s)}")
    for name, result in results.items():
        print(f"  {name:<11} in-sample macro-F1 {result['in_sample']:.4f}, cross-fold {result['cross_fold']:.4f}")

    if args.skip_large:
        return
    per_entry = peak_bytes(lambda: best_thresholds(truth, scores)) / (n * m)
    budget = args.memory_fraction * available_bytes()
    inputs_per_entry = 1 + 4  # the bool truth and float32 scores themselves
    big_n, big_m = args.large_rows, args.large_classes
    need = (per_entry + inputs_per_entry) * big_n * big_m
    print(f"\nbest_thresholds peaks at {per_entry:.0f} bytes per matrix entry: {big_n} x {big_m} needs "
          f"~{need / 2**30:.1f} GiB with its inputs; {budget / 2**30:.1f} GiB allowed "
          f"({args.memory_fraction:.0%} of available)")
    if need > budget:
        big_m = max(1, int(budget / ((per_entry + inputs_per_entry) * big_n)))
        print(f"  -> too big here: measuring {big_n} x {big_m} instead (same rows, fewer classes)")
    start = time.perf_counter()
    big_truth, big_scores = synthetic_oof(big_n, big_m, seed=2)
    print(f"  made the {big_n} x {big_m} matrix in {time.perf_counter() - start:.1f} s", flush=True)
    big_s, (_, big_f1) = best_of(1, lambda: best_thresholds(big_truth, big_scores))
    sample = np.linspace(0, big_m - 1, min(args.brute_classes, big_m)).astype(int)
    brute_part_s, _ = best_of(1, lambda: brute_force_thresholds(big_truth[:, sample], big_scores[:, sample], grid))
    brute_big_s = brute_part_s * big_m / len(sample)
    print(f"{'':<44}{'seconds':>10}{'speed-up':>10}")
    brute_name = f"brute force (extrapolated from {len(sample)} classes)"
    print(f"{brute_name:<44}{brute_big_s:>10.1f}{1.0:>10.1f}")
    print(f"{'best_thresholds':<44}{big_s:>10.1f}{brute_big_s / big_s:>10.1f}")
    big_ns, small_ns = big_s / (big_n * big_m) * 1e9, exact_s / (n * m) * 1e9
    print(f"  {big_n} x {big_m}: {big_s:.1f} s, {big_ns:.1f} ns per entry ({small_ns:.1f} ns at {n} x {m})")
    if big_m < args.large_classes:
        estimate = big_s * args.large_classes / big_m
        print(f"  {big_n} x {args.large_classes} estimated at {estimate:.0f} s of compute (linear in classes), "
              f"if its ~{need / 2**30:.0f} GiB fitted in memory")


if __name__ == "__main__":
    run_cli(main)
