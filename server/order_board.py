"""Epoch orders shared by the workers: computed once per epoch by one worker, read by all.

An epoch's order (a permutation of a million rows takes ~13 ms and 4 MB) is the same for every
worker, rank and batch size of a job.  Rather than have each worker compute and keep its own,
the main process keeps a small board of shared-memory segments, one per order key:

- the first task that needs an order is sent with ``fill=True``: its worker computes the order,
  writes it after an 8-byte header and then sets the header's ready flag;
- tasks that need an order being filled go to the filling worker (behind the fill in its
  queue) or wait; once the fill is DONE, any worker maps the segment read-only;
- a worker that finds a segment missing or not ready computes the order itself (correct, only
  slower), so no race can give it a half-written order.

The main process creates and unlinks the segments (the creator unlinks); it keeps the last few
and never evicts one being filled.  ``close`` unlinks them all.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from batchfeed.shared.errors import ResourceError
from batchfeed.shared.plan import BatchPlan, index_dtype, make_order
from batchfeed.shared.shm import SharedSegment, segment_name

log = logging.getLogger("batchfeed.server")

HEADER = 8  # bytes: the ready flag, then padding to keep the indices aligned
READY = 1
KEEP = 4  # orders kept on the board


class OrderState(enum.Enum):
    EMPTY = "empty"  # nobody has computed it into the segment (yet, or the fill failed)
    FILLING = "filling"  # a worker is computing it
    FILLED = "filled"  # ready: any worker maps it read-only


@dataclass
class Entry:
    """One order's segment and state.  Only ``OrderBoard`` changes ``state`` and ``filler``."""

    segment: SharedSegment
    state: OrderState = OrderState.EMPTY
    filler: int | None = None  # worker index filling it


class OrderBoard:
    """The main process's side: which order lives in which segment, and who fills it.

    States move EMPTY -> FILLING (``start_fill``) -> FILLED or back to EMPTY (``finished``,
    ``worker_died``); nothing else changes them, and a move from the wrong state raises.
    """

    def __init__(self, token: str):
        self.token = token
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self._serial = 0

    def entry(self, key: tuple, plan: BatchPlan) -> Entry | None:
        """The board's entry for ``key`` (made if new); None if shared memory is short."""
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
            return e
        self._serial += 1
        itemsize = np.dtype(index_dtype(plan.n_rows)).itemsize
        try:
            segment = SharedSegment.create(segment_name(self.token, f"order{self._serial}"),
                                           HEADER + plan.epoch_rows * itemsize)
        except ResourceError:
            log.warning("no shared memory left for an epoch order; workers compute their own")
            return None
        e = self._entries[key] = Entry(segment)
        self._evict()
        return e

    def _evict(self) -> None:
        for key in list(self._entries):
            if len(self._entries) <= KEEP:
                return
            if self._entries[key].state is not OrderState.FILLING:
                self._entries.pop(key).segment.close()

    def has(self, key: tuple) -> bool:
        return key in self._entries

    def start_fill(self, key: tuple, worker: int) -> Entry:
        e = self._entries[key]
        if e.state is not OrderState.EMPTY:
            raise AssertionError(f"order {key} is {e.state.value}; only an empty one is filled")
        e.state, e.filler = OrderState.FILLING, worker
        return e

    def finished(self, key: tuple, worker: int, ok: bool) -> None:
        """Worker ``worker`` is done filling ``key`` (a stale report changes nothing)."""
        e = self._entries.get(key)
        if e is not None and e.state is OrderState.FILLING and e.filler == worker:
            e.state = OrderState.FILLED if ok else OrderState.EMPTY
            e.filler = None

    def worker_died(self, worker: int) -> None:
        for e in self._entries.values():
            if e.state is OrderState.FILLING and e.filler == worker:
                e.state, e.filler = OrderState.EMPTY, None

    def filling(self) -> dict[tuple, int]:
        """Orders being filled, and by which worker."""
        return {k: e.filler for k, e in self._entries.items()
                if e.state is OrderState.FILLING and e.filler is not None}

    def close(self) -> None:
        for e in self._entries.values():
            e.segment.close()
        self._entries.clear()


class WorkerOrders:
    """A worker's side: map shared orders (read-only), or fill one when told to."""

    def __init__(self) -> None:
        self._mapped: OrderedDict[str, tuple[SharedSegment, np.ndarray]] = OrderedDict()

    def get(self, name: str, fill: bool, plan: BatchPlan, epoch: int) -> np.ndarray:
        """The order of ``epoch`` for ``plan``, from segment ``name`` (filling it first when
        ``fill``).  Falls back to computing it here if the segment is gone or not ready."""
        hit = self._mapped.get(name)
        if hit is None:
            try:
                seg = SharedSegment.attach(name, writable=fill)
            except FileNotFoundError:
                return plan.order(epoch)
            assert seg.buf is not None
            array = np.frombuffer(seg.buf, dtype=index_dtype(plan.n_rows),
                                  count=plan.epoch_rows, offset=HEADER)
            if fill:
                array[:] = make_order(plan.n_rows, plan.params, epoch, plan.columns)
                seg.buf[0] = READY
            elif seg.buf[0] != READY:
                del array
                seg.close()
                return plan.order(epoch)
            hit = self._mapped[name] = (seg, array)
            while len(self._mapped) > KEEP:
                old_seg, _ = self._mapped.popitem(last=False)[1]
                old_seg.close()  # unmaps once the last view of it is gone
        self._mapped.move_to_end(name)
        return hit[1]
