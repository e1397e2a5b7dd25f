"""The data layer: the only module that knows dataset formats (``data.format``).

hpa (Human Protein Atlas 2018) under ``data.dir``::

    train.csv               Id,Target          (Target: space-separated class indices, may be empty)
    sample_submission.csv   Id,Predicted
    train/<Id>_<red|green|blue|yellow>.png     8-bit grayscale, one file per channel (RGBY order)
    test/<Id>_<channel>.png

openimages (Open Images image-level labels; Google Inclusive Images)::

    train_human_labels.csv         ImageID,Source,LabelName,Confidence   (positives: Confidence 1)
    class-descriptions.csv         label_code,description                (data.class_descriptions, optional)
    classes-trainable.csv          label_code                            (data.trainable_labels, optional)
    train/<ImageID>.jpg, test/<ImageID>.jpg                              RGB, any size
    stage_1_sample_submission.csv  image_id,labels                       (labels: space-separated label ids)

csv (the general case): ``<data.id_column>,<data.label_column>`` with space-separated label names (and
optionally ``data.path_column``, a file name under the image folder; default ``<id><data.image_ext>``); one
image file per sample with any channel count; the sample submission has the same two columns.

Every format becomes one table with a row per image: ``Id``, ``labels`` (a tuple of class indices: sparse
by construction), ``files`` (the image files of the sample), ``source``. Label codes become class indices
through a :class:`Vocabulary` built from the training data (hpa: the numbered classes).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path

# albumentations asks PyPI for a newer version on import: never at run time (offline machines, Kaggle).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset, Sampler

from src.augment import to_chw
from src.config import Config, DataConfig, PipelineError, override

CHANNELS = ("red", "green", "blue", "yellow")
_ID_RE = re.compile(r"^[A-Za-z0-9_\-.]+$")

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV's own threads would oversubscribe the cores


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


def channel_paths(image_dir: str | Path, sample_id: str, ext: str = "png") -> list[Path]:
    """The four per-channel image paths of one sample, in RGBY order."""
    return [Path(image_dir) / f"{sample_id}_{channel}.{ext}" for channel in CHANNELS]


def id_problem(sample_id: str) -> str | None:
    """Why an Id is unsafe to turn into a file name, or None if it is fine."""
    if not sample_id:
        return "empty Id"
    if "/" in sample_id or "\\" in sample_id or ".." in sample_id:
        return f"Id {sample_id!r} contains a path separator or '..'"
    if not _ID_RE.match(sample_id):
        return f"Id {sample_id!r} has characters other than letters, digits, '_', '-', '.'"
    return None


def parse_target(raw: object, num_classes: int) -> tuple[tuple[int, ...], str | None]:
    """Parse a Target cell ("0 5 27", "" or NaN) into sorted class indices, or say what is wrong."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return (), None
    labels = []
    for token in str(raw).split():
        if not re.fullmatch(r"\d+", token):
            return (), f"label {token!r} is not a non-negative integer"
        label = int(token)
        if label >= num_classes:
            return (), f"label {label} is outside [0, {num_classes})"
        labels.append(label)
    return tuple(sorted(set(labels))), None


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


def test_source(cfg: DataConfig) -> Source:
    root = Path(cfg.dir)
    return Source("test", root / cfg.sample_submission, root / cfg.test_images)


def label_separator(cfg: DataConfig) -> str:
    """What separates the labels of one image in label csvs and the submission (csv: data.label_separator)."""
    return cfg.label_separator if cfg.format == "csv" else " "


def submission_columns(cfg: DataConfig) -> tuple[str, str]:
    """The (id, labels) columns of the sample submission and of the submission written by predict."""
    return {"hpa": ("Id", "Predicted"), "openimages": ("image_id", "labels")}.get(
        cfg.format, (cfg.id_column, cfg.label_column))


def _frame(rows: list[tuple], csv_path: Path, ext: str = "png") -> pd.DataFrame:
    """The sample table: Id, raw label codes, image files (one per channel or one per sample), source."""
    frame = pd.DataFrame(rows, columns=["Id", "codes", "files", "image_dir"])
    frame["source"] = str(csv_path)
    frame["ext"] = ext
    return frame


