"""Losses: soft macro-F1 against sklearn, gradients through the real model, fp32 under autocast, mixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from src.config import LOSS_NAMES, ConfigError, LossConfig, build_config, loss_terms
from src.losses import LOSSES, FocalLoss, SoftMacroF1Loss, build_loss, loss_kind
from src.model import build_model

HARD_LOGIT = 50.0  # sigmoid(+-50) is 0/1 to well within float32 tolerance



def hard_logits(predictions: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(predictions, HARD_LOGIT, -HARD_LOGIT).astype(np.float32))


def random_case(seed: int, n: int = 16, m: int = 6, absent_class: int | None = None):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, m)) < 0.3
    predicted = rng.random((n, m)) < 0.3
    if absent_class is not None:
        truth[:, absent_class] = False
    return truth, predicted


@pytest.mark.parametrize("seed", range(5))
def test_soft_f1_on_hard_predictions_equals_one_minus_sklearn_macro_f1(seed):
    truth, predicted = random_case(seed, absent_class=seed % 6)
    expected = 1 - f1_score(truth, predicted, average="macro", zero_division=0)
    loss = SoftMacroF1Loss()(hard_logits(predicted), torch.from_numpy(truth.astype(np.float32)))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_soft_f1_class_absent_and_never_predicted_counts_as_zero():
    # A class with no positives and no predictions scores 0 (zero_division=0), not 1: the loss of
    # otherwise perfect predictions is then 1/m, as sklearn says.
    truth, _ = random_case(0, absent_class=2)
    truth[:, 0] = True  # make sure every other class has positives
    expected = 1 - f1_score(truth, truth, average="macro", zero_division=0)
    assert expected == pytest.approx(1 / truth.shape[1])
    loss = SoftMacroF1Loss()(hard_logits(truth), torch.from_numpy(truth.astype(np.float32)))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_soft_f1_gradient_reaches_head_and_backbone(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    images = torch.randint(0, 256, (8, 4, 32, 32), dtype=torch.uint8)
    targets = (torch.rand(8, tiny_cfg.data.num_classes) < 0.4).float()
    SoftMacroF1Loss()(model(images), targets).backward()
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    for name, grad in (("head.weight", model.head.weight.grad), ("head.bias", model.head.bias.grad),
                       ("first backbone conv", first_conv.weight.grad)):
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_soft_f1_is_float32_under_bf16_autocast(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    images = torch.randint(0, 256, (8, 4, 32, 32), dtype=torch.uint8)
    targets = (torch.rand(8, tiny_cfg.data.num_classes) < 0.4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        loss = SoftMacroF1Loss()(logits, targets)
    assert logits.dtype == torch.bfloat16  # else the test would not exercise the autocast path
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, SoftMacroF1Loss()(logits.float(), targets))


def test_loss_terms_reads_names_and_weights():
    assert loss_terms("bce+soft_f1") == [(1.0, "bce"), (1.0, "soft_f1")]
    assert loss_terms("0.5*bce + 2*focal") == [(0.5, "bce"), (2.0, "focal")]
    assert loss_terms("soft_f1") == [(1.0, "soft_f1")]
    assert loss_terms("1e-1*bce+.5*soft_f1") == [(0.1, "bce"), (0.5, "soft_f1")]
    assert loss_terms("label_embedding") == [(1.0, "label_embedding")]


def test_the_configs_loss_names_are_the_registry():
    """src.config checks loss.name without importing torch, against its own table: the registry's names, each
    mixing (a mix of them builds) or standing alone as the table says."""
    assert set(LOSS_NAMES) == set(LOSSES)
    mixable = [name for name, mixes in LOSS_NAMES.items() if mixes]
    assert isinstance(build_loss(LossConfig(name="+".join(mixable))), nn.Module)
    for name, mixes in LOSS_NAMES.items():
        assert loss_kind(name) is LOSSES[name]
        if not mixes:
            with pytest.raises(ValueError, match=f"or '{name}' alone"):
                loss_terms(f"bce+{name}")


def test_build_loss_applies_the_weights_of_a_mix():
    torch.manual_seed(0)
    logits = torch.randn(10, 6)
    targets = (torch.rand(10, 6) < 0.3).float()
    bce = nn.BCEWithLogitsLoss()(logits, targets)
    focal = FocalLoss(gamma=1.5)(logits, targets)
    soft_f1 = SoftMacroF1Loss()(logits, targets)
    mixed = build_loss(LossConfig(name="0.5*bce+2*focal", focal_gamma=1.5))(logits, targets)
    torch.testing.assert_close(mixed, 0.5 * bce + 2 * focal)
    torch.testing.assert_close(build_loss(LossConfig(name="bce+soft_f1"))(logits, targets), bce + soft_f1)
    torch.testing.assert_close(build_loss(LossConfig(name="bce"))(logits, targets), bce)


@pytest.mark.parametrize("name", ["dice", "bce+dice", "bce+", "2**bce", "1.2.3*bce", "e*bce", "-1*bce", "",
                                  "bce+label_embedding"])
def test_unknown_or_malformed_loss_is_a_config_error_listing_the_choices(name):
    with pytest.raises(ConfigError) as error:
        build_config({"loss": {"name": name}})
    assert "config key 'loss.name'" in str(error.value)
    for choice in LOSSES:
        assert choice in str(error.value)


def test_focal_loss_with_gamma_zero_is_bce():
    torch.manual_seed(0)
    logits = torch.randn(12, 6) * 3
    targets = (torch.rand(12, 6) < 0.3).float()
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, targets), nn.BCEWithLogitsLoss()(logits, targets))


def jaccard_lovasz_reference(errors: list[float], truth: list[int]) -> float:
    """The Lovász extension of the Jaccard loss at relu(errors), by its definition on sets: walk the errors in
    decreasing order and weight each by how much the Jaccard loss Delta(M) = |M| / |positives u M| of the
    mispredicted set M grows when its sample joins M."""
    positives = {i for i, t in enumerate(truth) if t}
    delta = lambda M: len(M) / len(positives | M) if M else 0.0  # noqa: E731
    total, mispredicted = 0.0, set()
    for i in sorted(range(len(errors)), key=lambda i: -errors[i]):
        before = delta(mispredicted)
        mispredicted.add(i)
        total += max(errors[i], 0.0) * (delta(mispredicted) - before)
    return total


def test_lovasz_hinge_of_one_class_equals_the_hand_computed_extension():
    # errors 1 - x*s = [-1, 2, 1.5, -2]; in order 2 (a positive), 1.5 (a negative), then non-positive ones;
    # Delta({1}) = 1/2, Delta({1, 2}) = 2/3: 2 * 1/2 + 1.5 * (2/3 - 1/2) = 1.25
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    truth = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    assert jaccard_lovasz_reference([-1, 2, 1.5, -2], [1, 1, 0, 0]) == pytest.approx(1.25)
    assert float(build_loss(LossConfig(name="lovasz"))(logits, truth)) == pytest.approx(1.25)


@pytest.mark.parametrize("seed", range(3))
def test_lovasz_hinge_is_the_mean_over_classes_of_each_columns_extension(seed):
    rng = np.random.default_rng(seed)
    logits, truth = rng.normal(0, 2, (7, 4)), (rng.random((7, 4)) < 0.4).astype(int)
    truth[:, 0] = 0  # a class without positives in the batch
    per_class = [jaccard_lovasz_reference(list(1 - logits[:, c] * (2 * truth[:, c] - 1)), list(truth[:, c]))
                 for c in range(4)]
    as_tensors = torch.tensor(logits, dtype=torch.float32), torch.tensor(truth, dtype=torch.float32)
    assert float(LOSSES["lovasz"].make(LossConfig(), None)(*as_tensors)) == pytest.approx(np.mean(per_class), 1e-5)
    # bestfitting's symmetric form: the mean with the loss of the negated problem
    negated = [jaccard_lovasz_reference(list(1 + logits[:, c] * (1 - 2 * truth[:, c])), list(1 - truth[:, c]))
               for c in range(4)]
    symmetric = build_loss(LossConfig(name="symmetric_lovasz"))(*as_tensors)
    assert float(symmetric) == pytest.approx((np.mean(per_class) + np.mean(negated)) / 2, 1e-5)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_hard_bce_is_the_bce_of_the_largest_terms(fraction):
    rng = np.random.default_rng(1)
    logits, truth = rng.normal(0, 3, (8, 5)), (rng.random((8, 5)) < 0.3).astype(float)
    terms = np.logaddexp(0, logits) - truth * logits  # BCE with logits, per term
    k = int(np.ceil(fraction * terms.size))
    expected = np.sort(terms.ravel())[::-1][:k].mean()
    loss = build_loss(LossConfig(name="hard_bce", hard_fraction=fraction))(torch.tensor(logits), torch.tensor(truth))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_the_winners_losses_mix_with_the_others():
    torch.manual_seed(0)
    logits, targets = torch.randn(10, 6), (torch.rand(10, 6) < 0.3).float()
    cfg = LossConfig(name="0.5*focal+0.5*lovasz+0.5*hard_bce", hard_fraction=0.3)
    parts = [LOSSES[name].make(cfg, None)(logits, targets) for name in ("focal", "lovasz", "hard_bce")]
    torch.testing.assert_close(build_loss(cfg)(logits, targets), 0.5 * sum(parts))
