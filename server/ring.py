"""The slot ring: a shared-memory segment cut into fixed-size slots that workers gather into.

Only the main process hands slots out and takes them back (``acquire``/``release``); a slot is
busy from the moment a task is given it until ZeroMQ has released the last frame that points
into it, or, on the same-host fast path, until the client that holds views of it says it is
done.  Workers and same-host clients attach to the segment by name.

The first page holds a magic string and a random proof, which a same-host client reads back to
be sure it mapped this server's ring and not a namesake.
"""

from __future__ import annotations

import secrets
from collections import deque

from batchfeed.shared.shm import RING_MAGIC, SharedSegment, segment_name

PAGE = 4096
HEADER_BYTES = PAGE


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class SlotRing:
    """Owns the ring segment and the free list.  ``close`` unlinks it; safe to call twice."""

    def __init__(self, token: str, n_slots: int, slot_bytes: int):
        self.token = token  # the server's segment name token (other segments use it too)
        self.n_slots = n_slots
        self.slot_bytes = round_up(slot_bytes, PAGE)
        self.proof = secrets.token_bytes(16)
        size = HEADER_BYTES + self.n_slots * self.slot_bytes
        self.segment = SharedSegment.create(segment_name(token, "ring"), size)
        assert self.segment.buf is not None
        self.segment.buf[: len(RING_MAGIC) + len(self.proof)] = RING_MAGIC + self.proof
        self._free: deque[int] = deque(range(n_slots))

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def free_count(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """The slot released last: its pages are the likeliest to still be in the CPU's
        caches (handing slots out round robin would stream through the whole ring)."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def offset(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.slot_bytes

    def view(self, slot: int, start: int, nbytes: int) -> memoryview:
        """A zero-copy view of ``nbytes`` at ``start`` inside ``slot``."""
        base = self.offset(slot) + start
        assert self.segment.buf is not None
        return memoryview(self.segment.buf)[base : base + nbytes]

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
        self.segment.close()
