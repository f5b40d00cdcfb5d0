"""What every source of data produces: ``FieldSource``s, one per field, read from headers only.

A source is inspected first (names, kinds, dtypes, shapes and sizes, from file headers and
metadata only), so that every problem is reported before anything is allocated; the server then
``fill``s each field straight into its shared segment: one copy from the page cache, no
temporary array.  A ragged field (variable-length rows, strings, bytes) fills two arrays: its
values and its ``rows + 1`` offsets.  Errors are ``DatasetError``s that name the file, the field
and what to do.

Files are found through one mechanism, whatever their format.  A ``DataDirectory`` lists the
files of a data directory (of ``.npy`` or Parquet files, of images, a Hugging Face
``save_to_disk`` directory): each must resolve inside it, symlinks followed (links inside it are
fine; a link out of it, a dangling link and a link loop are refused).  A ``ListedFile`` remembers
the file it found (device and inode), and ``open_listed`` opens that file again at load without
following a link put in its place and refuses any other file: what is read is what was listed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.schema import MAX_FIELDS, Field, check_servable_field

Fill = Callable[[np.ndarray, int, int], None]  # fill(out, lo, hi): rows lo..hi-1 into out
Offsets = Callable[[np.ndarray], None]  # fill_offsets(out): all rows + 1 offsets, from 0


@dataclass(frozen=True)
class FieldSource:
    """A field before loading: its schema and how to fill destination arrays with it.

    Fixed fields fill rows ``lo .. hi-1`` into a ``(hi - lo, *shape)`` array; ragged ones fill
    the values of those rows (``(offsets[hi] - offsets[lo], *shape)``) and, whole, the
    ``rows + 1`` int64 offsets from 0.  A server holding one shard asks for its rows only.
    ``path`` names a ``.npy`` file, ``arrow`` an Arrow IPC file and column, that could be
    memory-mapped instead.
    """

    field: Field
    rows: int
    fill: Fill
    n_values: int = 0  # ragged: elements in all rows
    fill_offsets: Offsets | None = None  # ragged
    path: str | None = None
    arrow: tuple[str, str] | None = None  # (IPC file, column)
    where: str = ""  # the file (and member or column) it comes from, for error messages
    classes: tuple[str, ...] = ()  # a label field's class names (an image folder's classes)

    @property
    def values_nbytes(self) -> int:
        count = self.n_values if self.field.ragged else self.rows
        return count * self.field.row_nbytes

    @property
    def nbytes(self) -> int:
        return self.values_nbytes + (8 * (self.rows + 1) if self.field.ragged else 0)

    @property
    def mappable(self) -> bool:
        return self.path is not None or self.arrow is not None


def make_field(name: str, shape: tuple[int, ...], dtype: np.dtype, where: str,
               kind: str = "fixed") -> Field:
    """A checked field (``shape``: the row's, or for ragged fields one element's)."""
    try:
        check_servable_field(name, dtype, shape)
    except ValueError as exc:
        raise DatasetError(f"{printable(where)}: {exc}") from None
    utf8_name(name, "field name", where)
    return Field(name, dtype, tuple(int(d) for d in shape), kind)


def printable(name: str | Path) -> str:
    """A file name for a message: bytes that are not UTF-8 shown as ``\\xff``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def utf8_name(name: str | Path, what: str, where: str | Path = "") -> bytes:
    """``name`` as UTF-8 (what clients receive); a file name in another encoding is refused."""
    try:
        return str(name).encode("utf-8")
    except UnicodeEncodeError:
        at = f"{printable(where)}: " if where else ""
        raise DatasetError(f"{at}the {what} '{printable(name)}' is not UTF-8 (a file name in "
                           "another encoding?); rename it") from None


@dataclass(frozen=True)
class ListedFile:
    """A data file as it was listed: the name it was found under, the file that name led to
    (symlinks followed) and that file's identity and size."""

    path: Path  # as listed, for messages
    real: Path  # where it resolved
    dev: int
    ino: int
    size: int


def _file_kind(mode: int) -> str:
    return "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
        "a device or socket"


def _resolve(entry: Path) -> Path:
    """``entry`` with every symlink followed; a dangling link or a loop is one clear line."""
    shown = printable(entry)
    try:
        return entry.resolve(strict=True)
    except FileNotFoundError:
        if entry.is_symlink():
            target = printable(os.readlink(entry))
            raise DatasetError(f"{shown} is a dangling link (to {target}, which does not exist); "
                               "remove the link or restore what it points to") from None
        raise DatasetError(f"{shown} disappeared while the data was listed; serve a directory "
                           "nobody changes while the server starts") from None
    except (OSError, RuntimeError) as exc:  # Python < 3.13: RuntimeError("Symlink loop ...")
        if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
            raise DatasetError(f"{shown} is a link loop (links that lead back to themselves); "
                               "remove it or point it at a file") from None
        raise DatasetError(f"{shown} cannot be read ({exc.strerror}); make it readable or move "
                           "it out of the data directory") from None


