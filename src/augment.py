"""The training augmentation policy: its random parameters, and two ways to apply them.

One policy (``train.augment``): a D4 view (one of the 8 rotations by k x 90 degrees, with or without a flip), an
affine jitter (shift, per-axis scale, rotation, reflected borders), an optional random resized crop, and a
per-channel intensity change (brightness/contrast, a multiplicative factor per stain, gamma). Where it runs is
``train.augment.where``:

- ``loader``: per sample in the DataLoader workers, as two albumentations transforms
  (:class:`D4Affine`, :class:`ChannelIntensity`). The geometry is ONE resampling (D4, affine and crop composed
  into one matrix, one ``cv2.warpAffine``; a D4 view alone is an exact copy), the intensity ONE lookup table per
  channel (the three uint8 tables composed), applied while transposing to C x H x W.
- ``device``: on each batch on the training device (:class:`BatchAugment`, torch): one ``grid_sample`` for the
  batch, then the same lookup tables gathered on the device. The loader only reads and transposes.

Both draw each sample's parameters from that sample's seed (``EpochSampler`` yields ``(index, seed)`` pairs)
through the same functions (:func:`sample_geometry`, :func:`sample_intensity`), so a run replays exactly when
resumed, whatever the worker count, and the two placements sample one distribution. Geometry and intensity
draw from separate streams of the seed, so whether one fires says nothing about the other.

After the policy, on the device, a batch may be mixed (``train.augment.mix``: mixup or cutmix, :class:`BatchMix`),
its draws taken from the batch's sample seeds too.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not ask PyPI at import
import albucore  # noqa: E402  (albumentations' own uint8 kernels: a table lookup per plane, in place)
import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from src.config import AugmentConfig  # noqa: E402

# The ranges of the policy (those of the albumentations transforms it replaced: Affine(translate_percent=
# ±0.0625, scale=(0.9, 1.1) per axis, rotate=±45, BORDER_REFLECT_101), RandomBrightnessContrast(0.1, 0.1),
# MultiplicativeNoise((0.9, 1.1), per_channel=True), RandomGamma((80, 120)), RandomResizedCrop).
TRANSLATE = 0.0625
SCALE = (0.9, 1.1)
ROTATE = 45.0
BRIGHTNESS = 0.1
CONTRAST = 0.1
CHANNEL_FACTOR = (0.9, 1.1)
GAMMA = (0.8, 1.2)
CROP_RATIO = (3 / 4, 4 / 3)

# Salts that split one sample seed into independent streams for the geometry and the intensity (and the native-
# resolution crop, train.augment.crop: a stream of its own, so the other two draw as they do without it).
GEOMETRY_STREAM, INTENSITY_STREAM, CROP_STREAM = 0x5EED_6E0, 0x5EED_1A7, 0x5EED_C20


def stream(seed: int, salt: int) -> random.Random:
    """The random stream ``salt`` of a sample seed."""
    return random.Random((seed << 32) ^ salt)


# -- parameters ------------------------------------------------------------------------------------------------
def d4_matrix(element: int, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Forward 3x3 pixel-coordinate matrix of D4 element ``element`` (0..7: bit 2 = horizontal flip first, bits
    0-1 = k counter-clockwise quarter turns, as ``np.rot90``) on a width x height image, and the output size."""
    matrix = np.eye(3)
    if element & 4:
        matrix = np.array([[-1.0, 0, width - 1], [0, 1, 0], [0, 0, 1]]) @ matrix
    for _ in range(element & 3):
        # x' = y, y' = (w - 1) - x; the output is h wide and w high
        matrix = np.array([[0.0, 1, 0], [-1, 0, width - 1], [0, 0, 1]]) @ matrix
        width, height = height, width
    return matrix, width, height


