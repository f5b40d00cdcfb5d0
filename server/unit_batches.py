"""In a worker: the batches of packed and token-budget plans, from the plan's units.

A packed plan's units are packed rows: a batch is a run of them (wrapping to the first rows for
the ranks' padding), gathered by the epoch's ``PackedEpoch`` from the documents in the epoch's
order.  A token-budget plan has one unit per batch: the epoch's ``batch_perm`` names which of the
fixed batches it is, and the epoch's length-sorted order its documents.  Both per-epoch
structures are pure functions of (data, params, seed, epoch); ``EpochCache`` keeps the last few
per worker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from batchfeed.shared.plan import ORDERS, BatchPlan
from batchfeed.shared.schema import Field

from .layout import Fill, Output, RaggedFormat
from .packing import PackedEpoch, PackedRows, epoch_batches
from .plan_units import budget_bounds, packed_fields

_KEEP = 4
# Tokens per PackedEpoch.gather call: its int64 temporaries (~24 bytes a token) then stay in a
# core's L2.  Measured on the dev VM (2 MiB L2), 2048-token rows: 4.4-4.8 ns/token for 32-128
# rows a call, 14 ns/token for 256 rows (a whole 4 MiB slot's worth was slower still).
_GATHER_TOKENS = 1 << 16


class EpochCache:
    """The last few epochs' packing or token-budget structures, by plan and epoch."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], object]) -> object:
        hit = self._items.get(key)
        if hit is None:
            hit = self._items[key] = make()
            while len(self._items) > _KEEP:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return hit


EPOCHS = EpochCache()


def _runs(units: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs [a, b) of ``units`` (a batch's packed rows wrap once at most)."""
    if not len(units):
        return []
    cuts = np.flatnonzero(np.diff(units) != 1)
    firsts = units[np.concatenate(([0], cuts + 1))]
    lasts = units[np.concatenate((cuts, [len(units) - 1]))]
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts)]


def _packed_epoch(plan: BatchPlan, columns: Mapping[str, object],
                  epoch: int) -> tuple[PackedEpoch, list, list[str]]:
    """The epoch's packing (cached), the packed fields' ``(values, offsets)``, and the output
    names: each packed field, then the first one's ``_segment_ids`` and ``_positions``."""
    params = plan.params
    assert params.pack is not None
    fields = packed_fields(params, columns)

    def build() -> PackedEpoch:
        doc_order = ORDERS.get(plan.n_rows, params, epoch, None, plan.data_key)
        return PackedEpoch.build(np.diff(fields[0].offsets), doc_order, params.pack_length)

    packed = EPOCHS.get(("packed", plan.order_key(epoch), params.pack_length), build)
    assert isinstance(packed, PackedEpoch)
    names = [*params.pack, f"{params.pack[0]}_segment_ids", f"{params.pack[0]}_positions"]
    return packed, fields, names


def packed_outputs(plan: BatchPlan, columns: Mapping[str, object], epoch: int, k0: int,
                   count: int, fmt: RaggedFormat) -> tuple[list[Output], Fill]:
    """The outputs of batches ``k0 ..`` of a packed plan, each ``(rows, L)``, and how to fill
    their regions: ``PackedEpoch.gather`` writes every output straight into the slot, a block
    of at most ``_GATHER_TOKENS`` of a run of consecutive packed rows at a time (the chunk's
    batches usually make one run)."""
    packed, fields, names = _packed_epoch(plan, columns, epoch)
    L = packed.row_length
    units = [plan.indices(epoch, k) for k in range(k0, k0 + count)]
    dtypes = [np.dtype(values.dtype) for values, _ in fields] + [np.dtype(np.int32)] * 2
    outputs = [Output(name, dtype, None, [(len(u), L) for u in units])
               for name, dtype in zip(names, dtypes)]

    step = max(1, _GATHER_TOKENS // L)

    def fill(regions: list[np.ndarray], n: int) -> None:
        rows = [region.reshape(-1, L) for region in regions]
        at = 0
        for a, b in _runs(np.concatenate(units[:n])):
            for r0 in range(a, b, step):
                r1 = min(r0 + step, b)
                part = [r[at : at + r1 - r0] for r in rows]
                packed.gather(r0, r1, fields, fmt.pad_value, PackedRows(part[:-2], *part[-2:]))
                at += r1 - r0

    return outputs, fill


def packed_batches(plan: BatchPlan, columns: Mapping[str, object], epoch: int, k0: int,
                   count: int, fmt: RaggedFormat) -> list[dict[str, np.ndarray]]:
    """Batches ``k0 ..`` of a packed plan as fresh arrays, by output name (for a transform)."""
    packed, fields, names = _packed_epoch(plan, columns, epoch)
    batches = []
    for k in range(k0, k0 + count):
        parts = [packed.gather(a, b, fields, fmt.pad_value)
                 for a, b in _runs(plan.indices(epoch, k))]
        columns_of = [[*p.fields, p.segment_ids, p.positions] for p in parts]
        batches.append({name: np.concatenate([c[i] for c in columns_of])
                        for i, name in enumerate(names)})
    return batches


def budget_rows(plan: BatchPlan, columns: Mapping[str, object], fields: Sequence[Field],
                epoch: int, k0: int, count: int) -> tuple[np.ndarray, list[int]]:
    """The documents of batches ``k0 ..`` of a token-budget plan, and each batch's count."""
    params = plan.params
    lengths, starts = budget_bounds(params, columns, plan.data_key, fields)

    def build() -> tuple[np.ndarray, np.ndarray]:
        return epoch_batches(lengths, starts, params.seed, epoch)

    got = EPOCHS.get(("budget", plan.order_key(epoch), params.max_tokens, params.max_length),
                     build)
    assert isinstance(got, tuple)
    order: np.ndarray = got[0]
    perm: np.ndarray = got[1]
    docs = []
    for k in range(k0, k0 + count):
        (unit,) = plan.indices(epoch, k)
        b = int(perm[unit])
        docs.append(order[starts[b] : starts[b + 1]])
    return np.concatenate(docs), [len(d) for d in docs]
