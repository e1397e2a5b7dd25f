"""Pretrained weights offline (src.weights): the file it writes loads through model.pretrained=<file> with timm's
own 4-channel adaptation, as the hub's weights do."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from timm.models import adapt_input_conv

import src.weights
from src.cli import run_cli
from src.config import PipelineError, override
from src.files import save_config
from src.model import build_model
from src.weights import export_weights, main, save_weights


def hub_stand_in(backbone: str) -> torch.nn.Module:
    """What timm.create_model(pretrained=True) gives, without the hub: 3 channels and a classifier, seeded."""
    torch.manual_seed(7)
    return timm.create_model(backbone, pretrained=False)


def test_saved_weights_load_into_four_channels_as_timm_adapts_them(tiny_cfg, tmp_path):
    source = hub_stand_in("test_resnet")
    path = save_weights(source, tmp_path / "test_resnet.pth")
    model = build_model(override(tiny_cfg, **{"model.pretrained": str(path), "model.in_chans": 4}))
    loaded, shipped = model.backbone.state_dict(), source.state_dict()
    stem = source.pretrained_cfg["first_conv"] + ".weight"
    assert loaded[stem].shape[1] == 4
    assert torch.equal(loaded[stem], adapt_input_conv(4, shipped[stem]))  # timm's own adaptation, to the bit
    for name in ("conv1.1.weight", "layer1.0.conv1.weight", "layer4.0.bn2.running_var"):
        assert torch.equal(loaded[name], shipped[name]), name
    assert not any(name.startswith("fc.") and loaded[name].numel() for name in loaded)  # the classifier dropped


def test_the_command_writes_the_configured_backbone_and_says_how_to_use_it(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(src.weights, "hub_model", hub_stand_in)
    config_file = tmp_path / "config.yaml"
    save_config(tiny_cfg, config_file)
    out = tmp_path / "kaggle" / "w.pth"
    monkeypatch.setattr(sys, "argv", ["src.weights", "--config", str(config_file), "--out", str(out)])
    run_cli(main)
    assert "model.pretrained=/kaggle/input/<dataset>/w.pth" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved.keys() == hub_stand_in("test_resnet").state_dict().keys()

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.undo()  # the real hub_model, with the hub out of reach
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PipelineError, match="could not fetch timm's pretrained weights for 'test_resnet'"):
        export_weights(tiny_cfg, tmp_path / "none.pth")
    assert not (tmp_path / "none.pth").exists()
