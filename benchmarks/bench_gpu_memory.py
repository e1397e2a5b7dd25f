"""Peak GPU memory and images/s of the main config's training step (nasnetalarge, 4 channels, 512 px, bf16).

    .venv/bin/python -m benchmarks.bench_gpu_memory [--batch-sizes 8 16 24] [--channels-last]
        [--grad-checkpointing] [--cell-checkpointing] [--all] [--time-budget 200]
    .venv/bin/python -m benchmarks.bench_gpu_memory --smoke   # the CPU smoke check below, on any machine

Each configuration runs the real ``Trainer.train_epoch`` of ``configs/hpa_nasnet512.yaml`` (parts from
``src.train.build_parts``: AdamW, EMA, clipping, accumulation as configured), handed in-memory uint8
batches already on the GPU: one untimed pass (allocator, cuDNN, optimizer state), then
``torch.cuda.reset_peak_memory_stats`` and a timed pass of ``--steps`` micro-batches. Reported:
``max_memory_allocated`` (the figure the target is about), ``max_memory_reserved`` (what the caching
allocator held), images/s. Target: batch >= 16 under 24 GiB.

- ``--grad-checkpointing`` sets ``model.grad_checkpointing=true``: ``build_model`` uses timm's
  ``set_grad_checkpointing`` where the backbone has it and otherwise checkpoints per cell
  (``src.model.checkpoint_cells``: timm's NASNet-A-Large has no checkpointing of its own, it asserts).
- ``--cell-checkpointing`` (this script's own wrapper, from before ``src`` had one; kept for comparison)
  wraps each NASNet cell's forward in ``torch.utils.checkpoint`` (non-reentrant).
- ``--all`` runs NCHW, channels_last, timm checkpointing and cell checkpointing, each over the batch sizes.

Every result is printed (and flushed) as soon as it is measured; configurations that would overrun
``--time-budget`` seconds are skipped and listed, so a run under a hard time limit still reports. Without
CUDA it says so, runs a CPU smoke check of the same code path on a tiny model, and exits 0; ``--smoke``
runs that check on any machine (every layout, test_resnet, 32 px, batch 2, one step each).
"""

from __future__ import annotations

import argparse
import functools
import gc
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch.utils.checkpoint import checkpoint

from benchmarks.common import (
    REPO_ROOT,
    add_smoke_option,
    describe_device,
    fold0_trainer,
    synthetic_batches,
    timed,
    trainer_config,
)
from src.cli import run_cli
from src.config import PipelineError
from src.train import Trainer

GIB = 2**30
TARGET_BATCH, TARGET_GIB = 16, 24.0
START = time.perf_counter()


@dataclass(frozen=True)
class Layout:
    name: str
    channels_last: bool = False
    grad_checkpointing: bool = False  # model.grad_checkpointing: timm's set_grad_checkpointing
    cell_checkpointing: bool = False  # benchmark-only wrapper around each NASNet cell


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {text}", flush=True)


def checkpoint_cells(backbone: torch.nn.Module) -> list[str]:
    """Recompute each cell (NASNet ``cell_*``, ``reduction_cell_*``, ``cell_stem_*``; ResNet ``layer*`` for
    the smoke check) in the backward pass instead of storing its activations. The forward is wrapped on
    the instance, so parameter names, the state dict and the EMA copy stay as they are."""
    names = [name for name, _ in backbone.named_children()
             if re.fullmatch(r"(cell_stem_\d+|cell_\d+|reduction_cell_\d+|layer\d+)", name)]
    for name in names:
        block = getattr(backbone, name)
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return names


def timm_checkpointing_support(backbone: str) -> str:
    """Whether timm's model implements set_grad_checkpointing, in words."""
    model = timm.create_model(backbone, num_classes=0)
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as exc:
        return f"no ({type(exc).__name__}: {exc})"
    return "yes"


