"""The batch plan: which rows make batch ``k`` of epoch ``e``, as a pure function.

``BatchPlan(n_rows, params).indices(epoch, k)`` depends only on the dataset size and the
parameters, never on workers, timing or restarts.  That is what lets workers re-run lost tasks,
clients resume at any batch, and ranks split an epoch without a coordinator.

An epoch is an *order* (a permutation of the rows for ``full``, the rows as they are for
``none``, a simulated shuffle buffer for ``buffer``) cut into global batches of ``batch_size``.
Global batch ``g`` goes to rank ``g % world_size`` as its local batch ``g // world_size``.
Every rank gets ``global_batches // world_size`` batches; the last ``global_batches %
world_size`` global batches of the order are dropped so that ranks stay in step.  Because the
order is reshuffled every epoch, different rows fall in that tail each epoch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import InvalidRequest

SHUFFLE_MODES = ("full", "buffer", "none")
MAX_SEED = 2**63 - 1
_ORDER_CACHE_SIZE = 4  # epoch orders kept per process (shared by ranks and batch sizes)
_ORDER_IDLE_S = 5.0  # ... and dropped once unused this long

# Tags keep the random streams of different modes apart for the same (seed, epoch).
_TAG_FULL = 0x46554C4C
_TAG_BUFFER = 0x42554646


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequest(f"{name} must be an int {bound}, got {value!r}")


@dataclass(frozen=True)
class PlanParams:
    """Everything that decides a client's batch order (validated on construction)."""

    batch_size: int
    shuffle: str = "full"
    seed: int = 0
    buffer_size: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        if self.shuffle not in SHUFFLE_MODES:
            raise InvalidRequest(
                f"shuffle must be one of {', '.join(map(repr, SHUFFLE_MODES))}, got {self.shuffle!r}"
            )
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.shuffle == "buffer":
            if type(self.buffer_size) is not int or self.buffer_size < 1:
                raise InvalidRequest(
                    f"shuffle='buffer' needs buffer_size >= 1, got {self.buffer_size!r}"
                )
        else:
            _check_int("buffer_size", self.buffer_size, 0)
        if type(self.drop_last) is not bool:
            raise InvalidRequest(f"drop_last must be True or False, got {self.drop_last!r}")
        _check_int("world_size", self.world_size, 1)
        if type(self.rank) is not int or not 0 <= self.rank < self.world_size:
            raise InvalidRequest(
                f"rank {self.rank!r} is out of range for world_size {self.world_size}: "
                f"ranks go from 0 to {self.world_size - 1}"
            )

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: object) -> PlanParams:
        if not isinstance(data, dict):
            raise InvalidRequest("plan parameters must be a map")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise InvalidRequest(f"unknown plan parameters {unknown}; known: {sorted(known)}")
        if "batch_size" not in data:
            raise InvalidRequest("plan parameters need batch_size")
        return cls(**data)


def index_dtype(n_rows: int) -> type:
    """int32 indices where they fit: half the memory of an epoch's order, and of its reads."""
    return np.int32 if n_rows < 2**31 else np.int64


