"""Backbone + feature modifier + head, built from config; parameter groups for one optimizer.

The backbone is any timm model created with ``in_chans=4`` (timm adapts the first convolution of
pretrained weights to the extra channel) and ``num_classes=0`` (it returns pooled features). The feature
modifier is a module of its own that reshapes those features before the head: a learned gate per
feature (squeeze-excitation style) and feature dropout. One optimizer updates all three, with a
learning rate for the backbone and one for modifier and head.

Images enter the network as uint8 (4x less host->device traffic than float) and are normalised on the
device by the network itself.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import re
import types
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from src.config import Config, ModelConfig, PipelineError
from src.progress import bar as progress_bar
from src.progress import note


class FeatureModifier(nn.Module):
    """Learned per-feature gating of the pooled backbone features, then feature dropout."""

    def __init__(self, num_features: int, gate_reduction: int = 4, feature_dropout: float = 0.2):
        super().__init__()
        hidden = max(8, num_features // gate_reduction)
        self.gate = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_features))
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)  # the gate starts as the identity: 2 * sigmoid(0) = 1
        self.dropout = nn.Dropout(feature_dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(features * 2 * torch.sigmoid(self.gate(features)))


class Net(nn.Module):
    """uint8 N x C x H x W images -> normalise -> backbone -> feature modifier -> head."""

    def __init__(self, backbone: nn.Module, modifier: nn.Module, head: nn.Module,
                 mean: list[float], std: list[float]):
        super().__init__()
        self.backbone = backbone
        self.modifier = modifier
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.head(self.modifier(self.backbone(x)))


def _channel_stats(values: tuple[float, ...], in_chans: int) -> list[float]:
    """Extend RGB normalisation stats to ``in_chans`` (extra channels get the RGB mean)."""
    values = list(values)[:in_chans]
    return values + [float(np.mean(values))] * (in_chans - len(values))


def check_backbone(cfg: ModelConfig) -> None:
    """Refuse a ``model.backbone`` timm's registry does not know, naming similar ones (before any work). A
    prefixed name (``hf-hub:...``, ``local-dir:...``) is timm's to resolve when the model is created."""
    if ":" not in cfg.backbone and not timm.is_model(cfg.backbone):
        raise _unknown_backbone(cfg.backbone)


def _unknown_backbone(name: str) -> PipelineError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return PipelineError(f"model.backbone: unknown timm model {name!r}" + (f" (similar: {close})" if close else ""))


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm backbone with ``cfg.in_chans`` inputs and pooled features out (``num_classes=0``)."""
    kwargs = dict(in_chans=cfg.in_chans, num_classes=0, drop_rate=cfg.drop_rate)
    pretrained = cfg.pretrained
    try:
        if isinstance(pretrained, str):
            if not Path(pretrained).is_file():
                raise PipelineError(f"model.pretrained: weights file not found: {pretrained}")
            # timm loads the file through its usual path: 4-channel conv adaptation, classifier dropped.
            return timm.create_model(cfg.backbone, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(pretrained)), **kwargs)
        return timm.create_model(cfg.backbone, pretrained=bool(pretrained), **kwargs)
    except OSError as exc:  # the hub could not be reached, or has no such weights
        if pretrained is not True:
            raise
        raise PipelineError(f"model.pretrained=true: could not fetch timm's weights for {cfg.backbone!r} "
                            f"({type(exc).__name__}). Without network, point model.pretrained at a local "
                            "weights file (or set it to false).") from None
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise _unknown_backbone(cfg.backbone) from None
        raise


# The cells of timm's NASNet-A-Large and PNASNet-5-Large, which have no set_grad_checkpointing of their own.
CELL_NAME = re.compile(r"cell_stem_\d+|cell_\d+|reduction_cell_\d+")


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """A cell's forward that keeps only its inputs for the backward pass and recomputes the rest there."""
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_cells(backbone: nn.Module) -> list[str]:
    """Activation checkpointing per cell of a NASNet-style backbone (children named ``cell_stem_<i>``,
    ``cell_<i>``, ``reduction_cell_<i>``); returns the cells' names (none: not such a backbone). Each cell's
    forward is replaced on the instance, so parameter names and state dicts stay those of the plain model,
    and a deep copy (the EMA) binds the copy's cells to themselves. As with timm's own checkpointing,
    BatchNorm running statistics are updated again by the recomputation."""
    names = [name for name, _ in backbone.named_children() if CELL_NAME.fullmatch(name)]
    for name in names:
        cell = getattr(backbone, name)
        cell.forward = types.MethodType(_checkpointed_forward, cell)
    return names


