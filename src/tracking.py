"""Experiment tracking: the only module that talks to Weights & Biases.

``wandb.mode`` is ``offline`` by default: runs are written under the run folder with no network or
account, and ``wandb sync <run.dir>/<fold>/wandb/offline-run-*`` uploads them later. ``disabled`` turns
tracking off (the tests), ``online`` logs live (needs ``wandb login``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import wandb

from src.config import Config


class Tracker:
    """One W&B run: config, per-step and per-epoch metrics, per-class tables, figures."""

    def __init__(self, cfg: Config, run_dir: str | Path, name: str, group: str | None = None,
                 job_type: str = "train"):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.enabled = cfg.wandb.mode != "disabled"
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
        self.run.log({f"{key}/table": table, f"{key}/chart": chart}, step=step)

    def log_images(self, images: dict[str, str | Path], step: int | None = None) -> None:
        """PNG files (plots) under the given keys."""
        if self.enabled:
            self.run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def summary(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()
