"""The packed image cache: identical batches to the image files, stale caches refused, resumable packing,
an HPAv18-style extra source (per-channel RGB JPEGs at another size) that packs and trains, caches named by
their source (another dataset's never opened), a cache used without its images, and ``--verify``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from src import data as data_module
from src import pack as pack_module
from src.cli import run_cli
from src.config import PipelineError, override
from src.data import train_sources
from src.demo import make_demo_dataset
from src.folds import make_folds
from src.formats import load_test_table, load_train_table
from src.images import CHANNELS, read_rgby
from src.pack import array_path, manifest_path, open_packed, pack, pack_source, verify
from src.predict import predict
from src.train import Trainer, build_parts, train
from tests.conftest import TINY_CLASSES, tiny_config


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def epoch_batches(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    trainer = Trainer(build_parts(cfg, 0, progress=False), progress=False)
    return list(trainer.epoch_batches())


def test_cache_and_image_files_give_identical_batches(data, tmp_path):
    cfg = tiny_config(data, tmp_path)  # the tiny config keeps augmentation on: the same per-sample seeds apply
    make_folds(cfg, progress=False)
    without = epoch_batches(override(cfg, **{"data.cache_dir": None}))
    pack(cfg, workers=2, progress=False)
    for source in train_sources(cfg.data) + [data_module.test_source(cfg.data)]:
        assert array_path(cfg.data, source).is_file() and manifest_path(cfg.data, source).is_file()
    parts = build_parts(cfg, 0, progress=False)
    assert parts.train_set.packed is not None and parts.val_set.packed is not None
    cached = epoch_batches(cfg)
    assert len(cached) == len(without) > 1
    for (images, targets), (reference, reference_targets) in zip(cached, without):
        assert torch.equal(images, reference) and torch.equal(targets, reference_targets)
    manifest = json.loads(manifest_path(cfg.data, train_sources(cfg.data)[0]).read_text())
    assert len(manifest["samples"]) == len(load_train_table(cfg.data)) and len(manifest["samples"][0]["blake2b"]) == 32


def test_a_stale_cache_is_refused_naming_the_sample(data, tmp_path):
    cfg = tiny_config(data, tmp_path)
    pack(cfg, workers=1, progress=False)
    table = load_train_table(cfg.data)
    victim = table["Id"].iloc[3]
    path = data / "train" / f"{victim}_green.png"
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(path), 255 - image)  # the image changed after packing
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(PipelineError, match=f"stale: sample '{victim}'"):
        open_packed(cfg.data, table)


def test_a_cache_covering_only_some_sources_is_refused(data, tmp_path):
    cfg = tiny_config(data, tmp_path)
    pack(cfg, workers=1, progress=False)
    extra = tmp_path / "extra"
    (extra / "images").mkdir(parents=True)
    sample = load_train_table(cfg.data)["Id"].iloc[0]
    for channel in CHANNELS:
        shutil.copy(data / "train" / f"{sample}_{channel}.png", extra / "images" / f"x{sample}_{channel}.png")
    pd.DataFrame({"Id": [f"x{sample}"], "Target": ["1"]}).to_csv(extra / "extra.csv", index=False)
    with_extra = override(cfg, **{"data.extra": [{"csv": str(extra / "extra.csv"), "images": str(extra / "images")}]})
    with pytest.raises(PipelineError, match=r"not for \['extra0'\]"):
        open_packed(with_extra.data, load_train_table(with_extra.data))


def test_packing_resumes_where_it_stopped(data, tmp_path):
    cfg = tiny_config(data, tmp_path)
    source = train_sources(cfg.data)[0]
    table = load_train_table(cfg.data)
    complete = pack_source(cfg.data, source, table, workers=1, progress=False)
    reference = complete.read_bytes()
    manifest = json.loads(manifest_path(cfg.data, source).read_text())
    # As if killed half way: the partial array holds the first half, the progress file records it.
    half = len(table) // 2
    array = np.frombuffer(reference, dtype=np.uint8).reshape(manifest["shape"]).copy()
    array[half:] = 0
    partial = complete.with_name(complete.name + ".partial")
    array.tofile(partial)
    complete.unlink()
    manifest_path(cfg.data, source).unlink()
    plan = {k: manifest[k] for k in ("ids", "size", "csv", "images", "ext", "channels")}
    done = [[row, s["files"], s["blake2b"]] for row, s in enumerate(manifest["samples"][:half])]
    progress = complete.with_name(complete.name + ".progress.json")
    progress.write_text(json.dumps({"plan": plan, "done": done}))
    # The first half must not be decoded again: poison one of its source images while resuming.
    first = data / "train" / f"{table['Id'].iloc[0]}_red.png"
    saved_first = first.read_bytes()
    first.write_bytes(b"not decodable any more")
    pack_source(cfg.data, source, table, workers=1, progress=False)
    first.write_bytes(saved_first)
    assert complete.read_bytes() == reference
    assert not partial.exists() and not progress.exists()


def write_jpeg_source(data: Path, root: Path, n: int, size: int) -> tuple[Path, Path]:
    """An HPAv18-style source: per-channel RGB-encoded grey JPEGs, at another size than the main set."""
    images = root / "images"
    images.mkdir(parents=True)
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False).head(n)
    for sample_id in train["Id"]:
        rgby = read_rgby(data / "train", sample_id, size)
        for channel, plane in zip(CHANNELS, np.moveaxis(rgby, -1, 0)):
            assert cv2.imwrite(str(images / f"v18_{sample_id}_{channel}.jpg"), cv2.merge([plane] * 3))
    csv = root / "hpav18.csv"
    pd.DataFrame({"Id": "v18_" + train["Id"], "Target": train["Target"]}).to_csv(csv, index=False)
    return csv, images


@pytest.mark.slow
def test_an_hpav18_style_jpeg_source_packs_and_trains(data, tmp_path):
    csv, images = write_jpeg_source(data, tmp_path / "hpav18", n=8, size=64)  # the main set is 32 px
    cfg = tiny_config(data, tmp_path, f"data.extra=[{{csv: {csv}, images: {images}, ext: jpg}}]")
    make_folds(cfg, progress=False)  # validates the JPEG source too
    pack(cfg, workers=2, progress=False)
    packed = np.memmap(array_path(cfg.data, train_sources(cfg.data)[1]), dtype=np.uint8, mode="r", shape=(8, 32, 32, 4))
    first = pd.read_csv(csv, dtype=str)["Id"].iloc[0]
    reference = read_rgby(images, first, 32, ext="jpg")
    assert np.array_equal(packed[0], reference) and reference.std() > 0
    result = train(cfg, 0, progress=False)
    assert result["steps"] > 0


@pytest.fixture
def notes(monkeypatch):
    """A fresh record of the notes printed once per process (as in a new ``python -m src.<stage>``)."""
    monkeypatch.setattr(pack_module, "_noted", set())
    return lambda: monkeypatch.setattr(pack_module, "_noted", set())


def test_training_and_prediction_use_the_cache_alone_when_the_images_are_gone(data, tmp_path, capsys, notes):
    cfg = tiny_config(data, tmp_path)
    pack(cfg, workers=1, progress=False)
    away = tmp_path / "away"
    away.mkdir()
    table = load_train_table(cfg.data)
    first = data / "train" / f"{table['Id'].iloc[0]}_red.png"
    shutil.move(first, away / first.name)  # one file gone, the others there: never a silent mix
    with pytest.raises(PipelineError, match=f"sample '{table['Id'].iloc[0]}' has no file {first}, while other"):
        open_packed(cfg.data, table)
    for folder in ("train", "test"):
        shutil.move(data / folder, away / folder)
    make_folds(cfg, progress=False)  # the folds need only the labels
    with pytest.raises(PipelineError, match="group_duplicates=true hashes every training image"):
        make_folds(override(cfg, **{"folds.group_duplicates": True}), progress=False)
    capsys.readouterr()
    assert train(cfg, 0, progress=False)["steps"] > 0
    err = capsys.readouterr().err
    assert err.count("note: the image files of source 'train'") == 1 and "as packed on" in err, err
    notes()
    submission = predict(cfg, progress=False)
    err = capsys.readouterr().err
    assert err.count("note: the image files of source 'test'") == 1 and "content hash" in err, err
    assert submission.is_file() and (tmp_path / "run" / "test_probs.csv").is_file()


def test_a_cache_moved_with_its_labels_is_used_without_its_images(data, tmp_path, capsys, notes):
    """A cache uploaded as a Kaggle dataset: other paths, the same label files, no images."""
    cfg = tiny_config(data, tmp_path)
    pack(cfg, workers=1, progress=False)
    uploaded = tmp_path / "kaggle" / "input"
    uploaded.mkdir(parents=True)
    for name in ("train.csv", "sample_submission.csv"):
        shutil.copy(data / name, uploaded / name)
    shutil.copytree(tmp_path / "cache", uploaded / "cache")
    moved = override(cfg, **{"data.dir": str(uploaded), "data.cache_dir": str(uploaded / "cache")})
    packed = open_packed(moved.data, load_test_table(moved.data))
    assert packed is not None and packed.arrays["test"][0].startswith(str(uploaded / "cache"))
    assert "note: the image files of source 'test'" in capsys.readouterr().err


def test_a_cache_of_another_dataset_is_never_opened(tmp_path, capsys, notes):
    """Two datasets with the same Ids (train00000, ...) and one data.cache_dir, as when only data.dir changes:
    B reads its own images (the note names A's cache) until B is packed, then its own cache."""
    cache = tmp_path / "cache"
    folders = {name: make_demo_dataset(tmp_path / name, n_train=16, n_test=4, size=32, num_classes=TINY_CLASSES,
                                       seed=seed, progress=False) for name, seed in (("a", 1), ("b", 2))}
    cfg_a, cfg_b = (tiny_config(folders[name], tmp_path / f"work_{name}", f"data.cache_dir={cache}") for name in "ab")
    pack(cfg_a, workers=1, progress=False)
    make_folds(cfg_b, progress=False)
    capsys.readouterr()
    assert build_parts(cfg_b, 0, progress=False).train_set.packed is None  # B's images, not A's arrays
    note = capsys.readouterr().err
    assert note.count("holds no packed cache of source 'train'") == 1, note
    assert str((folders["a"] / "train.csv").resolve()) in note and "python -m src.pack --config" in note
    table_b = load_train_table(cfg_b.data)
    shutil.move(folders["b"] / "train", tmp_path / "b_train")  # B's images gone: still never A's arrays
    assert open_packed(cfg_b.data, table_b) is None
    shutil.move(tmp_path / "b_train", folders["b"] / "train")
    pack(cfg_b, workers=1, progress=False)
    array_b, array_a = (array_path(cfg.data, train_sources(cfg.data)[0]) for cfg in (cfg_b, cfg_a))
    assert array_a != array_b and array_a.is_file()
    packed = open_packed(cfg_b.data, table_b)
    assert {path for path, _ in packed.arrays.values()} == {str(array_b)}
    sample = table_b["Id"].iloc[0]
    assert np.array_equal(packed[0], read_rgby(folders["b"] / "train", sample, 32))
    assert not np.array_equal(packed[0], read_rgby(folders["a"] / "train", sample, 32))
    assert open_packed(cfg_a.data, load_train_table(cfg_a.data)).arrays["train"][0] == str(array_a)


def test_verify_lists_a_file_changed_since_packing(data, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(data, tmp_path)
    pack(cfg, workers=1, progress=False)
    assert verify(cfg, progress=False) == []
    victim = load_train_table(cfg.data)["Id"].iloc[5]
    path = data / "train" / f"{victim}_blue.png"
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(raw)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: only the bytes tell
    assert verify(cfg, progress=False) == [f"train: {victim!r} changed since packing (its bytes; same sizes and times)"]
    monkeypatch.setattr(pack_module, "config_from_args", lambda args: cfg)
    monkeypatch.setattr(sys, "argv", ["src.pack", "--verify"])
    with pytest.raises(SystemExit) as stopped:
        run_cli(pack_module.main)
    out = capsys.readouterr()
    assert stopped.value.code == 2 and f"train: {victim!r} changed since packing" in out.out
    assert "the packed cache differs from its sources" in out.err
