"""Augmentation randomness under DataLoader workers.

albumentations 2.x draws from a private RNG inside each Compose (not numpy's or torch's global one), and
DataLoader workers are copies of the main process: without help, every worker replays the same
augmentation sequence, epoch after epoch. The pipeline reseeds the Compose per sample from the
``(index, seed)`` pairs of EpochSampler; these tests check the effect through real DataLoaders.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info

from src.augment import build_cpu_policy
from src.config import AugmentConfig
from src.dataset import EpochSampler, RGBYDataset, worker_init
from src.folds import make_folds
from src.formats import load_train_table
from src.train import Trainer, build_parts
from tests.conftest import tiny_config

IMAGE_SIZE = 32
N_COPIES = 16



def collate_with_worker(batch):
    """Default collation plus the id of the worker that built the batch (-1 in the main process)."""
    images, targets = default_collate(batch)
    info = get_worker_info()
    return images, targets, -1 if info is None else info.id


def loader(dataset, sampler=None, num_workers: int = 2, batch_size: int = 2) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      worker_init_fn=worker_init, collate_fn=collate_with_worker,
                      generator=torch.Generator().manual_seed(0))


def run_epoch(data_loader) -> tuple[list[torch.Tensor], list[int]]:
    """The images of one pass, one tensor per sample, and the worker that produced each."""
    images, workers = [], []
    for batch_images, _, worker in data_loader:
        images += list(batch_images)
        workers += [worker] * len(batch_images)
    return images, workers


def distinct(images: list[torch.Tensor]) -> int:
    return len({image.numpy().tobytes() for image in images})


@pytest.fixture
def train_table(tiny_cfg) -> pd.DataFrame:
    return load_train_table(tiny_cfg.data)


@pytest.fixture
def same_image_table(train_table) -> pd.DataFrame:
    """N_COPIES rows that all point to one image: any difference between outputs is augmentation."""
    row = train_table.iloc[0]
    return pd.DataFrame({"Id": [row["Id"]] * N_COPIES, "files": [row["files"]] * N_COPIES,
                         "labels": [row["labels"]] * N_COPIES})


@pytest.fixture
def augmented_copies(same_image_table) -> RGBYDataset:
    return RGBYDataset(same_image_table, 6, IMAGE_SIZE, build_cpu_policy(AugmentConfig()))


def test_augmentations_differ_within_an_epoch_and_across_workers(augmented_copies):
    sampler = EpochSampler(N_COPIES, seed=3)
    sampler.start_epoch()
    images, workers = run_epoch(loader(augmented_copies, sampler))
    assert sorted(set(workers)) == [0, 1]
    per_worker = {w: [im for im, iw in zip(images, workers) if iw == w] for w in (0, 1)}
    for worker, outputs in per_worker.items():
        assert distinct(outputs) > 1, f"worker {worker} repeated one augmentation"
    assert not all(torch.equal(a, b) for a, b in zip(per_worker[0], per_worker[1])), \
        "both workers produced the same augmentation sequence"
    assert distinct(images) >= N_COPIES * 3 // 4


def test_augmentations_differ_across_epochs_for_the_same_index(augmented_copies):
    sampler = EpochSampler(N_COPIES, seed=3)
    in_order, by_index = [], []
    for _ in range(2):
        sampler.start_epoch()
        order = [index for index, _ in sampler]
        images, _ = run_epoch(loader(augmented_copies, sampler))
        in_order.append(images)
        by_index.append(dict(zip(order, images)))
    same = [i for i in range(N_COPIES) if torch.equal(by_index[0][i], by_index[1][i])]
    assert len(same) <= N_COPIES // 4, f"indices {same} got the same augmentation in both epochs"
    # Workers are restarted each epoch from the main process: without reseeding, position k of every
    # epoch would get the same augmentation (whatever the sample).
    same_position = [k for k in range(N_COPIES) if torch.equal(in_order[0][k], in_order[1][k])]
    assert len(same_position) <= N_COPIES // 4, f"positions {same_position} repeat the previous epoch"


@pytest.mark.parametrize("num_samples, seed", [(1, 0), (23, 1), (48, 2)])
def test_epoch_sampler_yields_a_permutation_with_fresh_seeds_each_epoch(num_samples, seed):
    sampler = EpochSampler(num_samples, seed)
    epochs = []
    for _ in range(3):
        sampler.start_epoch()
        pairs = list(sampler)
        assert len(sampler) == len(pairs) == num_samples
        assert sorted(index for index, _ in pairs) == list(range(num_samples))
        epochs.append(pairs)
    if num_samples > 1:
        assert [i for i, _ in epochs[0]] != [i for i, _ in epochs[1]]  # a new order each epoch
        seeds = [dict(pairs) for pairs in epochs]
        assert all(seeds[0][i] != seeds[1][i] for i in range(num_samples))  # and new augmentations


def test_loader_sees_every_sample_once_per_epoch(train_table):
    # No augmentation, so every loaded image identifies its row; batch 5 leaves a short last batch.
    dataset = RGBYDataset(train_table, 6, IMAGE_SIZE)
    reference = [dataset[i][0].numpy().tobytes() for i in range(len(dataset))]
    assert len(set(reference)) == len(dataset), "the tiny images should be distinct"
    row_of = {image: row for row, image in enumerate(reference)}
    sampler = EpochSampler(len(dataset), seed=5)
    for _ in range(2):
        sampler.start_epoch()
        order = [index for index, _ in sampler]
        images, _ = run_epoch(loader(dataset, sampler, batch_size=5))
        seen = [row_of[image.numpy().tobytes()] for image in images]
        assert seen == order
        assert sorted(seen) == list(range(len(dataset)))


def trainer_batches(tiny_data, work_dir, *overrides, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches of the first ``epochs`` epochs, through the Trainer's own loader."""
    cfg = tiny_config(tiny_data, work_dir, *overrides)
    make_folds(cfg, progress=False)
    trainer = Trainer(build_parts(cfg, fold=0, progress=False), progress=False)
    sampler = trainer.parts.sampler
    assert trainer.parts.train_set.augment is not None and cfg.train.augment.d4 > 0
    batches = []
    for _ in range(epochs):
        batches += list(trainer.epoch_batches())
        sampler.epoch_state = sampler.generator.get_state()  # as train_epoch does at the end
    return batches


