"""The same-host fast path: read batches straight out of the server's slot ring.

``RingMap`` maps a server's ring read-only, checks the proof the server wrote in its first page
and reads the ring's key, with which the client signs its session's challenge (CLAIM): that
proves this process shares the server's shared memory.  ``LeaseBook`` is the client's side of
the lease table the server then grants (see the server's ``leases.py``): this process holds a
shared ``flock`` on it for as long as the book lives, which is how the server knows the client
is still there.

For a BATCH that names a slot, ``RingMap.lease`` returns one uint8 array per field over that
slot; every batch view the trainer gets is derived from one *lease array* per message (numpy
keeps it as the views' ``base``).  When the last view is gone the lease array is collected, and
its finalizer clears the slot's byte in the book (the slot is given back) and nudges the I/O
thread.  The finalizer holds the book, never the client, so it works from any thread and after
the client has closed; the book (its mapping and its lock) lives until the last lease is back.
No view can ever see its slot rewritten under it.

Leases belong to the process that made them: in a child forked from it (whose copies of the
views and finalizers run at its exit), ``give_back`` and ``Nudge`` do nothing, so a child can
never hand back a slot its parent still reads.
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from collections.abc import Callable

import numpy as np

from batchfeed.shared.errors import ProtocolError
from batchfeed.shared.protocol import ChunkLayout
from batchfeed.shared.shm import (
    LEASE_TABLE_HEADER,
    RING_KEY_BYTES,
    RING_KEY_OFFSET,
    RING_MAGIC,
    SharedSegment,
    claim_proof,
)


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
        self._key = bytes(segment.buf[RING_KEY_OFFSET : RING_KEY_OFFSET + RING_KEY_BYTES])
        self._segment = segment

    def prove(self, challenge: str) -> str:
        """A CLAIM's proof for ``challenge``: signed with the key only this host can read."""
        return claim_proof(self._key, challenge)

    def same(self, ring: dict) -> bool:
        """Whether a WELCOME's ring description is this ring (same server run)."""
        return ring.get("name") == self.name and self.key.endswith(str(ring.get("proof")))

    def lease(self, slot: int, offsets: list, layout: ChunkLayout, book: LeaseBook,
              nudge: Callable[[], None]) -> list[np.ndarray]:
        """One read-only uint8 array per field over ``slot``; once all are gone the slot is
        given back in ``book`` and ``nudge`` runs."""
        if not 0 <= slot < self.slots or len(offsets) != len(layout.names):
            raise ProtocolError(f"batch names slot {slot} with {len(offsets)} offsets; the ring "
                                f"has {self.slots} slots and the batch {len(layout.names)} fields")
        # A fresh array straight over the mapping (not a view of another array): numpy then
        # makes it the base of every view derived from it, and keeps the mapping alive.
        lease = np.frombuffer(self._segment.buf, dtype=np.uint8, count=self.slot_bytes,
                              offset=self.header + slot * self.slot_bytes)
        weakref.finalize(lease, book.give_back, slot, nudge)
        out = []
        for f, off in enumerate(offsets):
            n = layout.field_nbytes(f)
            if type(off) is not int or off < 0 or off + n > self.slot_bytes:
                book.give_back(slot)
                raise ProtocolError(f"field {layout.names[f]!r} lies outside slot {slot}")
            out.append(lease[off : off + n])
        return out


class LeaseBook:
    """This process's side of one session's lease table (OSError if it cannot be opened:
    the server is on another host, or another user's)."""

    def __init__(self, name: str, slots: int):
        segment = SharedSegment.attach(name, writable=True, keep_fd=True)
        try:
            if segment.buf is None or segment.size < LEASE_TABLE_HEADER + slots:
                raise ProtocolError(f"lease table {name} is smaller than the server's ring")
            assert segment.fd is not None
            fcntl.flock(segment.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BaseException:
            segment.close()
            raise
        self.slots = slots
        self._buf = segment.buf
        self._pid = os.getpid()  # the process whose views these leases are
        # The mapping and the lock go when the book does (after its last lease is back).
        weakref.finalize(self, segment.close)

    def give_back(self, slot: int, nudge: Callable[[], None] | None = None) -> None:
        if os.getpid() != self._pid:
            return  # a forked child's copy: the slot is its parent's to give back
        if 0 <= slot < self.slots:
            self._buf[LEASE_TABLE_HEADER + slot] = 0
        if nudge is not None:
            nudge()


class Nudge:
    """Wakes the I/O thread from any thread; a no-op once closed.  The lock (reentrant: a
    finalizer may run inside a nudge of the same thread) keeps a write from racing the pipe's
    close, after which its number may belong to another file."""

    def __init__(self, fd: int):
        self._fd: int | None = fd
        self._lock = threading.RLock()
        self._pid = os.getpid()

    def __call__(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child: the pipe wakes its parent's thread, not one of its own
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, b"\0")
            except OSError:
                pass  # full (a wake-up is pending anyway)

    def close(self, close_fd: Callable[[int], None]) -> None:
        """Stop nudging, then close the descriptor with ``close_fd``."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                close_fd(fd)
