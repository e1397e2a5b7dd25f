"""Stage 0: write a synthetic dataset (HPA format, or many-label Open Images / csv) so the pipeline runs offline.

Each class owns a small random glyph. An image's labels decide which glyphs tile a quadrant of its
*green* channel (the protein channel in HPA; a class is a repeated pattern, as a protein localisation
is). The red, blue and yellow channels carry cell-like blobs and the patterns of random other classes
as distractors, so a model must learn to read the green channel. Label frequencies follow a power law
(like HPA's: a few common classes, many rare ones; about 1.6 labels per image), so a constant predictor scores
badly on macro-F1. Everything is decided by the seed.

    python -m src.demo --out input/demo --train 2000 --test 300 --size 64

``--format openimages`` (Inclusive Images layout) or ``--format csv`` writes the many-label demo instead
(``make_many_label_dataset``): RGB JPEGs, a few hundred labels in topics that co-occur, a power-law frequency.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np

from src.cli import run_cli
from src.config import PipelineError
from src.formats import FORMATS, DemoLabels, get_format
from src.images import write_jpeg, write_rgby
from src.progress import bar as progress_bar

GLYPH_SIDES = ((90, 3), (10_000, 4))  # glyph side in cells: 3 x 3 has 90 usable patterns, 4 x 4 thousands


def class_glyphs(num_classes: int, rng: np.random.Generator, min_distance: int = 2) -> np.ndarray:
    """One binary pattern per class (3 x 3 cells; 4 x 4 for more than 90 classes). Microscopy has no up
    or right, so the pipeline augments with rotations and flips: two glyphs differ in >= ``min_distance``
    cells under every rotation and reflection (where too few such patterns exist, in >= 1: still distinct
    after augmentation). All patterns are tried in random order, so this always ends."""
    side = next((side for limit, side in GLYPH_SIDES if num_classes <= limit), GLYPH_SIDES[-1][1])
    cells = side * side
    codes = rng.permutation(2**cells)
    # Patterns as integer codes (bit k is cell divmod(k, side)); the codes of every pattern's D4 orbit; and,
    # per code, its distance to the nearest orbit member of a chosen glyph (capped at min_distance), kept up
    # to date as glyphs are chosen so that each candidate is one lookup.
    bits = 1 << np.arange(cells)
    patterns = ((np.arange(2**cells)[:, None] & bits) > 0).reshape(-1, side, side)
    orbits = np.stack([(np.rot90(flipped, k, axes=(1, 2)).reshape(-1, cells) * bits).sum(axis=1)
                       for flipped in (patterns, patterns[:, :, ::-1]) for k in range(4)], axis=1)
    popcount = patterns.reshape(-1, cells).sum(axis=1)
    near_masks = np.flatnonzero(popcount < min_distance)  # xor masks of the codes closer than min_distance
    nearest = np.full(2**cells, min_distance)
    chosen: list[int] = []
    for distance in sorted({min_distance, 1}, reverse=True):
        for code in codes:
            if popcount[code] >= cells // 3 and nearest[code] >= distance:
                chosen.append(int(code))
                if len(chosen) == num_classes:
                    return patterns[chosen]
                neighbours = (orbits[code][:, None] ^ near_masks[None, :]).ravel()
                np.minimum.at(nearest, neighbours, np.tile(popcount[near_masks], len(orbits[code])))
    raise PipelineError(f"the demo generator has only {len(chosen)} distinct patterns; ask for fewer classes")


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
    for split, index in progress_bar(jobs, desc=f"demo images -> {out}", disable=not progress):
        sample_id = f"{split}{index:05d}"
        labels = sample_labels(rates, rng)
        write_rgby(tmp / split, sample_id, render_image(labels, glyphs, size, rng))
        rows[split].append((sample_id, " ".join(map(str, labels))))
    return finish_dataset(tmp, out, rows)


def finish_dataset(tmp: Path, out: Path, rows: dict[str, list[tuple[str, str]]]) -> Path:
    """Write the label tables of a generated HPA-layout dataset built in ``tmp`` (``train.csv``,
    ``sample_submission.csv`` and ``test_solution.csv``, the hidden test labels: the hpa format writes them)
    from ``(Id, Target)`` rows per split, then move it into place at ``out``."""
    def split(name: str) -> tuple[list[str], list[tuple[int, ...]]]:
        return ([sample_id for sample_id, _ in rows[name]],
                [tuple(int(label) for label in target.split()) for _, target in rows[name]])

    get_format("hpa").write_demo_tables(tmp, DemoLabels(*split("train"), *split("test")))
    return _replace_folder(tmp, out)


def _replace_folder(tmp: Path, out: Path) -> Path:
    """Move a finished dataset from ``tmp`` to ``out``, replacing what was there."""
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# --- Many-label demo (Open Images / Inclusive Images layout, or the generic csv layout) ---------------------
#
# A few hundred labels grouped into topics, as Open Images labels cluster by scene (kitchen: oven, cup, ...).
# Each image draws one or two topics; a label is likely when its topic was drawn and unlikely otherwise, so
# same-topic labels co-occur (high PMI). Label frequencies follow a power law. In the pixels a topic is the
# background (a colour and a stripe texture) and each label is a small glyph of its own (binary pattern and
# colour) in one cell of a 4 x 4 grid, so a small CNN can read every label and the topics from the
# background.

GRID = 4  # glyph cells per image side: at most GRID**2 labels show in one image
LABELS_PER_TOPIC = 12
MIN_TRAIN_IMAGES = 3  # every label is on at least this many training images
JPEG_QUALITY = 90
GLYPH_COLOURS = np.array([  # bright, well-separated RGB colours for glyphs (backgrounds stay below 140)
    (255, 60, 60), (60, 255, 60), (80, 120, 255), (255, 255, 60),
    (60, 255, 255), (255, 60, 255), (255, 255, 255), (255, 160, 40)], dtype=np.float32)


class TopicModel:
    """Who co-occurs with whom: label ``l`` belongs to topic ``topic_of[l]``; an image draws one or two topics
    (weights ``topic_weights``, without replacement), then each label independently with probability
    ``in_topic[l]`` if its topic was drawn and ``background[l]`` otherwise. These are chosen so that label
    ``l``'s overall rate is ``rates[l]``: a power law over the label index (label 0 is the most common)."""

    def __init__(self, num_labels: int, rng: np.random.Generator, top_rate: float = 0.3, exponent: float = 0.65,
                 two_topic_share: float = 0.5, background_share: float = 0.15):
        self.num_topics = int(np.clip(round(num_labels / LABELS_PER_TOPIC), 2, 30))
        self.two_topic_share = two_topic_share
        self.rates = label_rates(num_labels, top_rate, exponent)
        weights = 1.0 / np.arange(1, self.num_topics + 1) ** 0.7  # topic 0 is the most common
        self.topic_weights = weights / weights.sum()
        # Balanced topics with a mix of common and rare labels: each run of num_topics labels in rate order
        # gives one label to every topic.
        blocks = -(-num_labels // self.num_topics)
        self.topic_of = np.concatenate([rng.permutation(self.num_topics) for _ in range(blocks)])[:num_labels]
        topic_rate = self.topic_inclusion()[self.topic_of]
        # Most of a label's occurrences come from its topic; labels commoner than their topic (a "person"
        # that appears in every scene) take the rest from the background rate.
        self.in_topic = np.minimum(0.9, (1 - background_share) * self.rates / topic_rate)
        self.background = (self.rates - topic_rate * self.in_topic) / (1 - topic_rate)

    def topic_inclusion(self) -> np.ndarray:
        """P(topic t is among an image's topics), exact for drawing 1 or 2 topics without replacement."""
        w = self.topic_weights
        second = w * ((w / (1 - w)).sum() - w / (1 - w))  # P(t second | first s) = w_t / (1 - w_s), s != t
        return w + self.two_topic_share * second

    def sample(self, n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        """Topics (n x 2, second -1 when one topic) and label sets of ``n`` images; each set at least one
        label and at most GRID**2 (those that fit in the glyph grid)."""
        topics = np.full((n, 2), -1)
        for i in range(n):
            count = 2 if rng.random() < self.two_topic_share else 1
            topics[i, :count] = rng.choice(self.num_topics, size=count, replace=False, p=self.topic_weights)
        drawn = (self.topic_of[None, :] == topics[:, :1]) | (self.topic_of[None, :] == topics[:, 1:])
        on = rng.random(drawn.shape) < np.where(drawn, self.in_topic, self.background)
        labels = []
        for i in range(n):
            chosen = np.flatnonzero(on[i])
            if len(chosen) == 0:  # every image shows something: one label of its topics
                pool = np.flatnonzero(drawn[i])
                chosen = rng.choice(pool, size=1, p=self.in_topic[pool] / self.in_topic[pool].sum())
            elif len(chosen) > GRID**2:
                chosen = np.sort(rng.choice(chosen, size=GRID**2, replace=False))
            labels.append(chosen)
        return labels, topics


def ensure_min_count(labels: list[np.ndarray], topics: np.ndarray, topic_of: np.ndarray, num_labels: int,
                     min_count: int, rng: np.random.Generator, keep_empty: Collection[int] = ()) -> None:
    """Add each label that is on fewer than ``min_count`` images to random images that have room (images of
    its topic first), so that no label is too rare to learn or to stratify. Changes ``labels`` in place."""
    counts = np.bincount(np.concatenate(labels), minlength=num_labels) if labels else np.zeros(num_labels, int)
    for label in np.flatnonzero(counts < min_count):
        has_room = [i for i, chosen in enumerate(labels)
                    if i not in keep_empty and len(chosen) < GRID**2 and label not in chosen]
        own_topic = [i for i in has_room if topic_of[label] in topics[i]]
        others = [i for i in has_room if topic_of[label] not in topics[i]]
        candidates = list(rng.permutation(own_topic)) + list(rng.permutation(others))
        missing = min_count - counts[label]
        if len(candidates) < missing:
            raise PipelineError(f"{len(labels)} training images cannot hold {num_labels} labels on "
                                f">= {min_count} images each: ask for more images or fewer labels")
        for i in candidates[:missing]:
            labels[i] = np.sort(np.append(labels[i], label))


def label_codes(count: int, rng: np.random.Generator) -> list[str]:
    """Unique Open Images-style label ids: ``/m/0`` and 3 to 5 random base-36 characters."""
    alphabet = np.array(list("0123456789abcdefghijklmnopqrstuvwxyz"))
    codes: list[str] = []
    seen: set[str] = set()
    while len(codes) < count:
        code = "/m/0" + "".join(rng.choice(alphabet, size=int(rng.integers(3, 6))))
        if code not in seen:
            seen.add(code)
            codes.append(code)
    return codes


def hex_ids(count: int, rng: np.random.Generator, chars: int = 16) -> list[str]:
    """Unique random lowercase hex ids (``chars`` characters), like Open Images ImageIDs."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        image_id = rng.bytes(chars // 2).hex()
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    return ids


class GlyphArt:
    """What labels and topics look like at ``size`` px: one stripe texture per topic and one glyph (binary
    4 x 4 pattern, distinct under rotations and flips) and colour per label."""

    def __init__(self, num_labels: int, num_topics: int, size: int, rng: np.random.Generator):
        self.size = size
        self.slot = size // GRID
        glyphs = class_glyphs(max(num_labels, GLYPH_SIDES[0][0] + 1), rng)[:num_labels]  # always 4 x 4
        self.cell = max(1, (self.slot - 4) // glyphs.shape[1])
        self.masks = np.stack([np.kron(glyph, np.ones((self.cell, self.cell), dtype=bool)) for glyph in glyphs])
        self.colours = GLYPH_COLOURS[rng.integers(0, len(GLYPH_COLOURS), num_labels)]
        yy, xx = np.mgrid[:size, :size].astype(np.float32)
        angle = rng.uniform(0, np.pi, num_topics)
        period = rng.uniform(5, 14, num_topics) * size / 64
        self.phase_ramps = np.stack([2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / p for a, p in zip(angle, period)])
        self.topic_colours = rng.uniform(20, 100, (num_topics, 3)).astype(np.float32)

    def render(self, labels: np.ndarray, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One ``size x size x 3`` uint8 RGB image: the mean of its topics' textures, then each label's glyph
        on a dark square in its own random grid cell, jittered within the cell."""
        topics = topics[topics >= 0]
        stripes = np.sin(self.phase_ramps[topics] + rng.uniform(0, 2 * np.pi, (len(topics), 1, 1)))
        background = self.topic_colours[topics][:, None, None, :] + 25 * stripes[..., None]
        image = background.mean(axis=0) + rng.normal(0, 5, (self.size, self.size, 1)).astype(np.float32)
        side = self.masks.shape[1]
        for label, slot in zip(labels, rng.permutation(GRID**2)):
            y0, x0 = divmod(int(slot), GRID)
            # Jitter within the cell, keeping a background gap to the neighbours so glyphs never merge.
            y = y0 * self.slot + int(rng.integers(1, self.slot - side))
            x = x0 * self.slot + int(rng.integers(1, self.slot - side))
            patch = image[y : y + side, x : x + side]
            patch[:] = 10
            patch[self.masks[label]] = self.colours[label] * rng.uniform(0.8, 1.0)
        return np.clip(image, 0, 255).astype(np.uint8)


def make_many_label_dataset(out: str | Path, *, format: str = "openimages", n_train: int = 2000,
                            n_test: int = 300, size: int = 64, num_labels: int = 300, seed: int = 0,
                            progress: bool = True) -> Path:
    """Write a synthetic many-label RGB JPEG dataset to ``out`` in the ``openimages`` (Inclusive Images) or
    the generic ``csv`` layout, with the hidden test labels in ``test_labels.csv`` (the sample submission's
    columns). The same seed gives the same images and labels in both layouts.

    openimages: ``train_human_labels.csv`` (ImageID,Source,LabelName,Confidence; Confidence 0 rows are verified
    negatives), ``class-descriptions.csv`` (label_code,description; also a few codes no image uses),
    ``classes-trainable.csv`` (label_code; all labels but the rarest few), ``train/<ImageID>.jpg``,
    ``test/<ImageID>.jpg``, ``stage_1_sample_submission.csv`` (image_id,labels). Test truth holds trainable
    labels only, as Inclusive Images scored.
    csv: ``train.csv`` and ``sample_submission.csv`` (image,tags: file name under train/ or test/, and label
    names separated by spaces), ``train/``, ``test/``; about 1% of training images have no tags (and no
    glyphs).

    Written to a temporary sibling folder and renamed into place, as ``make_demo_dataset`` does.
    """
    layout = get_format(format)
    if layout.planes:
        raise PipelineError(f"data.format={format} stores a file per channel plane; the many-label demo writes one "
                            "RGB file per image (make_demo_dataset writes per-plane data)")
    if size < 8 * GRID:
        raise PipelineError(f"image size {size} px is too small for the glyph grid: use >= {8 * GRID}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    model = TopicModel(num_labels, rng)
    art = GlyphArt(num_labels, model.num_topics, size, rng)
    codes = label_codes(num_labels + 5, rng)  # the last 5 are described but never used, as in Open Images
    names = [f"label{label}_topic{topic}" for label, topic in enumerate(model.topic_of)]
    train_labels, train_topics = model.sample(n_train, rng)
    test_labels, test_topics = model.sample(n_test, rng)
    # About 1% of training images show nothing and have no labels (at least one in 10 or more images).
    empty = set(rng.choice(n_train, size=min(n_train // 10, max(1, n_train // 100)), replace=False).tolist())
    for i in empty:
        train_labels[i] = np.array([], dtype=int)
    ensure_min_count(train_labels, train_topics, model.topic_of, num_labels, MIN_TRAIN_IMAGES, rng, empty)
    # Ids from their own generator, so that both layouts get the same pixels from the same seed.
    ids = hex_ids(n_train + n_test, np.random.default_rng([seed, 1]), layout.demo_id_chars)
    splits = {"train": (ids[:n_train], train_labels, train_topics), "test": (ids[n_train:], test_labels, test_topics)}

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, (split_ids, split_labels, split_topics) in splits.items():
        (tmp / split).mkdir(parents=True)
        for image_id, labels, topics in progress_bar(list(zip(split_ids, split_labels, split_topics)),
                                                     desc=f"{split} images -> {out}", disable=not progress):
            write_jpeg(tmp / split / f"{image_id}.jpg", art.render(labels, topics, rng), JPEG_QUALITY)
    # Drawn after every image (and for either layout), so that both layouts get the same pixels from a seed.
    verified = human_verifications(*splits["train"], model.topic_of, rng)
    num_trainable = num_labels - max(1, num_labels // 60)  # the rarest are not (Inclusive Images kept 7 178)
    descriptions = [f"label {label} (topic {topic})" for label, topic in enumerate(model.topic_of)]
    descriptions += [f"unused label {i}" for i in range(len(codes) - num_labels)]
    layout.write_demo_tables(tmp, DemoLabels(
        train_ids=splits["train"][0], train_labels=train_labels, test_ids=splits["test"][0], test_labels=test_labels,
        codes=codes, names=names, descriptions=descriptions, trainable=num_trainable, verified=verified,
        image_ext=".jpg"))
    return _replace_folder(tmp, out)


def human_verifications(ids: list[str], labels: list[np.ndarray], topics: np.ndarray, topic_of: np.ndarray,
                        rng: np.random.Generator) -> list[tuple[str, str, int, int]]:
    """Open Images-style human verifications of the training images: ``(image id, source, label, confidence)``
    for every positive label (confidence 1), and verified negatives (confidence 0) for some images: labels of
    the image's topics that it does not show (every image without labels has some)."""
    rows = []
    for image_id, image_labels, image_topics in zip(ids, labels, topics):
        for label in image_labels:
            source = "crowdsource-verified" if rng.random() < 0.1 else "verification"
            rows.append((image_id, source, label, 1))
        absent = np.setdiff1d(np.flatnonzero(np.isin(topic_of, image_topics)), image_labels)
        if len(image_labels) == 0 or (len(absent) and rng.random() < 0.3):  # an image with only negatives, too
            for label in rng.choice(absent, size=min(len(absent), int(rng.integers(1, 3))), replace=False):
                rows.append((image_id, "verification", label, 0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=list(FORMATS), default="hpa",
                        help="hpa: 4-channel PNGs, 28 classes; openimages (Inclusive Images) or csv: RGB JPEGs, "
                             "a few hundred labels")
    parser.add_argument("--out", help="folder to write (replaced if present); default input/demo for hpa, "
                                      "input/demo_<format> otherwise")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=300, help="test images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--classes", type=int, help="number of classes (labels); default 28 for hpa, 300 otherwise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if get_format(args.format).planes:  # a file per channel plane (hpa): the glyph demo, labels in the green plane
        classes = args.classes or 28
        out = make_demo_dataset(args.out or "input/demo", args.train, args.test, args.size, classes, args.seed)
    else:
        classes = args.classes or 300
        out = make_many_label_dataset(args.out or f"input/demo_{args.format}", format=args.format,
                                      n_train=args.train, n_test=args.test, size=args.size, num_labels=classes,
                                      seed=args.seed)
    print(f"wrote {args.train} train and {args.test} test images ({args.size} px, {classes} classes, "
          f"{args.format} layout) to {out}")


if __name__ == "__main__":
    run_cli(main)
