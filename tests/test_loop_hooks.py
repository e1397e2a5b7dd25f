"""LoopHooks: what a caller (lr_find, the tuner) hears from the training loop, and how it stops it."""

from __future__ import annotations

from src.checkpoint import load_checkpoint
from src.run_folder import RunFolder
from src.train import LoopHooks, Trainer, build_parts, print_summary, train
from tests.conftest import tiny_config
from tests.helpers import write_folds

N_TRAIN = 24  # fold 0 trains on 24 samples: 3 optimizer steps per epoch at batch 8


class Recorder(LoopHooks):
    """Records what it hears; stops after ``stop_step`` optimizer steps or ``stop_epoch`` epochs."""

    def __init__(self, stop_step: int | None = None, stop_epoch: int | None = None):
        self.stop_step, self.stop_epoch = stop_step, stop_epoch
        self.steps: list[tuple[int, dict]] = []
        self.epochs: list[tuple[int, dict]] = []

    def on_step(self, step: int, metrics: dict) -> bool:
        self.steps.append((step, metrics))
        return step == self.stop_step

    def on_epoch(self, epoch: int, row: dict) -> bool:
        self.epochs.append((epoch, row))
        return epoch == self.stop_epoch


def test_on_step_stops_the_loop_after_n_steps_and_writes_nothing(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    write_folds(cfg, N_TRAIN)
    trainer = Trainer(build_parts(cfg, 0, progress=False), progress=False)
    hooks = Recorder(stop_step=2)
    assert trainer.train_epoch(trainer.epoch_batches(), hooks=hooks) is False
    assert [step for step, _ in hooks.steps] == [1, 2]
    assert {"train/loss", "train/lr", "train/images_per_s", "train/epoch"} <= hooks.steps[0][1].keys()
    assert trainer.state.step == 2 and trainer.state.epoch == 0 and trainer.state.batches_done == 2
    assert not RunFolder(cfg.run.dir).checkpoint(0, "last").exists()  # the caller decides what to keep
    assert trainer.train_epoch(trainer.epoch_batches()) is True  # without hooks: the rest of the epoch
    assert trainer.state.step == 3 and trainer.state.epoch == 1


def test_on_epoch_prunes_the_run_after_that_epoch(tiny_data, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path, "train.epochs=3")
    write_folds(cfg, N_TRAIN)
    hooks = Recorder(stop_epoch=1)
    result = train(cfg, 0, progress=False, hooks=hooks)
    assert result["stopped"] == "pruned at epoch 1" and result["steps"] == 3
    assert [step for step, _ in hooks.steps] == [1, 2, 3]
    assert [epoch for epoch, _ in hooks.epochs] == [1] and hooks.epochs[0][1]["epoch"] == 1
    folder = RunFolder(cfg.run.dir)
    state = load_checkpoint(folder.checkpoint(0, "last"))["state"]  # the epoch's checkpoint was written
    assert state["epoch"] == 1 and state["step"] == 3
    assert folder.checkpoint(0, "best").is_file() and len(load_checkpoint(folder.checkpoint(0, "last"))["history"]) == 1
    print_summary([], result)
    assert "pruned at epoch 1" in capsys.readouterr().out


def test_on_step_stop_inside_a_run_writes_last_pt_to_resume_from(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.epochs=2")
    write_folds(cfg, N_TRAIN)
    result = train(cfg, 0, progress=False, hooks=Recorder(stop_step=2))
    assert result["stopped_early"] and result["stopped"] == "stopped by a loop hook at step 2"
    state = load_checkpoint(RunFolder(cfg.run.dir).checkpoint(0, "last"))["state"]
    assert (state["epoch"], state["step"], state["batches_done"]) == (0, 2, 2)
