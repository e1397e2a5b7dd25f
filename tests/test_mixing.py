"""Mixup and cutmix for multilabel (train.augment.mix): the mixing maths by hand, draws replayed from the sample
seeds, a label embedding's vectors mixed, and the training step mixing what the loss sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.augment import BatchMix, MixDraw, mix_batch
from src.config import AugmentConfig
from src.folds import make_folds
from src.label_embedding import CosineProximityLoss
from src.losses import LOSSES
from src.train import Trainer, build_parts
from tests.conftest import tiny_config

# three 1-channel 2 x 2 images and their targets over two classes
IMAGES = torch.tensor([[[[0, 10], [20, 30]]], [[[100, 110], [120, 130]]], [[[200, 210], [220, 230]]]],
                      dtype=torch.uint8)
TARGETS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_mixup_blends_each_image_and_target_with_its_partner_by_hand():
    # sample i takes 1 - lam = 0.75 of sample permutation[i]: 0 <- 2, 1 <- 0, 2 <- 1
    images, targets = mix_batch(IMAGES, TARGETS, MixDraw(0.25, np.array([2, 0, 1])))
    expected = torch.tensor([[[[150.0, 160.0], [170.0, 180.0]]], [[[25.0, 35.0], [45.0, 55.0]]],
                             [[[125.0, 135.0], [145.0, 155.0]]]])
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.75], [0.75, 0.25], [0.25, 1.0]]))


def test_cutmix_pastes_the_partners_box_and_weighs_targets_by_the_area_left():
    # box: row 0, column 1 (a quarter of the image) from the partner; lam = 3/4
    images, targets = mix_batch(IMAGES, TARGETS, MixDraw(0.75, np.array([2, 0, 1]), box=(0, 1, 1, 2)))
    expected = torch.tensor([[[[0, 210], [20, 30]]], [[[100, 10], [120, 130]]], [[[200, 110], [220, 230]]]],
                            dtype=torch.uint8)
    assert torch.equal(images, expected)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.25], [0.25, 0.75], [0.75, 1.0]]))


def test_a_batch_left_unmixed_is_returned_as_it_came():
    assert AugmentConfig().mix == "none"  # off by default: build_parts then builds no BatchMix
    never = BatchMix(AugmentConfig(mix="mixup", mix_prob=0.0))
    images, targets = never(IMAGES, TARGETS, [1, 2, 3])
    assert images is IMAGES and targets is TARGETS


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_draws_come_from_the_sample_seeds_and_the_call_applies_them(mix):
    mixer = BatchMix(AugmentConfig(mix=mix, mix_prob=1.0))
    batch = torch.randint(0, 256, (6, 2, 16, 16), dtype=torch.uint8)
    targets = (torch.rand(6, 3) < 0.5).float()
    seeds = [11, 22, 33, 44, 55, 66]
    rng_before = torch.get_rng_state()
    draw = mixer.draw(seeds, 16, 16)
    images, mixed_targets = mixer(batch, targets, seeds)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global RNG: dropout masks and resume unaffected
    expected_images, expected_targets = mix_batch(batch, targets, draw)
    assert torch.equal(images, expected_images) and torch.equal(mixed_targets, expected_targets)
    assert sorted(draw.permutation) == list(range(6)) and 0 < draw.lam < 1
    if mix == "cutmix":
        y0, y1, x0, x1 = draw.box
        assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 16
        assert draw.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)
    again = mixer.draw(seeds, 16, 16)
    assert again.lam == draw.lam and np.array_equal(again.permutation, draw.permutation)
    assert mixer.draw([s + 1 for s in seeds], 16, 16).lam != draw.lam
    fired = sum(BatchMix(AugmentConfig(mix=mix, mix_prob=0.3)).draw([s, s + 1], 16, 16) is not None
                for s in range(0, 2000, 2))
    assert 250 <= fired <= 350  # mixed with probability mix_prob


def test_a_label_embedding_mixes_its_target_vectors():
    embedding = torch.tensor(np.random.default_rng(0).normal(size=(4, 3)), dtype=torch.float32)
    loss = CosineProximityLoss(embedding)  # as many labels as dimensions would not do: 4 labels, 3 dimensions
    multi_hot = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    mixer = BatchMix(AugmentConfig(mix="mixup"), lambda targets: LOSSES["label_embedding"].mix_targets(loss, targets))
    draw = MixDraw(0.3, np.array([1, 0, 2]))
    _, mixed = mix_batch(IMAGES, mixer.mix_targets(multi_hot), draw)
    vectors = F.normalize(multi_hot @ embedding, dim=1)  # what the loss regresses each sample onto
    expected = F.normalize(0.3 * vectors + 0.7 * vectors[[1, 0, 2]], dim=1)
    torch.testing.assert_close(loss.embedding_targets(mixed), expected)
    assert not loss.embedding_targets(mixed)[2].any()  # a sample without labels (mixed with itself) stays out


def test_training_mixes_the_batches_the_loss_sees(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.augment.mix=cutmix", "train.augment.mix_prob=1.0",
                      "train.sampler=rare", "train.sampler_power=1.0")
    make_folds(cfg, progress=False)
    parts = build_parts(cfg, fold=0, progress=False)
    assert parts.sampler.cumulative is not None  # train.sampler=rare reached the sampler
    trainer = Trainer(parts, progress=False)
    images, targets, seeds = next(iter(trainer.epoch_batches()))  # mixing: the batches carry their seeds
    seen = []
    loss_fn = parts.loss_fn
    parts.loss_fn = lambda outputs, mixed: seen.append(mixed) or loss_fn(outputs, mixed)
    trainer.train_epoch([(images, targets, seeds)])
    _, expected = mix_batch(images, targets, parts.batch_mix.draw(seeds.tolist(), *images.shape[-2:]))
    assert not torch.equal(seen[0], targets)
    torch.testing.assert_close(seen[0], expected)
