"""The trainer's side of a client's connection: start the I/O thread and wait for the servers'
WELCOME, open streams, take their batches (raising in the trainer's thread what went wrong in
the I/O thread), cancel them, close.

Everything that talks to a server is the I/O thread's (``io_thread.py``); which batches to ask
for and in what order they are handed over is the stream's window (``window.py``).  Shutdown:
``close()`` closes the I/O thread (BYE on every link, sockets closed, thread joined).

A connection belongs to the process that made it: in a child forked from that process (which
has copies of its objects, but not its thread) every use raises ForkError, and ``close()`` lets
go of the copies without touching the parent's sessions.
"""

from __future__ import annotations

import os
import queue
import time
from typing import Any

from batchfeed.shared.errors import ForkError, ServerUnavailable
from batchfeed.shared.schema import Field

from .io_thread import IOThread
from .lanes import Servers
from .link import Welcome
from .options import ClientConfig
from .stream import Stream
from .window import Positions


class Connection:
    """Owns the I/O thread and the trainer's current stream."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.pid = os.getpid()  # the process whose connection it is
        self._io = IOThread(config)
        self._stream: Stream | None = None  # the trainer's current stream
        self._next_stream = 0

    # ------------------------------------------------------------------ what the servers said

    @property
    def welcome(self) -> Welcome | None:
        return self._io.welcome

    @property
    def servers(self) -> Servers:
        return self._io.servers

    @property
    def prefetch(self) -> int:
        """Batches requested ahead of the trainer (0 before the first WELCOME, if not given)."""
        credit = self._io.credit
        return credit.prefetch if credit is not None else self.config.prefetch

    @property
    def unit(self) -> int:
        """The trainer pokes the I/O thread after this many batches."""
        credit = self._io.credit
        return credit.poke_every if credit is not None else 1

    @property
    def seen_fields(self) -> tuple[Field, ...]:
        return self._io.seen_fields

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Welcome:
        self._io.start()
        if not self._io.welcomed.wait(self.config.connect_timeout) and self._io.fatal is None:
            missing = sorted(self._io.unwelcomed)
            self.close()
            where = " and ".join(missing)
            raise ServerUnavailable(
                f"no batchfeed server answered at {where} within "
                f"{self.config.connect_timeout:g} s; start one there with `batchfeed serve "
                f"--bind {missing[0]}`, or check the address and the firewall"
            )
        if self._io.fatal is not None:
            self.close()
            raise self._io.fatal
        assert self._io.welcome is not None
        return self._io.welcome

    def check_process(self) -> None:
        """ForkError in a child forked from the process that made this connection."""
        if os.getpid() != self.pid:
            raise ForkError(
                f"this batchfeed Client was made in process {self.pid} and cannot be used in "
                f"process {os.getpid()}, a child forked from it: its connection (thread, "
                "sockets, fast-path leases) stays with the parent.  Make a new Client in the "
                "child (for a torch DataLoader worker: in worker_init_fn; BatchfeedDataset "
                "reconnects by itself), or start children with multiprocessing's 'spawn'")

    def close(self) -> None:
        """Safe to call twice.  Batches the trainer has not taken are dropped (their fast-path
        slots go back); those it took stay valid for as long as it keeps them.  In a forked
        child it only drops the child's copies."""
        if os.getpid() != self.pid:
            self._stream = None
            return
        self._io.close()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.items = []
            while True:
                try:
                    stream.ready.get_nowait()
                except queue.Empty:
                    break

    # ------------------------------------------------------------------ streams

    def stream_at(self, epoch: int, start: int, bpe: int, fresh: bool = False) -> Stream:
        """The running stream if the trainer is exactly there (epoch e+1 after epoch e), so
        that what was prefetched is kept; otherwise, or if ``fresh``, a new stream (which
        replaces the last)."""
        self.check_process()
        current = self._stream
        if (not fresh and current is not None and not current.abandoned and not current.broken
                and current.at(epoch, start)):
            return current
        assert self._io.lanes, "streams are opened once the servers have answered"
        self._next_stream += 1
        stream = Stream(self._next_stream, Positions(epoch, start, bpe), self._io.lanes,
                        self._io.new_merger())
        self._stream = stream
        self._io.open_stream(stream)
        return stream

    def cancel(self, stream: Stream) -> None:
        self._io.cancel(stream)

    def poke(self) -> None:
        self._io.poke()

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
        stream.consumed += 1
        return item, waited

    def next_items(self, stream: Stream) -> list:
        """Block until the next in-order batches arrive; raise what went wrong otherwise.

        A trainer that has to wait wakes the I/O thread first (once), so that it sees at once
        what the trainer consumed and asks for more, instead of at its next poll.
        """
        self.check_process()
        try:
            item = stream.ready.get_nowait()
        except queue.Empty:
            self.poke()
            item = None
        while item is None:
            try:
                item = stream.ready.get(timeout=0.25)
            except queue.Empty:
                if self._io.fatal is not None:
                    raise self._io.fatal from None
                if not self._io.alive:
                    raise ServerUnavailable(
                        "the client's I/O thread has stopped (closed?)") from None
        if isinstance(item, BaseException):
            raise item
        return item
