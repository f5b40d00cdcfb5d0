"""Datasets: named columns with one row per sample, held once in shared memory.

``sources/`` reads what a dataset is made of (headers and metadata only, so that every problem
is reported before anything is allocated).  ``SharedDataset.load`` then fills each field
straight into its own segment: one copy from the page cache, no temporary array.  A ragged
field (variable-length rows, strings, bytes) gets two segments, its values and its int64
offsets (the Arrow layout), so workers gather it without Python objects.  Workers
``attach_arrays`` by segment name, read-only: a fixed field is an array, a ragged one a
``Ragged(values, offsets)``.

With ``--shard I/N`` a server holds shard I of N: the contiguous rows ``shard_range(rows, I, N)``
of every field over 8 bytes a row (small columns, such as labels and weights, and the offsets of
ragged fields are held whole: any plan over all rows can then be computed here).  A sharded
ragged field keeps its shard's values, and offsets shifted so that its first row starts at 0.

With ``--mmap`` nothing is copied: ``.npy`` files are mapped with ``np.load(mmap_mode="r")``
and Arrow IPC columns are viewed in place, so the page cache holds the data once for every
process and a dataset larger than RAM can be served.
"""

from __future__ import annotations

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

__all__ = ["SYNTHETIC_NAME", "DatasetSpec", "FieldSource", "FieldStorage", "SharedDataset",
           "attach_arrays", "check_fields", "check_mappable", "inspect_source",
           "synthetic_arrays", "synthetic_sources"]


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
    """Owns the segments of one dataset.  ``close`` unlinks them; safe to call twice."""

    def __init__(self, spec: DatasetSpec, segments: list[SharedSegment]):
        self.spec = spec
        self._segments = segments

    @classmethod
    def load(cls, name: str, sources: list[FieldSource], token: str, mmap: bool = False,
             classes: tuple[str, ...] = (), shard: tuple[int, int] | None = None,
             fingerprint: Fingerprint | None = None) -> SharedDataset:
        """Fill every field into its own segments (``mmap``: map its file instead); with
        ``shard``, only that shard's rows of the fields that are sharded."""
        segments: list[SharedSegment] = []
        storage: list[FieldStorage] = []
        lo, hi = shard_range(sources[0].rows, shard)
        try:
            for i, src in enumerate(sources):
                if mmap:
                    storage.append(FieldStorage(n_values=src.n_values, npy=src.path,
                                                arrow=src.arrow))
                    continue
                sharded = shard is not None and not held_whole(src.field)
                storage.append(_load_field(src, f"{_safe(name)}{i}", token, segments, name,
                                           (lo, hi) if sharded else (0, src.rows)))
        except BaseException:
            for seg in segments:
                seg.close()
            raise
        classes = classes or next((s.classes for s in sources if s.classes), ())
        spec = DatasetSpec(name, sources[0].rows, tuple(s.field for s in sources),
                           tuple(storage), classes, shard, fingerprint)
        return cls(spec, segments)

    def close(self) -> None:
        for seg in self._segments:
            seg.close()
        self._segments = []


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


def attach_arrays(spec: DatasetSpec) -> tuple[list[SharedSegment], dict[str, np.ndarray | Ragged]]:
    """Map a dataset read-only (in a worker) and view its fields: arrays, or ``Ragged``."""
    segments: list[SharedSegment] = []
    arrays: dict[str, np.ndarray | Ragged] = {}
    for field, st in zip(spec.fields, spec.storage):
        if st.npy is not None:
            arrays[field.name] = np.load(st.npy, mmap_mode="r", allow_pickle=False)
            continue
        if st.arrow is not None:
            from .sources.arrow import attach_column

            arrays[field.name] = attach_column(*st.arrow, field.kind, field.shape)
            continue
        values = SharedSegment.attach(st.values)
        segments.append(values)
        if not field.ragged:
            lo, hi = spec.row_range if st.sharded else (0, spec.rows)
            arrays[field.name] = _as_array(values, field.dtype, (hi - lo, *field.shape))
            continue
        offsets = SharedSegment.attach(st.offsets)
        segments.append(offsets)
        arrays[field.name] = Ragged(
            _as_array(values, field.dtype, (st.n_values, *field.shape)),
            _as_array(offsets, np.dtype(np.int64), (spec.rows + 1,)))
    return segments, arrays


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
