"""The batch plan: which rows make batch ``k`` of epoch ``e``, as a pure function.

``BatchPlan(n_rows, params).indices(epoch, k)`` depends only on the dataset size and the
parameters, never on workers, timing or restarts.  That is what lets workers re-run lost tasks,
clients resume at any batch, and ranks split an epoch without a coordinator.

An epoch is an *order* of ``epoch_rows`` row indices, cut into global batches of ``batch_size``:
- ``sampling="uniform"`` (the default): the rows themselves, each once, in the order ``shuffle``
  says: a permutation (``full``), as they are (``none``), or a simulated shuffle buffer
  (``buffer``);
- ``sampling="balanced"``: classes of an integer ``label`` field laid out round-robin in one
  random class order, so that every batch (any run of consecutive positions) holds each class
  within one of the others; classes with fewer rows than their share are cycled through whole
  permutations (every row appears), larger ones are cut; then each batch is shuffled;
- ``sampling="weighted"``: ``epoch_rows`` draws with replacement, row i with probability
  proportional to the float field ``weights``.
Global batch ``g`` goes to rank ``g % world_size`` as its local batch ``g // world_size``.
Every rank gets ``global_batches // world_size`` batches; the last ``global_batches %
world_size`` global batches of the order are dropped so that ranks stay in step.  Because the
order is reshuffled every epoch, different rows fall in that tail each epoch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import InvalidRequest

SHUFFLE_MODES = ("full", "buffer", "none")
SAMPLING_MODES = ("uniform", "balanced", "weighted")
MAX_SEED = 2**63 - 1
_ORDER_CACHE_SIZE = 4  # epoch orders kept per process (shared by ranks and batch sizes)
_ORDER_IDLE_S = 5.0  # ... and dropped once unused this long

# Tags keep the random streams of different modes apart for the same (seed, epoch).
_TAG_FULL = 0x46554C4C
_TAG_BUFFER = 0x42554646
_TAG_BALANCED = 0x42414C41
_TAG_WEIGHTED = 0x57454947


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
    sampling: str = "uniform"
    label: str | None = None
    weights: str | None = None
    epoch_rows: int | None = None

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        if self.shuffle not in SHUFFLE_MODES:
            modes = ", ".join(map(repr, SHUFFLE_MODES))
            raise InvalidRequest(f"shuffle must be one of {modes}, got {self.shuffle!r}")
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
        self._check_sampling()

    def _check_sampling(self) -> None:
        if self.sampling not in SAMPLING_MODES:
            raise InvalidRequest(f"sampling must be one of "
                                 f"{', '.join(map(repr, SAMPLING_MODES))}, got {self.sampling!r}")
        needs = {"balanced": ("label", self.label), "weighted": ("weights", self.weights)}
        for mode, (arg, value) in needs.items():
            if self.sampling == mode and not (isinstance(value, str) and value):
                raise InvalidRequest(f"sampling={mode!r} needs {arg}=FIELD, the name of the "
                                     f"dataset field that holds the {arg}")
        if self.label is not None and self.sampling != "balanced":
            raise InvalidRequest("label= goes with sampling='balanced'")
        if self.weights is not None and self.sampling != "weighted":
            raise InvalidRequest("weights= goes with sampling='weighted'")
        if self.sampling == "uniform":
            if self.epoch_rows is not None:
                raise InvalidRequest("epoch_rows= goes with sampling='balanced' or 'weighted'; "
                                     "a uniform epoch is every row once")
        else:
            if self.shuffle != "full":
                raise InvalidRequest(f"sampling={self.sampling!r} shuffles by itself; leave "
                                     f"shuffle at 'full' (got {self.shuffle!r})")
            if self.epoch_rows is not None:
                _check_int("epoch_rows", self.epoch_rows, 1)

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
    order: np.ndarray = np.empty(n_rows, dtype=index_dtype(n_rows))
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


Columns = Mapping[str, np.ndarray]


def column(columns: Columns, name: str) -> np.ndarray:
    try:
        return columns[name]
    except KeyError:
        raise InvalidRequest(f"the dataset has no field {name!r}; it has "
                             f"{', '.join(columns)}") from None


def check_label(labels: np.ndarray, name: str) -> None:
    if labels.ndim != 1 or labels.dtype.kind not in "biu":
        raise InvalidRequest(f"label field {name!r} must hold one integer per row, not "
                             f"{labels.dtype} of row shape {labels.shape[1:]}")


def check_weights(weights: np.ndarray, name: str) -> None:
    if weights.ndim != 1 or weights.dtype.kind not in "fiu":
        raise InvalidRequest(f"weights field {name!r} must hold one number per row, not "
                             f"{weights.dtype} of row shape {weights.shape[1:]}")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.max(initial=0.0) > 0:
        raise InvalidRequest(f"weights field {name!r} must be finite and non-negative, with at "
                             "least one positive weight")


def class_members(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices of each class (classes in sorted label order)."""
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    cuts = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
    return np.split(by_class.astype(index_dtype(len(labels)), copy=False), cuts)


