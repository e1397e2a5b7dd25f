"""Stage 0: write a synthetic HPA-format dataset, so the whole pipeline runs without Kaggle data.

Each class owns a small random glyph. An image's labels decide which glyphs tile a quadrant of its
*green* channel (the protein channel in HPA; a class is a repeated pattern, as a protein localisation
is). The red, blue and yellow channels carry cell-like blobs and the patterns of random other classes
as distractors, so a model must learn to read the green channel. Label frequencies follow a power law
(like HPA's: a few common classes, many rare ones; about 1.6 labels per image), so a constant predictor scores
badly on macro-F1. Everything is decided by the seed.

    python -m src.demo --out input/demo --train 2000 --test 300 --size 64
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from src.config import PipelineError, run_cli
from src.data import write_rgby

GLYPH_SIDES = ((90, 3), (10_000, 4))  # glyph side in cells: 3 x 3 has 90 usable patterns, 4 x 4 thousands


def d4_orbit(glyph: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and reflections of a glyph."""
    return [np.rot90(g, k) for g in (glyph, glyph[:, ::-1]) for k in range(4)]


def class_glyphs(num_classes: int, rng: np.random.Generator, min_distance: int = 2) -> np.ndarray:
    """One binary pattern per class (3 x 3 cells; 4 x 4 for more than 90 classes). Microscopy has no up
    or right, so the pipeline augments with rotations and flips: two glyphs differ in >= ``min_distance``
    cells under every rotation and reflection (where too few such patterns exist, in >= 1: still distinct
    after augmentation). All patterns are tried in random order, so this always ends."""
    side = next((side for limit, side in GLYPH_SIDES if num_classes <= limit), GLYPH_SIDES[-1][1])
    cells = side * side
    codes = rng.permutation(2**cells)
    glyphs: list[np.ndarray] = []
    for distance in sorted({min_distance, 1}, reverse=True):
        for code in codes:
            glyph = ((int(code) >> np.arange(cells)) & 1).astype(bool).reshape(side, side)
            if glyph.sum() >= cells // 3 and all(
                    (variant != other).sum() >= distance for other in glyphs for variant in d4_orbit(glyph)):
                glyphs.append(glyph)
                if len(glyphs) == num_classes:
                    return np.stack(glyphs)
    raise PipelineError(f"the demo generator has only {len(glyphs)} distinct patterns; ask for fewer classes")


def label_rates(num_classes: int, top_rate: float = 0.4, exponent: float = 1.0) -> np.ndarray:
    """Power-law label frequencies: class 0 is common, the last classes are rare."""
    return top_rate / np.arange(1, num_classes + 1) ** exponent


def sample_labels(rates: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Independent draws per class; at least one label per image, as in HPA."""
    labels = np.flatnonzero(rng.random(len(rates)) < rates)
    if len(labels) == 0:
        labels = [int(rng.choice(len(rates), p=rates / rates.sum()))]
    return sorted(int(label) for label in labels)


def _tile(plane: np.ndarray, glyph: np.ndarray, quadrant: int, value: int) -> None:
    """Fill one quadrant of ``plane`` with the glyph repeated on a grid: a class's "localisation pattern"."""
    half = plane.shape[0] // 2
    scale = max(1, plane.shape[0] // 32)
    side = glyph.shape[0] * scale
    period = side + scale
    motif = np.zeros((period, period), dtype=bool)
    motif[:side, :side] = np.kron(glyph, np.ones((scale, scale), dtype=bool))
    repeats = half // period + 1
    mask = np.tile(motif, (repeats, repeats))[:half, :half]
    y, x = divmod(quadrant, 2)
    region = plane[y * half : (y + 1) * half, x * half : (x + 1) * half]
    region[mask] = np.maximum(region[mask], value)


def _blobs(plane: np.ndarray, count: int, rng: np.random.Generator) -> None:
    size = plane.shape[0]
    yy, xx = np.mgrid[:size, :size]
    for _ in range(count):
        cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(size // 16 + 2, size // 6 + 3)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        plane[mask] = np.maximum(plane[mask], rng.integers(60, 140))


def render_image(labels: list[int], glyphs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One H x W x 4 uint8 image whose green channel encodes ``labels``: each label's glyph tiles one
    quadrant (up to four labels show; HPA images average 1.6)."""
    image = rng.integers(0, 40, (size, size, 4), dtype=np.uint8)
    for label, quadrant in zip(labels, rng.permutation(4)):
        _tile(image[..., 1], glyphs[label], int(quadrant), int(rng.integers(150, 256)))
    for channel in (0, 2, 3):  # distractors: cell-like blobs and the patterns of random classes
        _blobs(image[..., channel], 3, rng)
        for label, quadrant in zip(rng.choice(len(glyphs), size=2), rng.permutation(4)):
            _tile(image[..., channel], glyphs[label], int(quadrant), int(rng.integers(150, 256)))
    return image


def make_demo_dataset(out: str | Path, n_train: int = 2000, n_test: int = 300, size: int = 64,
                      num_classes: int = 28, seed: int = 0, progress: bool = True) -> Path:
    """Write train.csv, sample_submission.csv, train/, test/ and test_solution.csv (hidden truth) to ``out``.

    Written to a temporary sibling folder and renamed into place, so an interrupted run leaves nothing
    half-written.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    glyphs = class_glyphs(num_classes, rng)
    rates = label_rates(num_classes)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "test").mkdir()
    rows = {"train": [], "test": []}
    jobs = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    for split, index in tqdm(jobs, desc=f"demo images -> {out}", disable=not progress):
        sample_id = f"{split}{index:05d}"
        labels = sample_labels(rates, rng)
        write_rgby(tmp / split, sample_id, render_image(labels, glyphs, size, rng))
        rows[split].append((sample_id, " ".join(map(str, labels))))
    return finish_dataset(tmp, out, rows)


def finish_dataset(tmp: Path, out: Path, rows: dict[str, list[tuple[str, str]]]) -> Path:
    """Write the label tables of a generated HPA-layout dataset built in ``tmp`` (``train.csv``,
    ``sample_submission.csv`` and ``test_solution.csv``, the hidden test labels) from ``(Id, Target)`` rows
    per split, then move it into place at ``out``."""
    pd.DataFrame(rows["train"], columns=["Id", "Target"]).to_csv(tmp / "train.csv", index=False)
    pd.DataFrame(rows["test"], columns=["Id", "Target"]).to_csv(tmp / "test_solution.csv", index=False)
    pd.DataFrame({"Id": [r[0] for r in rows["test"]], "Predicted": "0"}).to_csv(
        tmp / "sample_submission.csv", index=False)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="input/demo", help="folder to write (replaced if present)")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=300, help="test images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=28, help="number of classes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_demo_dataset(args.out, args.train, args.test, args.size, args.classes, args.seed)
    print(f"wrote {args.train} train and {args.test} test images ({args.size} px, {args.classes} classes) to {out}")


if __name__ == "__main__":
    run_cli(main)
