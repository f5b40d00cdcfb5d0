"""Fast-path leases: ring slots that same-host clients hold views of.

A slot gathered for a fast-path session is leased to it (``lease``) instead of being sent: the
client reads the slot itself, and gives it back (``release``) once its last view is gone.  Only
the session that holds a lease can end it.  A session that closes while its trainer still holds
views leaves those slots as *orphans*, freed once the client process is gone (``reap``): the
views stay valid until then, whatever the server does meanwhile.

``check`` verifies that the ring agrees: every lease is held in the ring by its session, and
the ring holds no lease that nobody here knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchfeed.shared import protocol
from batchfeed.shared.procs import same_process_alive

from .ring import LEASE, Holder, SlotRing

if TYPE_CHECKING:
    from .sessions import Session


@dataclass
class Orphans:
    """Slots a closed session's process still holds views of."""

    pid: int | None
    pid_start: int | None
    slots: set
    holder: Holder


class Leases:
    def __init__(self, ring: SlotRing):
        self.ring = ring
        self.orphans: list[Orphans] = []

    def lease(self, s: Session, slot: int, gathered_by: Holder) -> None:
        self.ring.hand_over(slot, gathered_by, Holder(LEASE, s.id))
        s.leased.add(slot)

    def release(self, s: Session, slots: object) -> None:
        """The client's views of ``slots`` are gone; slots it does not hold are ignored."""
        protocol.check_int_list(slots, "released slots", high=self.ring.n_slots - 1,
                                max_len=protocol.MAX_RELEASE)
        for slot in slots:  # type: ignore[attr-defined]
            if slot in s.leased:  # only the holder may give a slot back, and only once
                s.leased.discard(slot)
                self.ring.release(slot, Holder(LEASE, s.id))

    def move(self, old: Session, new: Session) -> None:
        """The same client after a reconnect: the slots it still holds views of are its own."""
        for slot in old.leased:
            self.ring.hand_over(slot, Holder(LEASE, old.id), Holder(LEASE, new.id))
        new.leased, old.leased = old.leased, set()

    def end(self, s: Session, still_held: set) -> None:
        """``s`` closes: the slots the client says it still holds views of wait for its
        process to exit; the others are free now."""
        kept = still_held & s.leased if s.client_alive() else set()
        if kept:
            self.orphans.append(Orphans(s.pid, s.pid_start, kept, Holder(LEASE, s.id)))
        for slot in s.leased - kept:
            self.ring.release(slot, Holder(LEASE, s.id))
        s.leased = set()

    def reap(self) -> None:
        """Free the orphans of processes that are gone."""
        for orphan in list(self.orphans):
            if orphan.pid is None or orphan.pid_start is None or not same_process_alive(
                    orphan.pid, orphan.pid_start):
                self.orphans.remove(orphan)
                for slot in orphan.slots:
                    self.ring.release(slot, orphan.holder)

    def check(self, sessions: dict[int, Session]) -> None:
        known = 0
        for s in sessions.values():
            for slot in s.leased:
                if self.ring.holder(slot) != Holder(LEASE, s.id):
                    raise AssertionError(f"session {s.id:x} leases slot {slot}, which is held "
                                         f"by {self.ring.holder(slot)}")
            known += len(s.leased)
        for orphan in self.orphans:
            for slot in orphan.slots:
                if self.ring.holder(slot) != orphan.holder:
                    raise AssertionError(f"orphaned slot {slot} is held by "
                                         f"{self.ring.holder(slot)}, not {orphan.holder}")
            known += len(orphan.slots)
        if self.ring.held()[LEASE] != known:
            raise AssertionError(f"the ring counts {self.ring.held()[LEASE]} leased slots; "
                                 f"sessions and orphans hold {known}")
