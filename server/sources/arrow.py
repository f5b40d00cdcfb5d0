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
from batchfeed.shared.schema import FIXED, Ragged

from .arrow_columns import (
    DAMAGED,
    check_chunks,
    column_kind,
    flat_values,
    offsets_of,
    plain,
    pyarrow_module,
    ragged_of,
)
from .base import DataDirectory, FieldSource, ListedFile, list_file, listed_path, make_field

WHAT = "Arrow and Parquet files"
IPC_SUFFIXES = (".arrow", ".feather", ".ipc")


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
                arr = flat_values(plain(chunk), shape)
                out[pos : pos + len(arr)] = arr
                pos += len(arr)

        return FieldSource(field, rows, fill, arrow=arrow, where=where)

    n_values = 0
    for chunk in chunks():
        off = offsets_of(plain(chunk))
        n_values += int(off[-1] - off[0])

    def fill_values(out: np.ndarray, lo: int, hi: int) -> None:
        pos = 0
        for chunk in _window(chunks(), lo, hi):
            rag = ragged_of(chunk, kind, shape)
            part = rag.values[rag.offsets[0] : rag.offsets[-1]]
            out[pos : pos + len(part)] = part
            pos += len(part)

    def fill_offsets(out: np.ndarray) -> None:
        out[0], pos, base = 0, 1, 0
        for chunk in chunks():
            off = offsets_of(plain(chunk)).astype(np.int64)
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
    pa = pyarrow_module()
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
            not pyarrow_module().types.is_boolean(column.type) else None
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
    pa = pyarrow_module()
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
    pa = pyarrow_module()
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
    pa = pyarrow_module()
    try:
        return pa.parquet.ParquetFile(name, page_checksum_verification=True)
    except TypeError:  # pyarrow 14 cannot verify page checksums (15 and later can)
        return pa.parquet.ParquetFile(name)


def hf_sources(path: Path) -> list[FieldSource]:
    """A directory written by ``datasets.Dataset.save_to_disk``: its Arrow stream files, each
    named in ``state.json`` and inside the directory."""
    pa = pyarrow_module()
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
    chunk = plain(_map_ipc(path, Path(path))[0].column(column).chunk(0))
    if kind == FIXED:
        return flat_values(chunk, shape, zero_copy=True)
    return ragged_of(chunk, kind, shape, zero_copy=True)