def _stat_file(entry: Path, real: Path, st: os.stat_result | None, what: str) -> ListedFile:
    try:
        st = st or os.stat(real)
    except OSError as exc:
        raise DatasetError(f"{printable(entry)} cannot be read ({exc.strerror}); make it "
                           "readable or move it out of the data directory") from None
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{printable(entry)} is {_file_kind(st.st_mode)}, not a file; serve "
                           f"regular {what} only (move it out of the data directory)")
    return ListedFile(entry, real, st.st_dev, st.st_ino, st.st_size)


def list_file(path: Path, what: str = "data files") -> ListedFile:
    """A file given by name (``--data x.npy``): it may be a link to anywhere, the user chose it."""
    return _stat_file(path, _resolve(path), None, what)


class DataDirectory:
    """A directory of data files: every file and sub-directory served from it must resolve
    inside it.  Plain files cost one ``lstat`` each; only links are resolved."""

    def __init__(self, root: Path):
        self.root = root
        self.real = _resolve(root)
        self._dirs: dict[Path, Path] = {root: self.real}  # listed directory -> where it is

    def resolve(self, entry: Path) -> Path:
        """Where ``entry`` leads, refused unless that is inside the directory."""
        return self._locate(entry)[0]

    def directory(self, entry: Path) -> Path:
        """A sub-directory (such as an image class), checked; its files can then be listed."""
        real = self.resolve(entry)
        self._dirs[entry] = real
        return real

    def file(self, entry: Path, what: str = "data files") -> ListedFile:
        """A file of the directory, checked: inside it, and a regular file."""
        real, st = self._locate(entry)
        return _stat_file(entry, real, st, what)

    def _locate(self, entry: Path) -> tuple[Path, os.stat_result | None]:
        """(where ``entry`` leads, its ``lstat`` when it is no link)."""
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            raise DatasetError(f"{printable(entry)} disappeared while the data was listed; "
                               "serve a directory nobody changes while the server starts") \
                from None
        parent = self._dirs.get(entry.parent)
        if parent is not None and not stat.S_ISLNK(st.st_mode):
            return parent / entry.name, st
        real = _resolve(entry)
        if real != self.real and self.real not in real.parents:
            target = printable(os.readlink(entry) if entry.is_symlink() else real)
            raise DatasetError(
                f"{printable(entry)} is a link to {target}, outside the data directory "
                f"{printable(self.root)}; batchfeed serves only what is inside it: copy the file "
                "in, or serve the folder it points into")
        return real, None


def open_listed(f: ListedFile) -> int:
    """A read-only descriptor of the file that was listed as ``f``.  A link put in its place
    is not followed, a FIFO does not block, and any other file is refused."""
    try:
        fd = os.open(f.real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DatasetError(f"{printable(f.path)} changed after it was listed ({exc.strerror}); "
                           "serve data nobody changes while the server starts") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (f.dev, f.ino) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DatasetError(f"{printable(f.path)} was replaced by another file after it was "
                           "listed; serve data nobody changes while the server starts")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def open_listed_file(f: ListedFile) -> BinaryIO:
    """``open_listed`` as a buffered binary file object."""
    return os.fdopen(open_listed(f), "rb")


@contextlib.contextmanager
def listed_path(f: ListedFile) -> Iterator[str]:
    """A name for exactly the listed file, for libraries that open files by name (pyarrow,
    ``np.load(mmap_mode=...)``): ``/proc/self/fd/N`` of the file opened as listed."""
    fd = open_listed(f)
    try:
        yield f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(f.real)
    finally:
        os.close(fd)


def check_fields(sources: list[FieldSource], where: str) -> None:
    """Fields of one dataset: some, not too many, distinct names, all with the same rows."""
    if not sources:
        raise DatasetError(f"{where} has no fields to serve")
    if len(sources) > MAX_FIELDS:
        raise DatasetError(f"{where} has {len(sources)} fields; at most {MAX_FIELDS} are "
                           "allowed: combine some into one array")
    names = [s.field.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DatasetError(f"{where} has several fields named {', '.join(twice)}; rename them")
    lengths = {s.field.name: s.rows for s in sources}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{name}: {n} rows" for name, n in lengths.items())
        raise DatasetError(f"fields of {where} must all have the same number of rows (first "
                           f"dimension), but {listing}")
    if next(iter(lengths.values())) == 0:
        raise DatasetError(f"{where} has 0 rows; there is nothing to serve")


def default_names(sources: list[FieldSource]) -> list[str]:
    """Fields named by numpy's defaults (np.savez(path, X, y) gives arr_0, arr_1)."""
    return [s.field.name for s in sources if s.field.name.startswith("arr_")
            and s.field.name[4:].isdigit()]
