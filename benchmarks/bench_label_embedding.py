"""Label embedding at Google Inclusive Images scale: time and peak memory of each stage.

    python -m benchmarks.bench_label_embedding [--images 1700000] [--labels 7178] [--dim 300]
    python -m benchmarks.bench_label_embedding --smoke   # the whole script on a tiny table, in seconds

Synthetic label table: power-law label frequencies, ~8 labels per image, co-occurrence structure from
groups of labels (each image draws two groups, then three labels inside each by a power law, plus two
labels from the global power law), drawn vectorised and deduplicated by the sparse sum. Prints one table
with each figure next to its target, PASS/MISS. Peak memory per stage is the process's peak RSS during
the stage (Linux ``/proc/self/clear_refs`` resets it; else ``ru_maxrss``, the peak so far), next to the
RSS when the stage starts (imports, the label matrix, ...), and the peak of the numpy/Python allocations
made by the stage (``tracemalloc``; BLAS/LAPACK workspaces are not traced).

``--smoke``: 5 000 images x 300 labels, dim 16, 1 000 decoded: every code path of the script, no
meaningful figure.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np
from scipy import sparse

from benchmarks.common import GIB, peak_rss_gib, reset_peak_rss, status_gib
from src.label_embedding import (
    _normalize_rows,
    _raw_embedding,
    decode,
    decode_top_k,
    empty_labels,
    label_matrix_sparse,
    pmi_matrix,
    targets,
    truncated_svd,
)


def power_law(size: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, size + 1) ** exponent
    return weights / weights.sum()


def synthetic_labels(n: int, m: int, seed: int = 0, group_size: int = 37) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of n label sets over m labels, deduplicated, ~8 labels per image."""
    rng = np.random.default_rng(seed)
    n_groups = -(-m // group_size)
    groups = rng.choice(n_groups, size=(n, 2), p=power_law(n_groups, 1.0))
    within = rng.choice(group_size, size=(n, 2, 3), p=power_law(group_size, 1.0))
    grouped = ((groups[:, :, None] * group_size + within) % m).reshape(n, -1)
    background = rng.choice(m, size=(n, 2), p=power_law(m, 1.1))
    draws = rng.permutation(m)[np.concatenate([grouped, background], axis=1)]  # frequency unrelated to index
    matrix = sparse.csr_matrix((np.ones(draws.size, np.int8), (np.repeat(np.arange(n), draws.shape[1]),
                                                              draws.ravel())), shape=(n, m))
    matrix.sum_duplicates()  # repeats within an image collapse here
    return matrix.indptr, matrix.indices


def as_label_column(indptr: np.ndarray, indices: np.ndarray) -> list[tuple[int, ...]]:
    """The data tables' form: one tuple of Python ints per image."""
    flat = indices.tolist()
    return [tuple(flat[a:b]) for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())]


