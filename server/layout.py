"""The slot layout: how a chunk's outputs lie in a ring slot, and how they are written there.

A chunk's *outputs* are the fields clients receive, each written as one region of the slot
(``ALIGN``-byte aligned) holding that output's part of every batch, back to back; each
``Output`` knows its batches' shapes and how to write the first ``n`` of them into its region.
``write_outputs`` fits as many batches as the slot holds and writes them (a single batch too big
for a slot is a ``WorkerError`` saying what to change); the layout it returns is what a DONE
tells the front end and a BATCH header tells the client.  ``RaggedFormat`` is how a session wants
variable-length fields.  Used by ``gather.py`` (rows of the dataset) and ``unit_batches.py`` (packed
rows and token budgets); it imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchfeed.shared.errors import WorkerError
from batchfeed.shared.plan import BatchPlan

ALIGN = 64
VALUES, OFFSETS = "values", "offsets"  # the roles of a flat ragged field's two outputs


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class RaggedFormat:
    """How ragged fields are served (a session's parameters)."""

    mode: str = "pad"  # or "flat"
    pad_value: float = 0
    max_length: int | None = None

    @classmethod
    def of(cls, plan: BatchPlan) -> RaggedFormat:
        p = plan.params
        return cls(p.ragged, p.pad_value, p.max_length)


@dataclass
class Output:
    """One output of a chunk: its name, dtype, role, each batch's shape, and how to write the
    first ``n`` batches into a region (or None when the chunk's outputs are written together)."""

    name: str
    dtype: np.dtype
    role: str | None
    shapes: list[tuple[int, ...]]
    write: Callable[[np.ndarray, int], None] | None = None  # None: written by write_outputs' fill

    def sizes(self) -> np.ndarray:
        """Bytes of the first n batches, for n = 0 .. len(shapes)."""
        out = np.zeros(len(self.shapes) + 1, np.int64)
        np.cumsum([math.prod(s) * self.dtype.itemsize for s in self.shapes], out=out[1:])
        return out

    def wire_dtype(self) -> list:
        return [self.name, self.dtype.str] + ([self.role] if self.role else [])


Layout = tuple[list, list, list, list]  # dtypes, shapes per batch per output, offsets, sizes


Fill = Callable[[list[np.ndarray], int], None]


def write_outputs(outputs: list[Output], count: int, slot: np.ndarray, what: str,
                  fill: Fill | None = None) -> Layout:
    """Write as many of the ``count`` batches as fit in ``slot``; return their layout.

    Each output writes its own region, or ``fill(regions, n)`` writes them all at once (packed
    rows compute every output in one pass)."""
    cumulative = [o.sizes() for o in outputs]
    aligned = np.zeros(count + 1, np.int64)  # slot bytes for n = 0 .. count batches
    for c in cumulative:
        aligned += -(-c[: count + 1] // ALIGN) * ALIGN
    fit = min(count, int(np.searchsorted(aligned, len(slot), side="right")) - 1)
    if not fit:
        need = int(aligned[1])
        raise WorkerError(f"{what} is {need} bytes, more than the server's {len(slot)}-byte "
                          "slots; restart the server with a larger --slot-mb, or ask for "
                          "smaller batches (batch_size, max_length)")
    offsets, sizes, regions, offset = [], [], [], 0
    for o, c in zip(outputs, cumulative):
        nbytes = int(c[fit])
        regions.append(slot[offset : offset + nbytes].view(o.dtype))
        offsets.append(offset)
        sizes.append(nbytes)
        offset = align(offset + nbytes)
    if fill is not None:
        fill(regions, fit)
    for o, region in zip(outputs, regions):
        if o.write is not None:
            o.write(region, fit)
    shapes = [[list(o.shapes[b]) for o in outputs] for b in range(fit)]
    return [o.wire_dtype() for o in outputs], shapes, offsets, sizes


def copied_output(name: str, parts: list[np.ndarray], role: str | None = None) -> Output:
    """An output whose parts were computed first (then copied into the slot)."""

    def write(region: np.ndarray, n: int) -> None:
        pos = 0
        for p in parts[:n]:
            region[pos : pos + p.size] = p.reshape(-1)
            pos += p.size

    return Output(name, parts[0].dtype, role, [p.shape for p in parts], write)
