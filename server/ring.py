"""The slot ring: a shared-memory segment cut into fixed-size slots that workers gather into.

Only the main process hands slots out and takes them back, and the ring records who holds each
one, so that a slot can only ever be given back by its holder:

- ``task``: a worker is gathering into it (owner: the task id);
- ``send``: a zero-copy message points into it until ZeroMQ releases the frames (owner: the
  session);
- ``lease``: a same-host client holds views of it (owner: the lease table it was leased
  through).

``acquire(holder)`` takes a free slot, ``hand_over(slot, old, new)`` moves it between holders
(a gathered slot goes to a send or a lease), ``release(slot, holder)`` gives it back.  Each of
them raises ``RingError`` when the slot is not held as the caller says: a bookkeeping bug, never
a client's doing (client input is checked before it reaches the ring).  ``check()`` verifies the
whole ring: every slot is free or held, exactly once.

Workers and same-host clients attach to the segment by name.  The first page holds a magic
string and a random proof, which a same-host client reads back to be sure it mapped this
server's ring and not a namesake, then a random key that never leaves the host: a client proves
it shares this server's memory by signing its session's challenge with it (the fast-path CLAIM).
"""

from __future__ import annotations

import secrets
from collections import Counter
from typing import NamedTuple

from batchfeed.shared.shm import (
    RING_KEY_BYTES,
    RING_KEY_OFFSET,
    RING_MAGIC,
    RING_PROOF_BYTES,
    SharedSegment,
    segment_name,
)

PAGE = 4096
HEADER_BYTES = PAGE

TASK = "task"
SEND = "send"
LEASE = "lease"


class Holder(NamedTuple):
    kind: str  # TASK, SEND or LEASE
    owner: int


class RingError(AssertionError):
    """The ring's bookkeeping was asked to do something that breaks its rules."""


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class SlotRing:
    """Owns the ring segment, the free list and the holder of every slot.  ``close`` unlinks
    the segment; safe to call twice."""

    def __init__(self, token: str, n_slots: int, slot_bytes: int, *, create: bool = True):
        self.token = token  # the server's segment name token (other segments use it too)
        self.n_slots = n_slots
        self.slot_bytes = round_up(slot_bytes, PAGE)
        self.proof = secrets.token_bytes(RING_PROOF_BYTES)
        self.key = secrets.token_bytes(RING_KEY_BYTES)  # a fast-path CLAIM signs with it
        self.segment: SharedSegment | None = None
        if create:
            size = HEADER_BYTES + self.n_slots * self.slot_bytes
            self.segment = SharedSegment.create(segment_name(token, "ring"), size)
            assert self.segment.buf is not None
            self.segment.buf[: RING_KEY_OFFSET + RING_KEY_BYTES] = (
                RING_MAGIC + self.proof + self.key)
        self._free: list[int] = list(range(n_slots))
        self._holders: list[Holder | None] = [None] * n_slots
        self._counts: Counter[Holder] = Counter()  # slots per holder
        self._kinds: Counter[str] = Counter()  # slots per kind of holder

    @property
    def name(self) -> str:
        return self.segment.name if self.segment is not None else ""

    @property
    def free_count(self) -> int:
        return len(self._free)

    # ------------------------------------------------------------------ holders

    def acquire(self, holder: Holder) -> int | None:
        """The slot released last (its pages are the likeliest to still be in the CPU's
        caches), now held by ``holder``; None when every slot is held."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._hold(slot, holder)
        return slot

    def hand_over(self, slot: int, old: Holder, new: Holder) -> None:
        self._expect(slot, old)
        self._unhold(slot, old)
        self._hold(slot, new)

    def release(self, slot: int, holder: Holder) -> None:
        self._expect(slot, holder)
        self._unhold(slot, holder)
        self._free.append(slot)

    def _hold(self, slot: int, holder: Holder) -> None:
        self._holders[slot] = holder
        self._counts[holder] += 1
        self._kinds[holder.kind] += 1

    def _unhold(self, slot: int, holder: Holder) -> None:
        self._holders[slot] = None
        self._counts[holder] -= 1
        if not self._counts[holder]:
            del self._counts[holder]
        self._kinds[holder.kind] -= 1

    def holder(self, slot: int) -> Holder | None:
        return self._holders[slot]

    def held(self) -> Counter[str]:
        """Slots held, by kind of holder."""
        return +self._kinds

    def count(self, holder: Holder) -> int:
        return self._counts[holder]

    def count_kind(self, kind: str) -> int:
        return self._kinds[kind]

    def _expect(self, slot: int, holder: Holder) -> None:
        if not 0 <= slot < self.n_slots:
            raise RingError(f"slot {slot} is not a slot of this ring (0..{self.n_slots - 1})")
        if self._holders[slot] != holder:
            raise RingError(f"slot {slot} is held by {self._holders[slot]}, not {holder}")

    def check(self) -> None:
        """Every slot is either free (once) or held (by exactly one holder)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise RingError("a slot is on the free list twice")
        for slot, h in enumerate(self._holders):
            if (h is None) != (slot in free):
                raise RingError(f"slot {slot} is {'free' if slot in free else 'not free'} "
                                f"but its holder is {h}")
        if Counter(h for h in self._holders if h is not None) != self._counts:
            raise RingError("the ring's per-holder counts do not match its slots")

    # ------------------------------------------------------------------ memory

    def offset(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.slot_bytes

    def view(self, slot: int, start: int, nbytes: int) -> memoryview:
        """A zero-copy view of ``nbytes`` at ``start`` inside ``slot``."""
        base = self.offset(slot) + start
        assert self.segment is not None and self.segment.buf is not None
        return memoryview(self.segment.buf)[base : base + nbytes]

    def usage(self) -> dict:
        """How the ring's slots are used, for stats and metrics."""
        held = self.held()
        return {"slots": self.n_slots, "slot_bytes": self.slot_bytes,
                "slots_free": self.free_count, "slots_busy": held[TASK] + held[SEND],
                "slots_leased": held[LEASE]}

    def describe(self) -> dict:
        """What a same-host client needs to map the ring and check it."""
        return {
            "name": self.name,
            "slots": self.n_slots,
            "slot_bytes": self.slot_bytes,
            "header": HEADER_BYTES,
            "proof": self.proof.hex(),
        }

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
