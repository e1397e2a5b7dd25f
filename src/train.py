"""Stage 2: train one fold (the other folds train, fold N validates).

    python -m src.train --fold N [--config FILE] [key=value ...]
    bash scripts/train_fold.sh N [key=value ...]

Writes under ``run.dir/fold<N>/``: ``best.pt`` and ``last.pt`` (atomic; full training state),
``oof.csv`` (validation probabilities of the best checkpoint), ``history.csv``, ``config.yaml`` (the
resolved config; also at ``run.dir/config.yaml``) and the offline W&B run. ``train.resume=true``
continues from ``last.pt`` exactly where it stopped, mid-epoch included; without it a fold folder that holds
checkpoints is refused (``train.overwrite=true`` trains that fold again from scratch).

Mixed precision is torch.amp, the successor of NVIDIA Apex's ``amp``: ``torch.autocast`` for bf16/fp16
and one ``torch.amp.GradScaler`` (fp16 only) over all parameters of backbone, modifier and head. The precision
is the device's (``train.precision=auto``: :func:`src.model.resolve_precision`), printed at the start and saved
at the top of the fold's ``config.yaml``, whose ``train.precision`` is the one the run used.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import logit
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset

from src.augment import BatchAugment, BatchMix, build_cpu_policy
from src.checkpoint import (
    NonFiniteWeights,
    capture_checkpoint,
    epoch_weights,
    gather_rng_states,
    load_checkpoint,
    require_finite,
    restore_checkpoint,
    save_checkpoint,
    save_weights,
)
from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, override
from src.data import Vocabulary, label_csr
from src.dataset import EpochSampler, RGBYDataset, make_loader, rarity_weights
from src.files import Staging, ensure_writable, link_or_copy
from src.folds import load_folds, require_fold
from src.formats import load_training_data
from src.label_embedding import LabelEmbedding
from src.losses import build_loss, loss_kind, output_scorer
from src.metrics import (
    best_thresholds,
    count_labels,
    decide,
    decision_counts,
    fbeta_from_counts,
    metric_curve,
    nonfinite_rows,
)
from src.model import (
    Precision,
    autocast,
    build_model,
    check_backbone,
    effective_precision,
    infer,
    param_groups,
    resolve_device,
    resolve_precision,
)
from src.pack import open_packed
from src.progress import bar as progress_bar
from src.progress import note
from src.report import plot_label_map, plot_similarity_heatmap
from src.run_folder import FOLD_FILES, LOCK_FILE, RunFolder, write_history
from src.score_table import ScoreSink, copy_scores, write_scores
from src.thresholds import GLOBAL_GRID
from src.tracking import Tracker


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
    eval_weights: str = "raw"  # which weights the last validation chose: "raw" or "ema"


class LoopHooks:
    """What a caller (lr_find, the tuner) hears from the loop; the default hears nothing.

    Under DDP every rank calls them with the same arguments; their answers must agree across ranks."""

    def on_step(self, step: int, metrics: dict) -> bool:
        """After each optimizer step (``step``: steps so far); ``metrics`` holds ``train/loss``, ``train/lr``,
        ``train/images_per_s`` and ``train/epoch``. True stops the loop now."""
        return False

    def on_epoch(self, epoch: int, row: dict) -> bool:
        """After each epoch's validation and checkpoint (``epoch``: 1-based); ``row`` is its history row. True
        stops the run after this epoch (pruned): the run ends as a finished one does."""
        return False


NO_HOOKS = LoopHooks()


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


@dataclass(frozen=True)
class Dist:
    """This process's place in a torch.distributed run (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK); one
    process is rank 0 of 1. Only the training loop talks to torch.distributed, through this."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def all_gather(self, value):
        """``value`` of every rank, in rank order (just ``[value]`` in one process)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (itself in one process)."""
        if self.world_size > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
            tensor /= self.world_size
        return tensor


