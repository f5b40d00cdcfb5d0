"""A stream: the trainer's batches from (epoch, start) on, in plan order, running on across epochs,
shared by the trainer's thread and the client's I/O thread.

Running on means the next epoch is prefetched while the trainer finishes this one, so an epoch
boundary costs no wait. A stream has one window per *lane*: one lane over servers of the whole
dataset, or one per shard of a sharded dataset, whose pieces ``merger`` puts together. Who
writes what: the I/O thread owns ``windows``, ``merger`` and ``delivered`` (the trainer only
reads ``broken``) and puts lists of in-order ``(batch, nbytes)``, or the error that ends the
stream, on ``ready``; the trainer reads ``ready`` and owns ``consumed``, ``abandoned``,
``items`` and ``read``. The one other writer: a newer ``client.epoch()`` that supersedes the
iterator reading this stream puts IteratorSuperseded on ``ready`` (waking a trainer thread
blocked there) and leaves the stream for a new one, so no other iterator ever reads this one's
queue. Nothing to shut down: the I/O thread drops a stream that is cancelled or replaced.
"""

from __future__ import annotations

import queue

from .shards import ShardMerger
from .window import Credit, Positions, Window


class Stream:
    def __init__(self, stream_id: int, positions: Positions, lanes: list[Credit],
                 merger: ShardMerger | None = None):
        self.id = stream_id
        self.positions = positions
        # One window per lane (links are named by address); several lanes: shards.
        self.windows: list[Window[str]] = [Window(positions, credit) for credit in lanes]
        self.merger = merger
        self.delivered = 0  # positions put on ``ready``
        self.ready: queue.SimpleQueue = queue.SimpleQueue()  # lists of (batch, nbytes), errors
        self.consumed = 0  # positions handed to the trainer
        self.abandoned = False  # the trainer left it
        self.items: list = []  # the list of batches being read, and how far
        self.read = 0

    @property
    def window(self) -> Window[str]:
        """The window of a stream with one lane."""
        return self.windows[0]

    @property
    def broken(self) -> bool:
        """An error was handed over: the stream ends there."""
        return any(w.broken for w in self.windows)

    @property
    def next_deliver(self) -> int:
        """The first position not yet put on ``ready`` (read-only here)."""
        return self.delivered

    def position(self, epoch: int, k: int) -> int:
        """The stream position of batch ``k`` of ``epoch``."""
        return self.positions.position(epoch, k)

    def at(self, epoch: int, k: int) -> bool:
        """Whether the trainer's next batch is batch ``k`` of ``epoch``."""
        return self.positions.where(self.consumed) == (epoch, k)
