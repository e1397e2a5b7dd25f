"""Stage 1c (optional, for speed): pack every image source into one uint8 array at ``data.image_size``.

    python -m src.pack [--config FILE] [--workers N] [key=value ...]
    python -m src.pack --verify [--config FILE] [key=value ...]

Decoding four PNGs (or 2048 px JPEGs, as in the external HPAv18 set) per sample per step is what limits a
loader; a packed array is read at memory speed. For each source (``train``, every ``data.extra`` source as
``extra<i>``, ``test``) this writes under ``data.cache_dir``:

    <name>-<size>px-<hash>.u8    N x size x size x C uint8 (hpa: RGBY), rows in the source csv's order
    <name>-<size>px-<hash>.json  manifest: what it was packed from (format, label csv, image folder, size,
                                 channels), when, a hash of the label csv, Ids, and per sample its files'
                                 sizes and modification times (the freshness check) and a BLAKE2 hash of
                                 their bytes

``<hash>`` is the source's fingerprint (format, resolved label csv and image folder, extension, size): one
``data.cache_dir`` can hold the caches of several datasets, and a dataset never opens another's arrays.

Sources are validated first. Packing runs in parallel over ``--workers`` processes with a progress bar,
and is resumable: rows are written into ``<name>-<size>px-<hash>.u8.partial`` and the rows done are recorded
beside it, so an interrupted run continues where it stopped; the array and its manifest are renamed into
place only when complete. Training and prediction use a cache when it exists and is fresh (same Ids, size
and file sizes/times), and stop with a message when it is stale: never a silent mix of old and new images.
A source whose image files are all absent (moved away after packing, or a cache uploaded without them) is
used as packed, with a note. ``--verify`` compares the present files with the manifest by sizes, times and
content, lists the samples that changed and exits 2 if any did.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, DataConfig, PipelineError
from src.data import Source, test_source, train_sources
from src.dataset import PackedImages
from src.files import FULL_DISK_BYTES, WriteError, format_bytes, free_bytes, remove_stale_temps, write_atomic
from src.formats import get_format
from src.images import decode_file, decode_plane, fit_size, stack_planes
from src.progress import bar as progress_bar
from src.progress import note
from src.validate import require_valid

CHUNK = 64  # samples per task: big enough to amortise the task overhead, small enough to resume finely
VERSION = 2  # 2: file names carry the source fingerprint; identity, csv hash, date, content hash


def source_identity(cfg: DataConfig, source: Source) -> dict:
    """What a packed array belongs to: the format, the source's label csv and image folder (resolved: changing
    ``data.dir`` changes them), the per-channel extension and the packed size. Its hash names the cache files,
    so a ``data.cache_dir`` shared by several datasets never gives one of them another's arrays."""
    return {"format": cfg.format, "csv": str(source.csv.resolve()), "images": str(source.images.resolve()),
            "ext": source.ext, "size": cfg.image_size}


def fingerprint(identity: dict) -> str:
    """Eight hex digits of a hash of :func:`source_identity`."""
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=4).hexdigest()


def array_path(cfg: DataConfig, source: Source) -> Path:
    """``<cache_dir>/<source name>-<size>px-<fingerprint>.u8``: the packed array of ``source``."""
    return Path(cfg.cache_dir) / f"{source.name}-{cfg.image_size}px-{fingerprint(source_identity(cfg, source))}.u8"


def manifest_path(cfg: DataConfig, source: Source) -> Path:
    """The array's manifest (``.json`` beside it): what it was packed from, when, and per sample its files'
    stats and content hash. Written last: a manifest marks a complete array."""
    return array_path(cfg, source).with_suffix(".json")


def _stat(path: str | Path) -> list[int]:
    """(size, mtime in ns) of a file: what the freshness check compares."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def file_stats(paths: list[Path]) -> list[list[int]]:
    """:func:`_stat` of each file."""
    return [_stat(path) for path in paths]


def _digest(buffers) -> str:
    """BLAKE2 hash of ``buffers`` in order: the content hash a manifest records per sample (packing hashes the
    bytes it decodes, :func:`content_digest` the files it re-reads; both through here, so they agree)."""
    digest = hashlib.blake2b(digest_size=16)
    for buffer in buffers:
        digest.update(buffer)
    return digest.hexdigest()


def content_digest(paths: list[Path]) -> str:
    """:func:`_digest` of the bytes of a sample's files, in order, read a MiB at a time."""

    def blocks():
        for path in paths:
            with open(path, "rb") as handle:
                yield from iter(lambda: handle.read(1 << 20), b"")

    return _digest(blocks())


