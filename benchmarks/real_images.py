"""An HPA-format multilabel dataset built from real photographs and micrographs, available offline.

Every image comes from ``skimage.data`` (scikit-image==0.26.0), using only the files shipped inside its wheel:
nothing is downloaded. Class ``c`` means "a patch of real image CLASS_SOURCES[c] appears in the *green*
channel": brick, grass and gravel (CC0 Textures, CC0), Greek coins (Brooklyn Museum, no known copyright
restrictions), an immunohistochemistry slide (no known copyright restrictions), a printed page and a
handwritten formula (public domain), the Hubble deep field (NASA, public domain) and a retinal fundus photo
(Wikimedia, CC0). Red, blue and yellow carry the same kind of patches, of random classes, over crops of
other photos (camera, astronaut, chelsea, coffee, rocket, moon, cell, clock: CC0 / public domain), so a
model must read the green channel. Each patch is cropped with scale jitter, turned by a random flip and
right-angle rotation (labels are D4-invariant), z-normalised to a random mean and contrast (no
intensity cue) and pasted with a soft round edge at a random spot in its own quadrant. Green has a patch
("cell") in all four quadrants: each label shows in at least one, the others repeat random labels of the
image (as a protein's localisation shows in every cell). Training patches
come from the first 65 % of each source image and test patches from the last 35 %: test content is
unseen. Label frequencies follow a power law, at least one label per image. Deterministic by seed.

    python -m benchmarks.real_images --out input/real --n-train 600 --n-test 200 --size 128
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from tqdm import tqdm

CLASS_SOURCES = ("brick", "grass", "gravel", "coins", "immunohistochemistry", "page", "hubble_deep_field",
                 "text", "retina")
DISTRACTOR_SOURCES = ("camera", "astronaut", "chelsea", "coffee", "rocket", "moon", "cell", "clock")
TRAIN_SHARE = 0.65  # share of each source image (along its longer side) that training patches are cut from


def load_source(name: str, size: int, split: str | None = None) -> np.ndarray:
    """A bundled image as float32 grayscale, zoomed so its shorter side is 2 x ``size``, cut to the
    region of ``split`` ("train": first 65 % along the longer side, "test": the rest, None: all)."""
    image = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    if name == "retina":  # keep the inside of the fundus disk, not the black surround
        h, w = image.shape
        image = image[int(0.22 * h) : int(0.78 * h), int(0.22 * w) : int(0.78 * w)]
    zoom = 2 * size / min(image.shape)
    image = cv2.resize(image, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_AREA).astype(np.float32)
    image = image if image.shape[0] >= image.shape[1] else image.T
    cut = int(TRAIN_SHARE * image.shape[0])
    return {"train": image[:cut], "test": image[cut:], None: image}[split]


def sample_labels(num_classes: int, rng: np.random.Generator, top_rate: float = 0.33) -> list[int]:
    """Independent power-law draws (class 0 common, the last rare); 1 to 4 labels (four quadrants)."""
    rates = top_rate / np.arange(1, num_classes + 1)
    while True:
        labels = np.flatnonzero(rng.random(num_classes) < rates)
        if len(labels) == 0:
            labels = [rng.choice(num_classes, p=rates / rates.sum())]
        if len(labels) <= 4:
            return sorted(int(label) for label in labels)


def cut_patch(source: np.ndarray, side: int, mean: float, std: float, rng: np.random.Generator) -> np.ndarray:
    """A random ``side`` x ``side`` crop (scale jitter 0.8-1.25, random D4 pose) with the given mean and std."""
    src = min(int(side * rng.uniform(0.8, 1.25)), *source.shape)
    y, x = rng.integers(0, source.shape[0] - src + 1), rng.integers(0, source.shape[1] - src + 1)
    crop = cv2.resize(source[y : y + src, x : x + src], (side, side), interpolation=cv2.INTER_AREA)
    crop = np.rot90(crop[:, ::-1] if rng.random() < 0.5 else crop, int(rng.integers(4)))
    return (crop - crop.mean()) / (crop.std() + 1e-6) * std + mean


def paste(plane: np.ndarray, source: np.ndarray, quadrant: int, rng: np.random.Generator) -> None:
    """Blend a bright patch of ``source`` into a random spot of one quadrant of ``plane``, soft round edge."""
    half = plane.shape[0] // 2
    side = int(half * rng.uniform(0.6, 1.0))
    patch = cut_patch(source, side, rng.uniform(110, 170), rng.uniform(30, 45), rng)
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2
    alpha = np.clip((side / 2 - np.hypot(yy, xx)) / (0.15 * side), 0, 1)
    y = quadrant // 2 * half + rng.integers(0, half - side + 1)
    x = quadrant % 2 * half + rng.integers(0, half - side + 1)
    region = plane[y : y + side, x : x + side]
    region[:] = region * (1 - alpha) + patch * alpha


def render_image(labels: list[int], classes: list[np.ndarray], distractors: list[np.ndarray], size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One H x W x 4 uint8 image: the green channel has a patch in every quadrant, each label's at least
    once (the rest repeat random labels); the other channels show patches of random classes; every channel
    lies over a dim crop of a distractor photo plus noise."""
    image = np.empty((size, size, 4), np.float32)
    for channel in range(4):
        plane = image[..., channel]
        source = distractors[rng.integers(len(distractors))]
        plane[:] = cut_patch(source, size, rng.uniform(20, 70), rng.uniform(8, 25), rng)
        if channel == 1:
            shown = [*labels, *rng.choice(labels, size=4 - len(labels))]
        else:
            shown = rng.choice(len(classes), size=rng.integers(1, 3), replace=False)
        for label, quadrant in zip(shown, rng.permutation(4)):
            paste(plane, classes[label], int(quadrant), rng)
        plane += rng.normal(0, rng.uniform(4, 10), plane.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def make_real_dataset(out: str | Path, n_train: int = 600, n_test: int = 200, size: int = 128,
                      num_classes: int = 9, seed: int = 0, progress: bool = True, id_prefix: str = "") -> Path:
    """Write train.csv, sample_submission.csv, test_solution.csv (hidden truth), train/ and test/ to ``out``
    (built in a ``.partial`` sibling and renamed into place). ``id_prefix`` starts every Id (an extra source's
    Ids must not collide with the competition's)."""
    if not 1 <= num_classes <= len(CLASS_SOURCES):
        raise ValueError(f"num_classes must be 1..{len(CLASS_SOURCES)}, got {num_classes}")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else importing albumentations asks PyPI for news
    from src.demo import finish_dataset
    from src.images import write_rgby

    out, rng = Path(out), np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for split, count in (("train", n_train), ("test", n_test)):
        (tmp / split).mkdir(parents=True)
        classes = [load_source(name, size, split) for name in CLASS_SOURCES[:num_classes]]
        distractors = [load_source(name, size) for name in DISTRACTOR_SOURCES]
        for index in tqdm(range(count), desc=f"{split} images -> {out}", disable=not progress):
            sample_id, labels = f"{id_prefix}{split}{index:05d}", sample_labels(num_classes, rng)
            write_rgby(tmp / split, sample_id, render_image(labels, classes, distractors, size, rng))
            rows[split].append((sample_id, " ".join(map(str, labels))))
    return finish_dataset(tmp, out, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="input/real", help="folder to write (replaced if present)")
    parser.add_argument("--n-train", type=int, default=600, help="training images")
    parser.add_argument("--n-test", type=int, default=200, help="test images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=9, help=f"number of classes (at most {len(CLASS_SOURCES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    out = make_real_dataset(args.out, args.n_train, args.n_test, args.size, args.classes, args.seed,
                            progress=not args.quiet)
    print(f"wrote {args.n_train} train and {args.n_test} test images ({args.size} px, {args.classes} classes) "
          f"to {out}")


if __name__ == "__main__":
    main()
