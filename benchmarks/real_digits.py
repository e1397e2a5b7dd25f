"""A second real-image multilabel set, different in kind from ``benchmarks.real_images``: real handwriting, in
the generic csv layout, RGB, uniform label rates.

Every digit is a real handwritten one from scikit-learn's bundled ``load_digits`` (1 797 scans of 8 x 8 from
the UCI optical-recognition set, shipped inside the scikit-learn wheel: nothing is downloaded). An image is a
2 x 2 grid of cells; each cell holds one digit (upscaled with scale jitter and a random offset) or stays
empty; its labels are the digits it shows (1 to 4 labels, 10 classes). Ink and paper get a random colour and
contrast, with noise, so no channel alone is the answer. Training digits come from the first 65 % of the
scans and test digits from the rest: test handwriting is unseen. Deterministic by seed.

    python -m benchmarks.real_digits --out input/digits64 --n-train 800 --n-test 300 --size 64

Layout (``data.format=csv``): ``train.csv`` (``image``, ``tags``: space-separated digit names),
``train/<image>``, ``test/<image>``, ``sample_submission.csv`` and the hidden ``test_solution.csv``
(``image``, ``tags``). Train it with ``data.format=csv data.path_column=image data.label_column=tags
data.id_column=image data.num_classes=null model.in_chans=3``, and, as for any image with an up and a left,
``train.augment.d4=0 predict.tta=[identity]``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.datasets import load_digits

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_SHARE = 0.65  # share of the scans that training digits are drawn from
CSV_KEYS = ["data.format=csv", "data.id_column=image", "data.path_column=image", "data.label_column=tags",
            "data.num_classes=null", "model.in_chans=3"]
# Handwriting has an up and a left: no flips or right-angle turns in training or at test time (a 6 turned is a 9).
ORIENTED_KEYS = ["train.augment.d4=0", "predict.tta=[identity]"]


def digit_pools(split: str) -> dict[int, np.ndarray]:
    """The scans of each digit in a split ("train": the first 65 %, "test": the rest), as float 8 x 8 in [0, 1]."""
    digits = load_digits()
    cut = int(TRAIN_SHARE * len(digits.target))
    images, targets = (digits.images[:cut], digits.target[:cut]) if split == "train" else \
        (digits.images[cut:], digits.target[cut:])
    return {d: images[targets == d] / 16.0 for d in range(10)}


def draw_image(labels: list[int], pools: dict[int, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image: the digits of ``labels`` in distinct random cells of a 2 x 2 grid."""
    return draw_cells(labels, rng.permutation(4)[: len(labels)], pools, size, rng)


