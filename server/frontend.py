"""The front end: the main process's single-threaded event loop.

It owns the client-facing ROUTER socket, the workers' socketpairs, the sessions, the slot
ring's bookkeeping and the board of shared epoch orders.  Per client request it cuts the
requested batches into tasks, gives each task a free slot and a worker (and the shared order it
reads, or fills), and when the worker reports DONE sends the slot's bytes to the client as one
BATCH message whose frames point into the slot (``copy=False``) or, on the same-host fast path,
only the slot's number.  It never copies batch bytes itself.

A slot comes back to the ring when ZeroMQ's MessageTracker says the last frame pointing into it
was released, or when a fast-path client RELEASEs it, or when its holder (a dead worker, an
expired session) is gone.

Credit: a session may have at most ``prefetch`` batches queued or being gathered; a client asks
for more only as its trainer consumes.  So the ring, never a slow consumer, bounds memory.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import zmq

from batchfeed.shared import protocol
from batchfeed.shared.errors import (
    BatchfeedError,
    CreditExceeded,
    InvalidRequest,
    ProtocolError,
    ResourceError,
    UnknownSession,
)
from batchfeed.shared.plan import (
    BatchPlan,
    PlanParams,
    check_label,
    check_weights,
    column,
)
from batchfeed.shared.procs import same_process_alive
from batchfeed.shared.schema import schema_to_wire
from batchfeed.shared.version import __version__

from . import tasks
from .config import ServerConfig
from .dataset import DatasetSpec, attach_arrays
from .orders import EMPTY, FILLED, FILLING, OrderBoard
from .ring import SlotRing
from .security import ServerSecurity
from .transform import Transform
from .worker import ALIGN, WorkerHandle, WorkerSpec

log = logging.getLogger("batchfeed.server")

MAX_PREFETCH = 4096
TASKS_PER_WORKER = 2  # one running, one queued, so a worker never waits on the main loop
CLIENT_MAX_MSG = 1 << 20  # client -> server messages are small headers
DRAIN_MAX = 512
AUTO_PREFETCH_BYTES = 16 * 2**20
MAX_REPORTED = 200  # sessions listed in a REPORT (its header must stay under the size limit)
TIMER_PERIOD = 0.25


@dataclass
class Session:
    """One client's connection state: its plan, its credit and the slots it holds."""

    id: int
    route: bytes
    dataset: DatasetSpec
    plan: BatchPlan
    prefetch: int
    fastpath: bool
    name: str
    max_chunk: int
    last_seen: float
    stream: int = -1
    pending: deque = field(default_factory=deque)  # (epoch, k0, count) of the current stream
    queued: int = 0  # batches in ``pending``
    gathering: int = 0  # batches of the current stream that workers are gathering
    tasks_in_stream: int = 0
    leased: set = field(default_factory=set)  # fast-path slots the client holds
    batches_sent: int = 0
    bytes_sent: int = 0
    position: tuple = (0, 0)  # (epoch, next k) as last requested
    pid: int | None = None  # fast path: the client process, checked before reclaiming leases
    pid_start: int | None = None
    started: float = 0.0
    rate: float = 0.0  # batches/s, smoothed
    rate_mark: tuple = (0.0, 0)  # (time, batches_sent) at the last rate update

    def client_alive(self) -> bool:
        """For a same-host client: is its process still there (so it may hold views)?"""
        return self.pid is not None and self.pid_start is not None and \
            same_process_alive(self.pid, self.pid_start)

    def describe(self, now: float) -> dict:
        epoch, k = self.position
        return {
            "id": f"{self.id:x}", "name": self.name, "dataset": self.dataset.name,
            "batch_size": self.plan.params.batch_size, "rank": self.plan.params.rank,
            "world_size": self.plan.params.world_size, "epoch": epoch, "next": k,
            "batches_per_epoch": self.plan.batches_per_epoch, "rate": round(self.rate, 1),
            "credit": self.prefetch, "queued": self.queued, "gathering": self.gathering,
            "leased": len(self.leased), "fastpath": self.fastpath,
            "batches": self.batches_sent, "bytes": self.bytes_sent,
            "age_s": round(now - self.started, 1), "idle_s": round(now - self.last_seen, 1),
        }

    def new_stream(self, stream: int) -> None:
        self.stream = stream
        self.pending.clear()
        self.queued = 0
        self.gathering = 0
        self.tasks_in_stream = 0

    def next_chunk(self, available: int) -> int:
        """Batches in the next task: small at a stream's start (fast first batch), then large."""
        size = min(self.max_chunk, 1 << min(self.tasks_in_stream, 16))
        return max(1, min(size, available))


