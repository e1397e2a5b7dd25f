"""Stage 1a: check the whole dataset before any work, and report every problem (not just the first).

    python -m src.validate [--config FILE] [--deep] [key=value ...]

Checks: label csvs (readable, columns, Ids safe as file names, no duplicate Id within or across sources,
labels integers in [0, num_classes)), and for every train and test sample its four channel PNGs
(present, readable, 8-bit single-channel, complete, one size per sample and per source). By default a
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
from src.data import CHANNELS, Problem, channel_paths, read_test_ids, read_train_labels


class ValidationFailed(PipelineError):
    """The dataset has problems; ``problems`` lists them all."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"dataset has {len(problems)} problem(s):\n  {shown}{more}")


# What a complete file ends with: PNG's IEND chunk (length 0, type, CRC); JPEG's end-of-image marker.
FILE_END = {"PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
FORMATS = {"png": "PNG", "jpg": "JPEG"}


def _ends_complete(path: Path, end: bytes) -> bool:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() < len(end):
            return False
        file.seek(-len(end), os.SEEK_END)
        return file.read() == end


def _inspect_png(path: Path, deep: bool, ext: str = "png") -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of a channel image (PNG, or JPEG for an extra source), or why it cannot be used."""
    if not path.is_file():
        return None, "missing image"
    try:
        with Image.open(path) as image:
            size, mode, fmt = image.size, image.mode, image.format
            if deep:
                image.verify()
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "unreadable"
        return None, f"unreadable image ({type(exc).__name__}: {exc})"
    expected = FORMATS[ext]
    if fmt != expected:
        return None, f"not a {expected} (format {fmt})"
    if not _ends_complete(path, FILE_END[fmt]):
        return None, f"truncated {fmt} (no end marker: an interrupted download or copy?)"
    if mode == "RGB" and fmt == "JPEG":  # HPAv18 stores grey channels as RGB JPEGs: read as grey
        return size, None
    if mode != "L":
        bands = len(Image.new(mode, (1, 1)).getbands()) if mode not in ("I;16", "I;16B") else 1
        return None, f"expected 8-bit grayscale (1 channel), found mode {mode} with {bands} channel(s)"
    return size, None


def check_images(table: pd.DataFrame, split: str, expected_size: int | None, deep: bool = False,
                 progress: bool = True) -> list[Problem]:
    """Check the four channel PNGs of every sample of ``table``; sizes must agree per sample and source."""
    paths = [(ext, path) for sample_id, image_dir, ext in zip(table["Id"], table["image_dir"], table["ext"])
             for path in channel_paths(image_dir, sample_id, ext)]
    workers = min(16, (os.cpu_count() or 1) * 4)  # file reads wait on disk, so threads overlap well
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(lambda item: _inspect_png(item[1], deep, item[0]), paths), total=len(paths),
                            desc=f"checking {split} images", disable=not progress, mininterval=1.0))
    problems = [Problem(str(path), why) for (_, path), (_, why) in zip(paths, results) if why]
    sizes = [size for size, _ in results]
    known = [size for size in sizes if size is not None]
    if not known:
        return problems
    reference = (expected_size, expected_size) if expected_size else Counter(known).most_common(1)[0][0]
    for (_, path), size in zip(paths, sizes):
        if size is not None and size != reference:
            problems.append(Problem(str(path), f"wrong size {size[0]}x{size[1]}, expected "
                                               f"{reference[0]}x{reference[1]}"))
    return problems


def validate(cfg: Config, deep: bool = False, progress: bool = True) -> list[Problem]:
    """Every problem of the dataset described by ``cfg.data``; an empty list means it is usable."""
    train = read_train_labels(cfg.data)
    test = read_test_ids(cfg.data)
    problems = train.problems + test.problems
    for source, rows in train.frame.groupby("source", sort=False):
        problems += check_images(rows, f"train ({Path(source).name})", cfg.data.source_size, deep, progress)
    problems += check_images(test.frame, "test", cfg.data.source_size, deep, progress)
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
    train, test = read_train_labels(cfg.data).frame, read_test_ids(cfg.data).frame
    print(f"dataset OK: {len(train)} training samples, {len(test)} test samples, "
          f"{len(CHANNELS)} channels, {cfg.data.num_classes} classes")


if __name__ == "__main__":
    run_cli(main)
