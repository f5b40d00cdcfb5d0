"""The supervisor: starts, watches, times out, replaces and stops the worker processes.

``WorkerHandle`` is the main process's view of one worker: its process, its end of the
``SOCK_SEQPACKET`` socketpair, and the tasks it holds.  ``Supervisor`` owns the handles:

- ``start`` forks them (before this process has a ZeroMQ context) and ``wait_ready`` waits for
  each one's READY, failing with the reason if one exits or the machine is too slow;
- a worker that dies is noticed by its channel hanging up or its process sentinel, whichever
  comes first; ``replace`` stops what is left of it and forks a successor with the same index
  (the scheduler gives its tasks to others first).  A worker that could not start (it died
  before READY, or could not even be forked) is replaced after a backoff that doubles with each
  failed start in a row (``tick`` starts it when due); after ``MAX_FAILED_STARTS`` in a row the
  supervisor gives up (``broken`` says why) and the front end tells its clients and stops.
  Its log lines are rate-limited per cause;
- ``kill_stuck`` SIGKILLs a worker that made no progress for ``task_timeout`` seconds (so it
  can never send late), which its sentinel then reports as a death (``timed_out``);
- ``close`` is the shutdown sequence, written once: STOP to every worker, then
  ``procs.stop_process`` (join, terminate, kill) within a shared deadline.

The poller the handles are registered with is the front end's; the supervisor only adds and
removes their file descriptors.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import time
from collections.abc import Callable

import zmq

from batchfeed.shared import procs
from batchfeed.shared.errors import ResourceError

from . import tasks
from .ratelog import RateLimitedLog
from .worker import WorkerSpec, run_worker

log = logging.getLogger("batchfeed.server")

STOP_DEADLINE_S = 3.0
MAX_FAILED_STARTS = 5  # worker starts in a row that failed before the server gives up
BACKOFF_S = (0.1, 5.0)  # the first retry's delay, and the longest
_SIGNALS = {-7: "SIGBUS: it read a memory-mapped file that shrank under it",
            -9: "SIGKILL", -11: "SIGSEGV", -6: "SIGABRT"}


class WorkerHandle:
    """One worker: its process, its channel and the tasks it holds (``tasks``: id -> when it
    was given)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.index = spec.index
        self.tasks: dict[int, float] = {}
        self.progress_at = 0.0  # last time it finished a task, or got one while idle
        self.ready = False
        self.timed_out = False  # killed for making no progress
        self.broken: str | None = None  # why it could not start, as it said
        self.channel, self._child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._buffer = bytearray(tasks.MAX_MESSAGE)
        self._view = memoryview(self._buffer)
        self.process = multiprocessing.get_context("fork").Process(
            target=run_worker, args=(spec, self._child_end),
            name=f"batchfeed-worker-{spec.index}", daemon=True,
        )
        self.fd = self.channel.fileno()
        self.sentinel = -1
        self.pid: int | None = None
        self.exitcode: int | None = None

    def start(self) -> None:
        self.process.start()
        self._child_end.close()
        self.channel.setblocking(False)
        self.sentinel = self.process.sentinel
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.exitcode is None and self.process.is_alive()

    def assigned(self, task_id: int) -> None:
        if not self.tasks:
            self.progress_at = time.monotonic()
        self.tasks[task_id] = time.monotonic()

    def completed(self, task_id: int) -> None:
        if self.tasks.pop(task_id, None) is not None:
            self.progress_at = time.monotonic()

    def send(self, message: object) -> bool:
        """Hand the worker a message; False if it is gone (its exit is handled elsewhere)."""
        try:
            self.channel.send(tasks.pack(message))
            return True
        except OSError:  # BlockingIOError cannot happen with <= 2 small tasks queued
            return False

    def receive(self) -> list[bytes] | None:
        """Every message the worker has sent so far; None once it has hung up."""
        out: list[bytes] = []
        while True:
            try:
                n = self.channel.recv_into(self._buffer)
            except BlockingIOError:
                return out
            except OSError:
                return None
            if not n:
                return out or None
            out.append(bytes(self._view[:n]))

    def describe_exit(self) -> str:
        """How it ended, for logs and errors."""
        if self.timed_out:
            return "killed after making no progress within --task-timeout"
        if self.broken:
            return f"could not start: {self.broken}"
        code = self.exitcode
        return f"exited with code {code}" + (f" ({_SIGNALS[code]})" if code in _SIGNALS else "")

    def finish(self, timeout: float) -> None:
        """Stop the process (join, terminate, kill) and release everything.  Idempotent."""
        if self.exitcode is None and self.pid is not None:
            self.exitcode = procs.stop_process(self.process, timeout)
            self.process.close()
        self.channel.close()


