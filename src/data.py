"""The data layer: the only module that knows file formats.

HPA layout under ``data.dir``::

    train.csv               Id,Target          (Target: space-separated class indices, may be empty)
    sample_submission.csv   Id,Predicted
    train/<Id>_<red|green|blue|yellow>.png     8-bit grayscale, one file per channel
    test/<Id>_<channel>.png

Images are stacked in RGBY order into H x W x 4 uint8 arrays. Samples are described by a table with one
row per image (``Id``, ``labels`` as a tuple of ints, ``image_dir``, ``source``) so that extra sources,
and later other formats, only add rows.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
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

from src.config import AugmentConfig, DataConfig, PipelineError

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


@dataclass
class LabelTable:
    """A parsed label csv: the good rows and every problem met on the way."""

    frame: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)


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


def read_label_table(
    csv_path: str | Path, num_classes: int, label_column: str = "Target", image_dir: str | Path = "",
    ext: str = "png",
) -> LabelTable:
    """Read an ``Id,<label_column>`` csv; rows with problems are reported and left out."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return LabelTable(_empty_frame(), [Problem(str(csv_path), "file not found")])
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        why = "empty file (0 bytes)" if isinstance(exc, pd.errors.EmptyDataError) else f"not a readable csv ({exc})"
        return LabelTable(_empty_frame(), [Problem(str(csv_path), why)])
    missing = [col for col in ("Id", label_column) if col not in raw.columns]
    if missing:
        return LabelTable(
            _empty_frame(), [Problem(str(csv_path), f"missing column(s) {missing}; has {list(raw.columns)}")]
        )
    if raw.empty:
        return LabelTable(_empty_frame(), [Problem(str(csv_path), "no rows: the file holds only a header")])
    problems: list[Problem] = []
    rows = []
    seen: dict[str, int] = {}
    for row_number, (sample_id, target) in enumerate(zip(raw["Id"], raw[label_column]), start=2):
        where = f"{csv_path} row {row_number}"
        sample_id = sample_id.strip()
        why = id_problem(sample_id)
        if why:
            problems.append(Problem(where, why))
            continue
        if sample_id in seen:
            problems.append(Problem(where, f"duplicate Id {sample_id!r} (first on row {seen[sample_id]})"))
            continue
        seen[sample_id] = row_number
        labels, why = parse_target(target, num_classes) if label_column == "Target" else ((), None)
        if why:
            problems.append(Problem(where, why))
            continue
        rows.append((sample_id, labels, str(image_dir)))
    frame = pd.DataFrame(rows, columns=["Id", "labels", "image_dir"])
    frame["source"] = str(csv_path)
    frame["ext"] = ext
    return LabelTable(frame, problems)


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame(columns=["Id", "labels", "image_dir", "source", "ext"])


@dataclass(frozen=True)
class Source:
    """One labelled image source: its csv, image folder and per-channel file extension, and its name in
    the packed cache (``train``, ``extra<i>``, ``test``)."""

    name: str
    csv: Path
    images: Path
    ext: str = "png"


def train_sources(cfg: DataConfig) -> list[Source]:
    """The main training set and each extra source."""
    root = Path(cfg.dir)
    sources = [Source("train", root / cfg.train_csv, root / cfg.train_images)]
    sources += [Source(f"extra{i}", Path(extra.csv), Path(extra.images), extra.ext)
                for i, extra in enumerate(cfg.extra)]
    return sources


def test_source(cfg: DataConfig) -> Source:
    root = Path(cfg.dir)
    return Source("test", root / cfg.sample_submission, root / cfg.test_images)


def read_train_labels(cfg: DataConfig) -> LabelTable:
    """All training sources in one table; an Id present in two sources is a problem."""
    tables = [read_label_table(src.csv, cfg.num_classes, "Target", src.images, src.ext)
              for src in train_sources(cfg)]
    frame = pd.concat([t.frame for t in tables], ignore_index=True)
    problems = [p for t in tables for p in t.problems]
    dup = frame["Id"].duplicated(keep="first")
    for sample_id, source in zip(frame.loc[dup, "Id"], frame.loc[dup, "source"]):
        problems.append(Problem(source, f"duplicate Id {sample_id!r} (also in an earlier training source)"))
    return LabelTable(frame[~dup].reset_index(drop=True), problems)


