"""The front end: the main process's single-threaded event loop.

It owns the client-facing ROUTER socket and the poller, and dispatches what arrives:

- client messages to ``ClientMessages`` (``handlers.py``: HELLO, CLAIM, REQUEST, RELEASE, PING,
  BYE, STATS), which acts through the sessions (``session_table.py``), each honoured only from the
  connection that owns the session it names;
- the scheduler (``scheduler.py``) turns queued batches into tasks for idle workers;
- worker replies come back over the workers' socketpairs, and deaths through their sentinels,
  to the supervisor (``supervisor.py``) and the scheduler; gathered slots go out through the
  outbox (``outbox.py``), which never copies batch bytes but past the lease budget;
- its timer: held files checked (``catalog.py``), leases collected, silent sessions expired,
  stuck workers killed, and the snapshot that stats and metrics read refreshed.

After an internal error the loop checks every invariant of the ring, the sessions and the
scheduler; if one no longer holds it stops (``BookkeepingError``), so that a supervisor restarts
a clean server instead of serving from corrupt bookkeeping; workers that cannot start make it
stop too (``WorkersFailed``), after telling every client why.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import zmq

from batchfeed.shared import protocol
from batchfeed.shared.errors import DatasetError, ResourceError, WorkerError
from batchfeed.shared.version import __version__

from . import tasks
from .catalog import Catalog, Watched
from .config import ServerConfig
from .dataset import Columns, DatasetSpec
from .handlers import ClientMessages
from .leases import Leases
from .order_board import OrderBoard
from .outbox import Outbox
from .ratelog import RateLimitedLog
from .ring import SlotRing
from .scheduler import TASKS_PER_WORKER, GivenUp, Scheduler
from .security import IpcPath, ServerSecurity, check_ipc_free
from .session import Owner
from .session_table import SessionTable
from .supervisor import Supervisor, WorkerHandle
from .transform_runner import Transform
from .worker import WorkerSpec

log = logging.getLogger("batchfeed.server")

CLIENT_MAX_MSG = 1 << 20  # client -> server messages are small headers
DRAIN_MAX = 512
TIMER_PERIOD = 0.25
FILE_CHECK_PERIOD = 1.0  # how often held (--mmap) files are checked for changes in place
# Messages ZeroMQ may queue per connection.  BATCH messages stay far below it (a connection's
# unsent bytes are bounded, sessions.Limits); past it, replies to a peer that does not read
# (errors, pongs) are dropped instead of queued.
SEND_HWM = 10_000


class BookkeepingError(Exception):
    """An invariant of the server's own state no longer holds: it must not serve on."""


class WorkersFailed(Exception):
    """Worker processes cannot start: the server told its clients why and stops."""


