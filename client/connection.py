"""The client's I/O thread: the only user of the client's ZeroMQ socket.

It says HELLO, keeps the trainer's prefetch window full with REQUESTs (credit: never more than
``prefetch`` batches requested and not yet consumed), receives BATCH messages, puts their
batches back in plan order (workers finish out of order), drops duplicates, and hands lists of
in-order batches to the trainer through the stream's queue.  Batches are zero-copy views over
the received frames, or over the server's ring on the same-host fast path.

Liveness: it PINGs every second; if the server stays silent for ``heartbeat_timeout`` it opens
a fresh socket, says HELLO again (with backoff) and re-requests every batch not yet delivered,
so a server restart costs the trainer a delay, not data.  Past ``reconnect_timeout`` the trainer
gets ServerUnavailable.

The trainer talks to this thread through a command deque and a wake-up pipe; ``close`` sends
BYE, closes the socket and joins the thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from batchfeed.shared import protocol
from batchfeed.shared import procs
from batchfeed.shared.errors import (
    AuthenticationError,
    BatchfeedError,
    ProtocolError,
    ServerUnavailable,
    UnknownSession,
    error_from_code,
)
from batchfeed.shared.plan import PlanParams
from batchfeed.shared.schema import Field, schema_from_wire
from batchfeed.shared.version import __version__

from .fastpath import RingMap

log = logging.getLogger("batchfeed.client")

PING_INTERVAL = 1.0
HELLO_RETRY_MAX = 4.0

_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: (
        "it does not accept this client's CURVE key; add the client's public key file to the "
        "server's --authorized-keys directory"),
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: (
        "the security handshake failed: the server public key given to the client is not the "
        "server's, or the server does not use CURVE"),
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: (
        "the security handshake failed: the server public key given to the client is not the "
        "server's, or the server does not use CURVE"),
}
_WATCHED_EVENTS = zmq.EVENT_DISCONNECTED | sum(_HANDSHAKE_FAILURES)


@dataclass(frozen=True)
class ClientConfig:
    """Validated client settings (the plan parameters plus how to talk to the server)."""

    address: str
    params: PlanParams
    prefetch: int
    dataset: str | None
    fastpath: bool
    connect_timeout: float
    reconnect_timeout: float
    heartbeat_timeout: float
    name: str
    curve: tuple[bytes, bytes, bytes] | None = None  # (public, secret, server public)


@dataclass(frozen=True)
class Welcome:
    session: int
    dataset: str
    rows: int
    batches_per_epoch: int
    fields: tuple[Field, ...]
    server_version: str


class Stream:
    """One pass over batches ``start .. end-1`` of an epoch, shared with the trainer thread.

    The trainer reads ``ready`` and writes ``consumed``; everything else is the I/O thread's.
    """

    def __init__(self, stream_id: int, epoch: int, start: int, end: int):
        self.id = stream_id
        self.epoch = epoch
        self.start = start
        self.end = end
        self.ready: queue.SimpleQueue = queue.SimpleQueue()  # lists of (batch, nbytes) or errors
        self.consumed = start  # next batch the trainer will be handed (trainer writes)
        self.requested = start  # first batch not yet requested
        self.next_deliver = start  # first batch not yet handed to ``ready``
        self.received: dict[int, tuple[dict, int]] = {}  # out-of-order arrivals
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.next_deliver >= self.end


class Connection:
    """Owns the I/O thread and its socket."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.prefetch = config.prefetch  # 0 until the server chose one (see WELCOME)
        self.unit = 1  # request when this much credit is free
        self.welcome: Welcome | None = None
        self.seen_fields: tuple[Field, ...] = ()  # from the first batch (for transforms)
        self.fatal: BaseException | None = None
        self._welcomed = threading.Event()
        self._commands: deque[tuple[str, Any]] = deque()
        # Fast-path slots, keyed by the ring they belong to: those whose views are all gone
        # (to RELEASE), and those still in use (named in BYE so the server keeps them).
        self._released: deque[tuple[str, int]] = deque()
        self._live_leases: set[tuple[str, int]] = set()
        self._previous_session: int | None = None
        self._monitor: zmq.Socket | None = None
        self._handshake_error: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stream: Stream | None = None
        self._next_stream = 0
        self._ring: RingMap | None = None
        self._session: int | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="batchfeed-io", daemon=True)
        # I/O-thread state
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._lost_since: float | None = None
        self._hello_at = 0.0
        self._hello_wait = 0.25

    # ------------------------------------------------------------------ trainer side

    def start(self) -> Welcome:
        self._thread.start()
        if not self._welcomed.wait(self.config.connect_timeout):
            self.close()
            raise ServerUnavailable(
                f"no batchfeed server answered at {self.config.address} within "
                f"{self.config.connect_timeout:g} s; start one there with `batchfeed serve "
                f"--bind {self.config.address}`, or check the address and the firewall"
            )
        if self.fatal is not None:
            self.close()
            raise self.fatal
        assert self.welcome is not None
        return self.welcome

    def start_stream(self, epoch: int, start: int, end: int) -> Stream:
        self._next_stream += 1
        stream = Stream(self._next_stream, epoch, start, end)
        self._commands.append(("stream", stream))
        self.poke()
        return stream

    def cancel(self, stream: Stream) -> None:
        self._commands.append(("cancel", stream))
        self.poke()

    def next_items(self, stream: Stream) -> list:
        """Block until the next in-order batches arrive; raise what went wrong otherwise."""
        while True:
            try:
                item = stream.ready.get(timeout=0.25)
            except queue.Empty:
                if self.fatal is not None:
                    raise self.fatal
                if not self._thread.is_alive():
                    raise ServerUnavailable("the client's I/O thread has stopped (closed?)")
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._commands.append(("close", None))
        self.poke()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        self._ctx = zmq.Context()
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            self._open_socket(poller)
            self._say_hello()
            while True:
                events = dict(poller.poll(100))
                if self._wake_r in events:
                    self._drain_wake()
                if not self._run_commands():
                    return
                if self._monitor is not None and self._monitor in events:
                    self._on_monitor()
                if self._sock in events:
                    self._drain_socket()
                self._request_more()
                self._keep_alive(poller)
        except BaseException as exc:  # hand every failure to the trainer, never die silently
            log.debug("I/O thread failed", exc_info=True)
            self._fail(exc)
        finally:
            self._shutdown()

    def _open_socket(self, poller: zmq.Poller) -> None:
        assert self._ctx is not None
        self._close_socket(poller)
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvhwm = 0  # credit bounds what the server sends
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if self.config.curve is not None:
            public, secret, server = self.config.curve
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
        self._monitor = sock.get_monitor_socket(_WATCHED_EVENTS)
        sock.connect(self.config.address)
        poller.register(sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        self._sock = sock

    def _close_socket(self, poller: zmq.Poller | None) -> None:
        if self._sock is None:
            return
        if poller is not None:
            poller.unregister(self._sock)
            if self._monitor is not None:
                poller.unregister(self._monitor)
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._sock.close(linger=0)
        self._sock = None

    def _on_monitor(self) -> None:
        """Connection events: a lost connection (reconnect now), or a refused handshake."""
        assert self._monitor is not None
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_DISCONNECTED and self._session is not None:
                log.info("connection to %s lost; reconnecting", self.config.address)
                self._reconnect()
            elif kind in _HANDSHAKE_FAILURES:
                self._handshake_error = _HANDSHAKE_FAILURES[kind]
                if kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH and self.config.curve is None:
                    self._handshake_error = (
                        "it requires CURVE encryption; pass curve=(client_secret_key_file, "
                        "server_public_key_file) to Client (batchfeed keygen makes the keys)")
                if self._session is None:
                    raise AuthenticationError(
                        f"the server at {self.config.address} refused the connection: "
                        f"{self._handshake_error}"
                    )

    def _send(self, frames: list) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
            self._last_sent = time.monotonic()
        except zmq.Again:
            pass  # not connected yet; liveness handling re-sends what matters

    def _say_hello(self) -> None:
        cfg = self.config
        pid = os.getpid() if cfg.fastpath else None
        self._send(protocol.hello(cfg.params.to_wire(), client=__version__, dataset=cfg.dataset,
                                  prefetch=cfg.prefetch, fastpath=cfg.fastpath, name=cfg.name,
                                  pid=pid, pid_start=procs.start_time() if pid else None,
                                  resume=self._previous_session))
        self._hello_at = time.monotonic()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_commands(self) -> bool:
        while self._commands:
            cmd, arg = self._commands.popleft()
            if cmd == "close":
                return False
            if cmd == "stream":
                if self._stream is not None:
                    self._stream.cancelled = True
                self._stream = arg
            elif cmd == "cancel" and arg is self._stream:
                arg.cancelled = True
                self._stream = None
        return True

    def _drain_socket(self) -> None:
        assert self._sock is not None
        for _ in range(256):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            self._on_message(protocol.decode(frames))

    def _on_message(self, msg: protocol.Message) -> None:
        h = msg.header
        if msg.kind == protocol.BATCH:
            self._on_batch(h, msg.buffers)
        elif msg.kind == protocol.WELCOME:
            self._on_welcome(h)
        elif msg.kind == protocol.ERROR:
            self._on_error(h)
        elif msg.kind != protocol.PONG:
            raise ProtocolError(f"a client does not accept {msg.kind} messages")

    def _on_welcome(self, h: dict) -> None:
        if self._session is not None:
            if h["session"] != self._session:  # a late answer to a repeated HELLO
                self._send(protocol.bye(h["session"]))
            return
        welcome = Welcome(h["session"], h["dataset"], h["rows"], h["batches_per_epoch"],
                          schema_from_wire(h["fields"]) if h["fields"] else (), h["server"])
        old = self.welcome
        if old is not None and (old.rows, old.batches_per_epoch, old.fields) != (
                welcome.rows, welcome.batches_per_epoch, welcome.fields):
            raise ServerUnavailable(
                f"the server at {self.config.address} came back with a different dataset "
                f"({old.rows} rows before, {welcome.rows} now); the epoch cannot be continued"
            )
        ring = self._ring
        self._ring = None
        if h["ring"] is not None:
            try:
                self._ring = ring if ring is not None and ring.same(h["ring"]) \
                    else RingMap(h["ring"])
            except (OSError, ProtocolError) as exc:
                # Not on the server's host after all: ask again for a normal session.
                log.info("fast path unavailable (%s); using the socket", exc)
                self._send(protocol.bye(welcome.session))
                self.config = replace(self.config, fastpath=False)
                self._say_hello()
                return
        self._session = welcome.session
        self._previous_session = None
        self._handshake_error = None
        self.welcome = welcome
        self.prefetch = h["prefetch"]
        self.unit = max(1, self.prefetch // 4)
        self._lost_since = None
        self._hello_wait = 0.25
        stream = self._stream
        if stream is not None and not stream.cancelled:
            stream.requested = stream.next_deliver  # re-request all that has not arrived
        self._welcomed.set()

    def _on_error(self, h: dict) -> None:
        err = error_from_code(h["code"], h["message"])
        if isinstance(err, UnknownSession):
            if self._session is not None and h.get("session") == self._session:
                self._reconnect()
            return
        if self._session is None:
            raise err  # the server refused our HELLO: fatal, whether first contact or not
        stream = self._stream
        if h.get("session") not in (None, self._session):
            return  # about a session we have left
        if stream is None or h.get("stream") not in (None, stream.id):
            return
        k0 = h.get("k0")
        if k0 is not None and k0 >= stream.next_deliver:
            stream.received.setdefault(k0, (err, 0))  # raised when the trainer gets there
            self._deliver(stream)
        else:
            stream.ready.put(err)

    def _on_batch(self, h: dict, buffers: list) -> None:
        stream = self._stream
        slot = h["slot"]
        current = (stream is not None and h["session"] == self._session
                   and h["stream"] == stream.id and h["epoch"] == stream.epoch)
        if not current:
            if slot is not None and h["session"] == self._session and self._ring is not None:
                self._released.append((self._ring.key, slot))
            return
        assert stream is not None
        layout = protocol.chunk_layout(h)
        k0 = h["k0"]
        if k0 < stream.start or k0 + layout.count > stream.end:
            raise ProtocolError(f"server sent batches {k0}..{k0 + layout.count - 1}, outside "
                                f"the requested range {stream.start}..{stream.end - 1}")
        if slot is not None:
            if self._ring is None:
                raise ProtocolError("server sent a ring slot to a client without the fast path")
            lease = (self._ring.key, slot)
            self._live_leases.add(lease)
            buffers = self._ring.lease(slot, protocol.check_int_list(h["offsets"], "offsets"),
                                       layout, lambda: self._lease_freed(lease))
        batches = protocol.field_views(layout, buffers)
        if not self.seen_fields:
            self.seen_fields = tuple(Field(name, dtype, tuple(shape[1:])) for name, dtype, shape
                                     in zip(layout.names, layout.dtypes, layout.shapes[0]))
        for b, batch in enumerate(batches):
            k = k0 + b
            if k >= stream.next_deliver and k not in stream.received:
                nbytes = sum(layout.nbytes[f][b] for f in range(len(layout.names)))
                stream.received[k] = (batch, nbytes)
        del batches, buffers
        self._deliver(stream)

    def _deliver(self, stream: Stream) -> None:
        """Hand the trainer every batch that is next in plan order (an error in its place
        stops the stream there: the trainer gets it when it reaches that batch)."""
        out = []
        while stream.next_deliver in stream.received:
            item = stream.received.pop(stream.next_deliver)
            if isinstance(item[0], BaseException):
                if out:
                    stream.ready.put(out)
                stream.ready.put(item[0])
                stream.next_deliver = stream.end  # nothing after it is delivered
                return
            out.append(item)
            stream.next_deliver += 1
        if out:
            stream.ready.put(out)

    def _lease_freed(self, lease: tuple[str, int]) -> None:
        """Runs in whichever thread drops the last view of a fast-path batch."""
        self._live_leases.discard(lease)
        self._released.append(lease)
        self.poke()

    def _request_more(self) -> None:
        stream, session = self._stream, self._session
        if session is None:
            return
        release = self._take_releases()
        if stream is not None and not stream.cancelled:
            room = self.prefetch - (stream.requested - stream.consumed)
            remaining = stream.end - stream.requested
            if remaining > 0 and room >= min(self.unit, remaining):
                count = min(room, remaining)
                self._send(protocol.request(session=session, stream=stream.id,
                                            epoch=stream.epoch, k0=stream.requested,
                                            count=count, release=release or None))
                stream.requested += count
                return
        if release:
            self._send(protocol.release(session=session, slots=release))

    def _take_releases(self) -> list[int]:
        out: list[int] = []
        ring = self._ring.key if self._ring is not None else None
        while self._released and len(out) < protocol.MAX_RELEASE:
            owner, slot = self._released.popleft()
            if owner == ring:  # slots of a former server's ring mean nothing to this one
                out.append(slot)
        return out

    def _keep_alive(self, poller: zmq.Poller) -> None:
        now = time.monotonic()
        if self._session is None:
            # First contact: the constructor's connect_timeout applies; the queued HELLO goes
            # out when the socket connects.  After losing the server: retry with backoff.
            if self._lost_since is not None:
                if now - self._lost_since > self.config.reconnect_timeout:
                    raise ServerUnavailable(
                        f"lost the batchfeed server at {self.config.address} and it did not "
                        f"come back within reconnect_timeout={self.config.reconnect_timeout:g} s"
                    )
                if now - self._hello_at > self._hello_wait:
                    self._hello_wait = min(self._hello_wait * 2, HELLO_RETRY_MAX)
                    self._say_hello()
            return
        if now - self._last_sent > PING_INTERVAL:
            self._send(protocol.ping(self._session))
        if now - self._last_heard > self.config.heartbeat_timeout:
            log.warning("no word from %s for %.1f s; reconnecting", self.config.address,
                        now - self._last_heard)
            self._open_socket(poller)  # a fresh connection, without stale queued messages
            self._reconnect()

    def _reconnect(self) -> None:
        """Start over with a new session; ``_on_welcome`` re-requests what has not arrived."""
        if self._session is not None:
            self._previous_session = self._session
        self._session = None
        self._lost_since = time.monotonic()
        self._last_heard = self._lost_since
        self._say_hello()

    def _fail(self, exc: BaseException) -> None:
        if not isinstance(exc, BatchfeedError):
            exc = BatchfeedError(f"the client's I/O thread failed: {type(exc).__name__}: {exc}")
        self.fatal = exc
        if self._stream is not None:
            self._stream.ready.put(exc)
        self._welcomed.set()

    def _shutdown(self) -> None:
        if self._sock is not None:
            if self._session is not None:
                ring = self._ring.key if self._ring is not None else None
                held = [slot for key, slot in list(self._live_leases) if key == ring]
                try:
                    self._sock.send_multipart(protocol.bye(self._session, held or None),
                                              zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                time.sleep(0.05)  # let the io thread flush BYE before the socket goes
            self._close_socket(None)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

