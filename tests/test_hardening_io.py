"""Faults of writing, round two: a full disk while a checkpoint, a packed array or a submission is written, a
submission path that is a folder, and kill -9 of predict (its temp files) and of pack (its workers). Each ends
in one line naming the path, exit 2, nothing half-written and nothing left behind."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import src.pack
import src.predict
import src.train
from src.files import Staging, WriteError
from src.predict import predict
from src.tracking import _LOG_FILES
from src.train import train
from tests.conftest import REPO_ROOT, tiny_config
from tests.helpers import write_folds
from tests.test_hardening import assert_one_line_error, cli_overrides, run_stage_here

PYTHON = sys.executable
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A file system of ``size`` (a tmpfs) mounted at ``folder``: a disk that fills up on demand. Mounting needs
    root (or CAP_SYS_ADMIN); without it the test is skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("a full-disk test mounts a small tmpfs, and there is no mount command here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full-disk test mounts a small tmpfs, which needs root here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` up to ``leave`` bytes free."""
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# -- 2. a full disk while a checkpoint is saved --------------------------------------------------------------
@pytest.mark.slow
def test_a_full_disk_while_a_checkpoint_is_saved_is_one_line_and_writes_no_scores_without_it(
        tiny_data, tmp_path, capsys, monkeypatch):
    write_folds(tiny_config(tiny_data, tmp_path), 24)
    with small_disk(tmp_path / "disk", "1m") as disk:
        run_dir = disk / "run"
        # W&B off: torch.save meets the full disk, and says so as "RuntimeError: ... unexpected pos".
        result = run_stage_here(src.train, "--fold", "0", *cli_overrides(tiny_data, tmp_path, f"run.dir={run_dir}"),
                                capsys=capsys, monkeypatch=monkeypatch)
        assert_one_line_error(result, f"cannot write {run_dir / 'fold0' / 'last.pt'}: No space left on device")
        assert not list(run_dir.rglob("last.pt")) and not list(run_dir.rglob("oof*")) and temps(disk) == []

        # W&B on (offline), on a disk already full: its log writes fail from wandb.init on.
        shutil.rmtree(run_dir)
        fill(disk, leave=24 << 10)
        result = run_stage_here(src.train, "--fold", "0", *cli_overrides(tiny_data, tmp_path, f"run.dir={run_dir}",
                                                                          "wandb.mode=offline"),
                                capsys=capsys, monkeypatch=monkeypatch)
        assert_one_line_error(result, str(run_dir), "No space left on device")
        assert "Logging error" not in result.stderr and len(result.stderr.splitlines()) < 10, result.stderr[-3000:]
        assert not list(run_dir.rglob("oof*")) and temps(disk) == []


def test_wandb_log_files_that_cannot_be_written_print_nothing(capsys):
    class FullDisk:
        def write(self, text: str) -> None:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

    logger = logging.getLogger("wandb")
    handler = logging.StreamHandler(FullDisk())
    logger.addHandler(handler)
    try:
        for _ in range(3):
            logger.warning("a W&B message")
    finally:
        logger.removeHandler(handler)
        failure, _LOG_FILES.failure = _LOG_FILES.failure, None
    assert capsys.readouterr().err == ""
    assert failure is not None and failure[1] == "No space left on device"


def test_writes_that_raise_anything_are_write_errors_naming_the_file(tmp_path):
    from src.files import write_atomic

    target = tmp_path / "last.pt"
    with pytest.raises(WriteError, match=f"cannot write {target}: PicklingError"):
        import pickle

        write_atomic(target, lambda tmp: (_ for _ in ()).throw(pickle.PicklingError("cannot pickle a lock")))
    assert list(tmp_path.iterdir()) == []


# -- 3. a full disk while packing -----------------------------------------------------------------------------
def test_a_full_disk_while_packing_names_the_array_and_its_size_and_keeps_nothing(tiny_data, tmp_path, capsys,
                                                                                   monkeypatch):
    with small_disk(tmp_path / "disk", "100k") as disk:
        cache = disk / "cache"
        result = run_stage_here(src.pack, "--workers", "1",
                                *cli_overrides(tiny_data, tmp_path, f"data.cache_dir={cache}"),
                                capsys=capsys, monkeypatch=monkeypatch)
        assert_one_line_error(result, f"cannot write {cache}", ".u8.partial: No space left on device",
                              "the array needs 192.0 KiB")
        assert "BrokenProcessPool" not in result.stderr
        assert list(cache.iterdir()) == []


