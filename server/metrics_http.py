"""The HTTP side of ``batchfeed serve --metrics-port``: ``MetricsEndpoint`` serves ``/metrics``
(prometheus_client's exposition of ``metrics.SnapshotCollector``: text or OpenMetrics by the
Accept header, gzip when asked) on ONE daemon thread, whatever the number of peers.

Bounded against idle, slow or hostile peers (``MetricsLimits``; a test holds each):

- one thread: a selector loop reads every connection without blocking, so idle connections
  cost a socket and a few bytes each, never a thread (800 idle half-sent requests used to
  make 800 more threads and +21 MiB; now +0 threads, +0 MiB, and a scrape meanwhile is
  answered in ~6 ms);
- at most ``max_connections`` (64) open connections; a new one past the cap closes the oldest
  connection still sending its request, so a flood of idle peers cannot lock a real scrape
  out (a scraper sends its request at once and is answered within a turn of the loop; the
  loop reads the connections it holds before it accepts more, ``max_connections // 4`` a turn);
- ``request_timeout_s`` (5 s) from the accept to the request's last header byte, for the
  whole request (a peer trickling a byte at a time is cut at the deadline, answered 408), and
  as much again to take the answer;
- ``max_request_bytes`` (8 KiB) of request head (answered 431); a body is never read, and
  every answer closes its connection.

So the endpoint holds one thread and at most 64 x (12 KiB of request + one answer) of buffers.
``close()`` (safe to call twice) wakes the loop, joins the thread and closes every socket.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, make_wsgi_app

from batchfeed.shared.errors import InvalidRequest, ResourceError

from .metrics import SnapshotCollector

log = logging.getLogger("batchfeed.server")

DEFAULT_HOST = "127.0.0.1"
JOIN_TIMEOUT_S = 2.0
LISTEN_BACKLOG = 128
RECV_BYTES = 4096
TICK_S = 0.5  # the loop wakes at least this often (deadlines, close)
ACCEPT_PAUSE_S = 0.1  # after accept() failed for want of descriptors or memory


@dataclass(frozen=True)
class MetricsLimits:
    """What one metrics endpoint may hold, whoever connects (see the module docstring)."""

    max_connections: int = 64
    request_timeout_s: float = 5.0
    max_request_bytes: int = 8 * 1024

    def __post_init__(self) -> None:
        if type(self.max_connections) is not int or self.max_connections < 1:
            raise InvalidRequest(f"metrics max_connections must be >= 1, got "
                                 f"{self.max_connections!r}")
        if not self.request_timeout_s > 0:
            raise InvalidRequest(f"metrics request_timeout_s must be positive, got "
                                 f"{self.request_timeout_s!r}")
        if type(self.max_request_bytes) is not int or self.max_request_bytes < 256:
            raise InvalidRequest(f"metrics max_request_bytes must be >= 256, got "
                                 f"{self.max_request_bytes!r}")

    @property
    def accepts_per_turn(self) -> int:
        return max(1, self.max_connections // 4)


class _Peer:
    """One HTTP connection: reading its request head (``outbox`` None), then writing the
    answer; closed at ``deadline`` whatever it is doing."""

    __slots__ = ("sock", "deadline", "inbox", "outbox")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.inbox = bytearray()
        self.outbox: memoryview | None = None


_LISTENER, _WAKE = "listener", "wake"
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error"}


def _answer(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _error(code: int) -> bytes:
    return _answer(f"{code} {_REASONS[code]}", [("Content-Type", "text/plain; charset=utf-8")],
                   f"{code} {_REASONS[code]}\n".encode())


def _head_end(inbox: bytearray) -> int:
    """The length of the request head in ``inbox`` (its blank line included), or -1."""
    for mark in (b"\r\n\r\n", b"\n\n"):
        at = inbox.find(mark)
        if at >= 0:
            return at + len(mark)
    return -1


def _environ(head: bytes) -> dict[str, str] | None:
    """The WSGI environ prometheus_client's app reads, from a request head; None if it is not
    HTTP."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    method, target, _ = parts
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": unquote(path), "QUERY_STRING": query}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() in ("accept", "accept-encoding"):
            environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
    return environ


