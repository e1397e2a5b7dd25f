"""Pretrained weights offline: the configured backbone's pretrained weights saved to one file, to upload as a Kaggle
dataset for notebooks without internet.

    python -m src.weights [--config FILE] [key=value ...] [--out FILE]

Creates ``model.backbone`` with timm's hub weights (this needs the network) exactly as timm ships them (3 input
channels, its own classifier) and saves its state dict, by default to ``weights/<backbone>.pth``. Then
``model.pretrained=<that file>`` loads it where there is no network through timm's own pretrained path
(:func:`src.model.create_backbone`): the first convolution adapted to ``model.in_chans`` by timm's
``adapt_input_conv`` and the classifier dropped, as ``model.pretrained=true`` does with the hub's copy.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError
from src.files import ensure_writable, write_atomic
from src.model import check_backbone

WEIGHTS_DIR = "weights"


def hub_model(backbone: str) -> nn.Module:
    """``backbone`` with timm's pretrained weights from the hub, as shipped (3 channels, its classifier)."""
    try:
        return timm.create_model(backbone, pretrained=True)
    except OSError as exc:  # no network, or no such weights on the hub
        raise PipelineError(f"could not fetch timm's pretrained weights for {backbone!r} ({type(exc).__name__}): "
                            "run python -m src.weights where the hub can be reached") from None


def save_weights(weights: nn.Module | dict, out: str | Path) -> Path:
    """Save a model's state dict (or a state dict) to ``out`` atomically, as a file ``model.pretrained`` loads."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    return write_atomic(Path(out), lambda tmp: torch.save(state, tmp))


def default_path(cfg: Config) -> Path:
    """``weights/<backbone>.pth`` (a prefixed name such as ``hf-hub:org/name`` flattened to one file name)."""
    return Path(WEIGHTS_DIR) / f"{cfg.model.backbone.replace(':', '-').replace('/', '-')}.pth"


def export_weights(cfg: Config, out: str | Path | None = None) -> Path:
    """Fetch ``model.backbone``'s pretrained weights and save them to ``out`` (default :func:`default_path`)."""
    check_backbone(cfg.model)
    out = Path(out) if out is not None else default_path(cfg)
    ensure_writable(out.parent, "the weights file")
    return save_weights(hub_model(cfg.model.backbone), out)


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"the weights file (default {WEIGHTS_DIR}/<backbone>.pth)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    path = export_weights(cfg, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): upload it as a Kaggle dataset and train with "
          f"model.pretrained=/kaggle/input/<dataset>/{path.name}")


if __name__ == "__main__":
    run_cli(main)
