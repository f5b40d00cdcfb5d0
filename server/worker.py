"""Worker processes: gather the rows of batches straight into ring slots.

A worker is stateless beyond caches: a task names the plan parameters, the epoch, the batches
and the slot, so a task lost with its worker is simply given to another.  Workers are forked
from the main process (so they share its imported modules' pages), then:

- drop what they inherited but must not use: the parent's sockets and signal handlers;
- ask the kernel to kill them when the parent dies (``PR_SET_PDEATHSIG``) and also check
  ``getppid`` whenever they are idle, so a SIGKILLed server leaves no workers behind;
- use the dataset's read-only views and the ring's mapping they inherited (nothing is opened
  by name, so a worker started late sees exactly what the first ones saw);
- loop: take a TASK, gather its batches straight into the slot (``gather.py``), answer DONE
  or FAIL.  A task of a dataset whose held files changed in place (checked before and after)
  fails saying so, rather than mixing versions.

Each worker talks to the main process over its own ``SOCK_SEQPACKET`` socketpair: one message
per ``send``, no ZeroMQ context (and no I/O thread to wake) in the worker, and an end-of-file
the moment either side dies.

The main process's side of a worker (its handle, and the shutdown ladder: STOP, join,
terminate, kill) is ``supervisor.py``; this module holds only code that runs in a worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchfeed.server.plan_units import plan_units
from batchfeed.shared.errors import BatchfeedError, DatasetError, WorkerError
from batchfeed.shared.plan import ORDERS, BatchPlan, PlanParams

from . import tasks
from .dataset import DatasetSpec, changed_file
from .gather import gather_chunk, transform_chunk
from .order_board import WorkerOrders

log = logging.getLogger("batchfeed.server.worker")

_PLAN_CACHE = 8  # plans (and their epoch orders) kept per worker ...
_PLAN_IDLE_S = 5.0  # ... and dropped once unused this long, so memory returns to baseline
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs.  Workers are forked, so this is inherited, never
    pickled: ``columns`` are the parent's read-only views of the data and ``ring`` its mapping
    of the slot ring."""

    index: int
    datasets: tuple[DatasetSpec, ...]
    columns: dict  # dataset name -> {field name: array or Ragged}
    ring: Any  # the ring segment's mapping (writable)
    ring_header: int
    slot_bytes: int
    parent_pid: int
    transforms: dict = field(default_factory=dict)  # dataset name -> Transform


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_big_allocations_out_of_the_heap() -> None:
    """glibc raises its mmap threshold after a big block is freed, so later big temporaries
    (an epoch's permutation, a transform's arrays) land in the heap and stay there once freed.
    A fixed 1 MiB threshold keeps them as mappings that go back to the kernel when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 4 << 20)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _forget_parent_state(keep: int) -> None:
    """In a freshly forked worker: drop the parent's handlers and sockets (all but ``keep``,
    the worker's channel), and follow the parent's death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; main decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    # The parent's ZeroMQ sockets (its listening port among them) must not live on in us.
    try:
        fds = os.listdir("/proc/self/fd")
    except FileNotFoundError:  # pragma: no cover - not Linux
        return
    for name in fds:
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        # ... nor the descriptors of clients' lease tables: they are the server's to hold.
        if target.startswith(("socket:", "anon_inode:")) or "_lease" in target:
            try:
                os.close(fd)
            except OSError:
                pass


def run_worker(spec: WorkerSpec, channel: socket.socket) -> None:
    """Body of a worker process."""
    _forget_parent_state(keep=channel.fileno())
    keep_big_allocations_out_of_the_heap()
    if os.getppid() != spec.parent_pid:
        return
    try:
        try:
            data = {ds.name: (ds, spec.columns[ds.name]) for ds in spec.datasets}
            ring_u8 = np.frombuffer(spec.ring, dtype=np.uint8)
        except Exception as exc:  # the parent backs off and, if it keeps happening, gives up
            channel.send(tasks.pack(tasks.Broken(f"{type(exc).__name__}: {exc}")))
            raise SystemExit(1) from None
        plans = PlanCache()
        orders = WorkerOrders()
        channel.send(tasks.pack(tasks.Ready(os.getpid(), spec.index)))
        waiting = select.poll()
        waiting.register(channel, select.POLLIN)
        while True:
            if not waiting.poll(1000):
                if os.getppid() != spec.parent_pid:
                    return
                plans.evict_idle()
                continue
            message = channel.recv(tasks.MAX_MESSAGE)
            if not message:
                return  # the main process is gone
            job = tasks.unpack(message)
            if isinstance(job, tasks.OrderJob):
                channel.send(tasks.pack(tasks.Ordered(job.id, _fill_order(job, data, plans,
                                                                           orders))))
            elif isinstance(job, tasks.Task):
                channel.send(tasks.pack(_run_task(job, data, plans, orders, ring_u8, spec)))
            else:
                return  # STOP
    except (BrokenPipeError, ConnectionResetError):
        return  # the main process is gone
    finally:
        channel.close()


