"""Hardening, round two: inputs and runs that used to fail with a traceback, a wrong line or silently — an empty
trainable-label list, a label separator that is not the file's, an override YAML changes, a retrain over a
finished fold, a wrong backbone or fold, the divergence message's epoch and hint — and progress output in a log
file. Each is one line naming the file or key, exit 2, with nothing half-written or left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from src import progress
from src.config import ConfigError, PipelineError, load_config, override, parse_overrides
from src.data import DataError
from src.formats import load_training_data, read_train_labels
from src.model import effective_precision
from src.train import Trainer, TrainingDiverged, build_parts, train
from src.validate import validate
from tests.conftest import REPO_ROOT, tiny_config
from tests.helpers import write_folds


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((8, 8, 3), 90, np.uint8))


# -- 1. the trainable-label list: 0 bytes, header only -----------------------------------------------------
def openimages_labels(root: Path, trainable: str) -> Path:
    """Two images' Open Images labels (no image files: the label readers do not open them) and a trainable list."""
    root.mkdir()
    pd.DataFrame({"ImageID": ["aa01", "aa01", "bb02"], "Source": "verification",
                  "LabelName": ["/m/cat", "/m/dog", "/m/cat"], "Confidence": "1"}).to_csv(root / "labels.csv",
                                                                                          index=False)
    (root / "trainable.csv").write_text(trainable)
    return root


@pytest.mark.parametrize("content, why", [
    ("", "empty file (0 bytes) (data.trainable_labels)"),
    ("label_code\n", "no labels: the file holds only a header (data.trainable_labels)"),
])
def test_an_empty_trainable_list_is_one_line_naming_it_and_its_key(tmp_path, content, why):
    data = openimages_labels(tmp_path / "oi", content)
    cfg = load_config(REPO_ROOT / "configs" / "openimages_demo.yaml", [
        f"data.dir={data}", "data.train_csv=labels.csv", "data.trainable_labels=trainable.csv",
        "data.class_descriptions=null"])
    problems = [str(p) for p in read_train_labels(cfg.data).problems]
    assert problems == [f"{data / 'trainable.csv'}: {why}"]  # not blamed on the label csv
    with pytest.raises(DataError) as raised:
        load_training_data(cfg)
    assert f"trainable.csv: {why}" in str(raised.value) and "\n" not in str(raised.value)


# -- 8b. a label separator the label column does not use -----------------------------------------------------
def csv_labels(root: Path, tags: list[str]) -> Path:
    for i in range(len(tags)):
        write_image(root / "train" / f"{i}.png")
    write_image(root / "test" / "t.png")
    pd.DataFrame({"image": [f"{i}.png" for i in range(len(tags))], "tags": tags}).to_csv(root / "train.csv",
                                                                                         index=False)
    pd.DataFrame({"image": ["t.png"], "tags": ["x"]}).to_csv(root / "sample_submission.csv", index=False)
    return root


def csv_config(data: Path, *overrides: str):
    return load_config(REPO_ROOT / "configs" / "csv_demo.yaml", [f"data.dir={data}", *overrides])


def test_a_separator_absent_from_the_label_column_while_spaces_are_is_a_validation_error(tmp_path):
    data = csv_labels(tmp_path / "d", ["cat dog", "dog", "emu cat"])
    cfg = csv_config(data, "data.label_separator=;")
    problems = [str(p) for p in validate(cfg, progress=False)]
    assert len(problems) == 1, problems  # the key, not 2 "classes" named 'cat dog' and 'emu cat'
    assert f"{data / 'train.csv'}: data.label_separator=';' occurs in no label of column 'tags'" in problems[0]
    assert "row 2: 'cat dog'" in problems[0]
    # Single labels with no spaces under another separator, or the separator the file uses: fine.
    assert read_train_labels(csv_config(csv_labels(tmp_path / "e", ["cat", "dog"]), "data.label_separator=;").data
                             ).problems == []
    _, _, vocabulary = load_training_data(cfg=csv_config(data))
    assert sorted(vocabulary.codes) == ["cat", "dog", "emu"]


# -- 8c. an override YAML would turn into something else -----------------------------------------------------
@pytest.mark.parametrize("item, value", [
    ("data.label_separator=|", "|"),  # a YAML block scalar: ''
    ("data.label_separator='|'", "|"),  # quoted: YAML's to unquote, as before
    ("data.label_separator=@", "@"),  # not valid YAML at all
    ("data.id_column=123", "123"),  # an int to YAML
    ("data.path_column=null", None),  # a key that takes None keeps YAML's None
    ("model.pretrained=false", False),  # ... and one that takes a bool its bool
    ("train.nproc=2", 2),
])
def test_a_string_key_keeps_the_override_text_as_typed(item, value):
    section, rest = item.split(".", 1)
    assert parse_overrides([item]) == {section: {rest.split("=", 1)[0]: value}}


def test_the_pipe_separator_unquoted_reads_a_pipe_separated_file(tmp_path):
    data = csv_labels(tmp_path / "d", ["cat|dog", "dog"])
    _, table, vocabulary = load_training_data(csv_config(data, "data.label_separator=|"))
    assert vocabulary.codes == ("dog", "cat") and table["labels"].tolist() == [(0, 1), (0,)]
    with pytest.raises(ConfigError, match=r"folds.rare_classes.*\(got 'no'\)"):  # the text typed, not False
        load_config(None, ["folds.rare_classes=no"])


