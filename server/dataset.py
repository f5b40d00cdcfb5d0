"""Datasets: named columns with one row per sample, held once in shared memory.

``sources/`` reads what a dataset is made of (headers and metadata only, so that every problem
is reported before anything is allocated).  ``SharedDataset.load`` then fills each field
straight into its own segment: one copy from the page cache, no temporary array.  A ragged
field (variable-length rows, strings, bytes) gets two segments, its values and its int64
offsets (the Arrow layout), so workers gather it without Python objects.  ``arrays`` views
every field read-only (a fixed field as an array, a ragged one as ``Ragged(values, offsets)``);
the workers, forked from this process, inherit those views and the mappings under them, so the
segments' names are unlinked as soon as they are filled: nothing but this process's mappings
keeps the data, and a server that dies leaves none of it behind.

With ``--shard I/N`` a server holds shard I of N: the contiguous rows ``shard_range(rows, I, N)``
of every field over 8 bytes a row (small columns, such as labels and weights, and the offsets of
ragged fields are held whole: any plan over all rows can then be computed here).  A sharded
ragged field keeps its shard's values, and offsets shifted so that its first row starts at 0.

With ``--mmap`` nothing is copied: ``.npy`` files are mapped with ``np.load(mmap_mode="r")``
and Arrow IPC columns are viewed in place, so the page cache holds the data once for every
process and a dataset larger than RAM can be served.  The files are opened once, here, and held
open (``HeldFile``): everything maps the open file, never the path again, so a file replaced on
disk (a rename) cannot mix a new version in.  A file changed in place (its size or modification
time) is noticed: ``SharedDataset.changed`` here, and ``changed_file`` in a worker before and
after each task, whose batches then fail saying so.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.fingerprint import Fingerprint
from batchfeed.shared.schema import Field, Ragged, describe_schema
from batchfeed.shared.shm import SharedSegment, segment_name

from .sources import (
    SYNTHETIC_NAME,
    FieldSource,
    check_fields,
    inspect_source,
    synthetic_arrays,
    synthetic_sources,
)

log = logging.getLogger("batchfeed.server")

__all__ = ["SYNTHETIC_NAME", "Columns", "DatasetSpec", "FieldSource", "FieldStorage",
           "FileStamp", "HeldFile", "SharedDataset", "changed_file", "check_fields",
           "check_mappable", "inspect_source", "synthetic_arrays", "synthetic_sources"]

Columns = dict[str, "np.ndarray | Ragged"]  # field name -> its rows, as workers read them


@dataclass(frozen=True)
class FileStamp:
    """A held file as it was when the server started (``fd`` stays open in every process)."""

    path: str
    fd: int
    size: int
    mtime_ns: int

    def changed(self) -> str | None:
        """How the file changed in place since, or None."""
        try:
            st = os.fstat(self.fd)
        except OSError as exc:  # pragma: no cover - the descriptor is ours
            return f"{self.path} cannot be checked ({exc})"
        if (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns):
            return None
        what = f"its size went from {self.size:,} to {st.st_size:,} bytes" \
            if st.st_size != self.size else "it was written to"
        return (f"{self.path} changed in place while the server was serving it ({what}); "
                "batches read from it now would mix two versions of the data. Restart the "
                "server on the new file (write new data to a new file and rename it over the "
                "old one: a running server keeps serving the file it opened)")


def changed_file(spec: DatasetSpec) -> str | None:
    """How one of the dataset's held files changed in place, or None (two fstat calls a file:
    cheap enough for every task)."""
    for stamp in spec.files:
        why = stamp.changed()
        if why is not None:
            return why
    return None


class HeldFile:
    """A file served with --mmap, opened once and held open until ``close``."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DatasetError(f"{path} cannot be opened ({exc.strerror}); check it and its "
                               "permissions") from None
        st = os.fstat(self.fd)
        self.stamp = FileStamp(path, self.fd, st.st_size, st.st_mtime_ns)
        self._inode = (st.st_dev, st.st_ino)
        self.replaced_noted = False

    @property
    def opened(self) -> str:
        """A path to the open file itself, whatever the name now points to."""
        return f"/proc/self/fd/{self.fd}"

    def replaced(self) -> bool:
        """Whether the path now names another file (the server keeps serving this one)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class FieldStorage:
    """Where one field lives: shared segments (values, and offsets for a ragged field), or a
    file that workers map themselves."""

    values: str = ""
    offsets: str = ""
    n_values: int = 0  # ragged: elements in all rows
    npy: str | None = None  # a .npy file, memory-mapped
    arrow: tuple[str, str] | None = None  # (Arrow IPC file, column), memory-mapped
    sharded: bool = False  # holds only the shard's rows (ragged: values; offsets are whole)

    @property
    def mapped(self) -> bool:
        return self.npy is not None or self.arrow is not None


@dataclass(frozen=True)
class DatasetSpec:
    """What a worker needs to attach a dataset: its name, rows, schema and storage."""

    name: str
    rows: int
    fields: tuple[Field, ...]
    storage: tuple[FieldStorage, ...]  # one per field, same order
    classes: tuple[str, ...] = ()  # the label names of an image folder
    shard: tuple[int, int] | None = None  # (I, N): this server holds shard I of N
    fingerprint: Fingerprint | None = None  # the whole dataset's (shards too)
    files: tuple[FileStamp, ...] = ()  # the files it maps (--mmap), held open

    @property
    def row_range(self) -> tuple[int, int]:
        """The rows of this server's shard (all rows when it holds them all)."""
        return shard_range(self.rows, self.shard)

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row: exact for fixed fields, the average for ragged ones."""
        total = 0
        for f, st in zip(self.fields, self.storage):
            total += f.row_nbytes * (st.n_values // max(1, self.rows) + 1 if f.ragged else 1)
        return total

    def describe_files(self) -> str:
        """The files its mapped fields read, for error messages ("" when it is in memory)."""
        files = sorted({st.npy or (st.arrow[0] if st.arrow else "") for st in self.storage
                        if st.mapped})
        return f"(mapped from {', '.join(files)}) " if files else ""

    def describe(self) -> str:
        mapped = " (memory-mapped)" if any(s.mapped for s in self.storage) else ""
        shard = ""
        if self.shard is not None:
            lo, hi = self.row_range
            shard = f" (shard {self.shard[0]}/{self.shard[1]}: rows {lo:,}..{hi - 1:,})"
        return (f"{self.name}: {self.rows:,} rows [{describe_schema(self.fields)}]{shard}"
                f"{mapped}")


def shard_range(rows: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Shard I of N: rows [I*rows//N, (I+1)*rows//N)."""
    if shard is None:
        return 0, rows
    i, n = shard
    return i * rows // n, (i + 1) * rows // n


