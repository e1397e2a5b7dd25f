"""Pieces the benchmark scripts share: synthetic batches, a real Trainer over in-memory batches, timing.

The training benchmarks time ``Trainer.train_epoch`` itself with data loading excluded: the fold's parts
(``src.train.build_parts``) are built from a config over a tiny demo dataset (its images are never read)
and ``train_epoch`` is handed a list of uint8 batches already in memory, so what is timed is the loop:
autocast, fp32 loss, accumulation windows, grad scaler, clipping, scheduler, EMA, tqdm and logging.

Every script has a ``--smoke`` mode: the same code path at tiny sizes on the CPU in seconds, writing only
to a temp folder; ``tests/test_benchmarks.py`` runs each one so that a benchmark the code breaks fails CI.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from src.config import Config, load_config, override
from src.demo import make_demo_dataset
from src.train import Trainer, build_parts

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS CPU threads (default 1; 0: the libraries' defaults). On a small "
                             "shared CPU box, OpenMP threads spin-waiting for each other make steps several "
                             "times slower and far noisier")


def add_smoke_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help=f"check the script end to end in seconds on the CPU ({what}); writes only to a "
                             "temp folder. Its figures say nothing about performance")


def limit_cpu_threads(threads: int) -> None:
    """Apply ``--threads`` on a CPU run: torch's intra-op threads and numpy/sklearn BLAS alike."""
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
        threadpool_limits(threads)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock intervals cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synthetic_batches(count: int, batch_size: int, in_chans: int, image_size: int, num_classes: int,
                      device: torch.device, distinct: int = 4, seed: int = 0
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (uint8 N x C x H x W images, multi-hot float targets) batches, as the DataLoader yields
    them, already on ``device``. Only ``distinct`` different batches are made and then repeated: the
    content does not change the cost of a step, and big GPU batches stay cheap to hold."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(min(count, distinct)):
        images = torch.randint(0, 256, (batch_size, in_chans, image_size, image_size), generator=generator,
                               dtype=torch.uint8)
        targets = (torch.rand(batch_size, num_classes, generator=generator) < 0.1).float()
        made.append((images.to(device), targets.to(device)))
    return [made[i % len(made)] for i in range(count)]


def trainer_config(config: str | Path, work_dir: Path, overrides: list[str]) -> Config:
    """``config`` with ``overrides``, pointed at a tiny demo dataset, fold file and run folder under
    ``work_dir``. The dataset only lets the Trainer be constructed: batches come from memory."""
    cfg = load_config(config, overrides)
    n_samples = cfg.train.batch_size + 2  # one full training batch, two validation samples
    data_dir = make_demo_dataset(work_dir / "data", n_train=n_samples, n_test=2, size=32,
                                 num_classes=cfg.data.num_classes, seed=0, progress=False)
    ids = pd.read_csv(data_dir / "train.csv", dtype={"Id": str})["Id"]
    folds_path = work_dir / "folds.csv"
    pd.DataFrame({"Id": ids, "fold": [1] * (len(ids) - 2) + [0, 0]}).to_csv(folds_path, index=False)
    return override(cfg, **{
        "data.dir": str(data_dir), "folds.path": str(folds_path), "run.dir": str(work_dir / "run"),
        "train.num_workers": 0, "train.resume": False, "train.stop_after_steps": None,
        # Periodic checkpoints are timed separately (a file write every N steps is not the step loop).
        "train.checkpoint_every_steps": 0,
    })


def fold0_trainer(cfg: Config, progress: bool = False) -> Trainer:
    """The real Trainer of fold 0 of a :func:`trainer_config` config. Hand its ``train_epoch`` a list of
    in-memory batches; swap what a benchmark studies through ``trainer.parts`` (e.g. ``parts.ema = None``)."""
    return Trainer(build_parts(cfg, fold=0, progress=False), progress=progress)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GiB"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """min..max of a list of figures, for judging the noise next to a median."""
    return f"{min(values):.1f}..{max(values):.1f}" if values else "-"


# -- peak memory of the running process (Linux /proc; elsewhere ru_maxrss, the peak so far) --------------------
GIB = 2**30


def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (VmHWM) so a later reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in GiB, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def peak_rss_gib() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (or process start), in GiB."""
    peak = status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


@contextmanager
def work_folder(given: str | None, prefix: str) -> Iterator[Path]:
    """The benchmark's work folder: ``given`` (``--work-dir``, kept and reused), else a temp folder removed
    afterwards."""
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)
