"""Data already in memory, for ``batchfeed.serve(...)``: a dict of columns, an Arrow table or a
Hugging Face ``Dataset``.

A column of a dict may be a numpy array (a fixed field); a list (or object array) of arrays
of one dtype and varying length, or a ``batchfeed.Ragged(values, offsets)`` (the Arrow layout,
say a tokenised corpus as one flat array), for a ragged field; a list of ``str`` (a ``str``
field) or of ``bytes`` (a ``bytes`` field).  The server child process receives the objects as
they are (it is forked), so nothing is pickled or written to disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.schema import BYTES, RAGGED, STR, Ragged

from .base import FieldSource, make_field


def memory_sources(data: Any, where: str = "the data passed to batchfeed.serve") \
        -> list[FieldSource]:
    if not isinstance(data, Mapping):
        if hasattr(data, "column_names"):  # pyarrow.Table or datasets.Dataset
            from .arrow import table_sources

            return table_sources(data, where)
        raise DatasetError(f"{where} must be a dict of columns, a pyarrow Table or a Hugging "
                           f"Face Dataset, not {type(data).__name__}")
    return [_column(str(name), value, f"{where}[{name!r}]") for name, value in data.items()]


def _column(name: str, value: Any, where: str) -> FieldSource:
    if isinstance(value, Ragged):
        return _flat_ragged(name, value, where)
    if isinstance(value, np.ndarray) and value.dtype != object:
        if value.ndim == 0:
            raise DatasetError(f"{where} is a 0-d array; a column needs one row per sample")
        field = make_field(name, value.shape[1:], value.dtype, where)
        return FieldSource(field, len(value), lambda out, lo, hi: np.copyto(out, value[lo:hi]),
                           where=where)
    if not isinstance(value, (Sequence, np.ndarray)) or isinstance(value, (str, bytes)):
        raise DatasetError(f"{where} must be an array or a list of rows, not "
                           f"{type(value).__name__}")
    rows = list(value)
    if rows and all(isinstance(r, str) for r in rows):
        encoded = [r.encode("utf-8") for r in rows]
        return _ragged_bytes(name, encoded, STR, where)
    if rows and all(isinstance(r, (bytes, bytearray, memoryview)) for r in rows):
        return _ragged_bytes(name, [bytes(r) for r in rows], BYTES, where)
    arrays = []
    for i, r in enumerate(rows):
        try:
            arrays.append(np.asarray(r))
        except ValueError:  # numpy's "inhomogeneous shape": a list of lists of varying lengths
            raise DatasetError(f"{where}: row {i} is a nested list whose inner lists differ "
                               "in length; a row must be a number or a rectangular array (pass "
                               "a ragged field as a list of 1-D arrays)") from None
    if arrays and all(a.ndim == 0 and a.dtype != object for a in arrays):
        return _column(name, np.asarray(arrays), where)  # a list of numbers: one per row
    if not arrays or any(a.dtype == object for a in arrays):
        raise DatasetError(f"{where} must hold, per row, a number, an array, a str or bytes; "
                           "not Python objects or None")
    if any(a.ndim == 0 for a in arrays):
        raise DatasetError(f"{where} mixes numbers and arrays; give every row the same kind")
    dtype = np.result_type(*arrays) if len(arrays) < 1024 else arrays[0].dtype
    shape = arrays[0].shape[1:]
    if any(a.shape[1:] != shape for a in arrays):
        raise DatasetError(f"{where}: rows must differ only in length (their first dimension)")
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    field = make_field(name, shape, dtype, where, RAGGED)

    def fill(out: np.ndarray, lo: int, hi: int) -> None:
        if len(out):
            np.concatenate(arrays[lo:hi], out=out, casting="same_kind")

    return FieldSource(field, len(arrays), fill, n_values=int(lengths.sum()),
                       fill_offsets=lambda out: _offsets_into(out, lengths), where=where)


def _flat_ragged(name: str, column: Ragged, where: str) -> FieldSource:
    """A ragged field given as Arrow holds it: checked, then filled without per-row objects."""
    values, offsets = np.asarray(column.values), np.asarray(column.offsets)
    if values.ndim < 1 or values.dtype == object:
        raise DatasetError(f"{where}: Ragged values must be a numeric array of every row's "
                           f"elements back to back, not {values.dtype} of shape {values.shape}")
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1:
        raise DatasetError(f"{where}: Ragged offsets must be a 1-D integer array of rows + 1 "
                           f"entries, not {offsets.dtype} of shape {offsets.shape}")
    offsets = offsets.astype(np.int64, copy=False)
    lengths = np.diff(offsets)
    if offsets[0] < 0 or offsets[-1] > len(values) or (lengths < 0).any():
        raise DatasetError(f"{where}: Ragged offsets must be non-decreasing and within the "
                           f"{len(values)} values (row i is values[offsets[i]:offsets[i + 1]]); "
                           f"these run from {int(offsets[0])} to {int(offsets[-1])}"
                           + (", and decrease" if (lengths < 0).any() else ""))
    field = make_field(name, values.shape[1:], values.dtype, where, RAGGED)

    def fill(out: np.ndarray, lo: int, hi: int) -> None:
        np.copyto(out, values[offsets[lo] : offsets[hi]])

    return FieldSource(field, len(lengths), fill, n_values=int(offsets[-1] - offsets[0]),
                       fill_offsets=lambda out: _offsets_into(out, lengths), where=where)


def _ragged_bytes(name: str, rows: list[bytes], kind: str, where: str) -> FieldSource:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    field = make_field(name, (), np.dtype(np.uint8), where, kind)

    def fill(out: np.ndarray, lo: int, hi: int) -> None:
        out[:] = np.frombuffer(b"".join(rows[lo:hi]), dtype=np.uint8)

    return FieldSource(field, len(rows), fill, n_values=int(lengths.sum()),
                       fill_offsets=lambda out: _offsets_into(out, lengths), where=where)


def _offsets_into(out: np.ndarray, lengths: np.ndarray) -> None:
    out[0] = 0
    np.cumsum(lengths, out=out[1:])
