"""The training policy (src.augment): one warp and one lookup table per channel give what the albumentations
chain gave, the policy fires its parts independently, and its CPU and device placements agree."""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from src.augment import (
    GEOMETRY_STREAM,
    BatchAugment,
    Geometry,
    affine_matrix,
    build_cpu_policy,
    d4_view,
    intensity_tables,
    sample_geometry,
    sample_intensity,
    stream,
    to_chw,
    warp_reflect,
)
from src.config import AugmentConfig, PipelineError
from src.folds import make_folds
from src.train import Trainer, build_parts
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 40, 4), dtype=np.uint8)


@pytest.mark.parametrize("element", range(8))
def test_a_d4_view_through_the_warp_equals_the_exact_flip_and_rotation(image, element):
    # The warp path composes the D4 matrix with the affine one: with an identity affine it must be the D4
    # view itself, pixel for pixel, and that view is np.rot90 of the (flipped) image.
    matrix, width, height = Geometry(element, np.eye(3)).matrix(40, 40)
    assert np.array_equal(warp_reflect(image, matrix, width, height), d4_view(image, element))
    expected = np.rot90(image[:, ::-1] if element & 4 else image, element & 3)
    assert np.array_equal(d4_view(image, element), expected)


def test_the_padded_warp_equals_opencvs_reflected_warp_and_albumentations_affine(image):
    # Padding moves the origin of OpenCV's fixed-point source coordinates: a rare rounding step of 1 remains.
    for seed in range(5):
        matrix = affine_matrix(random.Random(seed), 40, 40)
        reflected = cv2.warpAffine(image, matrix[:2], (40, 40), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
        difference = np.abs(warp_reflect(image, matrix, 40, 40).astype(int) - reflected)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, seed
    # albumentations' Affine with the ranges of the policy: the same matrix convention (up to rounding)
    affine = A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45),
                      border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    affine.set_random_seed(3)
    params = affine.get_params_dependent_on_data({"shape": image.shape}, {"image": image})
    difference = np.abs(warp_reflect(image, params["matrix"], 40, 40).astype(int) - affine.apply(image, **params))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.05


def test_one_table_per_channel_equals_albumentations_three_uint8_steps(image):
    contrast, multiply, gamma = A.RandomBrightnessContrast(p=1), A.MultiplicativeNoise(p=1), A.RandomGamma(p=1)
    rng = random.Random(0)
    for _ in range(20):
        alpha, beta = 1 + rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)
        factors, g = [rng.uniform(0.7, 1.3) for _ in range(4)], rng.uniform(0.6, 1.4)
        chained = gamma.apply(multiply.apply(contrast.apply(image, alpha=alpha, beta=beta * 255),
                                             multiplier=np.array(factors, dtype=np.float32)), gamma=g)
        tables = intensity_tables(4, (alpha, beta), factors, g)
        looked_up = np.stack([tables[c][image[..., c]] for c in range(4)], axis=-1)
        assert np.array_equal(looked_up, chained)


