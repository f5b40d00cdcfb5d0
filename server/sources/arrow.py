"""Arrow data: Parquet files (or a directory of them), Arrow IPC files and streams (``.arrow``,
``.feather``), and directories written by Hugging Face ``datasets``' ``save_to_disk``.

pyarrow reads them; it is an optional extra (``pip install 'batchfeed[arrow]'``), imported only
when such a source is served.  Column types map to fields:

- numbers and bools: fixed fields; fixed-size lists of numbers (nested: tensors): fixed fields
  with that row shape;
- lists of numbers (or of fixed-size lists): ragged fields;
- strings: ``str`` fields (UTF-8), binary: ``bytes`` fields; a Hugging Face ``Image`` (a struct
  of ``bytes`` and ``path``) serves its bytes;
- dictionary-encoded columns are decoded; anything else (nested lists, maps, structs, dates,
  nulls) is refused at start, naming the column, its type and what to do.

Ragged fields are copied into shared memory as Arrow holds them: values, and offsets rebased to
start at 0.  IPC files are read through a memory map, so inspecting them costs no copy; Parquet
columns holding lists are decoded twice (once to size them, once to fill), so that nothing but
the destination ever holds a whole column.  With ``--mmap`` an IPC file whose columns each are
one chunk without nulls is not copied at all: workers map the file and view its buffers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.schema import BYTES, FIXED, RAGGED, STR, Ragged

from .base import FieldSource, make_field, regular_file

INSTALL = "install pyarrow to serve it: pip install 'batchfeed[arrow]'"
IPC_SUFFIXES = (".arrow", ".feather", ".ipc")


def _pyarrow() -> Any:
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
    pa = _pyarrow()
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
    pa = _pyarrow()
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
# Chunks -> numpy


def _plain(chunk: Any) -> Any:
    pa = _pyarrow()
    if pa.types.is_dictionary(chunk.type):
        chunk = chunk.dictionary_decode()
    if pa.types.is_struct(chunk.type):
        chunk = chunk.flatten()[chunk.type.get_field_index("bytes")]
    return chunk


def _flat_values(values: Any, shape: tuple[int, ...], zero_copy: bool = False) -> np.ndarray:
    """A numeric or fixed-size-list array as numpy, ``(n, *shape)``."""
    while _pyarrow().types.is_fixed_size_list(values.type):
        values = values.flatten()
    arr = values.to_numpy(zero_copy_only=zero_copy)
    return arr.reshape((-1, *shape))


def _offsets(chunk: Any) -> np.ndarray:
    """A list, string or binary chunk's offsets (rows + 1, absolute into its values buffer)."""
    pa = _pyarrow()
    wide = pa.types.is_large_list(chunk.type) or pa.types.is_large_string(chunk.type) or \
        pa.types.is_large_binary(chunk.type)
    dtype = np.int64 if wide else np.int32
    return np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk) + 1,
                         offset=chunk.offset * np.dtype(dtype).itemsize)


def _ragged(chunk: Any, kind: str, shape: tuple[int, ...], zero_copy: bool = False) -> Ragged:
    """A chunk as values and offsets (offsets absolute into ``values``)."""
    chunk = _plain(chunk)
    offsets = _offsets(chunk)
    if kind in (STR, BYTES):
        values = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
    else:
        values = _flat_values(chunk.values, shape, zero_copy)
    return Ragged(values, offsets)


def _chunks_source(name: str, chunks: Callable[[], Any], rows: int, typ: Any, where: str,
                   arrow: tuple[str, str] | None = None) -> FieldSource:
    """A field from a column given as a function returning its chunks (re-read on fill)."""
    kind, dtype, shape = column_kind(name, typ, where)
    field = make_field(name, shape, dtype, where, kind)

    def plain(chunk: Any) -> Any:
        chunk = _plain(chunk)
        if chunk.null_count:
            raise DatasetError(f"{where} has {chunk.null_count} null values; fill or drop them "
                               "before serving")
        return chunk

    if kind == FIXED:
        def fill(out: np.ndarray, lo: int, hi: int) -> None:
            pos = 0
            for chunk in _window(chunks(), lo, hi):
                arr = _flat_values(plain(chunk), shape)
                out[pos : pos + len(arr)] = arr
                pos += len(arr)

        return FieldSource(field, rows, fill, arrow=arrow, where=where)

    n_values = 0
    for chunk in chunks():
        off = _offsets(plain(chunk))
        n_values += int(off[-1] - off[0])

    def fill_values(out: np.ndarray, lo: int, hi: int) -> None:
        pos = 0
        for chunk in _window(chunks(), lo, hi):
            rag = _ragged(chunk, kind, shape)
            part = rag.values[rag.offsets[0] : rag.offsets[-1]]
            out[pos : pos + len(part)] = part
            pos += len(part)

    def fill_offsets(out: np.ndarray) -> None:
        out[0], pos, base = 0, 1, 0
        for chunk in chunks():
            off = _offsets(_plain(chunk)).astype(np.int64)
            n = len(off) - 1
            out[pos : pos + n] = off[1:] - off[0] + base
            if n:
                base = int(out[pos + n - 1])
            pos += n

    return FieldSource(field, rows, fill_values, n_values=n_values, fill_offsets=fill_offsets,
                       arrow=arrow, where=where)


