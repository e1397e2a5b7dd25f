"""Shared fixtures: the real demo generator and the real demo config, shrunk to a tiny CPU run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.config import Config, load_config
from src.demo import make_demo_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CLASSES = 6


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny HPA-format dataset (48 train, 12 test, 32 px, 6 classes) from the demo generator."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny") / "data", n_train=48, n_test=12, size=32,
                             num_classes=TINY_CLASSES, seed=0, progress=False)


def tiny_config(data_dir: Path, work_dir: Path, *overrides: str) -> Config:
    """configs/demo.yaml shrunk to seconds on a CPU: tiny timm test model, 2 folds, W&B off, the default
    augmentation policy on (the demo switches it off for its short schedule), degenerate submissions allowed."""
    return load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"data.dir={data_dir}", f"data.num_classes={TINY_CLASSES}", "data.image_size=32",
        f"folds.path={work_dir / 'folds.csv'}", "folds.n_splits=2", "folds.rare_classes=warn",
        f"data.cache_dir={work_dir / 'cache'}",
        "model.backbone=test_resnet", "train.epochs=1", "train.batch_size=8", "train.accum_steps=1",
        "train.num_workers=0", "train.device=cpu", "train.warmup_fraction=0", "wandb.mode=disabled",
        "train.augment.d4=1.0", "train.augment.shift_scale_rotate=0.5", "train.augment.brightness_contrast=0.3",
        "train.augment.gamma=0.3",
        # A one-epoch tiny model predicts near-constant labels: the prediction tests test the mechanics, so
        # they write its submission anyway (test_predict checks the refusal without it).
        "predict.force=true",
        f"run.dir={work_dir / 'run'}", f"submission.path={work_dir / 'submission.csv'}", *overrides,
    ])


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path) -> Config:
    return tiny_config(tiny_data, tmp_path)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run torch ops on one thread. On a small shared CPU box, OpenMP threads that spin-wait for each
    other make tiny models 10-50x slower under load; one thread is fast and just as deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
