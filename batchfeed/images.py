"""Image decoding and augmentation for server-side transforms (``batchfeed.transforms``).

Per image: ``decode`` (encoded bytes -> RGB, HWC uint8), then one resampling that both crops and
resizes (``crop_resize``), an optional left-right flip; per batch: ``to_float_chw`` (normalise
to float32 CHW).  The crop parameters follow torchvision: ``random_resized_crop_box`` is
``RandomResizedCrop``'s sampling (10 tries of an area and a log-uniform aspect ratio, then a
centre crop), ``center_crop_box`` is ``Resize(resize)`` + ``CenterCrop(size)`` as one box.

Decoding uses Pillow (the ``batchfeed[images]`` extra, imported when a transform runs).  A JPEG
much larger than what the crop needs is decoded at a reduced scale (``Image.draft``: the
decoder's own 1/2, 1/4 or 1/8 DCT scaling), never smaller than the crop's target size, so the
result is as sharp as a full decode followed by the resize, and decoding costs up to 8x less.
An image that cannot be decoded raises ``ValueError`` naming it.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # left, top, right, bottom, in source pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image transforms need Pillow: pip install 'batchfeed[images]'") \
            from None
    return Image


def open_image(data: bytes | memoryview, name: str = "an image") -> Any:
    """A lazily decoded Pillow image (its size is known, its pixels not yet decoded)."""
    Image = _pil()
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"{name} is not an image Pillow can read ({type(exc).__name__}: "
                         f"{exc})") from None


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """torchvision's RandomResizedCrop sampling, drawing from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: a centre crop of the whole image
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, size: int, resize: int) -> Box:
    """``Resize(resize)`` (the shorter side to ``resize``) then ``CenterCrop(size)``, as the box
    of the source that lands in the crop."""
    scale = resize / min(width, height)
    w = h = size / scale
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def decode(img: Any, box: Box, size: int, name: str = "an image") -> Any:
    """Decode ``img`` in RGB, at the smallest JPEG scale that still gives the box at least
    ``size`` pixels on each side; returns it with the box in its own pixels."""
    left, top, right, bottom = box
    try:
        if img.format == "JPEG":
            want = (max(1, math.ceil(img.width * size / max(1e-9, right - left))),
                    max(1, math.ceil(img.height * size / max(1e-9, bottom - top))))
            full = img.size
            img.draft("RGB", want)
            sx, sy = img.width / full[0], img.height / full[1]
            box = (left * sx, top * sy, right * sx, bottom * sy)
        img = img.convert("RGB")
    except Exception as exc:
        raise ValueError(f"{name} cannot be decoded ({type(exc).__name__}: {exc})") from None
    return img, box


def crop_resize(data: bytes | memoryview, size: int, box_of: Any, flip: bool = False,
                name: str = "an image") -> np.ndarray:
    """Decode ``data``, crop the box ``box_of(width, height)`` and resize it to ``size`` x
    ``size`` (bilinear, one resampling), flip it left-right if ``flip``: HWC uint8, RGB."""
    Image = _pil()
    img = open_image(data, name)
    img, box = decode(img, box_of(img.width, img.height), size, name)
    try:
        out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    except Exception as exc:
        raise ValueError(f"{name} cannot be decoded ({type(exc).__name__}: {exc})") from None
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def to_float_chw(images: np.ndarray, mean: tuple[float, ...] | None = IMAGENET_MEAN,
                 std: tuple[float, ...] | None = IMAGENET_STD) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1], normalised per channel."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2)
    x *= 1.0 / 255.0
    if mean is not None and std is not None:
        x -= np.asarray(mean, np.float32)[:, None, None]
        x /= np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray(x)
