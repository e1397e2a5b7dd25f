"""Stage 1d (optional): near-duplicate images across the training sources and the test set.

    python -m src.duplicates [--config FILE] [key=value ...]

Hashes every image of every training source (``train``, each ``data.extra`` source) and of the test set with
the perceptual hash the folds stage groups duplicates by (``image_hashes``: imagehash.phash of the image the
format hashes, HPA's green plane), and writes ``folds.duplicates_path``: one row per pair of images whose hashes
differ in at most ``folds.duplicate_distance`` bits, ``id_a,source_a,id_b,source_b,distance`` (sources named
as in the packed cache: ``train``, ``extra<i>``, ``test``; a pair in table order, so a test image is always
``b`` beside a labelled one). It prints how many pairs join each two sources: a train-only source's duplicates of
competition images train on what their twins are validated on; labelled duplicates of test images are what
``predict.overrides`` copies labels from (1st place HPA: docs/winners.md).

Cost: hashing is linear (one decode of one plane per image); matching compares every pair of hashes in blocks
(``hash_pairs``: XOR and popcount, O(n x m) for n and m hashes, ~0.1 s for 10k x 10k here), so 117k images (HPA
train, HPAv18 and test) are ~7 x 10^9 pairs, about a minute.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse
from scipy.cluster.hierarchy import DisjointSet

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError
from src.data import Vocabulary, test_source, train_sources
from src.files import WriteError, write_atomic
from src.formats import DatasetFormat, get_format, load_test_table, load_training_data
from src.progress import bar as progress_bar
from src.progress import note

PAIR_COLUMNS = ["id_a", "source_a", "id_b", "source_b", "distance"]


# What image_hashes says of an absent image, as the folds stage needs them (``{path}``: the file).
ABSENT_FOR_FOLDS = ("folds.group_duplicates=true hashes every training image, and {path} is absent: restore the "
                    "images, or set folds.group_duplicates=false (the folds then need only the labels), or use the "
                    "folds file made where the images were")


def image_hashes(table: pd.DataFrame, fmt: DatasetFormat, progress: bool = True,
                 absent: str = ABSENT_FOR_FOLDS) -> np.ndarray:
    """64-bit perceptual hash (imagehash.phash) of each sample's image that ``fmt`` hashes (``hash_file``: HPA's
    green plane; a one-file image's luminance), as uint64. An absent image stops with ``absent`` (its ``{path}``
    filled in)."""
    hashes = np.zeros(len(table), dtype=np.uint64)
    for row, files in enumerate(progress_bar(table["files"], total=len(table), desc="hashing images",
                                             disable=not progress, mininterval=1.0)):
        path = fmt.hash_file(files)
        try:
            image = Image.open(path)
        except FileNotFoundError:
            raise PipelineError(absent.format(path=path)) from None
        with image:
            bits = imagehash.phash(image.convert("L")).hash.flatten()
        hashes[row] = np.packbits(bits).view(">u8")[0]
    return hashes


# Cells (pairs) of one block of hash_pairs: 2^24 keep its XOR array at 128 MB whatever the number of hashes.
BLOCK_CELLS = 1 << 24


def hash_pairs(left: np.ndarray, right: np.ndarray | None, max_distance: int, chunk: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i, j) with ``left[i]`` and ``right[j]`` at most ``max_distance`` bits apart, and the distance:
    all n x m XOR + popcounts, ``chunk`` rows of ``left`` at a time (default: ``BLOCK_CELLS`` pairs a block).
    ``right`` None: the pairs i < j within ``left``, each block of rows against the rows from its first on
    (half the work of ``left`` against itself)."""
    within = right is None
    right = left if within else right
    chunk = chunk or max(1, BLOCK_CELLS // max(1, len(right)))
    rows, cols, distances = [], [], []
    for start in range(0, len(left), chunk):
        first = start if within else 0
        distance = np.bitwise_count(left[start:start + chunk, None] ^ right[None, first:])
        i, j = np.nonzero(distance <= max_distance)
        keep = i + start < j + first if within else slice(None)
        rows.append(i[keep] + start)
        cols.append(j[keep] + first)
        distances.append(distance[i[keep], j[keep]])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(distances)


def duplicate_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Group id per sample: samples whose hashes differ in at most ``max_distance`` bits are linked
    (transitively). Pairwise Hamming distances are computed in blocks (``hash_pairs``), so 31k images take seconds."""
    groups = DisjointSet(range(len(hashes)))
    rows, cols, _ = hash_pairs(hashes, None, max_distance)
    for i, j in zip(rows.tolist(), cols.tolist()):
        groups.merge(i, j)
    roots = np.array([groups[i] for i in range(len(hashes))])
    return np.unique(roots, return_inverse=True)[1]


def source_names(cfg: Config) -> dict[str, str]:
    """Each training source's csv (as a table's ``source`` column holds it) -> its name (``train``, ``extra<i>``)."""
    return {str(source.csv): source.name for source in train_sources(cfg.data)}


def find_duplicates(cfg: Config, progress: bool = True) -> pd.DataFrame:
    """Hash every training and test image, write ``folds.duplicates_path`` (the near-duplicate pairs, see the
    module docstring) and return the pairs."""
    cfg, train_table, _ = load_training_data(cfg)
    test_table = load_test_table(cfg.data)
    names = source_names(cfg)
    table = pd.concat([train_table.assign(source=train_table["source"].map(names)),
                       test_table.assign(source=test_source(cfg.data).name)], ignore_index=True)
    hashes = image_hashes(table, get_format(cfg.data), progress,
                          absent="python -m src.duplicates hashes every training and test image, and {path} is "
                                 "absent: run it where the images are")
    first, second, distances = hash_pairs(hashes, None, cfg.folds.duplicate_distance)
    ids, sources = table["Id"].to_numpy(), table["source"].to_numpy()
    pairs = pd.DataFrame({"id_a": ids[first], "source_a": sources[first], "id_b": ids[second],
                          "source_b": sources[second], "distance": distances}, columns=PAIR_COLUMNS)
    path = Path(cfg.folds.duplicates_path)
    try:
        write_atomic(path, lambda tmp: pairs.to_csv(tmp, index=False))
    except WriteError as exc:
        raise PipelineError(f"cannot write the duplicates file {path}: {exc.reason}") from exc
    if progress:
        joined = Counter(" x ".join(sorted(pair)) for pair in zip(pairs["source_a"], pairs["source_b"]))
        counts = ", ".join(f"{key}: {n}" for key, n in sorted(joined.items())) or "none"
        print(f"{len(table)} images hashed; pairs within {cfg.folds.duplicate_distance} bits: {counts}")
        print(f"wrote {path} ({len(pairs)} pairs)")
    train_only = {f"extra{i}" for i, extra in enumerate(cfg.data.extra) if extra.role == "train_only"}
    split = set(names.values()) - train_only  # the sources whose rows are validated on
    leaks = sum((a in train_only and b in split) or (b in train_only and a in split)
                for a, b in zip(pairs["source_a"], pairs["source_b"]))
    if leaks:
        note(f"warning: {leaks} train-only image(s) near-duplicate competition images: every fold trains on them, so "
             f"their twins' validation scores are optimistic; leave them out of the train-only csv (pairs in {path})")
    return pairs


def read_duplicates(cfg: Config) -> pd.DataFrame:
    """The pairs of ``folds.duplicates_path`` within ``folds.duplicate_distance`` bits, or a PipelineError naming
    the command that makes the file."""
    path = Path(cfg.folds.duplicates_path)
    if not path.is_file():
        raise PipelineError(f"duplicates file {path} not found (predict.overrides=true reads it): make it with "
                            "`python -m src.duplicates [--config FILE] [key=value ...]`")
    try:
        pairs = pd.read_csv(path, dtype={"id_a": str, "id_b": str, "source_a": str, "source_b": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"duplicates file {path} is empty or not a csv ({type(exc).__name__}); remake it with "
                            "`python -m src.duplicates`") from None
    if list(pairs.columns) != PAIR_COLUMNS:
        raise PipelineError(f"{path}: expected columns {','.join(PAIR_COLUMNS)}, found {list(pairs.columns)}")
    return pairs[pd.to_numeric(pairs["distance"], errors="coerce") <= cfg.folds.duplicate_distance]


@dataclass
class Overrides:
    """Test rows that take the labels of a labelled near-duplicate: each row's index in the test table, its
    labels (class indices), the labelled Ids they come from and the Hamming distance."""

    rows: np.ndarray
    labels: list[tuple[int, ...]]
    sources: list[list[str]]
    distances: list[int]

    def record(self, test_ids: pd.Series, vocabulary: Vocabulary, path: str) -> dict:
        """What decision.json keeps of them: the file, the count, and per row the Id, label codes and where from."""
        ids = test_ids.to_numpy()
        return {"file": path, "rows": len(self.rows),
                "images": [{"Id": str(ids[row]), "labels": [vocabulary.codes[c] for c in labels], "from": sources,
                            "distance": distance}
                           for row, labels, sources, distance in zip(self.rows.tolist(), self.labels, self.sources,
                                                                     self.distances)]}


def duplicate_overrides(cfg: Config, test_table: pd.DataFrame, train_table: pd.DataFrame) -> Overrides:
    """For each test image with a labelled near-duplicate (``read_duplicates``): the labels of the nearest one
    (several equally near: the union of their labels). A labelled image without labels in the run's vocabulary
    gives none. Ids the data no longer has stop with the command that remakes the file."""
    pairs = read_duplicates(cfg)
    labelled = pairs["source_a"] != "test"
    pairs = pairs[labelled & (pairs["source_b"] == "test")]
    names = source_names(cfg)
    label_of = {(sample_id, names.get(source, source)): labels
                for sample_id, source, labels in zip(train_table["Id"], train_table["source"], train_table["labels"])}
    test_row = {sample_id: row for row, sample_id in enumerate(test_table["Id"])}
    stale = [f"{i} ({s})" for i, s in zip(pairs["id_a"], pairs["source_a"]) if (i, s) not in label_of]
    stale += [f"{i} (test)" for i in pairs["id_b"] if i not in test_row]
    if stale:
        raise PipelineError(f"{cfg.folds.duplicates_path}: {len(stale)} Id(s) are not in the data (e.g. {stale[:3]}): "
                            "the data changed since it was made; rerun `python -m src.duplicates`")
    nearest: dict[int, tuple[int, set[int], list[str]]] = {}
    for sample_id, source, test_id, distance in zip(pairs["id_a"], pairs["source_a"], pairs["id_b"],
                                                    pairs["distance"].astype(int)):
        labels = label_of[(sample_id, source)]
        if not labels:
            continue
        row = test_row[test_id]
        best = nearest.get(row)
        if best is None or distance < best[0]:
            nearest[row] = (distance, set(labels), [sample_id])
        elif distance == best[0]:
            best[1].update(labels)
            best[2].append(sample_id)
    rows = sorted(nearest)
    return Overrides(np.array(rows, dtype=np.int64), [tuple(sorted(nearest[r][1])) for r in rows],
                     [nearest[r][2] for r in rows], [int(nearest[r][0]) for r in rows])


def apply_overrides(predicted, overrides: Overrides):
    """``predicted`` (a dense boolean array or a sparse matrix, n x m) with each overridden row's labels replaced
    by its duplicate's."""
    n, m = predicted.shape
    rows = np.repeat(overrides.rows, [len(labels) for labels in overrides.labels])
    cols = np.fromiter((c for labels in overrides.labels for c in labels), dtype=np.int64, count=len(rows))
    if sparse.issparse(predicted):
        kept = np.ones(n, dtype=bool)
        kept[overrides.rows] = False
        copied = sparse.csr_matrix((np.ones(len(rows), dtype=np.uint8), (rows, cols)), shape=(n, m))
        kept_rows = sparse.diags(kept.astype(np.uint8), dtype=np.uint8) @ sparse.csr_matrix(predicted, dtype=np.uint8)
        return (kept_rows + copied).astype(bool).tocsr()
    result = np.array(predicted, dtype=bool, copy=True)
    result[overrides.rows] = False
    result[rows, cols] = True
    return result


def apply_recorded_overrides(record: dict, predicted, test_ids: pd.Series, vocabulary: Vocabulary):
    """``predicted`` with the overrides a decision record keeps (``Overrides.record``) applied to the rows of
    ``test_ids`` they name, as predict applied them (an inference bundle on the same test set writes the same
    submission); Ids not in ``test_ids`` are left out and noted. ``predicted`` unchanged when there are none."""
    images = (record.get("overrides") or {}).get("images") or []
    row_of = {sample_id: row for row, sample_id in enumerate(test_ids)}
    present = [image for image in images if image["Id"] in row_of]
    if len(present) < len(images):
        note(f"note: {len(images) - len(present)} of the {len(images)} recorded overrides name test Ids not in this "
             "test set: left out")
    if not present:
        return predicted
    overrides = Overrides(np.array([row_of[image["Id"]] for image in present], dtype=np.int64),
                          [tuple(vocabulary.index[code] for code in image["labels"]) for image in present],
                          [image["from"] for image in present], [image["distance"] for image in present])
    return apply_overrides(predicted, overrides)


def main() -> None:
    find_duplicates(config_from_args(cli_parser(__doc__.splitlines()[0]).parse_args()))


if __name__ == "__main__":
    run_cli(main)
