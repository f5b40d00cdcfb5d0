"""The batch plan: which rows make batch ``k`` of epoch ``e``, as a pure function.

``BatchPlan(n_rows, params).indices(epoch, k)`` depends only on the dataset size and the
parameters, never on workers, timing or restarts.  That is what lets workers re-run lost tasks,
clients resume at any batch, and ranks split an epoch without a coordinator.

An epoch is an *order* of ``N = epoch_rows`` positions (by default the dataset's rows), one
order for all ranks of a job:
- ``sampling="uniform"`` (the default): every row once, in the order ``shuffle`` says: a
  permutation (``full``), as they are (``none``), or a simulated shuffle buffer (``buffer``);
- ``sampling="balanced"``: classes of an integer ``label`` field round-robin, so that a batch
  holds each class within one of the others (``balanced_order`` says when a row repeats);
- ``sampling="weighted"``: ``N`` draws with replacement, row i with probability proportional
  to the float field ``weights``.
``W = world_size`` ranks cut it into batches of ``B = batch_size`` in *rounds* of W batches:
rank r's local batch k is in round k, global batch ``g = k*W + r`` (which seeds transforms).
Every rank takes the same number of steps with the same batch sizes.
- ``drop_last=False``: the order is padded to ``W * ceil(N / W)`` positions, position p >= N
  reading ``order[p % N]`` (``padded_rows``: at most W-1 rows from its start, as torch's
  DistributedSampler does).  Each rank's ``R = ceil(N / W)`` rows make ``K = ceil(R / B)``
  batches: a round but the last is W full batches, g at positions ``g*B``; the last is W
  batches of ``s = R - (K-1)*B`` rows, rank r's at ``(K-1)*W*B + r*s``.  So every row reaches
  a rank, and one rank gets the plain cut.  E.g. 1437 rows, B=64, W=4: 3 rows padded, each rank
  5 batches of 64 and one of 40; with B=512, one batch of 360.
- ``drop_last=True``: full batches only, ``(N // B) // W`` rounds of them at positions ``g*B``;
  the rest of the order (``dropped_rows``, fewer than W*B, other rows each epoch) reaches no
  rank.  A plan with no full batch per rank is refused.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidRequest
from .orders import (
    ORDERS,
    Columns,
    OrderCache,
    balanced_order,
    buffer_order,
    check_label,
    check_weights,
    class_members,
    column,
    full_order,
    index_dtype,
    make_order,
    order_key,
    weighted_order,
)
from .params import MAX_SEED, SAMPLING_MODES, SHUFFLE_MODES, PlanParams

__all__ = ["MAX_SEED", "ORDERS", "SAMPLING_MODES", "SHUFFLE_MODES", "BatchPlan", "Columns",
           "OrderCache", "PlanParams", "balanced_order", "buffer_order", "check_label",
           "check_weights", "class_members", "column", "full_order", "index_dtype",
           "make_order", "order_key", "weighted_order"]


class BatchPlan:
    """One rank's batches of a client's parameters over ``n_rows`` rows.  Counting
    (``batches_per_epoch``, ``batch_rows``, ``padded_rows``, ``dropped_rows``) is arithmetic;
    ``indices`` computes the epoch's order once, in an ``OrderCache`` shared by the process."""

    def __init__(self, n_rows: int, params: PlanParams, orders: OrderCache = ORDERS,
                 columns: Columns | None = None, data_key: str = "", units: int | None = None):
        """``units``: for packed or token-budget plans, the epoch's packed rows or batches
        (from the data; ``packing.plan_units``): the plan then cuts those, in order, and the
        worker maps them to documents."""
        if n_rows < 1:
            raise InvalidRequest("the dataset has no rows")
        if (units is None) != (params.units == "rows"):
            raise InvalidRequest(f"a {params.units} plan needs its units counted from the data")
        self.n_rows, self.params, self.columns, self.data_key = n_rows, params, columns, data_key
        self.epoch_rows = rows = units if units is not None else params.epoch_rows or n_rows
        if rows < 1:
            raise InvalidRequest("the data has no tokens to pack or batch")
        self.batch_size = bs = params.batch_size
        world = params.world_size
        if params.drop_last:
            self.batches_per_epoch = rows // bs // world
            if self.batches_per_epoch == 0:
                fix = f"batch_size <= {rows // world}" if rows >= world else f"world_size <= {rows}"
                raise InvalidRequest(
                    f"{rows} rows per epoch make {rows // bs} full batches of {bs}: with "
                    f"drop_last=True (full batches only) and world_size {world} that leaves no "
                    f"batch for each rank; use drop_last=False (each rank then gets one batch of "
                    f"{-(-rows // world)} rows) or {fix}")
            self.rank_rows = self.batches_per_epoch * bs
        else:
            self.rank_rows = -(-rows // world)
            self.batches_per_epoch = -(-self.rank_rows // bs)
        self.padded_rows = max(0, self.rank_rows * world - rows)  # read again from the start
        self.dropped_rows = max(0, rows - self.rank_rows * world)  # in no rank's batch
        self.last_rows = self.rank_rows - (self.batches_per_epoch - 1) * bs
        self.global_batches = self.batches_per_epoch * world
        self._orders = orders

    def global_batch(self, k: int) -> int:
        return k * self.params.world_size + self.params.rank

    def check_batch(self, k: int) -> None:
        if type(k) is not int or not 0 <= k < self.batches_per_epoch:
            raise InvalidRequest(f"batch {k!r} is out of range: an epoch has "
                                 f"{self.batches_per_epoch} batches for this rank")

    def batch_rows(self, k: int) -> int:
        """Rows in local batch ``k``: ``batch_size``, or ``last_rows`` for the last one."""
        return self.last_rows if k == self.batches_per_epoch - 1 else self.batch_size

    def batch_start(self, k: int) -> int:
        """The epoch position local batch ``k`` starts at (``order[p % N]`` past the end)."""
        last, bs = self.batches_per_epoch - 1, self.batch_size
        if k < last:
            return self.global_batch(k) * bs
        return last * self.params.world_size * bs + self.params.rank * self.last_rows

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of rows (of units, in order, for packed and budget plans: their
        documents' order is the worker's business)."""
        if self.params.units != "rows":
            return np.arange(self.epoch_rows, dtype=index_dtype(self.epoch_rows))
        return self._orders.get(self.n_rows, self.params, epoch, self.columns, self.data_key)

    def indices(self, epoch: int, k: int, order: np.ndarray | None = None) -> np.ndarray:
        """Row indices of local batch ``k`` of ``epoch`` (``order``: that epoch's, if known)."""
        self.check_batch(k)
        order = self.order(epoch) if order is None else order
        start = self.batch_start(k)
        stop = start + self.batch_rows(k)
        if stop <= self.epoch_rows:
            return order[start:stop]
        return order[np.arange(start, stop) % self.epoch_rows]  # the padding

    def chunk_indices(self, epoch: int, k0: int, count: int,
                      order: np.ndarray | None = None) -> np.ndarray:
        """Row indices of local batches ``k0 .. k0+count-1``, concatenated (a view with one
        rank: its batches are contiguous)."""
        self.check_batch(k0)
        self.check_batch(k0 + count - 1)
        order = self.order(epoch) if order is None else order
        if self.params.world_size == 1:
            bs = self.batch_size
            return order[k0 * bs : min((k0 + count) * bs, self.epoch_rows)]
        return np.concatenate([self.indices(epoch, k, order) for k in range(k0, k0 + count)])

    def order_key(self, epoch: int) -> tuple:
        return order_key(self.data_key, self.n_rows, self.params, epoch)