_csv_digests: dict[tuple, str] = {}


def csv_digest(path: Path) -> str:
    """:func:`content_digest` of a label csv, once per process and version of the file."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _csv_digests:
        _csv_digests[key] = content_digest([path])
    return _csv_digests[key]


def _pack_rows(task: tuple[str, tuple[int, ...], list[tuple[int, list[str]]], int]) -> list[tuple]:
    """Decode, resize and write some rows of one array (runs in a worker process)."""
    out_path, shape, rows, size = task
    array = np.memmap(out_path, dtype=np.uint8, mode="r+", shape=shape)
    done = []
    for row, files in rows:
        paths = [Path(f) for f in files]
        encoded = [np.fromfile(path, dtype=np.uint8) for path in paths]
        if len(paths) == 1:  # one file with its own channels (openimages, csv)
            array[row] = fit_size(decode_file(paths[0], shape[-1], encoded[0]), size)
        else:  # one file per channel (hpa)
            array[row] = stack_planes([decode_plane(p, e) for p, e in zip(paths, encoded)], size)
        done.append((row, file_stats(paths), _digest(encoded)))
    array.flush()
    return done


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """Pool worker initializer: the worker dies with the pack process, by kill -9 too (which runs no cleanup: the
    worker would live on, re-parented to PID 1, writing into an array nobody will finish). On Linux the kernel
    kills it when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere a thread watches the parent's pid."""
    if sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG,
                                                                                    signal.SIGKILL) == 0:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _reserve(partial: Path, nbytes: int, rows_done: int, rows: int) -> None:
    """Allocate the whole array on disk before any work: a disk without room for it is then one error naming it,
    not a worker killed by SIGBUS writing a row into a sparse file the disk cannot hold. A fresh array that does
    not fit is removed; a resumed one keeps its packed rows and is reported with its size."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:  # not on this OS: rows go into the sparse file
        return
    try:
        with open(partial, "r+b") as handle:
            allocate(handle.fileno(), 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # not on this file system: sparse, as before
            return
        if rows_done:
            on_disk = format_bytes(partial.stat().st_blocks * 512)
            kept = (f"; it is kept with {rows_done} of {rows} rows packed ({on_disk} on disk): make room and run "
                    "`python -m src.pack` again to resume")
        else:
            partial.unlink(missing_ok=True)
            kept = "; nothing was kept"
        free = free_bytes(partial.parent)
        room = f", {format_bytes(free)} free" if free is not None else ""
        raise WriteError(partial, f"{exc.strerror or exc} (the array needs {format_bytes(nbytes)}{room}){kept}") \
            from None


def pack_source(cfg: DataConfig, source: Source, table: pd.DataFrame, workers: int, progress: bool,
                channels: int = 4) -> Path:
    """Pack one source (resuming a partial run of the same plan); returns the array's path. ``channels``:
    of each sample (hpa: its four planes; one-file formats: model.in_chans)."""
    final, manifest = array_path(cfg, source), manifest_path(cfg, source)
    partial = final.with_name(final.name + ".partial")
    progress_file = final.with_name(final.name + ".progress.json")
    size, ids = cfg.image_size, table["Id"].tolist()
    shape = (len(ids), size, size, channels)
    plan = {"ids": ids, "size": size, "csv": str(source.csv), "images": str(source.images), "ext": source.ext,
            "channels": channels}
    done: dict[int, tuple] = {}
    if partial.is_file() and progress_file.is_file():
        saved = json.loads(progress_file.read_text())
        if saved.get("plan") == plan and partial.stat().st_size == int(np.prod(shape)):
            done = {int(row): (stats, digest) for row, stats, digest in saved["done"]}
    if not done:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:  # rows are filled in any order
            handle.truncate(int(np.prod(shape)))
    _reserve(partial, int(np.prod(shape)), len(done), len(ids))

    def record() -> None:
        rows = [[row, stats, digest] for row, (stats, digest) in sorted(done.items())]
        write_atomic(progress_file, lambda tmp: tmp.write_text(json.dumps({"plan": plan, "done": rows})))

    todo = [(row, list(files)) for row, files in enumerate(table["files"]) if row not in done]
    tasks = [(str(partial), shape, todo[start : start + CHUNK], size) for start in range(0, len(todo), CHUNK)]
    bar = progress_bar(total=len(ids), initial=len(done), desc=f"packing {source.name} ({size} px)",
                       disable=not progress, unit="img", mininterval=1.0)
    try:
        with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent) as pool:
            for finished, results in enumerate(pool.map(_pack_rows, tasks), start=1):
                for row, stats, digest in results:
                    done[row] = (stats, digest)
                bar.update(len(results))
                if finished % 16 == 0:
                    record()
    except BrokenProcessPool:  # a worker was killed: out of memory, or a write into the array failed (SIGBUS)
        record()
        free = free_bytes(partial.parent)
        why = (f"its disk is full ({format_bytes(free)} free)" if free is not None and free < FULL_DISK_BYTES
               else "killed, out of memory?")
        raise PipelineError(f"a packing worker died writing {partial} ({format_bytes(int(np.prod(shape)))}): {why}; "
                            f"it is kept with {len(done)} of {len(ids)} rows packed: `python -m src.pack` resumes "
                            "it") from None
    finally:
        bar.close()
    samples = [{"id": ids[row], "files": stats, "blake2b": digest} for row, (stats, digest) in sorted(done.items())]
    identity = source_identity(cfg, source)
    content = hashlib.blake2b("".join(s["blake2b"] for s in samples).encode(), digest_size=8).hexdigest()
    meta = {"version": VERSION, "shape": list(shape), **plan, "format": cfg.format,
            "identity": {**identity, "channels": channels}, "fingerprint": fingerprint(identity),
            "csv_blake2b": csv_digest(source.csv),
            "packed_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "content_blake2b": content,
            "samples": samples}
    os.replace(partial, final)
    write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(meta)))  # the manifest last: it marks "complete"
    progress_file.unlink(missing_ok=True)
    return final


def _splits(cfg: DataConfig) -> list[tuple[Source, str]]:
    """Every source of ``cfg`` with its split: the training sources, then the test source."""
    return [(source, "train") for source in train_sources(cfg)] + [(test_source(cfg), "test")]


def pack(cfg: Config, workers: int | None = None, progress: bool = True) -> list[Path]:
    """Validate, then pack every source of ``cfg.data`` into ``data.cache_dir``; returns the arrays."""
    if cfg.data.cache_dir is None:
        raise PipelineError("data.cache_dir is null: set it to the folder the packed arrays go to")
    require_valid(cfg, progress=progress)
    remove_stale_temps(cfg.data.cache_dir)  # temp files of a killed run (a live run's are kept)
    workers = workers or os.cpu_count() or 1
    written = []
    fmt = get_format(cfg.data)
    channels = fmt.channels(cfg)
    for source, split in _splits(cfg.data):
        table = fmt.read_source(cfg.data, source, split).frame
        path = pack_source(cfg.data, source, table, workers, progress, channels)
        written.append(path)
        if progress:
            print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) and {manifest_path(cfg.data, source)}")
    return written


@dataclass
class Cache:
    """A packed source found in ``data.cache_dir``: its array and manifest, and whether it was packed from the
    same label csv at another path (``moved``: a cache copied or uploaded with its labels)."""

    array: Path
    manifest: dict
    moved: bool = False


def _manifest_files(cfg: DataConfig, source: Source) -> list[Path]:
    """The manifests in ``data.cache_dir`` of a source of this name at this size, whatever its fingerprint (and
    in the naming before fingerprints, ``<name>-<size>px.json``)."""
    stem = f"{source.name}-{cfg.image_size}px"
    pattern = re.compile(rf"{re.escape(stem)}(-[0-9a-f]{{8}})?\.json")
    return sorted(path for path in Path(cfg.cache_dir).glob(f"{stem}*.json") if pattern.fullmatch(path.name))


def find_cache(cfg: DataConfig, source: Source) -> tuple[Cache | None, list[tuple[Path, dict]]]:
    """The cache of ``source`` in ``data.cache_dir`` (None when there is none), and when there is none the
    manifests (file, content) of the other sources there under the same name and size: another dataset's.
    A cache of this fingerprint is this source's; so is one packed from a byte-identical label csv, in the same
    format, with an image folder of the same name (the paths moved: a cache uploaded as a Kaggle dataset)."""
    own = manifest_path(cfg, source)
    if own.is_file():
        return Cache(array_path(cfg, source), json.loads(own.read_text())), []
    others = [(path, json.loads(path.read_text())) for path in _manifest_files(cfg, source)]
    if others and source.csv.is_file():
        labels = csv_digest(source.csv)
        for path, manifest in others:
            identity = manifest.get("identity", {})
            if (manifest.get("csv_blake2b") == labels and identity.get("format") == cfg.format
                    and identity.get("ext") == source.ext and Path(identity["images"]).name == source.images.name):
                return Cache(path.with_suffix(".u8"), manifest, moved=True), []
    return None, others


def describe(manifest: dict) -> str:
    """What a manifest says its array was packed from, for messages."""
    identity = manifest.get("identity") or manifest  # manifests before fingerprints: the paths at the top level
    fmt = f"{identity['format']} " if "format" in identity else ""
    when = manifest.get("packed_at", "before caches were named by their source")
    return (f"{fmt}labels {identity['csv']} and images {identity['images']}, {len(manifest['ids'])} samples at "
            f"{manifest['size']} px, {manifest['shape'][-1]} channels, packed {when}")


def _foreign(others: list[tuple[Path, dict]]) -> str:
    return "; ".join(f"{path.with_suffix('.u8').name} of {describe(manifest)}" for path, manifest in others)


_noted: set[str] = set()


def _note_once(text: str) -> None:
    """Print a note the first time this process meets it: training opens the cache for two tables, prediction
    for each experiment."""
    if text not in _noted:
        _noted.add(text)
        note(f"note: {text}")


def _present_stats(files: list[str]) -> list[list[int] | None]:
    """:func:`file_stats` of each file, None where the file is absent."""
    stats = []
    for path in files:
        try:
            stats.append(_stat(path))
        except FileNotFoundError:
            stats.append(None)
    return stats


PACK_HINT = "`python -m src.pack --config <this config>` (with the same overrides)"


def open_packed(cfg: DataConfig, table: pd.DataFrame) -> PackedImages | None:
    """The packed rows of ``table``'s samples, when ``data.cache_dir`` holds a cache of their sources at
    ``data.image_size`` (:func:`find_cache`); None when it holds none, with a note naming the caches of other
    sources it holds instead. A source with its image files present is checked against the manifest (Ids,
    file sizes and times); a source with all of them absent (the folder gone, the images moved away after
    packing) is used as packed, with a note naming the manifest's date and content hash. A stale cache, a source
    with some files absent and some present, or a cache covering only some of the sources is an error, never
    mixed in."""
    if cfg.cache_dir is None or table.empty:
        return None
    sources = {str(src.csv): src for src in train_sources(cfg) + [test_source(cfg)]}
    names = [sources[csv].name for csv in table["source"]]
    needed = {sources[csv].name: sources[csv] for csv in table["source"].unique()}
    found = {name: find_cache(cfg, source) for name, source in needed.items()}
    caches = {name: cache for name, (cache, _) in found.items() if cache is not None}
    if not caches:
        return _read_images_instead(cfg, needed, found)
    _require_every_source(cfg, needed, caches, found)
    rows_of = {name: [i for i, row_name in enumerate(names) if row_name == name] for name in needed}
    ids, files = table["Id"].tolist(), table["files"].tolist()
    # Every source's mode first (a stat of each present file; None: used as packed), then its rows.
    stats = {}
    for name, source in needed.items():
        at = rows_of[name]  # (every file of a source lies under its image folder)
        stats[name] = _source_stats(caches[name], name, [ids[i] for i in at], [files[i] for i in at]) \
            if source.images.exists() else None
    rows: list[tuple[str, int]] = [("", -1)] * len(table)
    for name, cache in caches.items():
        at = rows_of[name]
        if stats[name] is None:
            packed_rows = _rows_as_packed(cache, [ids[i] for i in at])
        else:
            packed_rows = _rows_checked(cache, [ids[i] for i in at], [files[i] for i in at], stats[name])
        for i, row in zip(at, packed_rows):
            rows[i] = (name, row)
    for name in sorted(caches):
        _note_cache_use(name, needed[name], caches[name], as_packed=stats[name] is None)
    return PackedImages({name: (str(cache.array), tuple(cache.manifest["shape"])) for name, cache in caches.items()},
                        rows)


def _read_images_instead(cfg: DataConfig, needed: dict[str, Source],
                         found: dict[str, tuple[Cache | None, list[tuple[Path, dict]]]]) -> None:
    """No source of the table is packed: the images are read, with a note for each source whose name and size
    the cache folder holds only another dataset's cache of."""
    for name, (_, others) in found.items():
        if others:
            source = needed[name]
            _note_once(f"{cfg.cache_dir} holds no packed cache of source '{name}' ({cfg.format} labels {source.csv} "
                       f"and images {source.images} at {cfg.image_size} px), only of another source: "
                       f"{_foreign(others)}. Reading the image files; to pack this source run {PACK_HINT}")
    return None


