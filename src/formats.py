"""Dataset layouts (``data.format``): one object per format answers every question a stage asks of a layout,
and the stages ask it (``get_format(cfg.data)``) instead of testing the format's name.

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

csv (the general case): ``<data.id_column>,<data.label_column>`` with label names separated by
``data.label_separator`` (and optionally ``data.path_column``, a file name under the image folder; default
``<id><data.image_ext>``); one image file per sample with any channel count; the sample submission has the
same two columns.

Every format becomes the one sample table of ``src.data`` (a row per image: ``Id``, ``labels`` as class
indices, ``files``, ``source``); label codes become class indices through a :class:`~src.data.Vocabulary`
built from the training data (hpa: the numbered classes). What a format answers:

=====================  ==============================================================================
labels                 ``read_source`` (one source's rows, raw label codes), ``build_vocabulary``,
                       ``fixed_vocabulary``, ``submission_columns``, ``label_separator``
images                 ``planes`` and ``sample_files`` (which files make a sample), ``channels(cfg)``,
                       ``hash_file`` (the image whose perceptual hash finds duplicates, src.folds)
validation             ``inspect_file`` (one file, from its header) and ``uniform_size`` (src.validate)
demo                   ``write_demo_tables`` (the label files of a synthetic dataset), ``demo_id_chars``
=====================  ==============================================================================
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import Config, DataConfig, PipelineError
from src.data import (
    DataError,
    LabelTable,
    Problem,
    Source,
    Vocabulary,
    test_source,
    train_sources,
    with_vocabulary,
)
from src.images import CHANNELS, channel_paths, inspect_image
from src.progress import note

_ID_RE = re.compile(r"^[A-Za-z0-9_\-.]+$")
# What inspect_file answers: (width, height), or None and why the file cannot be used.
Inspection = tuple[tuple[int, int] | None, str | None]
LABEL_HEADERS = {"label_code", "LabelName", "label", "labels", "code", "label_id"}


# --- Reading label csvs (shared by the formats) --------------------------------------------------------------

def id_problem(sample_id: str) -> str | None:
    """Why an Id is unsafe to turn into a file name, or None if it is fine."""
    if not sample_id:
        return "empty Id"
    if "/" in sample_id or "\\" in sample_id or ".." in sample_id:
        return f"Id {sample_id!r} contains a path separator or '..'"
    if sample_id == ".":  # the folder itself, not a file in it
        return "Id '.' names the image folder itself"
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


def _headerless_table(path: Path, headers: set[str], key: str) -> tuple[pd.DataFrame | None, Problem | None]:
    """The first two columns of a small csv whose header row is optional (Open Images ships both kinds): a
    first row whose first cell is one of ``headers`` is dropped. When the file (named by the config ``key``)
    is missing, empty or unreadable: None and the problem, naming the file and the key."""
    if not path.is_file():
        return None, Problem(str(path), f"file not found ({key})")
    try:
        values = pd.read_csv(path, header=None, dtype=str, keep_default_na=False).iloc[:, :2]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        why = (("empty file (0 bytes)" if path.stat().st_size == 0 else "no rows (blank lines only)")
               if isinstance(exc, pd.errors.EmptyDataError) else f"not a readable csv ({exc})")
        return None, Problem(str(path), f"{why} ({key})")
    if len(values) and values.iat[0, 0].strip() in headers:
        values = values.iloc[1:]
    return values, None


@dataclass
class DemoLabels:
    """The labels of a synthetic dataset (``src.demo`` draws them) for a format to write in its own layout;
    the images are already written (``<id><image_ext>`` under train/ and test/, or the format's planes)."""

    train_ids: list[str]
    train_labels: list[Sequence[int]]  # label indices per image
    test_ids: list[str]
    test_labels: list[Sequence[int]]  # the hidden truth
    codes: Sequence[str] = ()  # each label's id (Open Images style), then ids that are described but unused
    names: Sequence[str] = ()  # each label's name (no spaces)
    descriptions: Sequence[str] = ()  # the display name of each code
    trainable: int = 0  # labels 0 .. trainable-1 are trainable (the rarest are not, as in Inclusive Images)
    # Human verifications (image id, source, label, confidence: 1 a positive, 0 a verified negative).
    verified: Sequence[tuple[str, str, int, int]] = ()
    image_ext: str = ".jpg"


# --- The formats ------------------------------------------------------------------------------------------

class DatasetFormat:
    """A dataset layout: one label csv row per image, one image file per sample with its own channels. The
    formats below change what differs from this."""

    name = ""
    # The channel planes a sample is stored as, one file each (hpa); empty: one file with its own channels.
    planes: tuple[str, ...] = ()
    # Whether validation holds every image of a source to one size (stacked planes must agree).
    uniform_size = False
    # The demo's image ids: this many random hex digits.
    demo_id_chars = 8

    # -- labels --
    def train_columns(self, cfg: DataConfig) -> tuple[str, str]:
        """The (id, labels) columns of a training csv."""
        return cfg.id_column, cfg.label_column

    def submission_columns(self, cfg: DataConfig) -> tuple[str, str]:
        """The (id, labels) columns of the sample submission and of the submission written by predict."""
        return cfg.id_column, cfg.label_column

    def label_separator(self, cfg: DataConfig) -> str:
        """What separates the labels of one image in label csvs and the submission."""
        return " "

    def path_column(self, cfg: DataConfig) -> str | None:
        """The csv column naming each sample's image file, when the layout has one."""
        return None

    def label_column_problems(self, cfg: DataConfig, cells: pd.Series, csv_path: Path) -> list[Problem]:
        """What makes a training csv's whole label column unreadable as configured (none here)."""
        return []

    def parse_labels(self, cfg: DataConfig, cell: str) -> tuple[tuple[str, ...], str | None]:
        """A label cell as label codes (in order, repeats dropped), or what is wrong with it."""
        separator = self.label_separator(cfg)
        return tuple(dict.fromkeys(t.strip() for t in cell.split(separator) if t.strip())), None

    def label_csv(self, cfg: DataConfig, table: pd.DataFrame, codes: Sequence[tuple[str, ...]], images: Path
                  ) -> pd.DataFrame:
        """A training csv in this layout for the samples of ``table`` (Id, files: a test table) with the label codes
        ``codes`` (one tuple per row), their images under ``images``: :meth:`read_source` reads it back as a
        source with that image folder (src.pseudo's pseudo-labels)."""
        id_column, label_column = self.train_columns(cfg)
        frame = pd.DataFrame({id_column: table["Id"].to_numpy(),
                              label_column: [self.label_separator(cfg).join(row) for row in codes]})
        path_column = self.path_column(cfg)
        if path_column:
            frame[path_column] = [Path(os.path.relpath(files[0], images)).as_posix() for files in table["files"]]
        return frame

    def read_source(self, cfg: DataConfig, source: Source, split: str) -> LabelTable:
        """The samples of one source (``split``: train or test) with their raw label codes (column ``codes``);
        rows with problems are reported and left out."""
        test = split == "test"
        id_column, label_column = self.submission_columns(cfg) if test else self.train_columns(cfg)
        path_column = self.path_column(cfg)
        # A sample submission holds the id and label columns only: there the path column is used when present.
        required = (id_column, label_column) + ((path_column,) if path_column and not test else ())
        raw, problems = _read_csv(source.csv, required)
        if raw is None:
            return LabelTable(_frame([], source.csv), problems)
        if path_column and path_column not in raw.columns:
            path_column = None
        problems = [] if test else self.label_column_problems(cfg, raw[label_column], source.csv)
        if problems:
            return LabelTable(_frame([], source.csv), problems)
        # With a path column the Id is only a key (it may hold '/' or spaces, e.g. when it is the file name itself).
        check_id = (lambda i: None if i else "empty Id") if path_column else id_problem
        parse = (lambda _: ((), None)) if test else partial(self.parse_labels, cfg)
        rows, problems = _wide_rows(raw, source.csv, id_column, None if test else label_column, parse,
                                    partial(self.sample_files, cfg, source), path_column, check_id)
        return LabelTable(_frame(rows, source.csv, source.ext), problems)

    def fixed_vocabulary(self, cfg: DataConfig) -> Vocabulary | None:
        """The label vocabulary the layout fixes whatever its data holds; None: the training data makes it."""
        return None

    def build_vocabulary(self, cfg: DataConfig, rows: Iterable[tuple[str, ...]]
                         ) -> tuple[Vocabulary, list[Problem]]:
        """The vocabulary of a training table's raw label codes: the trainable labels (``data.trainable_labels``,
        or every positive label) from most to least frequent, named by ``data.class_descriptions`` when given."""
        rows = list(rows)
        counts = Counter(chain.from_iterable(rows))
        problems = []
        codes = sorted(counts, key=lambda code: (-counts[code], code))
        if cfg.trainable_labels:
            path = Path(cfg.dir) / cfg.trainable_labels
            table, problem = _headerless_table(path, LABEL_HEADERS, "data.trainable_labels")
            if problem:
                return Vocabulary((), ()), [problem]
            trainable = list(dict.fromkeys(code for code in table.iloc[:, 0].str.strip() if code))
            if not trainable:
                return Vocabulary((), ()), [Problem(str(path), "no labels: the file holds only a header "
                                                               "(data.trainable_labels)")]
            codes = sorted(trainable, key=lambda code: (-counts.get(code, 0), code))
        names = dict(zip(codes, codes))
        if cfg.class_descriptions:
            table, problem = _headerless_table(Path(cfg.dir) / cfg.class_descriptions, LABEL_HEADERS,
                                               "data.class_descriptions")
            if problem:
                problems.append(problem)
            else:
                described = dict(zip(table.iloc[:, 0].str.strip(), table.iloc[:, -1].str.strip()))
                names.update({code: described[code] for code in codes if described.get(code)})
        if not codes and rows:  # (no rows at all: the readers said why)
            problems.append(Problem(f"{cfg.dir}/{cfg.train_csv}",
                                    "no labels: not one positive label in the training data"))
        return Vocabulary(tuple(codes), tuple(names[c] for c in codes)), problems

    # -- images --
    def sample_files(self, cfg: DataConfig, source: Source, sample_id: str, name: str | None = None
                     ) -> tuple[str, ...]:
        """The image files of one sample: ``name`` (a path column's cell) or ``<id><data.image_ext>``."""
        if name is not None:
            return (str(source.images / name.strip()),)
        return (str(source.images / f"{sample_id}{cfg.image_ext}"),)

    def channels(self, cfg: Config) -> int:
        """The channels of a sample as the model sees it: one-file images are converted to model.in_chans."""
        return cfg.model.in_chans

    def hash_file(self, files: Sequence[str]) -> str:
        """The image of a sample whose perceptual hash finds near-duplicates: a one-file image itself."""
        return files[0]

    # -- validation --
    def inspect_file(self, path: Path, ext: str, deep: bool, channels: int) -> Inspection:
        """(width, height) of one image file, or why it cannot be used: a PNG or JPEG (by its name) that
        converts to ``channels`` channels."""
        return inspect_image(path, deep, path.suffix.lstrip("."), channels)

    # -- demo --
    def write_demo_tables(self, folder: Path, demo: DemoLabels) -> None:
        """Write a synthetic dataset's label files (training labels, sample submission, hidden test truth)."""
        raise NotImplementedError(f"data.format={self.name} has no demo")


class HpaFormat(DatasetFormat):
    """Human Protein Atlas 2018: ``Id,Target`` with class indices, four grey PNGs per sample (RGBY)."""

    name = "hpa"
    planes = CHANNELS
    uniform_size = True

    def train_columns(self, cfg: DataConfig) -> tuple[str, str]:
        return "Id", "Target"

    def submission_columns(self, cfg: DataConfig) -> tuple[str, str]:
        return "Id", "Predicted"

    def parse_labels(self, cfg: DataConfig, cell: str) -> tuple[tuple[str, ...], str | None]:
        labels, why = parse_target(cell, cfg.num_classes)
        return tuple(map(str, labels)), why

    def read_source(self, cfg: DataConfig, source: Source, split: str) -> LabelTable:
        table = super().read_source(cfg, source, split)
        table.frame["image_dir"] = str(source.images)
        return table

    def fixed_vocabulary(self, cfg: DataConfig) -> Vocabulary:
        """The ``data.num_classes`` numbered classes."""
        return Vocabulary.numbered(cfg.num_classes)

    def build_vocabulary(self, cfg: DataConfig, rows: Iterable[tuple[str, ...]]
                         ) -> tuple[Vocabulary, list[Problem]]:
        """The ``data.num_classes`` numbered classes."""
        return self.fixed_vocabulary(cfg), []

    def sample_files(self, cfg: DataConfig, source: Source, sample_id: str, name: str | None = None
                     ) -> tuple[str, ...]:
        """The four channel planes ``<Id>_<channel>.<ext>``, in RGBY order."""
        return tuple(map(str, channel_paths(source.images, sample_id, source.ext)))

    def channels(self, cfg: Config) -> int:
        return len(self.planes)

    def hash_file(self, files: Sequence[str]) -> str:
        """The green (protein) plane: the other channels are cell landmarks that many images share."""
        return files[self.planes.index("green")]

    def inspect_file(self, path: Path, ext: str, deep: bool, channels: int) -> Inspection:
        """A channel plane: an 8-bit grey PNG (or an RGB-encoded grey JPEG in an extra source)."""
        return inspect_image(path, deep, ext)

    def write_demo_tables(self, folder: Path, demo: DemoLabels) -> None:
        """``train.csv``, ``test_solution.csv`` (the hidden truth) and ``sample_submission.csv``."""
        def rows(ids: list[str], labels: list[Sequence[int]]) -> list[tuple[str, str]]:
            return [(sample_id, " ".join(map(str, sample_labels))) for sample_id, sample_labels in zip(ids, labels)]

        pd.DataFrame(rows(demo.train_ids, demo.train_labels), columns=["Id", "Target"]).to_csv(
            folder / "train.csv", index=False)
        pd.DataFrame(rows(demo.test_ids, demo.test_labels), columns=["Id", "Target"]).to_csv(
            folder / "test_solution.csv", index=False)
        pd.DataFrame({"Id": demo.test_ids, "Predicted": "0"}).to_csv(folder / "sample_submission.csv", index=False)


class OpenImagesFormat(DatasetFormat):
    """Open Images image-level labels (Inclusive Images): one row per image and label, RGB JPEGs."""

    name = "openimages"
    demo_id_chars = 16  # Open Images ImageIDs: 16 hex digits

    def train_columns(self, cfg: DataConfig) -> tuple[str, str]:
        return "ImageID", "LabelName"

    def submission_columns(self, cfg: DataConfig) -> tuple[str, str]:
        return "image_id", "labels"

    def read_source(self, cfg: DataConfig, source: Source, split: str) -> LabelTable:
        """Training labels from the image-level label csv; the sample submission as one row per image."""
        if split == "test":
            return super().read_source(cfg, source, split)
        raw, problems = _read_csv(source.csv, ("ImageID", "LabelName", "Confidence"), header_only=True)
        if raw is None:
            return LabelTable(_frame([], source.csv), problems)
        frame, problems = _openimages_rows(source.csv, source.images, cfg.image_ext)
        if frame.empty:
            problems.append(Problem(str(source.csv), "no usable rows"))
        return LabelTable(frame, problems)

    def label_csv(self, cfg: DataConfig, table: pd.DataFrame, codes: Sequence[tuple[str, ...]], images: Path
                  ) -> pd.DataFrame:
        """One row per image and positive label (Confidence 1), Source ``pseudo``; images ``<ImageID><image_ext>``."""
        rows = [(sample_id, "pseudo", code, 1) for sample_id, row in zip(table["Id"], codes) for code in row]
        return pd.DataFrame(rows, columns=["ImageID", "Source", "LabelName", "Confidence"])

    def write_demo_tables(self, folder: Path, demo: DemoLabels) -> None:
        """``train_human_labels.csv`` (positives and verified negatives), ``class-descriptions.csv`` (also
        codes no image uses), ``classes-trainable.csv``, ``test_labels.csv`` (the hidden truth: trainable labels
        only, as Inclusive Images scored) and ``stage_1_sample_submission.csv``."""
        codes = demo.codes
        rows = [(image_id, source, codes[label], confidence) for image_id, source, label, confidence in demo.verified]
        table = pd.DataFrame(rows, columns=["ImageID", "Source", "LabelName", "Confidence"])
        table.sort_values(["ImageID", "LabelName"], kind="stable").to_csv(
            folder / "train_human_labels.csv", index=False)
        pd.DataFrame({"label_code": codes, "description": demo.descriptions}).sort_values("label_code").to_csv(
            folder / "class-descriptions.csv", index=False)
        trainable = set(range(demo.trainable))
        pd.DataFrame({"label_code": sorted(codes[label] for label in trainable)}).to_csv(
            folder / "classes-trainable.csv", index=False)
        truth = [" ".join(codes[label] for label in labels if label in trainable) for labels in demo.test_labels]
        pd.DataFrame({"image_id": demo.test_ids, "labels": truth}).to_csv(folder / "test_labels.csv", index=False)
        pd.DataFrame({"image_id": demo.test_ids, "labels": codes[0]}).to_csv(
            folder / "stage_1_sample_submission.csv", index=False)


class CsvFormat(DatasetFormat):
    """The general case: an id and a label-names column, one image file per row (``data.path_column``)."""

    name = "csv"

    def label_separator(self, cfg: DataConfig) -> str:
        return cfg.label_separator

    def label_column_problems(self, cfg: DataConfig, cells: pd.Series, csv_path: Path) -> list[Problem]:
        """A ``data.label_separator`` found in no label cell while spaces are: the names are most likely
        space-separated, and each combination would silently become one "class" with spaces in its name."""
        separator = cfg.label_separator
        if separator.isspace() or cells.str.contains(separator, regex=False).any():
            return []
        spaced = np.flatnonzero(cells.str.strip().str.contains(" ", regex=False).to_numpy())
        if not len(spaced):
            return []
        example = f"row {spaced[0] + 2}: {cells.iloc[spaced[0]]!r}"
        return [Problem(str(csv_path), f"data.label_separator={separator!r} occurs in no label of column "
                                       f"{cfg.label_column!r}, but spaces do ({example}): set data.label_separator "
                                       "to what separates the labels (' ' for space-separated names)")]

    def path_column(self, cfg: DataConfig) -> str | None:
        return cfg.path_column

    def write_demo_tables(self, folder: Path, demo: DemoLabels) -> None:
        """``train.csv``, ``test_labels.csv`` (the hidden truth) and ``sample_submission.csv``, as ``image``
        (the file name under train/ or test/) and ``tags`` (label names separated by spaces)."""
        def files(ids: list[str]) -> list[str]:
            return [f"{image_id}{demo.image_ext}" for image_id in ids]

        for csv, ids, labels in (("train.csv", demo.train_ids, demo.train_labels),
                                 ("test_labels.csv", demo.test_ids, demo.test_labels)):
            pd.DataFrame({"image": files(ids),
                          "tags": [" ".join(demo.names[label] for label in sample) for sample in labels]}).to_csv(
                folder / csv, index=False)
        pd.DataFrame({"image": files(demo.test_ids), "tags": demo.names[0]}).to_csv(
            folder / "sample_submission.csv", index=False)


FORMATS: dict[str, DatasetFormat] = {fmt.name: fmt for fmt in (HpaFormat(), OpenImagesFormat(), CsvFormat())}


def get_format(cfg: DataConfig | str) -> DatasetFormat:
    """The format object of ``data.format`` (or of a format's name)."""
    name = cfg if isinstance(cfg, str) else cfg.format
    if name not in FORMATS:
        raise PipelineError(f"unknown data.format {name!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[name]


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
    frame["source"], frame["ext"] = str(csv_path), image_ext.lstrip(".")
    return frame, problems


# --- Reading a dataset through its format --------------------------------------------------------------------

def label_separator(cfg: DataConfig) -> str:
    """What separates the labels of one image in label csvs and the submission (csv: data.label_separator)."""
    return get_format(cfg).label_separator(cfg)


def submission_columns(cfg: DataConfig) -> tuple[str, str]:
    """The (id, labels) columns of the sample submission and of the submission written by predict."""
    return get_format(cfg).submission_columns(cfg)


def read_train_labels(cfg: DataConfig, vocabulary: Vocabulary | None = None) -> LabelTable:
    """All training sources in one table, labels as class indices into ``vocabulary`` (built from the data
    when None); an Id present in two sources is a problem, a label outside the vocabulary a note."""
    fmt = get_format(cfg)
    tables = [fmt.read_source(cfg, src, "train") for src in train_sources(cfg)]
    frame = pd.concat([t.frame for t in tables], ignore_index=True)
    problems = [p for t in tables for p in t.problems]
    dup = frame["Id"].duplicated(keep="first")
    for sample_id, source in zip(frame.loc[dup, "Id"], frame.loc[dup, "source"]):
        problems.append(Problem(source, f"duplicate Id {sample_id!r} (also in an earlier training source)"))
    frame = frame[~dup].reset_index(drop=True)
    notes = []
    if vocabulary is None:
        vocabulary, more = fmt.build_vocabulary(cfg, frame["codes"])
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
    table = get_format(cfg).read_source(cfg, test_source(cfg), "test")
    table.frame = table.frame.drop(columns="codes").assign(labels=[()] * len(table.frame))
    return table


def _raise_on(table: LabelTable, what: str) -> pd.DataFrame:
    if len(table.problems) == 1:
        raise DataError(f"{what}: {table.problems[0]}. Run `python -m src.validate` for a full report.")
    if table.problems:
        shown = "\n  ".join(str(p) for p in table.problems[:20])
        more = f"\n  ... and {len(table.problems) - 20} more" if len(table.problems) > 20 else ""
        raise DataError(f"{what} has {len(table.problems)} problem(s):\n  {shown}{more}\n"
                        "Run `python -m src.validate` for a full report.")
    for text in table.notes:
        note(f"note: {text}")
    return table.frame


def load_training_data(cfg: Config, vocabulary: Vocabulary | None = None) -> tuple[Config, pd.DataFrame, Vocabulary]:
    """The training table (raises DataError naming each bad row), its label vocabulary (``vocabulary``, or
    built from the data), and ``cfg`` with ``data.num_classes`` set to the vocabulary's size."""
    table = read_train_labels(cfg.data, vocabulary)
    frame = _raise_on(table, "training data")
    return with_vocabulary(cfg, table.vocabulary), frame, table.vocabulary


def load_train_table(cfg: DataConfig) -> pd.DataFrame:
    """Training samples of all sources; raises DataError naming each bad row."""
    return _raise_on(read_train_labels(cfg), "training data")


def load_holdout_table(cfg: DataConfig, vocabulary: Vocabulary, train_table: pd.DataFrame | None = None
                       ) -> pd.DataFrame | None:
    """The labelled test-domain samples of ``data.holdout`` (read like a training source, labels as class indices
    into ``vocabulary``), or None without one. An Id also in ``train_table`` is refused: the holdout never trains."""
    if cfg.holdout is None:
        return None
    source = Source("holdout", Path(cfg.holdout.csv), Path(cfg.holdout.images), cfg.holdout.ext)
    table = get_format(cfg).read_source(cfg, source, "train")
    table.frame["labels"], unknown = vocabulary.encode(table.frame["codes"])
    if unknown:
        table.notes.append(f"data.holdout: {sum(unknown.values())} positive label(s) not in the run's label "
                           "vocabulary were left out")
    frame = _raise_on(table, f"data.holdout ({source.csv})").drop(columns="codes")
    if train_table is not None:
        shared = frame["Id"].isin(train_table["Id"])
        if shared.any():
            first = frame["Id"][shared].iloc[0]
            raise DataError(f"{source.csv}: Id {first!r} is also a training Id ({int(shared.sum())} such rows); the "
                            "holdout must never train")
    if frame.empty:
        raise DataError(f"{source.csv}: data.holdout holds no usable rows")
    return frame.reset_index(drop=True)


def load_test_table(cfg: DataConfig) -> pd.DataFrame:
    """Test samples in sample_submission order; raises DataError naming each bad row."""
    return _raise_on(read_test_ids(cfg), "sample submission")


# --- Checking a submission --------------------------------------------------------------------------------

def validate_submission(frame: pd.DataFrame, expected_ids: list[str], vocabulary: Vocabulary,
                        columns: tuple[str, str] = ("Id", "Predicted"), separator: str = " ") -> None:
    """The sample submission's columns; every expected Id exactly once, in order; labels codes of the
    vocabulary; nothing empty or NaN."""
    if tuple(frame.columns) != columns:
        raise PipelineError(f"submission columns are {list(frame.columns)}, expected {list(columns)}; "
                            "nothing written")
    id_column, label_column = columns
    problems = []
    if frame.isna().any().any():
        problems.append(f"{int(frame.isna().any(axis=1).sum())} row(s) hold NaN")
    if frame[id_column].tolist() != list(expected_ids):
        dup = frame[id_column][frame[id_column].duplicated()].tolist()
        missing = sorted(set(expected_ids) - set(frame[id_column]))
        problems.append(f"Ids differ from sample_submission (duplicates {dup[:5]}, missing {missing[:5]})")
    known = vocabulary.index
    for row, value in enumerate(frame[label_column].fillna("").astype(str), start=2):
        tokens = value.split() if separator.isspace() else [t.strip() for t in value.split(separator)]
        if not tokens or not all(t in known for t in tokens):
            problems.append(f"row {row}: labels {value!r} are not labels of the run's vocabulary "
                            f"(such as {vocabulary.codes[0]!r})")
            break
    if problems:
        raise PipelineError("submission failed validation, nothing written:\n  " + "\n  ".join(problems))