def affine_matrix(rng: random.Random, width: int, height: int) -> np.ndarray:
    """A forward affine jitter about the image centre, sampled as albumentations' ``Affine`` samples it:
    whole-pixel shifts up to ±TRANSLATE of the size, independent x/y scales, a rotation in degrees."""
    shift_x = int(rng.uniform(-TRANSLATE, TRANSLATE) * width)
    shift_y = int(rng.uniform(-TRANSLATE, TRANSLATE) * height)
    scale_x, scale_y = rng.uniform(*SCALE), rng.uniform(*SCALE)
    angle = math.radians(rng.uniform(-ROTATE, ROTATE))
    cx, cy = width / 2 - 0.5, height / 2 - 0.5
    cos, sin = math.cos(angle), math.sin(angle)
    linear = np.array([[cos, sin], [-sin, cos]]) @ np.diag([scale_x, scale_y])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = np.array([cx + shift_x, cy + shift_y]) - linear @ np.array([cx, cy])
    return matrix


def crop_matrix(rng: random.Random, width: int, height: int, min_area: float) -> np.ndarray:
    """A random resized crop (area fraction in [min_area, 1], aspect ratio in CROP_RATIO, sampled as
    torchvision's and albumentations' ``RandomResizedCrop``) as a forward matrix back to width x height."""
    area = width * height
    for _ in range(10):
        target = rng.uniform(min_area, 1.0) * area
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        crop_w, crop_h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            x0, y0 = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            break
    else:  # both libraries then take the central crop with the ratio clamped: the whole of a square image
        crop_w = min(width, round(height * CROP_RATIO[1]))
        crop_h = min(height, round(width / CROP_RATIO[0]))
        x0, y0 = (width - crop_w) // 2, (height - crop_h) // 2
    sx, sy = width / crop_w, height / crop_h
    # pixel centres map to pixel centres, as cv2.resize maps them
    return np.array([[sx, 0, (0.5 - x0) * sx - 0.5], [0, sy, (0.5 - y0) * sy - 0.5], [0, 0, 1]])


@dataclass(frozen=True)
class Geometry:
    """A sample's geometric augmentation: a D4 element, then (when ``warp`` is set) an affine/crop warp, as
    forward 3x3 pixel-coordinate matrices."""

    element: int = 0
    warp: np.ndarray | None = None  # affine and crop, applied after the D4 view; None: the D4 view alone

    def matrix(self, width: int, height: int) -> tuple[np.ndarray, int, int]:
        """The whole forward map (D4, then warp) and the output size."""
        d4, out_w, out_h = d4_matrix(self.element, width, height)
        return (d4 if self.warp is None else self.warp @ d4), out_w, out_h


def sample_geometry(rng: random.Random, cfg: AugmentConfig, width: int, height: int) -> Geometry:
    """The geometric parameters of one sample: a uniform D4 element with probability ``cfg.d4``, an affine
    jitter with probability ``cfg.shift_scale_rotate``, and a resized crop whenever ``cfg.crop_scale < 1``."""
    element = rng.randrange(8) if rng.random() < cfg.d4 else 0
    out_w, out_h = (height, width) if element & 1 else (width, height)
    warp = None
    if rng.random() < cfg.shift_scale_rotate:
        warp = affine_matrix(rng, out_w, out_h)
    if cfg.crop_scale < 1.0:
        crop = crop_matrix(rng, out_w, out_h, cfg.crop_scale)
        warp = crop if warp is None else crop @ warp
    return Geometry(element, warp)


def sample_crop(rng: random.Random, crop: int, width: int, height: int) -> tuple[int, int]:
    """The top-left corner ``(x0, y0)`` of a uniformly placed ``crop`` x ``crop`` window in a width x height image."""
    if crop > width or crop > height:
        raise ValueError(f"train.augment.crop={crop} does not fit a {width} x {height} image")
    return rng.randint(0, width - crop), rng.randint(0, height - crop)


