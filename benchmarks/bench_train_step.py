"""Training-step throughput: this pipeline's loop (``Trainer.train_epoch``) vs a timm-style loop.

    .venv/bin/python -m benchmarks.bench_train_step [--precision bf16] [--breakdown] [key=value ...]
    .venv/bin/python -m benchmarks.bench_train_step --smoke   # the whole script in seconds (a check, not a figure)

Both sides run the same network (``src.model.build_model``: backbone, feature modifier, head, uint8 input
normalised on the device), the same loss, the same AdamW over the same parameter groups, at the same
batch, image size and precision, on the same uint8 batches already on the device: data loading is
excluded from both.

- "pipeline loop": the real ``Trainer.train_epoch``, built from ``--config`` by ``build_parts``, handed
  the in-memory batches; everything else as in training: autocast, fp32 loss scaled to the accumulation
  window, grad scaler, clipping, scheduler, EMA (as the config sets them), divergence check, tqdm bar
  (written to a temp file) and per-step ``Tracker.log`` (W&B mode of the config).
- "timm-style": what timm's ``benchmark.py`` ``TrainBenchmarkRunner`` times: forward under autocast,
  loss, backward, optimizer step (optimizer step every ``accum_steps`` micro-batches, as the loop does;
  a GradScaler only for fp16). It synchronises only at the end, where timm synchronises every step,
  so it is a slightly stricter baseline.

The two are measured alternately (A B, B A, ...) and the medians are compared, to cancel drift on a shared
machine. Target: the pipeline loop at most 5% slower.

``--breakdown`` says where a difference comes from: it adds to the alternation the loop without each of
tracker, tqdm, EMA and clipping (and without all four), and the baseline with the loop's per-step
``float(loss)`` (a host-device sync on CUDA); then it times each per-optimizer-step extra of the loop in
isolation (ms per call and share of the step; work done later by background threads is not in these).

On CPU the script also reports images/s by process CPU time (all threads of the process), which does
not count time spent waiting for a core and so stays steady on a shared machine.

Defaults: on CPU the tiny ``test_efficientnet`` at 256 px; on CUDA the config's backbone and image size.
``--smoke``: on the CPU, test_efficientnet at 32 px, batch 2, 2 micro-batches per pass, 2 rounds, W&B
disabled, with ``--breakdown``: every code path of the script, no meaningful figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from benchmarks.common import (
    REPO_ROOT,
    add_smoke_option,
    add_threads_option,
    describe_device,
    fold0_trainer,
    limit_cpu_threads,
    median,
    spread,
    synthetic_batches,
    timed,
    trainer_config,
)
from src.cli import run_cli
from src.config import load_config, override
from src.model import autocast, build_model, param_groups, resolve_device
from src.tracking import Tracker
from src.train import FoldParts, Trainer, TrainState

TARGET_SLOWDOWN = 0.05
CLOCKS = {"wall": "wall clock", "cpu": "process CPU time"}


class TimmStyleLoop:
    """The minimal loop timm's benchmark.py times, on the pipeline's network, loss and optimizer."""

    def __init__(self, parts: FoldParts):
        cfg = parts.cfg
        self.device, self.precision = parts.device, cfg.train.precision
        self.accum_steps, self.channels_last = cfg.train.accum_steps, cfg.model.channels_last
        self.model = build_model(cfg, parts.model.head.out_features).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.load_state_dict(parts.model.state_dict())  # same weights as the loop's network
        self.loss_fn = parts.loss_fn  # the same loss (also a label-embedding one); it holds no state
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.train.lr)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def run(self, batches, sync_loss: bool = False) -> None:
        """One pass over ``batches``; ``sync_loss`` adds the pipeline's per-step ``float(loss)``."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for index, (images, targets) in enumerate(batches):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.precision):
                outputs = self.model(images)
            loss = self.loss_fn(outputs.float(), targets) / self.accum_steps
            if self.scaler:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            if (index + 1) % self.accum_steps and index + 1 < len(batches):
                continue
            if sync_loss:
                float(loss.detach())
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class PipelineLoop:
    """``Trainer.train_epoch`` over in-memory batches, with parts optionally switched off.

    A variant is a Trainer over the same fold parts (network, optimizer, scheduler, scaler: one training
    run) with EMA dropped (``ema=None``) and/or its config's clipping off. All share the training state,
    so optimizer steps (and the tracker's step) keep counting up across variants."""

    def __init__(self, trainer: Trainer, tracker: Tracker | None, progress_file):
        self.tracker, self.progress_file = tracker, progress_file
        self.no_clip_cfg = override(trainer.cfg, **{"train.clip_grad": None})
        self.trainers: dict[tuple[bool, bool], Trainer] = {(True, True): trainer}

    def trainer(self, ema: bool = True, clip: bool = True) -> Trainer:
        """The Trainer with EMA and clipping as the config sets them (``ema``, ``clip``), or switched off."""
        if (ema, clip) not in self.trainers:
            full = self.trainers[True, True]
            parts = dataclasses.replace(full.parts, cfg=full.cfg if clip else self.no_clip_cfg,
                                        ema=full.parts.ema if ema else None)
            variant = Trainer(parts)
            variant.state = full.state
            self.trainers[ema, clip] = variant
        return self.trainers[ema, clip]

    def run(self, batches, tracker: bool = True, progress: bool = True, ema: bool = True, clip: bool = True) -> None:
        trainer = self.trainer(ema, clip)
        trainer.progress = progress
        with contextlib.redirect_stderr(self.progress_file):  # the tqdm bar goes to a log file
            trainer.train_epoch(batches, self.tracker if tracker else None)


