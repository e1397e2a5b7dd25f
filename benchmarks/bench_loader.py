"""Loader throughput per core: naive PNG decoding vs the pipeline's dataset on image files vs the packed cache.

    .venv/bin/python -m benchmarks.bench_loader [--samples 64] [--size 512] [--repeats 5]
    .venv/bin/python -m benchmarks.bench_loader --smoke   # tiny, seconds: every path, no meaningful figure

On one process and one thread (samples/s per core), over the same ``--samples`` synthetic 4-channel images
(the demo generator's, written as PNGs at ``--size``), each path timed ``--repeats`` times in alternation:

- naive: the four PNGs of a sample decoded with PIL and stacked (the baseline);
- dataset, image files: ``RGBYDataset`` without a cache (OpenCV decode), no augmentation / training policy;
- dataset, packed cache: ``RGBYDataset`` over ``src.pack``'s array, no augmentation / training policy;
- the same with the albumentations chain the policy replaced (D4, Affine, RandomBrightnessContrast,
  MultiplicativeNoise, RandomGamma, then a transpose), the "before" of ``src.augment``, measured in the same run.

Prints the median samples/s of each path and its ratio to the naive loader (target for the cache with
the training policy: at least 10x). Real HPA PNGs are larger than the synthetic ones and decode slower.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image

from benchmarks.common import REPO_ROOT, add_smoke_option
from src.config import load_config, run_cli
from src.data import RGBYDataset, build_augment, channel_paths, load_train_table
from src.demo import make_demo_dataset
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    add_smoke_option(parser, "8 samples of 32 px, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.size, args.repeats = 8, 32, 1
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        work = Path(tmp)
        data = make_demo_dataset(work / "data", n_train=args.samples, n_test=2, size=args.size, num_classes=28,
                                 seed=0, progress=False)
        cfg = load_config(REPO_ROOT / "configs" / "hpa_nasnet512.yaml", [
            f"data.dir={data}", f"data.image_size={args.size}", f"data.cache_dir={work / 'cache'}"])
        table = load_train_table(cfg.data)
        pack(cfg, workers=1, progress=False)
        policy = build_augment(cfg.train.augment, args.size)
        seeds = list(range(len(table)))
        n = cfg.data.num_classes
        paths = {
            "naive PNG decode (PIL), baseline": lambda: naive_read(table),
            "dataset, image files, no augmentation": lambda: dataset_read(RGBYDataset(table, n, args.size), seeds),
            "dataset, image files, training policy": lambda: dataset_read(
                RGBYDataset(table, n, args.size, policy), seeds),
            "dataset, packed cache, no augmentation": lambda: dataset_read(
                RGBYDataset(table, n, args.size, packed=open_packed(cfg.data, table)), seeds),
            "dataset, packed cache, albumentations chain (before)": lambda: dataset_read(
                RGBYDataset(table, n, args.size, ChainPolicy(), packed=open_packed(cfg.data, table)), seeds),
            "dataset, packed cache, training policy": lambda: dataset_read(
                RGBYDataset(table, n, args.size, policy, packed=open_packed(cfg.data, table)), seeds),
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every path alike
            for name, run in paths.items():
                start = time.perf_counter()
                run()
                rates[name].append(len(table) / (time.perf_counter() - start))
    baseline = statistics.median(rates["naive PNG decode (PIL), baseline"])
    print(f"{args.samples} samples, {args.size} px, 4 channels, 1 process, 1 thread; median of {args.repeats}")
    print(f"{'path':<54}{'samples/s':>11}{'x naive':>9}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<54}{rate:>11.1f}{rate / baseline:>9.1f}")
    policy_rate = statistics.median(rates["dataset, packed cache, training policy"])
    chain_rate = statistics.median(rates["dataset, packed cache, albumentations chain (before)"])
    print(f"training policy vs the albumentations chain it replaced: {policy_rate / chain_rate:.2f}x")
    cached = policy_rate / baseline
    print(f"packed cache + training policy: {cached:.1f}x the naive loader (target {TARGET_RATIO:.0f}x): "
          + ("met" if cached >= TARGET_RATIO else "not met"))


if __name__ == "__main__":
    run_cli(main)
