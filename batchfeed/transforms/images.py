"""Image decoding and augmentation for server-side transforms (``batchfeed.transforms``).

Per image: decode (encoded bytes -> RGB, HWC uint8), then one resampling that both crops and
resizes (``crop_resize``), an optional left-right flip; per batch: ``to_float_chw`` (normalise
to float32 CHW).  The crop parameters follow torchvision: ``random_resized_crop_box`` is
``RandomResizedCrop``'s sampling (10 tries of an area and a log-uniform aspect ratio, then a
centre crop), ``center_crop_box`` is ``Resize(resize)`` + ``CenterCrop(size)`` as one box.

The libraries were chosen by measurement (a one-off decoder study, since retired; one core of
the 2-core dev VM, images/s over torchvision's way, Pillow's full decode + resize):

- JPEG is decoded by simplejpeg (libjpeg-turbo, reading the bytes in place), at the smallest of
  the decoder's 1/1 .. 1/8 DCT scales that keeps the crop at least its target size: decode
  alone 3.2x (64x64), 1.7x (256x256), 1.4x (500x375); with a crop to 32, 1.7-1.9x.  Without
  simplejpeg, Pillow's ``draft`` does the same scaling more slowly.  Other formats (PNG, ...)
  go through Pillow.
- Resizing is Pillow's bilinear ``resize(box=...)``, or OpenCV's ``cv2.resize`` when
  ``backend="cv2"`` (or ``"auto"`` and OpenCV imports): enlarging a small crop to 224 costs
  Pillow ~275 us and OpenCV ~40 us, so a 224 crop of a 64x64 JPEG is 4.7x faster again.
  OpenCV's pixels differ from Pillow's by a few levels (its filter, and a box rounded to whole
  pixels), so servers that share one job should run the same backend and library versions for
  bit-identical augmentation.

Pillow-SIMD (a source build that replaces Pillow) and PyTurboJPEG (slower than simplejpeg here,
and needing libjpeg-turbo >= 3 from the OS) were measured and not adopted.  An image that cannot
be decoded raises ``ValueError`` naming it.

Decompression bombs: an image's pixel count is checked against ``MAX_PIXELS`` from its header
(simplejpeg's ``decode_jpeg_header``, Pillow's lazy ``Image.open``) before a single pixel is
decoded; an image over it raises ``ImageTooLarge`` (a ValueError) naming the file, its size, the
limit and what to do.  A 519-byte progressive JPEG whose header claims 20000x20000 used to cost
a worker 2.3 GB and 4-9 s inside libjpeg (a progressive decode keeps every DCT coefficient of
the whole image, whatever the output scale); now it fails in under a millisecond.  The limit is
a process-wide setting, as Pillow's own is: ``set_max_pixels(n)`` (``batchfeed serve
--max-image-pixels``), called before the workers fork, also sets ``PIL.Image.MAX_IMAGE_PIXELS``
so that Pillow refuses the same images anywhere in the process (Pillow refuses above twice its
setting and only warns above it, so its setting is half the limit; this module's own opens do
not warn below the limit).

The default, 64,000,000 pixels (Pillow's is 89 MP warned, 179 MP refused), takes every camera
photo up to 61 MP full frame (9504x6336) and the 48-50 MP modes of phones, and refuses the
100 MP+ of medium format and 108/200 MP phone modes until the limit is raised.  What one 64 MP
image (8000x8000) costs a worker, measured on the dev VM with a crop to 224: a baseline JPEG
+1 MB, 0.1 s (decoded at 1/8 scale); a progressive JPEG +155 MB (4:2:0) to +367 MB (4:4:4),
0.8-1.5 s (libjpeg keeps its coefficients); a PNG +216 MB, 1.7 s (Pillow decodes it whole; it
is resized as Pillow decoded it, not copied to numpy and back, which cost 3.5x as much).  So
two workers stay under 1 GB even on the worst image the limit lets through.
"""

from __future__ import annotations

import importlib
import io
import math
import re
import warnings
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # left, top, right, bottom, in source pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS = DEFAULT_MAX_PIXELS  # pixels (width x height) of one image; see set_max_pixels


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than ``MAX_PIXELS`` (refused before decoding)."""


def set_max_pixels(n: int) -> None:
    """Refuse images of more than ``n`` pixels from now on, in this process and in the workers
    it forks afterwards; Pillow's ``MAX_IMAGE_PIXELS`` follows."""
    global MAX_PIXELS
    if type(n) is not int or n < 1:
        raise ValueError(f"the image pixel limit must be a positive int, got {n!r}")
    MAX_PIXELS = n
    try:
        from PIL import Image
    except ImportError:  # nothing to align; _pil() says what to install when it is needed
        return
    _align_pillow(Image)


