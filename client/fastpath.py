"""The same-host fast path: read batches straight out of the server's slot ring.

The client maps the ring read-only and checks the proof the server wrote in its first page.
For a BATCH that names a slot, ``lease`` returns one uint8 array per field over that slot; every
batch view the trainer gets is derived from one *lease array* per message (numpy keeps it as
the views' ``base``).  When the last view is gone the lease array is collected and ``on_free``
gives the slot back, so no view can ever see a slot rewritten under it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from batchfeed.shared.errors import ProtocolError
from batchfeed.shared.protocol import ChunkLayout
from batchfeed.shared.shm import RING_MAGIC, SharedSegment


class RingMap:
    """A read-only mapping of a server's ring, or an error saying why it cannot be used."""

    def __init__(self, ring: dict):
        try:
            self.name = str(ring["name"])
            self.slots = int(ring["slots"])
            self.slot_bytes = int(ring["slot_bytes"])
            self.header = int(ring["header"])
            proof = bytes.fromhex(str(ring["proof"]))
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("the server's ring description is malformed") from None
        self.key = f"{self.name}/{proof.hex()}"  # identifies this ring of this server run
        segment = SharedSegment.attach(self.name)  # OSError: not on this host
        if segment.buf is None or segment.size < self.header + self.slots * self.slot_bytes:
            raise ProtocolError(f"shared segment {self.name} is smaller than the ring it should be")
        if segment.buf[: len(RING_MAGIC) + len(proof)] != RING_MAGIC + proof:
            raise ProtocolError(f"shared segment {self.name} is not this server's ring")
        self._segment = segment

    def same(self, ring: dict) -> bool:
        """Whether a WELCOME's ring description is this ring (same server run)."""
        return ring.get("name") == self.name and self.key.endswith(str(ring.get("proof")))

    def lease(self, slot: int, offsets: list, layout: ChunkLayout,
              on_free: Callable[[], None]) -> list[np.ndarray]:
        """One read-only uint8 array per field over ``slot``; ``on_free`` runs when all are gone."""
        if not 0 <= slot < self.slots or len(offsets) != len(layout.names):
            raise ProtocolError(f"batch names slot {slot} with {len(offsets)} offsets; the ring "
                                f"has {self.slots} slots and the batch {len(layout.names)} fields")
        # A fresh array straight over the mapping (not a view of another array): numpy then
        # makes it the base of every view derived from it, and keeps the mapping alive.
        lease = np.frombuffer(self._segment.buf, dtype=np.uint8, count=self.slot_bytes,
                              offset=self.header + slot * self.slot_bytes)
        weakref.finalize(lease, on_free)
        out = []
        for f, off in enumerate(offsets):
            n = layout.field_nbytes(f)
            if type(off) is not int or off < 0 or off + n > self.slot_bytes:
                raise ProtocolError(f"field {layout.names[f]!r} lies outside slot {slot}")
            out.append(lease[off : off + n])
        return out
