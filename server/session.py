"""One session: a client's plan, credit, queue of requested batches, unsent messages and
fast-path lease table.

A ``Session`` is the only code that changes its credit and queue.  Batches move through it as

    request()  ->  queued  --take()-->  gathering  --finished()-->  sent
                     ^                      |
                     +------ lost() --------+   (its worker died: asked again, first)

and it refuses any move that would break its rules: never more than ``prefetch`` batches queued
or being gathered (``CreditExceeded``), never a batch outside the epoch (``InvalidRequest``),
and ``check()`` verifies that the counters match the queue.  A request of a newer *stream* (the
client started over: a new epoch iterator) drops what is queued of the old one; batches of the
old stream that workers are gathering are dropped on arrival.

A sent message is *unsent* until ZeroMQ has handed all of it to the kernel (its
``MessageTracker`` is done): what the session's connection costs the server's memory beyond the
ring, bounded by ``SessionTable`` (``session_table.py``).

A batch whose task was lost (its worker died or timed out) is asked again alone, so that one bad
batch cannot take innocent ones with it; lost ``MAX_ATTEMPTS`` times, it fails (``lost``
returns it), and the session goes on with the rest.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchfeed.shared.errors import CreditExceeded, InvalidRequest
from batchfeed.shared.plan import BatchPlan

from .dataset import DatasetSpec
from .sizing import Sizing

if TYPE_CHECKING:
    from .leases import LeaseTable

log = logging.getLogger("batchfeed.server")

MAX_ATTEMPTS = 3  # a batch lost with its worker this often fails instead of being retried
MAX_NAME = 64  # characters of a client's name kept (for logs, stats and metrics)


Owner = tuple[bytes, str]  # (ZeroMQ routing id, CURVE public key or "") of a connection


@dataclass
class Session:
    """One client's connection state: its plan, its credit and the slots it holds.

    ``id`` names the session in the client's messages, which count only when they come from
    ``owner``, the connection that said HELLO; ``secret`` lets the same client resume it from
    a new connection; ``label`` is what others (stats, metrics) are shown instead of the id.
    """

    id: int
    owner: Owner
    dataset: DatasetSpec
    plan: BatchPlan
    prefetch: int
    max_chunk: int
    secret: str = ""
    label: str = ""
    table: LeaseTable | None = None  # the fast path's lease table, once a CLAIM was proved
    challenge: str = ""  # what a fast-path CLAIM must sign ("": none offered, or used)
    name: str = ""
    last_seen: float = 0.0
    stream: int = -1
    batches_sent: int = 0
    bytes_sent: int = 0
    position: tuple = (0, 0)  # (epoch, next k) as last requested
    at: tuple = (0, 0)  # (epoch, next k) of the trainer, as its client last said
    started: float = 0.0
    rate: float = 0.0  # batches/s, smoothed
    rate_mark: tuple = (0.0, 0)  # (time, batches_sent) at the last rate update
    _pending: deque = field(default_factory=deque)  # (epoch, k0, count) of the current stream
    _queued: int = 0  # batches in ``_pending``
    _gathering: int = 0  # batches of the current stream that workers are gathering
    _tasks_in_stream: int = 0
    _unsent: deque = field(default_factory=deque)  # (MessageTracker, nbytes), oldest first
    unsent_bytes: int = 0
    _attempts: Counter = field(default_factory=Counter)  # (epoch, k) -> times lost

    @property
    def route(self) -> bytes:
        return self.owner[0]

    @property
    def fastpath(self) -> bool:
        """Slots may be leased to it: it proved it shares this host's shared memory, and holds
        its lease table."""
        return self.table is not None and self.table.held()

    @property
    def leased(self) -> int:
        return len(self.table.slots) if self.table is not None else 0

    # ------------------------------------------------------------------ credit and queue

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def gathering(self) -> int:
        return self._gathering

    @property
    def has_work(self) -> bool:
        return bool(self._pending)

    def request(self, stream: int, epoch: int, k0: int, count: int) -> bool:
        """Queue batches ``k0 .. k0+count-1`` of ``epoch``; False for a late request of a
        stream the client has already left.  Raises when the request breaks the rules."""
        if stream < self.stream:
            return False
        bpe = self.plan.batches_per_epoch
        if epoch < 0 or count < 1 or k0 < 0 or k0 + count > bpe:
            raise InvalidRequest(
                f"request for epoch {epoch}, batches {k0}..{k0 + count - 1} is out of range: "
                f"an epoch has {bpe} batches (0..{bpe - 1})"
            )
        if stream > self.stream:
            self._new_stream(stream)
        if self._queued + self._gathering + count > self.prefetch:
            raise CreditExceeded(
                f"request for {count} more batches exceeds the session's prefetch of "
                f"{self.prefetch} ({self._queued + self._gathering} already queued)"
            )
        self._pending.append((epoch, k0, count))
        self._queued += count
        self.position = (epoch, k0 + count)
        return True

    def _new_stream(self, stream: int) -> None:
        self.stream = stream
        self._attempts.clear()
        self._pending.clear()
        self._queued = 0
        self._gathering = 0  # what workers gather of the old stream is dropped on arrival
        self._tasks_in_stream = 0

    def peek(self) -> tuple[int, int, int]:
        """(epoch, k0, count) of the next queued run."""
        return self._pending[0]

    def take(self) -> tuple[int, int, int]:
        """The next task's batches, (epoch, k0, count), moved from queued to gathering.  Small
        at a stream's start (a fast first batch), then up to ``max_chunk``."""
        epoch, k0, count = self._pending[0]
        size = min(self.max_chunk, 1 << min(self._tasks_in_stream, 16))
        if self._attempts and (epoch, k0) in self._attempts:
            size = 1  # a batch lost before goes alone, so that it fails alone
        take = max(1, min(size, count))
        if take == count:
            self._pending.popleft()
        else:
            self._pending[0] = (epoch, k0 + take, count - take)
        self._queued -= take
        self._gathering += take
        self._tasks_in_stream += 1
        return epoch, k0, take

    def untake(self, epoch: int, k0: int, count: int) -> None:
        """A task that never reached a worker: its batches go back to the head of the queue."""
        self._gathering -= count
        self._queued += count
        self._pending.appendleft((epoch, k0, count))
        self._check_counts()

    def lost(self, epoch: int, k0: int, count: int, blamed: bool) -> tuple[int, int] | None:
        """A task whose worker died or timed out (``blamed``: it was the task running then).
        Its batches go back to the head of the queue, each to be asked alone from now on;
        returns (epoch, k) of a batch lost ``MAX_ATTEMPTS`` times instead: it is given up (no
        longer gathering, nor queued), and the caller reports it failed."""
        if blamed and count == 1:
            self._attempts[epoch, k0] += 1
            if self._attempts[epoch, k0] >= MAX_ATTEMPTS:
                del self._attempts[epoch, k0]
                self.failed(1)
                return epoch, k0
        for k in range(k0, k0 + count):
            self._attempts[epoch, k] += 0  # marked: asked alone
        self.untake(epoch, k0, count)
        return None

    def attempts(self, epoch: int, k: int) -> int:
        return self._attempts.get((epoch, k), 0)

    def finished(self, epoch: int, k0: int, count: int, done: int) -> None:
        """A task of ``count`` batches came back with ``done`` of them gathered (fewer when a
        transform's output outgrew the slot: the rest is asked again, in smaller tasks)."""
        self._gathering -= count
        if self._attempts:
            for k in range(k0, k0 + done):
                self._attempts.pop((epoch, k), None)
        if done < count:
            self.max_chunk = max(1, done)
            self._queued += count - done
            self._pending.appendleft((epoch, k0 + done, count - done))
        self._check_counts()

    def failed(self, count: int) -> None:
        """A task failed (its error goes to the client in the batch's place)."""
        self._gathering -= count
        self._check_counts()

    def stall(self) -> None:
        """Silent but alive: drop what is queued (nothing is asked of workers for it)."""
        self._pending.clear()
        self._queued = 0

    def _check_counts(self) -> None:
        if self._gathering < 0 or self._queued < 0:
            raise AssertionError(f"session {self.id:x}: {self._queued} queued and "
                                 f"{self._gathering} gathering; neither may be negative")

    def check(self) -> None:
        """The counters match the queue, and credit holds."""
        self._check_counts()
        if self._queued != sum(count for _, _, count in self._pending):
            raise AssertionError(f"session {self.id:x}: {self._queued} queued, but the queue "
                                 f"holds {sum(c for _, _, c in self._pending)} batches")
        if self._queued + self._gathering > self.prefetch:
            raise AssertionError(f"session {self.id:x}: {self._queued + self._gathering} "
                                 f"batches queued or gathering, more than its credit "
                                 f"{self.prefetch}")

    # ------------------------------------------------------------------ unsent messages

    def sending(self, tracker: Any, nbytes: int) -> None:
        """A message of ``nbytes`` went to ZeroMQ; it is unsent until ``tracker`` is done."""
        self._unsent.append((tracker, nbytes))
        self.unsent_bytes += nbytes

    def reap(self) -> int:
        """Forget the messages ZeroMQ has handed on (in order: a peer's messages go out in
        order); the bytes freed."""
        freed = 0
        while self._unsent and self._unsent[0][0].done:
            freed += self._unsent.popleft()[1]
        self.unsent_bytes -= freed
        return freed

    @property
    def unsent(self) -> int:
        """Messages not yet handed to the kernel."""
        return len(self._unsent)

    # ------------------------------------------------------------------ reporting

    def trainer_at(self, at: object) -> None:
        """Where its client says the trainer is, [epoch, next batch] (for stats only)."""
        if isinstance(at, list) and len(at) == 2 and all(type(v) is int and v >= 0
                                                         for v in at):
            self.at = (at[0], at[1])

    def sent(self, batches: int, nbytes: int) -> None:
        self.batches_sent += batches
        self.bytes_sent += nbytes

    def update_rate(self, now: float) -> None:
        mark_t, mark_n = self.rate_mark
        if now - mark_t >= 1.0:
            self.rate = 0.5 * self.rate + 0.5 * (self.batches_sent - mark_n) / (now - mark_t)
            self.rate_mark = (now, self.batches_sent)

    def describe(self, now: float) -> dict:
        epoch, k = self.at
        params = self.plan.params
        return {
            "id": self.label, "name": self.name, "dataset": self.dataset.name,
            "batch_size": params.batch_size, "rank": params.rank,
            "world_size": params.world_size, "epoch": epoch, "next": k,
            "requested": list(self.position),
            "batches_per_epoch": self.plan.batches_per_epoch, "rate": round(self.rate, 1),
            "credit": self.prefetch, "queued": self._queued, "gathering": self._gathering,
            "leased": self.leased, "fastpath": self.table is not None and self.table.claimed,
            "unsent_bytes": self.unsent_bytes,
            "batches": self.batches_sent, "bytes": self.bytes_sent,
            "age_s": round(now - self.started, 1), "idle_s": round(now - self.last_seen, 1),
        }


def new_session(owner: Owner, dataset: DatasetSpec, plan: BatchPlan, sizing: Sizing,
                **kw: object) -> Session:
    """A session with a fresh random id and secret."""
    now = time.monotonic()
    kw["name"] = printable(str(kw.get("name") or ""))
    return Session(id=secrets.randbits(62), owner=owner, dataset=dataset, plan=plan,
                   prefetch=sizing.prefetch, max_chunk=sizing.max_chunk,
                   secret=secrets.token_hex(16), last_seen=now, started=now, rate_mark=(now, 0),
                   **kw)  # type: ignore[arg-type]


def printable(text: str, most: int = MAX_NAME) -> str:
    """A peer's name as others may be shown it: control and format characters (terminal
    escapes, bidi overrides) written out as escapes, and at most ``most`` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                  for c in text)
    return out if len(out) <= most else out[: most - 1] + "~"
