"""The front end: the main process's single-threaded event loop.

It owns the client-facing ROUTER socket and the poller, and dispatches what arrives:

- client messages go through the handler table (HELLO, CLAIM, REQUEST, RELEASE, PING, BYE,
  STATS) to the sessions (``sessions.py``: credit, queue), each honoured only from the
  connection that owns the session it names (its routing id, and with CURVE its public key);
- the scheduler (``scheduler.py``) turns queued batches into tasks for idle workers;
- worker replies come back over the workers' socketpairs, and deaths through their sentinels,
  to the supervisor (``supervisor.py``) and the scheduler;
- the send path turns a gathered slot into one BATCH message whose frames point into the slot
  (``copy=False``), or, on the same-host fast path, that names the slot.  It never copies batch
  bytes itself.

A slot comes back to the ring when ZeroMQ's MessageTracker says the last frame pointing into it
was released, or when a fast-path client cleared its byte in the lease table (``leases.py``),
or when its holder (a dead worker, a closed session, a client process that is gone) is.  Leases
and sends together stay within a budget that leaves the workers room, so that no client can
stall another: past it, a batch is sent copied.

After an internal error the loop checks every invariant of the ring, the sessions and the
scheduler; if one no longer holds it stops (``BookkeepingError``), so that a supervisor restarts
a clean server instead of serving from corrupt bookkeeping.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Protocol

import zmq

from batchfeed.shared import protocol
from batchfeed.shared.errors import (
    BatchfeedError,
    DatasetError,
    ProtocolError,
    ResourceError,
    WorkerError,
)
from batchfeed.shared.plan import PlanParams
from batchfeed.shared.schema import schema_to_wire
from batchfeed.shared.shm import claim_proof
from batchfeed.shared.version import __version__

from . import tasks
from .catalog import Catalog
from .config import ServerConfig
from .dataset import Columns, DatasetSpec
from .leases import Leases
from .orders import OrderBoard
from .ratelog import RateLimitedLog
from .report import describe_server, session_list
from .ring import SlotRing
from .scheduler import TASKS_PER_WORKER, GivenUp, InFlight, Scheduler
from .security import IpcPath, ServerSecurity, check_ipc_free
from .sessions import MAX_ATTEMPTS, Owner, Session, SessionTable, new_session, size_session
from .supervisor import Supervisor, WorkerHandle
from .transform import Transform
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


class Watched(Protocol):
    """A dataset whose held files the front end watches (``dataset.SharedDataset``)."""

    spec: DatasetSpec

    def changed(self) -> str | None: ...


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
        self.catalog = Catalog(datasets, self.transforms, self.columns)
        self.held = [d for d in held if d.spec.files]  # datasets mapped from held files
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
        self.address = config.bind
        self._ipc: IpcPath | None = None  # the socket file this server made, removed at close
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
        if self.config.bind.startswith("ipc://"):
            check_ipc_free(self.config.bind[len("ipc://"):])
        self.clients.bind(self.config.bind)
        self.address = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.address.startswith("ipc://"):
            self._ipc = IpcPath.made(self.address[len("ipc://"):])
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
        if self._ipc is not None:
            self._ipc.remove()  # ZeroMQ leaves it; a later server could not tell it is stale
            self._ipc = None
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
            self._send(s.route, protocol.error(ResourceError.code, message, session=s.id))
        self._flush_on_close = True
        raise WorkersFailed(message)

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
            self._on_client(owner, frames)

    def _on_client(self, owner: Owner, frames: list) -> None:
        self.counters["messages"] += 1
        session_id = None
        try:
            msg = protocol.decode(frames)
            session_id = msg.header.get("session")
            handler = self._handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError(f"a server does not accept {msg.kind} messages")
            handler(self, owner, msg.header)
        except BatchfeedError as exc:
            self.errors[exc.code] += 1
            self.log.log(logging.INFO, exc.code, "refused a client message (%s): %s", exc.code,
                         exc)
            session = session_id if type(session_id) is int else None
            self._send(owner[0], protocol.error(exc.code, str(exc), session=session))

    def _send(self, route: bytes, frames: list, copy: bool = True) -> bool:
        assert self.clients is not None
        try:
            self.clients.send_multipart([route, *frames], zmq.NOBLOCK, copy=copy)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client is gone; EAGAIN: not reading
            log.debug("cannot send to client: %s", exc)
            return False

    def _on_hello(self, owner: Owner, h: dict) -> None:
        self.sessions.check_room(owner)  # before any work: a peer past its limit costs nothing
        params = PlanParams.from_wire(h["params"])
        dataset = self.catalog.dataset(h["dataset"])
        plan = self.catalog.plan(dataset, params, self.config.max_order_bytes)
        fields = self.catalog.served_fields(dataset)
        sizing = size_session(self.catalog.estimate(dataset, plan), h["prefetch"],
                              self.ring.slot_bytes, self.config.chunk_bytes)
        session = new_session(owner, dataset, plan, sizing, name=h["name"] or "",
                              challenge=secrets.token_hex(16) if h["fastpath"] else "")
        self.sessions.open(session, h["resume"], h["resume_secret"])
        self.counters["sessions"] += 1
        log.info("session %x (%s) from %s: %s on %s", session.id, session.label,
                 session.name or "?", params, dataset.name)
        transform = self.transforms.get(dataset.name)
        self._send(owner[0], protocol.welcome(
            session=session.id,
            secret=session.secret,
            dataset=dataset.name,
            rows=dataset.rows,
            batches_per_epoch=plan.batches_per_epoch,
            prefetch=sizing.prefetch,
            fields=schema_to_wire(fields),
            server=__version__,
            units=plan.epoch_rows if params.units != "rows" else None,
            shard=list(dataset.shard) if dataset.shard is not None else None,
            classes=list(dataset.classes) or None,
            fingerprint=dataset.fingerprint.to_wire() if dataset.fingerprint else None,
            transform=transform.name if transform is not None else None,
            ring=self.ring.describe() if session.challenge else None,
            challenge=session.challenge or None,
        ))

    def _on_claim(self, owner: Owner, h: dict) -> None:
        """A fast-path CLAIM: proved (the challenge signed with the ring's key), it gets the
        session's lease table, once; otherwise the session goes on over the socket."""
        s = self.sessions.find(h["session"], owner)
        challenge, s.challenge = s.challenge, ""  # one attempt per session
        if not challenge or not hmac.compare_digest(h["proof"],
                                                    claim_proof(self.ring.key, challenge)):
            self.counters["claims_refused"] += 1
            self.log.log(logging.WARNING, "claim", "session %s: a fast-path claim without the "
                         "proof of shared memory was refused; its batches keep coming over "
                         "the socket", s.label)
            return
        s.table = self.leases.grant()
        if s.table is None:
            return  # no room for a table: the socket it is
        self._send(owner[0], protocol.grant(session=s.id, table=s.table.name))
        log.info("session %x (%s): fast path granted", s.id, s.label)

    def _on_stats(self, owner: Owner, h: dict) -> None:
        self._send(owner[0], protocol.report(self.describe(), session_list(self.sessions)))

    def describe(self) -> dict:
        """The server's counters, for ``batchfeed stats`` and the metrics endpoint."""
        return describe_server(self)

    def _on_request(self, owner: Owner, h: dict) -> None:
        s = self.sessions.find(h["session"], owner)
        if s.table is not None:
            self.leases.collect(s.table)
        s.trainer_at(h["at"])
        if s.request(h["stream"], h["epoch"], h["k0"], h["count"]):
            self.scheduler.wake(s)

    def _on_release(self, owner: Owner, h: dict) -> None:
        s = self.sessions.find(h["session"], owner)
        if s.table is not None:
            self.leases.collect(s.table)

    def _on_ping(self, owner: Owner, h: dict) -> None:
        if h["session"] is not None:
            self.sessions.find(h["session"], owner).trainer_at(h["at"])
        self._send(owner[0], protocol.pong())

    def _on_bye(self, owner: Owner, h: dict) -> None:
        s = self.sessions.find(h["session"], owner)
        self.sessions.close(s, "said bye")
        self._send(owner[0], protocol.pong(s.id))  # nothing of the session follows this

    _handlers = {
        protocol.HELLO: _on_hello,
        protocol.CLAIM: _on_claim,
        protocol.REQUEST: _on_request,
        protocol.RELEASE: _on_release,
        protocol.PING: _on_ping,
        protocol.BYE: _on_bye,
        protocol.STATS: _on_stats,
    }

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
        """A batch lost with its worker ``MAX_ATTEMPTS`` times fails (the rest goes on)."""
        s = self.sessions.by_id.get(lost.session)
        if s is None:
            return
        self.errors["gave_up"] += 1
        how = (f"each worker that gathered it was killed after making no progress for "
               f"{self.config.task_timeout:g} s (--task-timeout)" if lost.timed_out
               else f"each worker that gathered it died (the last {worker.describe_exit()})")
        transform = self.transforms.get(s.dataset.name)
        fix = (f"raise --task-timeout if transform {transform.name} is merely slow on it, or "
               "fix what it does on this batch's rows" if transform is not None and
               lost.timed_out else "check the data this batch reads (and the server's log)")
        message = (f"batch {lost.k} of epoch {lost.epoch} of dataset {s.dataset.name!r} "
                   f"{s.dataset.describe_files()}could not be made: {how}, {MAX_ATTEMPTS} "
                   f"times; the server goes on with the other batches. To fix: {fix}")
        self.log.log(logging.WARNING, "gave up", "session %s: %s", s.label, message)
        self._send(s.route, protocol.error(WorkerError.code, message, session=s.id,
                                           stream=lost.stream, epoch=lost.epoch, k0=lost.k))

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
            self._send_batch(s, job, reply)
        else:
            s.failed(task.count)
            self.ring.release(task.slot, job.holder)
            self.errors[reply.code] += 1
            self._send(s.route, protocol.error(reply.code, reply.message, session=s.id,
                                               stream=job.stream, epoch=task.epoch,
                                               k0=task.k0))
            if reply.code == DatasetError.code and s.dataset.files:
                self._check_files()  # a worker saw a held file change: act on it now

    # ------------------------------------------------------------------ the send path

    def _send_batch(self, s: Session, job: InFlight, done: tasks.Done) -> None:
        task, slot = job.task, job.task.slot
        where = dict(session=s.id, stream=s.stream, epoch=task.epoch, k0=task.k0,
                     dtypes=done.dtypes, shapes=done.shapes)
        nbytes = sum(done.nbytes)
        s.sent(len(done.shapes), nbytes)
        self.counters["batches"] += len(done.shapes)
        self.counters["bytes"] += nbytes
        views = [self.ring.view(slot, off, n) for off, n in zip(done.offsets, done.nbytes)]
        if not self.leases.may_hold(s, s.fastpath):
            self.leases.reap_sends()
            self.leases.collect_all()  # maybe some came back meanwhile
        if not self.leases.may_hold(s, s.fastpath):
            # Over the budget: a copy, so the slot is free at once and nobody waits on it.
            self.counters["copied_sends"] += 1
            frames = [zmq.Frame(bytes(view), copy=False, track=True) for view in views]
            self.ring.release(slot, job.holder)
            self._send_tracked(s, protocol.batch(buffers=frames, **where), frames, nbytes)
        elif s.fastpath:
            assert s.table is not None
            self.leases.lease(s.table, slot, job.holder)  # the byte is set before the send
            if not self._send(s.route, protocol.batch(slot=slot, offsets=done.offsets,
                                                      **where)):
                self.leases.take_back(s.table, slot)  # never went out
        else:
            # Every data frame points into the slot (zero-copy); the slot is free again once
            # ZeroMQ has released all of them.
            frames = [zmq.Frame(view, copy=False, track=True) for view in views]
            tracker = zmq.MessageTracker(*frames)
            self.leases.track(s.id, slot, job.holder, tracker)
            self._send_tracked(s, protocol.batch(buffers=frames, **where), frames, nbytes,
                               tracker)

    def _send_tracked(self, s: Session, message: list, frames: list, nbytes: int,
                      tracker: zmq.MessageTracker | None = None) -> None:
        """Send a BATCH whose data frames are tracked: its bytes count as the connection's
        unsent until ZeroMQ has handed them on."""
        if self._send(s.route, message, copy=False):
            self.sessions.sending_on(s, tracker or zmq.MessageTracker(*frames), nbytes)

    # ------------------------------------------------------------------ timers

    def _check_timers(self, now: float) -> None:
        if self.held and now - self._checked_files_at >= FILE_CHECK_PERIOD:
            self._checked_files_at = now
            self._check_files()
        self.snapshot = {**self.describe(), "session_list": session_list(self.sessions, None)}
        self.leases.collect_all()
        self.sessions.expire(now, self.config.session_timeout)
        self.supervisor.kill_stuck(now)

    def _check_files(self) -> None:
        """A dataset whose held files changed in place is served no more: its sessions get the
        reason and close, and a HELLO for it is refused with it."""
        for d in self.held:
            name = d.spec.name
            if name in self.catalog.broken:
                continue
            why = d.changed()
            if why is None:
                continue
            self.catalog.broken[name] = why
            log.error("dataset %s: %s", name, why)
            for s in self.sessions:
                if s.dataset.name == name:
                    self._send(s.route, protocol.error(DatasetError.code, why, session=s.id))
                    self.sessions.close(s, "its data changed on disk")
