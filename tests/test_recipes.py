"""Settings that transfer to new data: schedule-relative EMA and warm-up, the learning-rate range test,
and the warning when a model learned nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from timm.utils import ModelEmaV3

from src.config import load_config
from src.folds import make_folds
from src.lr_find import lr_find, suggest
from src.train import build_parts, train
from tests.conftest import REPO_ROOT, TINY_CLASSES, tiny_config


def main_config(data_dir: Path, work_dir: Path, *overrides: str):
    """configs/hpa_nasnet512.yaml with only data keys, a tiny backbone and CPU settings changed."""
    cfg = load_config(REPO_ROOT / "configs" / "hpa_nasnet512.yaml", [
        f"data.dir={data_dir}", f"data.num_classes={TINY_CLASSES}", "data.image_size=32",
        f"folds.path={work_dir / 'folds.csv'}", "folds.n_splits=2", "folds.rare_classes=warn",
        "model.backbone=test_resnet", "model.pretrained=false", "train.device=cpu", "train.num_workers=0",
        "wandb.mode=disabled", f"run.dir={work_dir / 'run'}", *overrides])
    make_folds(cfg, progress=False)
    return cfg


def initial_weight_share(ema: ModelEmaV3, steps: int) -> float:
    """How much of the weights after the first optimizer step (which the first EMA update copies; still
    close to the random init) the EMA holds after ``steps`` updates."""
    return math.prod(ema.get_decay(step) for step in range(2, steps + 1))


def recent_weight_share(ema: ModelEmaV3, steps: int, recent: int) -> float:
    """The share of the EMA made of the last ``recent`` of ``steps`` updates."""
    return 1 - math.prod(ema.get_decay(step) for step in range(steps - recent + 1, steps + 1))


def test_ema_on_a_short_schedule_forgets_the_initial_weights(tiny_data, tmp_path):
    # Tiny data under the main config: 1 optimizer step per epoch (3 batches of 8, accum_steps 8), so
    # train.epochs sets the schedule length: 285 steps, the held-out run that learned nothing.
    cfg = main_config(tiny_data, tmp_path, "train.epochs=285")
    parts = build_parts(cfg, 0, progress=False)
    steps = cfg.train.epochs * parts.steps_per_epoch
    assert steps == 285 and parts.ema is not None
    assert initial_weight_share(parts.ema, steps) < 1e-3
    # The old setting (decay 0.999 in absolute steps, no EMA warm-up) kept ~75 % of the random init.
    old = ModelEmaV3(parts.model, decay=0.999)
    assert initial_weight_share(old, steps) > 0.7


def test_ema_and_warmup_scale_with_the_schedule(tiny_data, tmp_path):
    shares, warmups = [], []
    for epochs in (300, 15000):
        cfg = main_config(tiny_data, tmp_path / str(epochs), f"train.epochs={epochs}")
        parts = build_parts(cfg, 0, progress=False)
        steps = epochs * parts.steps_per_epoch
        horizon = round(cfg.train.ema_horizon * steps)
        shares.append(recent_weight_share(parts.ema, steps, horizon))
        lrs = []
        for _ in range(round(0.1 * steps)):
            lrs.append(parts.optimizer.param_groups[-1]["lr"])
            parts.optimizer.step()
            parts.scheduler.step()
        warmups.append((int(np.argmax(lrs)) + 1) / steps)  # the peak ends the warm-up
    # The last ema_horizon of the run makes up 1 - 1/e of the EMA at 300 steps and at 15 000.
    assert shares == pytest.approx([1 - 1 / math.e] * 2, abs=0.01)
    assert warmups == pytest.approx([cfg.train.warmup_fraction] * 2, abs=0.005)


def test_suggest_takes_a_tenth_of_the_loss_minimum():
    lrs = np.logspace(-6, 0, 61)
    loss = 1 + (np.log10(lrs) + 2) ** 2 / 10  # minimum at lr 1e-2
    loss[lrs > 0.1] += 5 * (np.log10(lrs[lrs > 0.1]) + 1)
    table = pd.DataFrame({"lr": lrs, "smoothed_loss": loss})
    suggestion = suggest(table, backbone_ratio=0.25)
    assert suggestion.min_loss_lr == pytest.approx(1e-2)
    assert suggestion.lr == pytest.approx(1e-3) and suggestion.backbone_lr == pytest.approx(2.5e-4)
    assert suggestion.steepest_lr < suggestion.min_loss_lr


@pytest.mark.slow
def test_lr_find_writes_a_table_and_a_plot_and_no_checkpoint(tiny_data, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path, "train.backbone_lr=1e-3", "train.lr=4e-3")
    make_folds(cfg, progress=False)
    table, suggestion, out_dir = lr_find(cfg, fold=0, steps=12, start=1e-5, end=1.0)
    assert 3 <= len(table) <= 12
    assert (np.diff(table["lr"]) > 0).all() and table["lr"].iloc[0] == pytest.approx(1e-5)
    # A backbone from scratch (the tiny config) trains at train.lr: backbone_lr is for pretrained weights.
    np.testing.assert_allclose(table["backbone_lr"], table["lr"])
    assert suggestion.backbone_lr is None
    assert 1e-5 / 10 <= suggestion.lr <= 1.0
    assert (out_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(out_dir / "lr_find.csv").shape == table.shape
    assert not list(Path(cfg.run.dir).rglob("*.pt"))
    assert "suggested: train.lr=" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("warn_after", [1, 0])
def test_a_model_that_learned_nothing_is_flagged(tiny_data, tmp_path, capsys, warn_after):
    cfg = tiny_config(tiny_data, tmp_path, "train.lr=1e-9", "train.epochs=2",
                      f"train.warn_no_learning_after={warn_after}")
    make_folds(cfg, progress=False)
    result = train(cfg, 0, progress=False)
    history = pd.read_csv(Path(cfg.run.dir) / "fold0" / "history.csv")
    assert not history["beats_prior"].any() and not result["beats_prior"]
    assert (history["val_loss"] > history["prior_val_loss"]).all()
    warned = "no better than the prior predictor" in capsys.readouterr().err
    assert warned == bool(warn_after)


def test_global_batch_sets_the_accumulation_for_any_batch_and_process_count(tiny_data, tmp_path):
    from src.train import Dist, resolve_accumulation

    cfg = main_config(tiny_data, tmp_path)
    assert cfg.train.global_batch == 64
    for batch, world, accum in [(8, 1, 8), (32, 1, 2), (8, 2, 4), (64, 1, 1), (128, 1, 1)]:
        resolved = resolve_accumulation(cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"batch_size": batch})}), Dist(0, world, 0))
        assert resolved.train.accum_steps == accum, (batch, world)


def test_backbone_lr_is_for_pretrained_backbones_only(tiny_cfg):
    from src.config import override
    from src.model import build_model, param_groups

    cfg = override(tiny_cfg, **{"train.lr": 1e-3, "train.backbone_lr": 1e-4})
    model = build_model(cfg)
    rates = {g["name"]: g["lr"] for g in param_groups(model, cfg.train, pretrained=True)}
    assert rates["backbone"] == 1e-4 and rates["modifier+head"] == 1e-3
    rates = {g["name"]: g["lr"] for g in param_groups(model, cfg.train, pretrained=False)}
    assert rates["backbone"] == rates["modifier+head"] == 1e-3
