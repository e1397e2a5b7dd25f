"""python -m src.doctor: every part of the check printed, the estimate's real training steps on the CPU, and a GPU
this torch build has no kernels for reported with its fix (the device faked)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from src.config import override
from src.doctor import GIB, arch_supported, gpus, main, precision
from tests.conftest import REPO_ROOT, TINY_CLASSES, tiny_config
from tests.helpers import write_folds

CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14's CUDA 13.0 wheel


def test_doctor_prints_every_part_and_estimates_the_batch_and_times_from_real_steps(tiny_data, tmp_path,
                                                                                      monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no kaggle.json of this machine's user
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-to-be-printed")
    overrides = [f"data.dir={tiny_data}", f"data.num_classes={TINY_CLASSES}", "data.image_size=32",
                 f"folds.path={tmp_path / 'folds.csv'}", "folds.n_splits=2", f"data.cache_dir={tmp_path / 'cache'}",
                 "model.backbone=test_resnet", "train.device=cpu", "train.batch_size=8", "train.global_batch=8",
                 "train.epochs=3", "wandb.mode=disabled"]
    write_folds(tiny_config(tiny_data, tmp_path), 24)
    main(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *overrides, "--estimate", "--max-batch", "4",
          "--steps", "1"])
    out = capsys.readouterr().out
    assert "not-to-be-printed" not in out
    for expected in ("torch 2.", "CUDA", "cuDNN", "no GPU", "train.precision: auto -> ",
                     f"ok train table: {tiny_data / 'train.csv'}", "ok train images", "ok test table",
                     "ok folds file", "2 folds", "packed train not in", "no pretrained weights", "wandb.mode=disabled",
                     "kaggle CLI", "Kaggle credentials: KAGGLE_USERNAME and KAGGLE_KEY",
                     # the estimate: batch 8 capped at --max-batch 4, one timed step, the times it predicts
                     "synthetic uint8 batches of 4 x 32 x 32 on cpu", "s/step", "images/s", "GiB (process peak RSS)",
                     "largest batch that fits: 4 (--max-batch 4 reached)",
                     "24 training images per fold (48 x 1/2) = 6 steps per epoch", "fold (3 epochs)", "all 2 folds",
                     "train.batch_size=4 keeps train.global_batch=8 with accumulation 2"):
        assert expected in out, expected


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], archs: list[str]) -> None:
    """Pretend one CUDA card of ``capability`` is visible, under a torch build with kernels for ``archs``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(name=name, total_memory=16 * GIB))


def test_a_gpu_without_kernels_in_this_torch_build_is_reported_with_the_install_that_fixes_it(monkeypatch,
                                                                                             tiny_cfg):
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0), CUDA13_ARCHS)
    [report] = gpus()
    assert report.startswith("  !! GPU 0: Tesla P100-PCIE-16GB, compute capability 6.0, 16.0 GiB")
    assert "NO kernels for sm_60" in report
    assert "--index-url https://download.pytorch.org/whl/cu126" in report and "sm_60" in report
    # auto on that card: fp16 with the loss scaler
    [chosen] = precision(override(tiny_cfg, **{"train.device": "auto"}))
    assert "device cuda; train.precision: auto -> fp16" in chosen and "loss scaler" in chosen

    fake_gpu(monkeypatch, "Tesla T4", (7, 5), CUDA13_ARCHS)
    assert gpus()[0].startswith("  ok GPU 0: Tesla T4, compute capability 7.5")


@pytest.mark.parametrize("capability, archs, supported", [
    ((7, 5), CUDA13_ARCHS, True), ((6, 0), CUDA13_ARCHS, False), ((7, 0), CUDA13_ARCHS, False),
    ((8, 6), ["sm_80"], True),  # a cubin runs on later minors of its major
    ((8, 0), ["sm_86"], False), ((9, 0), ["sm_80"], False),
    ((10, 0), ["sm_80", "compute_90"], True),  # PTX is compiled for any later card
    ((12, 0), ["sm_90a", "sm_120"], True)])
def test_arch_support_follows_cubin_and_ptx_compatibility(capability, archs, supported):
    assert arch_supported(capability, archs) == supported
