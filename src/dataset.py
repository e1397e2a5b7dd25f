"""Samples as tensors: the dataset over a sample table (``src.data``), its per-epoch sampler and the
DataLoader of every stage. Images come from the packed cache (``src.pack``) when there is a fresh one, else
from their files (``src.images``)."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator

# albumentations asks PyPI for a newer version on import: never at run time (offline machines, Kaggle).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

from src.augment import to_chw  # noqa: E402
from src.data import DataError, label_csr  # noqa: E402
from src.images import read_image  # noqa: E402


class PackedImages:
    """Rows of packed uint8 arrays (``src.pack``), one per source, for the rows of a table. The arrays are
    memory-mapped lazily in each process (a memmap must not be pickled into DataLoader workers)."""

    def __init__(self, arrays: dict[str, tuple[str, tuple[int, ...]]], rows: list[tuple[str, int]]):
        self.arrays = arrays  # source name -> (array file, shape)
        self.rows = rows  # per table row: (source name, row in that source's array)
        self._open: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"arrays": self.arrays, "rows": self.rows, "_open": {}}

    def __getitem__(self, index: int) -> np.ndarray:
        name, row = self.rows[index]
        if name not in self._open:
            path, shape = self.arrays[name]
            self._open[name] = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        return np.array(self._open[name][row])


class RGBYDataset(Dataset):
    """Samples of a table as (uint8 C x H x W tensor, multi-hot float target).

    Items are addressed by ``(index, seed)`` pairs from :class:`EpochSampler` (or a plain index, for
    evaluation). The seed reseeds the augmentation pipeline for that one sample: albumentations keeps a
    private RNG that DataLoader workers do not reseed, so without this every worker and every epoch would
    repeat one augmentation sequence. Per-sample seeds also make a run independent of the worker count and
    let a resumed run replay exactly. With ``with_seeds`` (the policy runs on the training device, see
    ``src.augment.BatchAugment``) items are (image, target, seed) instead, the seed -1 when there is none.
    """

    def __init__(self, table: pd.DataFrame, num_classes: int, image_size: int,
                 augment: A.Compose | None = None, packed: PackedImages | None = None, channels: int | None = None,
                 with_seeds: bool = False):
        self.ids = table["Id"].tolist()
        self.files = table["files"].tolist()  # which files make a sample: the format's answer (src.formats)
        self.channels = channels  # one-file images are converted to this many channels (model.in_chans)
        if packed is not None and channels is not None:
            for path, shape in packed.arrays.values():
                if shape[-1] != channels:
                    raise DataError(f"the packed cache {path} holds {shape[-1]}-channel images, the model takes "
                                    f"model.in_chans={channels}: run `python -m src.pack` again (or "
                                    "data.cache_dir=null)")
        self.packed = packed  # the packed cache's rows of this table, when there is a fresh cache
        self.labels = table["labels"].tolist() if "labels" in table else [()] * len(table)
        self.num_classes = num_classes
        self.image_size = image_size
        self.augment = augment
        self.with_seeds = with_seeds

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        if self.packed is not None:
            image = self.packed[index]
        else:
            image = read_image(self.files[index], self.image_size, self.channels)
        if self.augment is not None:
            if seed is not None:
                self.augment.set_random_seed(seed)
            image = self.augment(image=image)["image"]  # C x H x W: the policy's last step transposes
        else:
            image = to_chw(image)
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        target[list(self.labels[index])] = 1.0
        if self.with_seeds:
            return torch.from_numpy(image), target, -1 if seed is None else seed
        return torch.from_numpy(image), target


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding ``(index, augmentation_seed)`` pairs.

    Everything random about the data order and augmentations comes from one ``torch.Generator`` whose
    state at the start of the epoch is checkpointed: a run resumed mid-epoch regenerates the same
    permutation and seeds and skips the ``skip`` samples already trained on. ``rank``/``world_size``
    shard the permutation for distributed training (padded so every rank sees the same count).

    With ``weights`` (one per sample, :func:`rarity_weights`) an epoch is instead ``num_samples`` draws with
    replacement, sample i drawn with probability ``weights[i] / sum(weights)``, from the same generator: the
    epoch keeps its length, resume and sharding stay exact (every rank draws the same sequence and takes its
    own slice of it), and each draw gets its own augmentation seed (a sample drawn twice is augmented twice).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: np.ndarray | None = None):
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_state = self.generator.get_state()
        self.skip = 0
        if weights is not None and (len(weights) != num_samples or not np.all(np.asarray(weights) > 0)):
            raise ValueError(f"sampler weights: expected {num_samples} positive weights, got {len(weights)} "
                             f"(smallest {np.min(weights) if len(weights) else None})")
        # Inverse-CDF sampling: a uniform draw u picks the first sample whose cumulative weight exceeds u x total.
        self.cumulative = None if weights is None else torch.as_tensor(np.cumsum(weights, dtype=np.float64))

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size) - self.skip

    def start_epoch(self, state: torch.Tensor | None = None, skip: int = 0) -> None:
        """Begin an epoch (from a saved generator state when resuming), skipping ``skip`` samples."""
        if state is not None:
            self.generator.set_state(state)
        self.epoch_state = self.generator.get_state()
        if self.cumulative is None:
            order = torch.randperm(self.num_samples, generator=self.generator)
            seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=self.generator)[order]
        else:
            total = self.cumulative[-1]
            draws = torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64) * total
            order = torch.searchsorted(self.cumulative, draws, right=True).clamp_(max=self.num_samples - 1)
            seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=self.generator)
        per_rank = math.ceil(self.num_samples / self.world_size)
        pad = per_rank * self.world_size - self.num_samples
        padded, padded_seeds = torch.cat([order, order[:pad]]), torch.cat([seeds, seeds[:pad]])
        self._pairs = list(zip(padded[self.rank :: self.world_size].tolist(),
                               padded_seeds[self.rank :: self.world_size].tolist()))[skip:]
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._pairs)


def rarity_weights(labels: pd.Series | list, num_classes: int, power: float) -> np.ndarray | None:
    """Per-sample draw weights for rare-class sampling: ``(1 / freq(rarest label of the sample)) ** power``,
    a label's frequency being the number of rows (of ``labels``) that carry it. A row with no label counts as
    carrying one more label, "none", whose frequency is the number of such rows. ``power`` 0 returns None: the
    uniform sampler itself, whose order equal weights would not reproduce."""
    if power == 0:
        return None
    matrix = label_csr(labels, num_classes)
    counts = np.bincount(matrix.indices, minlength=num_classes).astype(np.float64)
    empty = np.diff(matrix.indptr) == 0
    rarest = np.full(matrix.shape[0], float(empty.sum()))
    if (~empty).any():
        # min over each non-empty row's labels (an empty row's start equals the next row's: dropping it is safe)
        rarest[~empty] = np.minimum.reduceat(counts[matrix.indices], matrix.indptr[:-1][~empty])
    return rarest ** -float(power)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, device: torch.device,
                sampler: EpochSampler | None = None, persistent: bool = False) -> DataLoader:
    """The DataLoader of every stage. With an :class:`EpochSampler` (training) only full batches are
    yielded (drop_last); without one (evaluation) every sample, in table order. Batches are pinned on CUDA
    (for non-blocking copies). ``persistent``: the workers outlive an iteration, for a loader iterated once
    per epoch (the sampler runs in the main process, so a new epoch's order and seeds, or a resume's skip,
    reach the same workers)."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=sampler is not None,
        num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
        # Its own generator: creating an iterator must not draw from the global torch RNG, or a run
        # resumed mid-epoch would see different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=persistent and num_workers > 0, prefetch_factor=4 if num_workers else None,
    )


def worker_init(worker_id: int) -> None:
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
