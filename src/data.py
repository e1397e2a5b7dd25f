"""The sample table every dataset format becomes, and what is built on it: the label :class:`Vocabulary`,
label matrices, the image sources of a config, and the data errors. Reading a layout is ``src.formats``;
image files are ``src.images``; the dataset and loader over a table are ``src.dataset``.

The table has a row per image: ``Id``, ``labels`` (a tuple of class indices: sparse by construction),
``files`` (the image files of the sample), ``image_dir``, ``source`` (its csv) and ``ext``. Label codes become
class indices through a :class:`Vocabulary` built from the training data (hpa: the numbered classes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from src.config import Config, DataConfig, PipelineError, override


class DataError(PipelineError):
    """The dataset on disk is not what the pipeline expects; the message names the file and row."""


@dataclass
class Problem:
    """One thing wrong with the dataset, located precisely enough to fix by hand."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class Vocabulary:
    """The labels of a dataset in class-index order: each label's code as the data writes it (hpa: "0".."27";
    openimages: an id such as "/m/0abc"; csv: the label name) and its display name. Built from the training
    data, saved with a run (``src.run_folder``) and used unchanged by prediction."""

    codes: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.codes)

    @cached_property
    def index(self) -> dict[str, int]:
        return {code: i for i, code in enumerate(self.codes)}

    @classmethod
    def numbered(cls, num_classes: int) -> Vocabulary:
        """The HPA vocabulary: classes are their own indices."""
        codes = tuple(str(i) for i in range(num_classes))
        return cls(codes, codes)

    def encode(self, rows: Iterable[tuple[str, ...]]) -> tuple[list[tuple[int, ...]], Counter]:
        """Sorted class indices per row, and how often each code outside the vocabulary was left out."""
        index, unknown, encoded = self.index, Counter(), []
        for codes in rows:
            known = []
            for code in codes:
                i = index.get(code)
                if i is None:
                    unknown[code] += 1
                else:
                    known.append(i)
            encoded.append(tuple(sorted(set(known))))
        return encoded, unknown

    def decode(self, row: Iterable[int], separator: str = " ") -> str:
        """Class indices -> the submission's label string (codes joined by ``separator``)."""
        return separator.join(self.codes[i] for i in row)


@dataclass
class LabelTable:
    """A parsed label csv: the good rows, every problem met on the way, notes on labels left out on purpose
    (not trainable, or not in a run's vocabulary), and the vocabulary the labels are indices into."""

    frame: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vocabulary: Vocabulary | None = None


@dataclass(frozen=True)
class Source:
    """One labelled image source: its csv, image folder and (HPA layout) per-channel file extension, and its
    name in the packed cache (``train``, ``extra<i>``, ``test``)."""

    name: str
    csv: Path
    images: Path
    ext: str = "png"


def train_sources(cfg: DataConfig) -> list[Source]:
    """The main training set and each extra source (in the same format)."""
    root = Path(cfg.dir)
    sources = [Source("train", root / cfg.train_csv, root / cfg.train_images)]
    sources += [Source(f"extra{i}", Path(extra.csv), Path(extra.images), extra.ext)
                for i, extra in enumerate(cfg.extra)]
    return sources


def train_only_rows(cfg: DataConfig, table: pd.DataFrame) -> np.ndarray:
    """Boolean per row of a training table: the row comes from an extra source with ``role: train_only``
    (trained on in every fold, never validated on). All False without such sources."""
    csvs = {str(Path(extra.csv)) for extra in cfg.extra if extra.role == "train_only"}
    return table["source"].isin(csvs).to_numpy() if csvs else np.zeros(len(table), dtype=bool)


def test_source(cfg: DataConfig) -> Source:
    root = Path(cfg.dir)
    return Source("test", root / cfg.sample_submission, root / cfg.test_images)


def with_vocabulary(cfg: Config, vocabulary: Vocabulary) -> Config:
    """``cfg`` with ``data.num_classes`` set to the vocabulary's size (openimages and csv take it from the data)."""
    if cfg.data.num_classes == len(vocabulary):
        return cfg
    return override(cfg, **{"data.num_classes": len(vocabulary)})


def label_matrix(labels: pd.Series | list, num_classes: int) -> np.ndarray:
    """Multi-hot uint8 matrix (n x num_classes) from per-sample label tuples."""
    matrix = np.zeros((len(labels), num_classes), dtype=np.uint8)
    for row, sample_labels in enumerate(labels):
        matrix[row, list(sample_labels)] = 1
    return matrix


def label_csr(labels: pd.Series | list, num_classes: int, dtype: np.dtype = np.uint8) -> sparse.csr_matrix:
    """Binary (uint8) n x num_classes CSR matrix from per-sample label tuples: ``label_matrix`` for many
    classes, where the dense matrix would not fit (1.7 M x 7 178 is 12 GB dense, ~80 MB here).

    Built from the concatenated indices in one C-speed pass (``np.fromiter``), not a Python loop per row,
    so 1.7 M rows take seconds. Repeated labels count once; a class outside ``0..num_classes-1`` raises
    DataError naming the row."""
    if hasattr(labels, "tolist"):  # pandas Series, numpy arrays: plain lists iterate faster
        labels = labels.tolist()
    n = len(labels)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, labels), dtype=np.int64, count=n), out=indptr[1:])
    indices = np.fromiter(chain.from_iterable(labels), dtype=np.int64, count=int(indptr[-1]))
    bad = (indices < 0) | (indices >= num_classes)
    if bad.any():
        row = int(np.searchsorted(indptr, np.flatnonzero(bad)[0], side="right")) - 1
        raise DataError(f"labels of row {row}: {tuple(labels[row])} has a class outside 0..{num_classes - 1}")
    index_dtype = np.int32 if max(len(indices), num_classes) < np.iinfo(np.int32).max else np.int64
    matrix = sparse.csr_matrix((np.ones(len(indices), dtype=dtype), indices.astype(index_dtype),
                                indptr.astype(index_dtype)), shape=(n, num_classes))
    matrix.sum_duplicates()  # sorts each row's classes and merges repeats ...
    matrix.data[:] = 1  # ... whose sum would otherwise be 2
    return matrix