def _read_csv(csv_path: Path, columns: tuple[str, ...], header_only: bool = False,
              ) -> tuple[pd.DataFrame | None, list[Problem]]:
    """A csv as strings (``header_only``: just its header and first row), or the one problem that makes it
    unusable (missing, empty, unreadable, columns)."""
    if not csv_path.is_file():
        return None, [Problem(str(csv_path), "file not found")]
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, nrows=1 if header_only else None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        why = "empty file (0 bytes)" if isinstance(exc, pd.errors.EmptyDataError) else f"not a readable csv ({exc})"
        return None, [Problem(str(csv_path), why)]
    missing = [col for col in columns if col not in raw.columns]
    if missing:
        return None, [Problem(str(csv_path), f"missing column(s) {missing}; has {list(raw.columns)}")]
    if raw.empty:
        return None, [Problem(str(csv_path), "no rows: the file holds only a header")]
    return raw, []


def _file_problem(name: str) -> str | None:
    """Why an image path from a csv cell is unsafe (absolute, or leaving the image folder), or None."""
    if not name:
        return "empty image path"
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return f"image path {name!r} is absolute or contains '..'"
    return None


def _wide_rows(raw: pd.DataFrame, csv_path: Path, id_column: str, label_column: str | None,
               parse: Callable[[str], tuple[tuple[str, ...], str | None]],
               files_of: Callable[[str, int], tuple[str, ...]], path_column: str | None = None,
               check_id: Callable[[str], str | None] = id_problem) -> tuple[list[tuple], list[Problem]]:
    """Rows of a one-row-per-image csv (hpa, csv): Ids checked (``check_id``), duplicates refused, labels
    parsed."""
    problems: list[Problem] = []
    rows = []
    seen: dict[str, int] = {}
    labels = raw[label_column] if label_column else [""] * len(raw)
    paths = raw[path_column] if path_column else [None] * len(raw)
    for row_number, (sample_id, cell, name) in enumerate(zip(raw[id_column], labels, paths), start=2):
        where = f"{csv_path} row {row_number}"
        sample_id = sample_id.strip()
        why = check_id(sample_id) or (_file_problem(name.strip()) if name is not None else None)
        if why:
            problems.append(Problem(where, why))
            continue
        if sample_id in seen:
            problems.append(Problem(where, f"duplicate Id {sample_id!r} (first on row {seen[sample_id]})"))
            continue
        seen[sample_id] = row_number
        codes, why = parse(cell)
        if why:
            problems.append(Problem(where, why))
            continue
        rows.append((sample_id, codes, files_of(sample_id, name), ""))
    return rows, problems


