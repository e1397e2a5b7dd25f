"""Losses by name, and weighted mixes of them (``loss.name="bce+soft_f1"``, ``"0.5*bce+2*focal"``).

Every loss takes raw outputs (logits) and multi-hot targets and is computed in float32: the training
loop calls it outside the autocast region on ``outputs.float()``.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from src.config import ConfigError, LossConfig


class SoftMacroF1Loss(nn.Module):
    """1 - soft macro-F1: per-class soft TP/FP/FN summed over the batch, F1 per class, mean over classes.

    The Dice form ``2TP / (2TP + FP + FN + eps)`` keeps a useful gradient near zero. On hard 0/1
    predictions it equals 1 - sklearn's macro-F1 (with ``zero_division=0``).
    """

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            probs = torch.sigmoid(logits.float())
            targets = targets.float()
            tp = (probs * targets).sum(dim=0)
            fp = (probs * (1 - targets)).sum(dim=0)
            fn = ((1 - probs) * targets).sum(dim=0)
            f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
            return 1 - f1.mean()


class FocalLoss(nn.Module):
    """Sigmoid focal loss (torchvision's), mean over samples and classes, no alpha weighting."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits.float(), targets.float(), alpha=-1, gamma=self.gamma, reduction="mean")


class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i(outputs, targets)."""

    def __init__(self, terms: list[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [weight for weight, _ in terms]
        self.terms = nn.ModuleList(loss for _, loss in terms)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(weight * loss(outputs, targets) for weight, loss in zip(self.weights, self.terms))


LOSSES = {
    "bce": lambda cfg: nn.BCEWithLogitsLoss(),
    "focal": lambda cfg: FocalLoss(cfg.focal_gamma),
    "soft_f1": lambda cfg: SoftMacroF1Loss(),
}


def parse_mix(name: str) -> list[tuple[float, str]]:
    """``"0.5*bce+soft_f1"`` -> ``[(0.5, "bce"), (1.0, "soft_f1")]``; unknown names are an error."""
    terms = []
    for part in name.replace(" ", "").split("+"):
        match = re.fullmatch(r"(?:((?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\*)?([a-z_0-9]+)", part)
        if not match or match.group(2) not in LOSSES:
            raise ConfigError(f"loss.name: {part!r} in {name!r} is not a loss; choose from {sorted(LOSSES)}, "
                              "optionally weighted and mixed, e.g. '0.5*bce+soft_f1', or 'label_embedding' alone")
        terms.append((float(match.group(1) or 1.0), match.group(2)))
    return terms


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss (or weighted mix) named by ``cfg.name``."""
    terms = [(weight, LOSSES[name](cfg)) for weight, name in parse_mix(cfg.name)]
    return terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedSum(terms)
