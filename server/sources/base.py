"""What every source of data produces: ``FieldSource``s, one per field, read from headers only.

A source is inspected first (names, kinds, dtypes, shapes and sizes, from file headers and
metadata only), so that every problem is reported before anything is allocated; the server then
``fill``s each field straight into its shared segment: one copy from the page cache, no
temporary array.  A ragged field (variable-length rows, strings, bytes) fills two arrays: its
values and its ``rows + 1`` offsets.  Errors are ``DatasetError``s that name the file, the field
and what to do.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
        raise DatasetError(f"{where}: {exc}") from None
    return Field(name, dtype, tuple(int(d) for d in shape), kind)


def regular_file(path: Path, what: str = "data files") -> None:
    """Refuse, before opening it, anything but a regular file (a FIFO would block forever)."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device or socket"
        raise DatasetError(f"{path} is {kind}, not a file; serve regular {what} only (move it "
                           "out of the data directory)")


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
