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

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError
from src.data import Problem
from src.formats import DatasetFormat, get_format, read_test_ids, read_train_labels
from src.progress import bar as progress_bar
from src.progress import note


class ValidationFailed(PipelineError):
    """The dataset has problems; ``problems`` lists them all."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"dataset has 1 problem: {problems[0]}")
            return
        shown = "\n  ".join(str(p) for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"dataset has {len(problems)} problem(s):\n  {shown}{more}")


def check_images(fmt: DatasetFormat, table: pd.DataFrame, split: str, expected_size: int | None, channels: int,
                 deep: bool = False, progress: bool = True) -> list[Problem]:
    """Check the image files of every sample of ``table`` as its format checks a file (``fmt.inspect_file``:
    HPA's channel PNGs are 8-bit grey; a one-file image converts to ``channels``); where the format stacks
    planes (``fmt.uniform_size``) every file of the table has one size (``expected_size``, else the commonest)."""
    paths = [(Path(f), ext) for files, ext in zip(table["files"], table["ext"]) for f in files]
    workers = min(16, (os.cpu_count() or 1) * 4)  # file reads wait on disk, so threads overlap well
    with ThreadPoolExecutor(workers) as pool:
        results = list(progress_bar(pool.map(lambda item: fmt.inspect_file(item[0], item[1], deep, channels), paths),
                                    total=len(paths), desc=f"checking {split} images", disable=not progress,
                                    mininterval=1.0))
    problems = [Problem(str(path), why) for (path, _), (_, why) in zip(paths, results) if why]
    if not fmt.uniform_size:
        return problems
    sizes = [size for size, _ in results]
    known = [size for size in sizes if size is not None]
    if not known:
        return problems
    reference = (expected_size, expected_size) if expected_size else Counter(known).most_common(1)[0][0]
    for (path, _), size in zip(paths, sizes):
        if size is not None and size != reference:
            problems.append(Problem(str(path), f"wrong size {size[0]}x{size[1]}, expected "
                                               f"{reference[0]}x{reference[1]}"))
    return problems


def validate(cfg: Config, deep: bool = False, progress: bool = True, absent_ok: bool = False) -> list[Problem]:
    """Every problem of the dataset described by ``cfg.data``; an empty list means it is usable. ``absent_ok``
    (for a stage that needs only the labels): a source none of whose image files exists (its images moved away,
    a packed cache used in their place) is left unchecked with a note, instead of one problem per file."""
    train = read_train_labels(cfg.data)
    test = read_test_ids(cfg.data)
    problems = train.problems + test.problems
    fmt = get_format(cfg.data)
    channels = fmt.channels(cfg)
    splits = [(f"train ({Path(source).name})", rows) for source, rows in train.frame.groupby("source", sort=False)]
    for split, rows in splits + [("test", test.frame)]:
        if absent_ok and len(rows) and not any(os.path.exists(f) for files in rows["files"] for f in files):
            note(f"note: not one image file of {split} is present (e.g. {rows['files'].iloc[0][0]}): its images "
                 "are not checked")
            continue
        problems += check_images(fmt, rows, split, cfg.data.source_size, channels, deep, progress)
    return problems


def require_valid(cfg: Config, deep: bool = False, progress: bool = True, absent_ok: bool = False) -> None:
    """Raise :class:`ValidationFailed` listing every problem, or return quietly (``absent_ok``: see validate)."""
    problems = validate(cfg, deep, progress, absent_ok)
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
    channels = get_format(cfg.data).channels(cfg)
    print(f"dataset OK ({cfg.data.format}): {len(table.frame)} training samples, {len(test)} test samples, "
          f"{channels} channels, {len(table.vocabulary)} classes")


if __name__ == "__main__":
    run_cli(main)
