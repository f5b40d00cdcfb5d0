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

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import InvalidRequest

SHUFFLE_MODES = ("full", "buffer", "none")
SAMPLING_MODES = ("uniform", "balanced", "weighted")
MAX_SEED = 2**63 - 1
_INT_FIELDS = ("batch_size", "seed", "buffer_size", "rank", "world_size", "epoch_rows")
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
    """Everything that decides a client's batch order (validated on construction).  Users'
    conventions are taken and stored as ours: ``shuffle=True``/``False`` as ``"full"``/``"none"``,
    numpy integers as ints (bools are not ints here), numpy bools as bools."""

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
        if isinstance(self.shuffle, (bool, np.bool_)):  # torch's DataLoader(shuffle=...)
            object.__setattr__(self, "shuffle", "full" if self.shuffle else "none")
        for name in _INT_FIELDS:  # numpy integers count as ints (bools never do)
            if isinstance(getattr(self, name), np.integer):
                object.__setattr__(self, name, int(getattr(self, name)))
        if isinstance(self.drop_last, np.bool_):
            object.__setattr__(self, "drop_last", bool(self.drop_last))
        _check_int("batch_size", self.batch_size, 1)
        if self.shuffle not in SHUFFLE_MODES:
            modes = ", ".join(map(repr, SHUFFLE_MODES))
            raise InvalidRequest(f"shuffle must be one of {modes}, got {self.shuffle!r}")
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.shuffle == "buffer" and not (type(self.buffer_size) is int
                                             and self.buffer_size >= 1):
            raise InvalidRequest(f"shuffle='buffer' needs buffer_size >= 1, "
                                 f"got {self.buffer_size!r}")
        _check_int("buffer_size", self.buffer_size, 0)
        if type(self.drop_last) is not bool:
            raise InvalidRequest(f"drop_last must be True or False, got {self.drop_last!r}")
        _check_int("world_size", self.world_size, 1)
        if type(self.rank) is not int or not 0 <= self.rank < self.world_size:
            raise InvalidRequest(f"rank {self.rank!r} is out of range for world_size "
                                 f"{self.world_size}: ranks go from 0 to {self.world_size - 1}")
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
    (positions ``[b*batch_size, (b+1)*batch_size)``) shuffled: each holds every class within one
    of the others.  A class with fewer rows than its share of the epoch is cycled through whole
    permutations (every row appears), a larger one is cut (no row twice in the epoch).

    Such a batch holds a row twice only when its class has fewer rows than the batch's picks of
    that class: a permutation that starts inside a batch first takes rows the batch lacks.
    With ranks and drop_last=False, a rank's last batch is one of these only when ``rows`` is a
    multiple of world_size * batch_size; else it is cut regardless of their edges (and may wrap
    to the start), so its class counts are only about even and it may hold a row twice.
    """
    rng = np.random.default_rng([seed, epoch, _TAG_BALANCED])
    members = class_members(labels)
    n_classes = len(members)
    edges = np.append(np.arange(0, rows, batch_size), rows)  # where each batch starts, then rows
    order: np.ndarray = np.empty(rows, dtype=index_dtype(len(labels)))
    for position, c in enumerate(rng.permutation(n_classes)):
        need = len(range(position, rows, n_classes))
        if need:  # each batch's picks of this class: [bounds[b], bounds[b + 1]) of its sequence
            bounds = np.clip(-((position - edges) // n_classes), 0, need)
            order[position::n_classes] = _cycled(members[c], need, bounds, rng)
    full = rows // batch_size * batch_size
    if full:
        order[:full] = rng.permuted(order[:full].reshape(-1, batch_size), axis=1).ravel()
    if rows > full:
        order[full:] = rng.permutation(order[full:])
    return order


def _cycled(pool: np.ndarray, need: int, bounds: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """``need`` picks from ``pool``, whole permutations one after another; where one starts
    inside a batch (picks ``bounds[b]`` to ``bounds[b + 1]``) no larger than the pool, its picks
    in that batch avoid the previous one's.  Permutation c is permutation c-1 reordered by a
    random ``step`` whose first ``head`` positions come from outside its last ``tail``; the
    steps are composed by a prefix scan (log2(cycles) vector rounds, no loop per cycle)."""
    m = len(pool)
    first = rng.permutation(pool)
    cycles = -(-need // m)
    if cycles == 1:
        return first[:need]
    starts = np.arange(1, cycles) * m  # the pick at which each later permutation starts
    b = np.searchsorted(bounds, starts, side="right") - 1
    tail, head = starts - bounds[b], bounds[b + 1] - starts
    straddles = (tail > 0) & (tail + head <= m)
    tail, head = np.where(straddles, tail, 0)[:, None], np.where(straddles, head, 0)[:, None]
    pos = np.arange(m)
    step = np.argsort(rng.random((cycles - 1, m)) + (pos >= m - tail), axis=1)
    rest = np.where(pos < head, pos - m, rng.random((cycles - 1, m)))  # keep the head, shuffle on
    step = np.take_along_axis(step, np.argsort(rest, axis=1), axis=1)
    span = 1
    while span < cycles - 1:  # step[c] becomes step[1] o ... o step[c]
        step[span:] = np.take_along_axis(step[:-span], step[span:], axis=1)
        span *= 2
    return np.concatenate([first, first[step].ravel()])[:need]


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
    """Recently used epoch orders, keyed by ``order_key`` (so all ranks of a job share one)."""

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
    """One rank's batches of a client's parameters over ``n_rows`` rows.  Counting
    (``batches_per_epoch``, ``batch_rows``, ``padded_rows``, ``dropped_rows``) is arithmetic;
    ``indices`` computes the epoch's order once, in an ``OrderCache`` shared by the process."""

    def __init__(self, n_rows: int, params: PlanParams, orders: OrderCache = ORDERS,
                 columns: Columns | None = None, data_key: str = ""):
        if n_rows < 1:
            raise InvalidRequest("the dataset has no rows")
        self.n_rows, self.params, self.columns, self.data_key = n_rows, params, columns, data_key
        self.epoch_rows = rows = params.epoch_rows or n_rows
        bs, world = params.batch_size, params.world_size
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
        return self.last_rows if k == self.batches_per_epoch - 1 else self.params.batch_size

    def batch_start(self, k: int) -> int:
        """The epoch position local batch ``k`` starts at (``order[p % N]`` past the end)."""
        last, bs = self.batches_per_epoch - 1, self.params.batch_size
        if k < last:
            return self.global_batch(k) * bs
        return last * self.params.world_size * bs + self.params.rank * self.last_rows

    def order(self, epoch: int) -> np.ndarray:
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
            bs = self.params.batch_size
            return order[k0 * bs : min((k0 + count) * bs, self.epoch_rows)]
        return np.concatenate([self.indices(epoch, k, order) for k in range(k0, k0 + count)])

    def order_key(self, epoch: int) -> tuple:
        return order_key(self.data_key, self.n_rows, self.params, epoch)
