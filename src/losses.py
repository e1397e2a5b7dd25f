"""Losses by name, and weighted mixes of them (``loss.name="bce+soft_f1"``, ``"0.5*bce+2*focal"``).

Every loss takes raw outputs and multi-hot targets and is computed in float32: the training loop calls it
outside the autocast region on ``outputs.float()``. A registry entry (:class:`LossKind`) also answers what the
stages ask of a loss beyond the loss itself: what it fits on the training labels before the network is built,
how many outputs the network has, how raw outputs become per-class scores, and what mixed samples' targets are
a mix of (mixup/cutmix). The losses on per-class logits (BCE, focal, soft-F1, Lovász hinge, hard-example BCE;
mixable) fit nothing and are scored by the sigmoid; ``label_embedding`` (alone only) fits
PMI/SVD label vectors, regresses onto them and is decoded with them. The names, and which mix, are also listed in
``src.config.LOSS_NAMES``: a config's ``loss.name`` is checked there when it is validated, without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from torch import nn
from torch.nn import functional as F
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


def lovasz_hinge_per_class(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lovász hinge (Berman et al. 2018) of each class's column over the batch, averaged over classes: the
    Lovász extension of the Jaccard loss applied to the hinge errors ``relu(1 - logit * sign)``. Per column the
    errors are sorted in decreasing order and weighted by the Jaccard loss's increments along that order
    (Berman's ``lovasz_grad``), as bestfitting's HPA loss does class by class. Soft targets (mixed samples) enter
    the signs and the Jaccard counts as fractions."""
    logits, targets = logits.float(), targets.float()
    errors = 1.0 - logits * (2.0 * targets - 1.0)
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)
    truth_sorted = torch.gather(targets, 0, order)
    positives = truth_sorted.sum(dim=0)
    # Jaccard loss of the first k errors of each column; the union is never below 1 (see Berman's lovasz_grad).
    jaccard = 1.0 - (positives - truth_sorted.cumsum(dim=0)) / (positives + (1.0 - truth_sorted).cumsum(dim=0))
    increments = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return (torch.relu(errors_sorted) * increments).sum(dim=0).mean()


class LovaszHinge(nn.Module):
    """Multilabel Lovász hinge, per class (:func:`lovasz_hinge_per_class`); ``symmetric``: the mean of the loss
    on (logits, targets) and on (-logits, 1 - targets), bestfitting's ``SymmetricLovaszLoss``, which also rewards
    getting the negatives of a class right."""

    def __init__(self, symmetric: bool = False):
        super().__init__()
        self.symmetric = symmetric

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = lovasz_hinge_per_class(logits, targets)
        if self.symmetric:
            loss = (loss + lovasz_hinge_per_class(-logits, 1.0 - targets.float())) / 2
        return loss


class HardBCE(nn.Module):
    """Hard-example log loss: the BCE of the ``fraction`` of a batch's label terms (samples x classes) with the
    largest BCE, averaged; 1 is plain BCE. The easy negatives that dominate a multilabel batch drop out."""

    def __init__(self, fraction: float):
        super().__init__()
        self.fraction = fraction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        terms = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").flatten()
        k = max(1, math.ceil(self.fraction * terms.numel()))
        return terms.topk(k, sorted=False).values.mean()


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
    # (the loss module, multi-hot targets) -> targets whose linear mix is the mix of two samples' targets
    # (src.augment.BatchMix mixes them with the images' weights): the targets themselves for per-class losses.
    mix_targets: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda loss, targets: targets


def _unit_embedding_rows(loss: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Multi-hot rows scaled so that each row times the label embedding is the unit vector the cosine loss
    regresses onto (a row without labels stays zero): a linear mix of two scaled rows, which the loss maps
    through the embedding, is then the same mix of the two samples' target vectors."""
    lengths = (targets.float() @ loss.embedding).norm(dim=1, keepdim=True)
    return targets.float() / lengths.clamp_min(loss.eps)


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
    # The HPA 2018 winner's losses (bestfitting: focal + symmetric Lovász + hard-example log loss; docs/winners.md).
    "lovasz": LossKind(lambda cfg, fitted: LovaszHinge()),
    "symmetric_lovasz": LossKind(lambda cfg, fitted: LovaszHinge(symmetric=True)),
    "hard_bce": LossKind(lambda cfg, fitted: HardBCE(cfg.hard_fraction)),
    # PMI -> SVD label vectors fitted on the training fold, cosine-proximity regression onto them, scores by
    # cosine similarity to every label vector (src.label_embedding).
    "label_embedding": LossKind(
        make=lambda cfg, fitted: _fitted(fitted, "build its loss").loss(), fit=_fit_label_embedding,
        load=LabelEmbedding.load, out_dim=lambda fitted: _fitted(fitted, "size the head").embedding.shape[1],
        scorer=lambda fitted: _fitted(fitted, "score outputs").decode, mix_targets=_unit_embedding_rows),
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