SINGLE = Dist()


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); one process needs none."""
    dist = Dist.from_env()
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return dist


@dataclass
class FoldParts:
    """Everything one fold's training works on; :func:`build_parts` makes it from (cfg, fold). Tests and
    benchmarks build it, swap what they study (an optimizer, a loss) and drive :class:`Trainer` with it."""

    cfg: Config
    fold: int
    device: torch.device
    vocabulary: Vocabulary
    train_table: pd.DataFrame
    val_table: pd.DataFrame
    embedding: LabelEmbedding | None
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    train_set: RGBYDataset
    val_set: RGBYDataset
    sampler: EpochSampler
    steps_per_epoch: int
    dist: Dist = SINGLE
    # What the loop calls: the model itself, or its DistributedDataParallel wrapper (all-reduces gradients).
    forward: nn.Module | None = None
    # train.augment.where=device: the policy applied to each training batch on the device (batches then carry
    # their samples' seeds); None when the DataLoader workers augment.
    batch_augment: BatchAugment | None = None
    # train.augment.mix: mixup/cutmix of each training batch on the device, after the policy; None when off.
    batch_mix: BatchMix | None = None
    # The precision the run uses and why (cfg.train.precision already holds its name).
    precision: Precision | None = None

    def __post_init__(self) -> None:
        if self.forward is None:  # (not `or`: a compiled module has no truth value)
            self.forward = self.model


def resolve_accumulation(cfg: Config, dist: Dist) -> Config:
    """``cfg`` with ``train.accum_steps`` derived from ``train.global_batch`` when that is set."""
    tc = cfg.train
    if tc.global_batch is None:
        return cfg
    accum = max(1, round(tc.global_batch / (tc.batch_size * dist.world_size)))
    if accum * tc.batch_size * dist.world_size != tc.global_batch and dist.main:
        note(f"note: train.global_batch={tc.global_batch} is not a multiple of batch {tc.batch_size} x "
             f"{dist.world_size} process(es): {accum * tc.batch_size * dist.world_size} images per step")
    return override(cfg, **{"train.accum_steps": accum})


# Fewer optimizer steps than this in a whole run: warned about (the rest of the schedule is relative, so the
# number of updates is what a dataset-size change silently breaks).
FEW_STEPS = 100
# Per-class validation tables go to W&B each epoch up to this many classes (as predict's report does).
PER_CLASS_LOG_MAX = 50


def build_parts(cfg: Config, fold: int, progress: bool = True, dist: Dist = SINGLE) -> FoldParts:
    """Data split, precision (resolved for the device), label embedding, model, loss, optimizer, schedule, scaler,
    EMA and datasets of one fold.
    Under torch.distributed (``dist``): DDP over the whole network, the sampler sharded by rank, the model
    placed on this rank's GPU."""
    cfg = resolve_accumulation(cfg, dist)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    # The precision resolved once, for this device: the run's config says what it used (auto -> bf16/fp16/fp32),
    # and the loop, validation, checkpoints and resume see that name.
    precision = resolve_precision(device, cfg.train.precision)
    if dist.main and (progress or precision.overridden):
        note(f"{'warning' if precision.overridden else 'note'}: {precision.describe()}")
    cfg = override(cfg, **{"train.precision": precision.name})
    tc = cfg.train
    seed_everything(tc.seed)  # before the model: initial weights follow the seed, the same on every rank
    cfg, table, vocabulary = load_training_data(cfg)  # openimages/csv: data.num_classes from the vocabulary
    folds = load_folds(cfg, table)
    if fold not in set(folds.tolist()):
        raise PipelineError(f"fold {fold} does not exist in {cfg.folds.path} (folds 0..{folds.max()})")
    train_table = table[folds != fold].reset_index(drop=True)
    val_table = table[folds == fold].reset_index(drop=True)
    # Full batches only (drop_last): BatchNorm cannot train on a batch of one sample, and a tiny last
    # batch would give noisy statistics. The permutation changes every epoch, so every sample is used.
    batches = math.ceil(len(train_table) / dist.world_size) // tc.batch_size  # per rank, full batches
    if batches == 0:
        raise PipelineError(f"fold {fold} has {len(train_table)} training samples, fewer than "
                            f"train.batch_size={tc.batch_size}")

    # What the loss fits before the network exists (label_embedding: its label vectors), on the training folds
    # only: the validation fold's labels stay unseen.
    kind = loss_kind(cfg.loss.name)
    embedding = kind.fit(cfg, train_table["labels"], progress)
    model = build_model(cfg, kind.out_dim(embedding)).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pretrained = cfg.model.pretrained is not False
    if progress and not pretrained and tc.backbone_lr is not None and tc.backbone_lr != tc.lr:
        note(f"note: model.pretrained=false: the backbone trains at train.lr={tc.lr:g} (train.backbone_lr="
             f"{tc.backbone_lr:g} is for fine-tuning pretrained weights)")
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=tc.lr)
    steps_per_epoch = math.ceil(batches / tc.accum_steps)
    total_steps = tc.epochs * steps_per_epoch
    if progress and dist.main and total_steps < FEW_STEPS:
        # A config made for a large set (global batch 64, 30 epochs) gives a small one a few dozen updates.
        note(f"warning: {total_steps} optimizer steps in all ({tc.epochs} epochs x {steps_per_epoch} steps of "
             f"{tc.batch_size * tc.accum_steps * dist.world_size} images): too few for most networks to learn"
             f"{' from scratch' if not pretrained else ''}; lower train.global_batch (or train.accum_steps) or "
             "raise train.epochs")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, round(tc.warmup_fraction * total_steps)))
    n_classes, size = cfg.data.num_classes, cfg.data.image_size
    on_device = tc.augment.where == "device"
    mixing = tc.augment.mix != "none"  # mixing draws from the batch's sample seeds: the batches carry them
    loss_fn = build_loss(cfg.loss, embedding).to(device)
    ema = (ModelEmaV3(model, decay=ema_decay(tc.ema_horizon, total_steps), use_warmup=True, warmup_power=1.0)
           if tc.ema else None)
    forward = model
    if dist.world_size > 1:
        if tc.sync_batchnorm and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
        torch.manual_seed(tc.seed + dist.rank)  # dropout masks differ across ranks; the weights do not
    if cfg.model.compile:
        # The training step only (DDP included: compiled after wrapping); p.model stays the plain module that
        # checkpoints, EMA and validation use.
        forward = torch.compile(forward)
    if device.type == "cuda":
        # Every training batch has one shape (data.image_size, full batches): cuDNN's autotuned kernels are
        # chosen once and reused. (Resume is not bit-exact on GPUs in any case.)
        torch.backends.cudnn.benchmark = True
    return FoldParts(
        cfg=cfg, fold=fold, device=device, vocabulary=vocabulary, train_table=train_table, val_table=val_table,
        embedding=embedding,
        model=model, loss_fn=loss_fn,
        optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=precision.name == "fp16"),
        # EMA warm-up with power 1: decay t / (t + 1), a plain mean of every step so far, until its time
        # constant reaches the horizon; from then on a fixed-horizon EMA. Both scale with the schedule.
        ema=ema,
        train_set=RGBYDataset(train_table, n_classes, size, None if on_device else build_cpu_policy(tc.augment),
                              open_packed(cfg.data, train_table), channels=cfg.model.in_chans,
                              with_seeds=on_device or mixing),
        val_set=RGBYDataset(val_table, n_classes, size, packed=open_packed(cfg.data, val_table),
                            channels=cfg.model.in_chans),
        sampler=EpochSampler(len(train_table), tc.seed, dist.rank, dist.world_size, weights=rarity_weights(
            train_table["labels"], n_classes, tc.sampler_power) if tc.sampler == "rare" else None),
        steps_per_epoch=steps_per_epoch, dist=dist, forward=forward,
        batch_augment=BatchAugment(tc.augment) if on_device else None, precision=precision,
        batch_mix=BatchMix(tc.augment, lambda targets: kind.mix_targets(loss_fn, targets)) if mixing else None,
    )


