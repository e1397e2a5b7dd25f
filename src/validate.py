"""Stage 1a: check the whole dataset before any work, and report every problem (not just the first).

    python -m src.validate [--config FILE] [--deep] [key=value ...]

Checks: label csvs (readable, columns, Ids safe as file names, no duplicate Id within or across sources;
hpa: labels integers in [0, num_classes); openimages: Confidence 0 or 1, label ids without spaces), the
label vocabulary files, and for every train and test sample its images: hpa's four channel PNGs (present,
readable, 8-bit single-channel, complete, one size per sample and per source), or one PNG/JPEG per sample
(present, readable, 8-bit, complete, channels convertible to ``model.in_chans``). By default a
PNG's header and its last 12 bytes (the IEND chunk every complete PNG ends with: a cut-off download or copy
lacks it) are read; ``--deep`` also verifies every chunk's checksum (reads all bytes). A label table with no
rows is a problem too.
Exits 2 (like every stage on a user-fixable problem) when anything is wrong; writes nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from src.config import Config, PipelineError, cli_parser, config_from_args, run_cli
from src.data import CHANNELS, Problem, read_test_ids, read_train_labels


class ValidationFailed(PipelineError):
    """The dataset has problems; ``problems`` lists them all."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"dataset has {len(problems)} problem(s):\n  {shown}{more}")


# What a complete file ends with: PNG's IEND chunk (length 0, type, CRC); JPEG's end-of-image marker.
FILE_END = {"PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
# Channel counts a one-file image may have for a model with ``in_chans`` inputs (src.data.decode_file converts).
CONVERTIBLE = {3: {1, 3, 4}}


def _ends_complete(path: Path, end: bytes) -> bool:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() < len(end):
            return False
        file.seek(-len(end), os.SEEK_END)
        return file.read() == end


def _png_bit_depth(path: Path) -> int:
    """The bit depth per sample in a PNG's IHDR chunk (byte 24 of the file)."""
    with open(path, "rb") as file:
        header = file.read(25)
    return header[24] if len(header) == 25 else 0


def _inspect_png(path: Path, deep: bool, ext: str = "png", channels: int | None = None
                 ) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of a channel image (PNG, or JPEG for an extra source), or why it cannot be used.
    ``channels``: a one-file image (openimages, csv) that must convert to this many channels."""
    if not path.is_file():
        return None, "missing image"
    try:
        with Image.open(path) as image:
            size, mode, fmt = image.size, image.mode, image.format
            if deep:
                image.verify()
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "unreadable"
        return None, f"unreadable image ({type(exc).__name__}: {exc})"
    expected = FORMATS.get(ext.lower())
    if expected is None:
        return None, f"not a PNG or JPEG file name (extension {ext!r})"
    if fmt != expected:
        return None, f"not a {expected} (format {fmt})"
    if not _ends_complete(path, FILE_END[fmt]):
        return None, f"truncated {fmt} (no end marker: an interrupted download or copy?)"
    if channels is not None:
        if fmt == "PNG" and (depth := _png_bit_depth(path)) != 8 and mode not in ("1", "P"):
            # PIL opens a 16-bit RGB PNG as 8-bit "RGB"; the reader (OpenCV) keeps 16 bits and refuses it.
            return None, f"{depth}-bit PNG: the pipeline reads 8-bit images"
        bands = len(Image.new(mode, (1, 1)).getbands()) if mode not in ("I;16", "I;16B", "I", "F") else 0
        if mode in ("I;16", "I;16B", "I", "F") or bands == 0:
            return None, f"mode {mode}: the pipeline reads 8-bit images"
        if bands != channels and bands not in CONVERTIBLE.get(channels, set()):
            return None, f"{bands} channel(s) (mode {mode}), the model takes model.in_chans={channels}"
        return size, None
    if mode == "RGB" and fmt == "JPEG":  # HPAv18 stores grey channels as RGB JPEGs: read as grey
        return size, None
    if mode != "L":
        bands = len(Image.new(mode, (1, 1)).getbands()) if mode not in ("I;16", "I;16B") else 1
        return None, f"expected 8-bit grayscale (1 channel), found mode {mode} with {bands} channel(s)"
    return size, None


def check_images(table: pd.DataFrame, split: str, expected_size: int | None, deep: bool = False,
                 progress: bool = True, channels: int | None = None) -> list[Problem]:
    """Check the image files of every sample of ``table``: HPA's four channel PNGs (8-bit grey, sizes agreeing
    per sample and source), or one image per sample (``channels``: convertible to model.in_chans; any size,
    as they are resized)."""
    paths = [(Path(f).suffix.lstrip(".") if len(files) == 1 else ext, Path(f), len(files) == 1)
             for files, ext in zip(table["files"], table["ext"]) for f in files]
    workers = min(16, (os.cpu_count() or 1) * 4)  # file reads wait on disk, so threads overlap well
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(lambda item: _inspect_png(item[1], deep, item[0], channels if item[2] else None),
                                     paths), total=len(paths),
                            desc=f"checking {split} images", disable=not progress, mininterval=1.0))
    problems = [Problem(str(path), why) for (_, path, _), (_, why) in zip(paths, results) if why]
    if any(single for _, _, single in paths):
        return problems
    sizes = [size for size, _ in results]
    known = [size for size in sizes if size is not None]
    if not known:
        return problems
    reference = (expected_size, expected_size) if expected_size else Counter(known).most_common(1)[0][0]
    for (_, path, _), size in zip(paths, sizes):
        if size is not None and size != reference:
            problems.append(Problem(str(path), f"wrong size {size[0]}x{size[1]}, expected "
                                               f"{reference[0]}x{reference[1]}"))
    return problems


def validate(cfg: Config, deep: bool = False, progress: bool = True) -> list[Problem]:
    """Every problem of the dataset described by ``cfg.data``; an empty list means it is usable."""
    train = read_train_labels(cfg.data)
    test = read_test_ids(cfg.data)
    problems = train.problems + test.problems
    channels = cfg.model.in_chans
    for source, rows in train.frame.groupby("source", sort=False):
        problems += check_images(rows, f"train ({Path(source).name})", cfg.data.source_size, deep, progress, channels)
    problems += check_images(test.frame, "test", cfg.data.source_size, deep, progress, channels)
    return problems


def require_valid(cfg: Config, deep: bool = False, progress: bool = True) -> None:
    """Raise :class:`ValidationFailed` listing every problem, or return quietly."""
    problems = validate(cfg, deep, progress)
    if problems:
        raise ValidationFailed(problems)


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--deep", action="store_true", help="also verify PNG checksums (reads every byte)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    require_valid(cfg, deep=args.deep)
    test = read_test_ids(cfg.data).frame
    table = read_train_labels(cfg.data)
    channels = len(CHANNELS) if cfg.data.format == "hpa" else cfg.model.in_chans
    print(f"dataset OK ({cfg.data.format}): {len(table.frame)} training samples, {len(test)} test samples, "
          f"{channels} channels, {len(table.vocabulary)} classes")


if __name__ == "__main__":
    run_cli(main)