class PlanCache:
    """The plans a worker has used lately (epoch orders live in the process-wide ORDERS, or in
    the server's shared order segments)."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, tuple[BatchPlan, float]] = OrderedDict()
        self._last_sweep = time.monotonic()

    def get(self, spec: DatasetSpec, params: dict, columns: dict) -> BatchPlan:
        dataset, rows = spec.name, spec.rows
        key = (dataset, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                     for k, v in params.items())))
        now = time.monotonic()
        hit = self._plans.pop(key, None)
        if hit is None:
            plan_params = PlanParams.from_wire(params)
            plan = BatchPlan(rows, plan_params, columns=columns, data_key=dataset,
                             units=plan_units(plan_params, columns, dataset, spec.fields))
        else:
            plan = hit[0]
        self._plans[key] = (plan, now)
        while len(self._plans) > _PLAN_CACHE:
            self._plans.popitem(last=False)
        if now - self._last_sweep > _PLAN_IDLE_S:
            self.evict_idle(now)
        return plan

    def evict_idle(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_sweep = now
        for key, (_, used) in list(self._plans.items()):
            if now - used > _PLAN_IDLE_S:
                del self._plans[key]
        ORDERS.evict_idle()


def _fill_order(job: tasks.OrderJob, data: dict, plans: PlanCache,
                orders: WorkerOrders) -> bool:
    """Compute an epoch's order into its shared segment ahead of time."""
    try:
        ds, arrays = data[job.dataset]
        plan = plans.get(ds, job.params, arrays)
        orders.get(job.order, True, plan, job.epoch)
        return True
    except Exception:  # the order is recomputed when a task needs it; nothing is lost
        log.exception("computing an epoch order ahead of time failed")
        return False


def _check_files(ds: DatasetSpec) -> None:
    if ds.files:
        why = changed_file(ds)
        if why is not None:
            raise DatasetError(why)


def _run_task(task: tasks.Task, data: dict, plans: PlanCache, orders: WorkerOrders,
              ring_u8: np.ndarray, spec: WorkerSpec) -> tasks.Done | tasks.Failed:
    """Run one task; the reply says what it wrote, or why it failed."""
    started = time.perf_counter()
    try:
        ds, arrays = data[task.dataset]
        _check_files(ds)
        plan = plans.get(ds, task.params, arrays)
        start = spec.ring_header + task.slot * spec.slot_bytes
        slot = ring_u8[start : start + spec.slot_bytes]
        order = orders.get(task.order, task.fill, plan, task.epoch) if task.order else None
        transform = spec.transforms.get(task.dataset)
        if transform is None:
            layout = gather_chunk(arrays, ds, plan, task.epoch, task.k0, task.count, slot, order)
        else:
            layout = transform_chunk(arrays, ds, plan, task.epoch, task.k0, task.count, slot,
                                     transform, order)
        _check_files(ds)  # a change during the gather may have mixed versions into it
        dtypes, shapes, offsets, nbytes = layout
        return tasks.Done(task.id, dtypes, shapes, offsets, nbytes,
                          busy=time.perf_counter() - started)
    except BatchfeedError as exc:
        return tasks.Failed(task.id, exc.code, str(exc), busy=time.perf_counter() - started)
    except Exception as exc:  # a bug or a bad transform: report it, keep serving
        where = traceback.format_exc(limit=-3)
        log.error("worker %d failed on task %d:\n%s", spec.index, task.id, where)
        return tasks.Failed(
            task.id, WorkerError.code,
            f"worker {spec.index} failed on epoch {task.epoch} batches {task.k0}.."
            f"{task.k0 + task.count - 1}: {type(exc).__name__}: {exc}",
            busy=time.perf_counter() - started,
        )