class Frontend:
    """Runs until ``stop()``; ``close()`` shuts every socket and worker down (idempotent)."""

    def __init__(self, config: ServerConfig, datasets: dict[str, DatasetSpec], ring: SlotRing,
                 security: ServerSecurity | None = None,
                 transforms: dict[str, Transform] | None = None,
                 columns: dict[str, Columns] | None = None,
                 held: Sequence[Watched] = ()):
        self.config = config
        self.transforms = transforms or {}
        self.security = security
        self.datasets = datasets
        self.columns = columns or {}  # dataset -> its fields' views (the workers inherit them)
        self.catalog = Catalog(datasets, self.transforms, self.columns, held)
        self._checked_files_at = 0.0
        self.ring = ring
        self.leases = Leases(ring, reserve=TASKS_PER_WORKER * config.n_workers)
        self.sessions = SessionTable(self.leases, config.limits)
        self.orders = OrderBoard(ring.token)
        self.scheduler = Scheduler(ring, self.orders, self.sessions.by_id,
                                   self.sessions.may_send)
        self.poller = zmq.Poller()
        self.supervisor = Supervisor(self._worker_spec, config.n_workers, config.task_timeout,
                                     self.poller)
        self.counters: Counter[str] = Counter()
        self.worker_busy: dict[int, float] = defaultdict(float)  # seconds each worker spent busy
        self.snapshot: dict = {}  # describe() with sessions, refreshed by the loop for readers
        # in other threads (metrics): they read this reference, never the live state
        self.errors: Counter[str] = Counter()
        self.log = RateLimitedLog(log)
        self._stopping = False
        self._last_timer = 0.0
        self._moved_at = 0.0  # when a send was last seen handed on
        self._flush_on_close = False
        self.started = time.monotonic()
        self.ctx: zmq.Context | None = None
        self.clients: zmq.Socket | None = None
        self.outbox: Outbox  # made with the socket (bind)
        self.messages: ClientMessages  # ... and so is what handles clients' messages
        self.address = config.bind
        self._ipc: list[IpcPath] = []  # the socket files this server made, removed at close
        # stop() writes a byte here: a signal handler runs while the poll is interrupted, and
        # pyzmq then polls again for the rest of its timeout; this makes that poll return.
        self._wake: tuple[socket.socket, socket.socket] | None = None

    # ------------------------------------------------------------------ lifecycle

    def _worker_spec(self, index: int) -> WorkerSpec:
        assert self.ring.segment is not None
        return WorkerSpec(index=index, datasets=tuple(self.datasets.values()),
                          columns=self.columns, ring=self.ring.segment.buf,
                          ring_header=self.ring.offset(0), slot_bytes=self.ring.slot_bytes,
                          parent_pid=os.getpid(), transforms=self.transforms)

    @property
    def workers(self) -> list[WorkerHandle]:
        return self.supervisor.workers

    def start_workers(self) -> None:
        """Fork the workers.  Called before any ZeroMQ context exists in this process."""
        self.supervisor.start()

    def bind(self) -> None:
        self.ctx = zmq.Context()
        self.clients = self.ctx.socket(zmq.ROUTER)
        if self.security is not None:
            self.security.apply(self.ctx, self.clients)
        self.clients.linger = 0
        self.clients.router_mandatory = 1
        self.clients.maxmsgsize = CLIENT_MAX_MSG
        self.clients.sndhwm = SEND_HWM
        self.clients.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.clients.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        for address in (self.config.bind, *self.config.also_bind):
            if address.startswith("ipc://"):
                check_ipc_free(address[len("ipc://"):])
            self.clients.bind(address)
            bound = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
            made = IpcPath.made(bound[len("ipc://"):]) if bound.startswith("ipc://") else None
            if made is not None:
                self._ipc.append(made)
            if address == self.config.bind:
                self.address = bound
        self.outbox = Outbox(self.clients, self.ring, self.leases, self.sessions, self.counters)
        self.messages = ClientMessages(self.config, self.catalog, self.sessions, self.leases,
                                       self.ring, self.scheduler, self.transforms, self.outbox,
                                       self.describe, self.counters, self.errors, self.log)
        self.poller.register(self.clients, zmq.POLLIN)
        self._wake = socket.socketpair()  # after the fork: the workers never hold it
        for end in self._wake:
            end.setblocking(False)
        self.poller.register(self._wake[0], zmq.POLLIN)

    def wait_workers_ready(self, timeout: float = 60.0) -> None:
        self.supervisor.wait_ready(self._drain_worker, timeout)

    def stop(self) -> None:
        """Make ``run`` return at once (safe in a signal handler)."""
        self._stopping = True
        if self._wake is not None:
            try:
                self._wake[1].send(b"x")
            except OSError:  # full or closed: the loop is awake or gone anyway
                pass

    def close(self) -> None:
        """Stop workers (STOP, join, terminate, kill), then close sockets and the context."""
        self._stopping = True
        self.supervisor.close()
        if self.clients is not None:
            # Linger only to deliver the errors that say why the server stops.
            self.clients.close(linger=1000 if self._flush_on_close else 0)
        self.clients = None
        for path in self._ipc:
            path.remove()  # ZeroMQ leaves it; a later server could not tell it is stale
        self._ipc.clear()
        self.leases.close()
        if self.security is not None:
            self.security.close()
        self.orders.close()
        self.catalog.close()
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self._wake is not None:
            for end in self._wake:
                end.close()
            self._wake = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except WorkersFailed:
                raise
            except Exception:  # a bug must cost one message, not the whole server
                self.errors["internal"] += 1
                self.log.log(logging.ERROR, "internal", "internal error in the front end",
                             exc_info=True)
                try:
                    self.check_invariants()
                except AssertionError as exc:
                    raise BookkeepingError(
                        f"after an internal error the server's bookkeeping is inconsistent "
                        f"({exc}); stopping so that a clean server can take over") from None

    def _iterate(self) -> None:
        events = dict(self.poller.poll(self._poll_timeout_ms()))  # type: ignore[arg-type]
        if self.clients in events:
            self._drain_clients()
        for w in list(self.workers):
            if w.fd in events or w.sentinel in events:
                self._drain_worker(w, exited=w.sentinel in events)
        now = time.monotonic()
        if self.leases.reap_sends() + self.sessions.reap():
            self._moved_at = now
        if self.scheduler.runnable and not self.ring.free_count:
            self.leases.collect_all()  # starved: look for slots given back
        self.supervisor.tick(now)
        if self.supervisor.broken is not None:
            self._workers_failed(self.supervisor.broken)
        self.scheduler.dispatch(self.workers)
        self.scheduler.order_ahead(self.workers)
        if now - self._last_timer >= TIMER_PERIOD:
            self._last_timer = now
            self._check_timers(now)

    def _poll_timeout_ms(self) -> int | float:
        if self.leases.sends or self.sessions.sending:
            # Tracker completion has no file descriptor: look again soon (sooner if starved),
            # but not busily for a peer that has stopped reading.
            if time.monotonic() - self._moved_at > 0.05:
                return 20
            return 0.2 if self.scheduler.runnable and not self.ring.free_count else 2
        return 20 if self.supervisor.starting else 100

    def _workers_failed(self, why: str) -> None:
        """Workers cannot start: every client is told why, then the server stops."""
        message = (f"the server at {self.address} stops: {why}; see its log, fix the cause "
                   "(its data, memory, or a transform that fails at start) and restart it")
        log.critical("%s", message)
        for s in self.sessions:
            self.outbox.send(s.route, protocol.error(ResourceError.code, message, session=s.id))
        self._flush_on_close = True
        raise WorkersFailed(message)

    def describe(self) -> dict:
        """The server as ``batchfeed stats`` and the metrics endpoint show it: plain numbers and
        strings only (each part describes itself)."""
        counters = self.counters + self.scheduler.counters
        return {
            "version": __version__, "address": self.address,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "datasets": ", ".join(self.datasets), **self.supervisor.describe(),
            **self.ring.usage(), "sessions": len(self.sessions),
            "counters": {**counters, **self.supervisor.counters()}, "errors": dict(self.errors),
            "worker_busy_s": {str(i): round(v, 3) for i, v in self.worker_busy.items()},
        }

    def check_invariants(self) -> None:
        """Every slot has one holder and every holder knows its slots; sessions' counters
        match their queues and tasks.  Raises AssertionError naming what does not hold."""
        self.ring.check()
        self.scheduler.check()
        self.sessions.check()
        self.leases.check()

    # ------------------------------------------------------------------ clients

    def _drain_clients(self) -> None:
        assert self.clients is not None
        curve = self.security is not None and self.security.curve
        for _ in range(DRAIN_MAX):
            try:
                if curve:  # the owner includes the key ZAP authenticated the connection with
                    parts = self.clients.recv_multipart(zmq.NOBLOCK, copy=False)
                    owner: Owner = (parts[0].bytes, str(parts[-1].get("User-Id") or ""))
                    frames: list = [f.bytes for f in parts[1:]]
                else:
                    frames = self.clients.recv_multipart(zmq.NOBLOCK)
                    owner, frames = (frames[0], ""), frames[1:]
            except zmq.Again:
                return
            self.messages.handle(owner, frames)

    # ------------------------------------------------------------------ workers

    def _drain_worker(self, w: WorkerHandle, exited: bool = False) -> None:
        """Handle what the worker sent, then its death if it died (hung up, or exited)."""
        messages = w.receive()
        for data in messages or ():
            self._on_worker(w, tasks.unpack(data))
        if (messages is None or exited) and w in self.workers and not self._stopping:
            for lost in self.scheduler.lost(w, timed_out=w.timed_out):
                self._give_up(lost, w)
            self.supervisor.replace(w)

    def _give_up(self, lost: GivenUp, worker: WorkerHandle) -> None:
        """A batch lost with its worker too often fails (the rest goes on)."""
        s = self.sessions.by_id.get(lost.session)
        if s is None:
            return
        self.errors["gave_up"] += 1
        transform = self.transforms.get(s.dataset.name)
        message = lost.message(s.dataset, transform.name if transform is not None else None,
                               self.config.task_timeout, worker.describe_exit())
        self.log.log(logging.WARNING, "gave up", "session %s: %s", s.label, message)
        self.outbox.send(s.route, protocol.error(WorkerError.code, message, session=s.id,
                                                 stream=lost.stream, epoch=lost.epoch,
                                                 k0=lost.k))

    def _on_worker(self, worker: WorkerHandle, msg: tasks.Message) -> None:
        if isinstance(msg, tasks.Ready):
            worker.ready = True
        elif isinstance(msg, tasks.Broken):
            worker.broken = msg.reason
        elif isinstance(msg, tasks.Ordered):
            self.scheduler.ordered(worker, msg.id, msg.ok)
        elif isinstance(msg, (tasks.Done, tasks.Failed)):
            self._on_task_reply(worker, msg)

    def _on_task_reply(self, worker: WorkerHandle, reply: tasks.Done | tasks.Failed) -> None:
        ok = isinstance(reply, tasks.Done)
        job = self.scheduler.complete(worker, reply.id, ok)
        if job is None:
            return  # a task already given to another worker
        self.worker_busy[worker.index] += reply.busy
        task = job.task
        s = self.sessions.by_id.get(job.session)
        if s is None or job.stream != s.stream:
            self.ring.release(task.slot, job.holder)
            return
        if isinstance(reply, tasks.Done):
            done = len(reply.shapes)
            s.finished(task.epoch, task.k0, task.count, done)
            if done < task.count:  # a transform's output outgrew the slot: the rest again
                self.counters["chunks_cut"] += 1
                self.scheduler.wake(s, first=True)
            self.outbox.batch(s, job, reply)
        else:
            s.failed(task.count)
            self.ring.release(task.slot, job.holder)
            self.errors[reply.code] += 1
            self.outbox.send(s.route, protocol.error(reply.code, reply.message, session=s.id,
                                                     stream=job.stream, epoch=task.epoch,
                                                     k0=task.k0))
            if reply.code == DatasetError.code and s.dataset.files:
                self._check_files()  # a worker saw a held file change: act on it now

    # ------------------------------------------------------------------ timers

    def _check_timers(self, now: float) -> None:
        if now - self._checked_files_at >= FILE_CHECK_PERIOD:
            self._checked_files_at = now
            self._check_files()
        self.snapshot = {**self.describe(), "session_list": self.sessions.describe()}
        self.leases.collect_all()
        self.sessions.expire(now, self.config.session_timeout)
        self.supervisor.kill_stuck(now)

    def _check_files(self) -> None:
        """A dataset whose held files changed in place is served no more: its sessions get the
        reason and close (and a HELLO for it is refused with it)."""
        for name, why in self.catalog.changed():
            for s in self.sessions:
                if s.dataset.name == name:
                    self.outbox.send(s.route, protocol.error(DatasetError.code, why,
                                                             session=s.id))
                    self.sessions.close(s, "its data changed on disk")
