"""A dataset sharded across servers: each batch arrives in pieces, one per shard, and is put
back together here, in plan order.  Plain objects, no sockets: the I/O thread drives them.

Every shard server computes the same plan and sends, for batch k, the rows of batch k that it
holds, with their positions in the batch (the ``POSITIONS`` output).  ``merge`` scatters the
pieces into whole batches (one copy: the pieces come from different messages), field by field as
the field is served: fixed rows, padded rows (re-padded to the batch's longest row), flat values
and offsets, or lists of str and bytes.  ``ShardMerger`` takes each shard's pieces in plan
order (each shard has its own window: see ``window.py``) and hands over a batch once every shard's
piece of it is there; an error from any shard ends the stream at its batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchfeed.shared.errors import ServerUnavailable
from batchfeed.shared.protocol import FieldBatch
from batchfeed.shared.schema import BYTES, FIXED, STR, Field

POSITIONS = "_positions"  # the output that says where a shard's rows go in the batch


def held(shard: tuple[int, int] | None) -> str:
    return "all rows" if shard is None else f"shard {shard[0]}/{shard[1]}"


def assign_lanes(shards: dict[str, tuple[int, int] | None]) -> dict[str, int]:
    """Each server's lane (its shard, or 0 when every server holds all rows), from what each
    said it holds; ServerUnavailable, with the reason, for a set that does not make one
    dataset: a mix of whole and sharded servers, shards of different splits, a missing one."""
    counts = {s[1] if s else None for s in shards.values()}
    if counts == {None}:
        return dict.fromkeys(shards, 0)
    if None in counts or len(counts) > 1:
        listing = ", ".join(f"{a}: {held(s)}" for a, s in shards.items())
        raise ServerUnavailable(
            f"the servers of one client must all hold the whole dataset, or together its N "
            f"shards, one shard each (a shard may have several servers); got {listing}")
    n = next(iter(counts))
    assert n is not None
    missing = sorted(set(range(n)) - {s[0] for s in shards.values() if s is not None})
    if missing:
        raise ServerUnavailable(
            f"the dataset is split into {n} shards but no server given holds shard "
            f"{', '.join(map(str, missing))}; give the client a server of every shard")
    return {address: s[0] for address, s in shards.items() if s is not None}


def merge(parts: Sequence[dict], fields: Sequence[Field], flat: bool,
          pad_value: float) -> FieldBatch:
    """One batch from each shard's piece of it (pieces may hold no rows)."""
    where = [np.asarray(p[POSITIONS], dtype=np.int64) for p in parts]
    rows = sum(len(w) for w in where)
    out = FieldBatch()
    for f in fields:
        if f.kind == FIXED:
            out[f.name] = _rows(f.name, parts, where, rows)
        elif f.kind == STR or (f.kind == BYTES and not flat):
            merged: list = [None] * rows
            for p, w in zip(parts, where):
                for i, value in zip(w.tolist(), p[f.name]):
                    merged[i] = value
            out[f.name] = merged
        elif flat or f.kind == BYTES:
            out[f.name], out[f"{f.name}_offsets"] = _flat(f.name, parts, where, rows)
        else:
            out[f.name] = _padded(f.name, parts, where, rows, pad_value)
            out[f"{f.name}_lengths"] = _rows(f"{f.name}_lengths", parts, where, rows)
    return out


def _rows(name: str, parts: Sequence[dict], where: list[np.ndarray], rows: int) -> np.ndarray:
    first = parts[0][name]
    out = np.empty((rows, *first.shape[1:]), first.dtype)
    for p, w in zip(parts, where):
        out[w] = p[name]
    return out


def _padded(name: str, parts: Sequence[dict], where: list[np.ndarray], rows: int,
            pad_value: float) -> np.ndarray:
    first = parts[0][name]
    width = max(p[name].shape[1] for p in parts)
    out = np.full((rows, width, *first.shape[2:]), pad_value, first.dtype)
    for p, w in zip(parts, where):
        out[w, : p[name].shape[1]] = p[name]
    return out


def _flat(name: str, parts: Sequence[dict], where: list[np.ndarray],
          rows: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.zeros(rows, np.int64)
    for p, w in zip(parts, where):
        lengths[w] = np.diff(p[f"{name}_offsets"])
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    first = parts[0][name]
    values = np.empty((int(offsets[-1]), *first.shape[1:]), first.dtype)
    for p, w in zip(parts, where):
        piece = p[f"{name}_offsets"]
        n = np.diff(piece)
        dest = np.repeat(offsets[w] - piece[:-1], n) + np.arange(int(piece[-1]))
        values[dest] = p[name]
    return values, offsets


class ShardMerger:
    """Pieces of each shard in plan order -> whole batches in plan order."""

    def __init__(self, shards: int, fields: Sequence[Field], flat: bool, pad_value: float):
        self.shards = shards
        self.fields = tuple(fields)
        self.flat = flat
        self.pad_value = pad_value
        self._pieces: list[deque] = [deque() for _ in range(shards)]
        self._error: BaseException | None = None

    def add(self, shard: int, items: list, error: BaseException | None) -> None:
        """What shard ``shard``'s window handed over (in order), and the error that ended it."""
        self._pieces[shard].extend(items)
        if error is not None and self._error is None:
            self._error = error

    def take(self) -> tuple[list[tuple[Any, int]], BaseException | None]:
        """Whole batches (batch, nbytes) ready in order, and the error that follows them once
        no shard can give more."""
        out = []
        while all(self._pieces):
            pieces = [q.popleft() for q in self._pieces]
            batch = merge([b for b, _ in pieces], self.fields, self.flat, self.pad_value)
            out.append((batch, sum(n for _, n in pieces)))
        error = self._error if self._error is not None and not all(self._pieces) else None
        if error is not None:
            self._error = None
            for q in self._pieces:
                q.clear()
        return out, error
