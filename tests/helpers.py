"""Helpers shared by the training tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from src.config import Config
from src.formats import load_train_table
from src.images import CHANNELS


def write_folds(cfg: Config, n_train: int) -> tuple[list[str], list[str]]:
    """Write ``cfg.folds.path`` so that fold 0 trains on exactly the first ``n_train`` samples and
    validates on the rest; returns (train Ids, validation Ids).

    Fixing the split by hand keeps step counts and the short last batch independent of how the demo
    generator and the stratifier happen to split the tiny data set.
    """
    ids = load_train_table(cfg.data)["Id"].tolist()
    assert 0 < n_train < len(ids), f"the tiny data set has {len(ids)} samples"
    path = Path(cfg.folds.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"Id": ids, "fold": [1] * n_train + [0] * (len(ids) - n_train)}).to_csv(path, index=False)
    return ids[:n_train], ids[n_train:]


def assert_same(actual, expected, where: str = "") -> None:
    """Exact equality of nested dicts/lists/tuples of tensors and plain values (tensors: torch.equal)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: keys differ"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def copy_train_image_to_test(data: Path, train_id: str, test_id: str) -> None:
    """Overwrite a test image's planes with a training image's: the test image is then an exact copy."""
    for channel in CHANNELS:
        shutil.copy(data / "train" / f"{train_id}_{channel}.png", data / "test" / f"{test_id}_{channel}.png")
