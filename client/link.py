"""A link: the client's connection to one server, owned by the client's I/O thread.

A link owns one DEALER socket and its monitor, the session the server gave it (and the secret
that resumes it), the server's fast-path ring and the session's lease book if it has the fast
path, and its liveness: it says HELLO (again, with backoff, after a loss, naming the session to
resume and its secret), PINGs every second, and declares itself *lost* when the connection
drops or the server stays silent for ``heartbeat_timeout``.  What a loss means for the batches
it was asked for is the stream window's business.

The fast path: a WELCOME that offers it names the ring and a challenge; the link maps the ring
(which only a process on the server's host can), signs the challenge with the ring's key
(CLAIM), and opens the lease table the server then names in GRANT.  If either cannot be opened
the session simply stays on the socket.  ``bye`` says
goodbye and ``finish_bye`` reads what the server still sends until it acknowledges, giving back
the slots of batches nobody will read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from batchfeed.shared import protocol
from batchfeed.shared.errors import AuthenticationError, ProtocolError
from batchfeed.shared.fingerprint import Fingerprint
from batchfeed.shared.plan import PlanParams
from batchfeed.shared.schema import Field, schema_from_wire
from batchfeed.shared.version import __version__

from .fastpath import LeaseBook, RingMap

log = logging.getLogger("batchfeed.client")

PING_INTERVAL = 1.0
AT_INTERVAL = 0.5  # how often, at most, a PING tells where the trainer is (for stats)
HELLO_RETRY_MAX = 4.0

_HANDSHAKE_FAILURES: dict[int, str] = {
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
class LinkConfig:
    """How to talk to the servers (the same for every link of a client)."""

    params: PlanParams
    prefetch: int  # 0: let the server choose
    dataset: str | None
    heartbeat_timeout: float
    name: str
    curve: tuple[bytes, bytes, bytes] | None  # (public, secret, server public)


@dataclass(frozen=True)
class Welcome:
    session: int
    dataset: str
    rows: int
    batches_per_epoch: int
    prefetch: int
    fields: tuple[Field, ...]
    server_version: str
    units: int | None = None  # packed rows or token-budget batches per epoch
    shard: tuple[int, int] | None = None  # (I, N): the server holds shard I of N
    classes: tuple[str, ...] = ()  # the label's class names, if the server knows them
    fingerprint: Fingerprint | None = None  # the data's identity
    transform: str | None = None  # the server-side transform every batch goes through

    @classmethod
    def from_header(cls, h: dict) -> Welcome:
        shard = h["shard"]
        if shard is not None and not (len(shard) == 2 and all(type(v) is int for v in shard)
                                      and 0 <= shard[0] < shard[1]):
            raise ProtocolError(f"the server's shard {shard!r:.40} is not [I, N]")
        classes = h["classes"] or []
        if not all(isinstance(c, str) for c in classes):
            raise ProtocolError("the server's class names are not strings")
        fingerprint = Fingerprint.from_wire(h["fingerprint"]) if h["fingerprint"] else None
        return cls(h["session"], h["dataset"], h["rows"], h["batches_per_epoch"], h["prefetch"],
                   schema_from_wire(h["fields"]) if h["fields"] else (), h["server"],
                   h["units"], tuple(shard) if shard is not None else None, tuple(classes),
                   fingerprint, h["transform"])

    def differs(self, other: Welcome) -> str | None:
        """What makes this server's batches other than ``other``'s, or None: another
        fingerprint, transform, size or schema (the dataset's name may differ between
        servers, and the fields of an undeclared transform are not known yet)."""
        mine, theirs = self.fingerprint, other.fingerprint
        if (mine is None) != (theirs is None) or (
                mine is not None and theirs is not None and not mine.agrees(theirs)):
            unknown = "" if mine is None or theirs is None or mine.comparable(theirs) else (
                " (one computed only a full digest and the other only a sampled one: start "
                "them with the same --fingerprint mode)")
            return f"dataset fingerprint {mine} where the other has {theirs}{unknown}"
        if self.transform != other.transform:
            return f"transform {self.transform} where the other has {other.transform}"
        if (self.rows, self.batches_per_epoch) != (other.rows, other.batches_per_epoch):
            return (f"{self.rows} rows and {self.batches_per_epoch} batches per epoch where "
                    f"the other has {other.rows} and {other.batches_per_epoch}")
        if self.fields and other.fields and self.fields != other.fields:
            return "other fields than the other"
        return None


class Link:
    def __init__(self, address: str, fastpath: bool, config: LinkConfig, ctx: zmq.Context,
                 poller: zmq.Poller):
        self.address = address
        self.fastpath = fastpath
        self.config = config
        self._ctx = ctx
        self._poller = poller
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.session: int | None = None
        self.welcome: Welcome | None = None
        self.secret: str | None = None
        self.ring: RingMap | None = None
        self.books: dict[int, LeaseBook] = {}  # by session: the current one's, and the last
        self.lane = 0  # which shard it serves (0 for a server of the whole dataset)
        self.handshake_error: str | None = None
        self.lost_since: float | None = None
        self.bye_acked = True
        self._last_session: int | None = None  # whose book is kept for late batches
        self._previous_session: int | None = None
        self._previous_secret: str | None = None
        self._hello_at = 0.0
        self._hello_wait = 0.25
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._told_at: list | None = None  # the trainer's position the server was last told
        self._told_at_time = 0.0

    @property
    def up(self) -> bool:
        return self.session is not None

    @property
    def in_place(self) -> bool:
        """Whether this session reads batches in the server's shared memory (the fast path)."""
        return self.session is not None and self.session in self.books

    # ------------------------------------------------------------------ socket

    def open(self) -> None:
        """A fresh socket (and monitor) connected to the server; then HELLO."""
        self._close_socket()
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvhwm = 0  # credit bounds what the server sends
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if self.config.curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.config.curve
        self.monitor = sock.get_monitor_socket(_WATCHED_EVENTS)
        sock.connect(self.address)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)
        self.sock = sock
        self.hello()

    def _close_socket(self) -> None:
        if self.sock is None:
            return
        self._poller.unregister(self.sock)
        if self.monitor is not None:
            self._poller.unregister(self.monitor)
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=0)
        self.sock = None

    def send(self, frames: list) -> None:
        assert self.sock is not None
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            self._last_sent = time.monotonic()
        except zmq.Again:
            pass  # not connected yet; liveness handling re-sends what matters

    def hello(self) -> None:
        cfg = self.config
        self.send(protocol.hello(cfg.params.to_wire(), client=__version__, dataset=cfg.dataset,
                                 prefetch=cfg.prefetch, fastpath=self.fastpath, name=cfg.name,
                                 resume=self._previous_session,
                                 resume_secret=self._previous_secret))
        self._hello_at = time.monotonic()

    def receive(self) -> list[protocol.Message]:
        """The messages that have arrived (decoded: a ProtocolError is fatal for the client)."""
        assert self.sock is not None
        out = []
        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._last_heard = time.monotonic()
            out.append(protocol.decode(frames))
        return out

    def bye(self) -> None:
        """Say goodbye to the session (``finish_bye`` waits for the answer)."""
        if self.sock is not None and self.session is not None:
            try:
                self.sock.send_multipart(protocol.bye(self.session), zmq.NOBLOCK)
                self.bye_acked = False
            except zmq.ZMQError:
                pass

    def finish_bye(self, timeout_ms: int) -> None:
        """Read until the server acknowledged BYE (nothing of the session follows it), giving
        back the slots of the batches that arrive meanwhile; then close the socket."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.bye_acked and self.sock is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                break
            for msg in self.receive():
                if msg.kind == protocol.PONG and msg.header["session"] == self.session:
                    self.bye_acked = True
                elif msg.kind == protocol.BATCH:
                    self.give_back(msg.header)
        self.close()

    def close(self) -> None:
        """Close the socket and let go of the lease books (each lives on while its client
        still holds views of its slots)."""
        self._close_socket()
        self.session = None
        self.books = {}

    def give_back(self, h: dict) -> None:
        """A BATCH nobody will read: if it names a slot, the slot goes back at once."""
        book = self.books.get(h["session"])
        if h["slot"] is not None and book is not None:
            book.give_back(h["slot"])

    # ------------------------------------------------------------------ session

    def accept(self, h: dict) -> Welcome | None:
        """A WELCOME: take the session, and claim the fast path if it is offered (None when
        the WELCOME is stale: a late answer to a repeated HELLO)."""
        if self.session is not None:
            if h["session"] != self.session:
                self.send(protocol.bye(h["session"]))
            return None
        welcome = Welcome.from_header(h)
        self.session, self.secret, self.welcome = welcome.session, h["secret"], welcome
        self._previous_session = self._previous_secret = None
        self.handshake_error = None
        self.lost_since = None
        self._hello_wait = 0.25
        self.books = {s: b for s, b in self.books.items() if s == self._last_session}
        self._last_session = welcome.session
        if self.fastpath and h["ring"] is not None and h["challenge"] is not None:
            self._claim(h["ring"], h["challenge"])
        return welcome

    def _claim(self, ring: dict, challenge: str) -> None:
        """Prove this process shares the server's memory: sign the challenge with its ring's
        key (the lease table comes in GRANT)."""
        try:
            if self.ring is None or not self.ring.same(ring):
                self.ring = RingMap(ring)
        except (OSError, ProtocolError) as exc:
            log.info("fast path to %s unavailable (%s); using the socket", self.address, exc)
            self.ring = None
            return
        assert self.session is not None
        self.send(protocol.claim(session=self.session, proof=self.ring.prove(challenge)))

    def granted(self, h: dict) -> None:
        """GRANT: open the session's lease table (from then on the server may send slots)."""
        session = self.session
        if session is None or h["session"] != session or self.ring is None or \
                session in self.books:
            return  # about a session we have left, or a repeat
        try:
            self.books[session] = LeaseBook(h["table"], self.ring.slots)
        except (OSError, ProtocolError) as exc:
            log.info("fast path to %s unavailable (%s); using the socket", self.address, exc)

    def lose(self, fresh_socket: bool) -> None:
        """The server is gone (or silent): start over, resuming the session if it comes back."""
        if self.session is not None:
            self._previous_session, self._previous_secret = self.session, self.secret
        self.session = None
        now = time.monotonic()
        if self.lost_since is None:
            self.lost_since = now
        self._last_heard = now
        if fresh_socket:
            self.open()  # a fresh connection, without stale queued messages
        else:
            self.hello()

    def on_monitor(self) -> bool:
        """Connection events; True if the connection was lost.  A refused handshake raises
        AuthenticationError while the link has no session."""
        assert self.monitor is not None
        lost = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return lost
            kind = int(event["event"])
            if kind == zmq.EVENT_DISCONNECTED and self.session is not None:
                log.info("connection to %s lost; reconnecting", self.address)
                lost = True
            elif kind in _HANDSHAKE_FAILURES:
                self.handshake_error = _HANDSHAKE_FAILURES[kind]
                if kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH and self.config.curve is None:
                    self.handshake_error = (
                        "it requires CURVE encryption; pass curve=(client_secret_key_file, "
                        "server_public_key_file) to Client (batchfeed keygen makes the keys)")
                if self.session is None:
                    raise AuthenticationError(f"the server at {self.address} refused the "
                                              f"connection: {self.handshake_error}")

    def tick(self, now: float, on_lost: Callable[[Link], None], at: list | None = None) -> None:
        """Ping a live server (saying where the trainer is, ``at``, when that moved); notice a
        silent one; re-HELLO (with backoff) a lost one."""
        if self.session is None:
            # First contact: the queued HELLO goes out when the socket connects.  After a
            # loss: say it again now and then.
            if self.lost_since is not None and now - self._hello_at > self._hello_wait:
                self._hello_wait = min(self._hello_wait * 2, HELLO_RETRY_MAX)
                self.hello()
            return
        moved = at is not None and at != self._told_at and now - self._told_at_time > AT_INTERVAL
        if moved or now - self._last_sent > PING_INTERVAL:
            self.send(protocol.ping(self.session, at))
            self._told_at, self._told_at_time = at, now
        if now - self._last_heard > self.config.heartbeat_timeout:
            log.warning("no word from %s for %.1f s; reconnecting", self.address,
                        now - self._last_heard)
            on_lost(self)
