"""The openimages and csv dataset formats: parsing (bad rows named), label vocabularies, sparse labels, image
channels, score tables for many classes, and folds -> train -> predict end to end on the many-label demo."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from src.config import PipelineError, load_config
from src.data import DataError, Vocabulary, label_csr
from src.demo import make_many_label_dataset
from src.folds import make_folds
from src.formats import load_test_table, load_training_data, read_train_labels
from src.images import decode_file, read_image
from src.run_folder import RunFolder
from src.score_table import CSV_MAX_CLASSES, copy_scores, read_scores, write_scores
from src.train import train
from src.validate import validate
from tests.conftest import REPO_ROOT


def write_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def openimages_config(data_dir: Path, work: Path, *overrides: str):
    return load_config(REPO_ROOT / "configs" / "openimages_demo.yaml", [
        f"data.dir={data_dir}", "data.image_size=32", f"data.cache_dir={work / 'cache'}",
        f"folds.path={work / 'folds.csv'}", "folds.n_splits=2", "model.backbone=test_resnet", "train.epochs=1",
        "train.batch_size=8", "train.num_workers=0", "train.device=cpu", "train.precision=fp32",
        "train.warmup_fraction=0", "wandb.mode=disabled", "predict.force=true", f"run.dir={work / 'run'}",
        f"submission.path={work / 'submission.csv'}", *overrides])


@pytest.fixture
def small_openimages(tmp_path) -> Path:
    """Four images by hand: a positive, a verified negative, a label outside the trainable list, a bad row."""
    data = tmp_path / "oi"
    for image_id in ("aa01", "bb02", "cc03", "dd04"):
        write_jpeg(data / "train" / f"{image_id}.jpg", np.full((20, 30, 3), 90, np.uint8))
    write_jpeg(data / "test" / "ee05.jpg", np.full((20, 20, 3), 90, np.uint8))
    pd.DataFrame({"ImageID": ["aa01", "aa01", "bb02", "bb02", "cc03", "dd04", "dd04"],
                  "Source": "verification",
                  "LabelName": ["/m/cat", "/m/dog", "/m/cat", "/m/fish", "/m/bird", "/m/cat", "/m/cat"],
                  "Confidence": ["1", "1", "1", "0", "0", "1", "1"]}).to_csv(data / "labels.csv", index=False)
    (data / "trainable.csv").write_text("label_code\n/m/cat\n/m/fish\n")
    (data / "descriptions.csv").write_text("/m/cat,Cat\n/m/fish,Fish\n")  # Open Images ships it without a header
    pd.DataFrame({"image_id": ["ee05"], "labels": ["/m/cat"]}).to_csv(data / "sample.csv", index=False)
    return data


def small_openimages_config(data: Path, tmp_path: Path, *overrides: str):
    return openimages_config(data, tmp_path, "data.train_csv=labels.csv", "data.sample_submission=sample.csv",
                             "data.trainable_labels=trainable.csv", "data.class_descriptions=descriptions.csv",
                             *overrides)


def test_openimages_labels_parse_into_a_trainable_vocabulary(small_openimages, tmp_path, capsys):
    cfg = small_openimages_config(small_openimages, tmp_path)
    cfg, table, vocabulary = load_training_data(cfg)
    # Trainable labels by training frequency; names from the header-less description file.
    assert vocabulary.codes == ("/m/cat", "/m/fish") and vocabulary.names == ("Cat", "Fish")
    assert cfg.data.num_classes == 2
    labels = dict(zip(table["Id"], table["labels"]))
    # Confidence 0 is a verified negative; /m/dog is not trainable; cc03 has only a negative: an image, no labels;
    # dd04's repeated positive counts once.
    assert labels == {"aa01": (0,), "bb02": (0,), "cc03": (), "dd04": (0,)}
    assert table["files"].iloc[0] == (str(small_openimages / "train" / "aa01.jpg"),)
    assert "1 positive label(s) of 1 label id(s) are not in data.trainable_labels" in capsys.readouterr().err
    assert load_test_table(cfg.data)["Id"].tolist() == ["ee05"]


def test_bad_openimages_rows_are_each_named(small_openimages, tmp_path):
    labels = pd.read_csv(small_openimages / "labels.csv", dtype=str)
    labels.loc[len(labels)] = ["../x", "verification", "/m/cat", "1"]
    labels.loc[len(labels)] = ["ff06", "verification", "/m/cat", "0.5"]
    labels.loc[len(labels)] = ["ff07", "verification", "", "1"]
    labels.to_csv(small_openimages / "labels.csv", index=False)
    table = read_train_labels(small_openimages_config(small_openimages, tmp_path).data)
    where = [str(p) for p in table.problems]
    assert len(where) == 3
    assert "labels.csv row 9: Id '../x' contains a path separator" in where[0]
    assert "row 10: Confidence '0.5' is not 0 or 1" in where[1] and "row 11: label '' is empty" in where[2]
    assert set(table.frame["Id"]) == {"aa01", "bb02", "cc03", "dd04"}  # the good rows are kept


def test_a_missing_trainable_list_is_a_problem_naming_the_key(small_openimages, tmp_path):
    cfg = small_openimages_config(small_openimages, tmp_path, "data.trainable_labels=nope.csv")
    problems = [str(p) for p in read_train_labels(cfg.data).problems]
    assert any("nope.csv: file not found (data.trainable_labels)" in p for p in problems)


def csv_dataset(root: Path, rows: list[tuple[str, str]], channels: int = 3) -> Path:
    for name, _ in rows:
        if ".." not in name:
            write_jpeg(root / "train" / name, np.full((16, 16, channels), 50, np.uint8).squeeze())
    pd.DataFrame(rows, columns=["image", "tags"]).to_csv(root / "train.csv", index=False)
    write_jpeg(root / "test" / "t.png", np.full((16, 16, channels), 50, np.uint8).squeeze())
    pd.DataFrame({"image": ["t.png"], "tags": ["x"]}).to_csv(root / "sample_submission.csv", index=False)
    return root


def csv_config(data: Path, tmp_path: Path, *overrides: str):
    return load_config(REPO_ROOT / "configs" / "csv_demo.yaml", [f"data.dir={data}", *overrides])


def test_csv_labels_are_names_and_the_vocabulary_orders_them_by_frequency(tmp_path):
    data = csv_dataset(tmp_path / "d", [("a.png", "cat dog"), ("b.png", "dog"), ("c.png", ""), ("d.png", "dog  cat")])
    cfg, table, vocabulary = load_training_data(csv_config(data, tmp_path))
    assert vocabulary.codes == ("dog", "cat")  # dog on 3 images, cat on 2
    assert table["labels"].tolist() == [(0, 1), (0,), (), (0, 1)]  # sorted class indices per row
    assert cfg.data.num_classes == 2
    assert (label_csr(table["labels"], 2).toarray() == [[1, 1], [1, 0], [0, 0], [1, 1]]).all()


@pytest.mark.parametrize("rows, message", [
    ([("a.png", "x"), ("a.png", "y")], "row 3: duplicate Id 'a.png'"),
    ([("a.png", "x"), ("../b.png", "y")], "row 3: image path '../b.png' is absolute or contains '..'"),
])
def test_bad_csv_rows_are_named(tmp_path, rows, message):
    data = csv_dataset(tmp_path / "d", rows)
    problems = [str(p) for p in read_train_labels(csv_config(data, tmp_path).data).problems]
    assert any(message in p for p in problems), problems


def test_a_missing_label_column_names_the_file_and_the_columns(tmp_path):
    data = csv_dataset(tmp_path / "d", [("a.png", "x")])
    with pytest.raises(DataError, match=r"train.csv: missing column\(s\) \['labels'\]; has \['image', 'tags'\]"):
        load_training_data(csv_config(data, tmp_path, "data.label_column=labels"))


def test_a_run_vocabulary_reports_labels_it_does_not_know(tmp_path, capsys):
    data = csv_dataset(tmp_path / "d", [("a.png", "cat dog"), ("b.png", "emu")])
    _, table, _ = load_training_data(csv_config(data, tmp_path), Vocabulary(("dog", "cat"), ("dog", "cat")))
    assert table["labels"].tolist() == [(0, 1), ()]
    assert "1 positive label(s) of 1 label id(s) are not in the run's label vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("config, fixed", [("demo.yaml", True), ("csv_demo.yaml", False)])
def test_a_run_folder_without_its_vocabulary_has_the_one_its_format_fixes(tmp_path, config, fixed):
    """A run folder from before runs kept labels.csv: hpa's classes are its numbered ones; a csv run's labels came
    from its data, so prediction stops naming the file instead of numbering them."""
    from src.run_folder import run_vocabulary

    cfg = load_config(REPO_ROOT / "configs" / config, [f"run.dir={tmp_path / 'run'}", "data.num_classes=3"])
    RunFolder(cfg.run.dir).save_config(cfg, 0)  # the config only, no vocabulary
    if fixed:
        assert run_vocabulary(cfg) == Vocabulary.numbered(3)
    else:
        with pytest.raises(PipelineError, match=r"labels.csv not found: a data.format=csv run keeps the labels"):
            run_vocabulary(cfg)


def test_one_file_images_convert_to_the_model_channels(tmp_path):
    grey, rgba = tmp_path / "grey.png", tmp_path / "rgba.png"
    cv2.imwrite(str(grey), np.arange(64, dtype=np.uint8).reshape(8, 8))
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 10, 200, 255  # blue 10, red 200 in OpenCV's BGRA order
    cv2.imwrite(str(rgba), bgra)
    tripled = decode_file(grey, 3)
    assert tripled.shape == (8, 8, 3) and (tripled[..., 0] == tripled[..., 2]).all()
    rgb = decode_file(rgba, 3)
    assert rgb.shape == (8, 8, 3) and rgb[0, 0].tolist() == [200, 0, 10]  # RGB order, alpha dropped
    assert read_image([rgba], size=4, channels=4).shape == (4, 4, 4)
    with pytest.raises(DataError, match=r"rgba.png: 4 channel\(s\), the model takes model.in_chans=2"):
        decode_file(rgba, 2)


def test_validate_names_a_truncated_jpeg_and_an_image_with_wrong_channels(tmp_path):
    data = csv_dataset(tmp_path / "d", [("a.jpg", "x"), ("b.jpg", "y"), ("c.png", "x")])
    path = data / "train" / "a.jpg"
    path.write_bytes(path.read_bytes()[:-2])
    Image.new("LA", (8, 8)).save(data / "train" / "c.png")  # grey + alpha: 2 channels
    problems = {Path(p.where).name: p.what for p in validate(csv_config(data, tmp_path), progress=False)}
    assert "truncated JPEG" in problems["a.jpg"] and "b.jpg" not in problems
    assert problems["c.png"] == "2 channel(s) (mode LA), the model takes model.in_chans=3"


def test_score_tables_for_many_classes_are_float16_npz_and_read_back(tmp_path):
    ids = ["a", "b", "c"]
    scores = np.random.default_rng(0).random((3, CSV_MAX_CLASSES + 1)).astype(np.float32)
    written = write_scores(tmp_path / "oof.csv", ids, scores)
    assert written.suffix == ".npz" and not (tmp_path / "oof.csv").exists()
    back = read_scores(tmp_path / "oof.csv")
    assert back["Id"].tolist() == ids and np.allclose(back.iloc[:, 1:].to_numpy(), scores, atol=1e-3)
    copy_scores(tmp_path / "oof.csv", tmp_path / "best.csv")
    assert (tmp_path / "best.npz").is_file() and not (tmp_path / "best.csv").exists()
    # A later run with few classes replaces it with a csv: never two tables side by side.
    write_scores(tmp_path / "oof.csv", ids, scores[:, :3])
    assert (tmp_path / "oof.csv").is_file() and not (tmp_path / "oof.npz").exists()


def test_a_score_table_is_written_and_read_a_block_of_rows_at_a_time(tmp_path):
    from src.score_table import ScoreSink, ScoreTable, combine_scores, read_score_table, stack_scores

    ids = [f"i{n}" for n in range(50)]
    scores = np.random.default_rng(1).random((50, CSV_MAX_CLASSES + 7)).astype(np.float32)
    sink = ScoreSink(ids, scores.shape[1], tmp_path / "fold0")  # as validation writes it: batch by batch
    for start in range(0, 50, 16):
        sink.append(scores[start : start + 16])
    table = sink.finish()
    temporary = table.path
    assert isinstance(table, ScoreTable) and temporary.parent == tmp_path / "fold0" and temporary.name.endswith(".tmp")
    (tmp_path / "plain").write_text("")  # the table's file mode is any new file's (the umask's), not 0600
    assert temporary.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    half = scores.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(table[:], half)
    np.testing.assert_array_equal(table[3:9, [0, 5, CSV_MAX_CLASSES]], half[3:9][:, [0, 5, CSV_MAX_CLASSES]])
    np.testing.assert_array_equal(table.take(np.array([7, 8, 2, 40]))[1:3], half[[8, 2]])
    # write_scores keeps the temporary table as the OOF table (renamed, not rewritten); np.load reads it as ever.
    written = write_scores(tmp_path / "oof.csv", ids, table)
    assert written == tmp_path / "oof.npz" and not temporary.exists()
    with np.load(written) as stored:
        assert stored["ids"].tolist() == ids and np.array_equal(stored["scores"], scores.astype(np.float16))
    back_ids, back = read_score_table(tmp_path / "oof.csv")
    assert back_ids.tolist() == ids and np.array_equal(back[:], half)
    np.testing.assert_array_equal(stack_scores([back, half[:4]])[48:52], np.concatenate([half[48:], half[:2]]))
    mean = combine_scores([back, half], lambda parts: np.mean(parts, axis=0), [None, np.arange(49, -1, -1)])
    np.testing.assert_array_equal(mean[:], np.mean([half, half[::-1]], axis=0))
    # A temporary table nobody kept is deleted when dropped.
    dropped = ScoreSink(ids, scores.shape[1], tmp_path)
    dropped.append(scores)
    path = dropped.finish().path
    assert not path.exists()


@pytest.fixture(scope="module")
def many_label_demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    return {fmt: make_many_label_dataset(root / fmt, format=fmt, n_train=72, n_test=12, size=32, num_labels=24,
                                         seed=0, progress=False) for fmt in ("openimages", "csv")}


@pytest.mark.slow
# openimages runs BCE and the label embedding end to end in tests/test_benchmarks.py (benchmarks.many_labels).
@pytest.mark.parametrize("fmt, loss", [("csv", "label_embedding")])
def test_many_label_formats_run_folds_train_predict_end_to_end(many_label_demo, tmp_path, fmt, loss):
    from src.average import average
    from src.predict import predict

    overrides = [f"data.dir={many_label_demo[fmt]}", "data.image_size=32", f"data.cache_dir={tmp_path / 'cache'}",
                 f"folds.path={tmp_path / 'folds.csv'}", "folds.n_splits=2", "model.backbone=test_resnet",
                 "train.epochs=1", "train.batch_size=8", "train.num_workers=0", "train.device=cpu",
                 "train.precision=fp32", "train.warmup_fraction=0", "wandb.mode=disabled", "predict.force=true",
                 f"run.dir={tmp_path / 'run'}", f"submission.path={tmp_path / 'submission.csv'}", f"loss.name={loss}",
                 "loss.embedding_dim=8", "predict.folds=[0]",  # one fold: the other formats' stages, not ensembles
                 "train.keep_epochs=1", "predict.checkpoint=averaged"]  # averaging reads the vocabulary's size
    cfg = load_config(REPO_ROOT / "configs" / f"{fmt}_demo.yaml", overrides)
    make_folds(cfg, progress=False)
    train(cfg, 0, progress=False)
    average(cfg, 0, progress=False)
    path = predict(cfg, progress=False)

    folder = RunFolder(cfg.run.dir)
    history = pd.read_csv(folder.history(0))
    assert cfg.train.monitor == "metric" and history["metric_raw"].between(0, 1).all()  # best.pt by per-image F2
    vocabulary = folder.load_vocabulary()
    assert 10 < len(vocabulary) <= 24
    sample = pd.read_csv(many_label_demo[fmt] / ("stage_1_sample_submission.csv" if fmt == "openimages"
                                                 else "sample_submission.csv"), dtype=str)
    submission = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(submission.columns) == list(sample.columns)  # image_id,labels / image,tags
    assert submission.iloc[:, 0].tolist() == sample.iloc[:, 0].tolist()  # the sample submission's order
    codes = set(vocabulary.codes)
    assert all(row and set(row.split()) <= codes for row in submission.iloc[:, 1])


def test_openimages_packs_and_the_cache_gives_the_image_files_arrays(many_label_demo, tmp_path):
    from src.pack import open_packed, pack

    cfg = openimages_config(many_label_demo["openimages"], tmp_path)
    cfg, table, _ = load_training_data(cfg)
    pack(cfg, workers=1, progress=False)
    packed = open_packed(cfg.data, table)
    assert packed is not None
    for row in (0, len(table) - 1):
        assert np.array_equal(packed[row], read_image(table["files"].iloc[row], 32, 3))
    assert packed[0].shape == (32, 32, 3)


def test_csv_with_a_path_column_keeps_ids_as_keys_and_a_sample_submission_needs_no_path(tmp_path):
    data = tmp_path / "d"
    for name in ("sub/a.png", "b c.png", "t.jpg"):
        write_jpeg(data / ("test" if name == "t.jpg" else "train") / name, np.full((8, 8, 3), 9, np.uint8))
    pd.DataFrame({"key": ["sub/a.png", "b c.png"], "file": ["sub/a.png", "b c.png"],
                  "tags": ["golden retriever|dog", "dog"]}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"key": ["t"], "tags": ["dog"]}).to_csv(data / "sample_submission.csv", index=False)
    cfg = csv_config(data, tmp_path, "data.id_column=key", "data.path_column=file", "data.label_separator='|'",
                     "data.label_column=tags")
    _, table, vocabulary = load_training_data(cfg)
    assert table["Id"].tolist() == ["sub/a.png", "b c.png"]  # a key, not a file name: '/' and spaces are fine
    assert vocabulary.codes == ("dog", "golden retriever")
    test = load_test_table(cfg.data)  # no path column there: <test>/<id><data.image_ext>
    assert test["files"].iloc[0] == (str(data / "test" / "t.jpg"),)

    from src.predict import make_submission

    submission = make_submission(test, np.array([[True, True]]), vocabulary, ("key", "tags"), "|")
    assert submission["tags"].tolist() == ["dog|golden retriever"]  # the data's separator, names with spaces kept


def test_openimages_images_follow_the_image_extension(small_openimages, tmp_path):
    cfg = small_openimages_config(small_openimages, tmp_path, "data.image_ext=.png")
    _, table, _ = load_training_data(cfg)
    assert table["files"].iloc[0] == (str(small_openimages / "train" / "aa01.png"),)
    assert load_test_table(cfg.data)["files"].iloc[0] == (str(small_openimages / "test" / "ee05.png"),)


def test_openimages_sample_table_names_the_configured_image_kind(small_openimages, tmp_path):
    """The sample table's ``ext`` (the kind of each sample's image file) follows data.image_ext, as its files do:
    PNG data is not said to be JPEG."""
    cfg = small_openimages_config(small_openimages, tmp_path, "data.image_ext=.png")
    table = read_train_labels(cfg.data).frame
    assert set(table["ext"]) == {"png"}


def test_a_rate_table_names_labels_by_code(tmp_path):
    from src.predict import label_rates

    table = tmp_path / "rates.csv"
    table.write_text("class,rate\n/m/fish,0.25\n")
    vocabulary = Vocabulary(("/m/cat", "/m/fish"), ("Cat", "Fish"))
    cfg = load_config(REPO_ROOT / "configs" / "openimages_demo.yaml", [f"predict.rate_table={table}"])
    rates = label_rates(cfg, np.array([[1, 0], [1, 1]]), vocabulary)
    assert rates.tolist() == [1.0, 0.25]
    table.write_text("class,rate\n/m/emu,0.25\n")
    with pytest.raises(PipelineError, match=r"row\(s\) \[2\] name a label outside the run's vocabulary"):
        label_rates(cfg, np.array([[1, 0], [1, 1]]), vocabulary)


def test_validate_refuses_a_16_bit_rgb_png(tmp_path):
    data = csv_dataset(tmp_path / "d", [("a.png", "x"), ("b.png", "y")])
    cv2.imwrite(str(data / "train" / "a.png"), np.full((8, 8, 3), 4000, np.uint16))
    problems = {Path(p.where).name: p.what for p in validate(csv_config(data, tmp_path), progress=False)}
    assert problems == {"a.png": "16-bit PNG: the pipeline reads 8-bit images"}


def test_a_cache_packed_for_other_channels_is_refused(many_label_demo, tmp_path):
    from src.dataset import RGBYDataset
    from src.pack import open_packed, pack

    cfg = openimages_config(many_label_demo["openimages"], tmp_path)
    cfg, table, _ = load_training_data(cfg)
    pack(cfg, workers=1, progress=False)
    with pytest.raises(DataError, match=r"holds 3-channel images, the model takes model.in_chans=4"):
        RGBYDataset(table, cfg.data.num_classes, 32, packed=open_packed(cfg.data, table), channels=4)
