"""Faults a user meets: diverged weights, unwritable outputs, empty and damaged inputs, a changed config on
resume, a second writer, a worker that meets a bad image, and kill -9 in the middle of training."""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import src.predict
import src.train
from src.checkpoint import check_resumable
from src.cli import run_cli, user_message
from src.config import Config, PipelineError, load_config, override
from src.decision_record import config_differences
from src.files import Staging, WriteError
from src.folds import load_folds, make_folds
from src.formats import id_problem, parse_target
from src.model import build_model
from src.predict import predict
from src.run_folder import RunFolder
from src.train import TrainingDiverged, print_summary, train
from tests.conftest import REPO_ROOT, TINY_CLASSES, tiny_config
from tests.helpers import write_folds

PYTHON = sys.executable


def cli_overrides(tiny_data: Path, work: Path, *extra: str) -> list[str]:
    """The tiny config as command-line overrides of configs/demo.yaml (for subprocess runs)."""
    return [f"data.dir={tiny_data}", f"data.num_classes={TINY_CLASSES}", "data.image_size=32",
            f"folds.path={work / 'folds.csv'}", "folds.n_splits=2", "folds.rare_classes=warn",
            "model.backbone=test_resnet", "train.batch_size=8", "train.accum_steps=1", "train.device=cpu",
            "train.num_workers=0", "train.warmup_fraction=0", "wandb.mode=disabled", "predict.force=true",
            f"run.dir={work / 'run'}", f"submission.path={work / 'submission.csv'}", *extra]