# -- 4. submission.path names a folder ----------------------------------------------------------------------
def test_a_submission_path_that_is_a_folder_is_refused_before_any_work(tiny_data, tmp_path, capsys, monkeypatch):
    run_dir, folder = tmp_path / "run", tmp_path / "submissions"
    (run_dir / "report").mkdir(parents=True)
    (run_dir / "report" / "report.md").write_text("previous\n")
    (run_dir / "test_probs.csv").write_text("previous\n")
    folder.mkdir()
    # No trained run in run.dir: the check comes before anything is read.
    result = run_stage_here(src.predict, *cli_overrides(tiny_data, tmp_path, f"submission.path={folder}"),
                            capsys=capsys, monkeypatch=monkeypatch)
    assert_one_line_error(result, f"submission.path={folder} is a folder")
    assert (run_dir / "test_probs.csv").read_text() == "previous\n"
    assert [p.name for p in (run_dir / "report").iterdir()] == ["report.md"] and list(folder.iterdir()) == []


def test_staged_outputs_are_not_committed_when_one_target_cannot_be_replaced(tmp_path):
    scores, submission = tmp_path / "test_probs.csv", tmp_path / "submission.csv"
    scores.write_text("previous\n")
    with pytest.raises(WriteError, match=f"cannot write {submission}: it is a folder"), Staging() as staging:
        staging.file(scores, lambda tmp: tmp.write_text("new\n"))
        staging.file(submission, lambda tmp: tmp.write_text("new\n"))
        submission.mkdir()  # a folder appears where the submission goes
        staging.commit()
    assert scores.read_text() == "previous\n" and temps(tmp_path) == []


# -- 5./7. predict: kill -9 in the middle, a full submission folder ------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """Fold 0 of the tiny config trained for one epoch (shared by the prediction tests below)."""
    work = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tiny_data, work)
    write_folds(cfg, 24)
    train(cfg, 0, progress=False)
    return cfg


@pytest.mark.slow
def test_a_full_submission_folder_is_one_line_naming_the_submission_and_changes_nothing(trained, tmp_path, capsys,
                                                                                         monkeypatch):
    run_dir, work = Path(trained.run.dir), Path(trained.folds.path).parent

    def outputs() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if ".tmp" not in p.name}

    before = outputs()
    with small_disk(tmp_path / "disk", "64k") as disk:
        fill(disk, leave=0)
        submission = disk / "submission.csv"
        result = run_stage_here(src.predict, *cli_overrides(trained.data.dir, work, f"submission.path={submission}"),
                                capsys=capsys, monkeypatch=monkeypatch)
        assert_one_line_error(result, f"cannot write {submission}: No space left on device")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert outputs() == before and not list(run_dir.glob("*.staged.tmp"))  # all or nothing


KILLED_PREDICT = """
import sys, time
from pathlib import Path
import src.predict
from src.cli import run_cli

marker = Path(sys.argv.pop(1))
write_report = src.predict.write_report

def write_report_then_hang(*args, **kwargs):  # the report is staged beside test_probs.csv: kill -9 now
    written = write_report(*args, **kwargs)
    marker.write_text("staged")
    time.sleep(120)
    return written

src.predict.write_report = write_report_then_hang
run_cli(src.predict.main)
"""


@pytest.mark.slow
def test_temp_files_of_a_killed_predict_are_removed_by_the_next_one(trained, tmp_path):
    cfg, work = trained, Path(trained.folds.path).parent
    run_dir, marker = Path(cfg.run.dir), tmp_path / "staged"
    process = subprocess.Popen([PYTHON, "-c", KILLED_PREDICT, str(marker), "--config", "configs/demo.yaml",
                                *cli_overrides(cfg.data.dir, work)], cwd=REPO_ROOT, env=SUBPROCESS_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    pid = process.pid
    assert {f"test_probs.csv.{pid}.staged.tmp", f"report.{pid}.staged.tmp"} <= set(os.listdir(run_dir))
    live = run_dir / f"test_probs.csv.{os.getppid()}.tmp"  # a live process's temp file: never touched
    live.write_text("being written\n")

    predict(cfg, progress=False)
    assert not [name for name in os.listdir(run_dir) if f".{pid}." in name] and live.is_file()
    live.unlink()
    assert (run_dir / "test_probs.csv").is_file() and (run_dir / "report" / "report.md").is_file()


# -- 6. kill -9 of pack -----------------------------------------------------------------------------------------
KILLED_PACK = """
import os, sys, time
from pathlib import Path
import src.pack
from src.cli import run_cli

marker = Path(sys.argv.pop(1))

def pack_rows_slowly(task):  # a worker busy with its rows when the pack process is killed
    marker.write_text(str(os.getpid()))
    time.sleep(120)

src.pack._pack_rows = pack_rows_slowly
run_cli(src.pack.main)
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table in /proc")
def test_pack_workers_die_with_a_killed_pack_process(tiny_data, tmp_path):
    marker = tmp_path / "worker"
    process = subprocess.Popen([PYTHON, "-c", KILLED_PACK, str(marker), "--workers", "2", "--config",
                                "configs/demo.yaml", *cli_overrides(tiny_data, tmp_path,
                                                                    f"data.cache_dir={tmp_path / 'cache'}")],
                               cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    process.kill()
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert int(marker.read_text()) in workers
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # a failed test leaves no process behind either
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "pack workers outlived the killed pack process"
