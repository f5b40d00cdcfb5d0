"""Epoch orders: which rows, in which order, make epoch ``e`` of a plan; pure functions of the
data, the parameters, the seed and the epoch.

- ``full_order``: a fresh permutation per (seed, epoch);
- ``buffer_order``: what a shuffle buffer of a given size gives over the dataset order;
- ``balanced_order``: classes of an integer label field round-robin (each batch holds each
  class within one of the others);
- ``weighted_order``: draws with replacement, in proportion to a weights field.

``make_order`` picks one for a plan; ``OrderCache`` keeps the last few per process, keyed by
what decides them (``order_key``: not the rank, so all ranks of a job share one order).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .errors import InvalidRequest
from .params import PlanParams

_ORDER_CACHE_SIZE = 4  # epoch orders kept per process (shared by ranks and batch sizes)
_ORDER_IDLE_S = 5.0  # ... and dropped once unused this long

# Tags keep the random streams of different modes apart for the same (seed, epoch).
_TAG_FULL = 0x46554C4C
_TAG_BUFFER = 0x42554646
_TAG_BALANCED = 0x42414C41
_TAG_WEIGHTED = 0x57454947


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
    """The fixed column ``name`` (InvalidRequest if there is none, or it is variable-length)."""
    try:
        found = columns[name]
    except KeyError:
        raise InvalidRequest(f"the dataset has no field {name!r}; it has "
                             f"{', '.join(columns)}") from None
    if not isinstance(found, np.ndarray):
        raise InvalidRequest(f"field {name!r} holds variable-length rows (a list, str or bytes "
                             "field); sampling reads a field of one number per row: name such "
                             "a field")
    return found


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