@dataclass
class InFlight:
    task: tasks.Task
    session: int
    stream: int
    worker: WorkerHandle
    order_key: tuple | None = None  # the shared order this task fills, if it does


class Frontend:
    """Runs until ``stop()``; ``close()`` shuts every socket and worker down (idempotent)."""

    def __init__(self, config: ServerConfig, datasets: dict[str, DatasetSpec], ring: SlotRing,
                 security: ServerSecurity | None = None,
                 transforms: dict[str, Transform] | None = None):
        self.config = config
        self.transforms = transforms or {}
        self.security = security
        self.datasets = datasets
        self.ring = ring
        self.sessions: dict[int, Session] = {}
        self.runnable: deque[int] = deque()  # sessions that may have pending work
        self.inflight: dict[int, InFlight] = {}
        self.orders = OrderBoard(ring.token)
        self.orders_ahead: deque[tuple[BatchPlan, tuple, int]] = deque()  # (plan, key, epoch)
        self.orders_queued: set[tuple] = set()
        self.sends: list[tuple[zmq.MessageTracker, int]] = []  # zero-copy sends holding a slot
        self.orphans: list[tuple[int | None, int | None, set]] = []  # (pid, start, slots)
        self.workers: list[WorkerHandle] = []
        self.counters: Counter[str] = Counter()
        self.worker_busy: Counter[int] = Counter()  # seconds each worker index spent on tasks
        self._columns: dict[str, tuple] = {}  # dataset -> (segments, arrays), read-only
        self._checked_fields: set = set()
        self.snapshot: dict = {}  # describe() with sessions, refreshed by the loop for readers
        # in other threads (metrics): they read this reference, never the live state
        self.errors: Counter[str] = Counter()
        self._next_task = 0
        self._stopping = False
        self._last_timer = 0.0
        self.started = time.monotonic()
        self.ctx: zmq.Context | None = None
        self.clients: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.address = config.bind

    # ------------------------------------------------------------------ lifecycle

    def start_workers(self) -> None:
        """Fork the workers.  Called before any ZeroMQ context exists in this process."""
        for i in range(self.config.n_workers):
            self.workers.append(self._spawn(i))

    def _spawn(self, index: int) -> WorkerHandle:
        spec = WorkerSpec(
            index=index,
            datasets=tuple(self.datasets.values()),
            ring_name=self.ring.name,
            ring_header=self.ring.offset(0),
            slot_bytes=self.ring.slot_bytes,
            parent_pid=os.getpid(),
            transforms=self.transforms,
        )
        handle = WorkerHandle(spec)
        handle.start()
        return handle

    def bind(self) -> None:
        self.ctx = zmq.Context()
        self.clients = self.ctx.socket(zmq.ROUTER)
        if self.security is not None:
            self.security.apply(self.ctx, self.clients)
        self.clients.linger = 0
        self.clients.router_mandatory = 1
        self.clients.maxmsgsize = CLIENT_MAX_MSG
        self.clients.sndhwm = 100_000  # credit, not the HWM, bounds what is queued per client
        self.clients.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.clients.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self.clients.bind(self.config.bind)
        self.address = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller.register(self.clients, zmq.POLLIN)
        for w in self.workers:
            self._watch(w)

    def _watch(self, w: WorkerHandle) -> None:
        self.poller.register(w.fileno(), zmq.POLLIN)
        self.poller.register(w.sentinel, zmq.POLLIN)

    def wait_workers_ready(self, timeout: float = 60.0) -> None:
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
                if w.fileno() in events:
                    self._drain_worker(w)

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        """Stop workers (STOP, join, terminate, kill), then close sockets and the context."""
        for w in self.workers:
            w.stop()
        deadline = time.monotonic() + 3.0
        for w in self.workers:
            w.finish(max(0.1, deadline - time.monotonic()))
        self.workers = []
        if self.clients is not None:
            self.clients.close(linger=0)
        self.clients = None
        self.sends.clear()
        if self.security is not None:
            self.security.close()
        self.orders.close()
        for segments, _ in self._columns.values():
            for seg in segments:
                seg.close()
        self._columns.clear()
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception:  # a bug must cost one message, not the whole server
                log.exception("internal error in the front end; continuing")
                self.errors["internal"] += 1

    def _iterate(self) -> None:
        events = dict(self.poller.poll(self._poll_timeout_ms()))  # type: ignore[arg-type]
        if self.clients in events:
            self._drain_clients()
        for w in list(self.workers):
            if w.fileno() in events:
                self._drain_worker(w)
            if w.sentinel in events and w in self.workers:
                self._on_worker_exit(w)
        self._reap_sends()
        self._dispatch()
        self._order_ahead()
        now = time.monotonic()
        if now - self._last_timer >= TIMER_PERIOD:
            self._last_timer = now
            self._check_timers(now)

    def _poll_timeout_ms(self) -> int | float:
        if self.sends:
            # Tracker completion has no file descriptor; look again soon, sooner if starved.
            return 0.2 if self.runnable and not self.ring.free_count else 2
        return 100

    def _drain_clients(self) -> None:
        assert self.clients is not None
        for _ in range(DRAIN_MAX):
            try:
                frames = self.clients.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_client(frames[0], frames[1:])

    def _drain_worker(self, w: WorkerHandle) -> None:
        messages = w.receive()
        for data in messages or ():
            self._on_worker(w, tasks.unpack(data))
        if messages is None and w in self.workers:
            self._on_worker_exit(w)  # hung up: dead, or dying

    # ------------------------------------------------------------------ clients

    def _on_client(self, route: bytes, frames: list) -> None:
        self.counters["messages"] += 1
        session_id = None
        try:
            msg = protocol.decode(frames)
            session_id = msg.header.get("session")
            handler = self._handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError(f"a server does not accept {msg.kind} messages")
            handler(self, route, msg.header)
        except BatchfeedError as exc:
            self.errors[exc.code] += 1
            log.debug("client error (%s): %s", exc.code, exc)
            session = session_id if type(session_id) is int else None
            self._send(route, protocol.error(exc.code, str(exc), session=session))

    def _send(self, route: bytes, frames: list, copy: bool = True) -> bool:
        assert self.clients is not None
        try:
            self.clients.send_multipart([route, *frames], zmq.NOBLOCK, copy=copy)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client is gone; EAGAIN: not reading
            log.debug("cannot send to client: %s", exc)
            return False

    def _on_hello(self, route: bytes, h: dict) -> None:
        params = PlanParams.from_wire(h["params"])
        dataset = self._dataset(h["dataset"])
        plan = BatchPlan(dataset.rows, params, data_key=dataset.name)
        self._check_sampling_fields(dataset, params)
        fields = self._served_fields(dataset)
        sized = fields or dataset.fields  # an undeclared transform: its input, times 4 below
        batch_bytes = params.batch_size * sum(f.row_nbytes for f in sized) + ALIGN * len(sized)
        # An undeclared transform's output size is a guess (uint8 -> float32 is 4x); workers
        # cut chunks that outgrow their slot anyway.
        chunk_batch_bytes = batch_bytes * (1 if fields else 4)
        prefetch = h["prefetch"] or auto_prefetch(batch_bytes, self.config.chunk_bytes)
        if not 1 <= prefetch <= MAX_PREFETCH:
            raise InvalidRequest(f"prefetch must be in [1, {MAX_PREFETCH}], got {prefetch}")
        if batch_bytes > self.ring.slot_bytes:
            raise InvalidRequest(
                f"one batch of {params.batch_size} rows is {batch_bytes} bytes, more than this "
                f"server's slot size ({self.ring.slot_bytes} bytes); use a smaller batch_size or "
                f"restart the server with --slot-mb {-(-batch_bytes // 2**20)} or more"
            )
        budget = min(self.ring.slot_bytes, self.config.chunk_bytes)
        now = time.monotonic()
        fastpath = h["fastpath"] and h["pid"] is not None and h["pid_start"] is not None \
            and same_process_alive(h["pid"], h["pid_start"])
        if h["fastpath"] and not fastpath:
            log.info("fast path refused: client process %s is not visible from the server",
                     h["pid"])
        session = Session(
            id=secrets.randbits(62),
            route=route,
            dataset=dataset,
            plan=plan,
            prefetch=prefetch,
            fastpath=fastpath,
            name=h["name"] or "",
            max_chunk=max(1, min(budget // chunk_batch_bytes, protocol.MAX_BATCHES_PER_MESSAGE)),
            last_seen=now,
            pid=h["pid"] if fastpath else None,
            pid_start=h["pid_start"] if fastpath else None,
            started=now,
            rate_mark=(now, 0),
        )
        old = self.sessions.get(h["resume"]) if h["resume"] is not None else None
        if old is not None and old.pid == session.pid:
            # The same client after a reconnect: the slots it still holds views of are its own.
            session.leased, old.leased = old.leased, set()
            self._close_session(old, f"resumed as {session.id:x}")
        self.sessions[session.id] = session
        self.counters["sessions"] += 1
        log.info("session %x from %s: %s on %s", session.id, session.name or "?", params,
                 dataset.name)
        self._send(route, protocol.welcome(
            session=session.id,
            dataset=dataset.name,
            rows=dataset.rows,
            batches_per_epoch=plan.batches_per_epoch,
            prefetch=prefetch,
            fields=schema_to_wire(fields),
            server=__version__,
            ring=self.ring.describe() if session.fastpath else None,
        ))

    def _on_stats(self, route: bytes, h: dict) -> None:
        self._send(route, protocol.report(self.describe(), [
            s.describe(time.monotonic()) for s in list(self.sessions.values())[:MAX_REPORTED]]))

    def describe(self) -> dict:
        """The server's counters, for ``batchfeed stats`` and the metrics endpoint."""
        busy = len(self.sends) + len(self.inflight)
        return {
            "version": __version__, "address": self.address,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "datasets": ", ".join(self.datasets), "workers": len(self.workers),
            "worker_pids": [w.process.pid or 0 for w in self.workers],
            "slots": self.ring.n_slots, "slot_bytes": self.ring.slot_bytes,
            "slots_free": self.ring.free_count,
            "slots_busy": busy, "slots_leased": sum(len(s.leased) for s in self.sessions.values())
            + sum(len(o[2]) for o in self.orphans),
            "sessions": len(self.sessions),
            "counters": dict(self.counters), "errors": dict(self.errors),
            "worker_busy_s": {str(i): round(v, 3) for i, v in self.worker_busy.items()},
        }

    def _served_fields(self, dataset: DatasetSpec) -> tuple:
        """What clients receive: the dataset's fields, a transform's declared output, or ()
        when a transform declares nothing (clients then learn it from the first batch)."""
        transform = self.transforms.get(dataset.name)
        if transform is None:
            return dataset.fields
        return transform.schema or ()

    def _check_sampling_fields(self, dataset: DatasetSpec, params: PlanParams) -> None:
        """Balanced and weighted sampling read a field: check it once per dataset and field."""
        for name, check in ((params.label, check_label), (params.weights, check_weights)):
            if name is None or (dataset.name, name, check) in self._checked_fields:
                continue
            if dataset.name not in self._columns:
                self._columns[dataset.name] = attach_arrays(dataset)
            check(column(self._columns[dataset.name][1], name), name)
            self._checked_fields.add((dataset.name, name, check))

    def _dataset(self, name: str | None) -> DatasetSpec:
        if name is None:
            if len(self.datasets) == 1:
                return next(iter(self.datasets.values()))
            raise InvalidRequest(
                f"this server serves several datasets ({', '.join(self.datasets)}); "
                "pick one with Client(..., dataset=NAME)"
            )
        try:
            return self.datasets[name]
        except KeyError:
            raise InvalidRequest(
                f"unknown dataset {name!r}; this server serves: {', '.join(self.datasets)}"
            ) from None

    def _session(self, session_id: int, route: bytes) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise UnknownSession(
                f"session {session_id:x} is unknown to this server (it restarted, or the session "
                "expired); the client reconnects with a new session"
            )
        s.route = route
        s.last_seen = time.monotonic()
        return s

    def _on_request(self, route: bytes, h: dict) -> None:
        s = self._session(h["session"], route)
        stream, epoch, k0, count = h["stream"], h["epoch"], h["k0"], h["count"]
        if h["release"]:
            self._release_leases(s, h["release"])
        if stream < s.stream:
            return  # a late request of a stream the client has already left
        if stream > s.stream:
            s.new_stream(stream)
        bpe = s.plan.batches_per_epoch
        if epoch < 0 or count < 1 or k0 < 0 or k0 + count > bpe:
            raise InvalidRequest(
                f"request for epoch {epoch}, batches {k0}..{k0 + count - 1} is out of range: "
                f"an epoch has {bpe} batches (0..{bpe - 1})"
            )
        if s.queued + s.gathering + count > s.prefetch:
            raise CreditExceeded(
                f"request for {count} more batches exceeds the session's prefetch of "
                f"{s.prefetch} ({s.queued + s.gathering} already queued)"
            )
        s.pending.append((epoch, k0, count))
        s.queued += count
        s.position = (epoch, k0 + count)
        self.runnable.append(s.id)

    def _on_release(self, route: bytes, h: dict) -> None:
        self._release_leases(self._session(h["session"], route), h["slots"])

    def _release_leases(self, s: Session, slots: list) -> None:
        protocol.check_int_list(slots, "released slots", high=self.ring.n_slots - 1,
                                max_len=protocol.MAX_RELEASE)
        for slot in slots:
            if slot in s.leased:  # only the holder may give a slot back, and only once
                s.leased.discard(slot)
                self.ring.release(slot)

    def _on_ping(self, route: bytes, h: dict) -> None:
        if h["session"] is not None:
            self._session(h["session"], route)
        self._send(route, protocol.pong())

    def _on_bye(self, route: bytes, h: dict) -> None:
        s = self.sessions.get(h["session"])
        if s is None:
            return
        held = set(protocol.check_int_list(h["held"] or [], "held slots",
                                           high=self.ring.n_slots - 1)) & s.leased
        if held and s.client_alive():
            # Views the trainer kept past close(): their slots wait for the process to exit.
            self.orphans.append((s.pid, s.pid_start, held))
            s.leased -= held
        self._close_session(s, "said bye")

    _handlers = {
        protocol.HELLO: _on_hello,
        protocol.REQUEST: _on_request,
        protocol.RELEASE: _on_release,
        protocol.PING: _on_ping,
        protocol.BYE: _on_bye,
        protocol.STATS: _on_stats,
    }

    def _close_session(self, s: Session, why: str) -> None:
        """Forget a session and reclaim its slots; its in-flight tasks are dropped on arrival."""
        log.info("session %x closed: %s", s.id, why)
        for slot in s.leased:
            self.ring.release(slot)
        s.leased.clear()
        s.pending.clear()
        self.sessions.pop(s.id, None)

    # ------------------------------------------------------------------ scheduling

    def _dispatch(self) -> None:
        waiting: set[int] = set()  # sessions whose next task waits for an order being filled
        while self.runnable and self.ring.free_count:
            s = self.sessions.get(self.runnable[0])
            if s is None or not s.pending:
                self.runnable.popleft()
                continue
            if s.id in waiting:
                if waiting.issuperset(self.runnable):
                    return
                self.runnable.rotate(-1)
                continue
            worker = self._idle_worker()
            if worker is None:
                return
            epoch, k0, count = s.pending[0]
            placed = self._place_order(s, epoch, worker)
            if placed is None:
                waiting.add(s.id)
                self.runnable.rotate(-1)
                continue
            worker, order, fill = placed
            self.runnable.rotate(-1)  # round robin between sessions
            take = s.next_chunk(count)
            slot = self.ring.acquire()
            assert slot is not None
            task = tasks.Task(self._next_task + 1, s.dataset.name, s.plan.params.to_wire(),
                              epoch, k0, take, slot, order, fill)
            if not worker.send(tasks.task_message(task)):
                # Just died (its exit is handled when its channel or sentinel says so).
                self.ring.release(slot)
                worker.ready = False
                if fill:
                    self.orders.finished(s.plan.order_key(epoch), ok=False)
                continue
            self._next_task += 1
            if take == count:
                s.pending.popleft()
            else:
                s.pending[0] = (epoch, k0 + take, count - take)
            s.queued -= take
            s.gathering += take
            s.tasks_in_stream += 1
            self.inflight[task.id] = InFlight(task, s.id, s.stream, worker,
                                              s.plan.order_key(epoch) if fill else None)
            if not worker.tasks:
                worker.progress_at = time.monotonic()
            worker.tasks[task.id] = time.monotonic()
            if s.pending:
                self.runnable.append(s.id)

    def _plan_ahead(self, s: Session, epoch: int) -> None:
        """Epoch orders are predictable: queue the next one as soon as this one is in use."""
        key = s.plan.order_key(epoch)
        if key not in self.orders_queued and not self.orders.has(key):
            self.orders_queued.add(key)
            self.orders_ahead.append((s.plan, key, epoch))

    def _order_ahead(self) -> None:
        """Give an idle worker the next epoch's order to compute, before anyone asks for it."""
        while self.orders_ahead:
            worker = next((w for w in self.workers if w.ready and not w.tasks), None)
            if worker is None:
                return
            plan, key, epoch = self.orders_ahead.popleft()
            self.orders_queued.discard(key)
            entry = self.orders.entry(key, plan)
            if entry is None or entry.state != EMPTY:
                continue
            params, dataset = plan.params.to_wire(), plan.data_key
            self._next_task += 1
            message = tasks.pack(tasks.ORDER, id=self._next_task, dataset=dataset,
                                 params=params, epoch=epoch, order=entry.segment.name)
            if not worker.send(message):
                worker.ready = False
                continue
            entry.state, entry.filler = FILLING, worker.index
            worker.ordering[self._next_task] = key
            worker.tasks[self._next_task] = worker.progress_at = time.monotonic()

    def _place_order(self, s: Session, epoch: int,
                     worker: WorkerHandle) -> tuple[WorkerHandle, str | None, bool] | None:
        """Which worker takes the session's next task, and the shared order it reads (or
        fills); None when the order is being filled by a worker that has no room yet."""
        params = s.plan.params
        if params.shuffle == "none" and params.sampling == "uniform":
            return worker, None, False  # the dataset order: nothing to compute or share
        entry = self.orders.entry(s.plan.order_key(epoch), s.plan)
        if entry is None:
            return worker, None, False
        self._plan_ahead(s, epoch + 1)
        if entry.state == FILLED:
            return worker, entry.segment.name, False
        if entry.state == EMPTY:
            entry.state, entry.filler = FILLING, worker.index
            return worker, entry.segment.name, True
        filler = next((w for w in self.workers if w.index == entry.filler), None)
        if filler is not None and filler.ready and len(filler.tasks) < TASKS_PER_WORKER:
            return filler, entry.segment.name, False  # queued behind the fill
        return None

    def _idle_worker(self) -> WorkerHandle | None:
        best = None
        for w in self.workers:
            if w.ready and len(w.tasks) < TASKS_PER_WORKER and (
                    best is None or len(w.tasks) < len(best.tasks)):
                best = w
        return best

    # ------------------------------------------------------------------ workers

    def _on_worker(self, worker: WorkerHandle, body: dict) -> None:
        kind = body.get("kind")
        if kind == tasks.READY:
            worker.ready = True
            return
        if kind == tasks.ORDERED:
            key = worker.ordering.pop(body["id"], None)
            worker.tasks.pop(body["id"], None)
            worker.progress_at = time.monotonic()
            if key is not None:
                self.orders.finished(key, ok=body["ok"])
                self.counters["orders_computed"] += bool(body["ok"])
            return
        job = self.inflight.get(body.get("id", -1))
        if job is None or job.worker is not worker:
            return  # a task already given to another worker
        del self.inflight[job.task.id]
        worker.tasks.pop(job.task.id, None)
        if job.order_key is not None:
            self.orders.finished(job.order_key, ok=kind == tasks.DONE)
            self.counters["orders_computed"] += kind == tasks.DONE
        worker.progress_at = time.monotonic()
        self.worker_busy[worker.index] += body.get("busy", 0.0)
        s = self.sessions.get(job.session)
        if s is None or job.stream != s.stream:
            self.ring.release(job.task.slot)
            return
        s.gathering -= job.task.count
        if kind == tasks.DONE:
            done = len(body["shapes"])
            if done < job.task.count:  # a transform's output outgrew the slot: the rest again
                t = job.task
                self.counters["chunks_cut"] += 1
                s.max_chunk = max(1, done)
                s.queued += t.count - done
                s.pending.appendleft((t.epoch, t.k0 + done, t.count - done))
                self.runnable.appendleft(s.id)
            self._send_batch(s, job.task, body, done)
        else:
            self.ring.release(job.task.slot)
            self.errors[body["code"]] += 1
            self._send(s.route, protocol.error(body["code"], body["message"], session=s.id,
                                               stream=job.stream, epoch=job.task.epoch,
                                               k0=job.task.k0))

    def _send_batch(self, s: Session, task: tasks.Task, done: dict, count: int) -> None:
        slot = task.slot
        nbytes = done["nbytes"]
        where = dict(session=s.id, stream=s.stream, epoch=task.epoch, k0=task.k0,
                     dtypes=done["dtypes"], shapes=done["shapes"])
        s.batches_sent += count
        s.bytes_sent += sum(nbytes)
        self.counters["batches"] += count
        self.counters["bytes"] += sum(nbytes)
        if s.fastpath and len(s.leased) < self.ring.n_slots // 2:
            if self._send(s.route, protocol.batch(slot=slot, offsets=done["offsets"], **where)):
                s.leased.add(slot)
            else:
                self.ring.release(slot)
            return
        # Every data frame points into the slot (zero-copy, even small ones: this process never
        # copies batch bytes); the slot is free again once ZeroMQ has released all of them.
        frames = [zmq.Frame(self.ring.view(slot, off, n), copy=False, track=True)
                  for off, n in zip(done["offsets"], nbytes)]
        self._send(s.route, protocol.batch(buffers=frames, **where), copy=False)
        self.sends.append((zmq.MessageTracker(*frames), slot))

    def _reap_sends(self) -> None:
        if not self.sends:
            return
        still = []
        for tracker, slot in self.sends:
            if tracker.done:
                self.ring.release(slot)
            else:
                still.append((tracker, slot))
        self.sends = still

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        """A worker died: re-queue its tasks, give their slots back, start a replacement."""
        if self._stopping:
            return
        code = worker.process.exitcode
        log.warning("worker %d (pid %s) exited with code %s; restarting it", worker.index,
                    worker.process.pid, code)
        self.counters["worker_restarts"] += 1
        self.orders.worker_died(worker.index)
        for task_id in list(worker.tasks):
            job = self.inflight.pop(task_id, None)
            if job is None:
                continue
            self.ring.release(job.task.slot)  # safe: its writer is dead
            s = self.sessions.get(job.session)
            if s is not None and job.stream == s.stream:
                s.gathering -= job.task.count
                s.queued += job.task.count
                s.pending.appendleft((job.task.epoch, job.task.k0, job.task.count))
                self.runnable.appendleft(s.id)
        self.poller.unregister(worker.sentinel)
        self.poller.unregister(worker.fileno())
        if worker.alive():
            worker.process.kill()  # it hung up on us; make sure it is gone
        worker.finish(1.0)
        replacement = self._spawn(worker.index)
        self.workers[self.workers.index(worker)] = replacement
        self._watch(replacement)

    # ------------------------------------------------------------------ timers

    def _check_timers(self, now: float) -> None:
        self.snapshot = {**self.describe(),
                         "session_list": [s.describe(now) for s in self.sessions.values()]}
        for orphan in list(self.orphans):
            pid, started, slots = orphan
            if pid is None or started is None or not same_process_alive(pid, started):
                self.orphans.remove(orphan)
                for slot in slots:
                    self.ring.release(slot)
        for s in list(self.sessions.values()):
            mark_t, mark_n = s.rate_mark
            if now - mark_t >= 1.0:
                s.rate = 0.5 * s.rate + 0.5 * (s.batches_sent - mark_n) / (now - mark_t)
                s.rate_mark = (now, s.batches_sent)
            if now - s.last_seen > self.config.session_timeout:
                if s.leased and s.client_alive():
                    # Stalled, not dead: it may still hold views of its slots.  Keep them.
                    s.pending.clear()
                    s.queued = 0
                    continue
                self._close_session(s, f"silent for {self.config.session_timeout:g} s")
        for w in self.workers:
            if w.tasks and now - w.progress_at > self.config.task_timeout:
                log.warning("worker %d made no progress for %.0f s; killing it", w.index,
                            self.config.task_timeout)
                self.counters["worker_timeouts"] += 1
                w.process.kill()  # its sentinel fires and _on_worker_exit re-queues the tasks


def auto_prefetch(batch_bytes: int, chunk_bytes: int) -> int:
    """The default prefetch: 16 MiB of batches, or three messages' worth if more (so that
    several are on their way at once), between 8 and 512 batches."""
    window = max(AUTO_PREFETCH_BYTES, 3 * chunk_bytes)
    return max(8, min(512, window // batch_bytes))


