"""Score tables: the per-class scores of a set of images (a fold's OOF scores, the ensemble's test scores), the
one module that writes and reads them, and the score matrices read a block of rows at a time that stand for them.

A score table named ``<name>.csv`` is stored as one of::

    <name>.csv      ``Id`` + one column per class, 6 decimals (up to ``CSV_MAX_CLASSES`` classes)
    <name>.npz      above that: Ids (``ids.npy``) and an uncompressed float16 n x m array (``scores.npy``), written
                    a batch of rows at a time (:class:`ScoreTableWriter`, :class:`ScoreSink`) and read a block of
                    rows at a time (:class:`ScoreTable`), never whole

Where a table lives in a run is :mod:`src.run_folder`'s; every write here is atomic (temp file + rename).
"""

from __future__ import annotations

import os
import struct
import tempfile
import uuid
import weakref
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import PipelineError
from src.files import Staging, link_or_copy, write_atomic


def class_columns(num_classes: int) -> list[str]:
    return [str(c) for c in range(num_classes)]


# Above this many classes a score table is a float16 npz (Ids + n x m scores): a csv of 7 000 columns is slow
# to write and read and 5x the size, and 3 significant digits are plenty to rank and threshold scores.
CSV_MAX_CLASSES = 1000


def score_file(path: Path, num_classes: int) -> Path:
    """Where a score table named ``path`` (a .csv) lives: the .csv, or above ``CSV_MAX_CLASSES`` the .npz."""
    return path.with_suffix(".npz" if num_classes > CSV_MAX_CLASSES else ".csv")


def table_files(path: Path) -> tuple[Path, Path]:
    """Both files a score table named ``path`` may be stored as (its .csv and its .npz): what removing it removes."""
    return path.with_suffix(".csv"), path.with_suffix(".npz")


def write_score_table(file: Path, ids: Sequence[str], scores: np.ndarray | ScoreRows) -> None:
    """Write a score table to exactly ``file`` (a temp name is fine), in the format :func:`score_file` chose:
    ``Id`` + one column per class with 6 decimals, or an npz of Ids and float16 scores (from a
    :class:`ScoreRows`, a block of rows at a time)."""
    if scores.shape[1] > CSV_MAX_CLASSES:
        writer = ScoreTableWriter(file, ids, scores.shape[1])
        for start, stop in _read_blocks(scores.shape, 0, scores.shape[0]):
            writer.append(scores[start:stop])
        writer.close()
        return
    values = scores if isinstance(scores, np.ndarray) else scores[:]
    frame = pd.DataFrame(values, columns=class_columns(scores.shape[1]))
    frame.insert(0, "Id", list(ids))
    frame.to_csv(file, index=False, float_format="%.6f")


def write_scores(path: Path, ids: Sequence[str], scores: np.ndarray | ScoreRows, staging: Staging | None = None
                 ) -> Path:
    """The score table named ``path`` (see :func:`score_file`), written atomically (with ``staging``: renamed into
    place on its commit, with the rest of its set); returns the file. A temporary float16 table of the same Ids (a
    :class:`ScoreSink`'s) is moved into place, not rewritten."""
    target = score_file(path, scores.shape[1])
    if isinstance(scores, ScoreTable) and scores.temporary and scores.stored == np.float16 and \
            target.suffix == ".npz" and np.array_equal(scores.ids, np.asarray(list(ids), dtype=str)):
        def write(tmp: Path) -> None:
            scores.move_to(tmp)
            scores.path = target  # where it is read from once in place
    else:
        def write(tmp: Path) -> None:
            write_score_table(tmp, ids, scores)
    written = staging.file(target, write) if staging is not None else write_atomic(target, write)
    other = path.with_suffix(".csv" if target.suffix == ".npz" else ".npz")
    other.unlink(missing_ok=True)  # never two tables of different runs side by side
    return written


def copy_scores(source: Path, target: Path) -> Path:
    """``target`` becomes the score table at ``source`` (whichever of .csv/.npz it is), linked, not rewritten."""
    for suffix, other in ((".csv", ".npz"), (".npz", ".csv")):
        if source.with_suffix(suffix).is_file():
            copied = link_or_copy(source.with_suffix(suffix), target.with_suffix(suffix))
            target.with_suffix(other).unlink(missing_ok=True)
            return copied
    raise PipelineError(f"{source} not found: no score table to copy")


def stored_table(path: Path) -> Path:
    """The file that holds the score table named ``path``: its .csv, unless a newer .npz replaced it."""
    csv, npz = path.with_suffix(".csv"), path.with_suffix(".npz")
    if csv.is_file() and not (npz.is_file() and npz.stat().st_mtime_ns > csv.stat().st_mtime_ns):
        return csv
    if npz.is_file():
        return npz
    raise PipelineError(f"{path} not found: that fold has no validation scores")


