"""Iterating a client: ``EpochIterator`` (one epoch's batches, in plan order, from the client's
current stream), ``StreamIterator`` (``Client.stream()``: epoch after epoch, without end) and
``Progress``, the trainer-side record a client's iterators share: where the trainer is (what
``Client.state_dict()`` saves) and what it consumed and waited (``Client.stats()``).

An iterator reads its stream through the connection (``Connection.take``), tells the I/O
thread how far the trainer is, and keeps ``Progress``; it knows nothing else of the client.
Another ``client.epoch()`` call supersedes it (it raises IteratorSuperseded from then on, also
in a thread blocked in ``next()``); ``close()`` or dropping it stops the prefetching.  Nothing
else to shut down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from batchfeed.shared.errors import IteratorSuperseded

from .stream import Stream

if TYPE_CHECKING:
    from .connection import Connection


class Stats:
    """What the trainer consumed and how long it waited (``Client.stats()``)."""

    def __init__(self) -> None:
        self.batches = 0
        self.bytes = 0
        self.wait_s = 0.0
        self.started: float | None = None

    def snapshot(self) -> dict[str, float]:
        wall = time.perf_counter() - self.started if self.started is not None else 0.0
        return {
            "batches": self.batches,
            "bytes": self.bytes,
            "wait_s": self.wait_s,
            "wall_s": wall,
            "wait_fraction": self.wait_s / wall if wall > 0 else 0.0,
            "batches_per_s": self.batches / wall if wall > 0 else 0.0,
            "bytes_per_s": self.bytes / wall if wall > 0 else 0.0,
        }


class Progress:
    """Where a client's trainer is: the epoch last iterated and the first batch of it not yet
    handed out (what a checkpoint saves), and its counters."""

    def __init__(self) -> None:
        self.epoch = 0
        self.next_batch = 0
        self.stats = Stats()

    @property
    def at(self) -> tuple[int, int]:
        return self.epoch, self.next_batch


class EpochIterator:
    """Batches of one epoch in plan order; ``len()`` is the number still to come.

    When it is read to the end, the client goes on prefetching the next epoch, which the next
    ``client.epoch(e + 1)`` picks up; stopping early (``close()``, or dropping the iterator)
    stops the prefetching.  Another ``client.epoch()`` call while it still has batches to give
    supersedes it: from then on ``next()`` raises IteratorSuperseded.
    """

    def __init__(self, conn: Connection, progress: Progress, stream: Stream, epoch: int,
                 start: int, convert: Callable[[dict], dict] | None = None):
        self._conn = conn
        self._progress = progress
        self._convert = convert
        self._stream = stream
        self._stats = progress.stats
        self._epoch = epoch
        self._k = start
        self._next = stream.position(epoch, start)
        self._end = stream.position(epoch + 1, 0)
        self._notified = self._next
        self._superseded: str | None = None  # what replaced this iterator, once one did

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def next_batch(self) -> int:
        """The number of the next batch it gives (the epoch's length once read to its end)."""
        return self._k

    @property
    def live(self) -> bool:
        """Whether it still has batches to give (not read to the end, closed or superseded)."""
        return self._superseded is None and self._next < self._end

    def _supersede(self, why: str) -> None:
        """Another iterator replaced this one: raise ``why`` from now on, and wake a thread
        that waits in ``next()`` (its stream is left: nothing else reads its queue)."""
        self._superseded = (f"{why} (which was at batch {self._k}): a Client serves one "
                            "iterator at a time; read an iterator to its end or close() it "
                            "before asking for another, and use one Client per concurrent reader")
        self._stream.abandoned = True
        self._stream.ready.put(IteratorSuperseded(self._superseded))

    def __len__(self) -> int:
        return self._end - self._next

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._superseded is not None:
            raise IteratorSuperseded(self._superseded)
        if self._next >= self._end:
            raise StopIteration
        stats, stream = self._stats, self._stream
        if stats.started is None:
            stats.started = time.perf_counter()
        (batch, nbytes), waited = self._conn.take(stream)
        if self._superseded is not None:  # replaced while it waited
            raise IteratorSuperseded(self._superseded)
        stats.wait_s += waited
        self._next += 1
        self._k += 1
        self._progress.epoch, self._progress.next_batch = self._epoch, self._k
        # Tell the I/O thread how far the trainer is every ``unit`` batches, and at its first
        # batch of an epoch: that moves the request horizon a whole epoch on (running on, the
        # stream asks for batches up to the end of the epoch after the trainer's).
        if self._next - self._notified >= self._conn.unit or self._k == 1:
            self._notified = self._next
            self._conn.poke()
        stats.batches += 1
        stats.bytes += nbytes
        return batch if self._convert is None else self._convert(batch)

    def close(self) -> None:
        """Stop early: the client stops requesting.  Safe to call twice."""
        if self._next < self._end:
            self._next = self._end
            self._stream.abandoned = True
            self._conn.cancel(self._stream)

    def __del__(self) -> None:
        # Best effort: an abandoned iterator stops asking the server for more batches.
        if getattr(self, "_end", None) is not None and self._next < self._end:
            self._stream.abandoned = True
            self._conn.cancel(self._stream)


class StreamIterator:
    """``Client.stream()``: the batches of ``start_epoch`` from ``start_batch`` on, then every
    batch of the epochs after it, without end (each epoch is an ``EpochIterator`` of the
    client, opened when the last one is read to its end, so the prefetch runs across the
    boundary).  ``epoch`` and ``next_batch`` say where it is, as ``Client.state_dict()`` does.
    """

    def __init__(self, open_epoch: Callable[[int, int], EpochIterator],
                 current: Callable[[], EpochIterator | None], batches_per_epoch: int,
                 start_epoch: int, start_batch: int):
        self._open_epoch = open_epoch  # the client's epoch(e, k), with the stream's options
        self._current = current  # the iterator the client's last epoch() call made
        self._bpe = batches_per_epoch
        self._batches = open_epoch(start_epoch, start_batch)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._position()[0]

    @property
    def next_batch(self) -> int:
        """The number of the next batch within ``epoch``."""
        return self._position()[1]

    def _position(self) -> tuple[int, int]:
        batches = self._batches
        if batches.next_batch >= self._bpe:  # read to its end: the next epoch's first
            return batches.epoch + 1, 0
        return batches.epoch, batches.next_batch

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                return next(self._batches)
            except StopIteration:
                pass
            if self._current() is not self._batches:  # another epoch() call came: it reads
                raise IteratorSuperseded(
                    f"another epoch() or stream() call replaced this stream (at epoch "
                    f"{self._batches.epoch + 1}, batch 0): a Client serves one iterator at a "
                    "time; use one Client per concurrent reader")
            self._batches = self._open_epoch(self._batches.epoch + 1, 0)

    def close(self) -> None:
        """Stop: the client stops requesting.  Safe to call twice."""
        self._batches.close()
