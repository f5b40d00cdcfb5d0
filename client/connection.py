"""The client's I/O thread: it owns every socket of the client (one ``Link`` per server).

It keeps the trainer's prefetch window full with REQUESTs (credit: never more than
``prefetch`` batches requested and not yet consumed), receives BATCH messages, puts their
batches back in plan order (workers and servers finish out of order), drops duplicates, and
hands lists of in-order batches to the trainer through the stream's queue.  Batches are
zero-copy views over the received frames, or over a server's ring on the same-host fast path.

Several servers (scale-out): the batches of the plan are spread over the links, each with a
share of the credit, so a faster server frees its share sooner and is asked for more.  When a
link is lost, the batches it owed go back to a retry pool that the other links serve; if it
comes back it resumes its session and takes new work.  The order the trainer sees is the plan's,
whatever the number of servers.  With one server, a loss costs a delay: the link says HELLO
again (with backoff) and the batches are asked for again.  When no server has been reachable for
``reconnect_timeout``, the trainer gets ServerUnavailable.

The trainer talks to this thread through a command deque and a wake-up pipe; ``close`` sends
BYE on every link, closes the sockets and joins the thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from batchfeed.shared import protocol
from batchfeed.shared.errors import (
    BatchfeedError,
    ProtocolError,
    ServerUnavailable,
    UnknownSession,
    error_from_code,
)
from batchfeed.shared.plan import PlanParams
from batchfeed.shared.schema import Field

from .link import Link, LinkConfig, Welcome

log = logging.getLogger("batchfeed.client")


@dataclass(frozen=True)
class ClientConfig:
    """Validated client settings (the plan parameters plus how to talk to the servers)."""

    addresses: tuple[str, ...]
    params: PlanParams
    prefetch: int  # 0: the server chooses
    dataset: str | None
    fastpath: bool | None  # None: on for ipc:// addresses
    connect_timeout: float
    reconnect_timeout: float
    heartbeat_timeout: float
    name: str
    curve: tuple[bytes, bytes, bytes] | None = None  # (public, secret, server public)


class Stream:
    """The trainer's batches from (epoch, start) on, in plan order, running on across epochs.

    Position ``p`` is local batch ``(start + p) % bpe`` of epoch ``epoch0 + (start + p) // bpe``.
    Running on means the next epoch is prefetched while the trainer finishes this one, so an
    epoch boundary costs no wait; requests stay within the epoch after the trainer's.
    The trainer reads ``ready`` and writes ``consumed`` (and ``abandoned``); the rest is the
    I/O thread's, but for ``items``, the trainer's unread batches.
    """

    def __init__(self, stream_id: int, epoch: int, start: int, bpe: int):
        self.id = stream_id
        self.epoch0 = epoch
        self.start = start
        self.bpe = bpe
        self.ready: queue.SimpleQueue = queue.SimpleQueue()  # lists of (batch, nbytes) or errors
        self.consumed = 0  # positions handed to the trainer (trainer writes)
        self.abandoned = False  # the trainer left it (trainer writes)
        self.requested = 0  # first position never requested
        self.retry: set[int] = set()  # positions a lost link owed: to be asked of another
        self.next_deliver = 0  # first position not yet handed to ``ready``
        self.received: dict[int, tuple[Any, int]] = {}  # out-of-order arrivals (or errors)
        self.cancelled = False
        self.broken = False  # an error was delivered: nothing after it is
        self.items: list = []  # trainer side: the list being read, and where
        self.read = 0

    def where(self, p: int) -> tuple[int, int]:
        """(epoch, local batch) of position ``p``."""
        q = self.start + p
        return self.epoch0 + q // self.bpe, q % self.bpe

    def position(self, epoch: int, k: int) -> int:
        return (epoch - self.epoch0) * self.bpe + k - self.start

    def epoch_end(self, p: int) -> int:
        """The first position of the epoch after ``p``'s."""
        return self.position(self.where(p)[0] + 1, 0)

    def horizon(self) -> int:
        """How far to request: to the end of the epoch after the one the trainer is in."""
        return self.position(self.where(self.consumed)[0] + 2, 0)