def test_same_seed_gives_identical_batches_whatever_the_worker_count(tiny_data, tmp_path):
    in_process = trainer_batches(tiny_data, tmp_path, "train.num_workers=0")
    in_workers = trainer_batches(tiny_data, tmp_path, "train.num_workers=2")
    again = trainer_batches(tiny_data, tmp_path, "train.num_workers=2")
    assert len(in_process) == len(in_workers) == len(again) > 2
    for i, ((im0, t0), (im2, t2), (im2b, t2b)) in enumerate(zip(in_process, in_workers, again)):
        assert torch.equal(im0, im2) and torch.equal(t0, t2), f"batch {i}: 0 vs 2 workers differ"
        assert torch.equal(im2, im2b) and torch.equal(t2, t2b), f"batch {i}: two identical loaders differ"
    other_seed = trainer_batches(tiny_data, tmp_path, "train.num_workers=0", "train.seed=7")
    assert not torch.equal(other_seed[0][0], in_process[0][0])


@pytest.mark.parametrize("skip", [0, 1, 8, 22])
def test_epoch_sampler_resumes_mid_epoch(skip):
    n = 23
    uninterrupted = EpochSampler(n, seed=11)
    interrupted = EpochSampler(n, seed=11)
    for epoch in range(2):  # resume inside the first and the second epoch
        uninterrupted.start_epoch()
        full = list(uninterrupted)
        interrupted.start_epoch()
        saved_state = interrupted.epoch_state.clone()  # what a checkpoint stores

        resumed = EpochSampler(n, seed=999)  # a fresh sampler, as after a restart; its seed must not matter
        resumed.start_epoch(saved_state, skip=skip)
        assert list(resumed) == full[skip:], f"epoch {epoch}"
        assert len(resumed) == n - skip
        assert torch.equal(resumed.epoch_state, saved_state)  # a second interruption resumes the same epoch
        list(interrupted)


def test_control_without_reseeding_workers_repeat_one_augmentation_sequence(augmented_copies):
    # What the reseeding fixes: plain indices (no seeds) leave each worker with its copy of the Compose's
    # private RNG, so worker 0 and worker 1 produce the same sequence of augmentations.
    images, workers = run_epoch(loader(augmented_copies, sampler=None, batch_size=2))
    per_worker = {w: [im for im, iw in zip(images, workers) if iw == w] for w in (0, 1)}
    assert len(per_worker[0]) == len(per_worker[1]) == N_COPIES // 2
    assert distinct(per_worker[0]) > 1  # a real random sequence...
    assert all(torch.equal(a, b) for a, b in zip(per_worker[0], per_worker[1]))  # ...replayed by both workers
