"""Training checkpoints: the one module that knows what a checkpoint holds.

A checkpoint (``last.pt``; ``best.pt`` is a link to the same file) holds the whole training state of a fold::

    model, optimizer, scheduler, scaler   state dicts of the fold's parts
    ema                                   the EMA's state dict, or None without one
    state                                 where the loop stands (epoch, step, best score, ...): a plain dict
    sampler_epoch_state                   the sampler's generator state at the start of the epoch in progress
    rng, rng_ranks                        this process's RNG states; under DDP every rank's, in rank order
    world_size                            processes that trained it (the batch compared on resume is global)
    config                                the resolved config, for the resume check
    history                               one row per epoch so far

Two lighter files hold weights only: an epoch's weights kept by ``train.keep_epochs`` (``model``, ``ema``:
:func:`epoch_weights`) and the averaged checkpoint of ``src.average`` (:func:`averaged_checkpoint`).

Tensors and plain Python only, so it loads with ``weights_only=True``; written atomically (temp file +
rename) and only from finite weights. The run folder says where checkpoints live (``RunFolder.checkpoint``);
the training loop says when to write one; this module says what is in it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from torch import nn

from src.config import Config, PipelineError, flatten_saved
from src.files import Staging, write_atomic
from src.progress import note


class TrainingParts(Protocol):
    """What a checkpoint is taken from and restored into (``src.train.FoldParts`` is one)."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: Any  # timm's ModelEmaV3 (its weights in ``.module``), or None
    sampler: Any  # src.dataset.EpochSampler: its ``epoch_state``
    dist: Any  # src.train.Dist: ``rank`` and ``world_size``


# -- RNG states ---------------------------------------------------------------------------------------
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


def gather_rng_states(dist: Any) -> list[dict]:
    """Every rank's RNG states, in rank order, through ``dist.all_gather`` (a collective: every rank calls it).
    Passed as torch.save bytes: tensors do not survive all_gather_object's pickling here."""
    buffer = io.BytesIO()
    torch.save(rng_states(), buffer)
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in dist.all_gather(buffer.getvalue())]


