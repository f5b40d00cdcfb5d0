"""Fast-path leases, and the budget of slots that clients may hold at once.

**Lease tables.**  A same-host client that asks for the fast path must first prove it can read
this server's shared memory on this host: it signs its session's challenge with the key in the
ring's first page (CLAIM; ``claim_proof``).  Only a proved CLAIM gets a *lease table*: a small
0600 shared segment of one byte per ring slot, named to the client in GRANT.  The client opens
it and holds a shared ``flock`` on its descriptor for as long as it may hold views; once the
server sees that lock (``LeaseTable.held``) it unlinks the name, so no other process can open it,
and only then leases slots through it.  An unproved HELLO costs the server no segment and no
descriptor.

- The server sets a slot's byte to 1 when it leases the slot (before the BATCH naming it goes
  out); the client sets it back to 0 when its last view of the slot is gone, from whichever
  thread drops it, even after its I/O thread has ended.  ``collect`` frees the slots whose byte
  is 0: nobody but the client that holds a slot can give it back.
- No process holds the table's lock any more: the client process (and any child it forked) is
  gone, so its slots come back at once (``gone``), whether its session is open or closed.
- A table whose session has closed stays (an *orphan*) until every slot is back, or until no
  process holds its lock.  No other process can keep a table alive by claiming a pid.

**The budget.**  Leases and zero-copy sends hold slots beyond the gather.  Together they may hold
at most ``limit`` slots, leaving ``reserve`` for the workers, and one session's leases at most
its fair share of them (the limit split between the fast-path sessions); past that, a batch is
sent copied (the slot is free as soon as the message is built), so no client, however it holds
its views or stops reading, can stall another.

**Sends.**  A zero-copy send holds its slot until ZeroMQ's ``MessageTracker`` says the frames
pointing into it are released (``track``, ``reap_sends``).

``check`` verifies that the ring agrees with the tables and the sends.
"""

from __future__ import annotations

import fcntl
import logging
import secrets
from typing import Any

from batchfeed.shared.errors import ResourceError
from batchfeed.shared.shm import LEASE_TABLE_HEADER, SharedSegment, segment_name

from .ring import LEASE, SEND, Holder, SlotRing

log = logging.getLogger("batchfeed.server")

TABLE_HEADER = LEASE_TABLE_HEADER


class LeaseTable:
    """One fast-path session's table.  ``close`` unmaps it and closes its descriptor."""

    def __init__(self, token: str, serial: int, n_slots: int):
        self.id = serial
        tag = f"lease{serial}x{secrets.token_hex(8)}"  # not guessable from the serial
        self.segment = SharedSegment.create(segment_name(token, tag), TABLE_HEADER + n_slots,
                                            keep_fd=True)
        assert self.segment.buf is not None
        self.buf = self.segment.buf
        self.claimed = False  # the client holds its lock (and its name is gone)
        self.slots: set[int] = set()  # leased through this table and not yet given back

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def holder(self) -> Holder:
        return Holder(LEASE, self.id)

    def held(self) -> bool:
        """Whether the client has opened the table and holds its lock (checked until it does:
        then the name is unlinked, so nobody else may open it, and leases may begin)."""
        if not self.claimed and self._locked():
            self.claimed = True
            self.segment.unlink()
        return self.claimed

    def mark(self, slot: int) -> None:
        self.buf[TABLE_HEADER + slot] = 1
        self.slots.add(slot)

    def returned(self) -> list[int]:
        buf = self.buf
        return [slot for slot in self.slots if buf[TABLE_HEADER + slot] == 0]

    def holder_alive(self) -> bool:
        """Whether the client process (or a child it forked) still holds the table."""
        return self.claimed and self._locked()

    def _locked(self) -> bool:
        fd = self.segment.fd
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # someone holds a shared lock on it
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        self.segment.close()


