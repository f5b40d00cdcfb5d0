"""Batch assembly, in a worker: the rows of a chunk of batches, written straight into a slot.

A chunk's *outputs* are the fields clients receive, each written as one region of the slot
(the slot layout is ``layout.py``); the BATCH header gives each part's shape, so the client cuts
the regions into batches without copies.  Packed rows and token budgets are ``unit_batches.py``.

- a fixed field: ``(rows, *shape)`` per batch, gathered with ``np.take(..., out=region)``;
- a ragged field (``ragged="pad"``, the default): ``f`` as ``(rows, longest)`` padded with
  ``pad_value``, plus ``f_lengths`` (int64, rows);
- a ragged field with ``ragged="flat"``, and every ``str`` or ``bytes`` field: ``f`` as the
  rows' values back to back (role ``values``), plus ``f_offsets`` (int64, rows + 1, from 0,
  role ``offsets``), the layout of ``torch.nested.nested_tensor_from_jagged``;
- ``max_length`` truncates every ragged row first.

Sizes are known before anything is written, so when a chunk outgrows the slot only the batches
that fit are written (the front end asks for the rest again, in smaller tasks); a single batch
too big for a slot is a ``WorkerError`` saying what to change.

With a server-side transform the rows are gathered into fresh arrays (ragged fields as
``Ragged(values, offsets)`` from 0), transformed, and the outputs (arrays, or ``Ragged`` for
ragged outputs) are then written the same way: one copy more than without.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import numpy as np

from batchfeed.shared.errors import WorkerError
from batchfeed.shared.plan import BatchPlan
from batchfeed.shared.protocol import POSITIONS, ROLE_POSITIONS
from batchfeed.shared.schema import BYTES, STR, Field, Ragged

from .dataset import DatasetSpec
from .layout import OFFSETS, VALUES, Layout, Output, RaggedFormat, copied_output, write_outputs
from .transform_runner import Transform
from .unit_batches import budget_rows, packed_batches, packed_outputs

Column: TypeAlias = "np.ndarray | Ragged"

# ---------------------------------------------------------------------------------------------
# Outputs from the dataset's columns


def take_output(name: str, column: np.ndarray, idx: np.ndarray, rows: list[int]) -> Output:
    """A fixed field: one ``np.take`` for all the batches that fit, straight into the slot."""
    shape = column.shape[1:]

    def write(region: np.ndarray, n: int) -> None:
        total = sum(rows[:n])
        # mode="clip" avoids numpy's buffered out= path; the plan's indices are in range.
        np.take(column, idx[:total], axis=0, out=region.reshape((total, *shape)), mode="clip")

    return Output(name, column.dtype, None, [(r, *shape) for r in rows], write)


def ragged_outputs(field: Field, column: Ragged, idx: np.ndarray, rows: list[int],
                   fmt: RaggedFormat) -> list[Output]:
    """A ragged, str or bytes field's outputs for rows ``idx`` (batches of ``rows``)."""
    starts = column.offsets[idx].astype(np.int64)
    lengths = column.offsets[idx + 1] - starts
    if fmt.max_length and field.kind not in (STR, BYTES):
        np.minimum(lengths, fmt.max_length, out=lengths)
    bounds = np.concatenate(([0], np.cumsum(rows)))
    return _ragged_parts(field, column.values, starts, lengths, bounds, fmt)


