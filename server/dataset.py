"""Datasets: named numpy arrays with a common first dimension, held once in shared memory.

``inspect_source`` reads only file headers, so that every problem (a wrong path, an object
dtype, fields of different lengths, too little shared memory) is reported before anything is
allocated.  ``SharedDataset.load`` then reads each field straight into its own segment: one copy
from the page cache, no temporary array.  Workers ``attach_arrays`` by segment name, read-only.

With ``--mmap``, ``.npy`` fields are not copied at all: the server and its workers map the
files read-only (``np.load(mmap_mode="r")``), so the page cache holds the data once for every
process and a dataset larger than RAM can be served (pages come and go as the kernel sees fit).

The built-in default is a learnable synthetic classification task (``x``: 64 float32 features,
``y``: int64 label in 10 classes, the arg-max of a fixed random linear map plus noise).
"""

from __future__ import annotations

import contextlib
import functools
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.schema import MAX_FIELDS, Field, check_servable_field, describe_schema
from batchfeed.shared.shm import SharedSegment, segment_name

SYNTHETIC_NAME = "synthetic"
SYNTHETIC_FEATURES = 64
SYNTHETIC_CLASSES = 10
_SYNTHETIC_CHUNK = 65536
_READ_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class FieldSource:
    """A field before loading: its schema and how to fill a destination array with it."""

    field: Field
    rows: int
    fill: Callable[[np.ndarray], None]
    path: str | None = None  # a plain .npy file that could be memory-mapped instead
    where: str = ""  # the file (and member) it comes from, for error messages

    @property
    def nbytes(self) -> int:
        return self.rows * self.field.row_nbytes


@dataclass(frozen=True)
class DatasetSpec:
    """What a worker needs to attach a dataset: its name, rows, schema and segment names."""

    name: str
    rows: int
    fields: tuple[Field, ...]
    segments: tuple[str, ...]  # one per field, same order: a segment name, or
    files: tuple[str | None, ...] = ()  # ... a .npy file path where the field is memory-mapped

    @property
    def row_nbytes(self) -> int:
        return sum(f.row_nbytes for f in self.fields)

    def describe(self) -> str:
        mapped = " (memory-mapped)" if any(self.files) else ""
        return f"{self.name}: {self.rows:,} rows [{describe_schema(self.fields)}]{mapped}"


# ---------------------------------------------------------------------------------------------
# Reading sources (headers first, data later).


def _npy_header(fp, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fp)
        if version == (2, 0):
            return fmt.read_array_header_2_0(fp)
    except ValueError as exc:
        raise DatasetError(f"{where} is not a valid .npy array ({exc})") from None
    raise DatasetError(f"{where} is not a valid .npy array this server can read (format "
                       f"version {version}); re-save it with numpy.save")


def _make_field(name: str, shape: tuple[int, ...], dtype: np.dtype, where: str) -> Field:
    if len(shape) == 0:
        raise DatasetError(f"{where} holds a 0-d array; every field needs one row per sample "
                           "along its first dimension")
    row_shape = tuple(int(d) for d in shape[1:])
    try:
        check_servable_field(name, dtype, row_shape)
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return Field(name, dtype, row_shape)


