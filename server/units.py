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

from batchfeed.shared.packing import PackedEpoch, epoch_batches
from batchfeed.shared.plan import ORDERS, BatchPlan
from batchfeed.shared.schema import Field
from batchfeed.shared.units import budget_bounds, packed_fields

from .gather import Output, RaggedFormat, copied_output

_KEEP = 4


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
    cuts = np.flatnonzero(np.diff(units) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(units, cuts) if len(run)]


def packed_outputs(plan: BatchPlan, columns: Mapping[str, object], epoch: int, k0: int,
                   count: int, fmt: RaggedFormat) -> tuple[list[Output], list[dict]]:
    """The outputs of batches ``k0 ..`` of a packed plan: each packed field ``(rows, L)``, and
    the first one's ``_segment_ids`` and ``_positions``; also each batch's arrays (for a
    transform)."""
    params = plan.params
    assert params.pack is not None
    fields = packed_fields(params, columns)

    def build() -> PackedEpoch:
        doc_order = ORDERS.get(plan.n_rows, params, epoch, None, plan.data_key)
        return PackedEpoch.build(np.diff(fields[0].offsets), doc_order, params.pack_length)

    packed = EPOCHS.get(("packed", plan.order_key(epoch), params.pack_length), build)
    assert isinstance(packed, PackedEpoch)
    names = [*params.pack, f"{params.pack[0]}_segment_ids", f"{params.pack[0]}_positions"]
    batches = []
    for k in range(k0, k0 + count):
        parts = [packed.gather(a, b, fields, fmt.pad_value)
                 for a, b in _runs(plan.indices(epoch, k))]
        columns_of = [[*p.fields, p.segment_ids, p.positions] for p in parts]
        batches.append({name: np.concatenate([c[i] for c in columns_of])
                        for i, name in enumerate(names)})
    outputs = [copied_output(name, [b[name] for b in batches]) for name in names]
    return outputs, batches


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
