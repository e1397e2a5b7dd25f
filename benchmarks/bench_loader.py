"""Loader throughput per core: naive PNG decoding vs the pipeline's dataset on image files vs the packed cache.

    .venv/bin/python -m benchmarks.bench_loader [--samples 64] [--size 512] [--repeats 5] [--batch-size 16]
    .venv/bin/python -m benchmarks.bench_loader --smoke   # tiny, seconds: every path, no meaningful figure

On one process and one thread (samples/s per core), over the same ``--samples`` synthetic 4-channel images
(the demo generator's, written as PNGs at ``--size``), each path timed ``--repeats`` times in alternation:

- naive: the four PNGs of a sample decoded with PIL and stacked (the baseline);
- dataset, image files: ``RGBYDataset`` without a cache (OpenCV decode), no augmentation / training policy;
- dataset, packed cache: ``RGBYDataset`` over ``src.pack``'s array, no augmentation / training policy;
- the same with the albumentations chain the policy replaced (D4, Affine, RandomBrightnessContrast,
  MultiplicativeNoise, RandomGamma, then a transpose), the "before" of ``src.augment``, measured in the same run;
- dataset, packed cache, device-side policy (``train.augment.where=device``): what the workers still do (read,
  transpose, hand on the seed); and the policy itself on batches of ``--batch-size`` on the training device
  (``BatchAugment``; the GPU when there is one; on a CPU this row is the CPU's cost, not a GPU's).

Prints the median samples/s of each path and its ratio to the naive loader (target for the cache with
the training policy: at least 10x). Real HPA PNGs are larger than the synthetic ones and decode slower.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from benchmarks.common import REPO_ROOT, add_smoke_option, timed
from src.augment import BatchAugment, build_cpu_policy
from src.cli import run_cli
from src.config import Config, load_config
from src.dataset import RGBYDataset
from src.demo import make_demo_dataset
from src.formats import load_train_table
from src.images import channel_paths
from src.pack import open_packed, pack

TARGET_RATIO = 10.0


def naive_read(table) -> None:
    for image_dir, sample_id in zip(table["image_dir"], table["Id"]):
        planes = []
        for path in channel_paths(image_dir, sample_id):
            with Image.open(path) as image:
                planes.append(np.asarray(image))
        np.stack(planes, axis=-1)


class ChainPolicy:
    """The albumentations chain the training policy replaced (one transform per step, each a full pass over
    the image), C x H x W out as the dataset wants it: the "before" of src.augment, for comparison."""

    def __init__(self):
        self.compose = A.Compose([
            A.D4(p=1.0),
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45),
                     border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.RandomBrightnessContrast(0.1, 0.1, p=0.3),
            A.MultiplicativeNoise((0.9, 1.1), per_channel=True, elementwise=False, p=0.3),
            A.RandomGamma((80, 120), p=0.3)])

    def set_random_seed(self, seed: int) -> None:
        self.compose.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> dict:
        return {"image": np.ascontiguousarray(self.compose(image=image)["image"].transpose(2, 0, 1))}


def dataset_read(dataset: RGBYDataset, seeds: list[int]) -> None:
    for index, seed in enumerate(seeds):
        dataset[(index, seed)]


NAIVE = "naive PNG decode (PIL), baseline"
CACHE_POLICY = "dataset, packed cache, training policy"
CACHE_CHAIN = "dataset, packed cache, albumentations chain (before)"
CACHE_DEVICE = "dataset, packed cache, device-side policy: loader part"


def prepare(work: Path, samples: int, size: int) -> tuple[Config, pd.DataFrame]:
    """``samples`` synthetic 4-channel demo images as PNGs at ``size`` px under ``work``, and their packed cache."""
    data = make_demo_dataset(work / "data", n_train=samples, n_test=2, size=size, num_classes=28, seed=0,
                             progress=False)
    cfg = load_config(REPO_ROOT / "configs" / "hpa_nasnet512.yaml", [
        f"data.dir={data}", f"data.image_size={size}", f"data.cache_dir={work / 'cache'}"])
    pack(cfg, workers=1, progress=False)
    return cfg, load_train_table(cfg.data)


def loader_paths(cfg: Config, table: pd.DataFrame, names: list[str] | None = None) -> dict[str, Callable[[], None]]:
    """Each loader path as a function that reads every row of ``table`` once (all paths, or ``names``)."""
    n, size, seeds = cfg.data.num_classes, cfg.data.image_size, list(range(len(table)))
    policy = build_cpu_policy(cfg.train.augment)

    def cached(**kwargs) -> Callable[[], None]:
        return lambda: dataset_read(RGBYDataset(table, n, size, packed=open_packed(cfg.data, table), **kwargs), seeds)

    paths = {
        NAIVE: lambda: naive_read(table),
        "dataset, image files, no augmentation": lambda: dataset_read(RGBYDataset(table, n, size), seeds),
        "dataset, image files, training policy": lambda: dataset_read(RGBYDataset(table, n, size, policy), seeds),
        "dataset, packed cache, no augmentation": cached(),
        CACHE_CHAIN: cached(augment=ChainPolicy()),
        CACHE_POLICY: cached(augment=policy),
        CACHE_DEVICE: cached(with_seeds=True),  # the workers only read; the policy runs on the batch
    }
    return {name: run for name, run in paths.items() if names is None or name in names}


def measure(paths: dict[str, Callable[[], None]], samples: int, repeats: int) -> dict[str, list[float]]:
    """Samples/s of each path, ``repeats`` times in alternation (drift on a shared machine hits all alike)."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            rates[name].append(samples / (time.perf_counter() - start))
    return rates


