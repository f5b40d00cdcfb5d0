"""Sessions: one client's plan, credit, queue of requested batches, unsent messages and
fast-path leases.

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
``MessageTracker`` is done): ``unsent_bytes`` is what this session costs the server's memory
beyond the ring, and the scheduler gives a session no more work while it is at its limit
(``Limits.unsent_bytes``), so a peer that asks but never reads cannot grow the server.

A batch whose task was lost (its worker died or timed out) is asked again alone, so that one bad
batch cannot take innocent ones with it; lost ``MAX_ATTEMPTS`` times, it fails
(``give_up``), and the session goes on with the rest.

``SessionTable`` holds the open sessions: the only code that opens (within ``Limits``: sessions
per connection and in all), finds (for a message that names one), expires and closes them; a
fast-path session whose client process is gone (nobody holds its lease table's lock) closes at
once.  ``size_session`` is HELLO's sizing policy: how big a batch is, how many batches go in
one message (``max_chunk``) and the default prefetch.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchfeed.shared.batches import MAX_BATCHES_PER_MESSAGE
from batchfeed.shared.errors import CreditExceeded, InvalidRequest, ResourceError, UnknownSession
from batchfeed.shared.plan import BatchPlan

from .config import Limits
from .dataset import DatasetSpec

if TYPE_CHECKING:
    from .leases import Leases, LeaseTable

log = logging.getLogger("batchfeed.server")

MAX_PREFETCH = 4096
AUTO_PREFETCH_BYTES = 64 * 2**20
AUTO_PREFETCH_MAX = 1024  # batches
MAX_ATTEMPTS = 3  # a batch lost with its worker this often fails instead of being retried
MAX_NAME = 64  # characters of a client's name kept (for logs, stats and metrics)
MAX_REPORTED = 200  # sessions listed in a REPORT (its header must stay under the size limit)


@dataclass(frozen=True)
class BatchEstimate:
    """How big one batch is in a slot: exact for fixed fields, an estimate for ragged ones
    (workers cut chunks that outgrow their slot, and refuse a single batch too big)."""

    nbytes: int
    exact: bool = True
    growth: int = 1  # an undeclared transform's output may be this much bigger (uint8->float32)
    what: str = "one batch"
    hint: str = ""  # what to ask for instead, when more rows than the data has made it big


@dataclass(frozen=True)
class Sizing:
    batch_bytes: int  # one batch of the served fields, as gathered into a slot
    max_chunk: int  # batches per task (and per message)
    prefetch: int


def size_session(estimate: BatchEstimate, prefetch: int, slot_bytes: int,
                 chunk_bytes: int) -> Sizing:
    """Size a session's messages; raise InvalidRequest when one batch cannot fit a slot."""
    batch_bytes = max(1, estimate.nbytes)
    prefetch = prefetch or auto_prefetch(batch_bytes, chunk_bytes)
    if not 1 <= prefetch <= MAX_PREFETCH:
        raise InvalidRequest(f"prefetch must be in [1, {MAX_PREFETCH}], got {prefetch}")
    if estimate.exact and batch_bytes > slot_bytes:
        if estimate.hint:  # more rows than the data has: a smaller batch_size is the fix
            raise InvalidRequest(
                f"{estimate.what} is {batch_bytes:,} bytes, more than this server's slot "
                f"size ({slot_bytes:,} bytes); ask for {estimate.hint}")
        raise InvalidRequest(
            f"{estimate.what} is {batch_bytes} bytes, more than this server's slot size "
            f"({slot_bytes} bytes); use a smaller batch_size or restart the server with "
            f"--slot-mb {-(-batch_bytes // 2**20)} or more"
        )
    budget = min(slot_bytes, chunk_bytes)
    max_chunk = max(1, min(budget // (batch_bytes * estimate.growth),
                           MAX_BATCHES_PER_MESSAGE))
    return Sizing(batch_bytes, max_chunk, prefetch)