def ema_decay(horizon: float, total_steps: int) -> float:
    """EMA decay whose time constant is ``horizon`` of the run: 1 - 1 / (horizon * total_steps)."""
    return 1.0 - 1.0 / max(1.0, horizon * total_steps)


def prior_metrics(parts: FoldParts) -> dict:
    """Validation loss and tuned macro-F1 of the prior predictor: every image gets each class at its
    training rate (for a label embedding: the mean training target). A model that does not beat it has
    learned nothing from the images.

    Sparse labels and validation-sized batches: no n x m matrix (350 k x 7 178 would be 20 GB), and the loss is
    averaged over batches as validation averages the model's (a soft-F1 loss depends on the batch)."""

    m, tc = parts.cfg.data.num_classes, parts.cfg.train
    rate = np.asarray(label_csr(parts.train_table["labels"], m, np.float32).mean(axis=0)).ravel()
    truth = label_csr(parts.val_table["labels"], m)
    n = truth.shape[0]
    if parts.embedding is not None:
        outputs = parts.embedding.targets(parts.train_table["labels"]).mean(axis=0)
    else:
        outputs = logit(np.clip(rate, 1e-4, 1 - 1e-4))
    row = torch.tensor(np.asarray(outputs), dtype=torch.float32, device=parts.device)[None]
    batch, loss_sum = tc.batch_size * 2, 0.0
    with torch.no_grad():
        for start in range(0, n, batch):
            target = torch.tensor(truth[start : start + batch].toarray(), dtype=torch.float32, device=parts.device)
            loss_sum += float(parts.loss_fn(row.expand(len(target), -1), target)) * len(target)
    # Constant scores per class: the tuned threshold predicts either every image (tp = positives, n predicted)
    # or none (F1 = 0), so the tuned macro-F1 has a closed form.
    positives = np.bincount(truth.indices, minlength=m)
    tuned_f1 = fbeta_from_counts(positives, positives, n, 1.0, 0.0)
    return {"val_loss": loss_sum / n, "macro_f1_tuned": float(tuned_f1.mean())}


@dataclass
class SessionTiming:
    """What this session's work took (seconds), for ``train.time_limit``: each optimizer-step window, the slowest
    checkpoint save and the slowest epoch end (validation, scores, checkpoint)."""

    windows: list[float] = field(default_factory=list)
    save: float = 0.0
    epoch_end: float = 0.0

    def until_next_stop(self, ends_epoch: bool, val_windows: float, saves_now: bool = False) -> float:
        """The time before the run can next stop, and the save of that stop, from what was measured: the next
        window (the median window: the first ones carry warm-up), after the save due now if one is
        (``saves_now``: train.checkpoint_every_steps); when that window ends the epoch, also the epoch end and the
        next epoch's first window. Not yet measured: a save as long as a window, and an epoch end as
        ``val_windows`` windows (validation images / images per window: forward and backward per image, an
        upper bound for validation's forward) plus a save."""
        window = statistics.median(self.windows) if self.windows else 0.0
        save = self.save or window
        need = window + save * (2 if saves_now else 1)
        if ends_epoch:
            need += (self.epoch_end or val_windows * window + save) + window
        return need


def accumulation_windows(batches: Iterable, accum_steps: int) -> Iterator[list]:
    """The batches in lists of ``accum_steps`` (the last list may be shorter): one list per optimizer
    step. Holding a window's batches before its first backward gives each micro-batch its exact share of
    the window, whatever the batch sizes."""
    iterator = iter(batches)
    while window := list(itertools.islice(iterator, accum_steps)):
        yield window


