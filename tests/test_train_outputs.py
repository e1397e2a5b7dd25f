"""What training leaves in the fold folder: every output through src.files (the label-embedding plots staged with
the embedding, last.pt staged with its score table), a retrain with ``train.overwrite`` clearing all of a fold's
outputs, plots included; and notes and warnings on stderr, through one function."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from torch import nn

from src import progress
from src.config import override
from src.files import Staging, WriteError
from src.run_folder import EMBEDDING_PLOTS, FOLD_FILES, RunFolder
from src.tracking import Tracker
from src.train import Trainer, build_parts, train
from tests.conftest import REPO_ROOT, tiny_config
from tests.helpers import write_folds

EMBEDDING = ("loss.name=label_embedding", "loss.embedding_dim=4")


# -- plots: in the fold's list of outputs, and written whole ---------------------------------------------------
@pytest.mark.slow
def test_overwrite_removes_an_earlier_runs_label_embedding_plots(tiny_data, tmp_path):
    # A label-embedding run, then a retrain of the fold with another loss: nothing of the first may stay.
    cfg = tiny_config(tiny_data, tmp_path, "train.stop_after_steps=1", *EMBEDDING)
    write_folds(cfg, 24)
    train(cfg, 0, progress=False)
    fold_dir = RunFolder(cfg.run.dir).fold(0)
    assert all((fold_dir / name).is_file() for name in EMBEDDING_PLOTS.values())
    train(override(cfg, **{"loss.name": "bce", "train.overwrite": True}), 0, progress=False)
    left = [name for name in (*EMBEDDING_PLOTS.values(), "label_embedding.npz") if (fold_dir / name).exists()]
    assert left == [], f"train.overwrite left the earlier run's {left}"
    assert set(EMBEDDING_PLOTS.values()) <= set(FOLD_FILES)


@pytest.mark.slow
def test_a_plot_that_fails_half_way_leaves_the_previous_plots_and_embedding_whole(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data, tmp_path, "train.stop_after_steps=1", *EMBEDDING)
    write_folds(cfg, 24)
    train(cfg, 0, progress=False)
    fold_dir = RunFolder(cfg.run.dir).fold(0)
    names = [*EMBEDDING_PLOTS.values(), "label_embedding.npz"]
    before = {name: (fold_dir / name).read_bytes() for name in names}

    def disk_full_half_way(self, path, **options):  # some bytes written, then the disk is full
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n half a plot")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full_half_way)
    resumed = override(cfg, **{"train.resume": True, "train.stop_after_steps": 2})
    with pytest.raises(Exception) as raised:
        train(resumed, 0, progress=False)
    assert {name: (fold_dir / name).read_bytes() for name in names} == before, "a plot was written in place"
    assert not list(fold_dir.glob("*.tmp"))
    assert isinstance(raised.value, WriteError) and re.search(r"label_similarity\.png: No space left on device",
                                                              str(raised.value)), raised.value


# -- last.pt and its score table: one set --------------------------------------------------------------------
class CrashBeforeRename(Exception):
    """The process dies after the staged files are written, before any is renamed into place."""


def test_a_crash_before_the_epochs_checkpoint_is_in_place_leaves_the_previous_pair(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data, tmp_path, "train.epochs=2")
    write_folds(cfg, 24)
    trainer = Trainer(build_parts(cfg, 0, progress=False), progress=False)
    folder = RunFolder(cfg.run.dir)
    tracker = Tracker(cfg, folder.fold(0), name="pair")
    try:
        trainer.train_epoch(trainer.epoch_batches())
        trainer.end_epoch(0.0, tracker)
        pair = [folder.checkpoint(0, "last"), folder.oof(0, "last")]
        before = [path.read_bytes() for path in pair]
        trainer.train_epoch(trainer.epoch_batches())

        def crash(self):
            raise CrashBeforeRename

        monkeypatch.setattr(Staging, "commit", crash)
        with pytest.raises(CrashBeforeRename):
            trainer.end_epoch(0.0, tracker)
    finally:
        tracker.finish()
    # Epoch 2's scores must not stand beside epoch 1's checkpoint (predict with checkpoint=last would tune
    # thresholds on one model's scores and apply them to another's).
    assert [path.read_bytes() for path in pair] == before
    assert not list(folder.fold(0).glob("*.tmp"))


# -- a module is not tested for truth ----------------------------------------------------------------------------
class ConstantScores(nn.Sequential):
    """A network with no sub-modules (so an empty, falsy nn.Sequential) that scores every class at logit 5."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.logit = nn.Parameter(torch.full((num_classes,), 5.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(len(images), -1)


def test_validation_scores_the_module_it_is_given_even_an_empty_container(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    write_folds(cfg, 24)
    trainer = Trainer(build_parts(cfg, 0, progress=False), progress=False)
    constant = ConstantScores(cfg.data.num_classes)
    assert not constant  # what `model or default` mistook for no model
    probs = trainer.validate(constant)["probs"]
    np.testing.assert_allclose(probs, np.full(probs.shape, torch.sigmoid(torch.tensor(5.0)).item()), rtol=1e-6)


# -- notes and warnings: one function, one stream ------------------------------------------------------------------
def test_a_note_goes_to_stderr_and_leaves_stdout_to_the_commands_output(capsys):
    print("a table the command was asked for")
    progress.note("warning: something to know")
    captured = capsys.readouterr()
    assert captured.out == "a table the command was asked for\n"
    assert captured.err == "warning: something to know\n"


def test_every_note_and_warning_of_src_goes_through_progress_note():
    printed = re.compile(r"""print\(\s*f?["'](note|warning):""")
    found = [f"{path.name}:{text.count(chr(10), 0, match.start()) + 1}"
             for path in sorted((REPO_ROOT / "src").glob("*.py"))
             for text in [path.read_text()] for match in printed.finditer(text)]
    assert found == [], "notes and warnings printed past src.progress.note (stdout, or a stream of their own)"