def _openimages_rows(csv_path: Path, image_dir: Path, image_ext: str = ".jpg",
                     ) -> tuple[pd.DataFrame, list[Problem]]:
    """Images of an Open Images image-level label csv (one row per image and label; Confidence 1 marks a
    positive, 0 a verified negative), in order of first appearance, with their positive label ids.

    Built for Inclusive Images' 1.7 M images and ~15 M rows: the columns are read as categoricals and every
    check runs once per distinct value (Ids, label ids, confidences), every row only as integer codes."""
    raw = pd.read_csv(csv_path, usecols=["ImageID", "LabelName", "Confidence"], dtype="category")
    ids, codes, confidence = raw["ImageID"], raw["LabelName"], raw["Confidence"]
    id_ok = ids.cat.categories.str.fullmatch(_ID_RE.pattern)
    code_ok = ~codes.cat.categories.str.contains(r"\s|^$", regex=True)
    conf_value = pd.to_numeric(confidence.cat.categories, errors="coerce")
    conf_ok, conf_one = np.isin(conf_value, [0, 1]), conf_value == 1

    def per_row(column: pd.Series, ok: np.ndarray) -> np.ndarray:
        index = column.cat.codes.to_numpy()
        return np.append(ok, False)[index]  # code -1 (an empty cell) is not ok

    good_id, good_code, good_conf = per_row(ids, id_ok), per_row(codes, code_ok), per_row(confidence, conf_ok)
    good = good_id & good_code & good_conf
    problems = []
    for row in np.flatnonzero(~good):
        value = {c: "" if pd.isna(raw[c].iat[row]) else str(raw[c].iat[row]) for c in raw.columns}
        why = (id_problem(value["ImageID"]) or f"Id {value['ImageID']!r} is not usable") if not good_id[row] else (
            f"label {value['LabelName']!r} is empty or holds spaces" if not good_code[row] else
            f"Confidence {value['Confidence']!r} is not 0 or 1")
        problems.append(Problem(f"{csv_path} row {row + 2}", why))
    image_codes = ids.cat.codes.to_numpy()[good]
    images, first = np.unique(image_codes, return_index=True)
    images = images[np.argsort(first)]  # order of first appearance in the file
    position = np.full(len(ids.cat.categories), -1, dtype=np.int64)
    position[images] = np.arange(len(images))
    positive = good & per_row(confidence, conf_one)
    pairs = np.unique(position[ids.cat.codes.to_numpy()[positive]] * (len(codes.cat.categories) + 1)
                      + codes.cat.codes.to_numpy()[positive])  # sorted by image, one per (image, label)
    image_of, code_of = np.divmod(pairs, len(codes.cat.categories) + 1)
    names = codes.cat.categories.to_numpy(dtype=object)[code_of].tolist()  # list slices: 5x numpy's here
    bounds = np.searchsorted(image_of, np.arange(len(images) + 1)).tolist()
    label_codes = [tuple(names[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    id_names = ids.cat.categories.to_numpy(dtype=object)[images]
    prefix = f"{image_dir}{os.sep}"
    frame = pd.DataFrame({"Id": id_names, "codes": label_codes,
                          "files": [(f"{prefix}{i}{image_ext}",) for i in id_names], "image_dir": ""})
    frame["source"], frame["ext"] = str(csv_path), "jpg"
    return frame, problems


def read_source(cfg: DataConfig, source: Source, split: str) -> LabelTable:
    """The samples of one source (``split``: train or test) with their raw label codes (column ``codes``);
    rows with problems are reported and left out."""
    test = split == "test"
    if cfg.format == "openimages" and not test:
        raw, problems = _read_csv(source.csv, ("ImageID", "LabelName", "Confidence"), header_only=True)
        if raw is None:
            return LabelTable(_frame([], source.csv), problems)
        frame, problems = _openimages_rows(source.csv, source.images, cfg.image_ext)
        if frame.empty:
            problems.append(Problem(str(source.csv), "no usable rows"))
        return LabelTable(frame, problems)
    id_column, label_column = submission_columns(cfg) if test else (
        ("Id", "Target") if cfg.format == "hpa" else (cfg.id_column, cfg.label_column))
    path_column = cfg.path_column if cfg.format == "csv" else None
    # A sample submission holds the id and label columns only: there the path column is used when present.
    required = (id_column, label_column) + ((path_column,) if path_column and not test else ())
    raw, problems = _read_csv(source.csv, required)
    if raw is None:
        return LabelTable(_frame([], source.csv), problems)
    if path_column and path_column not in raw.columns:
        path_column = None
    # With a path column the Id is only a key (it may hold '/' or spaces, e.g. when it is the file name itself).
    check_id = (lambda i: None if i else "empty Id") if path_column else id_problem
    if cfg.format == "hpa":
        def parse(cell: str) -> tuple[tuple[str, ...], str | None]:
            labels, why = parse_target(cell, cfg.num_classes)
            return tuple(map(str, labels)), why

        def files_of(sample_id: str, _: str | None) -> tuple[str, ...]:
            return tuple(map(str, channel_paths(source.images, sample_id, source.ext)))
    else:
        def parse(cell: str) -> tuple[tuple[str, ...], str | None]:
            return tuple(dict.fromkeys(t.strip() for t in cell.split(cfg.label_separator) if t.strip())), None

        def files_of(sample_id: str, name: str | None) -> tuple[str, ...]:
            if name is not None:
                return (str(source.images / name.strip()),)
            return (str(source.images / f"{sample_id}{cfg.image_ext}"),)
    rows, problems = _wide_rows(raw, source.csv, id_column, None if test else label_column,
                                (lambda _: ((), None)) if test else parse, files_of, path_column, check_id)
    frame = _frame(rows, source.csv, source.ext)
    if cfg.format == "hpa":
        frame["image_dir"] = str(source.images)
    return LabelTable(frame, problems)


def _headerless_table(path: Path, headers: set[str]) -> pd.DataFrame:
    """The first two columns of a small csv whose header row is optional (Open Images ships both kinds): a
    first row whose first cell is one of ``headers`` is dropped."""
    values = pd.read_csv(path, header=None, dtype=str, keep_default_na=False).iloc[:, :2]
    if len(values) and values.iat[0, 0].strip() in headers:
        values = values.iloc[1:]
    return values


def build_vocabulary(cfg: DataConfig, rows: Iterable[tuple[str, ...]]) -> tuple[Vocabulary, list[Problem]]:
    """The vocabulary of a training table's raw label codes: hpa, ``data.num_classes`` numbered classes;
    otherwise the trainable labels (``data.trainable_labels``, or every positive label) from most to least
    frequent, named by ``data.class_descriptions`` when given."""
    if cfg.format == "hpa":
        return Vocabulary.numbered(cfg.num_classes), []
    counts = Counter(chain.from_iterable(rows))
    problems = []
    codes = sorted(counts, key=lambda code: (-counts[code], code))
    if cfg.trainable_labels:
        path = Path(cfg.dir) / cfg.trainable_labels
        if not path.is_file():
            return Vocabulary((), ()), [Problem(str(path), "file not found (data.trainable_labels)")]
        trainable = list(dict.fromkeys(v.strip() for v in _headerless_table(path, LABEL_HEADERS).iloc[:, 0]))
        codes = sorted(trainable, key=lambda code: (-counts.get(code, 0), code))
    names = dict(zip(codes, codes))
    if cfg.class_descriptions:
        path = Path(cfg.dir) / cfg.class_descriptions
        if not path.is_file():
            problems.append(Problem(str(path), "file not found (data.class_descriptions)"))
        else:
            table = _headerless_table(path, LABEL_HEADERS)
            described = dict(zip(table.iloc[:, 0].str.strip(), table.iloc[:, -1].str.strip()))
            names.update({code: described[code] for code in codes if described.get(code)})
    if not codes:
        problems.append(Problem(f"{cfg.dir}/{cfg.train_csv}", "no labels: not one positive label in the training data"))
    return Vocabulary(tuple(codes), tuple(names[c] for c in codes)), problems


LABEL_HEADERS = {"label_code", "LabelName", "label", "labels", "code", "label_id"}


def read_train_labels(cfg: DataConfig, vocabulary: Vocabulary | None = None) -> LabelTable:
    """All training sources in one table, labels as class indices into ``vocabulary`` (built from the data
    when None); an Id present in two sources is a problem, a label outside the vocabulary a note."""
    tables = [read_source(cfg, src, "train") for src in train_sources(cfg)]
    frame = pd.concat([t.frame for t in tables], ignore_index=True)
    problems = [p for t in tables for p in t.problems]
    dup = frame["Id"].duplicated(keep="first")
    for sample_id, source in zip(frame.loc[dup, "Id"], frame.loc[dup, "source"]):
        problems.append(Problem(source, f"duplicate Id {sample_id!r} (also in an earlier training source)"))
    frame = frame[~dup].reset_index(drop=True)
    notes = []
    if vocabulary is None:
        vocabulary, more = build_vocabulary(cfg, frame["codes"])
        problems += more
        why = "not in data.trainable_labels"
    else:
        why = "not in the run's label vocabulary"
    frame["labels"], unknown = vocabulary.encode(frame["codes"])
    if unknown:
        shown = ", ".join(f"{code} ({n})" for code, n in unknown.most_common(5))
        notes.append(f"{sum(unknown.values())} positive label(s) of {len(unknown)} label id(s) are {why} and were "
                     f"left out: {shown}{' ...' if len(unknown) > 5 else ''}")
    frame = frame.drop(columns="codes")[["Id", "labels", "files", "image_dir", "source", "ext"]]
    return LabelTable(frame, problems, notes, vocabulary)


def read_test_ids(cfg: DataConfig) -> LabelTable:
    """The test Ids in sample_submission order."""
    table = read_source(cfg, test_source(cfg), "test")
    table.frame = table.frame.drop(columns="codes").assign(labels=[()] * len(table.frame))
    return table


def _raise_on(table: LabelTable, what: str) -> pd.DataFrame:
    if table.problems:
        shown = "\n  ".join(str(p) for p in table.problems[:20])
        more = f"\n  ... and {len(table.problems) - 20} more" if len(table.problems) > 20 else ""
        raise DataError(f"{what} has {len(table.problems)} problem(s):\n  {shown}{more}\n"
                        "Run `python -m src.validate` for a full report.")
    for note in table.notes:
        print(f"note: {note}", file=sys.stderr)
    return table.frame


def with_vocabulary(cfg: Config, vocabulary: Vocabulary) -> Config:
    """``cfg`` with ``data.num_classes`` set to the vocabulary's size (openimages and csv take it from the data)."""
    if cfg.data.num_classes == len(vocabulary):
        return cfg
    return override(cfg, **{"data.num_classes": len(vocabulary)})


def load_training_data(cfg: Config, vocabulary: Vocabulary | None = None) -> tuple[Config, pd.DataFrame, Vocabulary]:
    """The training table (raises DataError naming each bad row), its label vocabulary (``vocabulary``, or
    built from the data), and ``cfg`` with ``data.num_classes`` set to the vocabulary's size."""
    table = read_train_labels(cfg.data, vocabulary)
    frame = _raise_on(table, "training data")
    return with_vocabulary(cfg, table.vocabulary), frame, table.vocabulary


def load_train_table(cfg: DataConfig) -> pd.DataFrame:
    """Training samples of all sources; raises DataError naming each bad row."""
    return _raise_on(read_train_labels(cfg), "training data")


def load_test_table(cfg: DataConfig) -> pd.DataFrame:
    """Test samples in sample_submission order; raises DataError naming each bad row."""
    return _raise_on(read_test_ids(cfg), "sample submission")


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


def decode_plane(path: Path, encoded: np.ndarray | None = None) -> np.ndarray:
    """One channel as H x W uint8 (an RGB-encoded grey JPEG becomes grey), from the file or its bytes."""
    plane = (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if encoded is None
             else cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE))
    if plane is None:
        raise DataError(f"{path}: missing or unreadable image")
    return plane


def stack_planes(planes: list[np.ndarray], size: int | None) -> np.ndarray:
    """Four planes as H x W x 4 uint8, resized to ``size`` when given (the same resize everywhere, so the
    packed cache and the image files give identical arrays)."""
    return fit_size(np.stack(planes, axis=-1), size)


def decode_file(path: Path, channels: int | None = None, encoded: np.ndarray | None = None) -> np.ndarray:
    """A one-file image (openimages, csv) as H x W x C uint8 in RGB(A) order, from the file or its bytes.
    ``channels`` converts where it is lossless or conventional: grey -> 3 copies, RGBA -> RGB (alpha dropped)."""
    image = (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if encoded is None
             else cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED))
    if image is None:
        raise DataError(f"{path}: missing or unreadable image")
    if image.dtype != np.uint8:
        raise DataError(f"{path}: {image.dtype} pixels; the pipeline reads 8-bit images")
    if image.ndim == 2:
        image = image[..., None]
    elif image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    have = image.shape[2]
    if channels is None or have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    if have == 4 and channels == 3:
        return np.ascontiguousarray(image[..., :3])
    raise DataError(f"{path}: {have} channel(s), the model takes model.in_chans={channels}")


def fit_size(image: np.ndarray, size: int | None) -> np.ndarray:
    """``image`` resized to size x size (INTER_AREA: the same resize everywhere, so the packed cache and the
    image files give identical arrays), channel axis kept."""
    if size is None or image.shape[:2] == (size, size):
        return image
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return resized[..., None] if resized.ndim == 2 else resized


def read_image(files: Sequence[str | Path], size: int | None = None, channels: int | None = None) -> np.ndarray:
    """One sample as H x W x C uint8: per-channel files (HPA: four grey planes in RGBY order) stacked, or one
    image file with its own channels; resized to ``size`` when given."""
    if len(files) > 1:
        return stack_planes([decode_plane(Path(f)) for f in files], size)
    return fit_size(decode_file(Path(files[0]), channels), size)


def read_rgby(image_dir: str | Path, sample_id: str, size: int | None = None, ext: str = "png") -> np.ndarray:
    """Load one sample as H x W x 4 uint8 (RGBY), resized to ``size`` when given."""
    return stack_planes([decode_plane(path) for path in channel_paths(image_dir, sample_id, ext)], size)


def write_rgby(image_dir: str | Path, sample_id: str, image: np.ndarray) -> None:
    """Write an H x W x 4 uint8 array as four grayscale PNGs (the HPA layout)."""
    for path, plane in zip(channel_paths(image_dir, sample_id), np.moveaxis(image, -1, 0)):
        if not cv2.imwrite(str(path), np.ascontiguousarray(plane)):
            raise DataError(f"{path}: could not write image")


class PackedImages:
    """Rows of packed uint8 arrays (``src.pack``), one per source, for the rows of a table. The arrays are
    memory-mapped lazily in each process (a memmap must not be pickled into DataLoader workers)."""

    def __init__(self, arrays: dict[str, tuple[str, tuple[int, ...]]], rows: list[tuple[str, int]]):
        self.arrays = arrays  # source name -> (array file, shape)
        self.rows = rows  # per table row: (source name, row in that source's array)
        self._open: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"arrays": self.arrays, "rows": self.rows, "_open": {}}

    def __getitem__(self, index: int) -> np.ndarray:
        name, row = self.rows[index]
        if name not in self._open:
            path, shape = self.arrays[name]
            self._open[name] = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        return np.array(self._open[name][row])