def read_test_ids(cfg: DataConfig) -> LabelTable:
    """The test Ids in sample_submission order."""
    src = test_source(cfg)
    return read_label_table(src.csv, cfg.num_classes, "Predicted", src.images)


def _raise_on(table: LabelTable, what: str) -> pd.DataFrame:
    if table.problems:
        shown = "\n  ".join(str(p) for p in table.problems[:20])
        more = f"\n  ... and {len(table.problems) - 20} more" if len(table.problems) > 20 else ""
        raise DataError(f"{what} has {len(table.problems)} problem(s):\n  {shown}{more}\n"
                        "Run `python -m src.validate` for a full report.")
    return table.frame


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


def label_csr(labels: pd.Series | list, num_classes: int) -> sparse.csr_matrix:
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
    matrix = sparse.csr_matrix((np.ones(len(indices), dtype=np.uint8), indices.astype(index_dtype),
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
    image = np.stack(planes, axis=-1)
    if size is not None and image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def read_rgby(image_dir: str | Path, sample_id: str, size: int | None = None, ext: str = "png") -> np.ndarray:
    """Load one sample as H x W x 4 uint8 (RGBY), resized to ``size`` when given."""
    return stack_planes([decode_plane(path) for path in channel_paths(image_dir, sample_id, ext)], size)


def write_rgby(image_dir: str | Path, sample_id: str, image: np.ndarray) -> None:
    """Write an H x W x 4 uint8 array as four grayscale PNGs (the HPA layout)."""
    for path, plane in zip(channel_paths(image_dir, sample_id), np.moveaxis(image, -1, 0)):
        if not cv2.imwrite(str(path), np.ascontiguousarray(plane)):
            raise DataError(f"{path}: could not write image")


def build_augment(cfg: AugmentConfig, image_size: int) -> A.Compose:
    """A 4-channel-safe training policy: D4, affine jitter, brightness/contrast (per image and per
    channel), gamma, crop."""
    transforms: list = []
    if cfg.d4 > 0:
        transforms.append(A.D4(p=cfg.d4))
    if cfg.shift_scale_rotate > 0:
        transforms.append(
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45),
                     border_mode=cv2.BORDER_REFLECT_101, p=cfg.shift_scale_rotate)
        )
    if cfg.brightness_contrast > 0:
        transforms.append(A.RandomBrightnessContrast(0.1, 0.1, p=cfg.brightness_contrast))
        # Per-channel intensity: each of R, G, B, Y scaled by its own factor (stain strength varies).
        transforms.append(A.MultiplicativeNoise((0.9, 1.1), per_channel=True, elementwise=False,
                                                p=cfg.brightness_contrast))
    if cfg.gamma > 0:
        transforms.append(A.RandomGamma((80, 120), p=cfg.gamma))
    if cfg.crop_scale < 1.0:
        transforms.append(A.RandomResizedCrop((image_size, image_size), scale=(cfg.crop_scale, 1.0)))
    return A.Compose(transforms)


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
    let a resumed run replay exactly.
    """

    def __init__(self, table: pd.DataFrame, num_classes: int, image_size: int,
                 augment: A.Compose | None = None, packed: PackedImages | None = None):
        self.ids = table["Id"].tolist()
        self.image_dirs = table["image_dir"].tolist()
        self.exts = table["ext"].tolist() if "ext" in table else ["png"] * len(table)
        self.packed = packed  # the packed cache's rows of this table, when there is a fresh cache
        self.labels = table["labels"].tolist() if "labels" in table else [()] * len(table)
        self.num_classes = num_classes
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        if self.packed is not None:
            image = self.packed[index]
        else:
            image = read_rgby(self.image_dirs[index], self.ids[index], self.image_size, self.exts[index])
        if self.augment is not None:
            if seed is not None:
                self.augment.set_random_seed(seed)
            image = self.augment(image=image)["image"]
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        target[list(self.labels[index])] = 1.0
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target


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
                sampler: EpochSampler | None = None) -> DataLoader:
    """The DataLoader of every stage. With an :class:`EpochSampler` (training) only full batches are
    yielded (drop_last); without one (evaluation) every sample, in table order."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=sampler is not None,
        num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
        # Its own generator: creating an iterator must not draw from the global torch RNG, or a run
        # resumed mid-epoch would see different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )


def worker_init(worker_id: int) -> None:
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
