"""The supervisor: starts, watches, times out, replaces and stops the worker processes.

``WorkerHandle`` is the main process's view of one worker: its process, its end of the
``SOCK_SEQPACKET`` socketpair, and the tasks it holds.  ``Supervisor`` owns the handles:

- ``start`` forks them (before this process has a ZeroMQ context) and ``wait_ready`` waits for
  each one's READY, failing with the reason if one exits or the machine is too slow;
- a worker that dies is noticed by its channel hanging up or its process sentinel, whichever
  comes first; ``replace`` stops what is left of it and forks a successor with the same index
  (the scheduler gives its tasks to others first);
- ``kill_stuck`` SIGKILLs a worker that made no progress for ``task_timeout`` seconds (so it
  can never send late), which its sentinel then reports as a death;
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
from .worker import WorkerSpec, run_worker

log = logging.getLogger("batchfeed.server")

STOP_DEADLINE_S = 3.0


class WorkerHandle:
    """One worker: its process, its channel and the tasks it holds (``tasks``: id -> when it
    was given)."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.index = spec.index
        self.tasks: dict[int, float] = {}
        self.progress_at = 0.0  # last time it finished a task, or got one while idle
        self.ready = False
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

    def start(self) -> None:
        """Fork the workers.  Called before any ZeroMQ context exists in this process."""
        for i in range(self.n_workers):
            self.workers.append(self._spawn(i))

    def _spawn(self, index: int) -> WorkerHandle:
        handle = WorkerHandle(self._make_spec(index))
        handle.start()
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

    def replace(self, worker: WorkerHandle) -> WorkerHandle | None:
        """``worker`` died (or hung up): stop what is left of it, fork a successor."""
        if worker not in self.workers:
            return None  # already replaced
        self.restarts += 1
        self.poller.unregister(worker.sentinel)
        self.poller.unregister(worker.fd)
        if worker.alive():
            worker.process.kill()  # it hung up on us; make sure it is gone
        worker.finish(1.0)
        log.warning("worker %d (pid %s) exited with code %s; restarting it", worker.index,
                    worker.pid, worker.exitcode)
        successor = self._spawn(worker.index)
        self.workers[self.workers.index(worker)] = successor
        return successor

    def kill_stuck(self, now: float) -> None:
        for w in self.workers:
            if w.tasks and now - w.progress_at > self.task_timeout and w.alive():
                log.warning("worker %d made no progress for %.0f s; killing it", w.index,
                            self.task_timeout)
                self.timeouts += 1
                w.process.kill()  # its sentinel reports the death; its tasks are re-run

    def close(self) -> None:
        for w in self.workers:
            if w.alive():
                w.send(tasks.STOP)
        deadline = time.monotonic() + STOP_DEADLINE_S
        for w in self.workers:
            w.finish(max(0.1, deadline - time.monotonic()))
        self.workers = []
