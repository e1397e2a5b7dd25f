"""The Kaggle round trip (src.submit) against a fake ``kaggle`` executable first on PATH.

The fake records its arguments and answers with what kaggle 2.2.5 prints (read from its source and its runs
without credentials or network): an accepted submission, the submissions table with a score pending or complete,
a 401, a network error, a rejected file, malformed output.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
import yaml

from src.cli import run_cli
from src.config import PipelineError, load_config, override
from src.files import save_config
from src.folds import make_folds
from src.predict import predict
from src.submit import (
    LOG_COLUMNS,
    SubmitFailed,
    git_state,
    log_attempt,
    main,
    read_log,
    refresh,
    show_log,
    submit,
    write_log,
)
from src.train import train
from tests.conftest import REPO_ROOT, tiny_config

SLUG = "human-protein-atlas-image-classification"
ACCEPTED = ("Submission ref: 51234567\n3 submissions remaining today.\n"
            "Successfully submitted to Human Protein Atlas Image Classification")
UPLOAD_BAR = "100%|##########| 1.23k/1.23k [00:00<00:00, 2.51kB/s]\n"
AUTH_HELP = ("Authentication required to call the Kaggle API.\n\nFirst, you will need a Kaggle account. You can sign "
             "up at\n  https://www.kaggle.com/account/login\n\nRecommended: log in with OAuth via a web-based "
             "authorization flow.\nNo token to manage; credentials are cached locally for you.\n"
             "    kaggle auth login\n")
NETWORK = ("HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded with url: "
           "/v1/competitions.CompetitionApiService/StartSubmissionUpload (Caused by NameResolutionError("
           "\"HTTPSConnection(host='api.kaggle.com', port=443): Failed to resolve 'api.kaggle.com' ([Errno -2] "
           "Name or service not known)\"))\n")
REJECTED = ("400 Client Error: Bad Request for url: "
            "https://api.kaggle.com/v1/competitions.CompetitionApiService/CreateSubmission\n")
HEADER = "ref,fileName,date,description,status,publicScore,privateScore\n"

FAKE_KAGGLE = """#!/bin/sh
here=$(dirname "$0")
n=$(ls "$here/calls" | wc -l)
printf '%s\\0' "$@" > "$here/calls/$n"
if [ -f "$here/hook" ]; then . "$here/hook"; fi
cat "$here/stdout"
cat "$here/stderr" >&2
exit "$(cat "$here/rc")"
"""


class FakeKaggle:
    """A ``kaggle`` shell script: records each call's arguments, runs ``hook`` (shell) if there is one, prints the
    canned answer, exits with its code."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "calls").mkdir(parents=True)
        script = folder / "kaggle"
        script.write_text(FAKE_KAGGLE)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        self.answer()

    def answer(self, stdout: str | bytes = "", stderr: str = "", rc: int = 0) -> None:
        out = self.folder / "stdout"
        out.write_bytes(stdout) if isinstance(stdout, bytes) else out.write_text(stdout)
        (self.folder / "stderr").write_text(stderr)
        (self.folder / "rc").write_text(str(rc))

    @property
    def calls(self) -> list[list[str]]:
        files = sorted((self.folder / "calls").iterdir(), key=lambda p: int(p.name))
        return [f.read_bytes().decode().split("\0")[:-1] for f in files]


@pytest.fixture(scope="module")
def predicted(tiny_data, tmp_path_factory):
    """Fold 0 of the tiny config trained and predicted: a run folder with its submission and decision record."""
    work = tmp_path_factory.mktemp("kaggle")
    cfg = tiny_config(tiny_data, work, "predict.folds=[0]")
    make_folds(cfg, progress=False)
    train(cfg, 0, progress=False)
    predict(cfg, progress=False)
    return cfg


@pytest.fixture
def kaggle(tmp_path, monkeypatch) -> FakeKaggle:
    fake = FakeKaggle(tmp_path / "fake")
    monkeypatch.setenv("PATH", f"{fake.folder}{os.pathsep}{os.environ['PATH']}")
    return fake


@pytest.fixture
def cfg(predicted, tmp_path):
    """The predicted run with a log of its own."""
    return override(predicted, **{"kaggle.log": str(tmp_path / "submissions" / "log.csv")})


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listed(date: datetime, description: str, status: str, public: str = "", private: str = "",
           ref: str = "51234567") -> str:
    """One row as the CLI's csv.writer prints it (str() of the datetime and of the status enum)."""
    line = StringIO()
    csv.writer(line).writerow([ref, "submission.csv", str(date), description, status, public, private])
    return line.getvalue()


