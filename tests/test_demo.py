"""The synthetic demo data: deterministic by seed, HPA-like skewed labels that a constant predictor
cannot score on, and the label signal in the green channel only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.data import CHANNELS, read_rgby
from src.demo import class_glyphs, make_demo_dataset, render_image
from src.metrics import macro_f1

NUM_CLASSES = 28


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_train=400, n_test=300, size=32,
                             num_classes=NUM_CLASSES, seed=3, progress=False)


def label_matrix_of(csv: Path) -> np.ndarray:
    targets = pd.read_csv(csv, dtype=str, keep_default_na=False)["Target"]
    matrix = np.zeros((len(targets), NUM_CLASSES), dtype=bool)
    for row, target in enumerate(targets):
        matrix[row, [int(label) for label in target.split()]] = True
    return matrix


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    def generate(name: str, seed: int) -> dict[str, bytes]:
        out = make_demo_dataset(tmp_path / name, n_train=12, n_test=4, size=32, num_classes=6, seed=seed,
                                progress=False)
        return _files(out)

    first, again, other = generate("a", 5), generate("b", 5), generate("c", 6)
    assert "train.csv" in first and "train/train00000_green.png" in first
    assert len(first) == 3 + 4 * (12 + 4)  # train.csv, test_solution.csv, sample_submission.csv, PNGs
    assert first == again
    assert first["train.csv"] != other["train.csv"]
    assert first["train/train00000_green.png"] != other["train/train00000_green.png"]


def test_rerun_replaces_the_folder_and_leaves_no_partial(tmp_path):
    out = tmp_path / "demo"
    make_demo_dataset(out, n_train=10, n_test=2, size=32, num_classes=6, seed=0, progress=False)
    make_demo_dataset(out, n_train=4, n_test=2, size=32, num_classes=6, seed=0, progress=False)
    assert len(pd.read_csv(out / "train.csv")) == 4
    assert not (out / "train" / "train00009_red.png").exists()  # nothing left over from the first run
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo"]


def test_layout_is_hpa(demo):
    train = pd.read_csv(demo / "train.csv", dtype=str, keep_default_na=False)
    submission = pd.read_csv(demo / "sample_submission.csv", dtype=str)
    assert list(train.columns) == ["Id", "Target"] and list(submission.columns) == ["Id", "Predicted"]
    image = read_rgby(demo / "train", train["Id"][0])
    assert image.shape == (32, 32, len(CHANNELS)) and image.dtype == np.uint8
    assert pd.read_csv(demo / "test_solution.csv", dtype=str)["Id"].tolist() == submission["Id"].tolist()


def test_label_frequencies_are_skewed_like_hpa(demo):
    labels = label_matrix_of(demo / "train.csv")
    counts = labels.sum(axis=0)
    assert labels.any(axis=1).all(), "every image has at least one label"
    assert (counts > 0).all()
    assert counts.max() >= 5 * counts.min(), counts
    # Class index orders the frequencies (a power law), up to sampling noise.
    assert pd.Series(counts).corr(pd.Series(np.arange(NUM_CLASSES)), method="spearman") < -0.7, counts


@pytest.mark.parametrize("csv", ["train.csv", "test_solution.csv"])
def test_constant_predictors_score_low_macro_f1(demo, csv):
    truth = label_matrix_of(demo / csv)
    most_frequent = np.zeros_like(truth)
    most_frequent[:, label_matrix_of(demo / "train.csv").sum(axis=0).argmax()] = True
    every_class = np.ones_like(truth)  # the best constant predictor for F1: never worse than predicting none
    perfect = macro_f1(truth, truth)  # below 1 when the split lacks a class (its F1 counts as 0)
    assert perfect > 0.9
    assert macro_f1(truth, most_frequent) < 0.1 * perfect
    assert macro_f1(truth, every_class) < 0.3 * perfect


def test_labels_change_the_green_channel_only():
    # Two images from identically seeded generators, differing only in their label: the distractor
    # channels are identical, the green channel is not.
    glyphs = class_glyphs(NUM_CLASSES, np.random.default_rng(0))
    for seed in range(3):
        image_a = render_image([3], glyphs, 64, np.random.default_rng(seed))
        image_b = render_image([5], glyphs, 64, np.random.default_rng(seed))
        for channel, name in enumerate(CHANNELS):
            same = np.array_equal(image_a[..., channel], image_b[..., channel])
            assert same == (name != "green"), (seed, name)


def test_class_glyphs_are_distinct():
    glyphs = class_glyphs(NUM_CLASSES, np.random.default_rng(1))
    assert len({glyph.tobytes() for glyph in glyphs}) == NUM_CLASSES


def test_green_intensity_tracks_the_labels_and_other_channels_do_not(demo):
    train = pd.read_csv(demo / "train.csv", dtype=str, keep_default_na=False)
    label_counts = label_matrix_of(demo / "train.csv").sum(axis=1)
    means = np.stack([read_rgby(demo / "train", sample_id).mean(axis=(0, 1)) for sample_id in train["Id"]])
    correlation = {name: np.corrcoef(label_counts, means[:, channel])[0, 1] for channel, name in enumerate(CHANNELS)}
    assert correlation["green"] > 0.7, correlation
    for name in ("red", "blue", "yellow"):
        assert abs(correlation[name]) < 0.3, correlation
