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

Write your own the same way: a module on the server's PYTHONPATH with a function of
``(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]``.
"""

from __future__ import annotations

import numpy as np

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
