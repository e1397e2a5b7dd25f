"""Crops at full resolution: training's random crops are slices of the stored image (never resampled), and
prediction's crop views are reduced with the TTA views as configured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from src.augment import (
    CROP_STREAM,
    GEOMETRY_STREAM,
    BatchAugment,
    build_cpu_policy,
    d4_view,
    sample_crop,
    sample_geometry,
    stream,
)
from src.config import AugmentConfig, ConfigError, PipelineError, load_config
from src.model import crop_windows, infer
from src.model import d4_view as d4_batch_view

CROP_ONLY = dict(d4=0.0, shift_scale_rotate=0.0, brightness_contrast=0.0, gamma=0.0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 40, 4), dtype=np.uint8)  # H x W x C, not square


def on_device(cfg: AugmentConfig, image: np.ndarray, seed: int) -> np.ndarray:
    return BatchAugment(cfg)(torch.from_numpy(image.transpose(2, 0, 1).copy())[None], [seed])[0].numpy()


def test_a_training_crop_is_a_slice_of_the_stored_image(image):
    cfg = AugmentConfig(**CROP_ONLY, crop=16)
    policy = build_cpu_policy(cfg)
    corners = set()
    for seed in range(6):
        x0, y0 = sample_crop(stream(seed, CROP_STREAM), 16, 40, 32)
        corners.add((x0, y0))
        expected = image[y0 : y0 + 16, x0 : x0 + 16].transpose(2, 0, 1)
        policy.set_random_seed(seed)
        np.testing.assert_array_equal(policy(image=image)["image"], expected)
        np.testing.assert_array_equal(on_device(cfg, image, seed), expected)  # the same crop on the device
    assert len(corners) > 1  # the position follows the seed


def test_a_crop_then_a_d4_view_copies_pixels_without_resampling(image):
    square = np.ascontiguousarray(image[:, :32])
    cfg = AugmentConfig(**(CROP_ONLY | {"d4": 1.0}), crop=16)
    policy = build_cpu_policy(cfg)
    for seed in range(4):
        x0, y0 = sample_crop(stream(seed, CROP_STREAM), 16, 32, 32)
        element = sample_geometry(stream(seed, GEOMETRY_STREAM), cfg, 16, 16).element
        expected = d4_view(square[y0 : y0 + 16, x0 : x0 + 16], element).transpose(2, 0, 1)
        policy.set_random_seed(seed)
        np.testing.assert_array_equal(policy(image=square)["image"], expected)
        np.testing.assert_array_equal(on_device(cfg, square, seed), expected)


def test_a_crop_larger_than_the_stored_images_is_refused():
    with pytest.raises(ConfigError, match=r"train.augment.crop \(64\) is larger than the stored images"):
        load_config(None, ["data.image_size=32", "train.augment.crop=64"])


def test_crop_windows_form_a_grid_that_covers_the_image():
    assert crop_windows(32, 40, 16, 1) == [(8, 12)]  # the central crop
    assert crop_windows(32, 40, 16, 4) == [(0, 0), (0, 24), (16, 0), (16, 24)]
    covered = np.zeros((32, 40), bool)
    for top, left in crop_windows(32, 40, 16, 9):
        covered[top : top + 16, left : left + 16] = True
    assert covered.all()
    with pytest.raises(PipelineError, match="square number"):
        crop_windows(32, 32, 16, 3)
    with pytest.raises(PipelineError, match="do not fit"):
        crop_windows(32, 32, 48, 4)


class Probe(nn.Module):
    """Two outputs per image that tell crops and views apart: the mean and the top-left pixel of channel 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        return torch.stack([images.mean(dim=(1, 2, 3)), images[:, 0, 0, 0]], dim=1)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_crop_views_are_reduced_with_the_tta_views(reduce):
    images = torch.randint(0, 256, (3, 2, 32, 32), dtype=torch.uint8)
    batches = [(images, torch.zeros(3, 1))]
    views = ("identity", "flip")
    scores, _ = infer(Probe(), batches, torch.device("cpu"), views=views, reduce=reduce, progress=False,
                      crops=4, crop=16)
    outputs = np.stack([Probe()(d4_batch_view(images[:, :, top : top + 16, left : left + 16], view)).numpy()
                        for top, left in crop_windows(32, 32, 16, 4) for view in views])
    assert outputs.shape[0] == 8
    np.testing.assert_allclose(scores, outputs.mean(0) if reduce == "mean" else outputs.max(0), rtol=1e-6)
    whole, _ = infer(Probe(), batches, torch.device("cpu"), views=views, reduce=reduce, progress=False)
    assert not np.allclose(scores, whole)  # crops=0 is the whole image
    with pytest.raises(PipelineError, match="trained without train.augment.crop"):
        infer(Probe(), batches, torch.device("cpu"), progress=False, crops=4)
