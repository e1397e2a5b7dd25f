"""Stage 0: write a synthetic HPA-format dataset, so the whole pipeline runs without Kaggle data.

Each class owns a small random glyph. An image's labels decide which glyphs are stamped, at random
places, into its *green* channel (the protein channel in HPA). The red, blue and yellow channels carry
cell-like blobs and glyphs of random other classes as distractors, so a model must learn to read the
green channel. Label frequencies follow a power law (like HPA's: a few common classes, many rare ones),
so a constant predictor scores badly on macro-F1. Everything is decided by the seed.

    python -m src.demo --out input/demo --train 600 --test 200 --size 128
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from src.config import run_cli
from src.data import write_rgby

GLYPH = 5  # glyph side in cells


def d4_orbit(glyph: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and reflections of a glyph."""
    return [np.rot90(g, k) for g in (glyph, glyph[:, ::-1]) for k in range(4)]


def class_glyphs(num_classes: int, rng: np.random.Generator, min_distance: int = 3) -> np.ndarray:
    """One random binary GLYPH x GLYPH pattern per class. Microscopy has no up or right, so the
    pipeline augments with rotations and flips: any two glyphs differ in >= ``min_distance`` cells under
    every rotation and reflection, so that a class stays recognisable after augmentation."""
    glyphs: list[np.ndarray] = []
    while len(glyphs) < num_classes:
        glyph = rng.random((GLYPH, GLYPH)) < 0.5
        if glyph.sum() >= GLYPH * GLYPH // 3 and all(
                (variant != other).sum() >= min_distance for other in glyphs for variant in d4_orbit(glyph)):
            glyphs.append(glyph)
    return np.stack(glyphs)


def label_rates(num_classes: int, top_rate: float = 0.4, exponent: float = 0.6) -> np.ndarray:
    """Power-law label frequencies: class 0 is common, the last classes are rare."""
    return top_rate / np.arange(1, num_classes + 1) ** exponent


def sample_labels(rates: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Independent draws per class; at least one label per image, as in HPA."""
    labels = np.flatnonzero(rng.random(len(rates)) < rates)
    if len(labels) == 0:
        labels = [int(rng.choice(len(rates), p=rates / rates.sum()))]
    return sorted(int(label) for label in labels)


def _cell_origins(size: int, side: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping side x side cells, in random order (jittered inside a cell)."""
    cell = side + max(2, side // 3)
    per_row = size // cell
    origins = []
    for index in rng.permutation(per_row * per_row):
        y, x = divmod(int(index), per_row)
        jitter = rng.integers(0, cell - side + 1, size=2)
        origins.append((y * cell + int(jitter[0]), x * cell + int(jitter[1])))
    return origins


def _stamp(plane: np.ndarray, glyph: np.ndarray, scale: int, origin: tuple[int, int], value: int) -> None:
    big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
    region = plane[origin[0] : origin[0] + big.shape[0], origin[1] : origin[1] + big.shape[1]]
    region[big] = np.maximum(region[big], value)


def _blobs(plane: np.ndarray, count: int, rng: np.random.Generator) -> None:
    size = plane.shape[0]
    yy, xx = np.mgrid[:size, :size]
    for _ in range(count):
        cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(size // 16 + 2, size // 6 + 3)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        plane[mask] = np.maximum(plane[mask], rng.integers(60, 140))


def render_image(labels: list[int], glyphs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One H x W x 4 uint8 image whose green channel encodes ``labels``: each label's glyph once or twice,
    in cells that do not overlap (as many as fit)."""
    scale = max(1, size // 20)
    side = GLYPH * scale
    image = rng.integers(0, 40, (size, size, 4), dtype=np.uint8)
    stamps = [label for label in labels for _ in range(rng.integers(1, 3))]
    for label, origin in zip(stamps, _cell_origins(size, side, rng)):
        _stamp(image[..., 1], glyphs[label], scale, origin, int(rng.integers(170, 256)))
    for channel in (0, 2, 3):  # distractors: cell-like blobs and glyphs of random classes
        _blobs(image[..., channel], 3, rng)
        for label, origin in zip(rng.choice(len(glyphs), size=3), _cell_origins(size, side, rng)):
            _stamp(image[..., channel], glyphs[label], scale, origin, int(rng.integers(170, 256)))
    return image


def make_demo_dataset(out: str | Path, n_train: int = 600, n_test: int = 200, size: int = 128,
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
    parser.add_argument("--train", type=int, default=600, help="training images")
    parser.add_argument("--test", type=int, default=200, help="test images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=28, help="number of classes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_demo_dataset(args.out, args.train, args.test, args.size, args.classes, args.seed)
    print(f"wrote {args.train} train and {args.test} test images ({args.size} px, {args.classes} classes) to {out}")


if __name__ == "__main__":
    run_cli(main)
