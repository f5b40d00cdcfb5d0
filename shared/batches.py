"""The body of a BATCH message: how its frames hold batches (part of the wire format, which
``protocol`` owns and re-exports).

A BATCH header lists its outputs (``[name, dtype]``, or ``[name, dtype, role]``) and, per batch,
each output's shape; then comes one raw frame per output holding that output's bytes for all the
batches, back to back (or, on the fast path, a region of a ring slot).  ``chunk_layout``
validates a header and works out where each batch's bytes lie; ``field_views`` cuts the frames
into per-batch dicts of zero-copy numpy views.  Nothing here copies batch bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ProtocolError
from .schema import MAX_FIELDS, MAX_NAME_LEN, check_dtype, check_shape

MAX_BATCHES_PER_MESSAGE = 1024
MAX_CONTAINER_LEN = 4096
MAX_INT = 2**63 - 1


@dataclass(frozen=True)
class ChunkLayout:
    """Where each batch of a BATCH message lives: output dtypes (and roles), and per batch each
    output's shape.

    Output ``f``'s bytes for batch ``b`` start at ``starts[f][b]`` inside that output's buffer
    (its data frame, or its region of a ring slot) and take ``nbytes[f][b]`` bytes.  An output
    with a role ``values`` or ``offsets`` (of a ragged field) is not one row per batch row: its
    first dimension is the batch's elements, or its rows + 1.  A shard server adds the output
    ``_positions`` (role ``positions``): where each of its rows goes in the whole batch.
    """

    names: tuple[str, ...]
    dtypes: tuple[np.dtype, ...]
    shapes: tuple[tuple[tuple[int, ...], ...], ...]  # [batch][field]
    starts: tuple[tuple[int, ...], ...]  # [field][batch]
    nbytes: tuple[tuple[int, ...], ...]  # [field][batch]
    roles: tuple[str | None, ...] = ()

    @property
    def count(self) -> int:
        return len(self.shapes)

    def field_nbytes(self, f: int) -> int:
        return sum(self.nbytes[f])

    def rows(self, b: int) -> int:
        for f, role in enumerate(self.roles or (None,) * len(self.names)):
            if role is None:
                return self.shapes[b][f][0]
            if role == ROLE_OFFSETS:
                return self.shapes[b][f][0] - 1
        return 0


ROLE_VALUES = "values"
ROLE_OFFSETS = "offsets"
ROLE_POSITIONS = "positions"  # a shard's rows: where each goes in the whole batch
_ROLES = (ROLE_VALUES, ROLE_OFFSETS, ROLE_POSITIONS)
POSITIONS = "_positions"  # the name of a shard's positions output


def chunk_layout(header: dict) -> ChunkLayout:
    """Validate a BATCH header's dtypes and shapes and work out each batch's byte range."""
    dtypes_in, shapes_in = header["dtypes"], header["shapes"]
    if not 0 < len(dtypes_in) <= MAX_FIELDS:
        raise ProtocolError(f"a batch must have 1 to {MAX_FIELDS} fields")
    if not 0 < len(shapes_in) <= MAX_BATCHES_PER_MESSAGE:
        raise ProtocolError(f"a message must carry 1 to {MAX_BATCHES_PER_MESSAGE} batches")
    names, dtypes, roles = [], [], []
    for item in dtypes_in:
        if not (isinstance(item, list) and len(item) in (2, 3) and isinstance(item[0], str)
                and 0 < len(item[0]) <= MAX_NAME_LEN
                and (len(item) == 2 or item[2] in _ROLES)):
            raise ProtocolError(f"a batch field must be [name, dtype(, role)], got {item!r:.80}")
        names.append(item[0])
        dtypes.append(check_dtype(item[1]))
        roles.append(item[2] if len(item) == 3 else None)
    n_fields = len(names)
    itemsizes = [d.itemsize for d in dtypes]
    counts: dict[tuple, int] = {}  # each distinct shape is checked once (most batches share one)
    shapes = []
    starts = [[0] * len(shapes_in) for _ in range(n_fields)]
    nbytes = [[0] * len(shapes_in) for _ in range(n_fields)]
    for b, per_field in enumerate(shapes_in):
        if not isinstance(per_field, list) or len(per_field) != n_fields:
            raise ProtocolError(f"batch {b} must give one shape per field ({n_fields})")
        batch_shapes: list[tuple[int, ...]] = []
        rows = None
        for f, raw_shape in enumerate(per_field):
            cached = tuple(raw_shape) if isinstance(raw_shape, list) else None
            count = counts.get(cached) if cached is not None else None
            if count is None or cached is None:
                shape = check_shape(raw_shape)
                if not shape:
                    raise ProtocolError(f"field {names[f]!r} of batch {b} has no batch dimension")
                count = counts[shape] = math.prod(shape)
            else:
                shape = cached
            n_rows = shape[0] - 1 if roles[f] == ROLE_OFFSETS else \
                None if roles[f] == ROLE_VALUES else shape[0]
            if n_rows is not None:
                if rows is None:
                    rows = n_rows
                elif n_rows != rows:
                    raise ProtocolError(f"fields of batch {b} disagree on the number of rows")
            size = count * itemsizes[f]
            if size > MAX_INT:
                raise ProtocolError(f"field {names[f]!r} of batch {b} is absurdly large")
            nbytes[f][b] = size
            if b:
                starts[f][b] = starts[f][b - 1] + nbytes[f][b - 1]
            batch_shapes.append(shape)
        shapes.append(tuple(batch_shapes))
    return ChunkLayout(tuple(names), tuple(dtypes), tuple(shapes),
                       tuple(map(tuple, starts)), tuple(map(tuple, nbytes)), tuple(roles))


class FieldBatch(dict):
    """A batch as the trainer gets it: field name -> array.  A plain dict but for the error a
    wrong field name raises, which says what the batch has (``__missing__`` runs only then,
    so a lookup costs what a dict's does)."""

    __slots__ = ()

    def __missing__(self, key: object) -> Any:
        raise KeyError(f"no field {key!r} in this batch; it has: {', '.join(map(str, self))}")


def field_views(layout: ChunkLayout, field_buffers: Sequence) -> list[FieldBatch]:
    """Split one buffer per field into per-batch dicts (``FieldBatch``) of zero-copy numpy views.

    Each view's ``base`` chain ends at the buffer object (a zmq.Frame or a slot array), which
    therefore stays alive as long as any view does.
    """
    if len(field_buffers) != len(layout.names):
        raise ProtocolError(
            f"batch has {len(field_buffers)} data frames for {len(layout.names)} fields"
        )
    flat = []
    for f, buf in enumerate(field_buffers):
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        if arr.nbytes != layout.field_nbytes(f):
            raise ProtocolError(
                f"field {layout.names[f]!r} frame has {arr.nbytes} bytes but its dtype "
                f"{layout.dtypes[f]} and shapes need {layout.field_nbytes(f)}"
            )
        flat.append(arr)
    batches = []
    for b, shapes in enumerate(layout.shapes):
        batches.append(FieldBatch(
            (name, flat[f][layout.starts[f][b] : layout.starts[f][b] + layout.nbytes[f][b]]
             .view(layout.dtypes[f])
             .reshape(shapes[f]))
            for f, name in enumerate(layout.names)
        ))
    return batches


def check_int_list(values: object, what: str, *, low: int = 0, high: int = MAX_INT,
                   max_len: int = MAX_CONTAINER_LEN) -> list[int]:
    """Validate a list of ints from a header (slot numbers, offsets)."""
    if not isinstance(values, list) or len(values) > max_len:
        raise ProtocolError(f"{what} must be a list of at most {max_len} ints")
    for v in values:
        if type(v) is not int or not low <= v <= high:
            raise ProtocolError(f"{what} has a bad entry {v!r:.40}")
    return values
