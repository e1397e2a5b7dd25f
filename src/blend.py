"""Blend what you did not train: submission files by label vote, score files by rank.

    python -m src.blend a.csv b.csv c.csv --out blend.csv [--by vote|rank] [--weights 2 1 1] [--separator " "]

``--by vote`` (the default) blends SUBMISSIONS (two columns: an Id and its labels, as Kaggle takes them): a label
is kept on a row when the files that predict it hold more than half of the total weight; a row that keeps no label
gets the labels with the most votes (every row has a label, as ``predict.min_labels`` = 1 ensures). Where only
submission CSVs exist (a teammate's, a public kernel's), this is all that can be done honestly: there are no
scores to threshold and no OOF rows to fit or check weights on.

``--by rank`` blends SCORE FILES (``Id`` + one column per label, as ``run.dir/test_probs.csv``): each file's scores
become per-label ranks scaled to (0, 1], averaged with the weights, and written as a score table. Labels need a
decision fitted on OOF: blend the OOF score files the same way and give the pair to ``predict.runs`` as
``{scores: {oof: ..., test: ...}}`` (docs/prediction.md); ranks of different row sets are comparable only when the
sets are alike. A submission has no scores, so it cannot be rank-blended.

Every file must hold the same Ids (and, by rank, the same label columns) as the first; rows come out in the first
file's order. A bad file stops with one line naming it and its first bad Id or column (exit 2).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from src.cli import run_cli
from src.config import PipelineError
from src.files import write_atomic


def _read(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise PipelineError(f"{path} not found")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if frame.shape[1] < 2:
        raise PipelineError(f"{path}: expected an Id column and at least one more")
    frame[frame.columns[0]] = frame[frame.columns[0]].astype(str)
    return frame


def _aligned(path: Path, frame: pd.DataFrame, ids: pd.Index) -> pd.DataFrame:
    """``frame`` in the order of ``ids`` (the first file's), or a PipelineError naming the first Id off."""
    own = pd.Index(frame.iloc[:, 0])
    if own.duplicated().any():
        raise PipelineError(f"{path}: Id {own[own.duplicated()][0]!r} appears twice")
    missing, extra = ids.difference(own, sort=False), own.difference(ids, sort=False)
    if len(missing):
        raise PipelineError(f"{path}: Id {missing[0]!r} of the first file is missing ({len(missing)} such Ids)")
    if len(extra):
        raise PipelineError(f"{path}: Id {extra[0]!r} is not in the first file ({len(extra)} such Ids)")
    return frame.set_index(frame.columns[0]).loc[ids].reset_index()


def vote(paths: list[Path], weights: list[float], separator: str = " ") -> pd.DataFrame:
    """The label vote of submission files: per row, the labels whose files hold more than half of the total
    weight (none: the labels with the most votes), in the order the files first list them."""
    frames = [_read(path) for path in paths]
    columns = list(frames[0].columns[:2])
    for path, frame in zip(paths, frames):
        if list(frame.columns) != columns:
            raise PipelineError(f"{path}: columns {list(frame.columns)}, the first file has {columns}")
    ids = pd.Index(frames[0].iloc[:, 0])
    label_lists = [_aligned(path, frame, ids).iloc[:, 1].tolist() for path, frame in zip(paths, frames)]
    total, rows = sum(weights), []
    for labels_per_file in zip(*label_lists):
        votes: dict[str, float] = defaultdict(float)
        for weight, labels in zip(weights, labels_per_file):
            for label in dict.fromkeys(str(labels).split(separator)):  # a label listed twice votes once
                if label:
                    votes[label] += weight
        kept = [label for label, count in votes.items() if count > total / 2]
        if not kept and votes:
            most = max(votes.values())
            kept = [label for label, count in votes.items() if count == most]
        rows.append(separator.join(kept))
    return pd.DataFrame({columns[0]: ids, columns[1]: rows})


def rank(paths: list[Path], weights: list[float]) -> pd.DataFrame:
    """The weighted mean of per-label ranks (scaled to (0, 1], ties averaged) of score files."""
    frames = [_read(path) for path in paths]
    id_column, labels = frames[0].columns[0], list(frames[0].columns[1:])
    ids = pd.Index(frames[0].iloc[:, 0])
    blended = np.zeros((len(ids), len(labels)))
    for path, frame, weight in zip(paths, frames, weights):
        missing = [label for label in labels if label not in frame.columns]
        extra = [column for column in frame.columns[1:] if column not in labels]
        if missing or extra:
            bad = f"no column {missing[0]!r}" if missing else f"column {extra[0]!r} is not in the first file"
            raise PipelineError(f"{path}: {bad}")
        scores = _aligned(path, frame, ids)[labels].apply(pd.to_numeric, errors="coerce")
        if scores.isna().to_numpy().any():
            row = int(np.flatnonzero(scores.isna().to_numpy().any(axis=1))[0])
            raise PipelineError(f"{path}: Id {ids[row]!r} has a score that is not a number")
        blended += weight * scores.rank(axis=0, method="average").to_numpy() / len(ids)
    out = pd.DataFrame(blended / sum(weights), columns=labels)
    out.insert(0, id_column, ids)
    return out


def blend(paths: list[Path], out: Path, by: str = "vote", weights: list[float] | None = None,
          separator: str = " ") -> Path:
    """Blend ``paths`` (submissions by vote, score files by rank) into ``out``, written atomically."""
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths) or min(weights) <= 0:
        raise PipelineError(f"--weights: {len(paths)} positive weights expected (one per file), got {weights}")
    if by == "vote":
        table = vote(paths, weights, separator)
        return write_atomic(out, lambda tmp: table.to_csv(tmp, index=False))
    table = rank(paths, weights)
    return write_atomic(out, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="submission files (--by vote) or score files (--by rank)")
    parser.add_argument("--out", required=True, type=Path, help="the blended file to write")
    parser.add_argument("--by", choices=["vote", "rank"], default="vote")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per file (default: 1 each)")
    parser.add_argument("--separator", default=" ", help="between a row's labels (default: a space)")
    args = parser.parse_args()
    written = blend(args.files, args.out, args.by, args.weights, args.separator)
    print(f"wrote {written} ({args.by} of {len(args.files)} files)")


if __name__ == "__main__":
    run_cli(main)
