"""One-shot GPU benchmark: the training step's images/s and peak memory beside a bare timm step, and the loader.

    .venv/bin/python -m benchmarks.bench_gpu [--budget 450] [--steps 5] [--warmup 3] [--channels-last]
    .venv/bin/python -m benchmarks.bench_gpu --modes compiled --budget 450   # a second run: the compiled cells
    .venv/bin/python -m benchmarks.bench_gpu --smoke   # tiny, on the CPU, seconds: every eager path, no figure

Meant for a lent GPU (under 8 minutes on an H100 by default). One table, one row per measured cell:

- nasnetalarge (the main config's backbone), 4 channels, 512 px, at batch 8 / 16 / 32, bf16 and fp32, eager and
  ``torch.compile``d, without and with activation checkpointing (``model.grad_checkpointing``: per cell for
  NASNet); resnet34 and efficientnet_b0 at 512 px, batch 32, bf16, eager and compiled.
- "pipeline img/s": the real ``Trainer.train_epoch`` of ``configs/hpa_nasnet512.yaml`` (parts from
  ``build_parts``: the uint8-in network with its feature modifier and head, AdamW, EMA, clipping; one
  optimizer step per batch) on uint8 batches already on the device; compiled as ``model.compile`` compiles
  (the training step, the batch dimension marked dynamic so the three batch sizes share one compilation).
- "bare img/s": a bare timm step on the same card: ``timm.create_model`` (4 channels, 28 classes), AdamW, BCE,
  the same autocast, float batches already on the device (timm ``benchmark.py``'s training runner); "ratio" =
  pipeline / bare (goal: at least 1 / 1.2 = 0.83).
- "peak GiB": ``torch.cuda.max_memory_allocated`` over the pipeline's timed steps (goal: nasnetalarge batch
  >= 16 under 24 GiB). A cell that runs out of memory prints "OOM" (and a larger batch of that group is not tried).
- loader rows: samples/s per CPU core of this machine (``benchmarks.bench_loader``, 512 px, cache + the CPU
  policy, and cache + the device-side policy's loader part) and the device-side policy on the GPU (batch 32);
  with the cores needed to feed the fastest resnet34 cell (goal: 4 cores or fewer).

Cells run most telling first; each is timed after ``--warmup`` untimed steps (compilation, cuDNN autotuning) and
one that would run past ``--budget`` seconds (estimated from the cells before it; a first compilation is assumed
to take ``--compile-guess`` seconds) is listed as "skipped (time)". Progress goes to stderr as cells finish.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from benchmarks import bench_loader
from benchmarks.common import REPO_ROOT, add_smoke_option, describe_device, synthetic_batches, timed, trainer_config
from src.cli import run_cli
from src.config import Config, override
from src.model import autocast, effective_precision, enable_grad_checkpointing
from src.train import Trainer, build_parts

GIB = 2**30
TARGET_RATIO, TARGET_GIB, TARGET_BATCH, TARGET_CORES = 1 / 1.2, 24.0, 16, 4
START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Group:
    """Cells that share one built model: the same network, precision, compilation and checkpointing."""

    model: str
    precision: str
    compiled: bool
    checkpointing: bool
    batches: tuple[int, ...]

    def label(self, device: torch.device) -> str:
        """Model, precision (the one that runs: bf16 on a CPU without bf16 kernels runs in fp32), mode,
        checkpointing, as the table's first columns."""
        precision = effective_precision(device, self.precision)
        return (f"{self.model:<18}{precision:<6}{'compiled' if self.compiled else 'eager':<10}"
                f"{'on' if self.checkpointing else 'off':<6}")


def plan(args) -> list[Group]:
    """The groups in the order they run: eager before compiled (each compilation costs minutes), among the
    compiled ones the light backbones (quick to compile) before the big one, the main config's precision first."""
    big, small = args.models[0], args.models[1:]
    eager = [Group(big, precision, False, ckpt, tuple(args.batch_sizes))
             for precision in args.precisions for ckpt in (False, True)]
    eager += [Group(name, args.precisions[0], False, False, (args.small_batch,)) for name in small]
    compiled = [Group(name, args.precisions[0], True, False, (args.small_batch,)) for name in small]
    compiled += [Group(big, precision, True, ckpt, tuple(args.batch_sizes))
                 for precision in args.precisions for ckpt in (False, True)]
    return (eager if "eager" in args.modes else []) + (compiled if "compiled" in args.modes else [])