@contextmanager
def stage(results: dict, name: str):
    """Wall time, peak RSS and peak traced allocations of the enclosed block into ``results[name]``."""
    reset_peak_rss()
    before = status_gib("VmRSS") or float("nan")
    tracemalloc.start()
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    results[name] = {"s": seconds, "rss_before_gib": before, "rss_gib": peak_rss_gib(),
                     "traced_gib": traced_peak / GIB}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_700_000)
    parser.add_argument("--labels", type=int, default=7178)
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--decode", type=int, default=100_000, help="predictions to decode")
    parser.add_argument("--seed", type=int, default=0)
    # Not benchmarks.common's add_smoke_option: that module imports the training stack (timm, W&B, ...),
    # which this script does not need.
    parser.add_argument("--smoke", action="store_true",
                        help="check the script end to end in seconds (5 000 images x 300 labels, dim 16, "
                             "1 000 decoded); its figures say nothing about performance")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.labels, args.dim, args.decode = 5000, 300, 16, 1000
        print("smoke run: a tiny label table to check the script; the figures below measure nothing")
    n, m, k = args.images, args.labels, args.dim
    print(f"{n:,} images x {m:,} labels, dim {k}; {os.cpu_count()} CPUs")

    start = time.perf_counter()
    indptr, indices = synthetic_labels(n, m, args.seed)
    column = as_label_column(indptr, indices)
    del indptr, indices
    print(f"synthetic label column: {time.perf_counter() - start:.1f} s (setup, not timed below)")

    results: dict[str, dict] = {}
    with stage(results, "label matrix"):
        M = label_matrix_sparse(column, m)
    del column
    support = np.asarray(M.sum(axis=0)).ravel()
    print(f"labels per image {M.nnz / n:.2f}; support min {support.min()}, median {np.median(support):.0f}, "
          f"max {support.max()}; unseen labels {(support == 0).sum()}")

    with stage(results, "PMI (positive)"):
        pmi = pmi_matrix(M, positive=True)
    sparse_bytes = pmi.data.nbytes + pmi.indices.nbytes + pmi.indptr.nbytes
    print(f"PPMI: {pmi.nnz:,} stored pairs (density {pmi.nnz / m / m:.1%}), {sparse_bytes / 2**20:.0f} MiB sparse; "
          f"dense would be {m * m * 8 / 2**20:.0f} MiB float64 / {m * m * 4 / 2**20:.0f} MiB float32, "
          f"and C = M^T M dense int64 another {m * m * 8 / 2**20:.0f} MiB")

    with stage(results, f"embedding k={k}"):
        U, S, signs = truncated_svd(pmi, k, seed=args.seed)
        E = _normalize_rows(_raw_embedding(pmi, U, S))
    print(f"embedding: {(signs < 0).sum()} of {k} directions from negative eigenvalues; "
          f"singular values {S[0]:.1f} .. {S[-1]:.2f}; empty rows {len(empty_labels(E))}")

    # Quality, not a target: decode the exact targets of some training images and count how many of an
    # image's labels come back among its top-|labels| scores.
    sample = M[: min(args.decode, n)]
    goal = targets(sample, E)
    decode_name = f"decode {len(goal):,} x {m:,}"
    with stage(results, decode_name):
        scores = decode(goal, E)
    del scores
    true_counts = np.diff(sample.indptr)
    best, _ = decode_top_k(goal, E, int(true_counts.max()))
    keep = np.arange(best.shape[1]) < true_counts[:, None]
    predicted = sparse.csr_matrix((np.ones(keep.sum(), np.float32), best[keep],
                                   np.concatenate([[0], np.cumsum(true_counts)])), shape=sample.shape)
    recall = sample.multiply(predicted).sum() / true_counts.sum()
    with stage(results, f"decode_top_k(10) {len(goal):,}"):
        decode_top_k(goal, E, 10)

    embed_name = f"embedding k={k}"
    print(f"\n{'stage':<30}{'time s':>8}{'RSS before GiB':>16}{'peak RSS GiB':>14}{'traced GiB':>12}")
    for name, r in results.items():
        print(f"{name:<30}{r['s']:>8.2f}{r['rss_before_gib']:>16.2f}{r['rss_gib']:>14.2f}{r['traced_gib']:>12.2f}")
    checks = [("PMI + embedding time", results["PMI (positive)"]["s"] + results[embed_name]["s"], 60, "s"),
              ("PMI + embedding peak RSS", max(results["PMI (positive)"]["rss_gib"], results[embed_name]["rss_gib"]),
               4, "GiB"),
              (f"{decode_name} time", results[decode_name]["s"], 20, "s")]
    print(f"\n{'check':<34}{'figure':>12}{'target':>10}")
    for name, value, limit, unit in checks:
        verdict = "PASS" if value < limit else "MISS"
        print(f"{name:<34}{value:>8.2f} {unit:<3}{'< ' + str(limit) + ' ' + unit:>10}  {verdict}")
    print(f"\ndecode quality (info): {recall:.1%} of the labels of {len(goal):,} training images are in their "
          f"top-|labels| when decoding their exact targets")


if __name__ == "__main__":
    main()
