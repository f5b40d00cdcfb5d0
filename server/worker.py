"""Worker processes: gather the rows of batches straight into ring slots.

A worker is stateless beyond caches: a task names the plan parameters, the epoch, the batches
and the slot, so a task lost with its worker is simply given to another.  Workers are forked
from the main process (so they share its imported modules' pages), then:

- drop what they inherited but must not use: the parent's sockets and signal handlers;
- ask the kernel to kill them when the parent dies (``PR_SET_PDEATHSIG``) and also check
  ``getppid`` whenever they are idle, so a SIGKILLed server leaves no workers behind;
- attach the dataset (read-only) and the ring by name;
- loop: take a TASK, ``np.take(..., out=slot)`` per field, answer DONE or FAIL.

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

import numpy as np

from batchfeed.shared.errors import BatchfeedError, WorkerError
from batchfeed.shared.plan import ORDERS, BatchPlan, PlanParams
from batchfeed.shared.shm import SharedSegment

from . import tasks
from .dataset import DatasetSpec, attach_arrays
from .orders import WorkerOrders
from .transform import Transform

log = logging.getLogger("batchfeed.server.worker")

ALIGN = 64
_PLAN_CACHE = 8  # plans (and their epoch orders) kept per worker ...
_PLAN_IDLE_S = 5.0  # ... and dropped once unused this long, so memory returns to baseline
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, all of it names and numbers."""

    index: int
    datasets: tuple[DatasetSpec, ...]
    ring_name: str
    ring_header: int
    slot_bytes: int
    parent_pid: int
    transforms: dict = field(default_factory=dict)  # dataset name -> Transform


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def gather_chunk(arrays: dict[str, np.ndarray], spec: DatasetSpec, plan: BatchPlan, epoch: int,
                 k0: int, count: int, slot: np.ndarray,
                 order: np.ndarray | None = None) -> tuple[list, list, list, list]:
    """Write batches ``k0 .. k0+count-1`` into ``slot`` (a uint8 array); return their layout.

    Each field gets one region (64-byte aligned) holding its rows for all the batches, in batch
    order.  Returns (dtypes, shapes per batch per field, region offsets, region sizes).
    """
    idx = plan.chunk_indices(epoch, k0, count, order)
    rows = [plan.batch_rows(k) for k in range(k0, k0 + count)]
    offsets, sizes, dtypes, offset = [], [], [], 0
    for f in spec.fields:
        nbytes = len(idx) * f.row_nbytes
        if offset + nbytes > len(slot):
            raise WorkerError(
                f"{count} batches of {plan.params.batch_size} rows need more than the server's "
                f"slot size of {len(slot)} bytes; restart the server with a larger --slot-mb"
            )
        out = slot[offset : offset + nbytes].view(f.dtype).reshape((len(idx), *f.shape))
        # mode="clip" avoids numpy's buffered out= path; the plan's indices are in range.
        np.take(arrays[f.name], idx, axis=0, out=out, mode="clip")
        offsets.append(offset)
        sizes.append(nbytes)
        dtypes.append([f.name, f.dtype.str])
        offset = align(offset + nbytes)
    shapes = [[[r, *f.shape] for f in spec.fields] for r in rows]
    return dtypes, shapes, offsets, sizes