class Connection:
    """Owns the I/O thread, its links and the current stream."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.prefetch = config.prefetch  # set from the first WELCOME when 0
        self.unit = 1  # the trainer pokes the I/O thread after this many batches
        self.welcome: Welcome | None = None
        self.seen_fields: tuple[Field, ...] = ()  # from the first batch (for transforms)
        self.fatal: BaseException | None = None
        self._welcomed = threading.Event()
        self._unwelcomed = set(config.addresses)
        self._commands: deque[tuple[str, Any]] = deque()
        # Fast-path slots, keyed by the ring they belong to: those whose views are all gone
        # (to RELEASE), and those still in use (named in BYE so the server keeps them).
        self._released: deque[tuple[str, int]] = deque()
        self._live_leases: set[tuple[str, int]] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stream: Stream | None = None  # the I/O thread's
        self._trainer_stream: Stream | None = None  # the trainer's (the same, once it is seen)
        self._next_stream = 0
        self._links: list[Link] = []
        self._link_cap = 1
        self._link_unit = 1
        self._all_down_since: float | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="batchfeed-io", daemon=True)

    # ------------------------------------------------------------------ trainer side

    def start(self) -> Welcome:
        self._thread.start()
        if not self._welcomed.wait(self.config.connect_timeout) and self.fatal is None:
            missing = sorted(self._unwelcomed)
            self.close()
            where = " and ".join(missing)
            raise ServerUnavailable(
                f"no batchfeed server answered at {where} within "
                f"{self.config.connect_timeout:g} s; start one there with `batchfeed serve "
                f"--bind {missing[0]}`, or check the address and the firewall"
            )
        if self.fatal is not None:
            self.close()
            raise self.fatal
        assert self.welcome is not None
        return self.welcome

    def stream_at(self, epoch: int, start: int, bpe: int) -> Stream:
        """The running stream if the trainer is exactly there (epoch e+1 after epoch e), so
        that what was prefetched is kept; otherwise a new stream (cancelling the last)."""
        current = self._trainer_stream
        if (current is not None and not current.abandoned and not current.broken
                and current.where(current.consumed) == (epoch, start)):
            return current
        self._next_stream += 1
        stream = Stream(self._next_stream, epoch, start, bpe)
        self._trainer_stream = stream
        self._commands.append(("stream", stream))
        self.poke()
        return stream

    def cancel(self, stream: Stream) -> None:
        self._commands.append(("cancel", stream))
        self.poke()

    def take(self, stream: Stream) -> tuple[tuple[Any, int], float]:
        """The trainer's next (batch, nbytes), and the seconds it waited for it."""
        waited = 0.0
        if stream.read >= len(stream.items):
            t0 = time.perf_counter()
            stream.items = self.next_items(stream)
            stream.read = 0
            waited = time.perf_counter() - t0
        item = stream.items[stream.read]
        stream.items[stream.read] = None  # hold no reference the trainer has dropped
        stream.read += 1
        return item, waited

    def next_items(self, stream: Stream) -> list:
        """Block until the next in-order batches arrive; raise what went wrong otherwise."""
        while True:
            try:
                item = stream.ready.get(timeout=0.25)
            except queue.Empty:
                if self.fatal is not None:
                    raise self.fatal from None
                if not self._thread.is_alive():
                    raise ServerUnavailable(
                        "the client's I/O thread has stopped (closed?)") from None
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
        ctx = zmq.Context()
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        cfg = self.config
        link_config = LinkConfig(cfg.params, cfg.prefetch, cfg.dataset, cfg.heartbeat_timeout,
                                 cfg.name, cfg.curve)
        try:
            for address in cfg.addresses:
                fastpath = address.startswith("ipc://") if cfg.fastpath is None else cfg.fastpath
                link = Link(address, fastpath, link_config, ctx, poller)
                self._links.append(link)
                link.open()
            while True:
                events = dict(poller.poll(100))
                if self._wake_r in events:
                    self._drain_wake()
                if not self._run_commands():
                    return
                for link in self._links:
                    if link.monitor is not None and link.monitor in events and link.on_monitor():
                        self._lose(link, fresh_socket=False)
                    if link.sock is not None and link.sock in events:
                        for msg in link.receive():
                            self._on_message(link, msg)
                self._request_more()
                now = time.monotonic()
                for link in self._links:
                    link.tick(now, lambda lost: self._lose(lost, fresh_socket=True))
                self._check_reachable(now)
        except BaseException as exc:  # hand every failure to the trainer, never die silently
            log.debug("I/O thread failed", exc_info=True)
            self._fail(exc)
        finally:
            for link in self._links:
                key = link.ring.key if link.ring is not None else None
                link.close([slot for k, slot in list(self._live_leases) if k == key])
            ctx.term()

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
                for link in self._links:
                    link.pending.clear()
            elif cmd == "cancel" and self._stream is not None and arg is self._stream:
                self._stream.cancelled = True
                self._stream = None
        return True

    def _on_message(self, link: Link, msg: protocol.Message) -> None:
        h = msg.header
        if msg.kind == protocol.BATCH:
            self._on_batch(link, h, msg.buffers)
        elif msg.kind == protocol.WELCOME:
            self._on_welcome(link, h)
        elif msg.kind == protocol.ERROR:
            self._on_error(link, h)
        elif msg.kind != protocol.PONG:
            raise ProtocolError(f"a client does not accept {msg.kind} messages")

    def _on_welcome(self, link: Link, h: dict) -> None:
        welcome = link.accept(h)
        if welcome is None:
            return
        first = self.welcome
        if first is None:
            self.welcome = welcome
            self.prefetch = self.config.prefetch or welcome.prefetch
            self.unit = max(1, self.prefetch // 4)
            self._link_cap = max(1, -(-self.prefetch // len(self.config.addresses)))
            self._link_unit = max(1, self._link_cap // 4)
        elif not welcome.same_data(first):
            raise ServerUnavailable(
                f"the server at {link.address} serves {welcome.dataset!r} with {welcome.rows} "
                f"rows and {welcome.batches_per_epoch} batches per epoch, but this client "
                f"started with {first.dataset!r}: {first.rows} rows, {first.batches_per_epoch} "
                "batches; every server of a client must serve the same dataset"
            )
        self._all_down_since = None
        self._unwelcomed.discard(link.address)
        if not self._unwelcomed:
            self._welcomed.set()

    def _on_error(self, link: Link, h: dict) -> None:
        err = error_from_code(h["code"], h["message"])
        if isinstance(err, UnknownSession):
            if link.session is not None and h.get("session") == link.session:
                self._lose(link, fresh_socket=False)
            return
        if link.session is None:
            raise err  # the server refused our HELLO: fatal, whether first contact or not
        stream = self._stream
        if h.get("session") not in (None, link.session):
            return  # about a session we have left
        if stream is None or h.get("stream") not in (None, stream.id):
            return
        k0, epoch = h.get("k0"), h.get("epoch")
        p = stream.position(epoch, k0) if k0 is not None and epoch is not None else None
        if p is not None and p >= stream.next_deliver:
            stream.received.setdefault(p, (err, 0))  # raised when the trainer gets there
            self._deliver(stream)
        else:
            stream.broken = True
            stream.ready.put(err)

    def _on_batch(self, link: Link, h: dict, buffers: list) -> None:
        stream = self._stream
        slot = h["slot"]
        current = (stream is not None and h["session"] == link.session
                   and h["stream"] == stream.id)
        if not current:
            if slot is not None and h["session"] == link.session and link.ring is not None:
                self._released.append((link.ring.key, slot))
            return
        assert stream is not None
        layout = protocol.chunk_layout(h)
        k0 = h["k0"]
        p0 = stream.position(h["epoch"], k0)
        if p0 < 0 or k0 < 0 or k0 + layout.count > stream.bpe:
            raise ProtocolError(f"server sent batches {k0}..{k0 + layout.count - 1} of epoch "
                                f"{h['epoch']}, which this client did not ask for")
        if slot is not None:
            if link.ring is None:
                raise ProtocolError("server sent a ring slot to a client without the fast path")
            lease = (link.ring.key, slot)
            self._live_leases.add(lease)
            buffers = link.ring.lease(slot, protocol.check_int_list(h["offsets"], "offsets"),
                                      layout, lambda: self._lease_freed(lease))
        batches = protocol.field_views(layout, buffers)
        if not self.seen_fields:
            self.seen_fields = tuple(Field(name, dtype, tuple(shape[1:])) for name, dtype, shape
                                     in zip(layout.names, layout.dtypes, layout.shapes[0]))
        for b, batch in enumerate(batches):
            p = p0 + b
            link.pending.discard(p)
            stream.retry.discard(p)
            if p >= stream.next_deliver and p not in stream.received:
                nbytes = sum(layout.nbytes[f][b] for f in range(len(layout.names)))
                stream.received[p] = (batch, nbytes)
        del batches, buffers
        self._deliver(stream)

    def _deliver(self, stream: Stream) -> None:
        """Hand the trainer every batch that is next in plan order (an error in its place
        stops the stream there: the trainer gets it when it reaches that batch)."""
        out: list[tuple[Any, int]] = []
        while stream.next_deliver in stream.received:
            item = stream.received.pop(stream.next_deliver)
            if isinstance(item[0], BaseException):
                if out:
                    stream.ready.put(out)
                stream.ready.put(item[0])
                stream.broken = True  # nothing after it is delivered, or asked for
                stream.received.clear()
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

    # ------------------------------------------------------------------ credit

    def _request_more(self) -> None:
        """Give the links work: first what lost links owed, then new batches, while the
        credit lasts; each link takes at most its share, so faster servers are asked more."""
        stream = self._stream
        releases = self._take_releases()
        asked: set[int] = set()
        if stream is not None and not stream.cancelled and not stream.broken:
            while True:
                link = max((lk for lk in self._links if lk.up),
                           key=lambda lk: -len(lk.pending), default=None)
                if link is None:
                    break
                free = self._link_cap - len(link.pending)
                k0, count = self._next_run(stream, free)
                if count == 0:
                    break
                assert link.session is not None
                release = releases.pop(id(link), None)
                epoch, k = stream.where(k0)
                link.send(protocol.request(session=link.session, stream=stream.id,
                                           epoch=epoch, k0=k, count=count, release=release))
                link.pending.update(range(k0, k0 + count))
                asked.add(id(link))
        for link in self._links:
            release = releases.get(id(link))
            if release and link.up:
                assert link.session is not None
                link.send(protocol.release(session=link.session, slots=release))

    def _next_run(self, stream: Stream, free: int) -> tuple[int, int]:
        """The next positions to ask one link for: (first, count), count 0 for none now.
        A run never crosses an epoch boundary (a request names one epoch)."""
        if free <= 0:
            return 0, 0
        if stream.retry:  # already inside the credit window: ask again at once
            ps = sorted(stream.retry)
            limit = min(free, len(ps), stream.epoch_end(ps[0]) - ps[0])
            run = 1
            while run < limit and ps[run] == ps[0] + run:
                run += 1
            stream.retry.difference_update(range(ps[0], ps[0] + run))
            return ps[0], run
        p0 = stream.requested
        remaining = stream.horizon() - p0
        in_epoch = stream.epoch_end(p0) - p0
        room = self.prefetch - (p0 - stream.consumed)
        count = min(room, free, remaining, in_epoch)
        if count <= 0 or count < min(self._link_unit, remaining, in_epoch):
            return 0, 0
        stream.requested += count
        return p0, count

    def _take_releases(self) -> dict[int, list[int]]:
        """Released fast-path slots, per link (by the ring they belong to)."""
        by_ring = {lk.ring.key: lk for lk in self._links if lk.ring is not None and lk.up}
        out: dict[int, list[int]] = {}
        while self._released:
            key, slot = self._released.popleft()
            link = by_ring.get(key)  # a former server's ring means nothing to the new one
            if link is not None:
                slots = out.setdefault(id(link), [])
                if len(slots) < protocol.MAX_RELEASE:
                    slots.append(slot)
        return out

    # ------------------------------------------------------------------ liveness

    def _lose(self, link: Link, fresh_socket: bool) -> None:
        """A server is gone: what it owed goes to the other links (or to it, once back)."""
        stream = self._stream
        if stream is not None:
            stream.retry.update(k for k in link.pending
                                if k >= stream.next_deliver and k not in stream.received)
        link.pending.clear()
        link.lose(fresh_socket)

    def _check_reachable(self, now: float) -> None:
        if any(link.up for link in self._links) or self.welcome is None:
            self._all_down_since = None
            return
        if self._all_down_since is None:
            self._all_down_since = now
        elif now - self._all_down_since > self.config.reconnect_timeout:
            where = ", ".join(link.address for link in self._links)
            raise ServerUnavailable(
                f"lost the batchfeed server at {where} and it did not come back within "
                f"reconnect_timeout={self.config.reconnect_timeout:g} s"
            )

    def _fail(self, exc: BaseException) -> None:
        if not isinstance(exc, BatchfeedError):
            exc = BatchfeedError(f"the client's I/O thread failed: {type(exc).__name__}: {exc}")
        self.fatal = exc
        if self._stream is not None:
            self._stream.ready.put(exc)
        self._welcomed.set()