def _require_every_source(cfg: DataConfig, needed: dict[str, Source], caches: dict[str, Cache],
                          found: dict[str, tuple[Cache | None, list[tuple[Path, dict]]]]) -> None:
    """Some sources packed: all must be, each array beside its manifest (packed and read images never mix)."""
    missing = sorted(set(needed) - set(caches))
    if missing:
        also = "".join(f" ('{name}': only {_foreign(found[name][1])})" for name in missing if found[name][1])
        raise PipelineError(f"{cfg.cache_dir} holds packed arrays for {sorted(caches)} but not for {missing}{also}: "
                            f"run {PACK_HINT} (or data.cache_dir=null)")
    for cache in caches.values():
        if not cache.array.is_file():
            raise PipelineError(f"the packed cache {cache.array} is missing beside its manifest: run {PACK_HINT} "
                                "again (or data.cache_dir=null)")


def _source_stats(cache: Cache, name: str, ids: list[str], files: list[list[str]]) -> list[list] | None:
    """The sizes and times of one source's files (per sample, per file), to check its cache against; None when
    every file is absent: the cache is then used as packed. Some absent and some present is a stale cache."""
    stats = [_present_stats(sample_files) for sample_files in files]
    absent = [(i, path) for i, sample_files in enumerate(files)
              for path, st in zip(sample_files, stats[i]) if st is None]
    if len(absent) == sum(len(sample_files) for sample_files in files):
        return None
    if absent:
        i, path = absent[0]
        raise PipelineError(
            f"the packed cache {cache.array} is stale: sample {ids[i]!r} has no file {path}, while other "
            f"image files of source '{name}' are present (a cache is used without its images only when all of "
            f"them are absent). Restore the file, or run {PACK_HINT} again (or data.cache_dir=null)")
    return stats


