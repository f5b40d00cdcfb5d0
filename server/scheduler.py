"""The scheduler: which session's batches a worker gathers next, into which slot, reading which
epoch order.  Plain decisions over plain data (the sessions, the slot ring, the order board and
the workers' task lists); the only I/O is ``worker.send``, so the scheduler is driven by unit
tests with fake workers and no processes.

- ``dispatch`` gives idle workers tasks, round robin between sessions that have queued work,
  while free slots last: a task is a run of one session's batches, its slot, and the shared
  epoch order it reads (or fills, if it is the first to need it).  A task whose order is being
  filled goes behind the fill on the filling worker, or waits.
- ``order_ahead`` gives a worker that has nothing to do the next epoch's order to compute, as
  soon as the current epoch's order is in use, so that epoch boundaries do not stall.
- ``complete`` and ``lost`` take tasks back: finished, or their worker died (their slots go
  back to the ring and their batches to the head of their session's queue, each to be asked
  alone; the one the worker was running when it died is blamed, and a batch blamed
  ``sessions.MAX_ATTEMPTS`` times is given up: ``lost`` returns it for the front end to fail).
- a session whose connection is at its unsent limit (``may_send``) gets no work until ZeroMQ
  has handed its messages on.

A worker holds at most ``TASKS_PER_WORKER`` tasks: one running and one queued, so it never
waits for the main loop.  ``check`` verifies that every task's slot is held for it and that each
session's ``gathering`` count is the sum of its tasks.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from batchfeed.shared.plan import BatchPlan

from . import tasks
from .dataset import DatasetSpec
from .order_board import OrderBoard, OrderState
from .ring import TASK, Holder, SlotRing
from .session import MAX_ATTEMPTS, Session

TASKS_PER_WORKER = 2


class Worker(Protocol):
    """What the scheduler reads and writes of a worker (``supervisor.WorkerHandle``)."""

    index: int
    ready: bool
    tasks: dict[int, float]  # task (or order job) id -> when it was given

    def send(self, message: object) -> bool: ...  # False: the worker is gone

    def assigned(self, task_id: int) -> None: ...

    def completed(self, task_id: int) -> None: ...


@dataclass(frozen=True)
class InFlight:
    """A task a worker holds."""

    task: tasks.Task
    session: int
    stream: int
    worker: int  # the worker's index
    order_key: tuple | None = None  # the shared order this task fills, if it does

    @property
    def holder(self) -> Holder:
        return Holder(TASK, self.task.id)



class GivenUp(NamedTuple):
    """A batch lost with its worker too often: the front end reports it failed."""

    session: int
    stream: int
    epoch: int
    k: int
    timed_out: bool  # its worker was killed for making no progress (else it died)

    def message(self, dataset: DatasetSpec, transform: str | None, task_timeout: float,
                last_exit: str) -> str:
        """What its client is told."""
        how = (f"each worker that gathered it was killed after making no progress for "
               f"{task_timeout:g} s (--task-timeout)" if self.timed_out
               else f"each worker that gathered it died (the last {last_exit})")
        fix = (f"raise --task-timeout if transform {transform} is merely slow on it, or fix "
               "what it does on this batch's rows" if transform is not None and self.timed_out
               else "check the data this batch reads (and the server's log)")
        return (f"batch {self.k} of epoch {self.epoch} of dataset {dataset.name!r} "
                f"{dataset.describe_files()}could not be made: {how}, {MAX_ATTEMPTS} times; "
                f"the server goes on with the other batches. To fix: {fix}")


class Scheduler:
    def __init__(self, ring: SlotRing, orders: OrderBoard, sessions: Mapping[int, Session],
                 may_send: Callable[[Session], bool] = lambda s: True):
        self.ring = ring
        self.orders = orders
        self.sessions = sessions
        self.may_send = may_send
        self.runnable: deque[int] = deque()  # sessions that may have queued work
        self.inflight: dict[int, InFlight] = {}
        self.computing: dict[int, tuple] = {}  # order job id -> the order key it computes
        self._ahead: deque[tuple[BatchPlan, tuple, int]] = deque()  # (plan, key, epoch)
        self._ahead_keys: set[tuple] = set()
        self._last_id = 0
        self.counters: Counter[str] = Counter()

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def wake(self, session: Session, first: bool = False) -> None:
        """``session`` has queued work (``first``: it goes before the others).  A session is
        in line once, so that round robin is fair whatever its number of requests."""
        if first:
            if self.runnable and self.runnable[0] == session.id:
                return
            if session.id in self.runnable:
                self.runnable.remove(session.id)
            self.runnable.appendleft(session.id)
        elif session.id not in self.runnable:
            self.runnable.append(session.id)

    # ------------------------------------------------------------------ tasks

    def dispatch(self, workers: Sequence[Worker]) -> None:
        waiting: set[int] = set()  # sessions whose next task waits for an order being filled
        while self.runnable and self.ring.free_count:
            s = self.sessions.get(self.runnable[0])
            if s is None or not s.has_work:
                self.runnable.popleft()
                continue
            if s.id not in waiting and not self.may_send(s):
                waiting.add(s.id)  # its peer has not taken what it was sent: it waits
            if s.id in waiting:
                if waiting.issuperset(self.runnable):
                    return
                self.runnable.rotate(-1)
                continue
            worker = _least_busy(workers)
            if worker is None:
                return
            epoch = s.peek()[0]
            placed = self._place_order(s, epoch, worker, workers)
            if placed is None:
                waiting.add(s.id)
                self.runnable.rotate(-1)
                continue
            self.runnable.popleft()
            worker, order, fill = placed
            task_id = self._next_id()
            slot = self.ring.acquire(Holder(TASK, task_id))
            assert slot is not None
            epoch, k0, take = s.take()
            task = tasks.Task(task_id, s.dataset.name, s.plan.params.to_wire(), epoch, k0, take,
                              slot, order, fill)
            key = s.plan.order_key(epoch)
            job = InFlight(task, s.id, s.stream, worker.index, key if fill else None)
            if worker.send(task):
                self.inflight[task_id] = job
                worker.assigned(task_id)
            else:  # just died (its exit is handled when its channel or sentinel says so)
                self.ring.release(slot, job.holder)
                s.untake(epoch, k0, take)
                worker.ready = False
                if fill:
                    self.orders.finished(key, worker.index, ok=False)
            if s.has_work:
                self.runnable.append(s.id)  # round robin between sessions

    def _place_order(self, s: Session, epoch: int, worker: Worker,
                     workers: Sequence[Worker]) -> tuple[Worker, str | None, bool] | None:
        """Which worker takes the session's next task, and the shared order it reads (or
        fills); None when the order is being filled by a worker that has no room yet."""
        params = s.plan.params
        if params.units != "rows" or (params.shuffle == "none" and params.sampling == "uniform"):
            return worker, None, False  # nothing to compute or share (or the worker's own)
        key = s.plan.order_key(epoch)
        entry = self.orders.entry(key, s.plan)
        if entry is None:
            return worker, None, False
        self._plan_ahead(s.plan, epoch + 1)
        if entry.state is OrderState.FILLED:
            return worker, entry.segment.name, False
        if entry.state is OrderState.EMPTY:
            self.orders.start_fill(key, worker.index)
            return worker, entry.segment.name, True
        filler = next((w for w in workers if w.index == entry.filler), None)
        if filler is not None and filler.ready and len(filler.tasks) < TASKS_PER_WORKER:
            return filler, entry.segment.name, False  # queued behind the fill
        return None

    def complete(self, worker: Worker, task_id: int, ok: bool) -> InFlight | None:
        """A worker answered a task: the task, or None if it is not that worker's (any more)."""
        job = self.inflight.get(task_id)
        if job is None or job.worker != worker.index:
            return None
        del self.inflight[task_id]
        worker.completed(task_id)
        if job.order_key is not None:
            self.orders.finished(job.order_key, worker.index, ok=ok)
            self.counters["orders_computed"] += ok
        return job

    def lost(self, worker: Worker, timed_out: bool = False) -> list[GivenUp]:
        """``worker`` died (``timed_out``: it was killed for making no progress): its tasks'
        slots go back to the ring, their batches to the head of their sessions' queues.  The
        task it was running is blamed; the batches given up are returned."""
        self.orders.worker_died(worker.index)
        given_up: list[GivenUp] = []
        held = list(worker.tasks)  # in the order given: the first is the one it was running
        for task_id in reversed(held):  # the earliest ends up first in line
            self.computing.pop(task_id, None)
            job = self.inflight.pop(task_id, None)
            worker.completed(task_id)
            if job is None:
                continue
            self.ring.release(job.task.slot, job.holder)  # safe: its writer is dead
            s = self.sessions.get(job.session)
            if s is not None and job.stream == s.stream:
                t = job.task
                failed = s.lost(t.epoch, t.k0, t.count, blamed=task_id == held[0])
                if failed is not None:
                    given_up.append(GivenUp(s.id, job.stream, *failed, timed_out))
                if s.has_work:
                    self.wake(s, first=True)
        return given_up

    # ------------------------------------------------------------------ orders ahead

    def _plan_ahead(self, plan: BatchPlan, epoch: int) -> None:
        """Epoch orders are predictable: queue the next one as soon as this one is in use."""
        key = plan.order_key(epoch)
        if key not in self._ahead_keys and not self.orders.has(key):
            self._ahead_keys.add(key)
            self._ahead.append((plan, key, epoch))

    def order_ahead(self, workers: Sequence[Worker]) -> None:
        """Give idle workers the next epochs' orders to compute, before anyone asks."""
        while self._ahead:
            worker = next((w for w in workers if w.ready and not w.tasks), None)
            if worker is None:
                return
            plan, key, epoch = self._ahead.popleft()
            self._ahead_keys.discard(key)
            entry = self.orders.entry(key, plan)
            if entry is None or entry.state is not OrderState.EMPTY:
                continue
            job = tasks.OrderJob(self._next_id(), plan.data_key, plan.params.to_wire(), epoch,
                                 entry.segment.name)
            if not worker.send(job):
                worker.ready = False
                continue
            self.orders.start_fill(key, worker.index)
            self.computing[job.id] = key
            worker.assigned(job.id)

    def ordered(self, worker: Worker, job_id: int, ok: bool) -> None:
        key = self.computing.pop(job_id, None)
        worker.completed(job_id)
        if key is not None:
            self.orders.finished(key, worker.index, ok=ok)
            self.counters["orders_computed"] += ok

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        gathering: Counter[int] = Counter()
        for job in self.inflight.values():
            if self.ring.holder(job.task.slot) != job.holder:
                raise AssertionError(f"task {job.task.id} gathers into slot {job.task.slot}, "
                                     f"which is held by {self.ring.holder(job.task.slot)}")
            s = self.sessions.get(job.session)
            if s is not None and job.stream == s.stream:
                gathering[s.id] += job.task.count
        for s in self.sessions.values():
            if s.gathering != gathering[s.id]:
                raise AssertionError(f"session {s.id:x} counts {s.gathering} batches "
                                     f"gathering, but its tasks hold {gathering[s.id]}")
        tasks_held = self.ring.held()[TASK]
        if tasks_held != len(self.inflight):
            raise AssertionError(f"{tasks_held} slots are held by tasks, but "
                                 f"{len(self.inflight)} tasks are in flight")


def _least_busy(workers: Sequence[Worker]) -> Worker | None:
    best = None
    for w in workers:
        if w.ready and len(w.tasks) < TASKS_PER_WORKER and (
                best is None or len(w.tasks) < len(best.tasks)):
            best = w
    return best