def test_submit_logs_the_attempt_and_refresh_fills_in_the_public_score(cfg, kaggle, tmp_path):
    kaggle.answer(ACCEPTED, UPLOAD_BAR)
    row = submit(cfg, "first try", progress=False)
    assert kaggle.calls == [["competitions", "submit", "-c", SLUG, "-f", cfg.submission.path,
                             "--message=first try"]]
    log = read_log(Path(cfg.kaggle.log))
    assert list(log.columns) == list(LOG_COLUMNS) and len(log) == 1
    logged = log.iloc[0]
    assert logged["status"] == "sent" and logged["kaggle_ref"] == "51234567" and logged["public_score"] == ""
    assert logged["sha256"] == sha256(cfg.submission.path) and logged["message"] == "first try"
    assert logged["runs"] == f"{cfg.run.dir}[0]" and logged["competition"] == SLUG
    # The checkout's commit, or blank where the code is not a git checkout (see the no-git test below).
    assert (logged["git_commit"], logged["git_dirty"]) == git_state()
    assert re.fullmatch(r"[0-9a-f]{40}", logged["git_commit"]) or logged["git_commit"] == ""
    # The strategy and its cross-fold estimate are the report's chosen row.
    strategies = pd.read_csv(Path(cfg.run.dir) / "report" / "strategies.csv", keep_default_na=False)
    chosen = strategies[strategies["chosen"] == "<-"].iloc[0]
    assert logged["strategy"] == chosen["strategy"] and logged["metric"] == "macro_f1"
    assert float(logged["oof_estimate"]) == pytest.approx(chosen["oof_macro_f1_cross_fold"], abs=1e-6)
    saved = Path(cfg.kaggle.log).parent / "configs" / f"{logged['config_hash']}.yaml"
    assert yaml.safe_load(saved.read_text())["predict"]["tta"] == cfg.predict.tta
    assert row["status"] == "sent"

    now = datetime.now(UTC).replace(tzinfo=None)
    kaggle.answer(HEADER + listed(now, "first try", "SubmissionStatus.PENDING"))
    assert refresh(cfg, progress=False)["pending"] == 1
    assert kaggle.calls[-1] == ["competitions", "submissions", "-c", SLUG, "--csv"]
    assert read_log(Path(cfg.kaggle.log)).iloc[0]["public_score"] == ""

    # A second attempt without -m and without a ref in the CLI's answer (older CLIs print none): found again by
    # its file name and description.
    kaggle.answer("Successfully submitted to Human Protein Atlas Image Classification")
    second = submit(cfg, progress=False)
    assert second["kaggle_ref"] == "" and "config " + second["config_hash"] in second["message"]
    kaggle.answer(HEADER + listed(now, second["message"], "SubmissionStatus.COMPLETE", "0.40125", "0.38", "51234999")
                  + listed(now, "first try", "SubmissionStatus.COMPLETE", "0.51234", "0.49"))
    assert refresh(cfg, progress=False)["scored"] == 2
    log = read_log(Path(cfg.kaggle.log))
    assert log["public_score"].tolist() == ["0.51234", "0.40125"]
    assert log["private_score"].tolist() == ["0.49", "0.38"] and log["kaggle_ref"].tolist()[1] == "51234999"


@pytest.mark.parametrize("answer, reason", [
    ((AUTH_HELP, "", 1), "no valid Kaggle credentials"),
    (("", NETWORK, 1), "no network"),
    (("", REJECTED, 1), "Kaggle rejected the file"),
    (None, "not installed"),
])
def test_a_failed_attempt_is_one_line_logged_with_its_reason_and_retry(cfg, kaggle, tmp_path, monkeypatch, answer,
                                                                       reason):
    if answer is None:  # neither on PATH nor beside this Python
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        monkeypatch.setattr(sys, "executable", str(tmp_path / "empty" / "python"))
    else:
        kaggle.answer(*answer)
    before = Path(cfg.submission.path).read_bytes()
    with pytest.raises(SubmitFailed) as failure:
        submit(cfg, "try", retry="python -m src.submit -m try", progress=False)
    message = str(failure.value)
    assert reason in message and "\n" not in message and message.endswith("retry: python -m src.submit -m try")
    log = read_log(Path(cfg.kaggle.log))
    assert len(log) == 1 and log.iloc[0]["status"].startswith("failed: ") and reason in log.iloc[0]["status"]
    assert log.iloc[0]["sha256"] == sha256(cfg.submission.path) and Path(cfg.submission.path).read_bytes() == before
    assert len(kaggle.calls) == (0 if answer is None else 1)


