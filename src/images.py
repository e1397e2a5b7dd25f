"""Image files: decoding a sample's files into an H x W x C uint8 array, writing them, and checking a file
from its header (what ``src.validate`` reports). Which files make a sample is the format's answer
(``src.formats``); this module reads and writes whatever files it is given.

Two kinds of sample: per-channel planes (HPA: four 8-bit grey PNGs in RGBY order, or RGB-encoded grey JPEGs
from an extra source), stacked in order; or one file with its own channels (PNG or JPEG, converted to the
model's channel count where that is lossless or conventional). Every resize is the same INTER_AREA resize,
so the packed cache (``src.pack``) and the image files give identical arrays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from src.data import DataError

CHANNELS = ("red", "green", "blue", "yellow")

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV's own threads would oversubscribe the cores


def channel_paths(image_dir: str | Path, sample_id: str, ext: str = "png") -> list[Path]:
    """The four per-channel image paths of one sample, in RGBY order."""
    return [Path(image_dir) / f"{sample_id}_{channel}.{ext}" for channel in CHANNELS]


def decode_plane(path: Path, encoded: np.ndarray | None = None) -> np.ndarray:
    """One channel as H x W uint8 (an RGB-encoded grey JPEG becomes grey), from the file or its bytes."""
    plane = (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if encoded is None
             else cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE))
    if plane is None:
        raise DataError(f"{path}: missing or unreadable image")
    return plane


def stack_planes(planes: list[np.ndarray], size: int | None) -> np.ndarray:
    """Four planes as H x W x 4 uint8, resized to ``size`` when given (the same resize everywhere, so the
    packed cache and the image files give identical arrays)."""
    return fit_size(np.stack(planes, axis=-1), size)


def decode_file(path: Path, channels: int | None = None, encoded: np.ndarray | None = None) -> np.ndarray:
    """A one-file image (openimages, csv) as H x W x C uint8 in RGB(A) order, from the file or its bytes.
    ``channels`` converts where it is lossless or conventional: grey -> 3 copies, RGBA -> RGB (alpha dropped)."""
    image = (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if encoded is None
             else cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED))
    if image is None:
        raise DataError(f"{path}: missing or unreadable image")
    if image.dtype != np.uint8:
        raise DataError(f"{path}: {image.dtype} pixels; the pipeline reads 8-bit images")
    if image.ndim == 2:
        image = image[..., None]
    elif image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    have = image.shape[2]
    if channels is None or have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    if have == 4 and channels == 3:
        return np.ascontiguousarray(image[..., :3])
    raise DataError(f"{path}: {have} channel(s), the model takes model.in_chans={channels}")


def fit_size(image: np.ndarray, size: int | None) -> np.ndarray:
    """``image`` resized to size x size (INTER_AREA: the same resize everywhere, so the packed cache and the
    image files give identical arrays), channel axis kept."""
    if size is None or image.shape[:2] == (size, size):
        return image
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return resized[..., None] if resized.ndim == 2 else resized


def read_image(files: Sequence[str | Path], size: int | None = None, channels: int | None = None) -> np.ndarray:
    """One sample as H x W x C uint8: per-channel files (HPA: four grey planes in RGBY order) stacked, or one
    image file with its own channels; resized to ``size`` when given."""
    if len(files) > 1:
        return stack_planes([decode_plane(Path(f)) for f in files], size)
    return fit_size(decode_file(Path(files[0]), channels), size)


def read_rgby(image_dir: str | Path, sample_id: str, size: int | None = None, ext: str = "png") -> np.ndarray:
    """Load one sample as H x W x 4 uint8 (RGBY), resized to ``size`` when given."""
    return stack_planes([decode_plane(path) for path in channel_paths(image_dir, sample_id, ext)], size)


def write_rgby(image_dir: str | Path, sample_id: str, image: np.ndarray) -> None:
    """Write an H x W x 4 uint8 array as four grayscale PNGs (the HPA layout)."""
    for path, plane in zip(channel_paths(image_dir, sample_id), np.moveaxis(image, -1, 0)):
        if not cv2.imwrite(str(path), np.ascontiguousarray(plane)):
            raise DataError(f"{path}: could not write image")


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    """Write an RGB image as a JPEG of the given quality (OpenCV stores BGR)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise DataError(f"could not write {path}")


# --- Checking a file without decoding it (src.validate) -----------------------------------------------------

# What a complete file ends with: PNG's IEND chunk (length 0, type, CRC); JPEG's end-of-image marker.
FILE_END = {"PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
FILE_TYPES = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
# Channel counts a one-file image may have for a model with ``in_chans`` inputs (decode_file converts).
CONVERTIBLE = {3: {1, 3, 4}}


def _ends_complete(path: Path, end: bytes) -> bool:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() < len(end):
            return False
        file.seek(-len(end), os.SEEK_END)
        return file.read() == end


def _png_bit_depth(path: Path) -> int:
    """The bit depth per sample in a PNG's IHDR chunk (byte 24 of the file)."""
    with open(path, "rb") as file:
        header = file.read(25)
    return header[24] if len(header) == 25 else 0


def inspect_image(path: Path, deep: bool, ext: str = "png", channels: int | None = None
                  ) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of an image file from its header and end marker, or why it cannot be used: a channel
    plane (``channels`` None: 8-bit grey PNG, or an RGB-encoded grey JPEG for an extra source), or a one-file
    image that must convert to ``channels`` channels. ``deep`` also verifies every chunk (reads all bytes)."""
    if not path.is_file():
        return None, "missing image"
    try:
        with Image.open(path) as image:
            size, mode, fmt = image.size, image.mode, image.format
            if deep:
                image.verify()
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "unreadable"
        return None, f"unreadable image ({type(exc).__name__}: {exc})"
    expected = FILE_TYPES.get(ext.lower())
    if expected is None:
        return None, f"not a PNG or JPEG file name (extension {ext!r})"
    if fmt != expected:
        return None, f"not a {expected} (format {fmt})"
    if not _ends_complete(path, FILE_END[fmt]):
        return None, f"truncated {fmt} (no end marker: an interrupted download or copy?)"
    if channels is not None:
        if fmt == "PNG" and (depth := _png_bit_depth(path)) != 8 and mode not in ("1", "P"):
            # PIL opens a 16-bit RGB PNG as 8-bit "RGB"; the reader (OpenCV) keeps 16 bits and refuses it.
            return None, f"{depth}-bit PNG: the pipeline reads 8-bit images"
        bands = len(Image.new(mode, (1, 1)).getbands()) if mode not in ("I;16", "I;16B", "I", "F") else 0
        if mode in ("I;16", "I;16B", "I", "F") or bands == 0:
            return None, f"mode {mode}: the pipeline reads 8-bit images"
        if bands != channels and bands not in CONVERTIBLE.get(channels, set()):
            return None, f"{bands} channel(s) (mode {mode}), the model takes model.in_chans={channels}"
        return size, None
    if mode == "RGB" and fmt == "JPEG":  # HPAv18 stores grey channels as RGB JPEGs: read as grey
        return size, None
    if mode != "L":
        bands = len(Image.new(mode, (1, 1)).getbands()) if mode not in ("I;16", "I;16B") else 1
        return None, f"expected 8-bit grayscale (1 channel), found mode {mode} with {bands} channel(s)"
    return size, None