def _regular_file(path: Path) -> None:
    """Refuse, before opening it, anything but a regular file (a FIFO would block forever)."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device or socket"
        raise DatasetError(f"{path} is {kind}, not a file; serve regular .npy/.npz files only "
                           "(move it out of the data directory)")


def _copy_stream(open_fp: Callable, where: str) -> Callable[[np.ndarray], None]:
    """A filler that re-opens the file, skips the header and reads the data into ``out``."""

    def fill(out: np.ndarray) -> None:
        with open_fp() as fp:
            _npy_header(fp, where)
            view = memoryview(out.reshape(-1).view(np.uint8).data)
            pos = 0
            while pos < len(view):
                got = fp.readinto(view[pos : pos + _READ_CHUNK])
                if not got:
                    raise DatasetError(f"{where} is truncated: expected {len(view)} data bytes, "
                                       f"found {pos}")
                pos += got

    return fill


def _copy_array(load: Callable[[], np.ndarray]) -> Callable[[np.ndarray], None]:
    def fill(out: np.ndarray) -> None:
        np.copyto(out, load())

    return fill


def _npy_source(path: Path, name: str) -> FieldSource:
    where = str(path)
    _regular_file(path)
    with open(path, "rb") as fp:
        shape, fortran, dtype = _npy_header(fp, where)
    field = _make_field(name, shape, dtype, where)
    if fortran:
        fill = _copy_array(lambda: np.load(path, mmap_mode="r", allow_pickle=False))
    else:
        fill = _copy_stream(functools.partial(open, path, "rb"), where)
    return FieldSource(field, int(shape[0]), fill, str(path), where)


def _npz_sources(path: Path) -> list[FieldSource]:
    _regular_file(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DatasetError(f"{path} is not a valid .npz file (not a zip archive)") from None
    sources = []
    with zf:
        members = [m for m in zf.namelist() if m.endswith(".npy")]
        if not members:
            raise DatasetError(f"{path} holds no arrays")
        seen: set[str] = set()
        for member in members:
            name = member[: -len(".npy")]
            where = f"{path}[{name}]"
            if name in seen:
                raise DatasetError(f"{path} holds two arrays named {name!r}; every field needs "
                                   "its own name: re-save it with np.savez")
            seen.add(name)
            try:
                with zf.open(member) as fp:
                    shape, fortran, dtype = _npy_header(fp, where)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise DatasetError(f"{where} is damaged ({exc}); re-create the file") from None
            field = _make_field(name, shape, dtype, where)

            @contextlib.contextmanager
            def open_member(member: str = member) -> Iterator:
                with zipfile.ZipFile(path) as archive, archive.open(member) as fp:
                    yield fp

            if fortran:
                fill = _copy_array(functools.partial(_npz_member, path, name))
            else:
                fill = _copy_stream(open_member, where)
            sources.append(FieldSource(field, int(shape[0]), fill, where=where))
    return sources


def _npz_member(path: Path, name: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        return archive[name]


def inspect_source(path: str) -> list[FieldSource]:
    """The fields of a .npz file, a .npy file or a directory of .npy files, from headers only."""
    p = Path(path)
    hint = "--data takes a .npz file, a .npy file, or a directory of .npy files"
    if not p.exists():
        raise DatasetError(f"no such file or directory: {path}; {hint}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npy")
        if not files:
            raise DatasetError(f"directory {path} has no .npy files; {hint}")
        sources = [_npy_source(f, f.stem) for f in files]
    elif p.suffix == ".npz":
        sources = _npz_sources(p)
    elif p.suffix == ".npy":
        sources = [_npy_source(p, p.stem)]
    else:
        raise DatasetError(f"{path} is neither .npz nor .npy; {hint}")
    check_fields(sources, path)
    return sources


def check_fields(sources: list[FieldSource], where: str) -> None:
    """Fields of one dataset: not too many, and all with the same number of rows."""
    if len(sources) > MAX_FIELDS:
        raise DatasetError(f"{where} has {len(sources)} fields; at most {MAX_FIELDS} are "
                           "allowed: combine some into one array")
    lengths = {s.field.name: s.rows for s in sources}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{name}: {n} rows" for name, n in lengths.items())
        raise DatasetError(f"fields of {where} must all have the same number of rows (first "
                           f"dimension), but {listing}")
    if next(iter(lengths.values())) == 0:
        raise DatasetError(f"{where} has 0 rows; there is nothing to serve")


# ---------------------------------------------------------------------------------------------
# The built-in synthetic dataset.


def synthetic_sources(rows: int, seed: int = 0) -> list[FieldSource]:
    """A learnable 10-class problem: y = argmax(x @ W + noise), x ~ N(0, 1)."""
    if rows < 1:
        raise DatasetError(f"--synthetic-rows must be at least 1, got {rows}")
    chunks = _synthetic_chunks(rows, seed)
    x_field = Field("x", np.dtype(np.float32), (SYNTHETIC_FEATURES,))
    y_field = Field("y", np.dtype(np.int64), ())
    state: dict[str, np.ndarray] = {}

    def fill_x(out: np.ndarray) -> None:
        state["y"] = np.empty(rows, np.int64)
        for start, x, y in chunks():
            out[start : start + len(x)] = x
            state["y"][start : start + len(y)] = y

    def fill_y(out: np.ndarray) -> None:
        out[:] = state.pop("y")

    return [FieldSource(x_field, rows, fill_x), FieldSource(y_field, rows, fill_y)]


Chunk = tuple[int, np.ndarray, np.ndarray]  # (first row, x, y)


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
        src.fill(arr)
        out[src.field.name] = arr
    return out


# ---------------------------------------------------------------------------------------------
# Shared memory.


class SharedDataset:
    """Owns the segments of one dataset.  ``close`` unlinks them; safe to call twice."""

    def __init__(self, spec: DatasetSpec, segments: list[SharedSegment]):
        self.spec = spec
        self._segments = segments

    @classmethod
    def load(cls, name: str, sources: list[FieldSource], token: str,
             mmap: bool = False) -> SharedDataset:
        """Copy every field into its own segment (``mmap``: map the .npy files instead)."""
        segments: list[SharedSegment] = []
        names: list[str] = []
        files: list[str | None] = []
        try:
            for i, src in enumerate(sources):
                if mmap:
                    assert src.path is not None
                    names.append("")
                    files.append(src.path)
                    continue
                seg = SharedSegment.create(segment_name(token, f"{_safe(name)}{i}"), src.nbytes)
                segments.append(seg)
                names.append(seg.name)
                files.append(None)
                try:
                    src.fill(_as_array(seg, src.field, src.rows))
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
                    raise DatasetError(
                        f"{src.where or name}: field {src.field.name!r} cannot be read "
                        f"({type(exc).__name__}: {exc}); the file is damaged: re-create it"
                    ) from None
        except BaseException:
            for seg in segments:
                seg.close()
            raise
        spec = DatasetSpec(name, sources[0].rows, tuple(s.field for s in sources),
                           tuple(names), tuple(files))
        return cls(spec, segments)

    def close(self) -> None:
        for seg in self._segments:
            seg.close()
        self._segments = []


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)[:32] + "_"


def _as_array(seg: SharedSegment, field: Field, rows: int) -> np.ndarray:
    if seg.buf is None:
        return np.empty((rows, *field.shape), field.dtype)
    count = rows * int(np.prod(field.shape, dtype=np.int64))
    return np.frombuffer(seg.buf, dtype=field.dtype, count=count).reshape((rows, *field.shape))


def attach_arrays(spec: DatasetSpec) -> tuple[list[SharedSegment], dict[str, np.ndarray]]:
    """Map a dataset read-only (in a worker) and view it as arrays."""
    segments, arrays = [], {}
    files = spec.files or (None,) * len(spec.fields)
    for field, seg_name, path in zip(spec.fields, spec.segments, files):
        if path is not None:
            arrays[field.name] = np.load(path, mmap_mode="r", allow_pickle=False)
            continue
        seg = SharedSegment.attach(seg_name)
        segments.append(seg)
        arrays[field.name] = _as_array(seg, field, spec.rows)
    return segments, arrays


def check_mappable(name: str, sources: list[FieldSource]) -> None:
    """--mmap serves .npy files as they are; anything else must be converted first."""
    bad = [s.field.name for s in sources if s.path is None]
    if bad:
        raise DatasetError(
            f"--mmap maps .npy files, but dataset {name!r} has fields {bad} inside a .npz "
            "archive (or generated); save each array as its own .npy file (np.save) in a "
            "directory and serve that directory")