def held_whole(field: Field) -> bool:
    """Small fixed columns (labels, weights) are held whole by every shard."""
    return not field.ragged and field.row_nbytes <= 8


class SharedDataset:
    """Owns the segments and held files of one dataset, and ``arrays``, the read-only views
    of its fields that workers inherit.  ``close`` unmaps and closes; safe to call twice."""

    def __init__(self, spec: DatasetSpec, segments: list[SharedSegment], arrays: Columns,
                 files: list[HeldFile]):
        self.spec = spec
        self.arrays = arrays
        self._segments = segments
        self._files = files

    @classmethod
    def load(cls, name: str, sources: list[FieldSource], token: str, mmap: bool = False,
             classes: tuple[str, ...] = (), shard: tuple[int, int] | None = None,
             fingerprint: Fingerprint | None = None) -> SharedDataset:
        """Fill every field into its own segments (``mmap``: map its file instead); with
        ``shard``, only that shard's rows of the fields that are sharded."""
        segments: list[SharedSegment] = []
        storage: list[FieldStorage] = []
        files: dict[str, HeldFile] = {}
        lo, hi = shard_range(sources[0].rows, shard)
        try:
            for i, src in enumerate(sources):
                if mmap:
                    path = src.path or (src.arrow[0] if src.arrow else "")
                    if path not in files:
                        files[path] = HeldFile(path)
                    storage.append(FieldStorage(n_values=src.n_values, npy=src.path,
                                                arrow=src.arrow))
                    continue
                sharded = shard is not None and not held_whole(src.field)
                storage.append(_load_field(src, f"{_safe(name)}{i}", token, segments, name,
                                           (lo, hi) if sharded else (0, src.rows)))
            classes = classes or next((s.classes for s in sources if s.classes), ())
            spec = DatasetSpec(name, sources[0].rows, tuple(s.field for s in sources),
                               tuple(storage), classes, shard, fingerprint,
                               tuple(f.stamp for f in files.values()))
            arrays = _view_fields(spec, segments, files)
        except BaseException:
            for seg in segments:
                seg.close()
            for f in files.values():
                f.close()
            raise
        for seg in segments:
            seg.unlink()  # mapped here, and inherited by the workers: the name is not needed
        return cls(spec, segments, arrays, list(files.values()))

    def changed(self) -> str | None:
        """How one of its held files changed in place, or None; a file replaced on disk is
        logged once (the server keeps serving the one it opened)."""
        for f in self._files:
            if not f.replaced_noted and f.replaced():
                f.replaced_noted = True
                log.warning("%s was replaced on disk; this server keeps serving the file it "
                            "opened at start (restart it to serve the new one)", f.path)
        return changed_file(self.spec)

    def close(self) -> None:
        self.arrays = {}
        for seg in self._segments:
            seg.close()
        self._segments = []
        for f in self._files:
            f.close()
        self._files = []


