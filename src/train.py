"""Stage 2: train one fold (the other folds train, fold N validates).

    python -m src.train --fold N [--config FILE] [key=value ...]
    bash scripts/train_fold.sh N [key=value ...]

Writes under ``run.dir/fold<N>/``: ``best.pt`` and ``last.pt`` (atomic; full training state),
``oof.csv`` (validation probabilities of the best checkpoint), ``history.csv``, ``config.yaml`` (the
resolved config; also at ``run.dir/config.yaml``) and the offline W&B run. ``train.resume=true``
continues from ``last.pt`` exactly where it stopped, mid-epoch included.

Mixed precision is torch.amp, the successor of NVIDIA Apex's ``amp``: ``torch.autocast`` for bf16/fp16
and one ``torch.amp.GradScaler`` (fp16 only) over all parameters of backbone, modifier and head.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.config import Config, PipelineError, cli_parser, config_from_args, run_cli, save_config, write_atomic
from src.data import EpochSampler, RGBYDataset, build_augment, label_matrix, load_train_table, worker_init
from src.folds import load_folds
from src.label_embedding import LabelEmbedding
from src.losses import build_loss
from src.metrics import best_thresholds, decide, f1_per_class
from src.model import autocast, build_model, infer, param_groups, resolve_device
from src.report import plot_label_map, plot_similarity_heatmap
from src.tracking import Tracker

EMBEDDING_FILE = "label_embedding.npz"
# Validation probabilities of each checkpoint, so predict tunes thresholds on the model it applies them to.
OOF_FILES = {"best": "oof.csv", "last": "oof_last.csv"}


def output_scorer(cfg: Config, fold_dir: Path, embedding: LabelEmbedding | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Raw network outputs -> per-class scores in [0, 1]: the sigmoid, or for ``loss.name=label_embedding``
    cosine similarity to every label vector of the fold's embedding (``embedding``, else the saved one),
    mapped to [0, 1]."""
    if cfg.loss.name == "label_embedding":
        return (embedding or LabelEmbedding.load(fold_dir / EMBEDDING_FILE)).decode
    return expit


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (or the next one, when batches_done == 0)
    step: int = 0  # optimizer steps taken so far
    batches_done: int = 0  # micro-batches of `epoch` already trained on
    best_score: float = -math.inf
    best_epoch: int = -1


