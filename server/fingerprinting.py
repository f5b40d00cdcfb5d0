"""Computing a dataset's fingerprint (``batchfeed.shared.fingerprint``) when a server starts.

What is hashed (SHA-256, with the schema, the row count and the class names):

- data from files (``--data PATH``): PATH itself, or every regular file under the directory
  PATH (by relative path; hidden files and directories aside), so that every server of one
  export gets the same fingerprint however it loads it (whole, one shard, or mapped with
  ``--mmap``).  ``full`` covers every byte, hashed in 32 MiB pieces on every core, straight
  from a read-only mapping; ``sampled`` covers each file's size and 64 blocks of 64 KiB spread
  over it (all of a file up to 4 MiB).  ``mode="sampled"`` computes only the latter.
- data in memory (``batchfeed.serve(data)``): every field's rows as the workers read them (a
  fixed field's rows; a ragged field's lengths and values), filled in bounded windows.
- the built-in synthetic dataset: its size and schema, and the first draws of the generator it
  is made with (which pin the generator's algorithm: the rows are a function of them).

A file that cannot be read is a DatasetError naming it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from batchfeed.shared.errors import DatasetError
from batchfeed.shared.fingerprint import DIGEST_HEX, Fingerprint
from batchfeed.shared.schema import Field

from .config import cpu_count
from .sources import FieldSource

MODES = ("full", "sampled")
PIECE = 32 * 2**20  # bytes hashed as one piece of a file's full digest
BLOCK = 64 * 1024  # one sampled block
BLOCKS = 64  # sampled blocks per file
WHOLE_UP_TO = 4 * 2**20  # a file this small is sampled whole
WINDOW = 32 * 2**20  # bytes of rows filled at a time for data in memory


def _sha(*parts: bytes | memoryview) -> hashlib._Hash:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h


def _header(fields: Sequence[Field], rows: int, classes: Sequence[str]) -> bytes:
    schema = ";".join(f"{f.name}:{f.kind}:{f.dtype.str}:{list(f.shape)}" for f in fields)
    return f"batchfeed-fingerprint-1|{rows}|{schema}|{'/'.join(classes)}|".encode()


def _hex(h: hashlib._Hash) -> str:
    return h.hexdigest()[:DIGEST_HEX]


# ---------------------------------------------------------------------------------------------
# Files


def data_files(path: Path) -> list[tuple[str, Path]]:
    """(name, path) of the files a ``--data`` path stands for, in a stable order: the file
    itself (named ""), or every regular file under a directory, by relative path."""
    if not path.is_dir():
        return [("", path)]
    root = path.resolve()
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or not (real == str(root) or real.startswith(str(root) + os.sep)):
            dirnames[:] = []  # a loop, or a link out of the directory (the loader refuses it)
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if name.startswith("."):
                continue
            try:
                regular = stat.S_ISREG(full.stat().st_mode)
            except OSError:
                continue  # dangling: not data (the loader says so if it needed it)
            if regular:
                out.append((str(full.relative_to(path)), full))
    return out


def _pieces(size: int) -> list[tuple[int, int]]:
    return [(a, min(size, a + PIECE)) for a in range(0, size, PIECE)] or [(0, 0)]


def _samples(size: int) -> list[tuple[int, int]]:
    if size <= WHOLE_UP_TO:
        return [(0, size)]
    step = (size - BLOCK) / (BLOCKS - 1)
    return [(int(i * step), int(i * step) + BLOCK) for i in range(BLOCKS)]


def _hash_range(path: Path, a: int, b: int) -> bytes:
    """SHA-256 of bytes ``a .. b`` of a file, read through a mapping made for this range alone
    (a folder of a million images never holds a million mappings)."""
    if a == b:
        return _sha(b"").digest()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = a - a % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, b - start, prot=mmap.PROT_READ, offset=start) as m, \
                memoryview(m) as view:
            return _sha(view[a - start : b - start]).digest()
    finally:
        os.close(fd)


def file_fingerprint(path: Path, fields: Sequence[Field], rows: int,
                     classes: Sequence[str] = (), mode: str = "full") -> Fingerprint:
    """The fingerprint of the data at ``path`` (a file or a directory)."""
    if mode not in MODES:
        raise DatasetError(f"--fingerprint must be one of {', '.join(MODES)}, got {mode!r}")
    files = data_files(path)
    sizes = []
    for _, f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError as exc:
            raise DatasetError(f"{f} cannot be read to fingerprint it ({exc.strerror}); check "
                               "its permissions, or move it out of the data directory") from None
    sampled = _digest(files, sizes, _samples, combine=False)
    full = _digest(files, sizes, _pieces, combine=True) if mode == "full" else None
    head = _header(fields, rows, classes)
    return Fingerprint(full=_hex(_sha(head, full)) if full is not None else None,
                       sampled=_hex(_sha(head, sampled)))


def _digest(files: list[tuple[str, Path]], sizes: list[int],
            ranges: Callable[[int], list[tuple[int, int]]], combine: bool) -> bytes:
    """One digest over every file: its name, size, and a hash of each of its ranges (each range
    hashed on its own, on every core; ``combine``: ranges hashed apart, then their digests)."""
    jobs = [(i, a, b) for i, size in enumerate(sizes) for a, b in ranges(size)]

    def run(job: tuple[int, int, int]) -> bytes:
        i, a, b = job
        try:
            return _hash_range(files[i][1], a, b)
        except (OSError, ValueError) as exc:  # a file that shrank or went under us
            raise DatasetError(f"{files[i][1]} changed while it was fingerprinted ({exc}); "
                               "serve files nobody writes to") from None

    with ThreadPoolExecutor(max(1, min(cpu_count(), len(jobs)))) as pool:
        digests = list(pool.map(run, jobs))
    out = hashlib.sha256()
    at = 0
    for (name, _), size in zip(files, sizes):
        n = len(ranges(size))
        out.update(f"{name}\0{size}\0".encode())
        part = b"".join(digests[at : at + n])
        out.update(_sha(part).digest() if combine else part)
        at += n
    return out.digest()


# ---------------------------------------------------------------------------------------------
# Data in memory, and the synthetic dataset


def _windows(src: FieldSource, rows: int) -> Iterator[tuple[int, int]]:
    per_row = max(1, src.values_nbytes // max(1, src.rows)) if src.field.ragged \
        else max(1, src.field.row_nbytes)
    step = max(1, WINDOW // per_row)
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def sources_fingerprint(sources: Sequence[FieldSource], rows: int | None = None,
                        classes: Sequence[str] = (), note: str = "") -> Fingerprint:
    """The fingerprint of data given as sources (in memory): every field's first ``rows``
    rows (default: all), as the workers read them."""
    total = sources[0].rows
    rows = total if rows is None else min(rows, total)
    h = _sha(_header([s.field for s in sources], total, classes), note.encode())
    for src in sources:
        h.update(f"{src.field.name}\0".encode())
        if src.field.ragged:
            assert src.fill_offsets is not None
            offsets = np.empty(total + 1, np.int64)
            src.fill_offsets(offsets)
            h.update(np.diff(offsets[: rows + 1]).astype("<i8").tobytes())
            for lo, hi in _windows(src, rows):
                out = np.empty((int(offsets[hi] - offsets[lo]), *src.field.shape),
                               src.field.dtype)
                src.fill(out, lo, hi)
                h.update(_bytes(out))
            continue
        for lo, hi in _windows(src, rows):
            out = np.empty((hi - lo, *src.field.shape), src.field.dtype)
            src.fill(out, lo, hi)
            h.update(_bytes(out))
    return Fingerprint(full=_hex(h))


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def synthetic_fingerprint(sources: Sequence[FieldSource], seed: int = 0) -> Fingerprint:
    """The synthetic dataset's: its size, schema and seed, and the generator's first draws
    (its rows are drawn from them in order, so nothing else can differ)."""
    probe = np.random.default_rng(seed).standard_normal(64, dtype=np.float32)
    h = _sha(_header([s.field for s in sources], sources[0].rows, ()),
             f"synthetic|{seed}|".encode(), probe.tobytes())
    return Fingerprint(full=_hex(h))