def _load_field(src: FieldSource, tag: str, token: str, segments: list[SharedSegment],
                name: str, rows: tuple[int, int]) -> FieldStorage:
    """Rows ``rows`` of one field into new segments (appended to ``segments``)."""
    lo, hi = rows
    sharded = rows != (0, src.rows)
    try:
        if not src.field.ragged:
            values = SharedSegment.create(segment_name(token, tag),
                                          (hi - lo) * src.field.row_nbytes)
            segments.append(values)
            src.fill(_as_array(values, src.field.dtype, (hi - lo, *src.field.shape)), lo, hi)
            return FieldStorage(values.name, sharded=sharded)
        offsets = SharedSegment.create(segment_name(token, f"{tag}o"), 8 * (src.rows + 1))
        segments.append(offsets)
        offs = _as_array(offsets, np.dtype(np.int64), (src.rows + 1,))
        assert src.fill_offsets is not None
        src.fill_offsets(offs)
        offs -= offs[lo]  # this shard's first row starts at 0 (lengths are unchanged)
        n_values = int(offs[hi])
        values = SharedSegment.create(segment_name(token, tag), n_values * src.field.row_nbytes)
        segments.append(values)
        src.fill(_as_array(values, src.field.dtype, (n_values, *src.field.shape)), lo, hi)
        return FieldStorage(values.name, offsets.name, n_values, sharded=sharded)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DatasetError(
            f"{src.where or name}: field {src.field.name!r} cannot be read "
            f"({type(exc).__name__}: {exc}); the file is damaged: re-create it"
        ) from None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)[:32] + "_"


def _as_array(seg: SharedSegment, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if seg.buf is None:
        return np.empty(shape, dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(seg.buf, dtype=dtype, count=count).reshape(shape)


def _view_fields(spec: DatasetSpec, segments: list[SharedSegment],
                 files: dict[str, HeldFile]) -> Columns:
    """Read-only views of every field: over the segments just filled (in order), or over the
    held files (--mmap)."""
    arrays: Columns = {}
    filled = iter(segments)
    for field, st in zip(spec.fields, spec.storage):
        if st.npy is not None:
            arrays[field.name] = np.load(files[st.npy].opened, mmap_mode="r",
                                         allow_pickle=False)
            continue
        if st.arrow is not None:
            from .sources.arrow import attach_column

            arrays[field.name] = attach_column(files[st.arrow[0]].opened, st.arrow[1],
                                               field.kind, field.shape)
            continue
        if not field.ragged:
            lo, hi = spec.row_range if st.sharded else (0, spec.rows)
            arrays[field.name] = _read_only(_as_array(next(filled), field.dtype,
                                                      (hi - lo, *field.shape)))
            continue
        offsets, values = next(filled), next(filled)
        arrays[field.name] = Ragged(
            _read_only(_as_array(values, field.dtype, (st.n_values, *field.shape))),
            _read_only(_as_array(offsets, np.dtype(np.int64), (spec.rows + 1,))))
    return arrays


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def check_mappable(name: str, sources: list[FieldSource]) -> None:
    """--mmap serves .npy and Arrow IPC files as they are; anything else must be converted."""
    bad = [s.field.name for s in sources if not s.mappable]
    if bad:
        raise DatasetError(
            f"--mmap maps .npy files and uncompressed Arrow IPC files whose columns are one "
            f"chunk each without nulls, but dataset {name!r} has fields {bad} that are not "
            "(inside a .npz archive, Parquet, generated, compressed, several record batches, or "
            "bools); save each array with np.save, or the table with pyarrow.ipc in one record "
            "batch without compression (table.combine_chunks(); feather.write_feather(..., "
            "compression='uncompressed')), or serve without --mmap")