def _align_pillow(Image: Any) -> None:
    """Pillow raises DecompressionBombError above 2 x MAX_IMAGE_PIXELS: at half our limit it
    refuses exactly the images this module refuses."""
    Image.MAX_IMAGE_PIXELS = -(-MAX_PIXELS // 2)


def check_pixels(width: int, height: int, name: str = "an image") -> None:
    """Raise ImageTooLarge if a ``width`` x ``height`` image is over ``MAX_PIXELS``."""
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(_too_large(name, f"is {width}x{height} ({width * height:,} pixels)"))


def _too_large(name: str, size: str) -> str:
    return (f"{name} {size}, over the limit of {MAX_PIXELS:,} pixels per image (a "
            "decompression bomb, or a very large image); resize the image, or raise the limit "
            "with batchfeed serve --max-image-pixels")


_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image transforms need Pillow: pip install 'batchfeed[images]'") \
            from None
    _align_pillow(Image)
    return Image


def check_installed() -> None:
    """Raise ImportError, saying what to install, if Pillow is missing (simplejpeg is optional:
    JPEGs then go through Pillow, more slowly)."""
    _pil()


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


BACKENDS = ("auto", "pil", "cv2")


def resize_backend(backend: str) -> str:
    """``"pil"`` or ``"cv2"``: what ``backend`` means on this host (``"auto"``: OpenCV if it
    imports)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    cv2 = _optional("cv2") if backend != "pil" else None
    if backend == "cv2" and cv2 is None:
        raise ImportError("backend='cv2' needs OpenCV: pip install 'batchfeed[images-fast]'")
    if cv2 is None:
        return "pil"
    cv2.setNumThreads(1)  # a worker is one core; OpenCV's own pool would fight the others
    return "cv2"


def _png_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """A PNG's width and height from its IHDR (the first chunk), or None if it is not a PNG."""
    head = bytes(data[:24])
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def open_image(data: bytes | memoryview, name: str = "an image") -> Any:
    """A lazily decoded Pillow image (its size is known, its pixels not yet decoded); one over
    ``MAX_PIXELS`` raises ImageTooLarge (a PNG's size is read from its IHDR first, so that the
    error can name it: Pillow's own refusal gives only the pixel count)."""
    Image = _pil()
    png = _png_size(data)
    if png is not None:
        check_pixels(*png, name)
    try:
        with warnings.catch_warnings():  # Pillow warns above half the limit; checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over the limit Pillow was aligned with
        found = _PILLOW_PIXELS.search(str(exc))
        size = f"has {int(found[1]):,} pixels" if found else "has too many pixels"
        raise ImageTooLarge(_too_large(name, size)) from None
    except Exception as exc:
        raise ValueError(f"{name} is not an image Pillow can read ({type(exc).__name__}: "
                         f"{exc})") from None
    check_pixels(img.width, img.height, name)
    return img


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


def _scale_for(width: int, height: int, box: Box, size: int) -> tuple[int, int]:
    """The smallest decoded size that still gives ``box`` at least ``size`` pixels a side."""
    left, top, right, bottom = box
    return (max(1, math.ceil(width * size / max(1e-9, right - left))),
            max(1, math.ceil(height * size / max(1e-9, bottom - top))))


def _scaled(box: Box, sx: float, sy: float) -> Box:
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _simplejpeg_decode(data: bytes | memoryview, size: int, box_of: Any,
                       name: str) -> tuple[np.ndarray, Box] | None:
    """A JPEG decoded by simplejpeg at a reduced scale, with its box; None when simplejpeg is
    missing or cannot read it (CMYK, a damaged file: Pillow then decides).  A header over
    ``MAX_PIXELS`` raises ImageTooLarge before libjpeg allocates anything for the pixels."""
    sj = _optional("simplejpeg")
    if sj is None or bytes(data[:2]) != b"\xff\xd8":
        return None
    try:
        height, width = sj.decode_jpeg_header(data)[:2]
    except Exception:  # Pillow reads it or names the problem
        return None
    check_pixels(width, height, name)
    try:
        box = box_of(width, height)
        want_w, want_h = _scale_for(width, height, box, size)
        rgb = sj.decode_jpeg(data, colorspace="RGB", min_width=want_w, min_height=want_h)
    except Exception:  # any failure: Pillow decodes it or names the problem
        return None
    return rgb, _scaled(box, rgb.shape[1] / width, rgb.shape[0] / height)


def _pil_decode(data: bytes | memoryview, size: int, box_of: Any,
                name: str) -> tuple[Any, Box]:
    """Decode with Pillow (JPEGs at a reduced DCT scale via ``draft``) to an RGB Pillow image,
    converted only if it is not RGB already (a copy of a whole PNG is 4 bytes a pixel)."""
    img = open_image(data, name)
    box = box_of(img.width, img.height)
    try:
        if img.format == "JPEG":
            full = img.size
            img.draft("RGB", _scale_for(img.width, img.height, box, size))
            box = _scaled(box, img.width / full[0], img.height / full[1])
        if img.mode != "RGB":
            return img.convert("RGB"), box
        img.load()
        return img, box
    except Exception as exc:
        raise ValueError(f"{name} cannot be decoded ({type(exc).__name__}: {exc})") from None


def crop_resize(data: bytes | memoryview, size: int, box_of: Any, flip: bool = False,
                name: str = "an image", backend: str = "pil",
                out: np.ndarray | None = None) -> np.ndarray:
    """Decode ``data``, crop the box ``box_of(width, height)`` and resize it to ``size`` x
    ``size`` (bilinear, one resampling; ``backend`` "pil" or "cv2", see ``resize_backend``),
    flip it left-right if ``flip``: HWC uint8, RGB, written into ``out`` when given (a
    C-contiguous ``(size, size, 3)`` uint8 array, e.g. one image of a batch)."""
    boxes: dict[tuple[int, int], Box] = {}

    def box_once(width: int, height: int) -> Box:  # one draw of the rng, whichever decoder
        if (width, height) not in boxes:
            boxes[width, height] = box_of(width, height)
        return boxes[width, height]

    decoded = _simplejpeg_decode(data, size, box_once, name)
    rgb, box = decoded if decoded is not None else _pil_decode(data, size, box_once, name)
    if backend == "cv2":
        return _cv2_crop_resize(np.asarray(rgb), box, size, flip, out)
    Image = _pil()
    source = Image.fromarray(rgb) if isinstance(rgb, np.ndarray) else rgb
    img = source.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:  # Pillow's flip: numpy's copy of a reversed view runs pixel by pixel
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if out is None:
        return np.asarray(img)
    out[...] = np.asarray(img)
    return out


def _cv2_crop_resize(rgb: np.ndarray, box: Box, size: int, flip: bool = False,
                     out: np.ndarray | None = None) -> np.ndarray:
    """The box (rounded to whole pixels) resized by OpenCV: area averaging to shrink, bilinear
    to enlarge (INTER_AREA enlarges like nearest-neighbour); resized into ``out`` and flipped
    there (30x faster than copying numpy's reversed view)."""
    import cv2

    left, top = max(0, int(box[0])), max(0, int(box[1]))
    right = min(rgb.shape[1], max(left + 1, round(box[2])))
    bottom = min(rgb.shape[0], max(top + 1, round(box[3])))
    crop = rgb[top:bottom, left:right]
    shrink = crop.shape[0] >= size and crop.shape[1] >= size
    dst = out if out is not None else np.empty((size, size, 3), np.uint8)
    got = cv2.resize(crop, (size, size), dst=dst,
                     interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if got.ctypes.data != dst.ctypes.data:  # OpenCV could not write into dst (not contiguous)
        dst[...] = got
    if flip:
        cv2.flip(dst, 1, dst=dst)
    return dst


def to_float_chw(images: np.ndarray, mean: tuple[float, ...] | None = IMAGENET_MEAN,
                 std: tuple[float, ...] | None = IMAGENET_STD) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1], normalised per channel.

    Per channel, one multiply from the interleaved pixels straight into the CHW output, then
    one add: 0.15 ms per 224x224 image on the dev VM, against 0.26 ms for a lookup table per
    channel and 1.1 ms for converting, transposing and normalising through the transposed
    view.  Within 1e-6 of ``(x / 255 - mean) / std``."""
    n, h, w, c = images.shape
    scale = np.full(c, 1 / 255, np.float64)
    shift = np.zeros(c, np.float64)
    if mean is not None and std is not None:
        scale /= np.asarray(std, np.float64)
        shift = -np.asarray(mean, np.float64) / np.asarray(std, np.float64)
    out = np.empty((n, c, h, w), np.float32)
    for ch in range(c):
        plane = out[:, ch]
        np.multiply(images[..., ch], np.float32(scale[ch]), out=plane, casting="unsafe")
        if shift[ch]:
            np.add(plane, np.float32(shift[ch]), out=plane)
    return out