def full_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh permutation of ``range(n_rows)`` for each (seed, epoch)."""
    # permutation(n) then a cast is faster than shuffling an int32 arange (same order).
    order = np.random.default_rng([seed, epoch, _TAG_FULL]).permutation(n_rows)
    return order.astype(index_dtype(n_rows), copy=False)


def buffer_order(n_rows: int, buffer_size: int, seed: int, epoch: int) -> np.ndarray:
    """The order a shuffle buffer of ``buffer_size`` gives over the stream 0, 1, ..., n-1.

    The buffer starts with the first ``B`` items.  At step ``p`` it emits the item in a uniformly
    drawn slot ``j[p]`` and puts stream item ``B + p`` in its place; once the stream is exhausted
    the remaining ``B`` items come out in random order.  Item ``i`` therefore never comes out
    before position ``i - B + 1``.

    The loop is computed without a loop: the item emitted at step ``p`` is the one last put in slot
    ``j[p]``, i.e. ``B + t`` for the latest ``t < p`` with ``j[t] == j[p]``, or the initial item
    ``j[p]`` if that slot was never drawn before.
    """
    rng = np.random.default_rng([seed, epoch, _TAG_BUFFER])
    size = min(buffer_size, n_rows)
    steady = n_rows - size
    slots = rng.integers(0, size, steady)
    order = np.empty(n_rows, dtype=index_dtype(n_rows))
    if steady:
        by_slot = np.argsort(slots, kind="stable")  # steps grouped by slot, in time order
        sorted_slots = slots[by_slot]
        first_in_slot = np.ones(steady, dtype=bool)
        first_in_slot[1:] = sorted_slots[1:] != sorted_slots[:-1]
        previous_step = np.empty(steady, dtype=np.int64)
        previous_step[1:] = by_slot[:-1]
        emitted = np.where(first_in_slot, sorted_slots, size + previous_step)
        order[by_slot] = emitted
    # What is left in the buffer: the initial items never drawn, plus each slot's last insert.
    resident = np.arange(size, dtype=np.int64)
    if steady:
        last_in_slot = np.ones(steady, dtype=bool)
        last_in_slot[:-1] = sorted_slots[1:] != sorted_slots[:-1]
        resident[sorted_slots[last_in_slot]] = size + by_slot[last_in_slot]
    order[steady:] = rng.permutation(resident)
    return order


class OrderCache:
    """Recently used epoch orders, keyed by what decides them: rows, shuffle, seed, buffer and
    epoch (not rank, batch size or drop_last, so all ranks of a job share one order)."""

    def __init__(self, size: int = _ORDER_CACHE_SIZE, idle_s: float = _ORDER_IDLE_S):
        self.size, self.idle_s = size, idle_s
        self._orders: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()

    def get(self, n_rows: int, params: PlanParams, epoch: int) -> np.ndarray:
        key = (n_rows, params.shuffle, params.seed, params.buffer_size, epoch)
        now = time.monotonic()
        hit = self._orders.pop(key, None)
        order = hit[0] if hit is not None else make_order(n_rows, params, epoch)
        self._orders[key] = (order, now)
        while len(self._orders) > self.size:
            self._orders.popitem(last=False)
        return order

    def evict_idle(self) -> None:
        now = time.monotonic()
        for key, (_, used) in list(self._orders.items()):
            if now - used > self.idle_s:
                del self._orders[key]


ORDERS = OrderCache()  # this process's cache (each worker has its own)


def make_order(n_rows: int, params: PlanParams, epoch: int) -> np.ndarray:
    if params.shuffle == "full":
        order = full_order(n_rows, params.seed, epoch)
    elif params.shuffle == "buffer":
        order = buffer_order(n_rows, params.buffer_size, params.seed, epoch)
    else:
        order = np.arange(n_rows, dtype=index_dtype(n_rows))
    order.flags.writeable = False
    return order


class BatchPlan:
    """The batches of one client's parameters over a dataset of ``n_rows`` rows.

    Counting (``batches_per_epoch``, ``batch_rows``) is arithmetic.  ``indices`` computes the
    epoch's order once, in an ``OrderCache`` shared by every plan of the process.
    """

    def __init__(self, n_rows: int, params: PlanParams, orders: OrderCache = ORDERS):
        if n_rows < 1:
            raise InvalidRequest("the dataset has no rows")
        self.n_rows = n_rows
        self.params = params
        bs = params.batch_size
        self.epoch_rows = n_rows
        self.global_batches = n_rows // bs if params.drop_last else -(-n_rows // bs)
        self.batches_per_epoch = self.global_batches // params.world_size
        if self.batches_per_epoch == 0:
            raise InvalidRequest(
                f"{n_rows} rows with batch_size {bs}, drop_last={params.drop_last} and "
                f"world_size {params.world_size} leave no batch for each rank; "
                "use a smaller batch_size or world_size"
            )
        self._orders = orders

    def global_batch(self, k: int) -> int:
        return k * self.params.world_size + self.params.rank

    def check_batch(self, k: int) -> None:
        if type(k) is not int or not 0 <= k < self.batches_per_epoch:
            raise InvalidRequest(
                f"batch {k!r} is out of range: an epoch has {self.batches_per_epoch} batches "
                "for this rank"
            )

    def batch_rows(self, k: int) -> int:
        """Number of rows in local batch ``k``: ``batch_size`` except a short last batch."""
        start = self.global_batch(k) * self.params.batch_size
        return min(self.params.batch_size, self.epoch_rows - start)

    def order(self, epoch: int) -> np.ndarray:
        return self._orders.get(self.n_rows, self.params, epoch)

    def indices(self, epoch: int, k: int) -> np.ndarray:
        """Row indices of local batch ``k`` of ``epoch``."""
        self.check_batch(k)
        start = self.global_batch(k) * self.params.batch_size
        return self.order(epoch)[start : start + self.params.batch_size]

    def chunk_indices(self, epoch: int, k0: int, count: int) -> np.ndarray:
        """Row indices of local batches ``k0 .. k0+count-1``, concatenated."""
        self.check_batch(k0)
        self.check_batch(k0 + count - 1)
        bs, world = self.params.batch_size, self.params.world_size
        order = self.order(epoch)
        if world == 1:
            return order[k0 * bs : (k0 + count) * bs]
        return np.concatenate([self.indices(epoch, k) for k in range(k0, k0 + count)])
