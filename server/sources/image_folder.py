"""Image folders in torchvision's ``ImageFolder`` layout: ``DIR/<class>/<image>`` (JPEG or PNG).

Three fields: ``image`` (bytes: each file as it is, encoded, held once in shared memory as values
and offsets), ``label`` (int64, the class's index in the sorted class names, as torchvision
numbers them) and ``path`` (str, ``<class>/<file>``, so that an image that cannot be decoded is
named).  Rows are sorted by class, then file name.  Only the directory is listed here (sizes
from ``stat``); the files are read when the dataset is loaded.  Decoding happens in the workers
(``batchfeed.transforms.images``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.schema import BYTES, STR, Field

from .base import DataDirectory, FieldSource, ListedFile, open_listed, utf8_name

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in SUFFIXES)


def is_image_folder(path: Path) -> bool:
    """A directory whose sub-directories hold image files."""
    return any(d.is_dir() and _images(d) for d in path.iterdir())


def image_folder_sources(path: Path) -> list[FieldSource]:
    folder = DataDirectory(path)
    classes: list[str] = []
    for d in sorted(path.iterdir()):
        if d.is_dir() and _images(d):
            folder.directory(d)
            classes.append(d.name)
        elif d.is_symlink() and not d.exists():  # a dangling link or a loop: a class, maybe
            folder.resolve(d)
    files: list[ListedFile] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in _images(path / name):
            files.append(folder.file(f, "image files"))
            labels.append(label)
    sizes = np.fromiter((f.size for f in files), dtype=np.int64, count=len(files))
    names = [utf8_name(f.path.relative_to(path), "image path", path) for f in files]
    where = str(path)

    def fill_images(out: np.ndarray, lo: int, hi: int) -> None:
        pos = 0
        for f in files[lo:hi]:
            _read_listed(f, out[pos : pos + f.size])
            pos += f.size

    def fill_paths(out: np.ndarray, lo: int, hi: int) -> None:
        out[:] = np.frombuffer(b"".join(names[lo:hi]), dtype=np.uint8)

    def offsets_of(lengths: np.ndarray):
        def fill(out: np.ndarray) -> None:
            out[0] = 0
            np.cumsum(lengths, out=out[1:])
        return fill

    label_array = np.asarray(labels, dtype=np.int64)
    path_lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=len(names))
    u8 = np.dtype(np.uint8)
    return [
        FieldSource(Field("image", u8, (), BYTES), len(files), fill_images,
                    n_values=int(sizes.sum()), fill_offsets=offsets_of(sizes),
                    where=f"{where}[image]"),
        FieldSource(Field("label", np.dtype(np.int64), ()), len(files),
                    lambda out, lo, hi: np.copyto(out, label_array[lo:hi]),
                    where=f"{where}[label]", classes=tuple(classes)),
        FieldSource(Field("path", u8, (), STR), len(files), fill_paths,
                    n_values=int(path_lengths.sum()), fill_offsets=offsets_of(path_lengths),
                    where=f"{where}[path]"),
    ]


def _read_listed(f: ListedFile, out: np.ndarray) -> None:
    """The listed file's bytes into ``out`` (its size when listed); refused if it changed."""
    fd = open_listed(f)
    try:
        view, got = memoryview(out.data), 0
        while got < f.size:
            n = os.readv(fd, [view[got:]])
            if not n:
                break
            got += n
        longer = got == f.size and f.size < os.fstat(fd).st_size
    finally:
        os.close(fd)
    if got != f.size or longer:
        raise DatasetError(f"{f.path} changed size while it was read ({f.size} bytes when "
                           "listed); serve a folder nobody writes to")
