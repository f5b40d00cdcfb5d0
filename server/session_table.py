"""The session table: the open sessions, by id; the only code that opens them (within the
server's ``Limits``: sessions per connection and in all), finds one for a message that names it
(only from the connection that opened it), expires and closes them.  A fast-path session whose
client process is gone (nobody holds its lease table's lock) closes at once.

It also bounds what a connection may have *unsent* (sent to ZeroMQ, not yet handed to the
kernel: a peer that asks but never reads): ``may_send`` gives a session no more work while its
connection is at ``Limits.unsent_bytes``, or the server at its total.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from batchfeed.shared.errors import ResourceError, UnknownSession

from .config import Limits
from .session import Owner, Session

if TYPE_CHECKING:
    from .leases import Leases

log = logging.getLogger("batchfeed.server")

MAX_REPORTED = 200  # sessions listed in a REPORT (its header must stay under the size limit)


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