class Trainer:
    """Runs one fold's training on its :class:`FoldParts`: epochs, validation, checkpoints, resume."""

    def __init__(self, parts: FoldParts, progress: bool = True):
        self.parts, self.cfg, self.fold, self.dist = parts, parts.cfg, parts.fold, parts.dist
        self.progress = progress and self.dist.main  # one progress bar and one log, from rank 0
        self.folder = RunFolder(self.cfg.run.dir)
        self.state = TrainState()
        self.history: list[dict] = []
        self.prior = prior_metrics(parts)
        self.saved_step: int | None = None  # optimizer step of the last checkpoint this run wrote or resumed
        self.in_epoch = False  # inside train_epoch's batches (state.epoch is the epoch in progress, 0-based)
        self._loaders: dict[str, tuple[object, DataLoader]] = {}  # kept across epochs: see kept_loader
        # train.time_limit: when this session must be done (time.monotonic()), and what its work took so far.
        self.deadline: float | None = None
        self.timing = SessionTiming()
        self.out_of_time = False  # the run stopped to keep within train.time_limit

    # -- checkpoints (what they hold: src.checkpoint) ---------------------------------------------
    def checkpoint(self, rng_ranks: list[dict] | None = None) -> dict:
        """This run's training state as a checkpoint would hold it now."""
        return capture_checkpoint(self.parts, self.state, self.history, rng_ranks)

    def save(self, staging: Staging | None = None) -> Path:
        """The full training state to last.pt, only ever from finite weights (with ``staging``: renamed into
        place on its commit)."""
        path = self.folder.checkpoint(self.fold, "last")
        # The RNG gather is a collective: every rank joins it before any can stop.
        rng_ranks = gather_rng_states(self.dist) if self.dist.world_size > 1 else None
        started = time.perf_counter()
        try:  # every rank checks the weights (they are equal), so all stop together; rank 0 alone writes
            if self.dist.main:
                save_checkpoint(self.parts, self.state, self.history, path, rng_ranks, staging)
            else:
                require_finite(self.parts)
        except NonFiniteWeights as bad:
            raise self.diverged(str(bad)) from None
        self.saved_step = self.state.step
        self.timing.save = max(self.timing.save, time.perf_counter() - started)
        return path

    def diverged(self, what: str) -> TrainingDiverged:
        """The error that stops a diverged run, saying truly which file holds the last good state."""
        state, last = self.state, self.folder.checkpoint(self.fold, "last")
        where = (f"{last} holds the last good state (optimizer step {self.saved_step})" if self.saved_step is not None
                 else "no checkpoint of this run was written")
        # The precision the run really used (bf16 on a CPU without bf16 kernels ran in fp32: no fp32 hint).
        precision = effective_precision(self.parts.device, self.cfg.train.precision)
        hint = {"fp16": ", or use train.precision=bf16/fp32", "bf16": ", or try train.precision=fp32"}.get(
            precision, "")
        # Once an epoch's batches are done state.epoch counts it: its validation and save belong to that epoch.
        epoch = state.epoch + 1 if self.in_epoch else state.epoch
        when = f"at epoch {epoch}" if epoch else "before the first epoch"
        return TrainingDiverged(f"{what} {when}, step {state.step} (fold {self.fold}); stopped "
                                f"without saving: {where}. Lower train.lr (python -m src.lr_find), set "
                                f"train.clip_grad{hint}.")

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: parts, RNGs, loop state and history."""
        state, self.history = restore_checkpoint(self.parts, load_checkpoint(path), path)
        self.state = TrainState(**state)
        self.saved_step = self.state.step

    # -- one epoch --------------------------------------------------------------------------------
    def epoch_batches(self) -> DataLoader:
        """The training batches of the rest of ``state.epoch``, in the order an uninterrupted run sees them."""
        p, tc = self.parts, self.cfg.train
        # Always from the saved epoch-start state: after a resume from an end-of-epoch checkpoint the
        # sampler's generator is freshly seeded, and drawing from it would replay epoch 1's order.
        p.sampler.start_epoch(p.sampler.epoch_state, skip=self.state.batches_done * tc.batch_size)
        return self.kept_loader("train", (p.train_set, p.sampler), lambda: make_loader(
            p.train_set, tc.batch_size, tc.num_workers, tc.seed, p.device, sampler=p.sampler, persistent=True))

    def kept_loader(self, name: str, sources: tuple, make: Callable[[], DataLoader]) -> DataLoader:
        """The loader ``make()`` builds over ``sources`` (its dataset, and sampler), built once and iterated
        every epoch: its workers persist, instead of a process start per worker per epoch. Rebuilt when
        ``parts`` hold other objects (a test or benchmark swapped the dataset)."""
        kept = self._loaders.get(name)
        if kept is None or any(old is not new for old, new in zip(kept[0], sources)):
            self._loaders[name] = kept = (sources, make())
        return kept[1]

    def train_epoch(self, batches: Iterable, tracker: Tracker | None = None, hooks: LoopHooks | None = None) -> bool:
        """Train on ``batches`` (the rest of ``state.epoch``: :meth:`epoch_batches`, or any sized iterable of
        uint8 image and target batches, with their sample seeds third under ``train.augment.where=device``), one
        optimizer step per accumulation window. Returns False when the run stops inside the epoch
        (``train.stop_after_steps`` reached, or ``hooks.on_step`` said so). A stop writes nothing: where the run
        stopped is the caller's to keep (:meth:`fit` saves last.pt); the only checkpoint written here is
        ``train.checkpoint_every_steps``'s."""
        p, tc, state, hooks = self.parts, self.cfg.train, self.state, hooks or NO_HOOKS
        p.model.train()
        p.optimizer.zero_grad(set_to_none=True)
        n_batches = state.batches_done + len(batches)
        self.in_epoch = True
        bar = progress_bar(total=n_batches, initial=state.batches_done, disable=not self.progress,
                           desc=f"fold {self.fold} epoch {state.epoch + 1}/{tc.epochs}")
        try:
            window_start = time.perf_counter()
            for window in accumulation_windows(batches, tc.accum_steps):
                window_loss, window_images = self.backward_window(window, bar)
                loss_value = self.optimizer_step(window_loss, len(window))
                elapsed = time.perf_counter() - window_start
                self.timing.windows.append(elapsed)
                metrics = {"train/loss": loss_value, "train/lr": p.optimizer.param_groups[-1]["lr"],
                           "train/images_per_s": window_images / elapsed if elapsed > 0 else float("nan"),
                           "train/epoch": state.epoch + state.batches_done / n_batches}
                if self.after_step(metrics, bar, tracker, hooks) or self.time_is_up(n_batches):
                    return False
                window_start = time.perf_counter()
                if self.checkpoint_due(n_batches):
                    self.save()
        finally:
            bar.close()
        self.finish_epoch()
        return True

    def backward_window(self, window: list, bar) -> tuple[torch.Tensor, int]:
        """Forward and backward of one accumulation window's micro-batches, each loss weighted by its batch's
        share of the window's samples (a short last window included); returns the window's loss and images."""
        p, tc = self.parts, self.cfg.train
        window_images = sum(len(batch[0]) for batch in window)
        window_loss = torch.zeros((), device=p.device)
        for micro, (images, targets, *seeds) in enumerate(window, start=1):
            images = images.to(p.device, non_blocking=True)
            targets = targets.to(p.device, non_blocking=True)
            if (p.batch_augment is not None or p.batch_mix is not None) and not seeds:
                raise PipelineError("train.augment.where=device or train.augment.mix: the training batches carry "
                                    "no sample seeds (expected (images, targets, seeds) batches)")
            if p.batch_augment is not None:
                images = p.batch_augment(images, seeds[0])
            if p.batch_mix is not None:
                images, targets = p.batch_mix(images, targets, seeds[0])
            if self.cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            # Under DDP, gradients are all-reduced once per window: on its last micro-batch.
            sync = micro == len(window) or not hasattr(p.forward, "no_sync")
            with nullcontext() if sync else p.forward.no_sync():
                with autocast(p.device, tc.precision):
                    outputs = p.forward(images)
                # Loss in fp32, each micro-batch weighted by its share of the window's samples.
                loss = p.loss_fn(outputs.float(), targets) * (len(images) / window_images)
                p.scaler.scale(loss).backward()
            window_loss += loss.detach()
            bar.update(1)
        return window_loss, window_images

    def optimizer_step(self, window_loss: torch.Tensor, micro_batches: int) -> float:
        """The step that ends an accumulation window of ``micro_batches``: check the loss, unscale, clip, step,
        schedule, EMA; returns the window's loss (its mean over ranks: the same on every rank, so all stop
        together on a non-finite one)."""
        p, tc, state = self.parts, self.cfg.train, self.state
        loss_value = float(self.dist.mean(window_loss))
        if not math.isfinite(loss_value):
            raise self.diverged(f"the training loss is {loss_value}")
        if tc.clip_grad:
            p.scaler.unscale_(p.optimizer)
            nn.utils.clip_grad_norm_(p.model.parameters(), tc.clip_grad)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        p.scheduler.step()
        state.step += 1
        state.batches_done += micro_batches
        if p.ema is not None:
            p.ema.update(p.model, step=state.step)
        return loss_value

    def after_step(self, metrics: dict, bar, tracker: Tracker | None, hooks: LoopHooks) -> bool:
        """Tell the bar, the tracker and the hooks about the optimizer step just taken; True when the run stops
        here (a hook said so, or ``train.stop_after_steps`` is reached)."""
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}",
                        img_s=f"{metrics['train/images_per_s']:.1f}")
        if tracker is not None:
            tracker.log(metrics, step=self.state.step)
        return hooks.on_step(self.state.step, metrics) or self.step_limit_reached()

    def step_limit_reached(self) -> bool:
        """Whether ``train.stop_after_steps`` optimizer steps are done."""
        limit = self.cfg.train.stop_after_steps
        return limit is not None and self.state.step >= limit

    def time_is_up(self, n_batches: int) -> bool:
        """Whether the run stops now to keep within ``train.time_limit``: when the work before the next chance to
        stop (:meth:`SessionTiming.until_next_stop`) and the save of that stop would end past the deadline. Never
        on the step that ends an epoch (its validation comes first), decided on rank 0 for every rank."""
        remaining = n_batches - self.state.batches_done
        if self.deadline is None or remaining == 0:
            return False
        ends_epoch = remaining <= self.cfg.train.accum_steps
        need = self.timing.until_next_stop(ends_epoch, len(self.parts.val_set) / (
            self.cfg.train.batch_size * self.cfg.train.accum_steps * self.dist.world_size),
            saves_now=self.checkpoint_due(n_batches))
        self.out_of_time = bool(self.dist.all_gather(time.monotonic() + need > self.deadline)[0])
        return self.out_of_time

    def checkpoint_due(self, n_batches: int) -> bool:
        """Whether ``train.checkpoint_every_steps`` saves last.pt now: on its steps inside the epoch (the epoch's
        end saves anyway, after validation; ``n_batches``: the epoch's micro-batches)."""
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and self.state.step % every == 0 and self.state.batches_done < n_batches

    def finish_epoch(self) -> None:
        """The epoch's batches are done: it counts, and the sampler's next epoch starts from here."""
        self.state.epoch += 1
        self.state.batches_done = 0
        self.in_epoch = False
        self.parts.sampler.epoch_state = self.parts.sampler.generator.get_state()

    # -- validation -------------------------------------------------------------------------------
    def candidates(self) -> dict[str, nn.Module]:
        """The weights validation scores: the raw model, and its EMA when training keeps one."""
        p = self.parts
        return {"ema": p.ema.module, "raw": p.model} if p.ema is not None else {"raw": p.model}

    def validate(self, model: nn.Module | None = None) -> dict:
        """Validation loss, macro-F1 at 0.5 and at per-class best thresholds, per-class F1, probabilities
        of ``model`` (default: the weights the last validation chose).

        In one process the probabilities go into a score sink as they are made: for thousands of classes a
        temporary float16 table in the fold folder (src.score_table.ScoreSink; what oof.npz stores), read back a
        block of rows at a time by the metrics, so 340 k x 7 178 validation rows never sit in memory (9.8 GB in
        float32); the truth is a sparse matrix. Under torch.distributed each rank's shard is gathered in memory."""
        p, tc, dist = self.parts, self.cfg.train, self.dist
        if model is None:  # (not `or`: a module's truth is its length, and an empty container's is False)
            model = self.candidates().get(self.state.eval_weights, p.model)
        # Each rank scores every world_size-th validation row; the rows are gathered back in order, each
        # exactly once, so every rank computes the same metrics and takes the same best-checkpoint decision.
        shard = list(range(dist.rank, len(p.val_set), dist.world_size))
        loader = self.kept_loader("validation", (p.val_set,), lambda: make_loader(
            Subset(p.val_set, shard), tc.batch_size * 2, tc.num_workers, tc.seed, p.device, persistent=True))
        sink = ScoreSink(p.val_table["Id"], self.cfg.data.num_classes, self.folder.fold(self.fold),
                         in_memory=dist.world_size > 1)
        try:
            _, shard_loss = infer(model, loader, p.device, precision=tc.precision,
                                  channels_last=self.cfg.model.channels_last,
                                  to_scores=output_scorer(self.cfg.loss, p.embedding), loss_fn=p.loss_fn,
                                  desc="validating", progress=self.progress, into=sink.append)
        except BaseException:
            sink.abort()
            raise
        shard_probs = sink.finish()
        gathered = dist.all_gather((shard_probs, (shard_loss or 0.0) * len(shard)))
        probs = shard_probs
        if dist.world_size > 1:
            probs = np.empty((len(p.val_set), shard_probs.shape[1]), dtype=shard_probs.dtype)
            for rank, (rank_probs, _) in enumerate(gathered):
                probs[rank :: dist.world_size] = rank_probs
        val_loss = sum(loss_sum for _, loss_sum in gathered) / len(p.val_set)
        if not (math.isfinite(val_loss) and nonfinite_rows(probs) == 0):
            raise self.diverged(f"validation loss {val_loss} / non-finite validation scores")
        truth = label_csr(p.val_table["labels"], self.cfg.data.num_classes)
        thresholds, tuned_f1 = best_thresholds(truth, probs)
        f1_half = decision_counts(truth, probs, lambda rows: decide(rows, 0.5)).f1_per_class()
        result = {"val_loss": val_loss, "macro_f1": float(f1_half.mean()), "macro_f1_tuned": float(tuned_f1.mean()),
                  "per_class_f1": f1_half, "per_class_f1_tuned": tuned_f1, "thresholds": thresholds,
                  "support": count_labels(truth, 0), "probs": probs}
        if tc.monitor == "metric":  # the competition metric under predict's global_bounded decision
            pc = self.cfg.predict
            result["metric"] = float(metric_curve(self.cfg.metric, truth, probs, GLOBAL_GRID, pc.min_labels,
                                                  pc.max_labels).max())
        return result

    # -- the whole fold ---------------------------------------------------------------------------
    def monitored(self, metrics: dict) -> float:
        """The ``train.monitor`` score of a validation (higher is better)."""
        monitor = self.cfg.train.monitor
        return -metrics["val_loss"] if monitor == "val_loss" else metrics[monitor]

    def validate_candidates(self) -> tuple[str, dict, dict[str, float]]:
        """Validate every candidate (raw, EMA); returns the better one's name and metrics and each one's score."""
        results = {name: self.validate(model) for name, model in self.candidates().items()}
        scores = {name: self.monitored(metrics) for name, metrics in results.items()}
        chosen = max(scores, key=scores.get)  # a tie keeps the first: EMA
        return chosen, results[chosen], scores

    def check_learning(self, metrics: dict) -> str | None:
        """Why validation is no better than the prior predictor, or None when it is."""
        prior, problems = self.prior, []
        if not metrics["val_loss"] < prior["val_loss"]:
            problems.append(f"validation loss {metrics['val_loss']:.4f} vs prior {prior['val_loss']:.4f}")
        if not metrics["macro_f1_tuned"] > prior["macro_f1_tuned"]:
            problems.append(f"tuned macro-F1 {metrics['macro_f1_tuned']:.4f} vs prior {prior['macro_f1_tuned']:.4f}")
        return "; ".join(problems) or None

    def end_epoch(self, seconds: float, tracker: Tracker) -> dict:
        """Validate, record the epoch, write last.pt and its OOF scores, make them the best ones if they are,
        and warn when the model is no better than the prior predictor."""
        tc, state, folder, fold = self.cfg.train, self.state, self.folder, self.fold
        state.eval_weights, metrics, scores = self.validate_candidates()
        score = scores[state.eval_weights]
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch = score, state.epoch
        not_learning = self.check_learning(metrics)
        row = {"epoch": state.epoch, "step": state.step, "val_loss": metrics["val_loss"],
               "macro_f1": metrics["macro_f1"], "macro_f1_tuned": metrics["macro_f1_tuned"],
               "weights": state.eval_weights, **{f"{tc.monitor}_{name}": value for name, value in scores.items()},
               "prior_val_loss": self.prior["val_loss"], "prior_macro_f1_tuned": self.prior["macro_f1_tuned"],
               "beats_prior": not_learning is None, "seconds": seconds, "best": improved}
        self.history.append(row)
        # last.pt and its OOF scores as one set: both are written to temp files, and renamed into place only once
        # both are whole, the checkpoint last. A failure or a crash before that (a full disk, a kill) leaves the
        # previous pair, never scores of one model beside the checkpoint of another.
        with Staging() as staging:
            if self.dist.main:
                write_scores(folder.oof(fold, "last"), self.parts.val_table["Id"], metrics["probs"], staging)
                if tc.keep_epochs:  # this epoch's weights for src.average, in the same set
                    save_weights(folder.epoch_weights(fold, state.epoch), epoch_weights(self.parts), staging)
            self.save(staging)
            staging.commit()
        if self.dist.main and tc.keep_epochs:  # the last K only, oldest removed
            for old in list(folder.kept_epochs(fold).values())[:-tc.keep_epochs]:
                old.unlink()
        if self.dist.main:
            if improved:  # the same state: link the files instead of serialising it twice
                copy_scores(folder.oof(fold, "last"), folder.oof(fold, "best"))
                link_or_copy(folder.checkpoint(fold, "last"), folder.checkpoint(fold, "best"))
            write_history(folder.history(fold), self.history)
        tracker.log({f"val/{k}": row[k] for k in ("val_loss", "macro_f1", "macro_f1_tuned", "beats_prior")}
                    | {f"val/{tc.monitor}_{name}": value for name, value in scores.items()}
                    | {"val/ema_chosen": state.eval_weights == "ema", "epoch": state.epoch}, step=state.step)
        if self.cfg.data.num_classes <= PER_CLASS_LOG_MAX:  # a W&B table of thousands of rows per epoch: no
            tracker.log_per_class("val/per_class", {"f1@0.5": metrics["per_class_f1"],
                                                    "f1_tuned": metrics["per_class_f1_tuned"],
                                                    "threshold": metrics["thresholds"],
                                                    "support": metrics["support"]}, step=state.step)
        if self.progress:
            print(f"fold {fold} epoch {state.epoch}: val_loss {row['val_loss']:.4f}  "
                  f"macro-F1@0.5 {row['macro_f1']:.4f}  tuned {row['macro_f1_tuned']:.4f}  ({state.eval_weights} "
                  "weights)" + ("  (best)" if improved else ""))
        if not_learning and tc.warn_no_learning_after and state.epoch >= tc.warn_no_learning_after and \
                self.dist.main:
            note(f"warning: fold {fold} epoch {state.epoch}: the model is no better than the prior predictor "
                 f"(every class at its training rate): {not_learning}. It has not learned from the images yet: "
                 "check train.lr (python -m src.lr_find), train.epochs, train.warmup_fraction, "
                 "train.ema_horizon and the data.")
        return row

    def save_embedding(self) -> dict[str, Path]:
        """The fold's label embedding and its two plots (drawn by src.report), written as one set; returns the
        plots by their W&B key."""
        embedding, folder, fold = self.parts.embedding, self.folder, self.fold
        E, support = embedding.embedding, embedding.support
        draw = {"similarity": lambda tmp: plot_similarity_heatmap(E, tmp, support=support),
                "map": lambda tmp: plot_label_map(E, tmp, support=support)}
        with Staging() as staging:
            staging.file(folder.embedding(fold), embedding.save)
            plots = {f"label_embedding/{which}": staging.file(folder.embedding_plot(fold, which), plot)
                     for which, plot in draw.items()}
            staging.commit()
        return plots

    def fit(self, hooks: LoopHooks | None = None) -> dict:
        """Train the remaining epochs (resuming last.pt under ``train.resume``), validating and checkpointing
        each; ``hooks`` hear every optimizer step and epoch and may stop the run. Returns the fold's metrics."""
        tc, p, folder, hooks = self.cfg.train, self.parts, self.folder, hooks or NO_HOOKS
        fold_dir = folder.fold(self.fold)
        fold_dir.mkdir(parents=True, exist_ok=True)
        last = folder.checkpoint(self.fold, "last")
        say = print if self.dist.main else (lambda *args, **kwargs: None)
        if tc.time_limit is not None:
            self.deadline = time.monotonic() + tc.time_limit
        if tc.resume and last.is_file():
            self.resume(last)
            say(f"resumed {last}: epoch {self.state.epoch + 1}, optimizer step {self.state.step}")
        elif tc.resume and self.dist.main:
            note(f"note: train.resume=true but {last} does not exist: starting fresh")
        run_name = folder.root.name
        if self.dist.main:
            folder.save_config(self.cfg, self.fold, p.vocabulary,
                               comment=p.precision.describe() if p.precision is not None else None)
            if self.dist.world_size > 1:
                say(f"distributed: {self.dist.world_size} processes x batch {tc.batch_size} x {tc.accum_steps} "
                    f"accumulation = {self.dist.world_size * tc.batch_size * tc.accum_steps} images per step")
        # W&B from rank 0 only; the other ranks log nowhere.
        tracked = self.cfg if self.dist.main else override(self.cfg, **{"wandb.mode": "disabled"})
        tracker = Tracker(tracked, fold_dir, name=f"{run_name}-fold{self.fold}", group=run_name)
        stopped, why = False, None
        try:
            if p.embedding is not None and self.dist.main:
                tracker.log_images(self.save_embedding())
            while self.state.epoch < tc.epochs:
                start = time.perf_counter()
                if not self.train_epoch(self.epoch_batches(), tracker, hooks):
                    stopped = True
                    if self.out_of_time:
                        why = f"stopped at optimizer step {self.state.step} to keep within train.time_limit"
                    elif not self.step_limit_reached():
                        why = f"stopped by a loop hook at step {self.state.step}"
                    if self.saved_step != self.state.step:  # the one save of a stop: last.pt resumes from here
                        self.save()
                    if self.out_of_time and self.dist.main:
                        note(f"note: fold {self.fold} {why} ({tc.time_limit:g} s): {last} holds the state; "
                             "continue with train.resume=true (in the Kaggle training notebook: the next session, "
                             "with this session's output added as an input)")
                    break
                ended = time.perf_counter()
                row = self.end_epoch(ended - start, tracker)
                self.timing.epoch_end = max(self.timing.epoch_end, time.perf_counter() - ended)
                if hooks.on_epoch(self.state.epoch, row):
                    why = f"pruned at epoch {self.state.epoch}"
                    break
            result = {"fold": self.fold, "stopped_early": stopped, "steps": self.state.step,
                      "best_epoch": self.state.best_epoch, "best_score": self.state.best_score,
                      "monitor": tc.monitor, "run_dir": str(fold_dir)}
            if why:
                result["stopped"] = why
            if self.history:
                best = self.history[self.state.best_epoch - 1] if self.state.best_epoch > 0 else self.history[-1]
                result |= {k: self.history[-1][k] for k in ("val_loss", "macro_f1", "macro_f1_tuned", "beats_prior")}
                result |= {"best_weights": best.get("weights", "raw"), "prior_val_loss": self.prior["val_loss"],
                           "prior_macro_f1_tuned": self.prior["macro_f1_tuned"],
                           "not_learning": self.check_learning(self.history[-1]) or ""}
            tracker.summary({k: v for k, v in result.items() if isinstance(v, (int, float)) or k == "stopped"})
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
    stopped = result.get("stopped") or ("stopped early" if result["stopped_early"] else "")
    print(f"fold {result['fold']}: {result['steps']} optimizer steps; best epoch {result['best_epoch']} "
          f"({result['monitor']} {result['best_score']:.4f}, {result.get('best_weights', 'raw')} weights)"
          + (f"; {stopped}" if stopped else ""))
    if "beats_prior" in result and not result["beats_prior"]:
        note(f"warning: the last epoch was no better than the prior predictor ({result['not_learning']}): see the "
             "warnings above")
    written = [name for name in FOLD_FILES if (Path(result["run_dir"]) / name).is_file()]
    print(f"outputs: {result['run_dir']}/{{{','.join(written)}}}")
    if result.get("wandb_run"):
        print(f"W&B offline run: {result['wandb_run']}  (upload with `wandb sync {result['wandb_run']}`)")