def _ragged_parts(field: Field, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                  bounds: np.ndarray, fmt: RaggedFormat) -> list[Output]:
    count = len(bounds) - 1
    per_batch = [lengths[bounds[b] : bounds[b + 1]] for b in range(count)]
    elem = field.shape
    if fmt.mode == "pad" and field.kind not in (STR, BYTES):
        longest = [int(ls.max(initial=0)) for ls in per_batch]

        def write_padded(region: np.ndarray, n: int) -> None:
            pos = 0
            for b in range(n):
                ls, width = per_batch[b], longest[b]
                out = region[pos : pos + len(ls) * width * _prod(elem)].reshape(
                    (len(ls), width, *elem))
                out[...] = fmt.pad_value
                total = int(ls.sum())
                if total:
                    row = np.repeat(np.arange(len(ls)), ls)
                    col = np.arange(total) - np.repeat(np.cumsum(ls) - ls, ls)
                    out[row, col] = values[_sources(starts[bounds[b] : bounds[b + 1]], ls)]
                pos += out.size

        def write_lengths(region: np.ndarray, n: int) -> None:
            region[:] = lengths[: bounds[n]]

        return [Output(field.name, field.dtype, None,
                       [(len(ls), w, *elem) for ls, w in zip(per_batch, longest)], write_padded),
                Output(f"{field.name}_lengths", np.dtype(np.int64), None,
                       [(len(ls),) for ls in per_batch], write_lengths)]

    totals = [int(ls.sum()) for ls in per_batch]

    def write_values(region: np.ndarray, n: int) -> None:
        total = sum(totals[:n])
        src = _sources(starts[: bounds[n]], lengths[: bounds[n]])
        np.take(values, src, axis=0, out=region.reshape((total, *elem)), mode="clip")

    def write_offsets(region: np.ndarray, n: int) -> None:
        pos = 0
        for b in range(n):
            ls = per_batch[b]
            region[pos] = 0
            np.cumsum(ls, out=region[pos + 1 : pos + 1 + len(ls)])
            pos += len(ls) + 1

    return [Output(field.name, field.dtype, VALUES, [(t, *elem) for t in totals], write_values),
            Output(f"{field.name}_offsets", np.dtype(np.int64), OFFSETS,
                   [(len(ls) + 1,) for ls in per_batch], write_offsets)]