def auto_prefetch(batch_bytes: int, chunk_bytes: int) -> int:
    """The default prefetch: 64 MiB of batches, or four messages' worth if more (so that
    several are on their way at once), between 8 and 1,024 batches.  Over a socket the window
    must cover the time a request takes to come back as batches (the gather, two copies through
    the kernel, a loaded host's scheduling): 64 MiB gave 20-40% more than 24 MiB on the tabular
    job on this 2-core machine, and more gave nothing."""
    window = max(AUTO_PREFETCH_BYTES, 4 * chunk_bytes)
    return max(8, min(AUTO_PREFETCH_MAX, window // batch_bytes))


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


class SessionTable:
    """The open sessions, by id."""

    def __init__(self, leases: Leases, limits: Limits | None = None):
        self.by_id: dict[int, Session] = {}
        self.leases = leases
        self.limits = limits or Limits()
        self._serial = 0
        self.sending: dict[int, Session] = {}  # with unsent messages (closed ones too)
        self.unsent_bytes = 0  # theirs, all together ...
        self.unsent_by_owner: Counter[Owner] = Counter()  # ... and per connection

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.by_id.values()))

    def open(self, s: Session, resume: int | None, resume_secret: str | None) -> None:
        """Add ``s``.  ``resume``: the session this client had before it reconnected, closed
        now if ``resume_secret`` is its secret (its leases wait for the client's views)."""
        old = self.by_id.get(resume) if resume is not None else None
        if old is not None and resume_secret is not None and \
                hmac.compare_digest(old.secret, resume_secret):
            self.close(old, f"resumed as {s.id:x}")
        self.check_room(s.owner)
        self._serial += 1
        s.label = f"s{self._serial}"
        self.by_id[s.id] = s

    def check_room(self, owner: Owner) -> None:
        """ResourceError unless ``owner`` may open one more session."""
        limits = self.limits
        if len(self.by_id) >= limits.sessions:
            raise ResourceError(
                f"this server has {len(self.by_id)} sessions open, its limit "
                "(--max-sessions); close clients you no longer use (Client.close()), or "
                "restart the server with a higher --max-sessions")
        mine = sum(1 for s in self.by_id.values() if s.owner == owner)
        if mine >= limits.per_connection:
            raise ResourceError(
                f"this connection has {mine} sessions open, the server's limit per connection "
                "(--max-sessions-per-connection); a client needs one: close the ones you no "
                "longer use (Client.close()) before opening more")

    def find(self, session_id: int, owner: Owner) -> Session:
        """The session a message names, if the message comes from its owner; otherwise
        ``UnknownSession``, and nothing changes (another peer cannot touch it)."""
        s = self.by_id.get(session_id)
        if s is None or s.owner != owner:
            raise UnknownSession(
                f"session {session_id:x} is unknown on this connection (the server restarted, "
                "the session expired, or it belongs to another connection); the client "
                "reconnects with a new session"
            )
        s.last_seen = time.monotonic()
        return s

    def close(self, s: Session, why: str) -> None:
        """Forget ``s`` and reclaim its slots (but those whose views its trainer kept past
        close()); its in-flight tasks are dropped on arrival."""
        log.info("session %x (%s) closed: %s", s.id, s.label, why)
        if s.table is not None:
            self.leases.end(s.table)
            s.table = None
        s.stall()
        self.by_id.pop(s.id, None)  # its unsent messages stay counted until ZeroMQ lets go

    # ------------------------------------------------------------------ unsent messages

    def sending_on(self, s: Session, tracker: Any, nbytes: int) -> None:
        s.sending(tracker, nbytes)
        self.sending[s.id] = s
        self.unsent_bytes += nbytes
        self.unsent_by_owner[s.owner] += nbytes

    def reap(self) -> int:
        """Forget every message ZeroMQ has handed to the kernel (or dropped with its
        connection), of open and closed sessions alike; the bytes freed."""
        freed = 0
        for sid, s in list(self.sending.items()):
            n = s.reap()
            if n:
                freed += n
                self.unsent_by_owner[s.owner] -= n
                if self.unsent_by_owner[s.owner] <= 0:
                    del self.unsent_by_owner[s.owner]
            if not s.unsent:
                del self.sending[sid]
        self.unsent_bytes -= freed
        return freed

    def may_send(self, s: Session) -> bool:
        """Whether ``s`` may be given more work: its connection below its unsent limit, and
        the server below its total (a connection with nothing unsent may always send)."""
        mine = self.unsent_by_owner.get(s.owner, 0)
        if not mine:
            return True
        return mine < self.limits.unsent_bytes and \
            self.unsent_bytes < self.limits.total_unsent_bytes

    def expire(self, now: float, timeout: float) -> None:
        """Update rates; close sessions silent for ``timeout`` (a stalled same-host client that
        still holds views keeps its leases, and only its queue is dropped)."""
        for s in self:
            s.update_rate(now)
            if s.table is not None and s.table.claimed and not s.table.holder_alive():
                self.close(s, "its client process is gone (it let go of its lease table)")
                continue
            if now - s.last_seen > timeout:
                if s.table is not None and s.table.slots and s.table.holder_alive():
                    s.stall()
                    continue
                self.close(s, f"silent for {timeout:g} s")

    def check(self) -> None:
        for s in self.by_id.values():
            s.check()

    def describe(self, most: int | None = None) -> list[dict]:
        """The sessions as others may see them (labels, never ids), the first ``most``."""
        now = time.monotonic()
        return [s.describe(now) for s in list(self.by_id.values())[:most]]