def component_costs(parts: FoldParts, state: TrainState, tracker: Tracker, batch, progress_file,
                    repeats: int = 30) -> dict[str, float]:
    """Seconds per call of each thing ``train_epoch`` does once per optimizer step on top of a minimal loop,
    timed alone on the fold's own objects after a real backward (so gradients exist). Run last: it
    advances the EMA, the scheduler and the W&B step."""
    cfg, device = parts.cfg, parts.device
    tc = cfg.train
    images, targets = batch
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    parts.model.train()
    with autocast(device, tc.precision):
        outputs = parts.model(images)
    loss = parts.loss_fn(outputs.float(), targets)
    loss.backward()
    window_loss = loss.detach()
    bar = tqdm(total=10**9, file=progress_file, desc="bench")
    step = [state.step + 10]
    lr = parts.optimizer.param_groups[-1]["lr"]

    def log() -> None:
        step[0] += 1
        tracker.log({"train/loss": 0.5, "train/lr": lr, "train/images_per_s": 80.0, "train/epoch": 1.0}, step=step[0])

    extras = {
        "float(window_loss) (divergence check)": lambda: float(window_loss),
        "scheduler.step()": parts.scheduler.step,
        "tqdm set_postfix (redraws every step)": lambda: bar.set_postfix(loss=f"{0.5:.4f}", lr=f"{lr:.2e}",
                                                                         img_s=f"{80.0:.1f}"),
        f"tracker.log (W&B {cfg.wandb.mode})": log,
    }
    if tc.clip_grad:
        params = list(parts.model.parameters())
        extras["clip_grad_norm_ (unscale_ not incl.)"] = lambda: nn.utils.clip_grad_norm_(params, tc.clip_grad)
    if parts.ema:
        extras["EMA update"] = lambda: parts.ema.update(parts.model, step=step[0])
    costs = {}
    for name, fn in extras.items():
        fn()
        costs[name] = timed(lambda fn=fn: [fn() for _ in range(repeats)], device) / repeats
    bar.close()
    parts.optimizer.zero_grad(set_to_none=True)
    return costs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "hpa_nasnet512.yaml"))
    parser.add_argument("--backbone", help="timm model (default: test_efficientnet on CPU, the config's on CUDA)")
    parser.add_argument("--image-size", type=int, help="default: 256 on CPU, the config's on CUDA")
    parser.add_argument("--batch-size", type=int, help="default: the config's")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: the config's")
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="micro-batches per optimizer step (default 1: per-step overheads at their largest)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, help="micro-batches per timed pass (default: 20 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed micro-batches per side first (default: 3 CPU, 10 CUDA)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed passes per side")
    parser.add_argument("--no-ema", action="store_true", help="switch the config's EMA off")
    parser.add_argument("--no-clip", action="store_true", help="switch the config's gradient clipping off")
    parser.add_argument("--wandb", choices=["disabled", "offline"], help="tracker mode (default: the config's)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the loop without tracker / tqdm / EMA / clip, the baseline with "
                             "float(loss), and each loop extra alone")
    add_threads_option(parser)
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark=True (both sides)")
    add_smoke_option(parser, "test_efficientnet, 32 px, batch 2, 2 micro-batches x 2 rounds, with --breakdown")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.image_size, args.batch_size = args.backbone or "test_efficientnet", 32, 2
        args.steps, args.warmup, args.rounds, args.breakdown = 2, 1, 2, True
        args.wandb = args.wandb or "disabled"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_cpu_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = resolve_device("cpu" if args.smoke else "auto")
    on_cpu = device.type == "cpu"
    overrides = [f"train.device={device.type}", "model.pretrained=false", f"train.accum_steps={args.accum_steps}"]
    if args.backbone or on_cpu:
        overrides.append(f"model.backbone={args.backbone or 'test_efficientnet'}")
    if args.image_size or on_cpu:
        overrides.append(f"data.image_size={args.image_size or 256}")
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.channels_last:
        overrides.append("model.channels_last=true")
    if args.no_ema:
        overrides.append("train.ema=false")
    if args.no_clip:
        overrides.append("train.clip_grad=null")
    if args.wandb:
        overrides.append(f"wandb.mode={args.wandb}")
    steps = args.steps or (20 if on_cpu else 50)
    warmup = args.warmup if args.warmup is not None else (3 if on_cpu else 10)

    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        work_dir = Path(tmp)
        cfg = trainer_config(args.config, work_dir, overrides + args.overrides)
        checkpoint_every = load_config(args.config, args.overrides).train.checkpoint_every_steps
        tc = cfg.train
        trainer = fold0_trainer(cfg, progress=True)
        parts = trainer.parts
        tracker = Tracker(cfg, trainer.folder.fold(0), name="bench_train_step")
        baseline = TimmStyleLoop(parts)
        batches = synthetic_batches(steps, tc.batch_size, cfg.model.in_chans, cfg.data.image_size,
                                    cfg.data.num_classes, device)
        n_params = sum(p.numel() for p in parts.model.parameters())
        print(f"device      {describe_device(device)}; torch {torch.__version__}")
        print(f"model       {cfg.model.backbone} ({n_params / 1e6:.2f} M params) + modifier + head, "
              f"{cfg.model.in_chans} channels, {cfg.data.image_size} px, "
              f"{'channels_last' if cfg.model.channels_last else 'NCHW'}")
        print(f"training    batch {tc.batch_size} x accum {tc.accum_steps}, {tc.precision}, loss {cfg.loss.name}, "
              f"AdamW, clip {tc.clip_grad}, EMA {tc.ema}, W&B {cfg.wandb.mode}")
        print(f"timing      {steps} micro-batches per pass after {warmup} warm-up, {args.rounds} rounds, "
              f"alternating; data loading excluded", flush=True)
        if args.smoke:
            print("smoke run: tiny sizes on the CPU to check the script; the figures below measure nothing")

        progress_log = open(work_dir / "tqdm.log", "w")
        loop = PipelineLoop(trainer, tracker, progress_log)
        variants = {"pipeline loop": lambda b: loop.run(b), "timm-style": lambda b: baseline.run(b)}
        if args.breakdown:
            variants |= {
                "loop - tracker.log": lambda b: loop.run(b, tracker=False),
                "loop - tqdm": lambda b: loop.run(b, progress=False),
                "loop - EMA": lambda b: loop.run(b, ema=False),
                "loop - clip": lambda b: loop.run(b, clip=False),
                "loop - all four": lambda b: loop.run(b, tracker=False, progress=False, ema=False, clip=False),
                "timm-style + float(loss)": lambda b: baseline.run(b, sync_loss=True),
            }
        names = list(variants)
        for name in names:  # warm-up: allocator, autotuning, first-call costs
            variants[name](batches[:warmup] or batches[:1])

        images_per_pass = steps * tc.batch_size
        clocks = ["wall"] + (["cpu"] if on_cpu else [])
        speeds: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in names} for clock in clocks}
        print(f"\n{'round':<6}" + "".join(f"{name:>26}" for name in names) + "   (images/s, wall clock)")
        for round_index in range(args.rounds):
            shift = round_index % len(names)  # rotate the order: A B, B A, ...
            order = names[shift:] + names[:shift] if len(names) > 2 else names[::1 if round_index % 2 == 0 else -1]
            for name in order:
                cpu_start = time.process_time()
                seconds = timed(lambda run=variants[name]: run(batches), device)
                speeds["wall"][name].append(images_per_pass / seconds)
                if on_cpu:
                    speeds["cpu"][name].append(images_per_pass / (time.process_time() - cpu_start))
            print(f"{round_index + 1:<6}" + "".join(f"{speeds['wall'][name][-1]:>26.2f}" for name in names), flush=True)

        for clock in clocks:
            print(f"\n{'images/s, ' + CLOCKS[clock]:<26}{'median':>10}{'min..max':>16}{'vs timm-style':>15}"
                  f"{'paired ratio':>14}")
            base = speeds[clock]["timm-style"]
            for name in names:
                paired = median([s / b for s, b in zip(speeds[clock][name], base)])
                print(f"{name:<26}{median(speeds[clock][name]):>10.2f}{spread(speeds[clock][name]):>16}"
                      f"{median(speeds[clock][name]) / median(base):>15.3f}{paired:>14.3f}")
        print()
        for clock in clocks:
            loop_speeds, base = speeds[clock]["pipeline loop"], speeds[clock]["timm-style"]
            paired = median([s / b for s, b in zip(loop_speeds, base)])
            slower = 1 - paired
            verdict = "met" if slower <= TARGET_SLOWDOWN else "NOT met"
            print(f"{CLOCKS[clock]}: pipeline loop {median(loop_speeds):.2f} images/s, timm-style {median(base):.2f} "
                  f"images/s; ratio {paired:.3f} (median of paired rounds): the loop is "
                  f"{abs(100 * slower):.1f}% {'slower' if slower >= 0 else 'faster'}; "
                  f"target <= {100 * TARGET_SLOWDOWN:.0f}% slower: {verdict}")
        if on_cpu:
            print("(on a shared CPU the process-CPU-time figure is the steadier one: it does not count time the "
                  "process waited for a core)")

        # Periodic checkpoints are not in the figures above; say what they add at the config's interval.
        if checkpoint_every:
            save_seconds = timed(trainer.save, device)
            step_seconds = tc.accum_steps * tc.batch_size / median(speeds["wall"]["pipeline loop"])
            share = save_seconds / (save_seconds + checkpoint_every * step_seconds)
            print(f"checkpoint  last.pt every {checkpoint_every} optimizer steps (not timed above): "
                  f"{save_seconds:.2f} s per save, {100 * share:.2f}% of training time at this step time")
        if args.breakdown:
            step_seconds = tc.accum_steps * tc.batch_size / median(speeds[clocks[-1]]["pipeline loop"])
            print(f"\nper optimizer step extras of the loop, each timed alone ({step_seconds * 1e3:.1f} ms per step):")
            total = 0.0
            for name, seconds in component_costs(parts, trainer.state, tracker, batches[0], progress_log).items():
                total += seconds
                print(f"  {name:<40}{seconds * 1e3:>9.3f} ms{100 * seconds / step_seconds:>8.2f}%")
            print(f"  {'sum':<40}{total * 1e3:>9.3f} ms{100 * total / step_seconds:>8.2f}%")
        progress_log.close()
        tracker.finish()


if __name__ == "__main__":
    run_cli(main)
