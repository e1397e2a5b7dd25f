"""Checkpoints, outputs and exact resume of src.train on CPU.

A run stopped by ``train.stop_after_steps`` (mid-epoch) and continued with ``train.resume=true`` must end
bit-for-bit where the uninterrupted run ends: model, optimizer, scheduler, EMA, sampler and RNG states.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.config import load_config
from src.model import resolve_precision
from src.train import Trainer, TrainingDiverged, build_parts, train
from tests.conftest import TINY_CLASSES, tiny_config
from tests.helpers import assert_same, write_folds

pytestmark = pytest.mark.slow

N_TRAIN = 24  # fold 0 trains on 24 samples: 3 optimizer steps per epoch at batch 8 (or 4 x 2 accumulated)
STEPS_PER_EPOCH = 3
EPOCHS = 2
VARIANTS = {
    "plain": (),
    "ema": ("train.ema=true", "train.ema_horizon=0.3"),
    "workers+augment": ("train.num_workers=2",),  # the tiny config keeps the default augmentation on
    "accumulation": ("train.batch_size=4", "train.accum_steps=2"),
    "device-augment": ("train.augment.where=device",),  # the policy on each batch, from the seeds it carries
}



def run_config(tiny_data, work_dir: Path, variant: str, *overrides: str):
    cfg = tiny_config(tiny_data, work_dir, f"train.epochs={EPOCHS}", "train.checkpoint_every_steps=1",
                      *VARIANTS[variant], *overrides)
    write_folds(cfg, N_TRAIN)
    return cfg


def fold_dir(cfg) -> Path:
    return Path(cfg.run.dir) / "fold0"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_same_checkpoint(path: Path, reference_path: Path) -> None:
    """Equal training state: every tensor with torch.equal; the history up to its wall-clock seconds."""
    ckpt, reference = load(path), load(reference_path)
    assert ckpt.keys() == reference.keys()
    for key in ckpt:
        if key == "config":  # run.dir, resume and stop_after_steps legitimately differ
            continue
        if key == "history":
            assert_same(without_seconds(ckpt[key]), without_seconds(reference[key]), key)
        else:
            assert_same(ckpt[key], reference[key], key)


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    """The uninterrupted run of a variant (trained once per module): its fold folder."""
    done: dict[str, Path] = {}

    def run(variant: str) -> Path:
        if variant not in done:
            cfg = run_config(tiny_data, tmp_path_factory.mktemp(f"reference-{variant.replace('+', '-')}"), variant)
            result = train(cfg, 0, progress=False)
            assert result["steps"] == EPOCHS * STEPS_PER_EPOCH and not result["stopped_early"]
            done[variant] = fold_dir(cfg)
        return done[variant]

    return run


@pytest.mark.parametrize("variant, stop_after", [
    ("plain", 2),  # inside epoch 1
    ("plain", 4),  # inside epoch 2, after epoch 1's validation and checkpoints
    ("ema", 2),
    ("ema", 4),
    ("workers+augment", 2),
    ("workers+augment", 4),
    ("accumulation", 2),  # stops after 4 of the 6 micro-batches of epoch 1
    ("accumulation", 4),  # stops after 2 of the 6 micro-batches of epoch 2
    ("device-augment", 2),
])
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tiny_data, tmp_path, reference_run, capsys,
                                                             variant, stop_after):
    reference = reference_run(variant)
    stopping = run_config(tiny_data, tmp_path, variant, f"train.stop_after_steps={stop_after}")
    stopped = train(stopping, 0, progress=False)
    assert stopped["stopped_early"] and stopped["steps"] == stop_after
    state = load(fold_dir(stopping) / "last.pt")["state"]
    micro_batches_done = (stop_after % STEPS_PER_EPOCH) * stopping.train.accum_steps
    assert (state["step"], state["epoch"], state["batches_done"]) == (
        stop_after, stop_after // STEPS_PER_EPOCH, micro_batches_done)
    assert micro_batches_done > 0  # really mid-epoch

    cfg = run_config(tiny_data, tmp_path, variant, "train.resume=true")

    capsys.readouterr()
    finished = train(cfg, 0, progress=False)
    assert f"optimizer step {stop_after}" in capsys.readouterr().out  # it did resume, not start over
    assert finished["steps"] == EPOCHS * STEPS_PER_EPOCH and not finished["stopped_early"]
    assert_same_checkpoint(fold_dir(cfg) / "last.pt", reference / "last.pt")
    assert_same_checkpoint(fold_dir(cfg) / "best.pt", reference / "best.pt")
    assert (fold_dir(cfg) / "oof.csv").read_bytes() == (reference / "oof.csv").read_bytes()


def test_resume_from_an_end_of_epoch_checkpoint(tiny_data, tmp_path, reference_run):
    # Interrupted between epochs (after epoch 1's last.pt, before any step of epoch 2): the resumed run
    # must draw epoch 2's order, not replay epoch 1's from a freshly seeded sampler.
    cfg = run_config(tiny_data, tmp_path, "plain")
    trainer = Trainer(build_parts(cfg, 0, progress=False), progress=False)
    train_epoch = trainer.train_epoch

    def interrupted_in_epoch_two(batches, tracker=None, hooks=None):
        if trainer.state.epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(batches, tracker, hooks)

    trainer.train_epoch = interrupted_in_epoch_two
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state = load(fold_dir(cfg) / "last.pt")["state"]
    assert (state["epoch"], state["batches_done"], state["step"]) == (1, 0, STEPS_PER_EPOCH)

    train(run_config(tiny_data, tmp_path, "plain", "train.resume=true"), 0, progress=False)
    assert_same_checkpoint(fold_dir(cfg) / "last.pt", reference_run("plain") / "last.pt")


def test_resume_without_last_checkpoint_starts_fresh(tiny_data, tmp_path, reference_run, capsys):
    cfg = run_config(tiny_data, tmp_path, "plain", "train.resume=true")
    result = train(cfg, 0, progress=False)
    assert "starting fresh" in capsys.readouterr().err  # a note: stderr
    assert result["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_checkpoint(fold_dir(cfg) / "last.pt", reference_run("plain") / "last.pt")


def test_training_writes_its_outputs(reference_run):
    folder = reference_run("plain")
    work_dir = folder.parent.parent
    for name in ("best.pt", "last.pt", "oof.csv", "history.csv", "config.yaml"):
        assert (folder / name).is_file(), name
    assert (folder.parent / "config.yaml").is_file()
    assert not list(work_dir.rglob("*.tmp")), "a temp file of an atomic write was left behind"

    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(folder / name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "state", "rng", "config"} <= ckpt.keys()
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert load(folder / "last.pt")["state"]["step"] == EPOCHS * STEPS_PER_EPOCH

    cfg = load_config(folder / "config.yaml")
    assert cfg.run.dir == str(folder.parent) and cfg.train.epochs == EPOCHS
    # The run says which precision it used and why: the demo's auto, resolved for this CPU.
    used = resolve_precision(torch.device("cpu"), "auto")
    assert (folder / "config.yaml").read_text().startswith(f"# {used.describe()}\n")
    assert cfg.train.precision == used.name
    assert load_config(folder.parent / "config.yaml") == cfg

    oof = pd.read_csv(folder / "oof.csv", dtype={"Id": str})
    assert list(oof.columns) == ["Id"] + [str(c) for c in range(TINY_CLASSES)]
    folds = pd.read_csv(cfg.folds.path, dtype={"Id": str})
    assert oof["Id"].tolist() == folds.loc[folds["fold"] == 0, "Id"].tolist()
    assert len(oof) == len(folds) - N_TRAIN
    probs = oof.drop(columns="Id").to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()

    history = pd.read_csv(folder / "history.csv")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert history["step"].tolist() == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    assert history["best"].any()


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    cfg = run_config(tiny_data, tmp_path, "plain")
    trainer = Trainer(build_parts(cfg, 0, progress=False), progress=False)
    real_loss, calls = trainer.parts.loss_fn, []

    def loss_fn(outputs, targets):
        calls.append(1)
        loss = real_loss(outputs, targets)
        return loss if len(calls) == 1 else loss * math.nan  # NaN from the second optimizer step on

    trainer.parts.loss_fn = loss_fn
    saved: list[bytes] = []  # the bytes of every checkpoint written
    save = trainer.save

    def recording_save() -> Path:
        path = save()
        saved.append(path.read_bytes())
        return path

    trainer.save = recording_save

    with pytest.raises(TrainingDiverged) as error:
        trainer.fit()
    message = str(error.value)
    assert "nan" in message and "last.pt" in message and "train.lr" in message
    last = fold_dir(cfg) / "last.pt"
    assert len(saved) == 1 and last.read_bytes() == saved[0]  # written after step 1, untouched since
    ckpt = load(last)
    assert ckpt["state"]["step"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not list(tmp_path.rglob("*.tmp"))