# -- the two steps ---------------------------------------------------------------------------------------------
def base_config(args, work_dir: Path, device: torch.device) -> Config:
    """The main config pointed at a throw-away demo dataset (never read: batches come from memory), one
    optimizer step per batch."""
    return trainer_config(args.config, work_dir, [
        f"train.batch_size={max(args.batch_sizes + [args.small_batch])}", f"data.image_size={args.image_size}",
        f"train.device={device.type}", "model.pretrained=false", "train.global_batch=null", "train.accum_steps=1",
        f"model.channels_last={str(args.channels_last).lower()}", "wandb.mode=disabled"])


class PipelineStep:
    """The pipeline's training loop on one group's settings."""

    def __init__(self, base: Config, group: Group, backend: str):
        cfg = override(base, **{"model.backbone": group.model, "train.precision": group.precision,
                                "model.grad_checkpointing": group.checkpointing})
        self.trainer = Trainer(build_parts(cfg, fold=0, progress=False), progress=False)
        parts = self.trainer.parts
        if group.compiled:  # what model.compile does in build_parts, with the backend of --compile-backend
            parts.forward = torch.compile(parts.model, backend=backend)
        self.cfg = cfg

    def batches(self, batch_size: int, count: int, device: torch.device, dynamic: bool) -> list:
        cfg = self.cfg
        batches = synthetic_batches(count, batch_size, cfg.model.in_chans, cfg.data.image_size,
                                    cfg.data.num_classes, device, distinct=1)
        if dynamic:
            torch._dynamo.maybe_mark_dynamic(batches[0][0], 0)
        return batches

    def run(self, batches: list) -> None:
        self.trainer.train_epoch(batches)

    def reset(self) -> None:
        """After an out-of-memory error: drop the half-made step."""
        self.trainer.parts.optimizer.zero_grad(set_to_none=True)
        self.trainer.state.batches_done = 0


class BareStep:
    """A bare timm training step: model, AdamW, BCE, autocast; float input already normalised."""

    def __init__(self, base: Config, group: Group, backend: str, device: torch.device):
        self.model = timm.create_model(group.model, in_chans=base.model.in_chans,
                                       num_classes=base.data.num_classes).to(device)
        if base.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if group.checkpointing:
            enable_grad_checkpointing(self.model, group.model)
        self.forward = torch.compile(self.model, backend=backend) if group.compiled else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.device, self.precision, self.base = device, group.precision, base

    def batches(self, batch_size: int, count: int, device: torch.device, dynamic: bool) -> list:
        cfg = self.base
        images, targets = synthetic_batches(1, batch_size, cfg.model.in_chans, cfg.data.image_size,
                                            cfg.data.num_classes, device, distinct=1)[0]
        images = (images.float() - 127.5) / 64.0
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if dynamic:
            torch._dynamo.maybe_mark_dynamic(images, 0)
        return [(images, targets)] * count

    def run(self, batches: list) -> None:
        self.model.train()
        for images, targets in batches:
            with autocast(self.device, self.precision):
                outputs = self.forward(images)
            self.loss_fn(outputs.float(), targets).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step, batch_size: int, args, device: torch.device, dynamic: bool) -> dict | str:
    """Images/s (and peak memory on CUDA) of ``args.steps`` steps after ``args.warmup`` untimed ones;
    "OOM" when the device runs out of memory."""
    result = None
    try:
        batches = step.batches(batch_size, max(args.steps, args.warmup), device, dynamic)
        step.run(batches[: args.warmup])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(lambda: step.run(batches[: args.steps]), device)
        result = {"images_per_s": args.steps * batch_size / seconds}
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    except torch.OutOfMemoryError:
        pass
    if result is None:  # freed outside the except block, whose traceback pins the activations
        batches = None
        step.reset()
        release(device)
        return "OOM"
    return result