def draw_cells(labels: list[int], cells, pools: dict[int, np.ndarray], size: int, rng: np.random.Generator
               ) -> np.ndarray:
    """An RGB uint8 image: digit ``labels[i]`` in cell ``cells[i]`` of a 2 x 2 grid (0 top-left, row-major)."""
    half = size // 2
    ink_mask = np.zeros((size, size), np.float32)
    for digit, cell in zip(labels, cells):
        scan = pools[digit][rng.integers(len(pools[digit]))]
        side = int(half * rng.uniform(0.6, 0.95))
        glyph = cv2.resize(scan.astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC).clip(0, 1)
        y0 = (cell // 2) * half + rng.integers(0, half - side + 1)
        x0 = (cell % 2) * half + rng.integers(0, half - side + 1)
        ink_mask[y0 : y0 + side, x0 : x0 + side] = np.maximum(ink_mask[y0 : y0 + side, x0 : x0 + side], glyph)
    # Dark ink on light paper, as handwriting is, each in a random tint.
    paper, ink = rng.uniform(150, 255, 3), rng.uniform(0, 110, 3)
    image = paper[None, None] * (1 - ink_mask[..., None]) + ink[None, None] * ink_mask[..., None]
    image += rng.normal(0, rng.uniform(2, 12), image.shape)
    return image.clip(0, 255).astype(np.uint8)


def sample_labels(rng: np.random.Generator) -> list[int]:
    """1 to 4 distinct digits, each digit equally likely."""
    count = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    return sorted(int(d) for d in rng.choice(10, size=count, replace=False))


def make_digits_dataset(out: Path, n_train: int = 800, n_test: int = 300, size: int = 64, seed: int = 0) -> None:
    """Write the set to ``out`` (replaced if present)."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, count, csv in (("train", n_train, "train.csv"), ("test", n_test, "test_solution.csv")):
        pools, rows = digit_pools(split), []
        (out / split).mkdir(parents=True)
        for index in range(count):
            labels = sample_labels(rng)
            name = f"{split}{index:05d}.png"
            cv2.imwrite(str(out / split / name), draw_image(labels, pools, size, rng)[..., ::-1])
            rows.append({"image": name, "tags": " ".join(NAMES[d] for d in labels)})
        pd.DataFrame(rows).to_csv(out / csv, index=False)
    solution = pd.read_csv(out / "test_solution.csv")
    solution.assign(tags=NAMES[0]).to_csv(out / "sample_submission.csv", index=False)


CELLS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("one digit", "two digits", "three digits", "four digits")
# Many-label digits: each digit's share falls with its rank (a long tail, as in Open Images).
MANY_DIGIT_P = 1.0 / np.arange(1, 11) ** 0.8
MANY_DIGIT_P /= MANY_DIGIT_P.sum()


def many_label_codes() -> tuple[list[str], list[str]]:
    """Label codes and descriptions of the many-label set: 10 digits, 40 digit-in-cell, 4 counts (54)."""
    codes = [f"/d/{n}" for n in NAMES] + [f"/d/{n}@{c}" for n in NAMES for c in range(4)] + \
        [f"/d/n{k}" for k in range(1, 5)]
    names = list(NAMES) + [f"{n} {CELLS[c]}" for n in NAMES for c in range(4)] + list(COUNTS)
    return codes, names


def make_digits_many(out: Path, n_train: int = 1500, n_test: int = 300, size: int = 64, seed: int = 0) -> None:
    """The same handwriting as a many-label set in the Open Images layout (``data.format=openimages``): each
    image is labelled with its digits, each digit in its cell (``/d/three@0``: top-left) and how many digits
    it shows — 54 labels, hierarchical like Open Images' (a digit-in-cell implies its digit), with digit
    frequencies falling by rank. Files: ``train_human_labels.csv`` (positives, Confidence 1),
    ``class-descriptions.csv``, ``classes-trainable.csv``, ``train/<ImageID>.jpg``, ``test/<ImageID>.jpg``,
    ``stage_1_sample_submission.csv`` and the hidden ``test_labels.csv`` (image_id, labels). Written to ``out``
    (replaced if present)."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    codes, names = many_label_codes()
    rows, truth = [], []
    for split, count in (("train", n_train), ("test", n_test)):
        pools = digit_pools(split)
        (out / split).mkdir(parents=True)
        for index in range(count):
            n_digits = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
            digits = [int(d) for d in rng.choice(10, size=n_digits, replace=False, p=MANY_DIGIT_P)]
            cells = [int(c) for c in rng.permutation(4)[:n_digits]]
            image_id = f"{split[:2]}{index:014x}"  # 16 characters, as Open Images ImageIDs
            cv2.imwrite(str(out / split / f"{image_id}.jpg"), draw_cells(digits, cells, pools, size, rng)[..., ::-1],
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            labels = sorted({f"/d/{NAMES[d]}" for d in digits} | {f"/d/{NAMES[d]}@{c}" for d, c in zip(digits, cells)}
                            | {f"/d/n{n_digits}"})
            if split == "train":
                rows += [(image_id, "verification", code, 1) for code in labels]
            else:
                truth.append((image_id, " ".join(labels)))
    pd.DataFrame(rows, columns=["ImageID", "Source", "LabelName", "Confidence"]).to_csv(
        out / "train_human_labels.csv", index=False)
    pd.DataFrame({"label_code": codes, "description": names}).to_csv(out / "class-descriptions.csv", index=False)
    pd.DataFrame({"label_code": codes}).to_csv(out / "classes-trainable.csv", index=False)
    solution = pd.DataFrame(truth, columns=["image_id", "labels"])
    solution.to_csv(out / "test_labels.csv", index=False)
    solution.assign(labels=codes[0]).to_csv(out / "stage_1_sample_submission.csv", index=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--many", action="store_true",
                        help="the many-label version in the Open Images layout (54 labels)")
    args = parser.parse_args(argv)
    make = make_digits_many if args.many else make_digits_dataset
    make(Path(args.out), args.n_train, args.n_test, args.size, args.seed)
    print(f"wrote {args.n_train} train and {args.n_test} test images ({args.size} px, "
          f"{len(many_label_codes()[0]) if args.many else 10} classes) to {args.out}")


if __name__ == "__main__":
    main()
