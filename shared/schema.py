"""Field schemas: name -> (kind, dtype, shape), and their checked wire form.

A field is one of four kinds:

- ``fixed``: every row has the same shape (``shape``, per row) and dtype;
- ``ragged``: a row is a variable-length sequence of elements of ``shape`` (usually ``()``:
  token ids); held as Arrow holds it, a ``values`` array and ``rows + 1`` offsets (``Ragged``);
- ``str`` and ``bytes``: a row is a UTF-8 string or a byte string, held the same way with
  uint8 values.

Only fixed-size numeric, bool and fixed-width string dtypes are allowed: they are the ones a raw
buffer can carry without pickle.  ``Field.from_wire`` validates everything a peer sends before
numpy sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import ProtocolError

MAX_FIELDS = 256
MAX_NAME_LEN = 256
MAX_NDIM = 16
MAX_DIM = 2**40

FIXED = "fixed"
RAGGED = "ragged"
STR = "str"
BYTES = "bytes"
KINDS = (FIXED, RAGGED, STR, BYTES)


class Ragged(NamedTuple):
    """Variable-length rows, as Arrow holds them: row i is ``values[offsets[i]:offsets[i+1]]``
    (offsets: int32 or int64, ``rows + 1`` of them, non-decreasing)."""

    values: np.ndarray
    offsets: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

# byte order, kind, item size: '<f4', '|u1', '|b1', '<U8', '|S16'
_DTYPE_RE = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248]|c(8|16)|S[0-9]{1,6}|U[0-9]{1,6})$")


def check_dtype(text: object) -> np.dtype:
    """Parse a dtype string from the wire, accepting only plain fixed-size kinds."""
    if not isinstance(text, str) or not _DTYPE_RE.match(text):
        raise ProtocolError(
            f"dtype {text!r} is not supported on the wire; use bool, (u)int8-64, float16-64, "
            "complex64/128 or fixed-width S/U strings"
        )
    dtype = np.dtype(text)
    if dtype.itemsize == 0:
        raise ProtocolError(f"dtype {text!r} has zero item size")
    return dtype


def check_servable_dtype(name: str, dtype: np.dtype) -> None:
    """Raise ValueError unless a dataset field of this dtype can be served."""
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(
            f"field {name!r} has dtype {dtype}, which batchfeed cannot serve: use plain numeric, "
            "bool or fixed-width string arrays (convert Python objects or structured arrays "
            "into one array per field)"
        )
    try:
        check_dtype(dtype.str)
    except ProtocolError as exc:
        raise ValueError(f"field {name!r}: {exc}") from None


def check_servable_field(name: str, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
    """Raise ValueError, saying what to change, unless clients could receive this field:
    whatever the wire would refuse later is refused here, before anything is served."""
    if not name:
        raise ValueError("a field has an empty name; name every array (np.savez(path, x=..., "
                         "y=...), or a file per field named after it)")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"field name {name[:40]!r}... is {len(name)} characters long; at most "
                         f"{MAX_NAME_LEN} are allowed: rename it")
    if len(row_shape) > MAX_NDIM - 1:
        raise ValueError(f"field {name!r} has {len(row_shape) + 1} dimensions; at most "
                         f"{MAX_NDIM} (one row dimension and {MAX_NDIM - 1} per row) are "
                         "allowed: reshape it")
    if any(d > MAX_DIM for d in row_shape):
        raise ValueError(f"field {name!r} has a dimension over {MAX_DIM}: reshape it")
    check_servable_dtype(name, dtype)


@dataclass(frozen=True)
class Field:
    """One named column: its kind, its dtype, and the shape of a row (fixed) or of one
    element of a row (ragged; () for str and bytes)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    kind: str = FIXED

    @property
    def ragged(self) -> bool:
        return self.kind != FIXED

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row (fixed), or of one element of a row (ragged)."""
        return int(self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def describe(self) -> str:
        if self.kind in (STR, BYTES):
            return f"{self.name}: {self.kind}"
        dims = ",".join(["*"] * self.ragged + [str(d) for d in self.shape])
        return f"{self.name}: {dtype_name(self.dtype)}[{dims}]"

    def to_wire(self) -> list:
        item = [self.name, self.dtype.str, list(self.shape)]
        return item if self.kind == FIXED else [*item, self.kind]

    @classmethod
    def from_wire(cls, item: object) -> Field:
        if not (isinstance(item, list) and len(item) in (3, 4)):
            raise ProtocolError(f"a field must be [name, dtype, shape(, kind)], got {item!r:.80}")
        name, dtype, shape = item[:3]
        kind = item[3] if len(item) == 4 else FIXED
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise ProtocolError(f"field name {name!r:.80} must be a non-empty string")
        if kind not in KINDS:
            raise ProtocolError(f"field kind {kind!r:.40} is not one of {KINDS}")
        return cls(name, check_dtype(dtype), check_shape(shape), kind)


def dtype_name(dtype: np.dtype) -> str:
    """A dtype as people write it: float32, int64, bool, <U7 (not str224), |S16."""
    return dtype.str if dtype.kind in "USV" else dtype.name


def check_shape(shape: object, *, ndim_max: int = MAX_NDIM) -> tuple[int, ...]:
    """Validate a shape from the wire: a short list of non-negative ints."""
    if not isinstance(shape, list) or len(shape) > ndim_max:
        raise ProtocolError(f"shape {shape!r:.80} must be a list of at most {ndim_max} ints")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise ProtocolError(f"shape {shape!r:.80} has a bad dimension {dim!r}")
    return tuple(shape)


def schema_to_wire(fields: tuple[Field, ...]) -> list:
    return [f.to_wire() for f in fields]


def schema_from_wire(items: object) -> tuple[Field, ...]:
    if not isinstance(items, list) or not 0 < len(items) <= MAX_FIELDS:
        raise ProtocolError(f"a schema must list 1 to {MAX_FIELDS} fields")
    fields = tuple(Field.from_wire(item) for item in items)
    if len({f.name for f in fields}) != len(fields):
        raise ProtocolError("a schema lists the same field twice")
    return fields


def describe_schema(fields: tuple[Field, ...]) -> str:
    return ", ".join(f.describe() for f in fields)