def run_stage_here(module, *args: str, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """A stage's CLI (``run_cli(module.main)``) in this process: the same parsing, error handling and exit
    code as ``python -m``, without a new interpreter's start-up."""
    monkeypatch.setattr(sys, "argv", [module.__name__, "--config", str(REPO_ROOT / "configs" / "demo.yaml"), *args])
    capsys.readouterr()
    try:
        run_cli(module.main)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(module.__name__, code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def finite_checkpoint(path: Path) -> bool:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    tensors = list(ckpt["model"].values()) + list((ckpt["ema"] or {}).values())
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# -- 1. a diverged model is never saved as good ------------------------------------------------------------
@pytest.mark.slow
def test_a_diverged_run_leaves_only_finite_checkpoints_and_says_which_holds_the_last_good_state(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.lr=1e6", "train.epochs=3", "train.checkpoint_every_steps=1",
                      "train.ema=true")
    write_folds(cfg, 24)
    with pytest.raises(TrainingDiverged) as raised:
        train(cfg, 0, progress=False)
    message = str(raised.value)
    fold_dir = Path(cfg.run.dir) / "fold0"
    checkpoints = list(fold_dir.glob("*.pt"))
    assert all(finite_checkpoint(path) for path in checkpoints)
    if (fold_dir / "last.pt").exists():  # the message names it and the step it really holds
        step = torch.load(fold_dir / "last.pt", weights_only=True)["state"]["step"]
        assert f"{fold_dir / 'last.pt'} holds the last good state (optimizer step {step})" in message
    else:
        assert "no checkpoint of this run was written" in message
    for oof in fold_dir.glob("oof*.csv"):
        assert pd.read_csv(oof).iloc[:, 1:].notna().all().all()
    assert "train.precision=bf16" not in message  # the run already is bf16: no such hint
    assert not list(fold_dir.glob("*.tmp"))


# -- 2./3./4. outputs: writable before the work, all or nothing, one clear line --------------------------
def test_staged_outputs_are_all_or_nothing(tmp_path):
    first, report = tmp_path / "first.csv", tmp_path / "report"
    first.write_text("old\n")
    report.mkdir()
    (report / "a.txt").write_text("old\n")
    with pytest.raises(WriteError, match="submission.csv: RuntimeError: disk full"), Staging() as staging:
        staging.file(first, lambda tmp: tmp.write_text("new\n"))
        staging.folder(report, lambda folder: (folder / "a.txt").write_text("new\n"))

        def fail(tmp: Path) -> None:
            raise RuntimeError("disk full")

        staging.file(tmp_path / "submission.csv", fail)
    assert first.read_text() == "old\n" and (report / "a.txt").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.csv", "report"]  # no temp left

    with Staging() as staging:
        staging.file(first, lambda tmp: tmp.write_text("new\n"))
        staging.folder(report, lambda folder: (folder / "b.txt").write_text("new\n"))
        staging.commit()
    assert first.read_text() == "new\n" and [p.name for p in report.iterdir()] == ["b.txt"]


def test_write_errors_are_one_line_naming_the_path_before_any_work(tiny_data, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    (tmp_path / "work").mkdir()
    base = cli_overrides(tiny_data, tmp_path / "work")
    result = run_stage_here(src.train, "--fold", "0", *base, f"run.dir={blocker / 'run'}", capsys=capsys,
                            monkeypatch=monkeypatch)
    assert_one_line_error(result, str(blocker / "run"))
    result = run_stage_here(src.predict, *base, f"submission.path={blocker / 'sub' / 'submission.csv'}",
                            capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(result, str(blocker / "sub"))


# -- 5. empty tables -----------------------------------------------------------------------------------------
def test_a_header_only_train_csv_stops_the_folds_stage_naming_the_file(tiny_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("Id,Target\n")
    (data / "sample_submission.csv").write_text("Id,Predicted\n")
    cfg = tiny_config(data, tmp_path)
    with pytest.raises(PipelineError, match="train.csv: no rows"):
        make_folds(cfg, progress=False)
    assert not Path(cfg.folds.path).exists()


# -- 6. resume with another config; a damaged folds file ----------------------------------------------------
def test_resume_under_a_changed_model_names_the_keys(tmp_path):
    saved = {"model": {"backbone": "resnet18", "in_chans": 4}, "data": {"num_classes": 28}, "train": {"lr": 1e-3}}
    changed = {"model": {"backbone": "resnet34", "in_chans": 4}, "data": {"num_classes": 9}, "train": {"lr": 1e-3}}
    with pytest.raises(PipelineError) as raised:
        check_resumable(saved, changed, tmp_path / "last.pt")
    assert "model.backbone: 'resnet18' -> 'resnet34'" in str(raised.value)
    assert "data.num_classes: 28 -> 9" in str(raised.value)
    check_resumable(saved, {**saved, "train": {"lr": 5e-4}}, tmp_path / "last.pt")  # a new lr may resume


@pytest.mark.slow
def test_resume_after_a_backbone_change_is_refused_before_loading_weights(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.stop_after_steps=1")
    write_folds(cfg, 24)
    train(cfg, 0, progress=False)
    resumed = override(cfg, **{"train.resume": True, "train.stop_after_steps": None, "model.backbone": "test_vit"})
    with pytest.raises(PipelineError, match="model.backbone: 'test_resnet' -> 'test_vit'"):
        train(resumed, 0, progress=False)


def test_a_zero_byte_folds_file_is_a_clear_error(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    Path(cfg.folds.path).write_text("")
    with pytest.raises(PipelineError, match="empty or not a csv"):
        from src.formats import load_train_table

        load_folds(cfg, load_train_table(cfg.data))


# -- 7. stale temp files, worker errors ---------------------------------------------------------------------
@pytest.mark.slow
def test_stale_temp_files_of_a_killed_writer_are_cleaned(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    write_folds(cfg, 24)
    stale = RunFolder(cfg.run.dir).fold(0) / "last.pt.99999.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    train(cfg, 0, progress=False)
    assert not stale.exists()


@pytest.mark.slow
def test_a_bad_image_met_by_a_worker_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_data, data)
    work = tmp_path / "work"
    work.mkdir()
    overrides = cli_overrides(data, work, "train.num_workers=1", "train.epochs=1")
    cfg = tiny_config(data, work)
    make_folds(cfg, progress=False)
    victim = pd.read_csv(data / "train.csv", dtype=str)["Id"].iloc[0]
    (data / "train" / f"{victim}_green.png").unlink()  # after the folds stage validated the data
    result = run_stage_here(src.train, "--fold", "0", *overrides, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(result, f"{victim}_green.png", "missing or unreadable image")
    assert "DataLoader worker" not in result.stderr


def test_user_message_strips_a_worker_traceback():
    wrapped = PipelineError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                            "call last):\n  File \"x.py\", line 1, in <module>\nsrc.data.DataError: a.png: missing")
    assert user_message(wrapped) == "a.png: missing"


# -- 8. lock, smaller messages --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_writer_to_a_fold_is_refused_naming_the_pid(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    write_folds(cfg, 24)
    with RunFolder(cfg.run.dir).lock(0):
        with pytest.raises(PipelineError, match=f"pid {os.getpid()}"):
            train(cfg, 0, progress=False)
    assert train(cfg, 0, progress=False)["steps"] > 0  # released on exit


def test_unknown_backbone_suggests_close_names(tiny_cfg):
    with pytest.raises(PipelineError, match=r"resnet1888.*'resnet18'"):
        build_model(override(tiny_cfg, **{"model.backbone": "resnet1888"}))


def test_summary_lists_only_files_that_exist(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"")
    print_summary([], {"fold": 0, "steps": 1, "best_epoch": -1, "best_score": float("-inf"), "monitor": "macro_f1",
                       "stopped_early": True, "run_dir": str(tmp_path)})
    out = capsys.readouterr().out
    assert "{last.pt}" in out and "best.pt" not in out


@pytest.mark.slow
def test_predict_with_missing_folds_warns(tiny_data, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path)
    make_folds(cfg, progress=False)
    train(cfg, 0, progress=False)  # fold 1 never trained
    capsys.readouterr()
    predict(cfg, progress=False)
    assert "fold(s) [1] of 2 have no best.pt" in capsys.readouterr().err


# -- kill -9 mid-training, then resume ------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(tiny_data, tmp_path):
    rng = random.Random(os.getpid())
    runs = {}
    for name in ("reference", "killed"):
        work = tmp_path / name
        work.mkdir()
        cfg = tiny_config(tiny_data, work)
        write_folds(cfg, 24)
        runs[name] = cli_overrides(tiny_data, work, "train.epochs=6", "train.checkpoint_every_steps=1")
    # The reference in this process (one torch thread, as the subprocesses): the same kernels, the same bits.
    train(load_config(REPO_ROOT / "configs" / "demo.yaml", runs["reference"]), 0, progress=False)

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    process = subprocess.Popen([PYTHON, "-m", "src.train", "--fold", "0", "--config", "configs/demo.yaml",
                                *runs["killed"]], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "run" / "fold0" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the run's 18 steps
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(last, weights_only=True)["state"]["step"]
    assert killed_at < 18

    train(load_config(REPO_ROOT / "configs" / "demo.yaml", [*runs["killed"], "train.resume=true"]), 0, progress=False)
    resumed = torch.load(last, weights_only=True)
    reference = torch.load(tmp_path / "reference" / "run" / "fold0" / "last.pt", weights_only=True)
    assert resumed["state"]["step"] == reference["state"]["step"] == 18
    for key, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][key], tensor), f"{key} differs after kill -9 at step {killed_at}"
    assert not list((tmp_path / "killed").rglob("*.tmp"))


# -- property-based: label and Id parsing --------------------------------------------------------------------
@given(st.lists(st.integers(0, 27), max_size=10), st.sampled_from([" ", "  ", "\t"]))
def test_parse_target_reads_any_spacing_and_order(labels, separator):
    parsed, problem = parse_target(separator.join(map(str, labels)), 28)
    assert problem is None and parsed == tuple(sorted(set(labels)))


@given(st.text(max_size=12))
def test_parse_target_never_accepts_a_non_integer_or_out_of_range_label(text):
    parsed, problem = parse_target(text, 28)
    if problem is None:
        assert all(token.isascii() and token.isdigit() and int(token) < 28 for token in text.split())
        assert parsed == tuple(sorted({int(token) for token in text.split()}))
    else:
        assert parsed == ()


@example(".")  # found by this test: the folder itself was accepted as an Id
@given(st.text(max_size=20))
def test_an_accepted_id_is_a_safe_file_name(sample_id):
    if id_problem(sample_id) is None:
        assert sample_id and "/" not in sample_id and "\\" not in sample_id and ".." not in sample_id
        assert Path(sample_id).name == sample_id and sample_id not in (".", "..")


def test_predict_on_a_run_folder_that_does_not_exist_says_train_first(tiny_cfg, tmp_path):
    cfg = override(tiny_cfg, **{"run.dir": str(tmp_path / "never_trained")})
    with pytest.raises(PipelineError, match="holds no trained run.*train it first"):
        predict(cfg, progress=False)


def test_a_schedule_of_a_few_dozen_updates_is_warned_about(tiny_data, tmp_path, capsys):
    # The main config's global batch of 64 on a small set: a handful of optimizer steps per epoch.
    cfg = tiny_config(tiny_data, tmp_path, "train.epochs=3", "train.batch_size=4", "train.global_batch=16")
    make_folds(cfg, progress=False)
    parts = src.train.build_parts(cfg, 0, progress=True)
    steps = cfg.train.epochs * parts.steps_per_epoch
    assert steps < src.train.FEW_STEPS
    assert f"warning: {steps} optimizer steps in all (3 epochs x {parts.steps_per_epoch} steps of 16 images)" in \
        capsys.readouterr().err
    src.train.build_parts(override(cfg, **{"train.global_batch": 4, "train.epochs": 30}), 0, progress=True)
    assert "optimizer steps in all" not in capsys.readouterr().err


def test_a_key_added_since_a_run_was_saved_is_not_a_change_at_its_default(tmp_path):
    """A checkpoint (or a study) saved before a key existed resumes when the key is at its default, which keeps the
    old behaviour; set to something else, it is named."""
    current = Config().model_dump(mode="json")
    saved = copy.deepcopy(current)
    del saved["train"]["sampler"], saved["train"]["augment"]["mix"]  # as saved before these keys were added
    check_resumable(saved, current, tmp_path / "last.pt")
    assert config_differences(saved, current) == []  # a decision record made before the keys: the same config
    current["train"]["sampler"] = "rare"
    assert config_differences(saved, current) == ["train.sampler: 'uniform' then, 'rare' now"]
    with pytest.raises(PipelineError, match="train.sampler: 'uniform' -> 'rare'"):
        check_resumable(saved, current, tmp_path / "last.pt")
