"""The synthetic demo data: deterministic by seed, HPA-like skewed labels that a constant predictor
cannot score on, and the label signal in the green channel only; the many-label demo in its exact
Open Images and csv layouts, with power-law labels that co-occur by topic."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.demo import class_glyphs, make_demo_dataset, make_many_label_dataset, render_image
from src.images import CHANNELS, read_rgby
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


# --- The many-label demo (Open Images / Inclusive Images layout and the generic csv layout) ---------------

MANY_LABELS = 150
OPENIMAGES_FILES = {"train_human_labels.csv", "class-descriptions.csv", "classes-trainable.csv",
                    "stage_1_sample_submission.csv", "test_labels.csv", "train", "test"}


@pytest.fixture(scope="module")
def openimages(tmp_path_factory) -> Path:
    return make_many_label_dataset(tmp_path_factory.mktemp("openimages") / "data", format="openimages",
                                   n_train=500, n_test=40, num_labels=MANY_LABELS, seed=7, progress=False)


def positives_of(data: Path) -> pd.DataFrame:
    """The positive image-label rows of an openimages-layout demo, with each label's index and topic (from
    its description, "label <index> (topic <topic>)")."""
    rows = pd.read_csv(data / "train_human_labels.csv", dtype={"Confidence": int})
    descriptions = pd.read_csv(data / "class-descriptions.csv").set_index("label_code")["description"]
    parsed = descriptions.str.extract(r"^label (\d+) \(topic (\d+)\)$").dropna().astype(int)
    positives = rows[rows["Confidence"] == 1]
    return positives.assign(label=parsed.loc[positives["LabelName"], 0].to_numpy(),
                            topic=parsed.loc[positives["LabelName"], 1].to_numpy())


def decode(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_openimages_layout_is_inclusive_images(openimages):
    assert {path.name for path in openimages.iterdir()} == OPENIMAGES_FILES
    rows = pd.read_csv(openimages / "train_human_labels.csv", dtype=str)
    descriptions = pd.read_csv(openimages / "class-descriptions.csv", dtype=str)
    trainable = pd.read_csv(openimages / "classes-trainable.csv", dtype=str)
    sample = pd.read_csv(openimages / "stage_1_sample_submission.csv", dtype=str)
    truth = pd.read_csv(openimages / "test_labels.csv", dtype=str, keep_default_na=False)
    assert list(rows.columns) == ["ImageID", "Source", "LabelName", "Confidence"]
    assert list(descriptions.columns) == ["label_code", "description"]
    assert list(trainable.columns) == ["label_code"]
    assert list(sample.columns) == list(truth.columns) == ["image_id", "labels"]

    assert rows["ImageID"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert descriptions["label_code"].str.fullmatch(r"/m/0[0-9a-z]{3,5}").all()
    assert descriptions["label_code"].is_unique and trainable["label_code"].is_unique
    assert set(rows["Confidence"]) == {"0", "1"}
    # Verified negatives never contradict a positive of the same image.
    keys = rows["ImageID"] + rows["LabelName"]
    assert not set(keys[rows["Confidence"] == "0"]) & set(keys[rows["Confidence"] == "1"])
    # Every image in the table has a file and every file a row; some images have only verified negatives.
    assert set(rows["ImageID"]) == {path.stem for path in (openimages / "train").iterdir()}
    assert rows["ImageID"].nunique() > rows.loc[rows["Confidence"] == "1", "ImageID"].nunique()

    used = set(rows.loc[rows["Confidence"] == "1", "LabelName"])
    assert len(used) == MANY_LABELS and used < set(descriptions["label_code"])  # plus a few unused codes
    assert set(trainable["label_code"]) < used  # the rarest few are not trainable: readers must filter

    assert sample["image_id"].tolist() == truth["image_id"].tolist()
    assert set(sample["image_id"]) == {path.stem for path in (openimages / "test").iterdir()}
    assert sample["labels"].nunique() == 1 and sample["labels"][0] in used
    truth_codes = {code for labels in truth["labels"] for code in labels.split()}
    assert truth_codes <= set(trainable["label_code"]) and len(truth_codes) > 20


def test_every_image_is_rgb_at_the_asked_size(openimages):
    paths = sorted((openimages / "train").glob("*.jpg")) + sorted((openimages / "test").glob("*.jpg"))
    assert len(paths) == 540
    assert {decode(path).shape for path in paths} == {(64, 64, 3)}


def test_label_frequencies_follow_a_power_law(openimages):
    positives = positives_of(openimages)
    counts = positives["label"].value_counts().reindex(range(MANY_LABELS), fill_value=0)
    share = counts / 500
    assert 0.2 <= share.max() <= 0.45, share.max()  # the commonest label is on about 30% of images
    assert counts.min() >= 3  # every label has enough images to learn and to stratify
    assert (share < 0.05).mean() > 0.7  # most labels are rare
    assert 4 <= len(positives) / 500 <= 8  # labels per image
    # The label index orders the frequencies, up to sampling noise.
    assert counts.corr(pd.Series(np.arange(MANY_LABELS)), method="spearman") < -0.7


def test_labels_of_one_topic_co_occur(openimages):
    positives = positives_of(openimages)
    images = positives["ImageID"].astype("category").cat.codes.to_numpy()
    labels = np.zeros((images.max() + 1, MANY_LABELS))
    labels[images, positives["label"]] = 1
    topic = positives.groupby("label")["topic"].first().reindex(range(MANY_LABELS)).to_numpy()
    n = len(labels)
    counts = labels.sum(axis=0)
    # PMI with add-one smoothing (no log of 0), over labels common enough for it to mean something.
    pmi = np.log((labels.T @ labels + 1) * n / (np.outer(counts, counts) + n))
    common = counts >= 10
    pairs = np.triu(np.outer(common, common), k=1)
    same_topic = pairs & (topic[:, None] == topic[None, :])
    other = pairs & (topic[:, None] != topic[None, :])
    assert same_topic.sum() > 50 and other.sum() > 500
    assert pmi[same_topic].mean() > pmi[other].mean() + 1.0, (pmi[same_topic].mean(), pmi[other].mean())


def test_csv_layout_has_names_files_and_some_untagged_images(tmp_path):
    data = make_many_label_dataset(tmp_path / "csv", format="csv", n_train=60, n_test=10, size=32,
                                   num_labels=20, seed=1, progress=False)
    assert {path.name for path in data.iterdir()} == {"train.csv", "sample_submission.csv", "test_labels.csv",
                                                      "train", "test"}
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(data / "test_labels.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == list(sample.columns) == list(truth.columns) == ["image", "tags"]
    assert {path.name for path in (data / "train").iterdir()} == set(train["image"])
    assert sample["image"].tolist() == truth["image"].tolist()
    assert {path.name for path in (data / "test").iterdir()} == set(sample["image"])
    assert {decode(data / "train" / name).shape for name in train["image"]} == {(32, 32, 3)}
    names = {name for tags in train["tags"] for name in tags.split()}
    assert len(names) == 20 and all(name.isidentifier() for name in names)  # names, not ids; no spaces
    assert 1 <= (train["tags"] == "").sum() <= 3
    assert sample["tags"].nunique() == 1 and sample["tags"][0] in names


def test_many_label_demo_is_deterministic_and_both_layouts_share_the_data(tmp_path):
    def generate(name: str, layout: str, seed: int) -> dict[str, bytes]:
        return _files(make_many_label_dataset(tmp_path / name, format=layout, n_train=30, n_test=6, size=32,
                                              num_labels=12, seed=seed, progress=False))

    first, again, other = generate("a", "openimages", 4), generate("b", "openimages", 4), generate("c", "openimages", 5)
    assert first == again
    assert first["train_human_labels.csv"] != other["train_human_labels.csv"]
    # The csv layout of the same seed: the same images (under other names) with the same label sets.
    as_csv = generate("d", "csv", 4)
    assert sorted(v for k, v in first.items() if k.endswith(".jpg")) == sorted(
        v for k, v in as_csv.items() if k.endswith(".jpg"))
    positives = positives_of(tmp_path / "a")
    openimages_sets = sorted(tuple(sorted(labels)) for _, labels in positives.groupby("ImageID")["label"])
    tags = pd.read_csv(tmp_path / "d" / "train.csv", dtype=str, keep_default_na=False)["tags"]
    csv_sets = sorted(tuple(sorted(int(name.split("_")[0].removeprefix("label")) for name in row.split()))
                      for row in tags if row)
    assert openimages_sets == csv_sets
