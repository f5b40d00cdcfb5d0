"""The JPEG section's data: two image sets, each a folder of real JPEGs (Pillow, quality 90)
in torchvision's ``ImageFolder`` layout, 10 classes of textures (stripes, checks, a disc) in two
colour schemes with lighting and grain: 64x64 cropped to 32x32 (batches of 256), and 256x256
cropped to 224x224 (batches of 64)."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import MIB

IMAGES = 20_000  # JPEG files per set
QUICK_IMAGES = 500
QUALITY = 90
CHUNK = 250  # images per generating task


@dataclass(frozen=True)
class ImageSet:
    """One set of the section: a folder of ``images`` JPEGs of ``image_size`` square pixels,
    cropped to ``crop`` square, read in batches of ``batch_size``."""

    name: str
    image_size: int
    crop: int
    batch_size: int
    images: int

    @property
    def transform(self) -> str:
        return f"batchfeed.transforms:train_images(size={self.crop})"

    @property
    def slot_mb(self) -> int:
        """``--slot-mb`` for one batch of float32 crops and int64 labels (a batch must fit in
        a slot; the default slot, 8 MiB, holds 13 images of 224x224)."""
        return math.ceil(self.batch_size * (3 * self.crop**2 * 4 + 8) / MIB)

    def describe(self) -> str:
        return (f"{self.name}: {self.images:,} JPEGs of {self.image_size}x{self.image_size} -> "
                f"random-resized-crop to {self.crop}x{self.crop}, batches of {self.batch_size}")


def image_sets(quick: bool) -> tuple[ImageSet, ...]:
    n = QUICK_IMAGES if quick else IMAGES
    return (ImageSet("64px", 64, 32, 256, n), ImageSet("256px", 256, 224, 64, n))




TEXTURES = ("rows", "columns", "diagonals", "checks", "disc")
SCHEMES = ("warm", "cool")
# (foreground, background) RGB of the two colour schemes; class = texture + 5 * scheme.
PALETTES = np.array([[[230, 110, 40], [30, 60, 150]],
                     [[70, 220, 90], [150, 40, 130]]], np.float32)


def class_name(label: int) -> str:
    return f"{TEXTURES[label % 5]}-{SCHEMES[label // 5]}"


def texture_mask(texture: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool: where an image's foreground is, for textures 0..4 (a random period,
    phase and, for the disc, centre and radius)."""
    yy, xx = np.arange(size)[:, None], np.arange(size)[None, :]
    period = int(rng.integers(max(4, size // 12), max(5, size // 4) + 1))
    stripe = (np.arange(3 * size) + int(rng.integers(0, period))) % period < period / 2
    if texture == 0:
        return np.broadcast_to(stripe[:size, None], (size, size))
    if texture == 1:
        return np.broadcast_to(stripe[None, :size], (size, size))
    if texture == 2:  # either diagonal: a flip maps one to the other
        return stripe[xx + int(rng.choice([-1, 1])) * yy + size]
    if texture == 3:
        return stripe[:size, None] ^ stripe[None, :size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.18, 0.32) * size
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2


def textured_image(label: int, size: int, grain: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """One image of class ``label``, uint8 (3, size, size): its texture in its scheme's colours
    (jittered), a smooth lighting wave, and sensor grain cut from ``grain`` (3, 2 size, 2 size)."""
    mask = texture_mask(label % 5, size, rng)
    fg, bg = (PALETTES[label // 5] + rng.normal(0, 25, (2, 3))).astype(np.int16)
    img = np.where(mask, fg[:, None, None], bg[:, None, None])
    grid = (2 * np.pi / size) * np.arange(size, dtype=np.float32)
    fy, fx = rng.uniform(-1.5, 1.5, 2)
    phase, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(10, 35)
    light = np.outer(amplitude * np.sin(fy * grid + phase), np.cos(fx * grid))
    light += np.outer(amplitude * np.cos(fy * grid + phase), np.sin(fx * grid))
    img += light.astype(np.int16)
    top, left = rng.integers(0, size, 2)
    img += grain[:, top : top + size, left : left + size]
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _write_chunk(directory: Path, size: int, first: int, count: int, seed: int) -> int:
    """Images ``first`` .. ``first + count - 1`` (a pure function of the seed and ``first``),
    each written as ``<class>/<index>.jpg``; returns the bytes written."""
    from PIL import Image

    rng = np.random.default_rng([seed, size, first])
    grain = rng.normal(0, 8, (3, 2 * size, 2 * size)).astype(np.int16)
    written = 0
    for index, label in enumerate(rng.integers(0, 10, count).tolist(), start=first):
        img = textured_image(label, size, grain, rng)
        rgb = Image.merge("RGB", [Image.fromarray(channel) for channel in img])
        path = directory / class_name(label) / f"{index:06d}.jpg"
        rgb.save(path, "JPEG", quality=QUALITY)
        written += path.stat().st_size
    return written


def write_image_set(spec: ImageSet, directory: str, seed: int) -> dict[str, Any]:
    """Write the set's folder (threads: Pillow's encoder and numpy release the GIL); what it
    holds, as a JSON-ready dict."""
    t0 = time.perf_counter()
    root = Path(directory)
    for label in range(10):
        (root / class_name(label)).mkdir(parents=True)
    starts = range(0, spec.images, CHUNK)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(lambda first: _write_chunk(
            root, spec.image_size, first, min(CHUNK, spec.images - first), seed), starts))
    total = sum(sizes)
    return {**asdict(spec), "directory": directory, "bytes": total,
            "mean_bytes": total / spec.images,
            "bits_per_pixel": 8 * total / spec.images / spec.image_size**2,
            "write_s": time.perf_counter() - t0, "description": spec.describe()}