def enable_grad_checkpointing(backbone: nn.Module, name: str) -> str:
    """Turn on activation checkpointing: timm's ``set_grad_checkpointing`` where the backbone implements it,
    else per cell (:func:`checkpoint_cells`). Returns which one ("timm" or "per cell")."""
    try:
        backbone.set_grad_checkpointing(True)
        return "timm"
    except (AssertionError, NotImplementedError, AttributeError) as exc:  # timm asserts; a non-timm module has none
        if checkpoint_cells(backbone):
            return "per cell"
        raise PipelineError(f"model.grad_checkpointing: {name} has neither timm's gradient checkpointing nor "
                            "NASNet-style cells to checkpoint; set model.grad_checkpointing=false") from exc


def build_model(cfg: Config, out_dim: int | None = None) -> Net:
    """The network of ``cfg.model`` with a head of ``out_dim`` outputs (default: number of classes)."""
    backbone = create_backbone(cfg.model)
    if cfg.model.grad_checkpointing:
        enable_grad_checkpointing(backbone, cfg.model.backbone)
    num_features = backbone.num_features
    modifier = FeatureModifier(num_features, cfg.model.modifier.gate_reduction, cfg.model.modifier.feature_dropout)
    head = nn.Linear(num_features, out_dim or cfg.data.num_classes)
    data_cfg = backbone.pretrained_cfg
    mean = _channel_stats(data_cfg.get("mean", (0.485, 0.456, 0.406)), cfg.model.in_chans)
    std = _channel_stats(data_cfg.get("std", (0.229, 0.224, 0.225)), cfg.model.in_chans)
    return Net(backbone, modifier, head, mean, std)


def backbone_lr(cfg: Config) -> float | None:
    """The backbone's own learning rate: ``train.backbone_lr`` for a pretrained backbone (fine-tuning), None (it
    trains at ``train.lr``) when that is unset or the backbone is trained from scratch (no features to protect)."""
    return None if cfg.model.pretrained is False else cfg.train.backbone_lr


