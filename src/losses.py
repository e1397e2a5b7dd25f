"""Losses by name, and weighted mixes of them (``loss.name="bce+soft_f1"``, ``"0.5*bce+2*focal"``).

Every loss takes raw outputs and multi-hot targets and is computed in float32: the training loop calls it
outside the autocast region on ``outputs.float()``. A registry entry (:class:`LossKind`) also answers what the
stages ask of a loss beyond the loss itself: what it fits on the training labels before the network is built,
how many outputs the network has, and how raw outputs become per-class scores. The losses on per-class logits
(BCE, focal, soft-F1; mixable) fit nothing and are scored by the sigmoid; ``label_embedding`` (alone only) fits
PMI/SVD label vectors, regresses onto them and is decoded with them. The names, and which mix, are also listed in
``src.config.LOSS_NAMES``: a config's ``loss.name`` is checked there when it is validated, without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from src.config import Config, LossConfig, loss_terms
from src.label_embedding import LabelEmbedding


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


Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LossKind:
    """A registry entry: what the stages ask of a loss, by its name (each also in ``src.config.LOSS_NAMES``, which
    says whether it mixes with the others). The defaults are those of a loss on per-class logits: nothing fitted,
    one output per class, scored by the sigmoid."""

    # (loss config, fitted state or None) -> the loss module.
    make: Callable[[LossConfig, LabelEmbedding | None], nn.Module]
    # (config, the training fold's label column, verbose) -> the state the loss needs before the network is
    # built. Training saves it in the fold folder (src.run_folder) so prediction scores with the same state.
    fit: Callable[[Config, Sequence[Sequence[int]], bool], LabelEmbedding | None] = lambda cfg, labels, verbose: None
    # Saved fitted state file -> the state; None: the loss fits nothing, so there is nothing to load.
    load: Callable[[Path], LabelEmbedding] | None = None
    # Fitted state -> the network's output size (None: one output per class).
    out_dim: Callable[[LabelEmbedding | None], int | None] = lambda fitted: None
    # Fitted state -> how raw network outputs become per-class scores in [0, 1].
    scorer: Callable[[LabelEmbedding | None], Scorer] = lambda fitted: expit


def _fit_label_embedding(cfg: Config, labels: Sequence[Sequence[int]], verbose: bool) -> LabelEmbedding:
    lc = cfg.loss
    return LabelEmbedding.fit(labels, cfg.data.num_classes, dim=min(lc.embedding_dim, cfg.data.num_classes),
                              positive=lc.pmi_positive, smoothing=lc.pmi_smoothing, seed=cfg.train.seed,
                              verbose=verbose)


def _fitted(embedding: LabelEmbedding | None, what: str) -> LabelEmbedding:
    if embedding is None:
        raise ValueError(f"loss.name=label_embedding needs the fold's label embedding to {what}")
    return embedding


LOSSES = {
    "bce": LossKind(lambda cfg, fitted: nn.BCEWithLogitsLoss()),
    "focal": LossKind(lambda cfg, fitted: FocalLoss(cfg.focal_gamma)),
    "soft_f1": LossKind(lambda cfg, fitted: SoftMacroF1Loss()),
    # PMI -> SVD label vectors fitted on the training fold, cosine-proximity regression onto them, scores by
    # cosine similarity to every label vector (src.label_embedding).
    "label_embedding": LossKind(
        make=lambda cfg, fitted: _fitted(fitted, "build its loss").loss(), fit=_fit_label_embedding,
        load=LabelEmbedding.load, out_dim=lambda fitted: _fitted(fitted, "size the head").embedding.shape[1],
        scorer=lambda fitted: _fitted(fitted, "score outputs").decode),
}


def loss_kind(name: str) -> LossKind:
    """The registry entry of ``loss.name``: the loss that stands alone, or for a mix its first term's (every
    mixable loss works on per-class logits, so any term answers for the mix)."""
    return LOSSES[loss_terms(name)[0][1]]


def build_loss(cfg: LossConfig, fitted: LabelEmbedding | None = None) -> nn.Module:
    """The loss (or weighted mix) named by ``cfg.name``; ``fitted``: what its entry fitted on the training
    labels (:attr:`LossKind.fit`), for a loss that needs it."""
    terms = [(weight, LOSSES[name].make(cfg, fitted)) for weight, name in loss_terms(cfg.name)]
    return terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedSum(terms)


def output_scorer(cfg: LossConfig, fitted: LabelEmbedding | None = None) -> Scorer:
    """Raw network outputs -> per-class scores in [0, 1] under loss ``cfg.name``: the sigmoid, or for
    ``label_embedding`` the cosine similarity to every label vector of ``fitted``, mapped to [0, 1]."""
    return loss_kind(cfg.name).scorer(fitted)