def balanced_order(labels: np.ndarray, rows: int, batch_size: int, seed: int,
                   epoch: int) -> np.ndarray:
    """``rows`` positions, classes round-robin in one random class order, then each batch
    shuffled: any batch holds every class within one of the others."""
    rng = np.random.default_rng([seed, epoch, _TAG_BALANCED])
    members = class_members(labels)
    n_classes = len(members)
    order: np.ndarray = np.empty(rows, dtype=index_dtype(len(labels)))
    for position, c in enumerate(rng.permutation(n_classes)):
        need = len(range(position, rows, n_classes))
        if need == 0:
            continue
        pool = members[c]
        cycles, rest = divmod(need, len(pool))
        parts = []
        if cycles:  # whole permutations of the class: every one of its rows appears
            parts.append(rng.permuted(np.tile(pool, (cycles, 1)), axis=1).ravel())
        if rest:
            parts.append(rng.permutation(pool)[:rest])
        order[position::n_classes] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    full = rows // batch_size * batch_size
    if full:
        order[:full] = rng.permuted(order[:full].reshape(-1, batch_size), axis=1).ravel()
    if rows > full:
        order[full:] = rng.permutation(order[full:])
    return order


def weighted_order(weights: np.ndarray, rows: int, seed: int, epoch: int) -> np.ndarray:
    """``rows`` draws with replacement, row i with probability weights[i] / sum(weights)."""
    rng = np.random.default_rng([seed, epoch, _TAG_WEIGHTED])
    p = np.asarray(weights, dtype=np.float64)
    cdf = np.cumsum(p / p.max())  # scaled first: finite weights can sum past float's range
    cdf /= cdf[-1]
    draws = np.searchsorted(cdf, rng.random(rows), side="right")
    np.minimum(draws, len(p) - 1, out=draws)
    return draws.astype(index_dtype(len(p)), copy=False)


def order_key(data_key: str, n_rows: int, params: PlanParams, epoch: int) -> tuple:
    """What decides an epoch's order: not the rank, nor (but for balanced sampling) the batch
    size or drop_last, so every rank of a job shares one order."""
    return (data_key, n_rows, params.shuffle, params.seed, params.buffer_size, params.sampling,
            params.label, params.weights, params.epoch_rows,
            params.batch_size if params.sampling == "balanced" else 0, epoch)


class OrderCache:
    """Recently used epoch orders, keyed by what decides them: rows, shuffle, seed, buffer and
    epoch (not rank, batch size or drop_last, so all ranks of a job share one order)."""

    def __init__(self, size: int = _ORDER_CACHE_SIZE, idle_s: float = _ORDER_IDLE_S):
        self.size, self.idle_s = size, idle_s
        self._orders: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()

    def get(self, n_rows: int, params: PlanParams, epoch: int, columns: Columns | None = None,
            data_key: str = "") -> np.ndarray:
        key = order_key(data_key, n_rows, params, epoch)
        now = time.monotonic()
        hit = self._orders.pop(key, None)
        order = hit[0] if hit is not None else make_order(n_rows, params, epoch, columns)
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


def make_order(n_rows: int, params: PlanParams, epoch: int,
               columns: Columns | None = None) -> np.ndarray:
    if params.sampling != "uniform":
        if columns is None:
            raise InvalidRequest(f"sampling={params.sampling!r} needs the dataset's columns")
        rows = params.epoch_rows or n_rows
        if params.sampling == "balanced":
            assert params.label is not None
            labels = column(columns, params.label)
            check_label(labels, params.label)
            order = balanced_order(labels, rows, params.batch_size, params.seed, epoch)
        else:
            assert params.weights is not None
            weights = column(columns, params.weights)
            check_weights(weights, params.weights)
            order = weighted_order(weights, rows, params.seed, epoch)
    elif params.shuffle == "full":
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

    def __init__(self, n_rows: int, params: PlanParams, orders: OrderCache = ORDERS,
                 columns: Columns | None = None, data_key: str = ""):
        if n_rows < 1:
            raise InvalidRequest("the dataset has no rows")
        self.n_rows = n_rows
        self.params = params
        self.columns = columns
        self.data_key = data_key
        bs = params.batch_size
        self.epoch_rows = params.epoch_rows or n_rows
        rows = self.epoch_rows
        self.global_batches = rows // bs if params.drop_last else -(-rows // bs)
        self.batches_per_epoch = self.global_batches // params.world_size
        if self.batches_per_epoch == 0:
            raise InvalidRequest(
                f"{rows} rows per epoch with batch_size {bs}, drop_last={params.drop_last} and "
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
        return self._orders.get(self.n_rows, self.params, epoch, self.columns, self.data_key)

    def indices(self, epoch: int, k: int, order: np.ndarray | None = None) -> np.ndarray:
        """Row indices of local batch ``k`` of ``epoch`` (``order``: that epoch's, if known)."""
        self.check_batch(k)
        start = self.global_batch(k) * self.params.batch_size
        order = self.order(epoch) if order is None else order
        return order[start : start + self.params.batch_size]

    def chunk_indices(self, epoch: int, k0: int, count: int,
                      order: np.ndarray | None = None) -> np.ndarray:
        """Row indices of local batches ``k0 .. k0+count-1``, concatenated."""
        self.check_batch(k0)
        self.check_batch(k0 + count - 1)
        bs, world = self.params.batch_size, self.params.world_size
        order = self.order(epoch) if order is None else order
        if world == 1:
            return order[k0 * bs : (k0 + count) * bs]
        return np.concatenate([self.indices(epoch, k, order) for k in range(k0, k0 + count)])

    def order_key(self, epoch: int) -> tuple:
        return order_key(self.data_key, self.n_rows, self.params, epoch)
