"""Stock server-side transforms for ``batchfeed serve --transform batchfeed.transforms:NAME``.

Each is ``fn(batch, rng) -> batch``; the image ones work on the field ``x`` (other fields pass
through):

- ``random_crop_flip``: images (N, C, H, W) of any dtype: pad by 4 with zeros, take a random
  H x W crop per image, flip half of the images left-right (the CIFAR recipe).  Same dtype.
- ``normalize``: uint8 images to float32 in [0, 1], then per channel to zero mean and unit
  variance of the batch.
- ``augment``: ``random_crop_flip``, then ``normalize``, then a random brightness and contrast
  jitter per image: a realistic, CPU-heavy pipeline (the benchmark uses it to show that
  worker processes scale).
- ``trim_padding``: token sequences padded to the dataset's longest, field ``tokens`` (N, L) with
  the valid lengths in ``length`` (N,): cuts ``tokens`` to the longest length in the batch
  (dynamic padding), so a batch of short sentences costs the trainer short sequences.  Batch
  shapes then vary; clients take them as they come.

Encoded images (an image folder's ``image`` bytes field, or a Parquet/HF image column), with
per-image decoding in ``batchfeed.transforms.images`` (simplejpeg and Pillow, the
``batchfeed[images]`` extra; OpenCV's resize with ``batchfeed[images-fast]``); these are
factories, configured on the command line, e.g.
``--transform "batchfeed.transforms:train_images(size=224)"``:

- ``train_images(size, scale, ratio, flip, normalize)``: random-resized-crop (torchvision's
  sampling) to size x size, a left-right flip of half the images, then float32 CHW normalised
  with the ImageNet mean and std (``normalize=False``: uint8 HWC, 4x less to send);
- ``eval_images(size, resize, normalize)``: the shorter side to ``resize`` (default
  size * 8 / 7), then a centre crop of size x size;
- ``decode_image(size)``: the whole image resized to size x size, RGB uint8 HWC.

``backend``: ``"auto"`` (OpenCV's resize if it imports, else Pillow's), ``"pil"`` or ``"cv2"``.
Each keeps the fields named in ``keep`` (default ``("label",)``) and declares its output, so
the server sizes messages (and refuses a batch bigger than a slot) at HELLO.  The randomness
comes from the batch's rng, so every image gets the same crop whichever worker or server
decodes it.  An image that cannot be decoded fails its batch with a WorkerError naming its file
(the image folder's ``path`` field), and the server keeps serving.  So does an image over
``batchfeed.transforms.images.MAX_PIXELS`` (64 MP unless ``--max-image-pixels`` says otherwise): a
decompression bomb or a huge photo is refused from its header, before any pixel is decoded.

Write your own the same way: a module on the server's PYTHONPATH with a function of
``(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import images

PAD = 4


def random_crop_flip(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    x: np.ndarray = batch["x"]
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))
    tops = rng.integers(0, 2 * PAD + 1, size=(n,))
    lefts = rng.integers(0, 2 * PAD + 1, size=(n,))
    flips = rng.random(size=(n,)) < 0.5
    rows: np.ndarray = tops[:, None] + np.arange(h)  # (n, h)
    cols: np.ndarray = lefts[:, None] + np.arange(w)  # (n, w)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    out = padded[np.arange(n)[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return {**batch, "x": out}


def normalize(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    x = batch["x"].astype(np.float32)
    if batch["x"].dtype == np.uint8:
        x *= 1.0 / 255.0
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return {**batch, "x": (x - mean) / std}


def augment(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    out = normalize(random_crop_flip(batch, rng), rng)
    x = out["x"]
    n = len(x)
    brightness = rng.uniform(-0.2, 0.2, (n, 1, 1, 1)).astype(np.float32)
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    out["x"] = ((x - mean) * contrast + mean + brightness).astype(np.float32)
    return out


def trim_padding(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    """Cut ``tokens`` (N, L) to the batch's longest ``length``; every other field passes through.

    Keeps at least one column, so a batch of empty sequences still has a ``tokens`` array.
    """
    tokens, length = batch["tokens"], batch["length"]
    if tokens.ndim != 2 or length.shape != tokens.shape[:1]:
        raise ValueError(f"trim_padding needs tokens (N, L) and length (N,), got tokens "
                         f"{tokens.shape} and length {length.shape}")
    longest = int(length.max()) if len(length) else 0
    if longest > tokens.shape[1] or (len(length) and int(length.min()) < 0):
        raise ValueError(f"lengths must be in [0, {tokens.shape[1]}] (the padded width), got "
                         f"[{int(length.min())}, {longest}]")
    return {**batch, "tokens": tokens[:, : max(longest, 1)]}


# ---------------------------------------------------------------------------------------------
# Encoded images


ImageTransform = Callable[[dict, np.random.Generator], dict]


def _image_transform(size: int, box_of: Callable, flips: bool, normalize: bool, field: str,
                     keep: Sequence[str], name: str, backend: str) -> ImageTransform:
    if type(size) is not int or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    keep = tuple(keep)
    images.check_installed()  # at server start: a missing library stops it, saying which
    resize = images.resize_backend(backend)

    def transform(batch: dict, rng: np.random.Generator) -> dict:
        data = batch[field]
        paths = batch.get("path")
        n = data.rows
        out = np.empty((n, size, size, 3), np.uint8)
        for i in range(n):
            where = paths.row(i).tobytes().decode("utf-8", "replace") if paths is not None \
                else f"row {i} of the batch"
            flip = flips and bool(rng.random() < 0.5)
            images.crop_resize(data.row(i).data, size, lambda w, h: box_of(w, h, rng), flip,
                               name=where, backend=resize, out=out[i])
        result = {field: images.to_float_chw(out) if normalize else out}
        for k in keep:
            result[k] = batch[k]
        return result

    shape = (3, size, size) if normalize else (size, size, 3)
    transform.output_schema = {field: ("float32" if normalize else "uint8", shape),  # type: ignore[attr-defined]
                               **{k: "same" for k in keep}}
    transform.__name__ = name
    return transform


def train_images(size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 normalize: bool = True, field: str = "image",
                 keep: Sequence[str] = ("label",), backend: str = "auto") -> ImageTransform:
    """Random-resized-crop, flip and normalise encoded images (the training recipe)."""
    return _image_transform(
        size, lambda w, h, rng: images.random_resized_crop_box(w, h, rng, scale, ratio), flip,
        normalize, field, keep, "train_images", backend)


def eval_images(size: int = 224, resize: int | None = None, normalize: bool = True,
                field: str = "image", keep: Sequence[str] = ("label",),
                backend: str = "auto") -> ImageTransform:
    """Resize the shorter side, centre-crop and normalise encoded images (evaluation)."""
    shorter = resize if resize is not None else round(size * 8 / 7)
    return _image_transform(
        size, lambda w, h, rng: images.center_crop_box(w, h, size, shorter), False, normalize,
        field, keep, "eval_images", backend)


def decode_image(size: int = 224, field: str = "image", keep: Sequence[str] = ("label",),
                 backend: str = "auto") -> ImageTransform:
    """Decode encoded images to RGB uint8 HWC, each resized whole to size x size."""
    return _image_transform(size, lambda w, h, rng: (0, 0, w, h), False, False, field, keep,
                            "decode_image", backend)
