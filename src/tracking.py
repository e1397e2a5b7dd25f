"""Experiment tracking: the only module that talks to Weights & Biases.

``wandb.mode`` is ``offline`` by default: runs are written under the run folder with no network or
account, and ``wandb sync <run.dir>/<fold>/wandb/offline-run-*`` uploads them later. ``disabled`` turns
tracking off (the tests), ``online`` logs live (needs ``wandb login``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import wandb

from src.config import Config
from src.files import WriteError
from src.progress import note


class QuietLogFiles(logging.Filter):
    """W&B logs through the ``wandb`` Python logger into file handlers it adds per run (``debug.log``), from
    its own threads too. When such a write fails (a full disk), ``logging`` prints a "--- Logging error ---"
    traceback for every message: hundreds of lines before the real error. This filter sits on the logger, so
    it runs before any handler, W&B's new ones included: it gives each handler a ``handleError`` that keeps
    the first failure (``failure``: file and reason) and prints nothing."""

    def __init__(self):
        super().__init__()
        self.failure: tuple[str, str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        for handler in logging.getLogger("wandb").handlers:
            if "handleError" not in vars(handler):
                handler.handleError = self._quiet(handler)
        return True

    def _quiet(self, handler: logging.Handler) -> Callable[[logging.LogRecord], None]:
        def handle_error(record: logging.LogRecord) -> None:
            if self.failure is None:
                error = sys.exc_info()[1]
                reason = getattr(error, "strerror", None) or f"{type(error).__name__}: {error}"
                self.failure = (getattr(handler, "baseFilename", "its log"), reason)
        return handle_error


_LOG_FILES = QuietLogFiles()
logging.getLogger("wandb").addFilter(_LOG_FILES)


@contextmanager
def _writes(path: str | Path) -> Iterator[None]:
    """What W&B fails to write (its run folder, media files: a full disk) is a WriteError naming the file."""
    try:
        yield
    except OSError as exc:
        raise WriteError(exc.filename or path, exc.strerror or str(exc)) from exc


class Tracker:
    """One W&B run: config, per-step and per-epoch metrics, per-class tables, figures."""

    def __init__(self, cfg: Config, run_dir: str | Path, name: str, group: str | None = None,
                 job_type: str = "train"):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.enabled = cfg.wandb.mode != "disabled"
        self.run_dir = Path(run_dir)
        with _writes(run_dir):
            self.run = wandb.init(
                mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity, dir=str(run_dir),
                # wandb.group / wandb.name, when set, win over the caller's (src.tune: the study and the trial).
                name=cfg.wandb.name or name, group=cfg.wandb.group or group, job_type=job_type,
                config=cfg.model_dump(), reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )

    @property
    def run_path(self) -> str | None:
        """Folder of the offline run (for ``wandb sync``), if any."""
        return str(Path(self.run.dir).parent) if self.enabled else None

    def log(self, metrics: dict, step: int | None = None) -> None:
        with _writes(self.run_dir):
            self.run.log(metrics, step=step)

    def log_per_class(self, key: str, values: dict[str, np.ndarray], step: int | None = None) -> None:
        """A per-class table (one row per class, one column per entry of ``values``) and a bar chart of
        the first column."""
        if not self.enabled:
            return
        columns = list(values)
        rows = [[c] + [float(values[col][c]) for col in columns] for c in range(len(values[columns[0]]))]
        table = wandb.Table(columns=["class"] + columns, data=rows)
        chart = wandb.plot.bar(table, "class", columns[0], title=f"{key}: {columns[0]} per class")
        with _writes(self.run_dir):
            self.run.log({f"{key}/table": table, f"{key}/chart": chart}, step=step)

    def log_images(self, images: dict[str, str | Path], step: int | None = None) -> None:
        """PNG files (plots) under the given keys."""
        if self.enabled:
            with _writes(self.run_dir):
                self.run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def summary(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        """End the run. When W&B could not write its log file, say so once (unless an error is on its way out:
        its own message says what failed)."""
        propagating = sys.exc_info()[1] is not None
        try:
            with _writes(self.run_dir):
                self.run.finish()
        except WriteError:
            if not propagating:  # else the error on its way out is the one to report
                raise
        failure, _LOG_FILES.failure = _LOG_FILES.failure, None
        if failure and not propagating:
            note(f"warning: W&B could not write {failure[0]} ({failure[1]}): its record of this run is incomplete")
