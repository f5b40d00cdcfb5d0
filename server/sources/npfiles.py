"""NumPy files: a ``.npz`` archive (each array a field, under its own name), a ``.npy`` file (one
field, named after the file stem), or a directory of ``.npy`` files.

Headers only are read here; ``fill`` later re-opens the file, skips the header and reads the
data straight into the destination (one copy).  Plain ``.npy`` files can be memory-mapped
instead (``--mmap``).  The files of a directory must resolve inside it, and every file is
re-opened as it was listed (``base.DataDirectory``, ``base.open_listed``).
"""

from __future__ import annotations

import contextlib
import functools
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batchfeed.shared.errors import DatasetError

from .base import (
    DataDirectory,
    FieldSource,
    Fill,
    ListedFile,
    list_file,
    listed_path,
    make_field,
    open_listed_file,
)

_READ_CHUNK = 16 * 2**20
WHAT = ".npy/.npz files"


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


def _array_field(name: str, shape: tuple[int, ...], dtype: np.dtype, where: str):
    if len(shape) == 0:
        raise DatasetError(f"{where} holds a 0-d array; every field needs one row per sample "
                           "along its first dimension")
    return make_field(name, tuple(shape[1:]), dtype, where)


def _copy_stream(open_fp: Callable, where: str, row_nbytes: int) -> Fill:
    """A filler that re-opens the file, skips the header and the rows before ``lo``, and reads
    rows ``lo .. hi-1`` into ``out``."""

    def fill(out: np.ndarray, lo: int, hi: int) -> None:
        with open_fp() as fp:
            _npy_header(fp, where)
            _skip(fp, lo * row_nbytes)
            view = memoryview(out.reshape(-1).view(np.uint8).data)
            pos = 0
            while pos < len(view):
                got = fp.readinto(view[pos : pos + _READ_CHUNK])
                if not got:
                    raise DatasetError(f"{where} is truncated: expected {len(view)} data bytes, "
                                       f"found {pos}")
                pos += got

    return fill


def _skip(fp, nbytes: int) -> None:
    if not nbytes:
        return
    if fp.seekable():
        fp.seek(nbytes, 1)
        return
    while nbytes:  # a compressed archive member: read past it
        got = len(fp.read(min(nbytes, _READ_CHUNK)))
        if not got:
            return
        nbytes -= got


def _copy_array(load: Callable[[], np.ndarray]) -> Fill:
    def fill(out: np.ndarray, lo: int, hi: int) -> None:
        np.copyto(out, load()[lo:hi])

    return fill


def npy_source(path: Path, name: str, listed: ListedFile | None = None) -> FieldSource:
    """A ``.npy`` file (``listed``: as a directory listed it)."""
    where = str(path)
    f = listed or list_file(path, WHAT)
    with open_listed_file(f) as fp:
        shape, fortran, dtype = _npy_header(fp, where)
    field = _array_field(name, shape, dtype, where)
    if fortran:
        fill = _copy_array(functools.partial(_npy_mapped, f))
    else:
        fill = _copy_stream(functools.partial(open_listed_file, f), where, field.row_nbytes)
    return FieldSource(field, int(shape[0]), fill, path=str(f.real), where=where)


def _npy_mapped(f: ListedFile) -> np.ndarray:
    with listed_path(f) as name:
        return np.load(name, mmap_mode="r", allow_pickle=False)


def npz_sources(path: Path) -> list[FieldSource]:
    f = list_file(path, WHAT)
    with open_listed_file(f) as archive_fp:
        return _npz_members(path, f, archive_fp)


def _npz_members(path: Path, f: ListedFile, archive_fp: BinaryIO) -> list[FieldSource]:
    try:
        zf = zipfile.ZipFile(archive_fp)
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
            field = _array_field(name, shape, dtype, where)

            @contextlib.contextmanager
            def open_member(member: str = member) -> Iterator:
                with open_listed_file(f) as whole, zipfile.ZipFile(whole) as archive, \
                        archive.open(member) as fp:
                    yield fp

            if fortran:
                fill = _copy_array(functools.partial(_npz_member, f, name))
            else:
                fill = _copy_stream(open_member, where, field.row_nbytes)
            sources.append(FieldSource(field, int(shape[0]), fill, where=where))
    return sources


def _npz_member(f: ListedFile, name: str) -> np.ndarray:
    with open_listed_file(f) as fp, np.load(fp, allow_pickle=False) as archive:
        return archive[name]


def npy_dir_sources(path: Path) -> list[FieldSource]:
    folder = DataDirectory(path)
    return [npy_source(f, f.stem, folder.file(f, WHAT)) for f in sorted(path.iterdir())
            if f.suffix == ".npy"]