def _sources(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions in ``values`` of the rows' elements, back to back."""
    total = int(lengths.sum())
    local = np.cumsum(lengths) - lengths
    return np.repeat(starts - local, lengths) + np.arange(total)


def _prod(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def chunk_rows(arrays: Mapping[str, Column], spec: DatasetSpec, plan: BatchPlan, epoch: int,
               k0: int, count: int,
               order: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """The dataset rows of batches ``k0 ..`` (concatenated), and each batch's count."""
    if plan.params.units == "budget":
        return budget_rows(plan, arrays, spec.fields, epoch, k0, count)
    rows = [plan.batch_rows(k) for k in range(k0, k0 + count)]
    return plan.chunk_indices(epoch, k0, count, order), rows


def gather_chunk(arrays: Mapping[str, Column], spec: DatasetSpec, plan: BatchPlan, epoch: int,
                 k0: int, count: int, slot: np.ndarray,
                 order: np.ndarray | None = None) -> Layout:
    """Write batches ``k0 .. k0+count-1`` (as many as fit) into ``slot``; return their layout."""
    fmt = RaggedFormat.of(plan)
    what = f"batch {k0} of epoch {epoch}"
    if plan.params.units == "packed":
        packed, fill = packed_outputs(plan, arrays, epoch, k0, count, fmt)
        return write_outputs(packed, count, slot, what, fill)
    idx, rows = chunk_rows(arrays, spec, plan, epoch, k0, count, order)
    outputs: list[Output] = []
    if spec.shard is not None:
        idx, rows, positions = own_rows(spec, idx, rows)
        outputs.append(copied_output(POSITIONS, positions, ROLE_POSITIONS))
    first = spec.row_range[0]
    for f, st in zip(spec.fields, spec.storage):
        column = arrays[f.name]
        if isinstance(column, Ragged):  # offsets whole (a shard's values start at its rows)
            outputs += ragged_outputs(f, column, idx, rows, fmt)
        else:
            outputs.append(take_output(f.name, column, idx - first if st.sharded else idx,
                                       rows))
    return write_outputs(outputs, count, slot, what)


def own_rows(spec: DatasetSpec, idx: np.ndarray,
             rows: list[int]) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """A shard's rows of each batch: their indices, counts, and positions in the batch."""
    lo, hi = spec.row_range
    mine = (idx >= lo) & (idx < hi)
    bounds = np.cumsum([0, *rows])
    positions = [np.flatnonzero(mine[bounds[b] : bounds[b + 1]]).astype(np.int32)
                 for b in range(len(rows))]
    return idx[mine], [len(p) for p in positions], positions


# ---------------------------------------------------------------------------------------------
# Transforms


def batch_of(arrays: Mapping[str, Column], spec: DatasetSpec, idx: np.ndarray) -> dict:
    """Rows ``idx`` as fresh arrays (ragged fields as ``Ragged`` with offsets from 0)."""
    out: dict[str, Column] = {}
    for f in spec.fields:
        column = arrays[f.name]
        if isinstance(column, Ragged):
            starts = column.offsets[idx].astype(np.int64)
            lengths = column.offsets[idx + 1] - starts
            offsets = np.zeros(len(idx) + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            out[f.name] = Ragged(column.values[_sources(starts, lengths)], offsets)
        else:
            out[f.name] = np.take(column, idx, axis=0)
    return out


def transform_chunk(arrays: Mapping[str, Column], spec: DatasetSpec, plan: BatchPlan,
                    epoch: int, k0: int, count: int, slot: np.ndarray, transform: Transform,
                    order: np.ndarray | None = None) -> Layout:
    """Like ``gather_chunk``, with ``transform`` applied to each batch before it is written."""
    fmt = RaggedFormat.of(plan)
    results: list[dict[str, Column]] = []
    if plan.params.units == "packed":
        inputs: list[dict] = packed_batches(plan, arrays, epoch, k0, count, fmt)
    else:
        idx, rows = chunk_rows(arrays, spec, plan, epoch, k0, count, order)
        bounds = np.cumsum([0, *rows])
        inputs = [batch_of(arrays, spec, idx[bounds[b] : bounds[b + 1]]) for b in range(count)]
    for k, batch in zip(range(k0, k0 + count), inputs):
        rng = transform.rng(plan.params.seed, epoch, plan.global_batch(k))
        out = transform.apply(batch, rng, f"epoch {epoch} batch {k}")
        if results and (list(out) != list(results[0]) or any(
                _dtype(out[n]) != _dtype(results[0][n]) for n in out)):
            raise WorkerError(
                f"transform {transform.name} returned different fields or dtypes for batches "
                f"{k0} and {k} of epoch {epoch}; every batch must have the same field names and "
                "dtypes (shapes may vary)")
        results.append(out)
    outputs: list[Output] = []
    for name, first in results[0].items():
        if isinstance(first, Ragged):
            given = next((f for f in spec.fields if f.name == name), None)  # str stays str
            kind = given.kind if given is not None and given.kind in (STR, BYTES) and \
                first.values.dtype == np.uint8 else "ragged"
            outputs += _ragged_results(name, [r[name] for r in results], fmt, kind)
        else:
            outputs.append(copied_output(name, [r[name] for r in results]))
    return write_outputs(outputs, count, slot, f"transform {transform.name}'s batch {k0} of "
                                               f"epoch {epoch}")


def _ragged_results(name: str, parts: list[Ragged], fmt: RaggedFormat,
                    kind: str = "ragged") -> list[Output]:
    """A transform's ragged output, one ``Ragged`` per batch, as outputs."""
    first = parts[0].values
    values = np.concatenate([p.values for p in parts])
    bases = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
    starts = np.concatenate([p.offsets[:-1] + base for p, base in zip(parts, bases)])
    lengths = np.concatenate([np.diff(p.offsets) for p in parts])
    bounds = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([p.rows for p in parts], out=bounds[1:])
    field = Field(name, first.dtype, first.shape[1:], kind)
    return _ragged_parts(field, values, starts.astype(np.int64), lengths, bounds, fmt)


def _dtype(value: Column) -> np.dtype:
    return value.values.dtype if isinstance(value, Ragged) else value.dtype