def _positions(cache: Cache) -> dict[str, tuple[int, list]]:
    """Sample Id -> (row in the packed array, its files' sizes and times when packed)."""
    return {sample["id"]: (row, sample["files"]) for row, sample in enumerate(cache.manifest["samples"])}


def _stale(cache: Cache, sample_id: str, why: str) -> PipelineError:
    return PipelineError(f"the packed cache {cache.array} is stale: sample {sample_id!r} {why}. Run {PACK_HINT} "
                         "again (or data.cache_dir=null to read the images)")


def _rows_as_packed(cache: Cache, ids: list[str]) -> list[int]:
    """The rows of ``ids`` in a cache whose images are gone: used as packed, only the Ids checked."""
    position = _positions(cache)
    missing = next((sample_id for sample_id in ids if sample_id not in position), None)
    if missing is not None:
        raise _stale(cache, missing, "is not in it")
    return [position[sample_id][0] for sample_id in ids]


def _rows_checked(cache: Cache, ids: list[str], files: list[list[str]], stats: list[list]) -> list[int]:
    """The rows of ``ids`` in a cache whose images are present: each sample's files must have the sizes and times
    they were packed with."""
    position, rows = _positions(cache), []
    for sample_id, sample_files, now in zip(ids, files, stats):
        found = position.get(sample_id)
        if found is None:
            raise _stale(cache, sample_id, "is not in it")
        if found[1] != now:
            why = f"changed since packing ({Path(sample_files[0]).parent})"
            if cache.moved:
                why += (f"; the cache was packed from {describe(cache.manifest)}: copied files get new times, "
                        "`python -m src.pack --verify` compares their contents")
            raise _stale(cache, sample_id, why + ("" if cache.moved else
                                                  " (`python -m src.pack --verify` lists them all)"))
        rows.append(found[0])
    return rows


