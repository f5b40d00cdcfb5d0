"""Arrow columns as fields: which Arrow types batchfeed serves and as what kind of field
(``column_kind``), the checks every column passes before it is served (``check_chunks``: full
validation, nulls at any depth named by their first row), and Arrow chunks as numpy (values,
and offsets for variable-length rows), without a copy where Arrow's buffers allow it.
pyarrow is imported only when used (``pyarrow_module``, an optional extra)."""

from __future__ import annotations

from typing import Any

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.schema import BYTES, FIXED, RAGGED, STR, Ragged

INSTALL = "install pyarrow to serve it: pip install 'batchfeed[arrow]'"
DAMAGED = "the file is damaged: re-create it"


def pyarrow_module() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DatasetError(f"this data is Arrow or Parquet; {INSTALL}") from None
    return pyarrow


# ---------------------------------------------------------------------------------------------
# Types


def column_kind(name: str, typ: Any, where: str) -> tuple[str, np.dtype, tuple[int, ...]]:
    """(kind, dtype of the values, shape of a row (fixed) or of one element (ragged))."""
    pa = pyarrow_module()
    t = pa.types
    if t.is_dictionary(typ):
        return column_kind(name, typ.value_type, where)
    if t.is_string(typ) or t.is_large_string(typ):
        return STR, np.dtype(np.uint8), ()
    if t.is_binary(typ) or t.is_large_binary(typ):
        return BYTES, np.dtype(np.uint8), ()
    if t.is_struct(typ) and {typ.field(i).name for i in range(typ.num_fields)} >= {"bytes"}:
        inner = typ.field(typ.get_field_index("bytes")).type
        if t.is_binary(inner) or t.is_large_binary(inner):
            return BYTES, np.dtype(np.uint8), ()  # a Hugging Face Image or Audio column
    if t.is_list(typ) or t.is_large_list(typ):
        dtype, shape = _fixed(typ.value_type)
        if dtype is not None:
            return RAGGED, dtype, shape
    else:
        dtype, shape = _fixed(typ)
        if dtype is not None:
            return FIXED, dtype, shape
    raise DatasetError(
        f"{where}: column {name!r} has type {typ}, which batchfeed cannot serve; it serves "
        "numbers, fixed-size lists (tensors), lists of numbers, strings and binary. Flatten "
        "or encode the column (for instance one list column per level, or bytes)")


def _fixed(typ: Any) -> tuple[np.dtype | None, tuple[int, ...]]:
    """The dtype and shape of a number or a (nested) fixed-size list of numbers."""
    pa = pyarrow_module()
    shape: list[int] = []
    while pa.types.is_fixed_size_list(typ):
        shape.append(typ.list_size)
        typ = typ.value_type
    if pa.types.is_boolean(typ):
        return np.dtype(np.bool_), tuple(shape)
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        return np.dtype(typ.to_pandas_dtype()), tuple(shape)
    return None, ()


# ---------------------------------------------------------------------------------------------
# Checks: valid Arrow, no nulls at any depth


def check_chunks(chunks: list, name: str, origin: str, damaged: str = DAMAGED) -> None:
    """Refuse a column (its chunks, in row order) that is not valid Arrow data or that holds a
    null anywhere in what would be served."""
    pa = pyarrow_module()
    base, first, count = 0, -1, 0
    for chunk in chunks:
        try:
            chunk.validate(full=True)
        except (pa.ArrowException, ValueError) as exc:
            detail = " ".join(str(exc).split())
            raise DatasetError(f"{origin}: column {name!r} is not valid Arrow data ({detail}); "
                               f"{damaged}") from None
        rows = _null_rows(chunk)
        if len(rows):
            first = base + int(rows[0]) if first < 0 else first
            count += len(rows)
        base += len(chunk)
    if count:
        raise DatasetError(
            f"{origin}: column {name!r} has a null in row {first:,} ({count:,} "
            f"{'row holds' if count == 1 else 'rows hold'} nulls, counting nulls inside lists); "
            "batchfeed serves no null values; fill or drop them first: e.g. "
            "pyarrow.compute.fill_null / drop_null")


def _null_rows(arr: Any) -> np.ndarray:
    """The rows of ``arr`` (from 0, ascending) that hold a null at any depth of what is served:
    the row itself, list values (nested too), a struct's ``bytes``, a dictionary's values."""
    pa = pyarrow_module()
    t, typ = pa.types, arr.type
    found = []
    if arr.null_count:
        found.append(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)))
    if t.is_dictionary(typ):
        bad = _null_rows(arr.dictionary)
        if len(bad):
            indices = arr.indices.to_numpy(zero_copy_only=False)
            found.append(np.flatnonzero(np.isin(indices, bad)))
    elif t.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        found.append(_null_rows(arr.field(typ.get_field_index("bytes"))))
    elif t.is_list(typ) or t.is_large_list(typ):
        offsets = offsets_of(arr).astype(np.int64)
        inner = _null_rows(arr.values.slice(offsets[0], offsets[-1] - offsets[0]))
        if len(inner):
            found.append(np.searchsorted(offsets - offsets[0], inner, side="right") - 1)
    elif t.is_fixed_size_list(typ):
        size = typ.list_size
        inner = _null_rows(arr.values.slice(arr.offset * size, len(arr) * size))
        if len(inner):
            found.append(inner // size)
    if not found:
        return np.empty(0, np.int64)
    return np.unique(np.concatenate(found).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Chunks -> numpy


def plain(chunk: Any) -> Any:
    pa = pyarrow_module()
    if pa.types.is_dictionary(chunk.type):
        chunk = chunk.dictionary_decode()
    if pa.types.is_struct(chunk.type):
        chunk = chunk.flatten()[chunk.type.get_field_index("bytes")]
    return chunk


def flat_values(values: Any, shape: tuple[int, ...], zero_copy: bool = False) -> np.ndarray:
    """A numeric or fixed-size-list array as numpy, ``(n, *shape)``."""
    while pyarrow_module().types.is_fixed_size_list(values.type):
        values = values.flatten()
    arr = values.to_numpy(zero_copy_only=zero_copy)
    return arr.reshape((-1, *shape))


def offsets_of(chunk: Any) -> np.ndarray:
    """A list, string or binary chunk's offsets (rows + 1, absolute into its values buffer)."""
    pa = pyarrow_module()
    wide = pa.types.is_large_list(chunk.type) or pa.types.is_large_string(chunk.type) or \
        pa.types.is_large_binary(chunk.type)
    dtype = np.int64 if wide else np.int32
    return np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk) + 1,
                         offset=chunk.offset * np.dtype(dtype).itemsize)


def ragged_of(chunk: Any, kind: str, shape: tuple[int, ...], zero_copy: bool = False) -> Ragged:
    """A chunk as values and offsets (offsets absolute into ``values``)."""
    chunk = plain(chunk)
    offsets = offsets_of(chunk)
    if kind in (STR, BYTES):
        values = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
    else:
        values = flat_values(chunk.values, shape, zero_copy)
    return Ragged(values, offsets)
