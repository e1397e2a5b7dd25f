"""Training on torch.distributed, on CPU with gloo: 2 processes x batch B end where 1 process x batch 2B ends,
OOF predictions gathered complete and once each, accumulation with DDP's no_sync equal to syncing every
micro-batch, and checkpoints that move between a 2-process and a 1-process run.

The network has no batch statistics (test_convnext: LayerNorm) and no dropout, the loss is per-sample (BCE;
soft macro-F1 is a batch statistic) and everything runs in fp32, so the two set-ups compute the same
gradients up to the order of float additions in the all-reduce. Tolerance: weights
within 1e-5 absolute after AdamW steps.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from src.config import Config, load_config
from src.train import Dist, Trainer, build_parts, train
from tests.conftest import REPO_ROOT, TINY_CLASSES
from tests.helpers import write_folds

pytestmark = pytest.mark.slow

N_TRAIN = 24  # 12 samples per rank: batches of 4, windows of 2 + 1 micro-batches = 2 steps per epoch
ATOL = 1e-5


def overrides(tiny_data: Path, work: Path, batch_size: int, *extra: str) -> list[str]:
    return [f"data.dir={tiny_data}", f"data.num_classes={TINY_CLASSES}", "data.image_size=32",
            f"folds.path={work / 'folds.csv'}", "folds.n_splits=2", "model.backbone=test_convnext",
            "model.pretrained=false", "model.modifier.feature_dropout=0", "model.drop_rate=0",
            "train.precision=fp32", f"train.batch_size={batch_size}", "train.accum_steps=2", "train.epochs=2",
            "train.device=cpu", "train.num_workers=0", "train.ema=true", "loss.name=bce", "wandb.mode=disabled",
            f"run.dir={work / 'run'}", *extra]


def config(tiny_data: Path, work: Path, batch_size: int, *extra: str) -> Config:
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides(tiny_data, work, batch_size, *extra))
    write_folds(cfg, N_TRAIN)
    return cfg


def train_two_processes(tiny_data: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    """``NPROC=2 bash scripts/train_fold.sh 0`` (torchrun, gloo) with per-process batch 4."""
    config(tiny_data, work, 4, *extra)  # writes the folds file
    env = dict(os.environ, NPROC="2", CONFIG="configs/demo.yaml", WANDB_SILENT="true")
    result = subprocess.run(["bash", "scripts/train_fold.sh", "0", *overrides(tiny_data, work, 4, *extra)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def assert_close_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory) -> Path:
    """The reference: one process, batch 8 (= 2 x 4), the same windows and samples per step."""
    work = tmp_path_factory.mktemp("one_process")
    train(config(tiny_data, work, 8), 0, progress=False)
    return work / "run" / "fold0"


def test_two_processes_end_where_one_process_with_twice_the_batch_ends(tiny_data, tmp_path, one_process):
    result = train_two_processes(tiny_data, tmp_path)
    assert "2 processes x batch 4 x 2 accumulation = 16 images per step" in result.stdout
    fold = tmp_path / "run" / "fold0"
    assert_close_weights(weights(fold / "last.pt"), weights(one_process / "last.pt"))
    assert_close_weights(weights(fold / "last.pt", "ema"), weights(one_process / "last.pt", "ema"))
    # The same files, written once (by rank 0), and the same history.
    assert sorted(p.name for p in fold.iterdir() if p.is_file()) == \
        sorted(p.name for p in one_process.iterdir() if p.is_file())
    ddp_history, reference = pd.read_csv(fold / "history.csv"), pd.read_csv(one_process / "history.csv")
    assert ddp_history["step"].tolist() == reference["step"].tolist() == [2, 4]
    np.testing.assert_allclose(ddp_history["val_loss"], reference["val_loss"], atol=1e-4)
    # OOF: every validation Id exactly once, in the folds file's order, the same scores.
    oof, reference_oof = pd.read_csv(fold / "oof.csv", dtype={"Id": str}), pd.read_csv(one_process / "oof.csv",
                                                                                       dtype={"Id": str})
    folds = pd.read_csv(tmp_path / "folds.csv", dtype={"Id": str})
    assert oof["Id"].tolist() == folds.loc[folds["fold"] == 0, "Id"].tolist()
    assert not oof["Id"].duplicated().any()
    np.testing.assert_allclose(oof.iloc[:, 1:].to_numpy(), reference_oof.iloc[:, 1:].to_numpy(), atol=1e-4)


def test_a_two_process_checkpoint_resumes_in_one_process(tiny_data, tmp_path, one_process):
    train_two_processes(tiny_data, tmp_path, "train.stop_after_steps=1")  # stopped mid-epoch
    last = tmp_path / "run" / "fold0" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert (saved["state"]["step"], saved["world_size"], len(saved["rng_ranks"])) == (1, 2, 2)
    assert not any(name.startswith("module.") for name in saved["model"])  # loads without DDP's prefix
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides(tiny_data, tmp_path, 8, "train.resume=true"))
    train(cfg, 0, progress=False)  # 1 process x batch 8: the same global batch
    assert_close_weights(weights(last), weights(one_process / "last.pt"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _AlwaysSync(torch.nn.Module):
    """DDP without its ``no_sync``: the loop then all-reduces after every micro-batch."""

    def __init__(self, ddp: torch.nn.Module):
        super().__init__()
        self.ddp = ddp

    def forward(self, images):
        return self.ddp(images)


def _no_sync_worker(rank: int, port: int, cfg: Config, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        results = {}
        for name in ("no_sync", "every_micro_batch"):
            parts = build_parts(cfg, 0, progress=False, dist=Dist(rank, 2, rank))
            if name == "every_micro_batch":
                parts.forward = _AlwaysSync(parts.forward)
            trainer = Trainer(parts, progress=False)
            trainer.train_epoch(trainer.epoch_batches())
            results[name] = {k: v.clone() for k, v in parts.model.state_dict().items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def test_accumulation_with_no_sync_equals_syncing_every_micro_batch(tiny_data, tmp_path):
    cfg = config(tiny_data, tmp_path, 4)
    out = tmp_path / "weights.pt"
    mp.spawn(_no_sync_worker, args=(_free_port(), cfg, str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    initial = build_parts(cfg, 0, progress=False).model.state_dict()
    assert any(not torch.equal(results["no_sync"][k], initial[k]) for k in initial)  # it trained
    assert_close_weights(results["no_sync"], results["every_micro_batch"])
