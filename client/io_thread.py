"""The client's I/O thread: it owns the ZeroMQ context, the poller, the client's servers
(``lanes.py``: one ``Link`` per server, its lanes and their credit), the command deque and
the wake-up pipe; a server set's watcher (``membership.py``) hands it changes of the servers.

It keeps the current stream's window full with REQUESTs, receives BATCH messages, hands their
batches to the stream's window (which puts them back in plan order and drops duplicates) and
puts what comes out in order on the stream's queue.  Batches are zero-copy views over the
received frames, or over a server's ring on the same-host fast path.

Several servers (scale-out): the window spreads the plan's batches over the links, each with a
share of the credit, so a faster server frees its share sooner and is asked for more.  When a
link is lost, the batches it owed go to the window's retry pool, which the other links serve
first; if it comes back it resumes its session and takes new work.  With one server, a loss
costs a delay: the link says HELLO again (with backoff) and the batches are asked for again.

Fast-path slots are given back by the lease arrays' finalizers (``fastpath.py``), from any
thread, even after this one has ended; they only nudge this thread, which then sends RELEASE so
that the server looks at once.

Any failure in this thread is handed to the trainer (``fatal``, and on the stream's queue).
Shutdown: ``close()`` queues the close command and wakes the thread, which sends BYE on every
link, reads until each server acknowledged (giving back the slots of batches that arrive
meanwhile), closes the sockets and terminates the context; ``close()`` joins it (bounded),
drops the stream and closes the pipe.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

import zmq

from batchfeed.shared import protocol
from batchfeed.shared.errors import (
    BatchfeedError,
    ProtocolError,
    UnknownSession,
    error_from_code,
)
from batchfeed.shared.schema import Field

from .fastpath import Nudge
from .lanes import Servers
from .link import Link, Welcome
from .membership import Watcher
from .options import ClientConfig
from .ragged import RaggedDecoder
from .shards import ShardMerger
from .stream import Stream
from .window import Credit

log = logging.getLogger("batchfeed.client")



def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class IOThread:
    """The thread that talks to the servers for one client (see the module docstring).

    The trainer's side reads ``welcome``, ``credit``, ``seen_fields`` and ``fatal`` (written
    here), and talks to the thread only through ``open_stream``, ``cancel``, ``poke`` and
    ``close``.
    """

    def __init__(self, config: ClientConfig):
        self.config = config
        self.servers = Servers(config)
        self.seen_fields: tuple[Field, ...] = ()  # from the first batch (for transforms)
        self.decode = RaggedDecoder((), flat=False)  # str and bytes fields, once welcomed
        self.fatal: BaseException | None = None
        self._commands: deque[tuple[str, Any]] = deque()
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        self.poke = Nudge(wake_w)  # wakes this thread, from any thread
        self._given_back = False  # a lease finalizer ran: tell the servers to look
        self._stream: Stream | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="batchfeed-io", daemon=True)
        self._watcher = Watcher(config.servers, config.addresses, self._members_changed) \
            if config.servers is not None else None

    # What the trainer's side reads of the servers.

    @property
    def welcome(self) -> Welcome | None:
        return self.servers.welcome

    @property
    def credit(self) -> Credit | None:
        return self.servers.credit

    @property
    def lanes(self) -> list[Credit]:
        return self.servers.lanes

    @property
    def welcomed(self) -> threading.Event:
        return self.servers.welcomed

    @property
    def unwelcomed(self) -> set[str]:
        return self.servers.unwelcomed

    def new_merger(self) -> ShardMerger | None:
        return self.servers.new_merger()

    # ------------------------------------------------------------------ the trainer's calls

    def start(self) -> None:
        self._thread.start()
        if self._watcher is not None:
            self._watcher.start()

    def _members_changed(self, addresses: tuple[str, ...]) -> None:
        """(The watcher's thread.)  The server set changed: the I/O thread follows."""
        self._commands.append(("members", addresses))
        self.poke()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def open_stream(self, stream: Stream) -> None:
        """Serve ``stream`` from now on (the previous one is dropped)."""
        self._commands.append(("stream", stream))
        self.poke()

    def cancel(self, stream: Stream) -> None:
        """Stop asking for ``stream`` (if it is still the current one)."""
        self._commands.append(("cancel", stream))
        self.poke()

    def close(self) -> None:
        """Say BYE, close the sockets and join the thread.  Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        if self._watcher is not None:
            self._watcher.close()
        self._commands.append(("close", None))
        self.poke()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._stream = None  # its queued batches (and their leases) go with it
        self.poke.close(_close_fd)
        _close_fd(self._wake_r)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        ctx = zmq.Context()
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            self.servers.open(ctx, poller)
            while self._serve(dict(poller.poll(100))):
                pass
        except BaseException as exc:  # hand every failure to the trainer, never die silently
            log.debug("I/O thread failed", exc_info=True)
            self._fail(exc)
        finally:
            self.servers.close()
            ctx.term()

    def _serve(self, events: dict) -> bool:
        """One turn of the loop; False once the trainer asked to close."""
        if self._wake_r in events:
            self._drain_wake()
            self._given_back = True  # (or a command; looking costs the server little)
        if not self._run_commands():
            return False
        for link in list(self.servers.links):
            if link.monitor is not None and link.monitor in events and link.on_monitor():
                self._lose(link, fresh_socket=False)
            if link.sock is not None and link.sock in events:
                for msg in link.receive():
                    self._on_message(link, msg)
        self._request_more()
        now = time.monotonic()
        stream = self._stream
        at = list(stream.positions.where(stream.consumed)) if stream is not None else None
        for link in self.servers.links:
            link.tick(now, lambda lost: self._lose(lost, fresh_socket=True), at)
        self.servers.check_reachable(now)
        return True

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
                self._stream = arg
            elif cmd == "cancel" and arg is self._stream:
                self._stream = None
            elif cmd == "members":
                self.servers.set_members(arg, self._stream)
        return True

    # ------------------------------------------------------------------ messages

    def _on_message(self, link: Link, msg: protocol.Message) -> None:
        h = msg.header
        if msg.kind == protocol.BATCH:
            self._on_batch(link, h, msg.buffers)
        elif msg.kind == protocol.WELCOME:
            self._on_welcome(link, h)
        elif msg.kind == protocol.GRANT:
            link.granted(h)
        elif msg.kind == protocol.ERROR:
            self._on_error(link, h)
        elif msg.kind != protocol.PONG:
            raise ProtocolError(f"a client does not accept {msg.kind} messages")

    def _on_welcome(self, link: Link, h: dict) -> None:
        welcome = link.accept(h)
        if welcome is None:
            return
        if self.servers.welcome is None:
            self.decode = RaggedDecoder(welcome.fields, self.config.params.ragged == "flat")
        self.servers.welcomed_by(link, welcome, self._stream)

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
        p = stream.positions.position(epoch, k0) if k0 is not None and epoch is not None else None
        if p is not None and stream.windows[link.lane].hold_error(p, err):
            self._deliver(stream)  # raised when the trainer gets there
        else:
            for window in stream.windows:
                window.break_off()
            stream.ready.put(err)

    def _on_batch(self, link: Link, h: dict, buffers: list) -> None:
        stream = self._stream
        slot = h["slot"]
        current = (stream is not None and h["session"] == link.session
                   and h["stream"] == stream.id)
        if not current:
            link.give_back(h)
            return
        assert stream is not None
        layout = protocol.chunk_layout(h)
        p0 = stream.positions.arrival(h["epoch"], h["k0"], layout.count)
        if slot is not None:
            book = link.books.get(h["session"])
            if link.ring is None or book is None:
                raise ProtocolError("server sent a ring slot to a client without the fast path")
            buffers = link.ring.lease(slot, protocol.check_int_list(h["offsets"], "offsets"),
                                      layout, book, self.poke)
        batches: list = protocol.field_views(layout, buffers)
        if self.decode:
            batches = [self._decoded(link, h["epoch"], h["k0"] + b, batch)
                       for b, batch in enumerate(batches)]
        if not self.seen_fields:
            self.seen_fields = tuple(Field(name, dtype, tuple(shape[1:])) for name, dtype, shape
                                     in zip(layout.names, layout.dtypes, layout.shapes[0]))
        window = stream.windows[link.lane]
        for b, batch in enumerate(batches):
            if isinstance(batch, BatchfeedError):  # raised when the trainer gets there
                window.hold_error(p0 + b, batch)
                continue
            nbytes = sum(layout.nbytes[f][b] for f in range(len(layout.names)))
            window.arrived(link.address, p0 + b, (batch, nbytes))
        del batches, buffers
        self._deliver(stream)

    def _decoded(self, link: Link, epoch: int, k: int, batch: dict) -> dict | BatchfeedError:
        """A batch with its str and bytes fields decoded, or the error saying it cannot be."""
        try:
            return self.decode(batch)
        except (ValueError, IndexError) as exc:  # UnicodeDecodeError, offsets out of range
            return ProtocolError(
                f"batch {k} of epoch {epoch} from the server at {link.address} cannot be "
                f"decoded ({type(exc).__name__}: {exc}); its text fields are damaged. "
                "Check the data the server reads (a server of this release refuses invalid "
                "UTF-8 when it loads the data)")

    def _deliver(self, stream: Stream) -> None:
        """Hand the trainer every batch that is next in plan order (an error in its place
        ends the stream there: the trainer gets it when it reaches that batch); with shards,
        once every shard's piece of it is there."""
        if stream.merger is None:
            batches, error = stream.window.take_in_order()
        else:
            for lane, window in enumerate(stream.windows):
                stream.merger.add(lane, *window.take_in_order())
            batches, error = stream.merger.take()
        if batches:
            stream.delivered += len(batches)
            stream.ready.put(batches)
        if error is not None:
            stream.ready.put(error)

    # ------------------------------------------------------------------ requests

    def _request_more(self) -> None:
        """Ask the links for what the window has room for (it decides which link, what and
        how much); a link that gets no request but may have slots back gets a RELEASE."""
        stream = self._stream
        asked: set[str] = set()
        if stream is not None:
            at = list(stream.positions.where(stream.consumed))
            for lane, window in enumerate(stream.windows):
                window.note_consumed(stream.consumed)
                by_address = self.servers.up(lane)
                while (run := window.next_request(list(by_address))) is not None:
                    link = by_address[run.link]
                    assert link.session is not None
                    link.send(protocol.request(session=link.session, stream=stream.id,
                                               epoch=run.epoch, k0=run.k, count=run.count,
                                               at=at))
                    asked.add(link.address)
        if self._given_back:
            self._given_back = False
            for link in self.servers.links:
                if link.up and link.books and link.address not in asked:
                    assert link.session is not None
                    link.send(protocol.release(session=link.session))

    # ------------------------------------------------------------------ liveness

    def _lose(self, link: Link, fresh_socket: bool) -> None:
        self.servers.lose(link, fresh_socket, self._stream)

    def _fail(self, exc: BaseException) -> None:
        if not isinstance(exc, BatchfeedError):
            exc = BatchfeedError(f"the client's I/O thread failed: {type(exc).__name__}: {exc}")
        self.fatal = exc
        if self._stream is not None:
            self._stream.ready.put(exc)
        self.servers.welcomed.set()