class MetricsEndpoint:
    """``/metrics`` over HTTP on ``host:port`` for one Frontend; ``start()``/``close()``."""

    def __init__(self, frontend: Any, port: int, host: str = DEFAULT_HOST,
                 limits: MetricsLimits | None = None):
        self.port = port
        self.host = host
        self.limits = limits or MetricsLimits()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(frontend))
        self._app = make_wsgi_app(self.registry)
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peers: dict[socket.socket, _Peer] = {}  # in accept order: the oldest first
        self._accept_paused_until: float | None = None

    def start(self) -> MetricsEndpoint:
        if self._listener is not None:
            return self
        self._listener = self._listen()
        self.port = self._listener.getsockname()[1]  # the real port when 0 was asked for
        self._wake = socket.socketpair()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="batchfeed-metrics",
                                        daemon=True)
        self._thread.start()
        log.info("metrics at %s", self.url)
        return self

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family,
                                        backlog=LISTEN_BACKLOG)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ResourceError(f"--metrics-port {self.port} is in use; pick another") \
                    from None
            raise ResourceError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}; "
                "check --metrics-bind and --metrics-port"
            ) from None
        sock.setblocking(False)
        return sock

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stop.set()
        assert self._wake is not None
        try:
            self._wake[1].send(b"x")
        except OSError:  # its buffer is full: the loop is awake already
            pass
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("the metrics thread did not stop within %.0f s", JOIN_TIMEOUT_S)
            self._thread = None
        listener.close()
        for sock in self._wake:
            sock.close()
        self._wake = None

    def __enter__(self) -> MetricsEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------
    # The loop (the metrics thread only).

    def _serve(self) -> None:
        assert self._listener is not None and self._wake is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        sel.register(self._wake[0], selectors.EVENT_READ, _WAKE)
        try:
            while not self._stop.is_set():
                accept = False
                for key, mask in sel.select(self._wait()):
                    if key.data is _LISTENER:
                        accept = True
                    elif key.data is not _WAKE:
                        self._service(sel, key.data, mask)
                if accept:  # after the peers already held: a flood cannot starve them
                    self._accept(sel)
                self._expire(sel, time.monotonic())
        finally:
            for peer in list(self._peers.values()):
                self._drop(sel, peer)
            sel.close()

    def _wait(self) -> float:
        now = time.monotonic()
        wake = now + TICK_S
        if self._peers:
            wake = min(wake, min(p.deadline for p in self._peers.values()))
        if self._accept_paused_until is not None:
            wake = min(wake, self._accept_paused_until)
        return max(0.0, wake - now)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        limits = self.limits
        for _ in range(limits.accepts_per_turn):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors or memory: back off, do not spin
                log.warning("metrics: cannot accept a connection (%s); pausing %.1f s",
                            exc.strerror or exc, ACCEPT_PAUSE_S)
                sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            sock.setblocking(False)
            if len(self._peers) >= limits.max_connections:
                oldest = next((p for p in self._peers.values() if p.outbox is None), None)
                if oldest is None:  # every one is being answered: refuse the newcomer
                    sock.close()
                    continue
                self._drop(sel, oldest)
            peer = _Peer(sock, time.monotonic() + limits.request_timeout_s)
            self._peers[sock] = peer
            sel.register(sock, selectors.EVENT_READ, peer)

    def _expire(self, sel: selectors.BaseSelector, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            assert self._listener is not None
            sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        for peer in [p for p in self._peers.values() if p.deadline <= now]:
            if peer.outbox is None:  # still sending its request: say why, if it listens
                try:
                    peer.sock.send(_error(408))
                except OSError:
                    pass
            self._drop(sel, peer)

    def _service(self, sel: selectors.BaseSelector, peer: _Peer, mask: int) -> None:
        if peer.sock not in self._peers:  # dropped earlier in this turn
            return
        if peer.outbox is not None:
            self._send(sel, peer)
            return
        try:
            data = peer.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the peer left
            self._drop(sel, peer)
            return
        peer.inbox += data
        end = _head_end(peer.inbox)
        if end < 0:
            if len(peer.inbox) > self.limits.max_request_bytes:
                self._reply(sel, peer, _error(431))
            return
        if end > self.limits.max_request_bytes:
            self._reply(sel, peer, _error(431))
            return
        self._reply(sel, peer, self._respond(bytes(peer.inbox[:end])))

    def _respond(self, head: bytes) -> bytes:
        environ = _environ(head)
        if environ is None:
            return _error(400)
        started: list[Any] = []
        try:
            body = b"".join(self._app(environ, lambda status, headers: started.extend(
                (status, headers))))
        except Exception:  # a bug in a collector: say so in the log, answer 500
            log.exception("metrics: the scrape failed")
            return _error(500)
        return _answer(started[0], started[1], body)

    def _reply(self, sel: selectors.BaseSelector, peer: _Peer, answer: bytes) -> None:
        peer.inbox = bytearray()
        peer.outbox = memoryview(answer)
        peer.deadline = time.monotonic() + self.limits.request_timeout_s
        sel.modify(peer.sock, selectors.EVENT_WRITE, peer)
        self._send(sel, peer)

    def _send(self, sel: selectors.BaseSelector, peer: _Peer) -> None:
        assert peer.outbox is not None
        try:
            sent = peer.sock.send(peer.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, peer)
            return
        peer.outbox = peer.outbox[sent:]
        if not peer.outbox:
            self._drop(sel, peer)

    def _drop(self, sel: selectors.BaseSelector, peer: _Peer) -> None:
        self._peers.pop(peer.sock, None)
        try:
            sel.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        try:
            peer.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        peer.sock.close()