# -- 8a. the divergence message: the epoch it happened in, a hint for the precision really used --------------
def test_the_divergence_message_names_the_epoch_of_the_fault_and_a_precision_hint_that_fits(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.precision=fp16")  # 1 epoch
    write_folds(cfg, 24)
    trainer = Trainer(build_parts(cfg, 0, progress=False), progress=False)
    trainer.train_epoch(trainer.epoch_batches())  # the whole (only) epoch: state.epoch counts it now
    with torch.no_grad():
        next(trainer.parts.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as raised:
        trainer.validate()
    message = str(raised.value)
    assert "at epoch 1, step 3" in message  # not "epoch 2" of a 1-epoch run
    if effective_precision(trainer.parts.device, "fp16") == "fp32":  # a CPU without fp16 kernels ran in fp32
        assert "train.precision" not in message
    else:
        assert "or use train.precision=bf16/fp32" in message
    with pytest.raises(TrainingDiverged, match="at epoch 1, step 3"):
        trainer.save()
    with pytest.raises(TrainingDiverged, match="the training loss is nan at epoch 2, step 3"):  # a new epoch
        trainer.train_epoch(trainer.epoch_batches())


# -- 8d. a retrain over a fold folder that holds checkpoints --------------------------------------------------
@pytest.mark.slow
def test_a_retrain_over_a_trained_fold_is_refused_unless_resumed_or_overwritten(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.stop_after_steps=1")
    write_folds(cfg, 24)
    fold_dir = Path(cfg.run.dir) / "fold0"
    fold_dir.mkdir(parents=True)
    for name in ("best.pt", "last.pt", "history.csv"):
        (fold_dir / name).write_bytes(b"an earlier run's")
    with pytest.raises(PipelineError) as raised:
        train(cfg, 0, progress=False)
    assert str(raised.value).startswith(f"{fold_dir} already holds a training of fold 0 (last.pt, best.pt)")
    assert "train.resume=true" in str(raised.value) and "\n" not in str(raised.value)
    assert all((fold_dir / name).read_bytes() == b"an earlier run's" for name in ("best.pt", "last.pt"))

    train(override(cfg, **{"train.overwrite": True}), 0, progress=False)  # stopped after 1 step: no best.pt
    assert not (fold_dir / "best.pt").exists() and not (fold_dir / "history.csv").exists()
    assert torch.load(fold_dir / "last.pt", weights_only=True)["state"]["step"] == 1


# -- 8f. what is checked before the fold folder exists --------------------------------------------------------
@pytest.mark.parametrize("overrides, fold, message", [
    (("model.backbone=resnet1888",), 0, "model.backbone: unknown timm model 'resnet1888'"),
    ((), 5, "fold 5 does not exist in"),
    (("train.batch_size=1000",), 0, "fewer than train.batch_size=1000"),  # met while building: folder removed
])
def test_a_wrong_backbone_fold_or_batch_leaves_no_run_folder(tiny_data, tmp_path, overrides, fold, message):
    cfg = tiny_config(tiny_data, tmp_path, *overrides)
    write_folds(cfg, 24)
    with pytest.raises(PipelineError, match=message):
        train(cfg, fold, progress=False)
    assert not Path(cfg.run.dir).exists()


# -- 10. progress output in a log file --------------------------------------------------------------------------
def test_a_bar_in_a_log_file_writes_whole_lines_and_notes_stay_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)  # a line at every redraw
    log = tmp_path / "log.txt"
    with open(log, "w") as file:
        bar = progress.bar(total=3, desc="steps", file=file, mininterval=0)
        assert isinstance(bar, progress.LineBar)
        for _ in range(3):
            bar.update(1)
            progress.note("note: between", file=file)
        bar.close()
    text = log.read_text()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert [line.split("|")[0] if line.startswith("steps") else line for line in lines] == \
        ["steps:  33%", "note: between", "steps:  67%", "note: between", "steps: 100%", "note: between"]


@pytest.mark.slow
def test_training_logged_to_a_file_has_no_carriage_returns_and_whole_progress_lines(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    write_folds(cfg, 24)
    overrides = [f"data.dir={tiny_data}", "data.num_classes=6", "data.image_size=32", f"folds.path={cfg.folds.path}",
                 "model.backbone=test_resnet", "train.epochs=1", "train.batch_size=8", "train.device=cpu",
                 "train.num_workers=0", "wandb.mode=disabled", f"run.dir={cfg.run.dir}"]
    log = tmp_path / "train.log"
    with open(log, "w") as file:  # stdout and stderr to one file, as `> train.log 2>&1` does
        result = subprocess.run([sys.executable, "-m", "src.train", "--fold", "0", "--config", "configs/demo.yaml",
                                 *overrides], cwd=REPO_ROOT, stdout=file, stderr=subprocess.STDOUT, timeout=240,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    bars = [line for line in text.splitlines() if "%|" in line]
    assert bars and all(line.startswith(("fold 0 epoch 1/1: ", "validating: ")) for line in bars), bars
    assert any(line.startswith("fold 0 epoch 1/1: 100%|") and line.endswith("]") for line in bars), bars