def test_refuses_a_submission_that_is_not_the_current_runs(cfg, kaggle, tmp_path):
    original = pd.read_csv(cfg.submission.path, dtype=str, keep_default_na=False)
    scores = Path(cfg.run.dir) / "test_probs.csv"

    def attempt(changes: dict, expected: str) -> None:
        with pytest.raises(SubmitFailed, match=expected):
            submit(override(cfg, **changes), "x", progress=False)

    other = original.copy()
    other.loc[0, "Predicted"] = "0" if other.loc[0, "Predicted"] != "0" else "1"
    other.to_csv(tmp_path / "edited.csv", index=False)
    attempt({"submission.path": str(tmp_path / "edited.csv")}, "not the file predict wrote")
    original.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    attempt({"submission.path": str(tmp_path / "short.csv")}, "submission failed validation.*Ids differ")
    original.to_csv(tmp_path / "old.csv", index=False)
    os.utime(tmp_path / "old.csv", ns=(scores.stat().st_mtime_ns - 10**9,) * 2)
    attempt({"submission.path": str(tmp_path / "old.csv")}, "older than the run's test scores")
    attempt({"predict.tta": ["identity", "flip"]}, r"another config than this one \(predict.tta")
    attempt({"submission.path": str(tmp_path / "none.csv")}, "not found: write it with `python -m src.predict`")
    log = read_log(Path(cfg.kaggle.log))
    assert len(log) == 5 and log["status"].str.startswith("failed: refused: ").all()
    assert kaggle.calls == []  # nothing was sent


@pytest.mark.parametrize("answer, expected", [
    (("<!DOCTYPE html><html><body>Service Unavailable</body></html>", "", 0), "gave no table with columns"),
    ((HEADER + "51234567,submission.csv,yesterday,x,SubmissionStatus.COMPLETE,0.5,0.5\n", "", 0),
     "a date that cannot be read"),
    ((AUTH_HELP, "", 1), "no valid Kaggle credentials"),
    (("", NETWORK, 1), "no network"),
])
def test_refresh_failures_leave_the_log_unchanged(cfg, kaggle, answer, expected):
    kaggle.answer(ACCEPTED)
    submit(cfg, "kept", progress=False)
    before = Path(cfg.kaggle.log).read_bytes()
    kaggle.answer(*answer)
    with pytest.raises(PipelineError, match=expected) as failure:
        refresh(cfg, progress=False)
    assert "retry: python -m src.submit --refresh" in str(failure.value)
    assert Path(cfg.kaggle.log).read_bytes() == before


def test_log_prints_the_table_and_plots_oof_against_the_public_score(cfg, capsys):
    rows = [{column: "" for column in LOG_COLUMNS} | {"time": f"2026-01-0{i}T00:00:00+00:00", "status": "sent",
                                                      "metric": "macro_f1", "oof_estimate": oof, "public_score": lb}
            for i, (oof, lb) in enumerate([("0.41", "0.38"), ("0.45", "0.40"), ("0.52", "0.47"), ("0.50", "")], 1)]
    rows.append(rows[0] | {"status": "failed: no network", "public_score": ""})
    write_log(Path(cfg.kaggle.log), pd.DataFrame(rows))
    log, plot, rho = show_log(cfg)
    assert len(log) == 5 and rho == pytest.approx(1.0)
    assert plot == Path(cfg.kaggle.log).parent / "oof_vs_lb.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "failed: no network" in out and "3 scored submission(s); Spearman rho 1.000" in out


def test_cli_prints_one_error_line_and_exits_2(cfg, kaggle, tmp_path, monkeypatch, capsys):
    config = save_config(cfg, tmp_path / "config.yaml")
    kaggle.answer(AUTH_HELP, "", 1)
    monkeypatch.setattr(sys, "argv", ["src.submit", "--config", str(config), "-m", "from the CLI"])
    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: no valid Kaggle credentials")
    assert err.endswith(f"retry: python -m src.submit --config {config} -m 'from the CLI'")
    assert read_log(Path(cfg.kaggle.log)).iloc[0]["message"] == "from the CLI"


def test_outside_a_git_checkout_the_commit_is_blank(cfg, kaggle, tmp_path, monkeypatch):
    """A copy of the code without git history (GIT_DIR names a folder that is no repository) still submits."""
    (tmp_path / "not-a-repo").mkdir()
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "not-a-repo"))
    kaggle.answer(ACCEPTED)
    row = submit(cfg, "no git", progress=False)
    logged = read_log(Path(cfg.kaggle.log)).iloc[0]
    assert row["status"] == "sent" and (logged["git_commit"], logged["git_dirty"]) == ("", "")