def intensity_tables(channels: int, contrast_brightness: tuple[float, float] | None = None,
                     factors: list[float] | None = None, gamma: float | None = None) -> np.ndarray:
    """One uint8 lookup table per channel (channels x 256) doing, in this order, what albumentations' uint8
    kernels do (float32 maths, clipped and truncated to uint8 after each step): contrast ``alpha`` and
    brightness ``beta`` (``RandomBrightnessContrast``, beta in units of the max value), a factor per channel
    (``MultiplicativeNoise``), then ``floor(255 * (v / 255) ** gamma)`` (``RandomGamma``). One lookup in the
    composed table equals the three steps in a row."""
    tables = np.tile(np.arange(256, dtype=np.uint8), (channels, 1))
    if contrast_brightness is not None:
        alpha, beta = contrast_brightness
        tables = np.clip(tables.astype(np.float32) * np.float32(alpha) + np.float32(beta * 255), 0, 255)
        tables = tables.astype(np.uint8)
    if factors is not None:
        per_channel = np.asarray(factors, dtype=np.float32)[:, None]
        tables = np.clip(tables.astype(np.float32) * per_channel, 0, 255).astype(np.uint8)
    if gamma is not None:
        tables = ((np.arange(256) / 255.0) ** gamma * 255).astype(np.uint8)[tables]
    return tables


def sample_intensity(rng: random.Random, cfg: AugmentConfig, channels: int) -> np.ndarray | None:
    """The intensity change of one sample as :func:`intensity_tables`, or None when none fires: brightness/
    contrast with probability ``cfg.brightness_contrast``, per-channel factors (each stain's strength)
    independently with the same probability, gamma with probability ``cfg.gamma``."""
    contrast_brightness = factors = gamma = None
    if rng.random() < cfg.brightness_contrast:
        contrast_brightness = (1.0 + rng.uniform(-CONTRAST, CONTRAST), rng.uniform(-BRIGHTNESS, BRIGHTNESS))
    if rng.random() < cfg.brightness_contrast:
        factors = [rng.uniform(*CHANNEL_FACTOR) for _ in range(channels)]
    if rng.random() < cfg.gamma:
        gamma = rng.uniform(*GAMMA)
    if contrast_brightness is None and factors is None and gamma is None:
        return None
    return intensity_tables(channels, contrast_brightness, factors, gamma)


# -- on the CPU, per sample (albumentations) ------------------------------------------------------------------
class _SaltedSeed:
    """Transforms of one Compose are all seeded with the sample's seed (``Compose.set_random_seed``): each
    draws from its own stream of it, so that their draws are independent."""

    salt = 0

    def set_random_seed(self, seed: int | None) -> None:
        # Only the Python stream: these transforms draw nothing from numpy, and a numpy Generator costs more
        # to seed than the rest of a sample's parameters to draw.
        self.seed = seed
        self.py_random = random.Random() if seed is None else stream(seed, self.salt)


_CV2_ROTATE = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def d4_view(image: np.ndarray, element: int) -> np.ndarray:
    """D4 element ``element`` of an H x W (x C) image, exactly (no resampling)."""
    if element & 4:
        image = cv2.flip(image, 1)
    return cv2.rotate(image, _CV2_ROTATE[element & 3]) if element & 3 else image