def restore_rng_states(states: dict) -> None:
    """Set the Python, numpy and torch RNGs to ``states`` (from :func:`rng_states`)."""
    random.setstate(tuple(states["python"][:1]) + (tuple(states["python"][1]),) + tuple(states["python"][2:]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- resume compatibility -----------------------------------------------------------------------------
# Keys whose change makes a checkpoint's weights or its position in the data order meaningless.
RESUME_MUST_MATCH = ("data.num_classes", "model.backbone", "model.in_chans", "model.modifier", "loss.name",
                     "loss.embedding_dim", "train.batch_size", "train.accum_steps", "train.seed", "train.sampler",
                     "folds")
RESUME_IGNORED = ("train.resume", "train.stop_after_steps", "train.time_limit")


def check_resumable(saved: dict, current: dict, path: Path, saved_world: int = 1, current_world: int = 1) -> None:
    """Refuse to resume ``path`` under a config that changes the model or the data order, naming the keys;
    mention other changed keys. The batch compared is the global one (per-process batch x processes), so a
    run saved by 2 processes x batch 8 resumes in 1 process x batch 16 and the other way round."""
    saved_flat, current_flat = flatten_saved(saved), flatten_saved(current)
    for flat, world in ((saved_flat, saved_world), (current_flat, current_world)):
        if "train.batch_size" in flat:
            flat["train.batch_size"] = flat["train.batch_size"] * world
    changed = sorted(k for k in saved_flat.keys() | current_flat.keys()
                     if saved_flat.get(k) != current_flat.get(k) and not k.startswith(RESUME_IGNORED))
    blocking = [k for k in changed if k.startswith(RESUME_MUST_MATCH)]
    if blocking:
        listing = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}" for k in blocking)
        raise PipelineError(f"cannot resume {path}: it was trained with a different {listing}. Resume with the "
                            "checkpoint's settings, or start fresh with another run.dir (or train.resume=false).")
    if changed:
        note(f"note: resuming {path} with changed setting(s): {', '.join(changed)}")


# -- finite weights -----------------------------------------------------------------------------------
class NonFiniteWeights(PipelineError):
    """Weights hold NaN or inf: no checkpoint is written from them."""

    def __init__(self, names: list[str]):
        self.names = names
        super().__init__(f"{len(names)} weight tensor(s) hold NaN/inf (e.g. {names[0]})")


def nonfinite_tensors(module: nn.Module | None) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` that hold NaN or inf."""
    if module is None:
        return []
    return [name for name, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def require_finite(parts: TrainingParts) -> None:
    """Raise :class:`NonFiniteWeights` when the model or its EMA holds NaN/inf."""
    bad = nonfinite_tensors(parts.model) + nonfinite_tensors(parts.ema.module if parts.ema else None)
    if bad:
        raise NonFiniteWeights(bad)


# -- save, load ------------------------------------------------------------------------------------------
def capture_checkpoint(parts: TrainingParts, state: Any, history: list[dict],
                       rng_ranks: list[dict] | None = None) -> dict:
    """The checkpoint of ``parts`` with the loop's ``state`` (a dataclass) and ``history``, as it is saved.
    ``rng_ranks``: every rank's RNG states under DDP (gathered by the caller: a collective), else None."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema else None,
        "state": asdict(state),
        "sampler_epoch_state": parts.sampler.epoch_state,
        "rng": rng_states(),
        # Under DDP every rank's RNG (dropout masks), so a resume with the same world size is exact.
        "rng_ranks": rng_ranks,
        "world_size": parts.dist.world_size,
        "config": parts.cfg.model_dump(),
        "history": history,
    }


def save_checkpoint(parts: TrainingParts, state: Any, history: list[dict], path: Path,
                    rng_ranks: list[dict] | None = None, staging: Staging | None = None) -> Path:
    """Write :func:`capture_checkpoint` to ``path``: torch.save to a temp file beside it, then rename, so a
    crash never leaves half a file (with ``staging``: renamed on its commit, with the files staged beside it).
    Refuses (:class:`NonFiniteWeights`) weights that hold NaN/inf, so a checkpoint on disk is always a good
    state to resume from; a failed write (a full disk) is a WriteError naming ``path``."""
    require_finite(parts)
    ckpt = capture_checkpoint(parts, state, history, rng_ranks)
    if staging is not None:
        return staging.file(path, lambda tmp: torch.save(ckpt, tmp))
    return write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def load_tensors(source: str | Path | BinaryIO, path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load`` of ``source`` (a path or an open file of ``path``) with ``weights_only``: tensors and plain
    Python only. Any failure is one PipelineError line naming ``path``; a pickled Python object (code a load would
    run) gets the same line wherever weights are loaded (a checkpoint, a bundle's weights)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{what} not found: {path}") from None
    except pickle.UnpicklingError as exc:
        # torch's message spans paragraphs and suggests weights_only=False: exactly what must not be done here.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        held = f" ({found.group(1)})" if found else ""
        raise PipelineError(f"{path} holds a pickled Python object{held}, not only tensors: refused unloaded (loading "
                            "it could run code); use weights this pipeline wrote") from None
    except Exception as exc:
        raise PipelineError(f"{what} {path} is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())})"
                            ) from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only: weights_only)."""
    return load_tensors(path, path)


def file_fingerprint(handle: BinaryIO) -> dict:
    """``{"size", "sha256"}`` of an open binary file's bytes, read from its start a MiB at a time (sha256: the
    fastest secure hash of hashlib where the CPU has SHA extensions, see docs/reliability.md)."""
    handle.seek(0)
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def load_fingerprinted(path: str | Path) -> tuple[dict, dict]:
    """:func:`load_checkpoint` and the :func:`file_fingerprint` of the very bytes loaded: one open file, so a
    checkpoint replaced meanwhile (renamed into place by training) cannot pair one version's hash with another's
    weights."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise PipelineError(f"checkpoint not found: {path}") from None
    with handle:
        fingerprint = file_fingerprint(handle)
        handle.seek(0)
        return load_tensors(handle, path), fingerprint


def restore_checkpoint(parts: TrainingParts, ckpt: dict, path: Path) -> tuple[dict, list[dict]]:
    """Load ``ckpt`` (read from ``path``) into ``parts`` and this process's RNGs, after checking that
    ``parts.cfg`` may resume it (:func:`check_resumable`); returns the loop's saved state (a dict of its
    fields) and history."""
    dist = parts.dist
    check_resumable(ckpt.get("config", {}), parts.cfg.model_dump(), path, ckpt.get("world_size", 1),
                    dist.world_size)
    parts.model.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    # A bf16 or fp32 run saved a disabled scaler's empty state: resumed in fp16 (train.precision=auto on an older
    # card) its scaler starts afresh, as a new fp16 run's does.
    if ckpt["scaler"]:
        parts.scaler.load_state_dict(ckpt["scaler"])
    if parts.ema and ckpt["ema"] is not None:
        parts.ema.load_state_dict(ckpt["ema"])
    parts.sampler.epoch_state = ckpt["sampler_epoch_state"]
    per_rank = ckpt.get("rng_ranks")
    same_world = per_rank is not None and len(per_rank) == dist.world_size
    restore_rng_states(per_rank[dist.rank] if same_world else ckpt["rng"])
    return dict(ckpt["state"]), list(ckpt["history"])


# -- weights for inference ------------------------------------------------------------------------------
def model_weights(ckpt: dict) -> dict:
    """The weights validation chose at that checkpoint (``state.eval_weights``): the EMA copy or the raw model."""
    if ckpt.get("ema") and ckpt.get("state", {}).get("eval_weights", "ema") == "ema":
        return {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
    return ckpt["model"]


# -- weights only: kept epochs and their average ------------------------------------------------------
def epoch_weights(parts: TrainingParts) -> dict:
    """What ``train.keep_epochs`` keeps of an epoch: the raw weights and the EMA's (None without one), no
    training state."""
    return {"model": parts.model.state_dict(), "ema": parts.ema.module.state_dict() if parts.ema else None}


def averaged_checkpoint(weights: dict, epochs: list[int], averaged: str, config: dict) -> dict:
    """The checkpoint ``src.average`` writes: the averaged ``weights`` (``averaged``: of the raw or the EMA weights
    of ``epochs``) as the weights :func:`model_weights` gives inference."""
    return {"model": weights, "ema": None, "state": {"eval_weights": "raw"},
            "averaged": {"epochs": epochs, "weights": averaged}, "config": config}


def save_weights(path: Path, weights: dict, staging: Staging | None = None) -> Path:
    """Write a weights-only file (:func:`epoch_weights`, :func:`averaged_checkpoint`) atomically, as
    :func:`save_checkpoint` does (with ``staging``: renamed on its commit)."""
    if staging is not None:
        return staging.file(path, lambda tmp: torch.save(weights, tmp))
    return write_atomic(path, lambda tmp: torch.save(weights, tmp))