def _note_cache_use(name: str, source: Source, cache: Cache, as_packed: bool) -> None:
    """Say when a cache is used other than as packed from these very files: without its images, or moved."""
    if as_packed:
        _note_once(f"the image files of source '{name}' ({source.images}) are absent: using the packed "
                   f"cache {cache.array} as packed on {cache.manifest['packed_at']} (content hash "
                   f"{cache.manifest['content_blake2b']}, from images {cache.manifest['identity']['images']}), "
                   "unchecked against the images")
    elif cache.moved:
        _note_once(f"using the packed cache {cache.array} of source '{name}', packed from the same label file at "
                   f"another path ({describe(cache.manifest)})")


def verify(cfg: Config, workers: int | None = None, progress: bool = True) -> list[str]:
    """Compare each source's image files with its packed cache, by file sizes and times and by content (every
    present file read and hashed as when packing); print a summary per source. Returns one line per sample the
    cache does not hold as the files are now (bytes changed, not packed, a file absent while others are present)
    and per source without a cache: empty when the cache matches. A source whose files are all absent is not
    compared (training uses its cache as packed)."""
    if cfg.data.cache_dir is None:
        raise PipelineError("data.cache_dir is null: there is no packed cache to verify")
    fmt = get_format(cfg.data)
    workers = workers or min(8, 2 * (os.cpu_count() or 1))  # reading waits on the disk: threads overlap it
    problems = []
    for source, split in _splits(cfg.data):
        table = fmt.read_source(cfg.data, source, split).frame
        cache, others = find_cache(cfg.data, source)
        if cache is None:
            also = f" (only {_foreign(others)})" if others else ""
            problems.append(f"{source.name}: {cfg.data.cache_dir} holds no packed cache of {source.csv} at "
                            f"{cfg.data.image_size} px{also}")
            continue
        packed = {sample["id"]: sample for sample in cache.manifest["samples"]}
        ids = table["Id"].tolist()
        files = [[Path(f) for f in sample_files] for sample_files in table["files"]]
        stats = [_present_stats(sample_files) for sample_files in files]
        header = f"{source.name}: {cache.array} (packed {cache.manifest['packed_at']})"
        if all(st is None for sample_stats in stats for st in sample_stats):
            print(f"{header}: the image files ({source.images}) are absent, nothing to compare; training and "
                  "prediction use the cache as packed")
            continue
        absent = [i for i, sample_stats in enumerate(stats) if None in sample_stats]
        unpacked = [i for i in range(len(ids)) if ids[i] not in packed and i not in absent]
        problems += [f"{source.name}: {ids[i]!r} has no file {files[i][stats[i].index(None)]}" for i in absent]
        problems += [f"{source.name}: {ids[i]!r} is not in the cache (added since packing)" for i in unpacked]
        skip = set(absent) | set(unpacked)
        to_hash = [i for i in range(len(ids)) if i not in skip]
        with ThreadPoolExecutor(workers) as pool:
            digests = list(progress_bar(pool.map(content_digest, [files[i] for i in to_hash]), total=len(to_hash),
                                        desc=f"verifying {source.name}", disable=not progress, unit="img",
                                        mininterval=1.0))
        changed, touched = 0, []
        for i, digest in zip(to_hash, digests):
            sample = packed[ids[i]]
            restamped = [path.name for path, now, then in zip(files[i], stats[i], sample["files"]) if now != then]
            if digest != sample["blake2b"]:
                changed += 1
                stamps = f"other size or time: {', '.join(restamped)}" if restamped else "same sizes and times"
                problems.append(f"{source.name}: {ids[i]!r} changed since packing (its bytes; {stamps})")
            elif restamped:
                touched.append(ids[i])
        print(f"{header}: {len(to_hash)} samples compared, {changed} changed, {len(absent)} with a file absent, "
              f"{len(unpacked)} not in the cache")
        if touched:
            print(f"  {len(touched)} sample(s) (e.g. {touched[0]!r}) hold the bytes that were packed under other file "
                  "sizes or times (copied or touched): training's freshness check compares sizes and times and "
                  "calls them stale; pack again to record them")
    return problems


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the image files with the packed cache (sizes, times and content); "
                             "exit 2 listing the changed samples")
    args = parser.parse_args()
    cfg = config_from_args(args)
    if not args.verify:
        pack(cfg, args.workers)
        return
    problems = verify(cfg, args.workers)
    for line in problems[:200]:
        print(f"  {line}")
    if len(problems) > 200:
        print(f"  ... and {len(problems) - 200} more")
    if problems:
        raise PipelineError(f"the packed cache differs from its sources ({len(problems)} line(s) above): run "
                            "`python -m src.pack` again")
    print("the packed cache matches its sources")


if __name__ == "__main__":
    run_cli(main)