def window_sizes(num_samples: int, batch_size: int, accum_steps: int) -> list[int]:
    """For each micro-batch of an epoch, the number of samples in its accumulation window.

    Each micro-batch's mean loss is scaled by ``len(batch) / window_size`` so that K micro-batches give
    the gradient of one batch of their union, including the short last batch and the short last window.
    """
    sizes = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    windows = []
    for first in range(0, len(sizes), accum_steps):
        total = sum(sizes[first : first + accum_steps])
        windows += [total] * len(sizes[first : first + accum_steps])
    return windows


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per optimizer step: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Python, numpy and torch RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(tuple(states["python"][:1]) + (tuple(states["python"][1]),) + tuple(states["python"][2:]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by this module (tensors and plain Python only: weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise PipelineError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from None


class Trainer:
    """Holds the pieces of one fold's training; ``fit`` runs it. Tests drive its parts directly."""

    def __init__(self, cfg: Config, fold: int, progress: bool = True):
        self.cfg, self.fold, self.progress = cfg, fold, progress
        tc = cfg.train
        self.fold_dir = Path(cfg.run.dir) / f"fold{fold}"
        self.device = resolve_device(tc.device)
        seed_everything(tc.seed)

        table = load_train_table(cfg.data)
        folds = load_folds(cfg, table)
        if fold not in set(folds.tolist()):
            raise PipelineError(f"fold {fold} does not exist in {cfg.folds.path} (folds 0..{folds.max()})")
        self.train_table = table[folds != fold].reset_index(drop=True)
        self.val_table = table[folds == fold].reset_index(drop=True)

        self.embedding = None
        if cfg.loss.name == "label_embedding":
            # Fitted on the training folds only: the validation fold's labels stay unseen.
            self.embedding = LabelEmbedding.fit(
                self.train_table["labels"], cfg.data.num_classes, dim=min(cfg.loss.embedding_dim, cfg.data.num_classes),
                positive=cfg.loss.pmi_positive, smoothing=cfg.loss.pmi_smoothing, seed=tc.seed, verbose=progress)
        self.model = build_model(cfg, self.embedding.embedding.shape[1] if self.embedding else None).to(self.device)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = (self.embedding.loss() if self.embedding else build_loss(cfg.loss)).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, tc), lr=tc.lr)
        batches = len(self.train_table) // tc.batch_size
        self.steps_per_epoch = math.ceil(batches / tc.accum_steps)
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, tc.warmup_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.ema = ModelEmaV3(self.model, decay=tc.ema_decay) if tc.ema else None

        augment = build_augment(tc.augment, cfg.data.image_size)
        n_classes = cfg.data.num_classes
        self.train_set = RGBYDataset(self.train_table, n_classes, cfg.data.image_size, augment)
        self.val_set = RGBYDataset(self.val_table, n_classes, cfg.data.image_size)
        self.sampler = EpochSampler(len(self.train_set), tc.seed)
        # Full batches only (drop_last): BatchNorm cannot train on a batch of one sample, and a tiny last
        # batch would give noisy statistics. The permutation changes every epoch, so every sample is used.
        usable = len(self.train_set) - len(self.train_set) % tc.batch_size
        if usable == 0:
            raise PipelineError(f"fold {fold} has {len(self.train_set)} training samples, fewer than "
                                f"train.batch_size={tc.batch_size}")
        self.window_sizes = window_sizes(usable, tc.batch_size, tc.accum_steps)
        self.state = TrainState()
        self.history: list[dict] = []

    # -- data -------------------------------------------------------------------------------------
    def _loader(self, dataset, sampler=None, batch_size=None) -> DataLoader:
        tc = self.cfg.train
        return DataLoader(
            dataset, batch_size=batch_size or tc.batch_size, sampler=sampler, shuffle=False,
            drop_last=sampler is not None,
            num_workers=tc.num_workers, pin_memory=self.device.type == "cuda", worker_init_fn=worker_init,
            # Its own generator: creating an iterator must not draw from the global torch RNG, or a
            # run resumed mid-epoch would see different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(tc.seed),
            persistent_workers=False, prefetch_factor=4 if tc.num_workers else None,
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "state": asdict(self.state),
            "sampler_epoch_state": self.sampler.epoch_state,
            "rng": rng_states(),
            "config": self.cfg.model_dump(),
            "history": self.history,
        }

    def save(self, name: str) -> Path:
        path = self.fold_dir / name
        atomic_save(self.checkpoint(), path)
        return path

    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.state = TrainState(**ckpt["state"])
        self.sampler.epoch_state = ckpt["sampler_epoch_state"]
        self.history = list(ckpt["history"])
        restore_rng_states(ckpt["rng"])

    # -- one epoch --------------------------------------------------------------------------------
    def train_epoch(self, tracker: Tracker | None = None) -> bool:
        """Train the rest of ``state.epoch``; returns False when ``train.stop_after_steps`` stopped it."""
        tc, state = self.cfg.train, self.state
        # Always from the saved epoch-start state: after a resume from an end-of-epoch checkpoint the
        # sampler's generator is freshly seeded, and drawing from it would replay epoch 1's order.
        self.sampler.start_epoch(self.sampler.epoch_state, skip=state.batches_done * tc.batch_size)
        loader = self._loader(self.train_set, self.sampler)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_batches = len(self.window_sizes)
        window_loss = torch.zeros((), device=self.device)
        window_start, window_images = time.perf_counter(), 0
        bar = tqdm(loader, desc=f"fold {self.fold} epoch {state.epoch + 1}/{tc.epochs}",
                   disable=not self.progress, initial=state.batches_done, total=n_batches)
        for batch_index, (images, targets) in enumerate(bar, start=state.batches_done):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            share = len(images) / self.window_sizes[batch_index]
            with autocast(self.device, tc.precision):
                outputs = self.model(images)
            loss = self.loss_fn(outputs.float(), targets) * share  # loss in fp32, scaled to the window
            self.scaler.scale(loss).backward()
            window_loss += loss.detach()
            window_images += len(images)
            if (batch_index + 1) % tc.accum_steps and batch_index + 1 < n_batches:
                continue
            # One optimizer step per window: check, unscale, clip, step, schedule, EMA.
            loss_value = float(window_loss)
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss is {loss_value} at epoch {state.epoch + 1}, step {state.step + 1} (fold {self.fold}); "
                    f"stopped without saving, so {self.fold_dir / 'last.pt'} still holds the last good state. "
                    "Lower train.lr, set train.clip_grad, or use train.precision=bf16/fp32.")
            if tc.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            state.step += 1
            state.batches_done = batch_index + 1
            if self.ema:
                self.ema.update(self.model, step=state.step)
            elapsed = time.perf_counter() - window_start
            lr = self.optimizer.param_groups[-1]["lr"]
            speed = window_images / elapsed if elapsed > 0 else float("nan")
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
            if tracker:
                tracker.log({"train/loss": loss_value, "train/lr": lr, "train/images_per_s": speed,
                             "train/epoch": state.epoch + state.batches_done / n_batches}, step=state.step)
            window_loss = torch.zeros((), device=self.device)
            window_start, window_images = time.perf_counter(), 0
            if tc.stop_after_steps is not None and state.step >= tc.stop_after_steps:
                bar.close()
                self.save("last.pt")
                return False
            # Periodic saves inside the epoch; the epoch's end saves anyway after validation.
            if tc.checkpoint_every_steps and state.step % tc.checkpoint_every_steps == 0 and \
                    batch_index + 1 < n_batches:
                self.save("last.pt")
        bar.close()
        state.epoch += 1
        state.batches_done = 0
        self.sampler.epoch_state = self.sampler.generator.get_state()
        return True

    # -- validation -------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    def validate(self) -> dict:
        """Validation loss, macro-F1 at 0.5 and at per-class best thresholds, per-class F1, probabilities."""
        tc = self.cfg.train
        loader = self._loader(self.val_set, batch_size=tc.batch_size * 2)
        outputs, val_loss = infer(self.eval_model(), loader, self.device, tc.precision, self.loss_fn,
                                  self.cfg.model.channels_last, desc="validating", progress=self.progress)
        probs = output_scorer(self.cfg, self.fold_dir, self.embedding)(outputs)
        truth = label_matrix(self.val_table["labels"], self.cfg.data.num_classes)
        thresholds, tuned_f1 = best_thresholds(truth, probs)
        f1_half = f1_per_class(truth, decide(probs, 0.5))
        return {"val_loss": val_loss, "macro_f1": float(f1_half.mean()), "macro_f1_tuned": float(tuned_f1.mean()),
                "per_class_f1": f1_half, "per_class_f1_tuned": tuned_f1, "thresholds": thresholds,
                "support": truth.sum(axis=0), "probs": probs}

    def write_oof(self, probs: np.ndarray, checkpoint: str) -> Path:
        """Out-of-fold probabilities of this fold from ``checkpoint`` (best or last): Id + one column per class."""
        frame = pd.DataFrame(probs, columns=[str(c) for c in range(probs.shape[1])])
        frame.insert(0, "Id", self.val_table["Id"].values)
        return write_atomic(self.fold_dir / OOF_FILES[checkpoint],
                            lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6f"))

    # -- the whole fold ---------------------------------------------------------------------------
    def fit(self) -> dict:
        tc = self.cfg.train
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        last = self.fold_dir / "last.pt"
        if tc.resume and last.is_file():
            self.resume(last)
            print(f"resumed {last}: epoch {self.state.epoch + 1}, optimizer step {self.state.step}")
        elif tc.resume:
            print(f"train.resume=true but {last} does not exist: starting fresh")
        save_config(self.cfg, self.fold_dir / "config.yaml")
        save_config(self.cfg, Path(self.cfg.run.dir) / "config.yaml")
        tracker = Tracker(self.cfg, self.fold_dir, name=f"{Path(self.cfg.run.dir).name}-fold{self.fold}",
                          group=Path(self.cfg.run.dir).name)
        stopped = False
        try:
            if self.embedding:
                self.embedding.save(self.fold_dir / EMBEDDING_FILE)
                E, support = self.embedding.embedding, self.embedding.support
                tracker.log_images({
                    "label_embedding/similarity": plot_similarity_heatmap(
                        E, self.fold_dir / "label_similarity.png", support=support),
                    "label_embedding/map": plot_label_map(E, self.fold_dir / "label_map.png", support=support)})
            while self.state.epoch < tc.epochs:
                start = time.perf_counter()
                if not self.train_epoch(tracker):
                    stopped = True
                    break
                metrics = self.validate()
                score = -metrics["val_loss"] if tc.monitor == "val_loss" else metrics[tc.monitor]
                improved = score > self.state.best_score
                if improved:
                    self.state.best_score, self.state.best_epoch = score, self.state.epoch
                row = {"epoch": self.state.epoch, "step": self.state.step,
                       "val_loss": metrics["val_loss"], "macro_f1": metrics["macro_f1"],
                       "macro_f1_tuned": metrics["macro_f1_tuned"], "seconds": time.perf_counter() - start,
                       "best": improved}
                self.history.append(row)
                if improved:
                    self.write_oof(metrics["probs"], "best")
                    self.save("best.pt")
                self.write_oof(metrics["probs"], "last")
                self.save("last.pt")
                write_atomic(self.fold_dir / "history.csv",
                             lambda tmp, rows=pd.DataFrame(self.history): rows.to_csv(tmp, index=False))
                tracker.log({f"val/{k}": row[k] for k in ("val_loss", "macro_f1", "macro_f1_tuned")}
                            | {"epoch": self.state.epoch}, step=self.state.step)
                tracker.log_per_class("val/per_class", {"f1@0.5": metrics["per_class_f1"],
                                                        "f1_tuned": metrics["per_class_f1_tuned"],
                                                        "threshold": metrics["thresholds"],
                                                        "support": metrics["support"]}, step=self.state.step)
                if self.progress:
                    print(f"fold {self.fold} epoch {self.state.epoch}: val_loss {row['val_loss']:.4f}  "
                          f"macro-F1@0.5 {row['macro_f1']:.4f}  tuned {row['macro_f1_tuned']:.4f}"
                          + ("  (best)" if improved else ""))
            result = {"fold": self.fold, "stopped_early": stopped, "steps": self.state.step,
                      "best_epoch": self.state.best_epoch, "best_score": self.state.best_score,
                      "monitor": tc.monitor, "run_dir": str(self.fold_dir)}
            if self.history:
                result |= {k: self.history[-1][k] for k in ("val_loss", "macro_f1", "macro_f1_tuned")}
            tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float))})
            result["wandb_run"] = tracker.run_path
        finally:
            tracker.finish()
        if self.progress:
            print_summary(self.history, result)
        return result


def print_summary(history: list[dict], result: dict) -> None:
    """One screen: the epoch table and where everything was written."""
    if history:
        print(pd.DataFrame(history).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"fold {result['fold']}: {result['steps']} optimizer steps; best epoch {result['best_epoch']} "
          f"({result['monitor']} {result['best_score']:.4f})" + ("; stopped early" if result["stopped_early"] else ""))
    print(f"outputs: {result['run_dir']}/{{best.pt,last.pt,oof.csv,history.csv,config.yaml}}")
    if result.get("wandb_run"):
        print(f"W&B offline run: {result['wandb_run']}  (upload with `wandb sync {result['wandb_run']}`)")


def train(cfg: Config, fold: int, progress: bool = True) -> dict:
    """Train fold ``fold`` and return its metrics (best epoch and score, last validation metrics)."""
    return Trainer(cfg, fold, progress).fit()


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, required=True, help="the fold to validate on")
    args = parser.parse_args()
    train(config_from_args(args), args.fold)


if __name__ == "__main__":
    run_cli(main)
