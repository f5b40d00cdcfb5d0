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

Nothing is served that Arrow itself would not accept: every column is validated in full when
it is read (``Array.validate(full=True)``: lengths, offsets in range and monotone, UTF-8 of
strings), Parquet pages are checked against their CRC where the file has one (pyarrow >= 15),
and a null at any depth (in a column, inside its lists, in a struct's ``bytes``, among a
dictionary's values) is refused, naming the column and its first row.  A flipped bit in a
number of a file without checksums (Arrow IPC) cannot be seen: such a file is served exactly as
pyarrow reads it.  Data files are found and opened through ``base.DataDirectory`` and
``base.open_listed``: a file named by a Hugging Face ``state.json``, or in a directory of
Parquet files, must stay inside it.

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

from .base import DataDirectory, FieldSource, ListedFile, list_file, listed_path, make_field

INSTALL = "install pyarrow to serve it: pip install 'batchfeed[arrow]'"
WHAT = "Arrow and Parquet files"
DAMAGED = "the file is damaged: re-create it"
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
# Checks: valid Arrow, no nulls at any depth


def check_chunks(chunks: list, name: str, origin: str, damaged: str = DAMAGED) -> None:
    """Refuse a column (its chunks, in row order) that is not valid Arrow data or that holds a
    null anywhere in what would be served."""
    pa = _pyarrow()
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
    pa = _pyarrow()
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
        offsets = _offsets(arr).astype(np.int64)
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
    """A field from a column given as a function returning its chunks (re-read on fill),
    checked (``check_chunks``) by the function or before."""
    kind, dtype, shape = column_kind(name, typ, where)
    field = make_field(name, shape, dtype, where, kind)

    if kind == FIXED:
        def fill(out: np.ndarray, lo: int, hi: int) -> None:
            pos = 0
            for chunk in _window(chunks(), lo, hi):
                arr = _flat_values(_plain(chunk), shape)
                out[pos : pos + len(arr)] = arr
                pos += len(arr)

        return FieldSource(field, rows, fill, arrow=arrow, where=where)

    n_values = 0
    for chunk in chunks():
        off = _offsets(_plain(chunk))
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


def _table_sources(table: Any, where: str, ipc_path: str | None = None,
                   damaged: str = DAMAGED) -> list[FieldSource]:
    """A table's columns, each checked whole first (``check_chunks``)."""
    pa = _pyarrow()
    try:
        table.validate()  # the columns' lengths agree (each column is validated in full below)
    except (pa.ArrowException, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise DatasetError(f"{where} is not a valid Arrow table ({detail}); {damaged}") from None
    sources = []
    for name in table.column_names:
        column = table.column(name)
        column_kind(name, column.type, f"{where}[{name}]")
        check_chunks(column.chunks, name, where, damaged)
        mapped = (ipc_path, name) if ipc_path is not None and column.num_chunks == 1 and \
            not _pyarrow().types.is_boolean(column.type) else None
        sources.append(_chunks_source(name, functools.partial(_chunks_of, column), len(table),
                                      column.type, f"{where}[{name}]", mapped))
    return sources


# ---------------------------------------------------------------------------------------------
# Files


def _open_ipc(f: ListedFile) -> tuple[Any, Any]:
    """The table of an Arrow IPC file or stream, read from a memory map, and the map."""
    with listed_path(f) as name:
        return _map_ipc(name, f.path)


def _map_ipc(name: str, shown: Path) -> tuple[Any, Any]:
    pa = _pyarrow()
    try:
        source = pa.memory_map(name)
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source = pa.memory_map(name)
            table = pa.ipc.open_stream(source).read_all()
        table.schema.names  # noqa: B018 - column names that are not UTF-8 fail here, not later
        return table, source
    except (pa.ArrowException, OSError, ValueError) as exc:  # UnicodeDecodeError: a ValueError
        detail = " ".join(str(exc).split())
        raise DatasetError(f"{shown} is not a readable Arrow IPC file or stream ({detail}); "
                           f"{DAMAGED}") from None


def ipc_sources(path: Path) -> list[FieldSource]:
    f = list_file(path, WHAT)
    table, source = _open_ipc(f)
    # A compressed file (pyarrow.feather.write_feather compresses by default) is decompressed
    # into memory by every process that reads it: mapping it would hold it once per process.
    source.seek(0)
    whole = source.read_buffer(source.size())
    lo, hi = whole.address, whole.address + whole.size
    in_place = all(lo <= b.address and b.address + b.size <= hi
                   for column in table.columns for chunk in column.chunks
                   for b in chunk.buffers() if b is not None)
    return _table_sources(table, str(path), str(f.real) if in_place else None)


def parquet_sources(path: Path) -> list[FieldSource]:
    """A Parquet file, or a directory of them (same schema, concatenated in name order).  Each
    column is validated whenever it is read, and pages are checked against their CRCs."""
    pa = _pyarrow()
    if path.is_dir():
        folder = DataDirectory(path)
        files = [folder.file(f, WHAT) for f in sorted(path.iterdir()) if f.suffix == ".parquet"]
    else:
        files = [list_file(path, WHAT)]
    handles = []
    for f in files:
        try:
            with listed_path(f) as name:
                handle = _parquet_file(name)
            handle.schema_arrow.names  # noqa: B018 - column names that are not UTF-8 fail here
            handles.append(handle)
        except (pa.ArrowException, OSError, ValueError) as exc:
            detail = " ".join(str(exc).split())
            raise DatasetError(f"{f.path} is not a readable Parquet file ({detail}); "
                               f"{DAMAGED}") from None
    schema = handles[0].schema_arrow
    for f, h in zip(files, handles):
        if not h.schema_arrow.equals(schema):
            raise DatasetError(f"{f.path} has another schema than {files[0].path}; every "
                               "Parquet file of a dataset must have the same columns and types")
    rows = sum(h.metadata.num_rows for h in handles)
    sources = []
    for name in schema.names:
        def chunks(name: str = name) -> list:
            try:
                read = [c for h in handles for c in h.read(columns=[name]).column(0).chunks]
            except (pa.ArrowException, OSError, ValueError) as exc:
                detail = " ".join(str(exc).split())
                raise DatasetError(f"{path}: column {name!r} cannot be read ({detail}); "
                                   f"{DAMAGED}") from None
            got = sum(len(c) for c in read)
            if got != rows:
                raise DatasetError(f"{path}: column {name!r} has {got:,} rows, but the file's "
                                   f"metadata says {rows:,}; {DAMAGED}")
            check_chunks(read, name, str(path))
            return read

        sources.append(_chunks_source(name, chunks, rows, schema.field(name).type,
                                      f"{path}[{name}]"))
    return sources


def _parquet_file(name: str) -> Any:
    """A Parquet file whose pages are checked against their CRCs when they have one."""
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(name, page_checksum_verification=True)
    except TypeError:  # pyarrow 14 cannot verify page checksums (15 and later can)
        return pa.parquet.ParquetFile(name)


def hf_sources(path: Path) -> list[FieldSource]:
    """A directory written by ``datasets.Dataset.save_to_disk``: its Arrow stream files, each
    named in ``state.json`` and inside the directory."""
    pa = _pyarrow()
    try:
        state = json.loads((path / "state.json").read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} looks like a Hugging Face dataset but its state.json cannot "
                           f"be read ({exc}); save it again with save_to_disk") from None
    folder = DataDirectory(path)
    files = [folder.file(_hf_entry(path, name), WHAT) for name in names]
    if not files:
        raise DatasetError(f"{path}/state.json names no data files; save the dataset again "
                           "with save_to_disk")
    tables = [_open_ipc(f)[0] for f in files]
    try:
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except (pa.ArrowException, ValueError) as exc:
        raise DatasetError(f"{path}: its data files do not make one table ({exc}); save the "
                           "dataset again with save_to_disk") from None
    return _table_sources(table, str(path), str(files[0].real) if len(files) == 1 else None)


def _hf_entry(path: Path, name: object) -> Path:
    """A data file named in ``state.json``: a relative name inside the directory, no ``..``."""
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{path}/state.json names a data file {name!r} that is not a file "
                           "name; save the dataset again with save_to_disk")
    entry = Path(name)
    if entry.is_absolute() or ".." in entry.parts:
        raise DatasetError(f"{path}/state.json names the data file {name!r}, which is not inside "
                           "the dataset directory; a save_to_disk directory names its own files "
                           "only: save the dataset again with save_to_disk")
    if not (path / entry).is_symlink() and not (path / entry).exists():
        raise DatasetError(f"{path}/state.json names the data file {name!r}, which does not "
                           "exist; save the dataset again with save_to_disk")
    return path / entry


def is_hf_dir(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


# ---------------------------------------------------------------------------------------------
# In memory (batchfeed.serve) and memory-mapped (workers)


def table_sources(table: Any, where: str) -> list[FieldSource]:
    """An in-memory Arrow table, or a Hugging Face Dataset (its Arrow table)."""
    inner = getattr(table, "data", None)  # datasets.Dataset -> its (Memory)Table
    table = getattr(inner, "table", inner) if inner is not None else table
    return _table_sources(table, where, damaged="the table is damaged: build it again")


def attach_column(path: str, column: str, kind: str,
                  shape: tuple[int, ...]) -> np.ndarray | Ragged:
    """In a worker: a column of a memory-mapped IPC file, viewed in place (no copy)."""
    chunk = _plain(_map_ipc(path, Path(path))[0].column(column).chunk(0))
    if kind == FIXED:
        return _flat_values(chunk, shape, zero_copy=True)
    return _ragged(chunk, kind, shape, zero_copy=True)