class Leases:
    """The lease tables (of open sessions, and orphans) and the slot budget."""

    def __init__(self, ring: SlotRing, reserve: int):
        self.ring = ring
        self.reserve = max(1, min(reserve, ring.n_slots - 1))
        self.limit = ring.n_slots - self.reserve
        self.orphans: list[LeaseTable] = []
        self.sends: list[tuple[Any, int, Holder]] = []  # (MessageTracker, slot, its holder)
        self._serial = 0
        self._live: dict[int, LeaseTable] = {}  # table id -> table, of open sessions

    # ------------------------------------------------------------------ tables

    def grant(self) -> LeaseTable | None:
        """A new table for a session whose CLAIM was proved (None: no room in shared memory,
        or no descriptor left; the session then stays on the socket)."""
        self._serial += 1
        try:
            table = LeaseTable(self.ring.token, self._serial, self.ring.n_slots)
        except (ResourceError, OSError) as exc:
            log.warning("no fast path for a session: %s", exc)
            return None
        self._live[table.id] = table
        return table

    def gone(self) -> list[LeaseTable]:
        """Tables of open sessions whose client process is gone (nobody holds the lock): their
        sessions should close now, and their slots come back."""
        return [t for t in self._live.values() if t.claimed and not t.holder_alive()]

    def lease(self, table: LeaseTable, slot: int, gathered_by: Holder) -> None:
        self.ring.hand_over(slot, gathered_by, table.holder)
        table.mark(slot)

    def take_back(self, table: LeaseTable, slot: int) -> None:
        """A lease whose BATCH never went out: the slot is free again."""
        table.buf[TABLE_HEADER + slot] = 0
        self.collect(table)

    def collect(self, table: LeaseTable) -> int:
        """Free the slots the client gave back; how many."""
        back = table.returned()
        for slot in back:
            table.slots.discard(slot)
            self.ring.release(slot, table.holder)
        return len(back)

    def collect_all(self) -> int:
        freed = sum(self.collect(t) for t in self._live.values())
        for table in list(self.orphans):
            freed += self.collect(table)
            if not table.slots or not table.holder_alive():
                self._drop(table)
                self.orphans.remove(table)
        return freed

    def end(self, table: LeaseTable) -> None:
        """Its session closed: free what is back; the rest waits (an orphan) while the client
        process may still hold views of it."""
        self._live.pop(table.id, None)
        self.collect(table)
        if table.slots and table.holder_alive():
            self.orphans.append(table)
        else:
            self._drop(table)

    def _drop(self, table: LeaseTable) -> None:
        for slot in table.slots:
            self.ring.release(slot, table.holder)
        table.slots.clear()
        table.close()

    def track(self, session: int, slot: int, gathered_by: Holder, tracker: Any) -> None:
        """A zero-copy send of ``slot``: held until ``tracker`` is done."""
        holder = Holder(SEND, session)
        self.ring.hand_over(slot, gathered_by, holder)
        self.sends.append((tracker, slot, holder))

    def reap_sends(self) -> int:
        """Free the slots of the sends ZeroMQ is done with; how many."""
        if not self.sends:
            return 0
        still = []
        for tracker, slot, holder in self.sends:
            if tracker.done:
                self.ring.release(slot, holder)
            else:
                still.append((tracker, slot, holder))
        freed = len(self.sends) - len(still)
        self.sends = still
        return freed

    def close(self) -> None:
        self.sends.clear()
        for table in [*self._live.values(), *self.orphans]:
            table.close()
        self._live.clear()
        self.orphans.clear()

    # ------------------------------------------------------------------ the budget

    def may_hold(self, table: LeaseTable | None, lease: bool) -> bool:
        """Whether one more slot may wait on a session (whose lease table is ``table``): a
        lease (at most a fair share each), or a zero-copy send (bounded by the total only: a
        reading client frees them in microseconds, and a stalled one's are capped by its
        connection's unsent limit)."""
        if self.ring.count_kind(LEASE) + self.ring.count_kind(SEND) >= self.limit:
            return False
        return not lease or table is None or len(table.slots) < self.fair_share()

    def fair_share(self) -> int:
        """Leases one session may hold: the budget split between the fast-path sessions."""
        sharing = sum(1 for t in self._live.values() if t.claimed)
        return max(1, self.limit // max(1, sharing))

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        known = 0
        for table in [*self._live.values(), *self.orphans]:
            for slot in table.slots:
                if self.ring.holder(slot) != table.holder:
                    raise AssertionError(f"lease table {table.id} holds slot {slot}, which "
                                         f"the ring says {self.ring.holder(slot)} holds")
            known += len(table.slots)
        if self.ring.count_kind(LEASE) != known:
            raise AssertionError(f"the ring counts {self.ring.count_kind(LEASE)} leased slots; "
                                 f"the lease tables hold {known}")
        for _, slot, holder in self.sends:
            if self.ring.holder(slot) != holder:
                raise AssertionError(f"a send holds slot {slot}, which is held by "
                                     f"{self.ring.holder(slot)}")
        if self.ring.count_kind(SEND) != len(self.sends):
            raise AssertionError(f"the ring counts {self.ring.count_kind(SEND)} sends; "
                                 f"{len(self.sends)} are tracked")

    def leased(self) -> int:
        return self.ring.count_kind(LEASE)
