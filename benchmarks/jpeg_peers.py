"""The JPEG section's peer: SPDL 0.8 (``spdl.io`` decodes with FFmpeg's libraries, and crops,
resizes and flips with FFmpeg's filters), in its documented setup for image training data: a
``spdl.pipeline`` whose source yields (file, label, crop box, flip) per image, one stage that
loads each image on a thread pool (FFmpeg releases the GIL), an aggregate into batches and a
stage that makes each batch float32 CHW, normalised (``batchfeed.transforms.images.
to_float_chw``, the same numpy code batchfeed's workers run), with a sink buffer.  The crop box
is drawn as torchvision's ``RandomResizedCrop`` draws it (``random_resized_crop_box`` of
``batchfeed.transforms.images``).

Ray Data's image row is in the Ray section (``ray_peers.py``, ``ray_bench.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .jpeg_data import ImageSet
from .peers import PREFETCH, SPDL_HINT, SPDL_IO_HINT, importable, version

ROW_SPDL = "SPDL (FFmpeg) decode + crop, {n} threads"
SPDL_THREADS = 2  # decoding threads: this machine's cores


def spdl_missing() -> str | None:
    """None if SPDL can decode here, else what to install."""
    if not importable("spdl.pipeline"):
        return SPDL_HINT
    try:  # spdl.io loads FFmpeg's libraries at its first decode: decode a tiny JPEG
        import io

        import spdl.io
        from PIL import Image

        data = io.BytesIO()
        Image.new("RGB", (8, 8)).save(data, "JPEG")
        spdl.io.load_image(data.getvalue())
    except Exception:
        return SPDL_IO_HINT
    return None


def spdl_setup() -> str:
    return (f"SPDL {version('spdl-core') or version('spdl')}: PipelineBuilder().add_source("
            f"(path, label, box, flip)).pipe(spdl.io.load_image with FFmpeg's crop, bilinear "
            f"scale and hflip filters, concurrency={SPDL_THREADS}).aggregate(batch_size)"
            f".pipe(to_float_chw).add_sink({PREFETCH}).build(num_threads={SPDL_THREADS})")


def folder_samples(root: str) -> list[tuple[str, int]]:
    """(path, label) of every image, classes as torchvision's ImageFolder numbers them."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    return [(os.path.join(root, name, f), label) for label, name in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(root, name)))]


def _source(samples: list[tuple[str, int]], size: int, seed: int) -> Iterator[tuple]:
    """Epoch after epoch: a fresh permutation, a crop box and a coin per image."""
    from batchfeed.transforms.images import random_resized_crop_box

    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(samples)).tolist():
            path, label = samples[i]
            box = random_resized_crop_box(size, size, rng)
            yield path, label, box, bool(rng.random() < 0.5)


def _load(item: tuple, crop: int) -> tuple[np.ndarray, int]:
    import spdl.io

    path, label, (left, top, right, bottom), flip = item
    flt = (f"crop={right - left}:{bottom - top}:{left}:{top},"
           f"scale={crop}:{crop}:flags=bilinear{',hflip' if flip else ''},format=pix_fmts=rgb24")
    return spdl.io.to_numpy(spdl.io.load_image(path, filter_desc=flt)), label


def _collate(items: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    from batchfeed.transforms.images import to_float_chw

    images = np.stack([image for image, _ in items])
    return {"image": to_float_chw(images), "label": np.array([lb for _, lb in items], np.int64)}


@contextlib.contextmanager
def spdl_batches(spec: ImageSet, directory: str, seed: int) -> Iterator[Iterator[Any]]:
    from spdl.pipeline import PipelineBuilder

    samples = folder_samples(directory)
    builder: Any = PipelineBuilder()  # its generic types do not follow a chain of stages
    pipeline = (builder
                .add_source(_source(samples, spec.image_size, seed))
                .pipe(functools.partial(_load, crop=spec.crop), concurrency=SPDL_THREADS)
                .aggregate(spec.batch_size)
                .pipe(_collate)
                .add_sink(PREFETCH)
                .build(num_threads=SPDL_THREADS))
    with pipeline.auto_stop():
        yield pipeline.get_iterator(timeout=120)
