"""The built-in default: a learnable synthetic classification task (``x``: 64 float32 features,
``y``: int64 label in 10 classes, the arg-max of a fixed random linear map plus noise)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.schema import Field

from .base import FieldSource

SYNTHETIC_NAME = "synthetic"
SYNTHETIC_FEATURES = 64
SYNTHETIC_CLASSES = 10
_SYNTHETIC_CHUNK = 65536


def synthetic_sources(rows: int, seed: int = 0) -> list[FieldSource]:
    """A learnable 10-class problem: y = argmax(x @ W + noise), x ~ N(0, 1)."""
    if rows < 1:
        raise DatasetError(f"--synthetic-rows must be at least 1, got {rows}")
    chunks = _synthetic_chunks(rows, seed)
    x_field = Field("x", np.dtype(np.float32), (SYNTHETIC_FEATURES,))
    y_field = Field("y", np.dtype(np.int64), ())
    def fill_x(out: np.ndarray, lo: int, hi: int) -> None:
        for start, x, _ in chunks():
            if start >= hi:
                break  # the rows are drawn in order: nothing after ``hi`` is needed
            _copy_window(out, x, start, lo, hi)

    def fill_y(out: np.ndarray, lo: int, hi: int) -> None:
        for start, _, y in chunks():
            if start >= hi:
                break
            _copy_window(out, y, start, lo, hi)

    return [FieldSource(x_field, rows, fill_x, where=SYNTHETIC_NAME),
            FieldSource(y_field, rows, fill_y, where=SYNTHETIC_NAME)]


Chunk = tuple[int, np.ndarray, np.ndarray]  # (first row, x, y)


def _copy_window(out: np.ndarray, part: np.ndarray, start: int, lo: int, hi: int) -> None:
    """Copy the rows of ``part`` (rows ``start ..``) that fall in ``lo .. hi-1`` into ``out``."""
    a, b = max(start, lo), min(start + len(part), hi)
    if a < b:
        out[a - lo : b - lo] = part[a - start : b - start]


def _synthetic_chunks(rows: int, seed: int) -> Callable[[], Iterator[Chunk]]:
    def chunks() -> Iterator[Chunk]:
        rng = np.random.default_rng(seed)
        weights = rng.standard_normal((SYNTHETIC_FEATURES, SYNTHETIC_CLASSES)).astype(np.float32)
        for start in range(0, rows, _SYNTHETIC_CHUNK):
            n = min(_SYNTHETIC_CHUNK, rows - start)
            x = rng.standard_normal((n, SYNTHETIC_FEATURES), dtype=np.float32)
            noise = rng.standard_normal((n, SYNTHETIC_CLASSES), dtype=np.float32)
            y = np.argmax(x @ weights + noise, axis=1).astype(np.int64)
            yield start, x, y

    return chunks


def synthetic_arrays(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The synthetic dataset as ordinary arrays (for benchmarks and examples)."""
    out = {}
    for src in synthetic_sources(rows, seed):
        arr = np.empty((src.rows, *src.field.shape), src.field.dtype)
        src.fill(arr, 0, src.rows)
        out[src.field.name] = arr
    return out