def build_trainer(args, layout: Layout, work_dir: Path, device: torch.device) -> Trainer:
    overrides = [
        f"model.backbone={args.backbone}", f"data.image_size={args.image_size}", f"train.precision={args.precision}",
        f"train.batch_size={max(args.batch_sizes)}", f"train.device={device.type}", "model.pretrained=false",
        f"model.channels_last={str(layout.channels_last).lower()}",
        f"model.grad_checkpointing={str(layout.grad_checkpointing).lower()}", "wandb.mode=disabled",
        *args.overrides,
    ]
    cfg = trainer_config(args.config, work_dir, overrides)
    trainer = fold0_trainer(cfg)
    if layout.cell_checkpointing:
        wrapped = checkpoint_cells(trainer.parts.model.backbone)
        if not wrapped:
            raise PipelineError(f"{args.backbone}: no cells to checkpoint")
    return trainer


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(trainer: Trainer, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict:
    """One untimed pass, then a timed pass of ``steps`` micro-batches through ``train_epoch``."""
    cfg = trainer.cfg
    # One distinct batch, repeated: like training, only the current batch sits on the device.
    batches = synthetic_batches(max(steps, warmup), batch_size, cfg.model.in_chans, cfg.data.image_size,
                                cfg.data.num_classes, device, distinct=1)
    trainer.train_epoch(batches[:warmup])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: trainer.train_epoch(batches[:steps]), device)
    result = {"images_per_s": steps * batch_size / seconds, "seconds": seconds}
    if device.type == "cuda":
        result["allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return result


def run_layouts(args, layouts: list[Layout], device: torch.device) -> list[tuple[Layout, int, dict | str]]:
    """Measure every (layout, batch size); returns (layout, batch, result dict or why not)."""
    results: list[tuple[Layout, int, dict | str]] = []
    last_rate = None  # images/s of the last measurement, to predict whether the next one fits the budget
    header = f"{'layout':<22}{'batch':>6}{'images/s':>10}{'alloc GiB':>11}{'reserved':>10}{'< 24 GiB':>10}"
    say(header)
    for layout in layouts:
        todo = list(args.batch_sizes)
        if time.perf_counter() - START > args.time_budget:
            say(f"{layout.name:<22} skipped: past --time-budget {args.time_budget:.0f} s")
            results += [(layout, b, "skipped (time)") for b in todo]
            continue
        with tempfile.TemporaryDirectory(prefix="bench_gpu_memory_") as tmp:
            try:
                trainer = build_trainer(args, layout, Path(tmp), device)
            except PipelineError as exc:
                say(f"{layout.name:<22} not supported: {exc} ({exc.__cause__ or 'no detail'})")
                results += [(layout, b, "not supported") for b in todo]
                continue
            for batch_size in todo:
                # 1.5x: a slower layout (checkpointing recomputes) may follow a faster one
                expected = 1.5 * (args.steps + args.warmup) * batch_size / last_rate if last_rate else 0.0
                if time.perf_counter() - START + expected > args.time_budget:
                    say(f"{layout.name:<22}{batch_size:>6}  skipped: would overrun --time-budget "
                        f"{args.time_budget:.0f} s")
                    results.append((layout, batch_size, "skipped (time)"))
                    continue
                try:
                    result = measure(trainer, batch_size, args.steps, args.warmup, device)
                except torch.OutOfMemoryError:
                    result = None
                if result is None:  # freed outside the except block, whose traceback pins the activations
                    trainer.parts.optimizer.zero_grad(set_to_none=True)
                    trainer.state.batches_done = 0  # the interrupted pass must not look like a resumable epoch
                    release(device)
                    say(f"{layout.name:<22}{batch_size:>6}  out of memory")
                    results.append((layout, batch_size, "out of memory"))
                    continue
                last_rate = result["images_per_s"]
                results.append((layout, batch_size, result))
                if "allocated_gib" in result:
                    fits = "yes" if result["allocated_gib"] < TARGET_GIB else "no"
                    say(f"{layout.name:<22}{batch_size:>6}{result['images_per_s']:>10.1f}"
                        f"{result['allocated_gib']:>11.2f}{result['reserved_gib']:>10.2f}{fits:>10}")
                else:
                    say(f"{layout.name:<22}{batch_size:>6}{result['images_per_s']:>10.1f}{'(cpu: no GPU memory)':>31}")
            del trainer
            release(device)
    return results


def summarise(results: list[tuple[Layout, int, dict | str]]) -> None:
    say(f"target: batch >= {TARGET_BATCH} with max_memory_allocated < {TARGET_GIB:.0f} GiB")
    for name in dict.fromkeys(layout.name for layout, _, _ in results):
        fitting = [b for layout, b, r in results if layout.name == name and isinstance(r, dict)
                   and r.get("allocated_gib", float("inf")) < TARGET_GIB]
        measured = [r for layout, _, r in results if layout.name == name and isinstance(r, dict)]
        if not measured:
            reasons = {r for layout, _, r in results if layout.name == name}
            say(f"  {name:<22} {', '.join(sorted(reasons))}")
            continue
        if not any("allocated_gib" in r for r in measured):
            say(f"  {name:<22} no GPU memory figures (measured on the CPU)")
            continue
        best = max(fitting) if fitting else None
        verdict = "met" if best and best >= TARGET_BATCH else "NOT met"
        say(f"  {name:<22} largest measured batch under {TARGET_GIB:.0f} GiB: {best or 'none'} -> {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "hpa_nasnet512.yaml"))
    parser.add_argument("--backbone", default="nasnetalarge")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--steps", type=int, default=8, help="timed micro-batches per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed micro-batches first")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true", help="model.grad_checkpointing=true (timm)")
    parser.add_argument("--cell-checkpointing", action="store_true",
                        help="benchmark-only: torch.utils.checkpoint around each NASNet cell")
    parser.add_argument("--all", action="store_true", help="NCHW, channels_last, timm and cell checkpointing")
    parser.add_argument("--time-budget", type=float, default=180.0,
                        help="seconds; configurations that would run past it are skipped")
    parser.add_argument("--memory-limit-gib", type=float,
                        help="cap the caching allocator (torch.cuda.set_per_process_memory_fraction) to "
                             "emulate a smaller card")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark=True")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="cpu: run the full measurement on the CPU (no memory figures; for checking the script)")
    add_smoke_option(parser, "every layout on test_resnet, 32 px, batch 2, one step each; no memory figures")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    return parser.parse_args(argv)


def layouts_of(args) -> list[Layout]:
    if args.all:
        # Most telling first, in case the time budget runs out.
        return [Layout("NCHW"), Layout("grad_ckpt (timm)", grad_checkpointing=True),
                Layout("cell_ckpt (bench only)", cell_checkpointing=True),
                Layout("channels_last", channels_last=True),
                Layout("cell_ckpt+ch_last", channels_last=True, cell_checkpointing=True)]
    parts = [name for name, on in (("channels_last", args.channels_last), ("grad_ckpt (timm)", args.grad_checkpointing),
                                   ("cell_ckpt (bench only)", args.cell_checkpointing)) if on]
    return [Layout(" + ".join(parts) or "NCHW", args.channels_last, args.grad_checkpointing, args.cell_checkpointing)]


def smoke_check(args) -> None:
    """The same code path on a tiny model on the CPU: every layout, one batch size, one step."""
    tiny = argparse.Namespace(**{**vars(args), "backbone": "test_resnet", "image_size": 32, "batch_sizes": [2],
                                 "steps": 1, "warmup": 1, "all": True, "time_budget": float("inf")})
    torch.set_num_threads(1)  # as for --device cpu: spin-waiting threads on a small shared box
    say("CPU smoke check: test_resnet, 32 px, batch 2, one step per layout, through Trainer.train_epoch")
    results = run_layouts(tiny, layouts_of(tiny), torch.device("cpu"))
    failed = [layout.name for layout, _, r in results if not isinstance(r, dict) and layout.name != "grad_ckpt (timm)"]
    if failed:
        raise SystemExit(f"smoke check failed for {failed}")
    say(f"{args.backbone}: timm set_grad_checkpointing supported: {timm_checkpointing_support(args.backbone)}")
    say("smoke check passed")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.smoke:
        smoke_check(args)
        return
    if args.device == "auto" and not torch.cuda.is_available():
        say("no CUDA device: peak GPU memory cannot be measured on this machine; run this script on a GPU. "
            "Checking the code path on the CPU instead.")
        smoke_check(args)
        return
    device = torch.device("cuda" if args.device == "auto" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # see bench_train_step: spin-waiting threads on a small shared box
    if args.memory_limit_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * GIB / total), device)
    say(f"device {describe_device(device)}; torch {torch.__version__}, timm {timm.__version__}")
    say(f"{args.backbone}, 4 channels, {args.image_size} px, {args.precision}, config {Path(args.config).name} "
        f"(its accumulation, EMA, clipping); {args.warmup} + {args.steps} micro-batches per configuration; "
        f"budget {args.time_budget:.0f} s"
        + (f"; allocator capped at {args.memory_limit_gib} GiB" if args.memory_limit_gib else ""))
    summarise(run_layouts(args, layouts_of(args), device))


if __name__ == "__main__":
    run_cli(main)
