"""Stage 1c (optional, for speed): pack every image source into one uint8 array at ``data.image_size``.

    python -m src.pack [--config FILE] [--workers N] [key=value ...]

Decoding four PNGs (or 2048 px JPEGs, as in the external HPAv18 set) per sample per step is what limits a
loader; a packed array is read at memory speed. For each source (``train``, every ``data.extra`` source as
``extra<i>``, ``test``) this writes under ``data.cache_dir``:

    <name>-<size>px.u8      N x size x size x 4 uint8 (RGBY), rows in the source csv's order
    <name>-<size>px.json    manifest: source paths, Ids, size, and per sample its files' sizes and
                            modification times (the freshness check) and a BLAKE2 hash of their bytes

Sources are validated first. Packing runs in parallel over ``--workers`` processes with a progress bar,
and is resumable: rows are written into ``<name>-<size>px.u8.partial`` and the rows done are recorded
beside it, so an interrupted run continues where it stopped; the array and its manifest are renamed into
place only when complete. Training and prediction use a cache when it exists and is fresh (same Ids, size
and file sizes/times), and stop with a message when it is stale: never a silent mix of old and new images.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, DataConfig, PipelineError
from src.data import Source, test_source, train_sources
from src.dataset import PackedImages
from src.files import write_atomic
from src.formats import get_format
from src.images import decode_file, decode_plane, fit_size, stack_planes
from src.validate import require_valid

CHUNK = 64  # samples per task: big enough to amortise the task overhead, small enough to resume finely
VERSION = 1


def array_path(cfg: DataConfig, name: str) -> Path:
    return Path(cfg.cache_dir) / f"{name}-{cfg.image_size}px.u8"


def manifest_path(cfg: DataConfig, name: str) -> Path:
    return Path(cfg.cache_dir) / f"{name}-{cfg.image_size}px.json"


def file_stats(paths: list[Path]) -> list[list[int]]:
    """(size, mtime in ns) of each file: what the freshness check compares."""
    stats = [path.stat() for path in paths]
    return [[st.st_size, st.st_mtime_ns] for st in stats]


def _pack_rows(task: tuple[str, tuple[int, ...], list[tuple[int, list[str]]], int]) -> list[tuple]:
    """Decode, resize and write some rows of one array (runs in a worker process)."""
    out_path, shape, rows, size = task
    array = np.memmap(out_path, dtype=np.uint8, mode="r+", shape=shape)
    done = []
    for row, files in rows:
        paths = [Path(f) for f in files]
        digest = hashlib.blake2b(digest_size=16)
        encoded = [np.fromfile(path, dtype=np.uint8) for path in paths]
        for data in encoded:
            digest.update(data.tobytes())
        if len(paths) == 1:  # one file with its own channels (openimages, csv)
            array[row] = fit_size(decode_file(paths[0], shape[-1], encoded[0]), size)
        else:  # one file per channel (hpa)
            array[row] = stack_planes([decode_plane(p, e) for p, e in zip(paths, encoded)], size)
        done.append((row, file_stats(paths), digest.hexdigest()))
    array.flush()
    return done


def pack_source(cfg: DataConfig, source: Source, table: pd.DataFrame, workers: int, progress: bool,
                channels: int = 4) -> Path:
    """Pack one source (resuming a partial run of the same plan); returns the array's path. ``channels``:
    of each sample (hpa: its four planes; one-file formats: model.in_chans)."""
    final, manifest = array_path(cfg, source.name), manifest_path(cfg, source.name)
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
        with open(partial, "wb") as handle:  # sparse: rows are filled in any order
            handle.truncate(int(np.prod(shape)))

    def record() -> None:
        rows = [[row, stats, digest] for row, (stats, digest) in sorted(done.items())]
        write_atomic(progress_file, lambda tmp: tmp.write_text(json.dumps({"plan": plan, "done": rows})))

    todo = [(row, list(files)) for row, files in enumerate(table["files"]) if row not in done]
    tasks = [(str(partial), shape, todo[start : start + CHUNK], size) for start in range(0, len(todo), CHUNK)]
    bar = tqdm(total=len(ids), initial=len(done), desc=f"packing {source.name} ({size} px)", disable=not progress,
               unit="img", mininterval=1.0)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for finished, results in enumerate(pool.map(_pack_rows, tasks), start=1):
            for row, stats, digest in results:
                done[row] = (stats, digest)
            bar.update(len(results))
            if finished % 16 == 0:
                record()
    bar.close()
    samples = [{"id": ids[row], "files": stats, "blake2b": digest} for row, (stats, digest) in sorted(done.items())]
    meta = {"version": VERSION, "shape": list(shape), **plan, "samples": samples}
    os.replace(partial, final)
    write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(meta)))  # the manifest last: it marks "complete"
    progress_file.unlink(missing_ok=True)
    return final


def pack(cfg: Config, workers: int | None = None, progress: bool = True) -> list[Path]:
    """Validate, then pack every source of ``cfg.data`` into ``data.cache_dir``; returns the arrays."""
    if cfg.data.cache_dir is None:
        raise PipelineError("data.cache_dir is null: set it to the folder the packed arrays go to")
    require_valid(cfg, progress=progress)
    workers = workers or os.cpu_count() or 1
    written = []
    fmt = get_format(cfg.data)
    channels = fmt.channels(cfg)
    for source, split in [(s, "train") for s in train_sources(cfg.data)] + [(test_source(cfg.data), "test")]:
        table = fmt.read_source(cfg.data, source, split).frame
        path = pack_source(cfg.data, source, table, workers, progress, channels)
        written.append(path)
        if progress:
            print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) and {manifest_path(cfg.data, source.name)}")
    return written


def open_packed(cfg: DataConfig, table: pd.DataFrame) -> PackedImages | None:
    """The packed rows of ``table``'s samples, when ``data.cache_dir`` holds a cache of their sources at
    ``data.image_size``; None when it holds none. A cache that no longer matches its source (Ids, size,
    or a file changed since packing) or covers only some of the sources is an error, never mixed in."""
    if cfg.cache_dir is None or table.empty:
        return None
    sources = {str(src.csv): src for src in train_sources(cfg) + [test_source(cfg)]}
    needed = {sources[csv].name: sources[csv] for csv in table["source"].unique()}
    present = {name for name in needed if manifest_path(cfg, name).is_file()}
    if not present:
        return None
    if present != set(needed):
        raise PipelineError(f"{cfg.cache_dir} holds packed arrays for {sorted(present)} but not for "
                            f"{sorted(set(needed) - present)}: run `python -m src.pack` (or data.cache_dir=null)")
    arrays, position = {}, {}
    for name in needed:
        manifest = json.loads(manifest_path(cfg, name).read_text())
        arrays[name] = (str(array_path(cfg, name)), tuple(manifest["shape"]))
        position[name] = {sample["id"]: (row, sample["files"]) for row, sample in enumerate(manifest["samples"])}
    rows = []
    for sample_id, csv, files in zip(table["Id"], table["source"], table["files"]):
        name = sources[csv].name
        found = position[name].get(sample_id)
        paths = [Path(f) for f in files]
        if found is None or found[1] != file_stats(paths):
            why = "is not in it" if found is None else f"changed since packing ({paths[0].parent})"
            raise PipelineError(f"the packed cache {array_path(cfg, name)} is stale: sample {sample_id!r} {why}. "
                                "Run `python -m src.pack` again (or data.cache_dir=null to read the images)")
        rows.append((name, found[0]))
    return PackedImages(arrays, rows)


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args()
    pack(config_from_args(args), args.workers)


if __name__ == "__main__":
    run_cli(main)