def batch_policy_rates(cfg: Config, table: pd.DataFrame, device: torch.device, batch_size: int,
                       repeats: int) -> list[float]:
    """Samples/s of the device-side policy (``BatchAugment``) on ``device``, over batches of the cached images."""
    dataset = RGBYDataset(table, cfg.data.num_classes, cfg.data.image_size, packed=open_packed(cfg.data, table))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    batches = [images[i : i + batch_size].to(device) for i in range(0, len(images) - batch_size + 1, batch_size)]
    if not batches:
        batches = [images.to(device)]
    augment, rates = BatchAugment(cfg.train.augment), []
    for repeat in range(repeats + 1):  # the first pass warms up (kernels, allocator) and is not counted
        seconds = 0.0
        for i, batch in enumerate(batches):
            seeds = torch.arange(len(batch)) + len(images) * repeat + i * batch_size  # fresh draws each pass
            seconds += timed(lambda batch=batch, seeds=seeds: augment(batch, seeds), device)
        if repeat:
            rates.append(sum(len(b) for b in batches) / seconds)
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the device-side policy")
    add_smoke_option(parser, "8 samples of 32 px, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.size, args.repeats, args.batch_size = 8, 32, 1, 4
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        cfg, table = prepare(Path(tmp), args.samples, args.size)
        rates = measure(loader_paths(cfg, table), len(table), args.repeats)
        on_device = batch_policy_rates(cfg, table, device, args.batch_size, args.repeats)
    baseline = statistics.median(rates[NAIVE])
    print(f"{args.samples} samples, {args.size} px, 4 channels, 1 process, 1 thread; median of {args.repeats}")
    print(f"{'path':<58}{'samples/s':>11}{'x naive':>9}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<58}{rate:>11.1f}{rate / baseline:>9.1f}")
    device_name = f"device-side policy on the batch ({device.type}, batch {args.batch_size})"
    print(f"{device_name:<58}{statistics.median(on_device):>11.1f}{'-':>9}")
    policy_rate, chain_rate = statistics.median(rates[CACHE_POLICY]), statistics.median(rates[CACHE_CHAIN])
    print(f"training policy vs the albumentations chain it replaced: {policy_rate / chain_rate:.2f}x")
    for what, rate in (("packed cache + training policy", policy_rate),
                       ("packed cache + device-side policy (loader part)", statistics.median(rates[CACHE_DEVICE]))):
        ratio = rate / baseline
        print(f"{what}: {ratio:.1f}x the naive loader (target {TARGET_RATIO:.0f}x): "
              + ("met" if ratio >= TARGET_RATIO else "not met"))


if __name__ == "__main__":
    run_cli(main)