def read_scores(path: Path) -> pd.DataFrame:
    """A score table written by :func:`write_scores` (Ids as strings), from the .csv or the .npz, as one frame
    (a few classes, or a few rows: :func:`read_score_table` reads a many-class table a block at a time)."""
    stored = stored_table(path)
    if stored.suffix == ".csv":
        return pd.read_csv(stored, dtype={"Id": str})
    with np.load(stored) as arrays:
        frame = pd.DataFrame(arrays["scores"].astype(np.float32), columns=class_columns(arrays["scores"].shape[1]))
        frame.insert(0, "Id", arrays["ids"].astype(str))
    return frame


def read_score_table(path: Path) -> tuple[np.ndarray, np.ndarray | ScoreTable]:
    """(Ids, scores) of the score table named ``path``: a csv's scores as an array (as pandas reads them), an
    npz's as a :class:`ScoreTable` read a block of rows at a time (float16 on disk, float32 when read)."""
    stored = stored_table(path)
    if stored.suffix == ".csv":
        frame = pd.read_csv(stored, dtype={"Id": str})
        return frame["Id"].to_numpy(dtype=object), frame.drop(columns="Id").to_numpy()
    table = ScoreTable(stored)
    return table.ids.astype(object), table


def read_external_scores(path: Path, codes: Sequence[str]) -> tuple[np.ndarray, np.ndarray | ScoreTable]:
    """(Ids, scores) of a score table made elsewhere (``predict.runs[].scores``): a csv of ``Id`` + one column per
    label, named by class index (``0``..``m-1``, as predict writes them) or by the label's code (any order: put in
    the run's order here), or our npz (:func:`write_scores`; m columns). One PipelineError naming the file and
    its first bad label or Id: a missing file, a label outside ``codes``, a missing label, a duplicate or empty Id."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found (a predict.runs[].scores table)")
    if path.suffix == ".npz":
        table = ScoreTable(path)
        ids, scores = table.ids.astype(object), table
        if table.shape[1] != len(codes):
            raise PipelineError(f"{path}: {table.shape[1]} score columns, the run's labels are {len(codes)}")
    else:
        frame = pd.read_csv(path, dtype={"Id": str}, keep_default_na=False)
        if "Id" not in frame.columns:
            raise PipelineError(f"{path}: no Id column (expected Id + one column per label)")
        columns = [str(c) for c in frame.columns if c != "Id"]
        names = class_columns(len(codes)) if set(columns) <= set(class_columns(len(codes))) else list(codes)
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise PipelineError(f"{path}: column {unknown[0]!r} is not a label of the run ({len(unknown)} such "
                                f"columns; expected class indices 0..{len(codes) - 1} or label codes such as "
                                f"{codes[0]!r})")
        missing = [c for c in names if c not in columns]
        if missing:
            raise PipelineError(f"{path}: no column for label {missing[0]!r} ({len(missing)} labels missing)")
        frame.columns = ["Id" if c == "Id" else str(c) for c in frame.columns]
        ids = frame["Id"].to_numpy(dtype=object)
        values = frame[names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(np.isnan(values).any(axis=1))
        if len(bad):
            raise PipelineError(f"{path}: Id {ids[bad[0]]!r} has a score that is not a number ({len(bad)} such rows)")
        scores = values
    duplicated = pd.Index(ids).duplicated()
    empty = pd.Index(ids) == ""
    if duplicated.any() or empty.any():
        at = int(np.argmax(duplicated | empty))
        raise PipelineError(f"{path}: Id {ids[at]!r} (row {at + 2}) is {'empty' if empty[at] else 'duplicated'}")
    return ids, scores


def matching_rows(path: Path, ids: np.ndarray, expected: Sequence[str], what: str) -> np.ndarray:
    """Which row of a table of ``ids`` holds each of ``expected`` (the same set), or a PipelineError naming
    ``path`` and the first Id missing or extra."""
    at = pd.Index(ids).get_indexer(list(expected))
    if (at < 0).any():
        raise PipelineError(f"{path}: {what} Id {expected[int(np.argmax(at < 0))]!r} is missing "
                            f"({int((at < 0).sum())} of {len(expected)})")
    if len(ids) != len(expected):
        extra = ~pd.Index(ids).isin(list(expected))
        raise PipelineError(f"{path}: Id {ids[int(np.argmax(extra))]!r} is not a {what} Id "
                            f"({int(extra.sum())} such rows)")
    return at


# -- score matrices read a block of rows at a time (many classes) ---------------------------------------------
# A block of rows read from a table is about this many bytes (float32).
READ_BLOCK_BYTES = 1 << 25


def _read_blocks(shape: tuple[int, int], start: int, stop: int) -> Iterator[tuple[int, int]]:
    step = max(1, READ_BLOCK_BYTES // (4 * max(shape[1], 1)))
    for first in range(start, stop, step):
        yield first, min(first + step, stop)


def _row_runs(index: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(position in ``index``, its length, first row) of each run of consecutive rows in ``index``."""
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    for at, end in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(index)].tolist()):
        yield at, end - at, int(index[at])