def logged_attempt(time: datetime, message: str, **scores: str) -> dict:
    return {column: "" for column in LOG_COLUMNS} | {
        "time": time.isoformat(timespec="seconds"), "competition": SLUG, "file": "submissions/submission.csv",
        "message": message, "status": "sent", "kaggle_ref": "51234567"} | scores


def test_a_refresh_that_finds_nothing_new_leaves_the_scored_rows_and_the_log_as_they_are(kaggle, tmp_path):
    """While a competition runs Kaggle's private score is blank: a row with its public score is not counted or
    rewritten again at each refresh; the private score is filled in once the competition ends."""
    log_path = tmp_path / "log.csv"
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"kaggle.log={log_path}"])
    now = datetime.now(UTC).replace(microsecond=0)
    write_log(log_path, pd.DataFrame([logged_attempt(now, "scored", public_score="0.51234")]))
    before, stat_before = log_path.read_bytes(), log_path.stat()
    listed_now = listed(now.replace(tzinfo=None), "scored", "SubmissionStatus.COMPLETE", "0.51234")
    kaggle.answer(HEADER + listed_now)
    assert refresh(cfg, progress=False)["scored"] == 0
    after = log_path.stat()
    assert log_path.read_bytes() == before
    assert (after.st_ino, after.st_mtime_ns) == (stat_before.st_ino, stat_before.st_mtime_ns)  # not written again

    # After the end: the private score is new; the public score stays as logged.
    kaggle.answer(HEADER + listed(now.replace(tzinfo=None), "scored", "SubmissionStatus.COMPLETE", "0.5", "0.49"))
    assert refresh(cfg, progress=False)["scored"] == 1
    logged = read_log(log_path).iloc[0]
    assert (logged["public_score"], logged["private_score"]) == ("0.51234", "0.49")


LIGHT_START = """
import runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("heavy:", sorted(name for name in ("torch", "timm", "albumentations") if name in sys.modules))
"""


