"""GPU readiness, checked on the CPU: per-cell activation checkpointing for NASNet, the compiled training
step's wiring, loaders kept across epochs, channels_last under every TTA view."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.config import PipelineError
from src.folds import make_folds
from src.model import enable_grad_checkpointing, infer
from src.train import Trainer, build_parts
from tests.conftest import tiny_config


def tiny_nasnet() -> nn.Module:
    """timm's NASNet-A-Large class (the main config's backbone) at a few thousandths of its width."""
    return timm.create_model("nasnetalarge", in_chans=4, num_classes=0, stem_size=8, num_features=96)


def test_nasnet_is_checkpointed_per_cell_with_the_same_gradients_and_names():
    torch.manual_seed(0)
    plain = tiny_nasnet()
    checkpointed = copy.deepcopy(plain)
    assert enable_grad_checkpointing(checkpointed, "nasnetalarge") == "per cell"  # timm's NASNet asserts
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    calls = []
    checkpointed.cell_0.conv_1x1.register_forward_hook(lambda *_: calls.append(1))
    images = torch.randn(2, 4, 32, 32)
    plain(images).square().sum().backward()
    checkpointed(images).square().sum().backward()
    assert len(calls) == 2  # the cell ran again in the backward pass: its activations were not kept
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    copied = copy.deepcopy(checkpointed.cell_0)  # timm's EMA is a deep copy: its cells must run their own weights
    assert copied.forward.__self__ is copied
    checkpointed.eval()
    with torch.no_grad():
        calls.clear()
        checkpointed(images)
        assert len(calls) == 1


def test_grad_checkpointing_uses_timms_where_it_exists_and_refuses_a_backbone_without_either():
    assert enable_grad_checkpointing(timm.create_model("test_resnet", num_classes=0), "test_resnet") == "timm"
    with pytest.raises(PipelineError, match="model.grad_checkpointing: plain"):
        enable_grad_checkpointing(nn.Sequential(nn.Conv2d(4, 8, 3)), "plain")


def test_compile_wraps_the_training_step_and_leaves_the_saved_model_plain(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "model.compile=true", "train.num_workers=2")
    make_folds(cfg, progress=False)
    trainer = Trainer(build_parts(cfg, fold=0, progress=False), progress=False)
    parts = trainer.parts
    # torch.compile is lazy: nothing compiles until a step runs (minutes on a CPU, so no step here)
    assert isinstance(parts.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert parts.forward._orig_mod is parts.model
    assert not any(key.startswith("_orig_mod") for key in trainer.checkpoint()["model"])
    # Loaders are built once per run and iterated every epoch, with workers that persist.
    loader = trainer.epoch_batches()
    assert loader.persistent_workers and trainer.epoch_batches() is loader
    parts.train_set = copy.copy(parts.train_set)  # a swapped dataset gets a loader of its own
    assert trainer.epoch_batches() is not loader


class RecordsMemoryFormat(nn.Module):
    def __init__(self):
        super().__init__()
        self.channels_last = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.channels_last.append(images.is_contiguous(memory_format=torch.channels_last))
        return images.float().mean(dim=(2, 3))


def test_every_tta_view_reaches_the_model_in_channels_last():
    images = torch.randint(0, 256, (2, 4, 8, 6), dtype=torch.uint8)  # not square: rotations change the shape
    model = RecordsMemoryFormat()
    loader = DataLoader(TensorDataset(images, torch.zeros(2, 4)), batch_size=2)
    infer(model, loader, torch.device("cpu"), channels_last=True, views=("identity", "rot90", "flip_rot270"),
          progress=False)
    assert model.channels_last == [True, True, True]
