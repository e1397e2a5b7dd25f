"""The Kaggle round trip: send the run's submission, log every attempt, fetch public scores, compare with OOF.

    python -m src.submit [--config FILE] [key=value ...] [-m MESSAGE]   check the submission, send it, log it
                                                     (a message that starts with "-": --message=-MESSAGE)
    python -m src.submit [--config FILE] --refresh                        fill in public scores from Kaggle
    python -m src.submit [--config FILE] --log                            print the log, plot OOF vs public score

The only module that runs the official ``kaggle`` CLI (a subprocess; on PATH, else beside this Python):
``kaggle competitions submit -c SLUG -f FILE --message=MESSAGE`` and ``kaggle competitions submissions -c SLUG
--csv`` (columns ``ref,fileName,date,description,status,publicScore,privateScore``); its output is read as UTF-8,
any other bytes replaced. Credentials stay the CLI's business
(``kaggle auth login``, ``~/.kaggle/access_token``, ``KAGGLE_API_TOKEN``, or the legacy ``~/.kaggle/kaggle.json``);
this module never reads them.

Before sending, the submission is checked again: it must be the file predict wrote for the current run (the bytes
recorded in ``run.dir/decision.json``, not older than the run's test scores, written under this config) and pass
the submission validation (``src.formats.validate_submission``: the sample submission's Ids in order, labels of
the run's vocabulary, nothing empty).

Every attempt, sent or not, is one row of ``kaggle.log`` (``submissions/log.csv``; the whole file is written to a
temp file and renamed, under a lock, and rows are never removed): time (UTC), competition, file, sha256, message,
runs (run folders and folds), config_hash (the resolved config is saved as ``configs/<hash>.yaml`` beside the
log), git_commit and git_dirty (blank outside a git checkout), the decision strategy with its metric and
cross-fold OOF estimate, status (``sent`` or ``failed: <reason>``), kaggle_ref, and the public and private scores
(blank until ``--refresh`` finds them; a refresh that finds nothing new leaves the log as it is). A failed attempt
is one ``error:`` line and exit 2, with the command to retry. The row is written as ``pending`` before the CLI
starts and completed when it ends: an attempt whose process died meanwhile stays ``pending`` until ``--refresh``
finds it in Kaggle's list (then ``sent``) or shows Kaggle never received it (then ``failed``). A damaged log (a
cut row, a header again, a repeated row) is refused with its line number before anything is sent.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import pandas as pd
import yaml

from src.cli import cli_parser, config_from_args, run_cli, user_message
from src.config import Config, PipelineError
from src.data import with_vocabulary
from src.decision_record import config_differences, decision_path, file_sha256, read_record
from src.files import ensure_writable, write_atomic
from src.formats import label_separator, load_test_table, submission_columns, validate_submission
from src.run_folder import RunFolder, run_vocabulary
from src.score_table import score_file

LOG_COLUMNS = ("time", "competition", "file", "sha256", "message", "runs", "config_hash", "git_commit", "git_dirty",
               "strategy", "metric", "oof_estimate", "status", "kaggle_ref", "public_score", "private_score")
# What `kaggle competitions submissions --csv` must give for scores to be matched.
KAGGLE_COLUMNS = ("fileName", "date", "description", "status", "publicScore")
KAGGLE_TIMEOUT_S = 600
# A Kaggle submission matches a logged attempt (same file name and description) made within this time of it.
MATCH_WINDOW = timedelta(hours=24)
# Kaggle dates a submission when it arrives, after the attempt's row was written: minus the clocks' difference.
CLOCK_SKEW = timedelta(minutes=5)
# The status of an attempt whose kaggle CLI is running (or was killed while running: --refresh settles it).
PENDING = "pending"
CONFIGS_DIR = "configs"
PLOT_FILE = "oof_vs_lb.png"
REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = ("install it with `.venv/bin/pip install -r requirements.txt` (it pins kaggle and six, which the "
                "kaggle CLI imports without declaring it)")


class SubmitFailed(PipelineError):
    """An attempt that was logged as failed: the message says why, where it is logged and how to retry."""


# -- the submission log -------------------------------------------------------------------------------------
@contextmanager
def log_lock(log_path: Path) -> Iterator[None]:
    """Hold the log for one read-change-write (an OS file lock beside it), so two processes never lose a row."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path.with_name(f".{log_path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_log(log_path: Path) -> pd.DataFrame:
    """The log as text cells (every column of ``LOG_COLUMNS``, and any other it already has); empty if absent.

    A damaged log (a row with another number of cells than the header, the header again further down as when
    two logs are concatenated, a row repeated) is refused with its line number: read silently, it would count
    one submission twice or give a row blank cells."""
    if not log_path.is_file():
        return pd.DataFrame(columns=list(LOG_COLUMNS), dtype=str)
    unreadable = f"{log_path} is not a readable csv"
    fix = "move it aside or fix it (nothing was sent or changed)"
    try:
        with open(log_path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise PipelineError(f"{unreadable} (no header line); {fix}")
            rows: list[list[str]] = []
            seen: dict[tuple, int] = {}  # each row -> its line
            for row in reader:
                line = reader.line_num
                if not row:
                    continue  # a blank line, as pandas skips it
                if row == header:
                    raise PipelineError(f"{log_path}, line {line}: the header again (two logs joined?); {fix}")
                if len(row) != len(header):
                    raise PipelineError(f"{log_path}, line {line}: {len(row)} cells, the header has {len(header)} "
                                        f"(a cut or edited row?); {fix}")
                if tuple(row) in seen:
                    raise PipelineError(f"{log_path}, line {line}: a repeat of line {seen[tuple(row)]}; {fix}")
                seen[tuple(row)] = line
                rows.append(row)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise PipelineError(f"{unreadable} ({type(exc).__name__}: {exc}); {fix}") from None
    frame = pd.DataFrame(rows, columns=header, dtype=str)
    for column in LOG_COLUMNS:
        if column not in frame:
            frame[column] = ""
    return frame


def write_log(log_path: Path, frame: pd.DataFrame) -> Path:
    return write_atomic(log_path, lambda tmp: frame.to_csv(tmp, index=False))


def log_attempt(log_path: Path, row: dict, index: int | None = None) -> int:
    """Write one attempt into the log and return its row index: at the end, or, given ``index``, over the
    attempt's own ``pending`` row (the same time, file and sha256; appended if the log no longer holds it, left
    as it is if ``--refresh`` has settled it from Kaggle's list meanwhile). The whole new file goes to a temp
    name, then is renamed into place, under the log's lock."""
    with log_lock(log_path):
        frame = read_log(log_path)
        cells = {column: str(row.get(column, "")) for column in frame.columns}
        ours = index is not None and index < len(frame) and all(
            frame.loc[index, column] == cells[column] for column in ("time", "file", "sha256"))
        if not ours:
            index = len(frame)
            frame = pd.concat([frame, pd.DataFrame([cells], dtype=str)], ignore_index=True) if index else \
                pd.DataFrame([cells], dtype=str)
        elif frame.loc[index, "status"] == PENDING:
            frame.loc[index, list(cells)] = list(cells.values())
        else:
            return index
        write_log(log_path, frame)
    return index


# -- what an attempt records --------------------------------------------------------------------------------
def git_state(root: Path = REPO_ROOT) -> tuple[str, str]:
    """(commit, "yes"/"no" for uncommitted changes) of the checkout; ("", "") outside a git checkout or without
    git (a copy of the code, a Kaggle notebook)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "", ""
    if commit.returncode != 0 or status.returncode != 0:
        return "", ""
    return commit.stdout.strip(), "yes" if status.stdout.strip() else "no"


def config_text(config: dict) -> tuple[str, str]:
    """(hash, YAML text) of a resolved config: the hash names the file the text is saved in."""
    text = yaml.safe_dump(config, sort_keys=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], text


def save_config_copy(log_path: Path, config: dict) -> str:
    """Save the resolved config beside the log as ``configs/<hash>.yaml`` (once per distinct config)."""
    digest, text = config_text(config)
    path = log_path.parent / CONFIGS_DIR / f"{digest}.yaml"
    if not path.is_file():
        write_atomic(path, lambda tmp: tmp.write_text(text))
    return digest


def runs_text(record: dict) -> str:
    """``runs/a[0,1,2]; runs/b[0]`` (with ``xW`` when a run's weight is not 1)."""
    parts = []
    for run in record["runs"]:
        weight = f" x{run['weight']:g}" if run.get("weight", 1.0) != 1.0 else ""
        name = run["dir"] if run.get("dir") is not None else run["scores"]["oof"]
        parts.append(f"{name}[{','.join(str(f) for f in run['folds'])}]{weight}")
    return "; ".join(parts)


def record_fields(record: dict) -> dict:
    """The log cells a decision record fills."""
    estimate = record.get("oof_cross_fold")
    return {"runs": runs_text(record), "strategy": record["strategy"], "metric": record.get("metric", ""),
            "oof_estimate": "" if estimate is None else f"{estimate:.6f}"}


def default_message(record: dict, config_hash: str) -> str:
    """A description that says what was sent (and lets --refresh find it again)."""
    estimate = record.get("oof_cross_fold")
    oof = f"oof {record.get('metric', 'metric')} {estimate:.4f}, " if estimate is not None else ""
    ensemble = record.get("ensemble")  # weights searched or a stack: what the runs' weights alone do not say
    blend = f" | ensemble {ensemble['describe']}" if ensemble and ensemble.get("method") != "hand" else ""
    overrides = (record.get("overrides") or {}).get("rows")
    leak = f" | overrides {overrides}" if overrides else ""
    pseudo = "".join(f" | pseudo {source['rows']['kept']} rows from {source['run_dir']}"
                     for source in record.get("pseudo_labels") or [])
    return (f"{record['strategy']} ({oof}cross-fold){leak} | {runs_text(record)}{blend}{pseudo} | "
            f"config {config_hash}")


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


# -- checks ---------------------------------------------------------------------------------------------------
def check_submission(cfg: Config) -> dict:
    """The decision record of the run that wrote ``submission.path``, after checking that the file passes the
    submission validation and is that run's: written under this config, not older than the run's test scores,
    the very bytes predict recorded."""
    path = Path(cfg.submission.path)
    if not path.is_file():
        raise PipelineError(f"{path} not found: write it with `python -m src.predict` first")
    vocabulary = run_vocabulary(cfg)
    current = with_vocabulary(cfg, vocabulary)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not a readable csv ({exc})") from None
    validate_submission(frame, load_test_table(current.data)["Id"].tolist(), vocabulary,
                        submission_columns(current.data), label_separator(current.data))
    record = read_record(cfg.run.dir)
    differences = config_differences(record["config"], current.model_dump(mode="json"))
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise PipelineError(f"{path} was written under another config than this one ({shown}): submit with the config "
                            "that wrote it, or run `python -m src.predict` with this one")
    scores = score_file(RunFolder(cfg.run.dir).test_scores, current.data.num_classes)
    if not scores.is_file():
        raise PipelineError(f"{scores} not found: run `python -m src.predict` again")
    if path.stat().st_mtime_ns < scores.stat().st_mtime_ns:
        raise PipelineError(f"{path} is older than the run's test scores {scores}: the latest `python -m src.predict` "
                            "did not write it (refused or failed); run predict again")
    if file_sha256(path) != record["submission"]["sha256"]:
        raise PipelineError(f"{path} is not the file predict wrote for {cfg.run.dir} (its sha256 differs from "
                            f"{decision_path(cfg.run.dir)}): it was changed or written by another run; run "
                            "`python -m src.predict` again")
    return record


# -- the kaggle CLI ---------------------------------------------------------------------------------------------
def find_kaggle() -> str:
    """The kaggle executable: on PATH, else beside this Python (the project's .venv/bin)."""
    here = Path(sys.executable).parent
    found = shutil.which("kaggle") or shutil.which("kaggle", path=str(here))
    if found is None:
        raise PipelineError(f"the kaggle CLI is not installed (not on PATH, not in {here}): {INSTALL_HINT}")
    return found


def run_kaggle(kaggle: str, args: list[str], timeout: float = KAGGLE_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``kaggle <args>``, its output captured; a PipelineError when it cannot be started or does not finish."""
    try:
        # Its output is read as UTF-8 with any other bytes replaced: a server's error page or a local encoding
        # must not turn a sent submission into a traceback.
        return subprocess.run([kaggle, *args], capture_output=True, encoding="utf-8", errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise PipelineError(f"the kaggle CLI is not installed ({kaggle} not found): {INSTALL_HINT}") from None
    except PermissionError:
        raise PipelineError(f"the kaggle CLI at {kaggle} cannot be run (not executable): {INSTALL_HINT}") from None
    except subprocess.TimeoutExpired:
        raise PipelineError(f"the kaggle CLI did not finish within {timeout:g} s (a slow or blocked network?)"
                            ) from None


def _last_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1][:limit] + ("..." if len(lines[-1]) > limit else "")) if lines else "no output"


def failure_reason(result: subprocess.CompletedProcess, competition: str) -> str:
    """One line saying why a kaggle CLI call failed, and what fixes it (from its output; exit code otherwise)."""
    text = f"{result.stdout}\n{result.stderr}"
    last = _last_line(result.stderr) if result.stderr.strip() else _last_line(result.stdout)
    if re.search(r"Authentication required|\b401\b|Unauthorized|kaggle\.json", text):
        return ("no valid Kaggle credentials (401 or none found): run `kaggle auth login`, or save an API token "
                "(kaggle.com > Settings > API) to ~/.kaggle/access_token or KAGGLE_API_TOKEN (a legacy key: "
                "~/.kaggle/kaggle.json or KAGGLE_USERNAME and KAGGLE_KEY)")
    if re.search(r"NameResolutionError|Failed to resolve|Max retries exceeded|ConnectionError|Connection refused|"
                 r"Network is unreachable|Temporary failure in name resolution|Read timed out", text):
        return f"no network: Kaggle could not be reached ({last})"
    if re.search(r"\b403\b|Forbidden", text):
        return (f"Kaggle refused access (403): accept the competition's rules at "
                f"https://www.kaggle.com/competitions/{competition}/rules")
    if re.search(r"Could not find competition|\b404\b", text):
        return f"competition '{competition}' not found or not accepting submissions (404): check kaggle.competition"
    if re.search(r"\b429\b", text):
        return "Kaggle is rate limiting or the daily submission limit is reached (429): retry later"
    if re.search(r"\b400\b|Bad Request|Could not submit", text):
        return f"Kaggle rejected the file ({last})"
    return f"the kaggle CLI failed with exit code {result.returncode} ({last})"


# -- submit ---------------------------------------------------------------------------------------------------
def submit(cfg: Config, message: str | None = None, kaggle: str | None = None, retry: str | None = None,
           progress: bool = True) -> dict:
    """Check ``submission.path``, send it with the kaggle CLI and log the attempt; returns the logged row.

    ``kaggle``: the CLI to run (default: :func:`find_kaggle`); ``retry``: the command a failure prints. A failed
    attempt (refused by the checks, or by the CLI) is logged with its reason before :class:`SubmitFailed` is
    raised; the submission and every earlier row are left as they were."""
    log_path = Path(cfg.kaggle.log)
    ensure_writable(log_path.parent, "the submission log")
    read_log(log_path)  # an unreadable log stops us before anything is sent, not after
    path = Path(cfg.submission.path)
    retry = retry or ("python -m src.submit" + (f" {shlex.quote(f'--message={message}')}" if message else ""))
    commit, dirty = git_state()
    row = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "competition": cfg.kaggle.competition,
           "file": str(path), "git_commit": commit, "git_dirty": dirty}

    pending: int | None = None  # the attempt's row once written as pending

    def failed(reason: str, advice: str) -> SubmitFailed:
        row["status"] = f"failed: {reason}"
        log_attempt(log_path, row, pending)
        return SubmitFailed(f"{reason}; the attempt is logged in {log_path} (failed), {path} is unchanged; {advice}")

    try:
        record = check_submission(cfg)
    except PipelineError as exc:
        row["sha256"] = file_sha256(path) if path.is_file() else ""
        row["message"] = message or ""
        try:
            row.update(record_fields(read_record(cfg.run.dir)))
        except (PipelineError, KeyError, TypeError, ValueError):
            pass  # the record is what failed to read: log what is known
        raise failed(f"refused: {one_line(user_message(exc))}", f"then retry: {retry}") from None

    config_hash = save_config_copy(log_path, record["config"])
    message = message or default_message(record, config_hash)
    row.update(record_fields(record), sha256=record["submission"]["sha256"], config_hash=config_hash, message=message,
               status=PENDING)
    # Logged before the CLI starts: if this process dies while the CLI runs (which may still deliver the file),
    # the row stays pending and --refresh settles it from Kaggle's own list.
    pending = log_attempt(log_path, row)
    try:
        # --message=: a message that starts with "-" is the option's value, not an option of its own.
        result = run_kaggle(kaggle or find_kaggle(), ["competitions", "submit", "-c", cfg.kaggle.competition,
                                                      "-f", str(path), f"--message={message}"])
    except PipelineError as exc:
        raise failed(one_line(exc), f"retry: {retry}") from None
    if result.returncode != 0:
        raise failed(failure_reason(result, cfg.kaggle.competition), f"retry: {retry}")
    ref = re.search(r"Submission ref:\s*(\d+)", result.stdout)
    row.update(status="sent", kaggle_ref=ref.group(1) if ref else "")
    log_attempt(log_path, row, pending)
    if progress:
        print(f"sent {path} to {cfg.kaggle.competition}: {_last_line(result.stdout)}")
        print(f"logged in {log_path} (config {config_hash}); public score: `python -m src.submit --refresh` once "
              "Kaggle has scored it")
    return row


# -- refresh ----------------------------------------------------------------------------------------------------
def parse_submissions_csv(text: str) -> pd.DataFrame:
    """The table of ``kaggle competitions submissions --csv`` (lines before its header, such as warnings, are
    skipped): fileName, description, status (PENDING/COMPLETE/ERROR), scores as text, date as UTC timestamps."""
    lines = text.splitlines()
    if any(line.strip() == "No submissions found" for line in lines):
        return pd.DataFrame(columns=["ref", *KAGGLE_COLUMNS, "privateScore"])
    start = next((i for i, line in enumerate(lines) if set(KAGGLE_COLUMNS) <= set(line.strip().split(","))), None)
    if start is None:
        raise PipelineError("`kaggle competitions submissions --csv` gave no table with columns "
                            f"{list(KAGGLE_COLUMNS)} (first line: {_last_line(lines[0] if lines else '')!r}); the log "
                            "is unchanged")
    try:
        frame = pd.read_csv(StringIO("\n".join(lines[start:])), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineError(f"`kaggle competitions submissions --csv` gave a malformed table ({one_line(exc)}); the "
                            "log is unchanged") from None
    for column in ("ref", "privateScore"):
        if column not in frame:
            frame[column] = ""
    dates = pd.to_datetime(frame["date"], errors="coerce", utc=True, format="ISO8601")
    if dates.isna().any():
        bad = frame["date"][dates.isna()].iloc[0]
        raise PipelineError(f"`kaggle competitions submissions --csv` gave a date that cannot be read ({bad!r}); the "
                            "log is unchanged")
    frame["date"] = dates
    frame["status"] = frame["status"].str.split(".").str[-1].str.upper()  # SubmissionStatus.COMPLETE -> COMPLETE
    return frame


def match_scores(log: pd.DataFrame, kaggle_rows: pd.DataFrame, competition: str) -> Counter:
    """Fill in ``log`` (in place) from Kaggle's submissions: each sent or pending attempt of ``competition`` still
    missing a score takes the Kaggle row with its ref, else with its file name and description made nearest in
    time (within ``MATCH_WINDOW``; for a pending attempt not before it) and not logged under another ref; each
    Kaggle row is used once. A pending attempt (its process died while the kaggle CLI ran) that is found becomes
    sent; one that is not found, older than ``MATCH_WINDOW`` while Kaggle's list reaches back before it, was never
    received and becomes failed. A public score once logged is kept as it is; an attempt that has one takes only
    the private score, when Kaggle gives it (after the competition ends). Returns counts of what is new: scored (a
    public score, or a private score added to one), pending, errors, unmatched, settled (pending attempts found
    on Kaggle), not_received."""
    counts: Counter = Counter()
    # Kaggle rows another attempt logged by ref are never taken by a file name and description.
    used: set = set(kaggle_rows.index[kaggle_rows["ref"].isin(set(log["kaggle_ref"]) - {""})])
    times = pd.to_datetime(log["time"], errors="coerce", utc=True, format="ISO8601")
    received_by = pd.Timestamp.now(tz="UTC") - MATCH_WINDOW  # an attempt older than this has long been sent or not
    listed_since = kaggle_rows["date"].min() if len(kaggle_rows) else None  # None: none ever, so all listed
    for i in log.index:
        status = log.at[i, "status"]
        if log.at[i, "competition"] != competition or status not in ("sent", PENDING) or (
                log.at[i, "public_score"] and log.at[i, "private_score"]):
            continue
        if log.at[i, "kaggle_ref"]:
            candidates = kaggle_rows[kaggle_rows["ref"] == log.at[i, "kaggle_ref"]]
        else:
            free = kaggle_rows[~kaggle_rows.index.isin(used)]
            candidates = free[(free["fileName"] == Path(log.at[i, "file"]).name)
                              & (free["description"].str.strip() == log.at[i, "message"].strip())]
            if status == PENDING and pd.notna(times[i]):
                candidates = candidates[candidates["date"] >= times[i] - CLOCK_SKEW]
            if pd.notna(times[i]) and len(candidates):
                gap = (candidates["date"] - times[i]).abs()
                candidates = candidates.loc[gap[gap <= MATCH_WINDOW].sort_values().index]
        if not len(candidates):
            if status == PENDING and pd.notna(times[i]) and times[i] < received_by and (
                    listed_since is None or listed_since <= times[i]):
                log.at[i, "status"] = "failed: interrupted before Kaggle received it (not in Kaggle's list)"
                counts["not_received"] += 1
            else:
                counts["unmatched"] += 1
            continue
        j = candidates.index[0]
        used.add(j)
        match = kaggle_rows.loc[j]
        log.at[i, "kaggle_ref"] = match["ref"] or log.at[i, "kaggle_ref"]
        if status == PENDING:
            log.at[i, "status"] = "sent"
            counts["settled"] += 1
        if log.at[i, "public_score"]:
            # Scored by an earlier refresh: while the competition runs, Kaggle's private score stays blank, and
            # this row is matched again only so that no other attempt takes its Kaggle row.
            if match["privateScore"] and not log.at[i, "private_score"]:
                log.at[i, "private_score"] = match["privateScore"]
                counts["scored"] += 1
        elif match["status"] == "ERROR":
            log.at[i, "status"] = "failed: Kaggle could not score it (see the competition's submissions page)"
            counts["errors"] += 1
        elif match["status"] == "COMPLETE" and match["publicScore"]:
            log.at[i, "public_score"] = match["publicScore"]
            log.at[i, "private_score"] = match["privateScore"]
            counts["scored"] += 1
        else:
            counts["pending"] += 1
    return counts


def refresh(cfg: Config, kaggle: str | None = None, retry: str | None = None, progress: bool = True) -> Counter:
    """Fetch the competition's submissions with the kaggle CLI and fill in the log's public (and private) scores;
    ``retry``: the command a failure prints. A failure leaves the log as it was."""
    log_path = Path(cfg.kaggle.log)
    if not log_path.is_file():
        raise PipelineError(f"no submission log at {log_path}: nothing to refresh (`python -m src.submit` sends one)")
    retry = f"retry: {retry or 'python -m src.submit --refresh'}"
    try:
        result = run_kaggle(kaggle or find_kaggle(), ["competitions", "submissions", "-c", cfg.kaggle.competition,
                                                      "--csv"])
    except PipelineError as exc:
        raise PipelineError(f"{one_line(exc)}; the log is unchanged; {retry}") from None
    if result.returncode != 0:
        raise PipelineError(f"{failure_reason(result, cfg.kaggle.competition)}; the log is unchanged; {retry}")
    try:
        kaggle_rows = parse_submissions_csv(result.stdout)
    except PipelineError as exc:
        raise PipelineError(f"{exc}; {retry}") from None
    with log_lock(log_path):
        log = read_log(log_path)
        before = log.copy()
        counts = match_scores(log, kaggle_rows, cfg.kaggle.competition)
        if not log.equals(before):  # nothing new: the log is left as it is, not written again
            write_log(log_path, log)
    if progress:
        interrupted = (f"; of the attempts interrupted while the kaggle CLI ran, {counts['settled']} found on Kaggle "
                       f"(now sent), {counts['not_received']} never received (now failed)"
                       if counts["settled"] or counts["not_received"] else "")
        print(f"refreshed {log_path}: {counts['scored']} scored, {counts['pending']} still pending, "
              f"{counts['errors']} failed on Kaggle, {counts['unmatched']} not found on Kaggle{interrupted}")
    return counts


# -- the log and the plot -------------------------------------------------------------------------------------
def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def show_log(cfg: Config, progress: bool = True) -> tuple[pd.DataFrame, Path | None, float | None]:
    """Print the log and plot the OOF estimate against the public score (``oof_vs_lb.png`` beside the log): one
    point per scored submission, the y = x line, the Spearman rank correlation in the title. Returns the log,
    the plot (None without a log) and the correlation (None below 2 scored submissions)."""
    # Imported here: matplotlib is most of this module's start-up, and only --log draws.
    from src.report import plot_oof_vs_public

    log_path = Path(cfg.kaggle.log)
    log = read_log(log_path)
    if not len(log):
        if progress:
            print(f"no submissions logged in {log_path} yet (`python -m src.submit` sends one)")
        return log, None, None
    if progress:
        shown = ["time", "status", "public_score", "oof_estimate", "metric", "strategy", "config_hash", "message"]
        print(log[shown].to_string(index=True, max_colwidth=60))
    oof, public = log["oof_estimate"].map(_number), log["public_score"].map(_number)
    scored = oof.notna() & public.notna()
    rho = None
    if scored.sum() >= 2:
        # Spearman's rho is Pearson's r of the ranks (ties at their mean rank, as scipy.stats.spearmanr has it),
        # without importing scipy.stats for it; constant input gives NaN: rho is undefined, said so in the title.
        value = float(oof[scored].rank().corr(public[scored].rank()))
        rho = None if math.isnan(value) else value
    metrics = sorted(set(log.loc[scored, "metric"]) - {""}) or ["metric"]
    plot = write_atomic(log_path.parent / PLOT_FILE, lambda tmp: plot_oof_vs_public(
        oof[scored].to_numpy(), public[scored].to_numpy(), [f"#{i}" for i in log.index[scored]], tmp,
        "/".join(metrics), rho))
    if progress:
        if rho is not None:
            correlation = f"Spearman rho {rho:.3f}"
        elif scored.sum() < 2:
            correlation = "Spearman rho needs 2+ scored submissions"
        else:  # a rank correlation of a constant is undefined: say which side is constant
            same = "OOF estimates" if oof[scored].nunique() == 1 else "public scores"
            correlation = f"Spearman rho undefined: all {int(scored.sum())} {same} are equal"
        print(f"\n{int(scored.sum())} scored submission(s); {correlation}; plot: {plot}")
    return log, plot, rho


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("-m", "--message", help="the submission's description on Kaggle (default: strategy, OOF "
                        "estimate, runs and config hash)")
    parser.add_argument("--refresh", action="store_true", help="fill in public scores from Kaggle (sends nothing)")
    parser.add_argument("--log", action="store_true", help="print the log and plot OOF estimate vs public score "
                        "(sends nothing)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    retry = shlex.join(["python", "-m", "src.submit", *sys.argv[1:]])
    if args.refresh:
        refresh(cfg, retry=retry)
    if args.log:
        show_log(cfg)
    if not (args.refresh or args.log):
        submit(cfg, args.message, retry=retry)


if __name__ == "__main__":
    run_cli(main)