@pytest.mark.parametrize("module", ["src.submit", "src.cli"])
def test_light_commands_start_without_torch(module):
    """Checking and sending a csv needs no deep-learning stack: --help imports neither torch nor timm."""
    result = subprocess.run([sys.executable, "-c", LIGHT_START.format(module=module)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and result.stdout.strip().endswith("heavy: []"), result.stdout[-300:]


# -- round three: the CLI's bytes, an interrupted attempt, odd messages, a damaged log ----------------------
def test_output_that_is_not_utf8_is_read_with_the_bytes_replaced(cfg, kaggle):
    """A server's error page or a local encoding in the CLI's output: the attempt is still logged as sent, and
    refresh still reads the table."""
    kaggle.answer(b"Submission ref: 51234567\nR\xe9sum\xe9 \xff\xfe\nSuccessfully submitted\n")
    row = submit(cfg, "bytes", progress=False)
    assert row["status"] == "sent" and row["kaggle_ref"] == "51234567"
    now = datetime.now(UTC).replace(tzinfo=None)
    kaggle.answer(b"Warning: caf\xe9\n" + (HEADER + listed(now, "bytes", "SubmissionStatus.COMPLETE", "0.5")).encode())
    assert refresh(cfg, progress=False)["scored"] == 1
    assert read_log(Path(cfg.kaggle.log)).iloc[0]["public_score"] == "0.5"


def test_a_message_that_starts_with_a_dash_is_the_messages_value(cfg, kaggle):
    kaggle.answer(ACCEPTED)
    submit(cfg, "-5% lr, --no-tta", progress=False)
    assert kaggle.calls[-1][-1] == "--message=-5% lr, --no-tta"
    assert read_log(Path(cfg.kaggle.log)).iloc[0]["message"] == "-5% lr, --no-tta"


def test_an_attempt_killed_while_the_cli_runs_stays_pending_and_refresh_settles_it(cfg, kaggle, tmp_path):
    """kill -9 of src.submit while the CLI runs (the orphaned CLI still sends the file): the row is there, pending;
    --refresh finds the submission in Kaggle's list and completes the row."""
    config = save_config(cfg, tmp_path / "config.yaml")
    kaggle.answer(ACCEPTED)
    (kaggle.folder / "hook").write_text("kill -9 $PPID\n")
    result = subprocess.run([sys.executable, "-m", "src.submit", "--config", str(config), "-m", "killed"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    (kaggle.folder / "hook").unlink()
    log = read_log(Path(cfg.kaggle.log))
    assert len(log) == 1 and log.iloc[0]["status"] == "pending" and log.iloc[0]["message"] == "killed"
    assert log.iloc[0]["sha256"] == sha256(cfg.submission.path) and log.iloc[0]["kaggle_ref"] == ""

    now = datetime.now(UTC).replace(tzinfo=None)
    kaggle.answer(HEADER + listed(now, "killed", "SubmissionStatus.COMPLETE", "0.47", ref="51234999"))
    counts = refresh(cfg, progress=False)
    assert counts["settled"] == 1 and counts["scored"] == 1
    logged = read_log(Path(cfg.kaggle.log)).iloc[0]
    assert (logged["status"], logged["kaggle_ref"], logged["public_score"]) == ("sent", "51234999", "0.47")


def test_refresh_fails_a_pending_attempt_kaggle_never_received(kaggle, tmp_path):
    """Pending for over a day, absent from a list that reaches back before it: never received. A recent one
    (its CLI may still be sending) stays pending; a Kaggle row from before an attempt is not that attempt's."""
    log_path = tmp_path / "log.csv"
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"kaggle.log={log_path}"])
    now = datetime.now(UTC).replace(microsecond=0)
    old, recent = now - timedelta(days=2), now - timedelta(minutes=30)
    write_log(log_path, pd.DataFrame([logged_attempt(old, "lost", status="pending", kaggle_ref=""),
                                      logged_attempt(recent, "again", status="pending", kaggle_ref="")]))
    kaggle.answer(HEADER + listed((now - timedelta(days=3)).replace(tzinfo=None), "again",
                                  "SubmissionStatus.COMPLETE", "0.4", ref="1"))
    counts = refresh(cfg, progress=False)
    assert counts["not_received"] == 1 and counts["unmatched"] == 1 and counts["settled"] == 0
    log = read_log(log_path)
    assert log.iloc[0]["status"].startswith("failed: interrupted before Kaggle received it")
    assert log.iloc[1]["status"] == "pending" and log.iloc[1]["public_score"] == ""


@pytest.mark.parametrize("damage, line, expected", [
    (lambda text: text.rsplit(",", 3)[0] + "\n", 3, "cells, the header has 16"),  # a cut last row
    (lambda text: text + text, 4, "the header again"),  # two logs joined
    (lambda text: text + text.splitlines(keepends=True)[-1], 4, "a repeat of line 3"),
])
def test_a_damaged_log_is_refused_with_its_line(cfg, kaggle, damage, line, expected):
    log_path = Path(cfg.kaggle.log)
    write_log(log_path, pd.DataFrame([logged_attempt(datetime(2026, 1, d, tzinfo=UTC), f"#{d}") for d in (1, 2)]))
    log_path.write_text(damage(log_path.read_text()))
    with pytest.raises(PipelineError, match=rf"log.csv, line {line}: .*{expected}") as failure:
        show_log(cfg, progress=False)
    assert "\n" not in str(failure.value)
    kaggle.answer(ACCEPTED)
    with pytest.raises(PipelineError, match=f"line {line}"):
        submit(cfg, "not sent", progress=False)
    assert kaggle.calls == []


def test_log_says_rho_is_undefined_when_the_estimates_are_all_equal(cfg, capsys):
    write_log(Path(cfg.kaggle.log), pd.DataFrame([
        logged_attempt(datetime(2026, 1, d, tzinfo=UTC), f"#{d}", metric="macro_f1", oof_estimate="0.5",
                       public_score=f"0.4{d}") for d in range(1, 5)]))
    assert show_log(cfg)[2] is None
    assert "4 scored submission(s); Spearman rho undefined: all 4 OOF estimates are equal" in capsys.readouterr().out


def test_an_attempt_settled_by_refresh_while_its_cli_ran_is_not_logged_twice(tmp_path):
    """--refresh (another process) found the pending attempt on Kaggle before its own CLI returned: the row
    refresh wrote stands, and the attempt is not appended a second time."""
    log_path = tmp_path / "log.csv"
    row = logged_attempt(datetime(2026, 1, 1, tzinfo=UTC), "racing", status="pending", kaggle_ref="")
    index = log_attempt(log_path, row)
    settled = read_log(log_path)
    settled.loc[index, ["status", "kaggle_ref", "public_score"]] = ["sent", "51234567", "0.5"]
    write_log(log_path, settled)
    assert log_attempt(log_path, row | {"status": "sent", "kaggle_ref": "51234567"}, index) == index
    log = read_log(log_path)
    assert len(log) == 1 and log.iloc[0]["public_score"] == "0.5"
    assert log_attempt(log_path, row | {"time": "2026-01-02T00:00:00+00:00"}, index) == 1  # not that row: appended