@pytest.mark.parametrize("shape", [(24, 24), (24, 24, 1), (24, 24, 3), (24, 24, 4), (24, 24, 6)])
def test_the_policy_returns_contiguous_channels_first_uint8(shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    policy = build_cpu_policy(AugmentConfig(shift_scale_rotate=1.0, brightness_contrast=1.0, crop_scale=0.5))
    policy.set_random_seed(5)
    out = policy(image=image)["image"]
    channels = shape[2] if len(shape) == 3 else 1
    assert out.shape == (channels, 24, 24) and out.dtype == np.uint8 and out.flags.c_contiguous
    policy.set_random_seed(5)
    assert np.array_equal(policy(image=image)["image"], out)


def test_geometry_and_intensity_fire_independently_at_their_rates(image):
    # The albumentations chain seeded per sample gave every transform the same stream: its intensity
    # changes fired only together and only when the affine did. Each part must fire at its own rate, alone.
    cfg = AugmentConfig()  # d4 1.0, affine 0.5, brightness/contrast 0.3 (and per-channel factor 0.3), gamma 0.3
    policy = build_cpu_policy(cfg)
    geometry_step, intensity_step = policy.transforms
    n, warped, changed, both = 600, 0, 0, 0
    for seed in range(n):
        policy.set_random_seed(seed)  # as the dataset does: then each step draws from its own stream
        geometry = sample_geometry(geometry_step.py_random, cfg, 40, 40)
        tables = sample_intensity(intensity_step.py_random, cfg, 4)
        warped += geometry.warp is not None
        changed += tables is not None
        both += geometry.warp is not None and tables is not None
        if seed < 20:  # the policy applies exactly these parameters
            policy.set_random_seed(seed)
            expected = intensity_step.apply(geometry_step.apply(image, geometry), tables)
            assert np.array_equal(policy(image=image)["image"], expected)
    assert abs(warped / n - 0.5) < 0.07
    assert abs(changed / n - (1 - 0.7**3)) < 0.07  # any of three independent draws at 0.3
    assert abs(both / n - (warped / n) * (changed / n)) < 0.06


def batch_of(image: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(to_chw(image))[None].repeat(n, 1, 1, 1)


@pytest.mark.parametrize("crop_scale", [1.0, 0.6])
def test_the_device_policy_gives_the_cpu_policys_images_for_the_same_seeds(image, crop_scale):
    # Same seeds, same sampling code: the same parameters. Samples without a warp are exact; warped ones
    # differ by OpenCV's fixed-point bilinear rounding only.
    cfg = AugmentConfig(crop_scale=crop_scale)
    policy, seeds = build_cpu_policy(cfg), list(range(100, 116))
    on_cpu = []
    for seed in seeds:
        policy.set_random_seed(seed)
        on_cpu.append(policy(image=image)["image"])
    on_device = BatchAugment(cfg)(batch_of(image, len(seeds)), torch.tensor(seeds))
    assert on_device.dtype == torch.uint8 and on_device.shape == (16, 4, 40, 40)
    difference = np.abs(np.stack(on_cpu).astype(int) - on_device.numpy())
    assert difference.max() <= 2 and difference.mean() < 0.05
    for seed, sample_difference in zip(seeds, difference):
        if sample_geometry(stream(seed, GEOMETRY_STREAM), cfg, 40, 40).warp is None:
            assert sample_difference.max() == 0, seed


def test_the_device_policy_replays_its_seeds_and_leaves_the_global_rng_alone(image):
    augment = BatchAugment(AugmentConfig())
    batch, seeds = batch_of(image, 8), torch.arange(8) * 7919
    rng_before = torch.get_rng_state()
    first = augment(batch, seeds)
    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout masks (and resume) must not notice
    assert torch.equal(augment(batch, seeds), first)
    other = augment(batch, seeds + 1)
    assert sum(not torch.equal(a, b) for a, b in zip(first, other)) >= 6
    assert len({sample.numpy().tobytes() for sample in first}) == 8  # one image, eight augmentations


def test_training_with_the_device_policy_augments_the_batches_the_loader_leaves_plain(tiny_data, tmp_path):
    # train.augment.where=device: the workers only read; each batch carries its seeds, and the policy applied
    # on the device gives the batch the workers would have augmented (train.augment.where=loader).
    def first_batch(where: str):
        cfg = tiny_config(tiny_data, tmp_path / where, f"train.augment.where={where}", "train.augment.gamma=1.0")
        make_folds(cfg, progress=False)
        trainer = Trainer(build_parts(cfg, fold=0, progress=False), progress=False)
        return trainer, next(iter(trainer.epoch_batches()))

    trainer, (images, targets, seeds) = first_batch("device")
    assert trainer.parts.train_set.augment is None and trainer.parts.batch_augment is not None
    _, (loader_images, loader_targets) = first_batch("loader")
    assert torch.equal(targets, loader_targets)
    assert not torch.equal(images, loader_images)
    difference = (trainer.parts.batch_augment(images, seeds).int() - loader_images.int()).abs()
    assert difference.max() <= 2
    with pytest.raises(PipelineError, match="carry no sample seeds"):
        trainer.train_epoch([(images, targets)])