def transform_chunk(arrays: dict[str, np.ndarray], spec: DatasetSpec, plan: BatchPlan,
                    epoch: int, k0: int, count: int, slot: np.ndarray, transform: Transform,
                    order: np.ndarray | None = None) -> tuple[list, list, list, list]:
    """Like ``gather_chunk``, with ``transform`` applied to each batch before it is written.

    The outputs' sizes are known only once the transform has run, so they are gathered into
    fresh arrays, transformed, then copied into the slot: one copy more than without.  When the
    outputs outgrow the slot, only the batches that fit are written (the caller sees fewer
    shapes than ``count`` and asks for the rest again); a single batch too big is an error.
    """
    outs: list[dict[str, np.ndarray]] = []
    names: list[str] = []
    field_bytes: list[int] = []
    for k in range(k0, k0 + count):
        idx = plan.indices(epoch, k, order)
        batch = {f.name: np.take(arrays[f.name], idx, axis=0) for f in spec.fields}
        rng = transform.rng(plan.params.seed, epoch, plan.global_batch(k))
        out = transform.apply(batch, rng, f"epoch {epoch} batch {k}")
        if not outs:
            names, field_bytes = list(out), [0] * len(out)
        elif list(out) != names or any(out[n].dtype != outs[0][n].dtype for n in names):
            raise WorkerError(
                f"transform {transform.name} returned different fields or dtypes for batches "
                f"{k0} and {k} of epoch {epoch}; every batch must have the same field names and "
                "dtypes (shapes may vary)")
        grown = [size + out[n].nbytes for size, n in zip(field_bytes, names)]
        if sum(align(size) for size in grown) > len(slot):
            if not outs:
                raise WorkerError(
                    f"transform {transform.name} made batch {k} of epoch {epoch} "
                    f"{sum(grown)} bytes, more than the server's {len(slot)}-byte slots; "
                    "restart the server with a larger --slot-mb")
            break
        outs.append(out)
        field_bytes = grown
    offsets, dtypes, offset = [], [], 0
    for name in names:
        offsets.append(offset)
        dtypes.append([name, outs[0][name].dtype.str])
        for out in outs:
            arr = out[name]
            slot[offset : offset + arr.nbytes] = arr.reshape(-1).view(np.uint8)
            offset += arr.nbytes
        offset = align(offset)
    shapes = [[list(out[name].shape) for name in names] for out in outs]
    return dtypes, shapes, offsets, field_bytes


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
    segments: list[SharedSegment] = []
    try:
        data = {}
        for ds in spec.datasets:
            segs, arrays = attach_arrays(ds)
            segments += segs
            data[ds.name] = (ds, arrays)
        ring = SharedSegment.attach(spec.ring_name, writable=True)
        segments.append(ring)
        assert ring.buf is not None
        ring_u8 = np.frombuffer(ring.buf, dtype=np.uint8)
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
        for seg in segments:
            seg.close()


class PlanCache:
    """The plans a worker has used lately (epoch orders live in the process-wide ORDERS, or in
    the server's shared order segments)."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, tuple[BatchPlan, float]] = OrderedDict()
        self._last_sweep = time.monotonic()

    def get(self, dataset: str, rows: int, params: dict, columns: dict) -> BatchPlan:
        key = (dataset, tuple(sorted(params.items())))
        now = time.monotonic()
        hit = self._plans.pop(key, None)
        plan = hit[0] if hit is not None else BatchPlan(
            rows, PlanParams.from_wire(params), columns=columns, data_key=dataset)
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
        plan = plans.get(job.dataset, ds.rows, job.params, arrays)
        orders.get(job.order, True, plan, job.epoch)
        return True
    except Exception:  # the order is recomputed when a task needs it; nothing is lost
        log.exception("computing an epoch order ahead of time failed")
        return False


def _run_task(task: tasks.Task, data: dict, plans: PlanCache, orders: WorkerOrders,
              ring_u8: np.ndarray, spec: WorkerSpec) -> tasks.Done | tasks.Failed:
    """Run one task; the reply says what it wrote, or why it failed."""
    started = time.perf_counter()
    try:
        ds, arrays = data[task.dataset]
        plan = plans.get(task.dataset, ds.rows, task.params, arrays)
        start = spec.ring_header + task.slot * spec.slot_bytes
        slot = ring_u8[start : start + spec.slot_bytes]
        order = orders.get(task.order, task.fill, plan, task.epoch) if task.order else None
        transform = spec.transforms.get(task.dataset)
        if transform is None:
            layout = gather_chunk(arrays, ds, plan, task.epoch, task.k0, task.count, slot, order)
        else:
            layout = transform_chunk(arrays, ds, plan, task.epoch, task.k0, task.count, slot,
                                     transform, order)
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