def run_group(group: Group, base: Config, args, device: torch.device, rows: list[dict], history: dict) -> None:
    """Every batch size of ``group``: the pipeline's cells, then (its model freed) the bare ones. ``history``
    holds what earlier groups took, to skip a side that would run past the budget."""
    results: dict[str, dict[int, dict | str]] = {"pipeline": {}, "bare": {}}
    label = group.label(device)
    for side in ("pipeline", "bare"):
        todo = list(group.batches)
        key = (group.model, group.compiled)
        # a compiled side compiles anew (another graph): assume it takes what the last one of the model took
        compile_seconds = history.get(("compile", group.model), args.compile_guess) if group.compiled else 0.0
        per_image = history.get(key, 0.05)
        expected = compile_seconds + sum(per_image * b * (args.steps + args.warmup) * 1.5 for b in todo)
        if time.perf_counter() - START + expected > args.budget:
            for b in todo:
                results[side][b] = "skipped (time)"
            say(f"{label} {side}: skipped, would run past --budget {args.budget:.0f} s")
            continue
        started = time.perf_counter()
        try:
            step = PipelineStep(base, group, args.compile_backend) if side == "pipeline" else \
                BareStep(base, group, args.compile_backend, device)
        except Exception as exc:  # one broken cell must not cost the rest of a one-shot run
            say(f"{label} {side}: could not build: {type(exc).__name__}: {exc}")
            results[side] = {b: "error" for b in todo}
            continue
        out_of_memory = False
        for batch_size in todo:
            if out_of_memory:  # a larger batch of a group that already ran out of memory
                results[side][batch_size] = "OOM"
                continue
            try:
                result = measure(step, batch_size, args, device, dynamic=group.compiled and len(todo) > 1)
            except Exception as exc:
                say(f"{label} {side} batch {batch_size}: {type(exc).__name__}: {exc}")
                traceback.print_exc(limit=3, file=sys.stderr)
                result = "error"
            results[side][batch_size] = result
            out_of_memory = result == "OOM"
            say(f"{label} {side:<9}batch {batch_size:>3}: {describe(result)}")
        measured = [r for r in results[side].values() if isinstance(r, dict)]
        if measured:
            history[key] = max([history.get(key, 0.0)] + [1 / r["images_per_s"] for r in measured])
        took = time.perf_counter() - started
        if group.compiled:
            history[("compile", group.model)] = took
        say(f"{label} {side}: {took:.0f} s")
        del step
        release(device)
    if group.compiled:
        torch._dynamo.reset()  # compiled graphs of this group are not reused; keep the cache limit for the next
    for batch_size in group.batches:
        rows.append({"group": group, "batch": batch_size, "pipeline": results["pipeline"][batch_size],
                     "bare": results["bare"][batch_size]})


def describe(result: dict | str) -> str:
    if isinstance(result, str):
        return result
    memory = f", peak {result['peak_gib']:.2f} GiB" if "peak_gib" in result else ""
    return f"{result['images_per_s']:.1f} img/s{memory}"


