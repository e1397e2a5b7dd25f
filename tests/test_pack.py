"""The packed image cache: identical batches to the image files, stale caches refused, resumable packing,
and an HPAv18-style extra source (per-channel RGB JPEGs at another size) that packs and trains."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from src.config import PipelineError, override
from src.data import train_sources
from src.folds import make_folds
from src.formats import load_train_table
from src.images import CHANNELS, read_rgby
from src.pack import array_path, manifest_path, open_packed, pack, pack_source
from src.train import Trainer, build_parts, train
from tests.conftest import tiny_config


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
    for name in ("train", "test"):
        assert array_path(cfg.data, name).is_file() and manifest_path(cfg.data, name).is_file()
    parts = build_parts(cfg, 0, progress=False)
    assert parts.train_set.packed is not None and parts.val_set.packed is not None
    cached = epoch_batches(cfg)
    assert len(cached) == len(without) > 1
    for (images, targets), (reference, reference_targets) in zip(cached, without):
        assert torch.equal(images, reference) and torch.equal(targets, reference_targets)
    manifest = json.loads(manifest_path(cfg.data, "train").read_text())
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
    manifest = json.loads(manifest_path(cfg.data, "train").read_text())
    # As if killed half way: the partial array holds the first half, the progress file records it.
    half = len(table) // 2
    array = np.frombuffer(reference, dtype=np.uint8).reshape(manifest["shape"]).copy()
    array[half:] = 0
    partial = complete.with_name(complete.name + ".partial")
    array.tofile(partial)
    complete.unlink()
    manifest_path(cfg.data, "train").unlink()
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
    packed = np.memmap(array_path(cfg.data, "extra0"), dtype=np.uint8, mode="r", shape=(8, 32, 32, 4))
    first = pd.read_csv(csv, dtype=str)["Id"].iloc[0]
    reference = read_rgby(images, first, 32, ext="jpg")
    assert np.array_equal(packed[0], reference) and reference.std() > 0
    result = train(cfg, 0, progress=False)
    assert result["steps"] > 0
