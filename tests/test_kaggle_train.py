"""Training on Kaggle: ``train.time_limit`` and the training notebook (src.kaggle_train). The notebook's cells, run
with a stand-in /kaggle/input, train a fold over two sessions, the first cut by the time limit, to the weights of
one uninterrupted run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from src.bundle import WHEELS
from src.config import ConfigError, load_config
from src.kaggle_train import REQUIREMENTS_FILE, pinned_for_kaggle, write_kit
from src.pack import pack
from src.train import SessionTiming, train
from tests.conftest import REPO_ROOT, tiny_config
from tests.helpers import assert_same, write_folds


@pytest.mark.parametrize("value, seconds", [("8h30m", 30600.0), (90, 90.0), ("0.5s", 0.5), (None, None)])
def test_a_time_limit_is_seconds_or_a_time_with_units(value, seconds):
    assert load_config(None, [f"train.time_limit={'null' if value is None else value}"]).train.time_limit == seconds


@pytest.mark.parametrize("value", ["8 hours", "0s", "-5m", "1d"])
def test_a_bad_time_limit_names_the_key(value):
    with pytest.raises(ConfigError, match=r"train.time_limit.*expected a positive time with its unit"):
        load_config(None, [f"train.time_limit={value}"])


def test_the_time_to_the_next_stop_counts_the_epoch_end_only_when_the_next_window_ends_the_epoch():
    timing = SessionTiming(windows=[9.0, 1.0, 1.0, 2.0])  # the first window's warm-up does not count
    assert timing.until_next_stop(False, val_windows=3.0) == 1.5 + 1.5  # the window, and a save as long
    assert timing.until_next_stop(True, val_windows=3.0) == 1.5 + 1.5 + (3 * 1.5 + 1.5) + 1.5
    timing.save, timing.epoch_end = 0.5, 4.0  # measured: they replace the estimates
    assert timing.until_next_stop(False, 3.0) == 1.5 + 0.5
    assert timing.until_next_stop(True, 3.0) == 1.5 + 0.5 + 4.0 + 1.5
    assert timing.until_next_stop(False, 3.0, saves_now=True) == 1.5 + 0.5 + 0.5  # train.checkpoint_every_steps


def test_kaggle_installs_the_pinned_packages_the_image_lacks_and_never_torch():
    pins = pinned_for_kaggle()
    main = pinned_for_kaggle(REPO_ROOT / "requirements.txt")
    assert pins == {name: main[name] for name in pins}  # the very versions of requirements.txt
    assert set(pins) == set(WHEELS)  # what the inference bundle ships as wheels
    assert not {"torch", "torchvision"} & set(pins)
    assert (REPO_ROOT / REQUIREMENTS_FILE).is_file()


def run_notebook(notebook: dict, parameters: str) -> dict:
    """Run the notebook's code cells in one namespace, ``parameters`` right after its parameters cell (papermill's
    convention); returns the namespace."""
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile(cell["source"], "train.ipynb", "exec"), namespace)
            if "parameters" in cell["metadata"].get("tags", []):
                exec(parameters, namespace)
    return namespace


@pytest.mark.slow
def test_the_notebook_continues_a_fold_cut_by_the_time_limit_to_the_uncut_weights(tiny_data, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the notebook puts the kit first
    cfg = tiny_config(tiny_data, tmp_path / "local", "train.epochs=2")
    write_folds(cfg, 24)  # 3 optimizer steps an epoch
    pack(cfg, workers=1, progress=False)
    assert not train(cfg, 0, progress=False)["stopped_early"]  # the uncut run
    reference = torch.load(Path(cfg.run.dir) / "fold0" / "last.pt", weights_only=True)

    inputs = tmp_path / "input"  # the stand-in /kaggle/input
    inputs.mkdir()
    (inputs / cfg.kaggle.competition).symlink_to(tiny_data)
    shutil.copytree(cfg.data.cache_dir, inputs / "packed-cache")
    kit = write_kit(cfg, inputs / "training-kit", progress=False)
    notebook = json.loads((kit / "train.ipynb").read_text())
    nbformat = pytest.importorskip("nbformat")  # installed with the kaggle CLI
    nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))

    def session(working: Path, time_limit: str) -> dict:
        working.mkdir()
        return run_notebook(notebook, f"INPUT = Path({str(inputs)!r})\nWORKING = Path({str(working)!r})\n"
                                      f"TIME_LIMIT = {time_limit!r}\n")

    first = session(tmp_path / "session1", "0.001s")  # no step fits: it stops after the one it must take
    assert first["result"]["stopped_early"] and first["result"]["steps"] == 1
    assert first["CACHE"] == inputs / "packed-cache" and first["PREVIOUS"] is None and first["missing"] == []
    output = capsys.readouterr()
    assert "to keep within train.time_limit" in output.err and "add this notebook's output as an input" in output.out

    (inputs / "session1-output").symlink_to(tmp_path / "session1")  # the first session's output, as an input
    second = session(tmp_path / "session2", "11h")
    assert second["PREVIOUS"] == inputs / "session1-output" / "run" / "fold0" / "last.pt"
    assert "resumed" in capsys.readouterr().out and not second["result"]["stopped_early"]
    finished = torch.load(tmp_path / "session2" / "run" / "fold0" / "last.pt", weights_only=True)
    for part in ("model", "ema", "optimizer", "scheduler", "state"):
        assert_same(finished[part], reference[part], part)