class ScoreRows:
    """An n x m score matrix that is never held whole, read a block of rows at a time: a table on disk
    (:class:`ScoreTable`), some of its rows (:meth:`take`), several one after another (:func:`stack_scores`) or a
    function of several (:func:`combine_scores`: the fold mean, the ensemble). ``rows[a:b]`` is a float32 array
    of those rows, ``rows[:, cols]`` every row's columns ``cols`` (one pass over the rows). src.metrics and
    src.thresholds take one wherever they take an array of scores, so validation's 340 k x 7 178 scores (9.8 GB
    in float32) are never in memory at once."""

    shape: tuple[int, int]
    dtype = np.dtype(np.float32)
    ndim = 2

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a float32 array."""
        raise NotImplementedError

    def read_rows(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order) as a float32 array, read as runs of consecutive rows."""
        out = np.empty((len(index), self.shape[1]), np.float32)
        for at, length, first in _row_runs(np.asarray(index, dtype=np.int64)):
            out[at : at + length] = self.read(first, first + length)
        return out

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("ScoreRows are read by row slices ([a:b] or [a:b, columns]); take(index) selects rows")
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        if isinstance(cols, slice) and cols == slice(None):
            return self.read(start, stop)
        width = len(np.arange(self.shape[1])[cols])
        out = np.empty((stop - start, width), np.float32)
        for first, last in _read_blocks(self.shape, start, stop):
            out[first - start : last - start] = self.read(first, last)[:, cols]
        return out

    def take(self, index: np.ndarray) -> ScoreRows:
        """Rows ``index`` (in that order), read when used."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) == self.shape[0] and np.array_equal(index, np.arange(len(index))):
            return self
        return _RowSubset(self, index)


def _rows_of(part: np.ndarray | ScoreRows, start: int, stop: int, index: np.ndarray | None) -> np.ndarray:
    """Rows ``start:stop`` of ``part``, or rows ``index[start:stop]`` of it."""
    if index is None:
        return part[start:stop]
    return part[index[start:stop]] if isinstance(part, np.ndarray) else part.read_rows(index[start:stop])


class _RowSubset(ScoreRows):
    def __init__(self, base: ScoreRows, index: np.ndarray):
        self.base, self.index, self.shape = base, index, (len(index), base.shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.base.read_rows(self.index[start:stop])


class _StackedRows(ScoreRows):
    def __init__(self, parts: list):
        self.parts = parts
        self.ends = np.cumsum([len(part) for part in parts])
        self.shape = (int(self.ends[-1]) if len(parts) else 0, parts[0].shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        pieces, begin = [], 0
        for part, end in zip(self.parts, self.ends.tolist()):
            if start < end and stop > begin:
                pieces.append(np.asarray(part[max(start, begin) - begin : min(stop, end) - begin], np.float32))
            begin = end
        return np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), np.float32)


class _CombinedRows(ScoreRows):
    def __init__(self, parts: list, combine: Callable[[list[np.ndarray]], np.ndarray], index: list):
        self.parts, self.combine, self.index = parts, combine, index
        first = parts[0] if index[0] is None else index[0]
        self.shape = (len(first), parts[0].shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        rows = [_rows_of(part, start, stop, index) for part, index in zip(self.parts, self.index)]
        return np.asarray(self.combine(rows), dtype=np.float32)


def stack_scores(parts: list[np.ndarray | ScoreRows]) -> np.ndarray | ScoreRows:
    """The rows of several score matrices one after another: one array from arrays, else read through."""
    if all(isinstance(part, np.ndarray) for part in parts):
        return np.concatenate(parts)
    return _StackedRows(parts)


def combine_scores(parts: list[np.ndarray | ScoreRows], combine: Callable[[list[np.ndarray]], np.ndarray],
                   index: list[np.ndarray | None] | None = None) -> np.ndarray | ScoreRows:
    """``combine`` (a fold mean, an ensemble's weighted mean) of the same rows of several score matrices;
    ``index`` says which rows of each part make the result's rows (None: all, in order). Arrays are combined at
    once; with a table among them, a block of rows at a time as the result is read (the same arithmetic)."""
    index = index or [None] * len(parts)
    if all(isinstance(part, np.ndarray) for part in parts):
        return combine([part if rows is None else part[rows] for part, rows in zip(parts, index)])
    return _CombinedRows(parts, combine, index)


class ScoreTable(ScoreRows):
    """A score table in its npz form (Ids and an uncompressed n x m float16 or float32 array) read a block of
    rows at a time straight from the file (float32 when read), never loaded whole. ``temporary``: a table being
    passed along (validation's, a fold's test scores) that is deleted when dropped, unless :meth:`move_to`
    keeps it."""

    def __init__(self, path: str | Path, temporary: bool = False):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as archive:
            with archive.open("ids.npy") as handle:
                self.ids = np.lib.format.read_array(handle).astype(str)
            info = archive.getinfo("scores.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise PipelineError(f"{self.path}: compressed scores cannot be read a block at a time; write the table "
                                "with src.score_table.write_scores")
        with open(self.path, "rb") as handle:  # the member's bytes start after its local header
            handle.seek(info.header_offset)
            local = handle.read(30)
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(handle)]
            shape, fortran_order, self.stored = read_header(handle)
            self.offset = handle.tell()
        if fortran_order or len(shape) != 2 or local[:4] != b"PK\x03\x04":
            raise PipelineError(f"{self.path}: not a score table (expected Ids and an n x m array)")
        self.shape = tuple(shape)
        self.row_bytes = self.shape[1] * self.stored.itemsize
        self._finalizer = weakref.finalize(self, _unlink, self.path) if temporary else None

    @property
    def temporary(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def read(self, start: int, stop: int) -> np.ndarray:
        buffer = np.empty((max(0, stop - start), self.shape[1]), self.stored)
        if buffer.size:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset + start * self.row_bytes)
                if handle.readinto(memoryview(buffer).cast("B")) != buffer.nbytes:
                    raise PipelineError(f"{self.path} is truncated (rows {start}..{stop} of {self.shape[0]})")
        return buffer.astype(np.float32, copy=False)

    def move_to(self, target: Path) -> Path:
        """Keep the table as ``target`` (renamed into place); it is no longer temporary."""
        os.replace(self.path, target)
        if self._finalizer is not None:
            self._finalizer.detach()
        self.path = Path(target)
        return self.path


def _unlink(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


class ScoreTableWriter:
    """Writes a score table's npz (``ids.npy``, then ``scores.npy`` uncompressed) as rows arrive, holding none of
    them: inference's batches go straight to disk. np.load reads the result like any npz."""

    def __init__(self, path: str | Path, ids: Sequence[str], num_classes: int, dtype: np.dtype = np.float16):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        ids = np.asarray(list(ids), dtype=str)
        self.shape, self.rows = (len(ids), num_classes), 0
        self._archive = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)
        with self._archive.open("ids.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, ids)
        self._stream = self._archive.open("scores.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self._stream, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                            "fortran_order": False, "shape": self.shape})

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.ndim != 2 or block.shape[1] != self.shape[1] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: a block of shape {block.shape} does not fit a table of {self.shape} "
                             f"with {self.rows} rows written")
        self._stream.write(memoryview(block).cast("B"))
        self.rows += len(block)

    def close(self, temporary: bool = False) -> ScoreTable:
        if self.rows != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: {self.rows} rows written of {self.shape[0]}")
        self._stream.close()
        self._archive.close()
        return ScoreTable(self.path, temporary)

    def abort(self) -> None:
        """Give up: close and delete the partial file."""
        try:
            self._stream.close()
            self._archive.close()
        finally:
            self.path.unlink(missing_ok=True)


class ScoreSink:
    """Where inference puts the scores of ``ids`` as it makes them (``infer(..., into=sink.append)``):
    :meth:`finish` gives them as an array, or, for tables past ``CSV_MAX_CLASSES`` (unless ``in_memory``), as a
    temporary :class:`ScoreTable` written batch by batch into ``folder`` (``dtype`` on disk; deleted when
    dropped unless :func:`write_scores` keeps it)."""

    def __init__(self, ids: Sequence[str], num_classes: int, folder: str | Path | None = None,
                 dtype: np.dtype = np.float16, in_memory: bool = False):
        self.blocks: list[np.ndarray] = []
        self.writer = None
        if num_classes > CSV_MAX_CLASSES and not in_memory:
            folder = Path(tempfile.gettempdir() if folder is None else folder)
            folder.mkdir(parents=True, exist_ok=True)
            # <name>.<pid>.tmp: what src.files.remove_stale_temps removes once this process is gone.
            name = folder / f"scores-{uuid.uuid4().hex[:12]}.{os.getpid()}.tmp"
            self.writer = ScoreTableWriter(name, ids, num_classes, dtype)

    def append(self, block: np.ndarray) -> None:
        if self.writer is None:
            self.blocks.append(block)
        else:
            self.writer.append(block)

    def finish(self) -> np.ndarray | ScoreTable:
        if self.writer is None:
            return np.concatenate(self.blocks)
        return self.writer.close(temporary=True)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