class Supervisor:
    def __init__(self, make_spec: Callable[[int], WorkerSpec], n_workers: int,
                 task_timeout: float, poller: zmq.Poller):
        self._make_spec = make_spec
        self.n_workers = n_workers
        self.task_timeout = task_timeout
        self.poller = poller
        self.workers: list[WorkerHandle] = []
        self.restarts = 0
        self.timeouts = 0
        self.failed_starts = 0  # in a row
        self.broken: str | None = None  # why workers cannot start, once given up
        self._due: list[tuple[float, int]] = []  # (when, index) of successors to start
        self.log = RateLimitedLog(log, burst=3, period=10.0)

    def start(self) -> None:
        """Fork the workers.  Called before any ZeroMQ context exists in this process."""
        for i in range(self.n_workers):
            self.workers.append(self._spawn(i))

    def _spawn(self, index: int) -> WorkerHandle:
        handle = WorkerHandle(self._make_spec(index))
        try:
            handle.start()
        except BaseException:
            handle.channel.close()
            raise
        self.poller.register(handle.fd, zmq.POLLIN)
        self.poller.register(handle.sentinel, zmq.POLLIN)
        return handle

    def wait_ready(self, on_message: Callable[[WorkerHandle], None],
                   timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers):
            if time.monotonic() > deadline:
                raise ResourceError(f"the workers did not start within {timeout:.0f} s; is the "
                                    "machine overloaded? (see the log for what they printed)")
            for w in self.workers:
                if not w.alive():
                    raise ResourceError(
                        f"worker {w.index} exited with code {w.process.exitcode} while starting "
                        "(see the log above for why)")
            events = dict(self.poller.poll(100))
            for w in list(self.workers):
                if w.fd in events:
                    on_message(w)

    def replace(self, worker: WorkerHandle) -> None:
        """``worker`` died (or hung up): stop what is left of it, and start a successor with
        the same index: now, or after a backoff if it had not even started."""
        if worker not in self.workers:
            return  # already replaced
        self.restarts += 1
        self.poller.unregister(worker.sentinel)
        self.poller.unregister(worker.fd)
        if worker.alive():
            worker.process.kill()  # it hung up on us; make sure it is gone
        worker.finish(1.0)
        self.workers.remove(worker)
        if worker.ready:
            self.failed_starts = 0
        else:
            self.failed_starts += 1
        self.log.log(logging.WARNING, f"worker exit: {worker.describe_exit()[:40]}",
                     "worker %d (pid %s) %s; restarting it", worker.index, worker.pid,
                     worker.describe_exit())
        self._schedule(worker.index, worker.describe_exit())

    def _schedule(self, index: int, why: str) -> None:
        if self.failed_starts >= MAX_FAILED_STARTS:
            self.broken = (f"{self.failed_starts} worker processes in a row could not start "
                           f"(the last one {why})")
            return
        delay = 0.0 if not self.failed_starts else \
            min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (self.failed_starts - 1))
        self._due.append((time.monotonic() + delay, index))

    def tick(self, now: float) -> None:
        """Start the successors that are due."""
        due = [d for d in self._due if d[0] <= now]
        for entry in due:
            self._due.remove(entry)
            try:
                self.workers.append(self._spawn(entry[1]))
            except OSError as exc:  # no descriptor or process left: a failed start too
                self.failed_starts += 1
                self.log.log(logging.WARNING, "worker fork", "cannot start worker %d: %s",
                             entry[1], exc)
                self._schedule(entry[1], f"could not be started: {exc}")
        self.workers.sort(key=lambda w: w.index)

    def describe(self) -> dict:
        """Its workers, for stats and metrics."""
        return {"workers": len(self.workers), "worker_pids": [w.pid or 0 for w in self.workers]}

    def counters(self) -> dict[str, int]:
        return {"worker_restarts": self.restarts, "worker_timeouts": self.timeouts}

    @property
    def starting(self) -> int:
        """Successors waiting for their start."""
        return len(self._due)

    def kill_stuck(self, now: float) -> None:
        for w in self.workers:
            if w.tasks and now - w.progress_at > self.task_timeout and w.alive():
                self.log.log(logging.WARNING, "worker stuck",
                             "worker %d made no progress for %.0f s; killing it", w.index,
                             self.task_timeout)
                self.timeouts += 1
                w.timed_out = True
                w.process.kill()  # its sentinel reports the death; its tasks are re-run

    def close(self) -> None:
        for w in self.workers:
            if w.alive():
                w.send(tasks.STOP)
        deadline = time.monotonic() + STOP_DEADLINE_S
        for w in self.workers:
            w.finish(max(0.1, deadline - time.monotonic()))
        self.workers = []