def refuse_restart(cfg: Config, folder: RunFolder, fold: int) -> None:
    """Refuse to start fold ``fold`` afresh over a fold folder that holds its checkpoints: a finished (or
    interrupted) training is continued (``train.resume``) or replaced on purpose (``train.overwrite``)."""
    found = [which for which in ("last", "best") if folder.checkpoint(fold, which).is_file()]
    if found and not (cfg.train.resume or cfg.train.overwrite):
        raise PipelineError(f"{folder.fold(fold)} already holds a training of fold {fold} "
                            f"({', '.join(f'{which}.pt' for which in found)}): pass train.resume=true to continue "
                            "it, train.overwrite=true to train it again from scratch, or move or delete the folder")


def _remove_training(folder: RunFolder, fold: int) -> None:
    """Remove what a previous training of fold ``fold`` wrote (checkpoints, score tables, history, config, label
    embedding and its plots), so that nothing of it mixes with the new run's outputs."""
    for path in folder.training_outputs(fold):
        path.unlink(missing_ok=True)


def _remove_if_unused(folders: list[Path]) -> None:
    """Remove the folders this run created (innermost first) when nothing but a fold lock was written in them."""
    for folder in folders:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()


def train(cfg: Config, fold: int, progress: bool = True, hooks: LoopHooks | None = None) -> dict:
    """Train fold ``fold`` and return its metrics (best epoch and score, last validation metrics); ``hooks``
    (:class:`LoopHooks`) hear every optimizer step and epoch and may stop the run."""
    # What needs no data and no model, before anything is created: a wrong name or number leaves no folder. (No
    # folds file at all is build_parts' to report, with the command that makes it, after the write check.)
    check_backbone(cfg.model)
    if Path(cfg.folds.path).is_file():
        require_fold(cfg, fold)
    dist = init_distributed(cfg.train.device)
    folder = RunFolder(cfg.run.dir)
    created = [path for path in (folder.fold(fold), folder.root) if not path.exists()]
    try:
        if not dist.main:  # rank 0 checks the folder and holds its lock for the whole run
            return Trainer(build_parts(cfg, fold, False, dist), False).fit(hooks)
        ensure_writable(folder.fold(fold), "training outputs")  # before loading data and building the model
        with folder.lock(fold):
            refuse_restart(cfg, folder, fold)
            trainer = Trainer(build_parts(cfg, fold, progress, dist), progress)
            if cfg.train.overwrite and not cfg.train.resume:  # the data and model are good: now the old run goes
                _remove_training(folder, fold)
            return trainer.fit(hooks)
    except BaseException:
        if dist.main:
            _remove_if_unused(created)
        raise
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, required=True, help="the fold to validate on")
    args = parser.parse_args()
    train(config_from_args(args), args.fold)


if __name__ == "__main__":
    run_cli(main)