# -- the loader ------------------------------------------------------------------------------------------------
def loader_rates(args, device: torch.device) -> dict[str, float]:
    """Median samples/s per core of the cache paths (this machine's CPU, one thread) and of the device-side
    policy on ``device``."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core, as bench_loader measures
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_loader_") as tmp:
            cfg, table = bench_loader.prepare(Path(tmp), args.loader_samples, args.loader_size)
            names = [bench_loader.CACHE_POLICY, bench_loader.CACHE_DEVICE]
            rates = bench_loader.measure(bench_loader.loader_paths(cfg, table, names), len(table), args.loader_repeats)
            on_device = bench_loader.batch_policy_rates(cfg, table, device, args.small_batch, args.loader_repeats)
    finally:
        torch.set_num_threads(torch_threads)
    return {"cache + CPU policy, per core": statistics.median(rates[bench_loader.CACHE_POLICY]),
            "cache, device policy: reads, per core": statistics.median(rates[bench_loader.CACHE_DEVICE]),
            f"device policy on {device.type}, batch {args.small_batch}": statistics.median(on_device)}


# -- the table -------------------------------------------------------------------------------------------------
def print_table(rows: list[dict], loader: dict[str, float] | None, device: torch.device, args) -> None:
    print(f"bench_gpu: {describe_device(device)}; torch {torch.__version__}, timm {timm.__version__}; "
          f"{os.cpu_count()} CPU cores; {args.image_size} px, 4 channels; {args.warmup} + {args.steps} steps a cell"
          + ("; channels_last" if args.channels_last else ""))
    print(f"{'model':<18}{'prec':<6}{'mode':<10}{'ckpt':<6}{'batch':>5}{'pipeline img/s':>16}{'bare img/s':>12}"
          f"{'ratio':>7}{'peak GiB':>10}{'<24 GiB':>9}")
    for row in rows:
        pipeline, bare = row["pipeline"], row["bare"]
        rate = f"{pipeline['images_per_s']:.1f}" if isinstance(pipeline, dict) else pipeline
        bare_rate = f"{bare['images_per_s']:.1f}" if isinstance(bare, dict) else bare
        both = isinstance(pipeline, dict) and isinstance(bare, dict)
        ratio = f"{pipeline['images_per_s'] / bare['images_per_s']:.2f}" if both else "-"
        peak = pipeline.get("peak_gib") if isinstance(pipeline, dict) else None
        fits = "-" if peak is None else ("yes" if peak < TARGET_GIB else "no")
        print(f"{row['group'].label(device)}{row['batch']:>5}{rate:>16}{bare_rate:>12}{ratio:>7}"
              f"{'-' if peak is None else f'{peak:.2f}':>10}{fits:>9}")
    if loader:
        for name, rate in loader.items():
            print(f"{'loader: ' + name:<45}{rate:>16.1f}")
    summarise(rows, loader, device, args)


def summarise(rows: list[dict], loader: dict[str, float] | None, device: torch.device, args) -> None:
    """The goals of the issue, each with the figures it rests on."""
    measured = [r for r in rows if isinstance(r["pipeline"], dict) and isinstance(r["bare"], dict)]
    if measured:
        worst = min(measured, key=lambda r: r["pipeline"]["images_per_s"] / r["bare"]["images_per_s"])
        ratio = worst["pipeline"]["images_per_s"] / worst["bare"]["images_per_s"]
        where = " ".join(worst["group"].label(device).split())
        print(f"goal pipeline within 1.2x of bare timm: lowest ratio {ratio:.2f} ({where}, batch {worst['batch']}): "
              + ("met" if ratio >= TARGET_RATIO else "not met"))
    big = args.models[0]
    fitting = [r["batch"] for r in rows if r["group"].model == big and isinstance(r["pipeline"], dict)
               and r["pipeline"].get("peak_gib", float("inf")) < TARGET_GIB]
    if device.type == "cuda":
        best = max(fitting, default=None)
        print(f"goal {big} batch >= {TARGET_BATCH} under {TARGET_GIB:.0f} GiB: largest fitting batch {best or 'none'}: "
              + ("met" if best and best >= TARGET_BATCH else "not met"))
    resnet = [r for r in measured if r["group"].model == args.models[1]]
    if loader and resnet:
        need = max(r["pipeline"]["images_per_s"] for r in resnet)
        for name, rate in list(loader.items())[:2]:
            cores = need / rate
            print(f"goal loader feeds {args.models[1]} ({need:.1f} img/s) on {TARGET_CORES} cores with {name}: "
                  f"{cores:.1f} cores needed: " + ("met" if cores <= TARGET_CORES else "not met"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "hpa_nasnet512.yaml"))
    parser.add_argument("--models", nargs="+", default=["nasnetalarge", "resnet34", "efficientnet_b0"],
                        help="the big backbone (every setting), then the lighter ones (batch --small-batch)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--small-batch", type=int, default=32)
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp32", "fp16"], default=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps a cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole script")
    parser.add_argument("--compile-guess", type=float, default=150.0,
                        help="seconds a model's first compilation is assumed to take, for the budget")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                        help="e.g. a second run of --modes compiled for the cells the budget skipped")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (inductor: what model.compile uses; aot_eager: a quick check "
                             "of the compiled path on a CPU)")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last=true, bare model too")
    parser.add_argument("--loader-samples", type=int, default=32)
    parser.add_argument("--loader-size", type=int, default=512)
    parser.add_argument("--loader-repeats", type=int, default=3)
    parser.add_argument("--no-loader", dest="loader", action="store_false")
    add_smoke_option(parser, "test_resnet / test_efficientnet, 32 px, batch 2, one step, a tiny loader; "
                                     "compiled cells only with --compile-backend aot_eager (a minute or more)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:  # every eager code path in seconds; compiling would take minutes on a CPU
        args.models, args.image_size, args.batch_sizes, args.small_batch = (
            ["test_resnet", "test_efficientnet"], 32, [2], 2)
        args.precisions, args.steps, args.warmup = ["bf16"], 1, 1
        args.loader_samples, args.loader_size, args.loader_repeats = 4, 32, 1
        if args.compile_backend == "inductor":
            args.modes = [mode for mode in args.modes if mode != "compiled"]
    elif device.type == "cpu":
        say("no CUDA device: this script is for a GPU (on a CPU, try --smoke)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a small shared CPU box: spin-waiting OpenMP threads make steps erratic
    say(f"device {describe_device(device)}; budget {args.budget:.0f} s")
    loader = None
    if args.loader:
        try:
            loader = loader_rates(args, device)
            say("loader: " + ", ".join(f"{name} {rate:.1f}/s" for name, rate in loader.items()))
        except Exception as exc:
            say(f"loader: {type(exc).__name__}: {exc}")
    rows: list[dict] = []
    history: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        base = base_config(args, Path(tmp), device)
        for group in plan(args):
            run_group(group, base, args, device, rows, history)
    print_table(rows, loader, device, args)


if __name__ == "__main__":
    run_cli(main)