def param_groups(model: Net, cfg: Config) -> list[dict]:
    """Optimizer groups: backbone at :func:`backbone_lr` (else ``train.lr``), modifier + head at ``train.lr``;
    no weight decay on norms and biases (1-d parameters)."""
    tc, own = cfg.train, backbone_lr(cfg)
    groups = []
    # 0 freezes the backbone's updates
    for name, modules, lr in (("backbone", [model.backbone], tc.lr if own is None else own),
                              ("modifier+head", [model.modifier, model.head], tc.lr)):
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": tc.weight_decay})
        groups.append({"name": f"{name} (no decay)", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda when present; asking for cuda without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device=cuda but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


# CUDA cards from this compute capability on (Ampere, sm_80) have native bf16 arithmetic; older ones (Turing T4
# 7.5, Volta V100 7.0, Pascal P100 6.0) have fast fp16 but no bf16.
BF16_CAPABILITY = (8, 0)


@functools.cache
def native_cpu_half(precision: str) -> bool:
    """Whether this CPU has native kernels for ``precision`` (bf16: AVX512-BF16/AMX; fp16: AVX512-FP16/AMX).
    Without them CPU autocast falls back to reference matrix products: a resnet18 step at 128 px measured
    about 20x slower than fp32 on an AVX2 machine."""
    check = torch.ops.mkldnn._is_mkldnn_bf16_supported if precision == "bf16" else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    return bool(check())


@dataclass(frozen=True)
class Precision:
    """The precision a run uses on a device (``name``: fp32, bf16 or fp16), the one ``train.precision`` asked
    for (``requested``) and why they are what they are (``reason``, one line for the log and the run folder)."""

    name: str
    requested: str
    reason: str

    @property
    def overridden(self) -> bool:
        """An explicit request the device cannot honour well (``auto`` is never overridden: it chooses)."""
        return self.requested not in ("auto", self.name)

    def describe(self) -> str:
        """``train.precision: auto -> bf16 (why)``, as printed at the start of training and saved with the run."""
        return f"train.precision: {self.requested} -> {self.name} ({self.reason})"


def resolve_precision(device: torch.device, requested: str) -> Precision:
    """The precision a run on ``device`` really uses for ``train.precision=requested``; the one place that
    decides it (training, validation and prediction all ask here).

    - ``auto``: on CUDA, bf16 from compute capability 8.0 (native bf16) and fp16 below it (T4, V100, P100:
      with the training loop's ``GradScaler``, which only fp16 needs); on a CPU, bf16 where it has native bf16
      kernels, else fp32; fp32 on any other device.
    - ``bf16`` on a CUDA card below 8.0: fp16 instead, with a warning. The user asked for half precision (its
      speed and memory); bf16 there is emulated, many times slower, or refused by some kernels, while fp16 with
      a loss scaler is what those cards run natively. An error would stop a run whose intent is clear.
    - ``bf16``/``fp16`` on a CPU without native kernels for it: fp32, with a warning (about 20x faster there).
    - Anything else is used as asked."""
    if requested == "fp32":
        return Precision("fp32", requested, "as configured")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= BF16_CAPABILITY:
            return Precision("bf16" if requested == "auto" else requested, requested,
                             f"CUDA compute capability {major}.{minor} has native bf16"
                             + ("" if requested == "auto" else "; as configured"))
        why = f"CUDA compute capability {major}.{minor} has no native bf16 (it needs {BF16_CAPABILITY[0]}.0)"
        if requested == "bf16":
            return Precision("fp16", requested, f"{why}: emulated bf16 would be many times slower, so fp16 with a "
                                                "loss scaler runs instead; set train.precision=auto or fp16 to "
                                                "silence this warning, fp32 for full precision")
        return Precision("fp16", requested, f"{why}: fp16 with a loss scaler" if requested == "auto"
                         else f"{why}; fp16 as configured, with a loss scaler")
    if device.type == "cpu":
        half = "bf16" if requested == "auto" else requested
        if native_cpu_half(half):
            return Precision(half, requested, f"this CPU has native {half} kernels")
        return Precision("fp32", requested, f"this CPU has no native {half} kernels: {half} would be many times "
                                            "slower than fp32")
    if requested == "auto":
        return Precision("fp32", requested, f"no half precision is chosen for a {device.type} device")
    return Precision(requested, requested, "as configured")


_warned: set[Precision] = set()


def effective_precision(device: torch.device, precision: str) -> str:
    """The name of :func:`resolve_precision`'s choice. An explicit request the device cannot honour is warned
    about once per process (inference calls this for every batch)."""
    chosen = resolve_precision(device, precision)
    if chosen.overridden and chosen not in _warned:
        _warned.add(chosen)
        # Met at the first training or inference step, while a bar runs: a note of its own, not cut into the bar.
        note(f"warning: {chosen.describe()}")
    return chosen.name


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of ``precision`` on ``device`` (:func:`effective_precision`: ``auto`` resolved):
    nothing for fp32, ``torch.autocast`` for bf16/fp16."""
    precision = effective_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


D4_VIEWS = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def d4_view(images: torch.Tensor, view: str) -> torch.Tensor:
    """One of the 8 dihedral views of an N x C x H x W batch."""
    if view.startswith("flip"):
        images = torch.flip(images, dims=[3])
    turns = {"rot90": 1, "rot180": 2, "rot270": 3}.get(view.removeprefix("flip_"), 0)
    return torch.rot90(images, turns, dims=[2, 3]) if turns else images


def check_views(views: Sequence[str]) -> None:
    unknown = [v for v in views if v not in D4_VIEWS]
    if unknown or not views:
        raise PipelineError(f"predict.tta: unknown or no view(s) {unknown}; choose from {list(D4_VIEWS)}")


def crop_windows(height: int, width: int, crop: int, count: int) -> list[tuple[int, int]]:
    """The ``(top, left)`` corners of ``count`` = k x k crops of ``crop`` px on a height x width image: a grid from the
    first to the last position, evenly spaced (k = 1: the central crop). When k x crop reaches the image's sides
    the crops cover it."""
    k = math.isqrt(count)
    if k * k != count or count == 0:
        raise PipelineError(f"predict.crops={count}: expected a square number of crop views (1, 4, 9, ...; 0: the "
                            "whole image)")
    if crop > min(height, width):
        raise PipelineError(f"predict.crops: {crop} px crops do not fit {height} x {width} images")

    def starts(side: int) -> list[int]:
        return [(side - crop) // 2] if k == 1 else [round(i * (side - crop) / (k - 1)) for i in range(k)]

    return [(top, left) for top in starts(height) for left in starts(width)]


@torch.no_grad()
def infer(model: nn.Module, loader, device: torch.device, *, precision: str = "fp32", channels_last: bool = False,
          views: Sequence[str] = ("identity",), reduce: str = "mean",
          to_scores: Callable[[np.ndarray], np.ndarray] | None = None, loss_fn: nn.Module | None = None,
          desc: str = "infer", progress: bool = True, into: Callable[[np.ndarray], None] | None = None,
          crops: int = 0, crop: int | None = None) -> tuple[np.ndarray | None, float | None]:
    """The one inference loop (validation, OOF re-scoring, prediction).

    For each loaded batch, every TTA view in ``views`` is made on the device (images are read and decoded
    once), run under ``precision``, mapped by ``to_scores`` (raw float32 outputs when None) and reduced over
    views by ``reduce`` (mean or max). ``crops``: the views are made of each of ``crops`` windows of ``crop`` px
    (:func:`crop_windows`; the network is fully convolutional), all of them reduced together. Returns the n x out
    stacked results and, when ``loss_fn`` is given, the mean loss of the raw outputs of the first view (of the first
    crop). ``into``: each batch's results are handed to it (a score table being written,
    src.score_table.ScoreSink) instead of being stacked, and None is returned for them.
    """
    check_views(views)
    if crops and crop is None:
        raise PipelineError(f"predict.crops={crops}: the run was trained without train.augment.crop, so there is no "
                            "crop size; set predict.crops=0 (the whole image)")
    model.eval()
    results, total_loss, count = [], 0.0, 0
    for images, targets in progress_bar(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        windows = crop_windows(images.shape[2], images.shape[3], crop, crops) if crops else [None]
        per_view = []
        for window, view in itertools.product(windows, views):
            part = images if window is None else images[:, :, window[0] : window[0] + crop,
                                                        window[1] : window[1] + crop]
            view_images = d4_view(part, view)
            if channels_last:  # after the view: a rotation of a channels_last tensor is not channels_last
                view_images = view_images.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                outputs = model(view_images)
            outputs = outputs.float()
            if loss_fn is not None and not per_view:
                total_loss += float(loss_fn(outputs, targets.to(device, non_blocking=True))) * len(images)
                count += len(images)
            outputs = outputs.cpu().numpy()
            per_view.append(to_scores(outputs) if to_scores is not None else outputs)
        stacked = np.stack(per_view)
        reduced = stacked[0] if len(per_view) == 1 else stacked.mean(0) if reduce == "mean" else stacked.max(0)
        if into is not None:
            into(reduced)
        else:
            results.append(reduced)
    return None if into is not None else np.concatenate(results), (total_loss / count if count else None)