def warp_reflect(image: np.ndarray, matrix: np.ndarray, width: int, height: int,
                 interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """``image`` resampled through the forward 3x3 ``matrix`` to width x height, borders reflected
    (BORDER_REFLECT_101). OpenCV samples reflected border pixels on a slow path (about 2x the cost of a warp at
    512 px with a 45 degree turn), so the image is first padded by reflection just as far as the warp reaches,
    and the warp then stays inside it."""
    inverse = np.linalg.inv(matrix)
    corners = inverse @ np.array([[0, width - 1, 0, width - 1], [0, 0, height - 1, height - 1], [1, 1, 1, 1]])
    src_h, src_w = image.shape[:2]
    # +2: the bilinear neighbour, and the fixed-point rounding of the source coordinates
    left = max(0, math.ceil(-corners[0].min()) + 2)
    right = max(0, math.ceil(corners[0].max() - (src_w - 1)) + 2)
    top = max(0, math.ceil(-corners[1].min()) + 2)
    bottom = max(0, math.ceil(corners[1].max() - (src_h - 1)) + 2)
    if left or right or top or bottom:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_REFLECT_101)
        inverse = np.array([[1.0, 0, left], [0, 1, top], [0, 0, 1]]) @ inverse

    def warp(part: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(part, inverse[:2], (width, height), flags=interpolation | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT_101)

    if image.ndim == 3 and image.shape[2] > 4:  # OpenCV warps at most 4 channels at a time
        return np.concatenate([warp(np.ascontiguousarray(image[..., i:i + 4])).reshape(height, width, -1)
                               for i in range(0, image.shape[2], 4)], axis=2)
    return warp(image)


class NativeCrop(_SaltedSeed, A.DualTransform):
    """A random ``crop`` x ``crop`` window of the image, its pixels as stored (a slice: never resampled); the first
    transform of a policy with ``train.augment.crop``. Position: :func:`sample_crop`."""

    salt = CROP_STREAM

    def __init__(self, crop: int):
        super().__init__(p=1.0)
        self.crop = crop

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"corner": sample_crop(self.py_random, self.crop, width, height)}

    def apply(self, img: np.ndarray, corner: tuple[int, int], **params: Any) -> np.ndarray:
        x0, y0 = corner
        return np.ascontiguousarray(img[y0 : y0 + self.crop, x0 : x0 + self.crop])

    def apply_to_mask(self, mask: np.ndarray, corner: tuple[int, int], **params: Any) -> np.ndarray:
        return self.apply(mask, corner)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop",)


