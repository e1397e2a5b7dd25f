"""Learning-rate range test (Leslie Smith's; fastai's ``lr_find``) on fold N's training rows.

    python -m src.lr_find [--fold N] [--steps 100] [--start 1e-7] [--end 10] [--config FILE] [key=value ...]

Runs the real training loop (``Trainer.train_epoch``: the configured loss, accumulation, precision and both
parameter groups) while the learning rate grows exponentially from ``--start`` to ``--end`` over ``--steps``
optimizer steps; the backbone group keeps its ratio to ``train.lr`` (``train.backbone_lr / train.lr``). The
loss of each step is smoothed (bias-corrected EMA, as fastai does) and the test stops once it exceeds 4x its
best. Suggests ``train.lr`` at a tenth of the loss minimum (the steepest descent is shown too) and the matching
``train.backbone_lr``. Writes ``run.dir/lr_find/`` (``lr_find.csv``, ``lr_find.png``), logs to W&B, and never
writes a checkpoint: the run folder's training state is left alone.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, override
from src.files import Staging
from src.model import backbone_lr
from src.progress import bar as progress_bar
from src.report import plot_lr_find
from src.run_folder import RunFolder
from src.tracking import Tracker
from src.train import LoopHooks, Trainer, TrainingDiverged, build_parts

SMOOTHING = 0.98
DIVERGED_FACTOR = 4.0


class RangeRecorder(LoopHooks):
    """Hears every optimizer step of ``Trainer.train_epoch``: records its loss against the learning rates that
    step used, logs it to ``tracker``, shows it on a bar of the test's steps (the loop's own bar would count
    epochs of a 1-epoch config), and stops the loop when the test is over (enough steps, or the loss diverged)."""

    def __init__(self, lr_at, steps: int, tracker: Tracker | None = None, progress: bool = False):
        self.lr_at, self.steps, self.tracker = lr_at, steps, tracker
        self.rows: list[dict] = []
        self._average, self._best = 0.0, math.inf
        self.bar = progress_bar(total=steps, desc="lr_find range test", unit="step", disable=not progress)

    def on_step(self, step: int, metrics: dict) -> bool:
        index = len(self.rows)
        loss = metrics["train/loss"]
        self._average = SMOOTHING * self._average + (1 - SMOOTHING) * loss
        smoothed = self._average / (1 - SMOOTHING ** (index + 1))
        head_lr, backbone_lr = self.lr_at(index)
        self.rows.append({"step": index + 1, "lr": head_lr, "backbone_lr": backbone_lr, "loss": loss,
                          "smoothed_loss": smoothed})
        if self.tracker:
            self.tracker.log({"lr_find/lr": head_lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smoothed},
                             step=index + 1)
        self._best = min(self._best, smoothed)
        self.bar.set_postfix(lr=f"{head_lr:.2e}", loss=f"{smoothed:.4f}", refresh=False)
        self.bar.update(1)
        return index + 1 >= self.steps or not math.isfinite(smoothed) or smoothed > DIVERGED_FACTOR * self._best


@dataclass
class Suggestion:
    lr: float  # a tenth of the learning rate at the smoothed loss minimum
    backbone_lr: float | None
    steepest_lr: float  # where the smoothed loss falls fastest (before its minimum)
    min_loss_lr: float


def suggest(table: pd.DataFrame, backbone_ratio: float | None) -> Suggestion:
    """Learning rates from a range-test table (``lr``, ``smoothed_loss``)."""
    finite = table[np.isfinite(table["smoothed_loss"])]
    if len(finite) < 3:
        raise PipelineError(f"the range test recorded {len(finite)} finite loss(es): too few to suggest a "
                            "learning rate; lower --start or raise --steps")
    lrs, losses = finite["lr"].to_numpy(), finite["smoothed_loss"].to_numpy()
    at_min = int(np.argmin(losses))
    slope = np.gradient(losses, np.log(lrs))
    steepest = int(np.argmin(slope[: max(at_min, 1) + 1]))
    lr = float(lrs[at_min]) / 10
    return Suggestion(lr=lr, backbone_lr=None if backbone_ratio is None else lr * backbone_ratio,
                      steepest_lr=float(lrs[steepest]), min_loss_lr=float(lrs[at_min]))


def lr_find(cfg: Config, fold: int = 0, steps: int = 100, start: float = 1e-7, end: float = 10.0,
            progress: bool = True) -> tuple[pd.DataFrame, Suggestion, Path]:
    """Run the range test; returns the per-step table, the suggestion and the output folder."""
    if not 0 < start < end:
        raise PipelineError(f"lr_find: need 0 < start < end, got start={start}, end={end}")
    if steps < 3:
        raise PipelineError(f"lr_find: --steps must be at least 3, got {steps}")
    tc = cfg.train
    # Only the loop is wanted: no EMA, no checkpoints of any kind.
    cfg = override(cfg, **{"train.ema": False, "train.stop_after_steps": None, "train.checkpoint_every_steps": 0,
                           "train.resume": False})
    own = backbone_lr(cfg)  # None: the backbone trains at train.lr
    ratio = None if own is None else own / tc.lr
    growth = (end / start) ** (1 / (steps - 1))
    parts = build_parts(cfg, fold, progress)
    # LambdaLR scales each group's configured lr: the head group runs at start * growth^t, the backbone keeps
    # its ratio.
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(
        parts.optimizer, lambda t: start * growth ** min(t, steps - 1) / tc.lr)

    def lr_at(index: int) -> tuple[float, float]:
        head = start * growth ** min(index, steps - 1)
        return head, head * (1.0 if ratio is None else ratio)

    out_dir = RunFolder(cfg.run.dir).lr_find
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg, out_dir, name=f"{Path(cfg.run.dir).name}-lr_find-fold{fold}",
                      group=Path(cfg.run.dir).name, job_type="lr_find")
    try:
        recorder = RangeRecorder(lr_at, steps, tracker, progress)
        trainer = Trainer(parts, progress=False)  # the recorder's bar counts the test's steps
        try:  # as many epochs as the steps need (a small data set has few steps per epoch)
            while trainer.train_epoch(trainer.epoch_batches(), hooks=recorder):
                pass
        except TrainingDiverged:
            pass
        finally:
            recorder.bar.close()
        table = pd.DataFrame(recorder.rows)
        suggestion = suggest(table, ratio)
        with Staging() as staging:  # the table and its plot appear together, each whole
            staging.file(out_dir / "lr_find.csv", lambda tmp: table.to_csv(tmp, index=False))
            plot = staging.file(out_dir / "lr_find.png", lambda tmp: plot_lr_find(
                table, suggestion.lr, suggestion.steepest_lr, ratio, tmp))
            staging.commit()
        tracker.log_images({"lr_find/plot": plot})
        tracker.summary({"lr_find/suggested_lr": suggestion.lr, "lr_find/steepest_lr": suggestion.steepest_lr})
    finally:
        tracker.finish()
    if progress:
        backbone = "" if suggestion.backbone_lr is None else f" train.backbone_lr={suggestion.backbone_lr:.2g}"
        print(f"{len(table)} steps, lr {table['lr'].iloc[0]:.2g} -> {table['lr'].iloc[-1]:.2g}; smoothed loss "
              f"lowest at lr {suggestion.min_loss_lr:.2g}, falling fastest at {suggestion.steepest_lr:.2g}")
        print(f"suggested: train.lr={suggestion.lr:.2g}{backbone}   (plot: {plot})")
    return table, suggestion, out_dir


def main(argv: list[str] | None = None) -> None:
    parser: argparse.ArgumentParser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, default=0, help="fold whose training rows are used (default 0)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the test (default 100)")
    parser.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    parser.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    args = parser.parse_args(argv)
    lr_find(config_from_args(args), args.fold, args.steps, args.start, args.end)


if __name__ == "__main__":
    run_cli(main)