class RGBYDataset(Dataset):
    """Samples of a table as (uint8 C x H x W tensor, multi-hot float target).

    Items are addressed by ``(index, seed)`` pairs from :class:`EpochSampler` (or a plain index, for
    evaluation). The seed reseeds the augmentation pipeline for that one sample: albumentations keeps a
    private RNG that DataLoader workers do not reseed, so without this every worker and every epoch would
    repeat one augmentation sequence. Per-sample seeds also make a run independent of the worker count and
    let a resumed run replay exactly. With ``with_seeds`` (the policy runs on the training device, see
    ``src.augment.BatchAugment``) items are (image, target, seed) instead, the seed -1 when there is none.
    """

    def __init__(self, table: pd.DataFrame, num_classes: int, image_size: int,
                 augment: A.Compose | None = None, packed: PackedImages | None = None, channels: int | None = None,
                 with_seeds: bool = False):
        self.ids = table["Id"].tolist()
        exts = table["ext"] if "ext" in table else ["png"] * len(table)
        self.files = table["files"].tolist() if "files" in table else [
            channel_paths(d, i, e) for d, i, e in zip(table["image_dir"], self.ids, exts)]
        self.channels = channels  # one-file images are converted to this many channels (model.in_chans)
        if packed is not None and channels is not None:
            for path, shape in packed.arrays.values():
                if shape[-1] != channels:
                    raise DataError(f"the packed cache {path} holds {shape[-1]}-channel images, the model takes "
                                    f"model.in_chans={channels}: run `python -m src.pack` again (or "
                                    "data.cache_dir=null)")
        self.packed = packed  # the packed cache's rows of this table, when there is a fresh cache
        self.labels = table["labels"].tolist() if "labels" in table else [()] * len(table)
        self.num_classes = num_classes
        self.image_size = image_size
        self.augment = augment
        self.with_seeds = with_seeds

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        if self.packed is not None:
            image = self.packed[index]
        else:
            image = read_image(self.files[index], self.image_size, self.channels)
        if self.augment is not None:
            if seed is not None:
                self.augment.set_random_seed(seed)
            image = self.augment(image=image)["image"]  # C x H x W: the policy's last step transposes
        else:
            image = to_chw(image)
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        target[list(self.labels[index])] = 1.0
        if self.with_seeds:
            return torch.from_numpy(image), target, -1 if seed is None else seed
        return torch.from_numpy(image), target


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding ``(index, augmentation_seed)`` pairs.

    Everything random about the data order and augmentations comes from one ``torch.Generator`` whose
    state at the start of the epoch is checkpointed: a run resumed mid-epoch regenerates the same
    permutation and seeds and skips the ``skip`` samples already trained on. ``rank``/``world_size``
    shard the permutation for distributed training (padded so every rank sees the same count).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_state = self.generator.get_state()
        self.skip = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size) - self.skip

    def start_epoch(self, state: torch.Tensor | None = None, skip: int = 0) -> None:
        """Begin an epoch (from a saved generator state when resuming), skipping ``skip`` samples."""
        if state is not None:
            self.generator.set_state(state)
        self.epoch_state = self.generator.get_state()
        order = torch.randperm(self.num_samples, generator=self.generator)
        seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=self.generator)
        per_rank = math.ceil(self.num_samples / self.world_size)
        padded = torch.cat([order, order[: per_rank * self.world_size - self.num_samples]])
        mine = padded[self.rank :: self.world_size]
        self._pairs = [(int(i), int(seeds[i])) for i in mine][skip:]
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._pairs)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, device: torch.device,
                sampler: EpochSampler | None = None, persistent: bool = False) -> DataLoader:
    """The DataLoader of every stage. With an :class:`EpochSampler` (training) only full batches are
    yielded (drop_last); without one (evaluation) every sample, in table order. Batches are pinned on CUDA
    (for non-blocking copies). ``persistent``: the workers outlive an iteration, for a loader iterated once
    per epoch (the sampler runs in the main process, so a new epoch's order and seeds, or a resume's skip,
    reach the same workers)."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=sampler is not None,
        num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
        # Its own generator: creating an iterator must not draw from the global torch RNG, or a run
        # resumed mid-epoch would see different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=persistent and num_workers > 0, prefetch_factor=4 if num_workers else None,
    )


def worker_init(worker_id: int) -> None:
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