class D4Affine(_SaltedSeed, A.DualTransform):
    """D4 view, affine jitter and resized crop of the policy in one resampling (H x W x C in and out).

    The D4 element and the warp are composed into one matrix and applied by one ``cv2.warpAffine``; a sample
    with a D4 view alone is an exact flip/rotation copy. Parameters: :func:`sample_geometry`.
    """

    salt = GEOMETRY_STREAM

    def __init__(self, cfg: AugmentConfig):
        super().__init__(p=1.0)  # each part has its own probability in cfg
        self.cfg = cfg

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"geometry": sample_geometry(self.py_random, self.cfg, width, height)}

    def apply(self, img: np.ndarray, geometry: Geometry, interpolation: int = cv2.INTER_LINEAR,
              **params: Any) -> np.ndarray:
        if geometry.warp is None:
            return d4_view(img, geometry.element)
        matrix, width, height = geometry.matrix(img.shape[1], img.shape[0])
        return warp_reflect(img, matrix, width, height, interpolation)

    def apply_to_mask(self, mask: np.ndarray, geometry: Geometry, **params: Any) -> np.ndarray:
        return self.apply(mask, geometry, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("cfg",)


def to_chw(image: np.ndarray) -> np.ndarray:
    """H x W x C uint8 as a contiguous C x H x W array (one pass: ``cv2.split`` into the planes)."""
    if image.ndim == 2:
        return image[None].copy()
    planes = np.empty((image.shape[2], *image.shape[:2]), dtype=image.dtype)
    cv2.split(image, list(planes))
    return planes


class ChannelIntensity(_SaltedSeed, A.ImageOnlyTransform):
    """Brightness/contrast, a per-channel factor and gamma as one lookup table per channel; returns the image
    channels first (C x H x W), like ``ToTensorV2``, so it is the last transform of a policy: the transpose and
    the table lookups are one pass over the planes. Parameters: :func:`sample_intensity`."""

    salt = INTENSITY_STREAM

    def __init__(self, cfg: AugmentConfig):
        super().__init__(p=1.0)
        self.cfg = cfg

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        shape = params["shape"]
        return {"tables": sample_intensity(self.py_random, self.cfg, shape[2] if len(shape) == 3 else 1)}

    def apply(self, img: np.ndarray, tables: np.ndarray | None, **params: Any) -> np.ndarray:
        planes = to_chw(img)
        if tables is not None:
            for plane, table in zip(planes, tables):
                albucore.sz_lut(plane, table, inplace=True)
        return planes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("cfg",)


def build_cpu_policy(cfg: AugmentConfig) -> A.Compose:
    """The policy as an albumentations Compose: H x W x C uint8 in, C x H x W uint8 out. Reseed it per sample
    (``set_random_seed``) for reproducible draws."""
    crop = [NativeCrop(cfg.crop)] if cfg.crop else []
    return A.Compose([*crop, D4Affine(cfg), ChannelIntensity(cfg)])


# -- on the training device, per batch (torch) ----------------------------------------------------------------
class BatchAugment:
    """The policy applied to a uint8 N x C x H x W batch of square images on its device.

    Each sample's parameters come from its seed through :func:`sample_geometry` / :func:`sample_intensity` (the
    CPU policy's sampling code, on their own Python RNG streams: no global RNG is touched, so dropout masks and
    a resumed run are unaffected). The geometry of the whole batch is one bilinear ``grid_sample`` (reflected
    borders about the edge pixels' centres, as BORDER_REFLECT_101; D4-only samples land on pixel centres and
    come out exact), the intensity one gather from the per-channel tables.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def parameters(self, seeds: list[int], channels: int, size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Inverse pixel-coordinate matrices (N x 3 x 3, or None when no sample moves) and lookup tables
        (N x C x 256, or None when no sample's intensity changes) of a batch."""
        inverses, tables, moved, changed = [], [], False, False
        identity_tables = intensity_tables(channels)
        for seed in seeds:
            geometry = sample_geometry(stream(seed, GEOMETRY_STREAM), self.cfg, size, size)
            matrix, _, _ = geometry.matrix(size, size)
            inverses.append(np.linalg.inv(matrix))
            moved |= geometry.element != 0 or geometry.warp is not None
            sample_tables = sample_intensity(stream(seed, INTENSITY_STREAM), self.cfg, channels)
            tables.append(identity_tables if sample_tables is None else sample_tables)
            changed |= sample_tables is not None
        return (np.stack(inverses) if moved else None), (np.stack(tables) if changed else None)

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor | list[int]) -> torch.Tensor:
        """The augmented batch (uint8, same device; ``train.augment.crop`` x that with a crop, else the same shape)."""
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for a batch of {len(images)} images")
        if self.cfg.crop:
            images = self.crop(images, seeds)
        n, channels, height, width = images.shape
        if height != width:
            raise ValueError(f"batch augmentation needs square images, got {height} x {width}")
        inverses, tables = self.parameters(seeds, channels, height)
        if inverses is not None:
            images = self.warp(images, torch.as_tensor(inverses, dtype=torch.float32, device=images.device))
        if tables is not None:
            lookup = torch.as_tensor(tables, device=images.device)  # N x C x 256
            flat = images.reshape(n, channels, -1).long()
            images = torch.gather(lookup, 2, flat).view(n, channels, height, width)
        return images

    def crop(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Each image's ``train.augment.crop`` window (:func:`sample_crop` from its seed, as :class:`NativeCrop`):
        slices of the stored pixels."""
        size, (height, width) = self.cfg.crop, images.shape[2:]
        corners = [sample_crop(stream(seed, CROP_STREAM), size, width, height) for seed in seeds]
        return torch.stack([image[:, y0 : y0 + size, x0 : x0 + size] for image, (x0, y0) in zip(images, corners)])

    @staticmethod
    def warp(images: torch.Tensor, inverses: torch.Tensor) -> torch.Tensor:
        """Bilinear resampling of each image through its inverse pixel-coordinate matrix (N x 3 x 3)."""
        n, channels, height, width = images.shape
        # Pixel coordinates to grid_sample's [-1, 1] with align_corners=True: -1 and 1 are the centres of the
        # edge pixels, so "reflection" reflects about them (cv2's BORDER_REFLECT_101).
        to_unit = torch.tensor([[2 / max(width - 1, 1), 0, -1], [0, 2 / max(height - 1, 1), -1], [0, 0, 1]],
                               device=images.device)
        theta = to_unit @ inverses @ torch.linalg.inv(to_unit)
        grid = F.affine_grid(theta[:, :2], [n, channels, height, width], align_corners=True)
        warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        return warped.round_().clamp_(0, 255).to(torch.uint8)


# -- mixing samples on the training device (mixup, cutmix) -----------------------------------------------------
# Salt of the stream a batch's mixing draws from (its samples' seeds are the rest of the entropy).
MIX_STREAM = 0x5EED_313


@dataclass(frozen=True)
class MixDraw:
    """How one batch is mixed: sample i keeps weight ``lam`` and takes ``1 - lam`` from sample
    ``permutation[i]``; mixup blends whole images, cutmix (``box``: rows y0:y1, columns x0:x1) pastes the
    partner's box, ``lam`` then being the share of the image left outside the box."""

    lam: float
    permutation: np.ndarray
    box: tuple[int, int, int, int] | None = None


def mix_batch(images: torch.Tensor, targets: torch.Tensor, draw: MixDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets of a batch mixed as ``draw`` says; targets always blend with the weight ``lam``.
    Mixup returns float32 images (on the uint8 scale: the network normalises either), cutmix uint8 ones."""
    partner = torch.as_tensor(draw.permutation, device=images.device)
    if draw.box is None:
        mixed = draw.lam * images.float() + (1.0 - draw.lam) * images[partner].float()
    else:
        y0, y1, x0, x1 = draw.box
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = images[partner][:, :, y0:y1, x0:x1]
    return mixed, draw.lam * targets + (1.0 - draw.lam) * targets[partner]


class BatchMix:
    """Mixup or cutmix (``cfg.mix``) of a training batch on its device, after the policy: with probability
    ``cfg.mix_prob`` the batch is mixed with a random permutation of itself at a weight drawn from
    Beta(``cfg.mix_alpha``, ``cfg.mix_alpha``) (cutmix: a box of 1 - weight of the area, as timm's ``rand_bbox``,
    the weight then being the exact area share kept). Everything is drawn from the batch's sample seeds, so a
    resumed run mixes the same batches the same way; no global RNG is touched. ``mix_targets`` maps multi-hot
    targets to those whose linear mix is the mix of two samples' targets (the loss registry's answer)."""

    def __init__(self, cfg: AugmentConfig, mix_targets=None):
        self.cfg = cfg
        self.mix_targets = mix_targets

    def draw(self, seeds: list[int], height: int, width: int) -> MixDraw | None:
        """The mixing of a batch with these sample seeds and image size; None when it is left unmixed."""
        if min(seeds) < 0:
            raise ValueError("mixing needs the batch's sample seeds (the sampler's), got -1")
        rng = np.random.default_rng([*seeds, MIX_STREAM])
        if rng.random() >= self.cfg.mix_prob:
            return None
        lam = float(rng.beta(self.cfg.mix_alpha, self.cfg.mix_alpha))
        permutation = rng.permutation(len(seeds))
        if self.cfg.mix != "cutmix":
            return MixDraw(lam, permutation)
        cut = math.sqrt(1.0 - lam)
        half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - half_h, 0), min(cy + half_h, height)
        x0, x1 = max(cx - half_w, 0), min(cx + half_w, width)
        return MixDraw(1.0 - (y1 - y0) * (x1 - x0) / (height * width), permutation, (y0, y1, x0, x1))

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 seeds: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch mixed, or as it came (the same tensors) when this batch is not mixed."""
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for a batch of {len(images)} images")
        draw = self.draw(seeds, images.shape[-2], images.shape[-1])
        if draw is None:
            return images, targets
        if self.mix_targets is not None:
            targets = self.mix_targets(targets)
        return mix_batch(images, targets, draw)
