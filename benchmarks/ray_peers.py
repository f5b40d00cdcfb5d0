"""Ray Data, the peer of the Ray section (``ray_bench``), in its documented setups for training
data, each a batch iterator epoch after epoch (an ``InProcess`` plan, as the other peers):

- tabular: the arrays as one Arrow table in Ray's object store (``ray.data.from_arrow``, the
  features an ``ArrowTensorArray``), materialized once; per epoch either
  ``ds.random_shuffle().iter_batches(...)`` (a true full shuffle: every epoch a fresh
  permutation of all rows, as batchfeed's ``shuffle="full"``) or
  ``ds.iter_batches(local_shuffle_buffer_size=B)`` (a shuffle buffer over the stored order:
  cheaper, and not a full shuffle);
- JPEG: the files as bytes (``ray.data.read_binary_files``, materialized once), per epoch
  ``random_shuffle()`` then ``map_batches`` that decodes, random-resized-crops, flips half and
  normalises each image with the same functions batchfeed's workers run
  (``batchfeed.transforms.images``), then ``iter_batches``.

Every iterator prefetches ``PREFETCH`` batches (``prefetch_batches``), as the other peers do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np

from .peers import PREFETCH, RAY_HINT, importable, version

SHUFFLE_BUFFER = 10_000  # rows in Ray Data's local shuffle buffer (its docs' example size)


def ray_missing() -> str | None:
    return None if importable("ray.data") else RAY_HINT


def quiet() -> None:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def tabular_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                    shuffle: str) -> Iterator[Iterator[Any]]:
    """``shuffle``: "full" (``random_shuffle`` per epoch) or "buffer" (local shuffle buffer)."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    quiet()
    columns = {k: ArrowTensorArray.from_numpy(a) if a.ndim > 1 else pa.array(a)
               for k, a in arrays.items()}
    ds = ray.data.from_arrow(pa.table(columns)).materialize()

    def epochs() -> Generator[Any, None, None]:
        epoch = 0
        while True:
            if shuffle == "full":
                batches = ds.random_shuffle(seed=seed + epoch).iter_batches(
                    batch_size=batch_size, batch_format="numpy", prefetch_batches=PREFETCH)
            else:
                batches = ds.iter_batches(
                    batch_size=batch_size, batch_format="numpy", prefetch_batches=PREFETCH,
                    local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=seed + epoch)
            yield from batches
            epoch += 1

    gen = epochs()
    try:
        yield gen
    finally:
        gen.close()


def tabular_setup(batch_size: int, shuffle: str) -> str:
    how = ("ds.random_shuffle().iter_batches" if shuffle == "full" else
           f"ds.iter_batches(local_shuffle_buffer_size={SHUFFLE_BUFFER:,}, not a full shuffle")
    return (f"Ray Data {version('ray')}: from_arrow(table).materialize(); per epoch {how}"
            f"{'(' if shuffle == 'full' else ', '}batch_size={batch_size}, batch_format="
            f"'numpy', prefetch_batches={PREFETCH})")


def _decode_crop(batch: dict[str, np.ndarray], crop: int, classes: list[str],
                 seed: int) -> dict[str, np.ndarray]:
    """Decode, random-resized-crop, flip half, normalise: what ``train_images`` does."""
    from batchfeed.transforms import images

    rng = np.random.default_rng([seed, os.getpid(), int(batch["path"].size)])
    out = np.empty((len(batch["bytes"]), crop, crop, 3), np.uint8)
    for i, data in enumerate(batch["bytes"]):
        images.crop_resize(data, crop, lambda w, h: images.random_resized_crop_box(w, h, rng),
                           bool(rng.random() < 0.5), out=out[i])
    labels = [classes.index(os.path.basename(os.path.dirname(p))) for p in batch["path"]]
    return {"image": images.to_float_chw(out), "label": np.array(labels, np.int64)}


@contextlib.contextmanager
def jpeg_batches(directory: str, crop: int, batch_size: int, seed: int
                 ) -> Iterator[Iterator[Any]]:
    import ray

    quiet()
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    files = ray.data.read_binary_files(directory, include_paths=True).materialize()

    def epochs() -> Generator[Any, None, None]:
        epoch = 0
        while True:
            ds = files.random_shuffle(seed=seed + epoch).map_batches(
                _decode_crop, fn_kwargs={"crop": crop, "classes": classes, "seed": seed},
                batch_size=batch_size, batch_format="numpy")
            yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy",
                                       prefetch_batches=PREFETCH)
            epoch += 1

    gen = epochs()
    try:
        yield gen
    finally:
        gen.close()


def jpeg_setup(crop: int, batch_size: int) -> str:
    return (f"Ray Data {version('ray')}: read_binary_files(dir).materialize(); per epoch "
            f"random_shuffle().map_batches(decode + random-resized-crop {crop} + flip + "
            f"normalise, batchfeed.transforms.images), iter_batches(batch_size={batch_size}, "
            f"prefetch_batches={PREFETCH})")