def _window(chunks: list, lo: int, hi: int) -> list:
    """The parts of ``chunks`` (consecutive rows) that hold rows ``lo .. hi-1``."""
    out, start = [], 0
    for chunk in chunks:
        a, b = max(start, lo), min(start + len(chunk), hi)
        if a < b:
            out.append(chunk.slice(a - start, b - a))
        start += len(chunk)
    return out


def _chunks_of(column: Any) -> list:
    return column.chunks


def _table_sources(table: Any, where: str, ipc_path: str | None = None) -> list[FieldSource]:
    sources = []
    for name in table.column_names:
        column = table.column(name)
        if column.null_count:
            raise DatasetError(f"{where}: column {name!r} has {column.null_count} null values; "
                               "fill or drop them before serving")
        mapped = (ipc_path, name) if ipc_path is not None and column.num_chunks == 1 and \
            not _pyarrow().types.is_boolean(column.type) else None
        sources.append(_chunks_source(name, functools.partial(_chunks_of, column), len(table),
                                      column.type, f"{where}[{name}]", mapped))
    return sources


# ---------------------------------------------------------------------------------------------
# Files


def _open_ipc(path: Path) -> tuple[Any, Any]:
    """The table of an Arrow IPC file or stream, read from a memory map, and the map."""
    pa = _pyarrow()
    regular_file(path, "Arrow and Parquet files")
    try:
        source = pa.memory_map(str(path))
        try:
            return pa.ipc.open_file(source).read_all(), source
        except pa.ArrowInvalid:
            source = pa.memory_map(str(path))
            return pa.ipc.open_stream(source).read_all(), source
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path} is not a readable Arrow IPC file or stream ({exc}); "
                           "re-create it") from None


def _read_ipc(path: Path) -> Any:
    return _open_ipc(path)[0]


def ipc_sources(path: Path) -> list[FieldSource]:
    table, source = _open_ipc(path)
    # A compressed file (pyarrow.feather.write_feather compresses by default) is decompressed
    # into memory by every process that reads it: mapping it would hold it once per process.
    source.seek(0)
    whole = source.read_buffer(source.size())
    lo, hi = whole.address, whole.address + whole.size
    in_place = all(lo <= b.address and b.address + b.size <= hi
                   for column in table.columns for chunk in column.chunks
                   for b in chunk.buffers() if b is not None)
    return _table_sources(table, str(path), str(path) if in_place else None)


def parquet_sources(path: Path) -> list[FieldSource]:
    """A Parquet file, or a directory of them (same schema, concatenated in name order)."""
    pa = _pyarrow()
    files = sorted(f for f in path.iterdir() if f.suffix == ".parquet") if path.is_dir() \
        else [path]
    handles = []
    for f in files:
        regular_file(f, "Arrow and Parquet files")
        try:
            handles.append(pa.parquet.ParquetFile(str(f)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"{f} is not a readable Parquet file ({exc}); re-create it") \
                from None
    schema = handles[0].schema_arrow
    for f, h in zip(files, handles):
        if not h.schema_arrow.equals(schema):
            raise DatasetError(f"{f} has another schema than {files[0]}; every Parquet file of "
                               "a dataset must have the same columns and types")
    rows = sum(h.metadata.num_rows for h in handles)
    sources = []
    for name in schema.names:
        def chunks(name: str = name) -> list:
            try:
                return [c for h in handles for c in h.read(columns=[name]).column(0).chunks]
            except (pa.ArrowInvalid, OSError) as exc:
                raise DatasetError(f"{path}: column {name!r} cannot be read ({exc}); the file "
                                   "is damaged: re-create it") from None

        sources.append(_chunks_source(name, chunks, rows, schema.field(name).type,
                                      f"{path}[{name}]"))
    return sources


def hf_sources(path: Path) -> list[FieldSource]:
    """A directory written by ``datasets.Dataset.save_to_disk``: its Arrow stream files."""
    pa = _pyarrow()
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} looks like a Hugging Face dataset but its state.json cannot "
                           f"be read ({exc}); save it again with save_to_disk") from None
    tables = [_read_ipc(f) for f in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return _table_sources(table, str(path), str(files[0]) if len(files) == 1 else None)


def is_hf_dir(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


# ---------------------------------------------------------------------------------------------
# In memory (batchfeed.serve) and memory-mapped (workers)


def table_sources(table: Any, where: str) -> list[FieldSource]:
    """An in-memory Arrow table, or a Hugging Face Dataset (its Arrow table)."""
    inner = getattr(table, "data", None)  # datasets.Dataset -> its (Memory)Table
    table = getattr(inner, "table", inner) if inner is not None else table
    return _table_sources(table, where)


def attach_column(path: str, column: str, kind: str,
                  shape: tuple[int, ...]) -> np.ndarray | Ragged:
    """In a worker: a column of a memory-mapped IPC file, viewed in place (no copy)."""
    chunk = _plain(_read_ipc(Path(path)).column(column).chunk(0))
    if kind == FIXED:
        return _flat_values(chunk, shape, zero_copy=True)
    return _ragged(chunk, kind, shape, zero_copy=True)
