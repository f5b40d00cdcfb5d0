"""The outbox: everything the front end sends to clients, through its ROUTER socket.

- ``send``: one message to one connection, never blocking (a peer that is gone or does not read
  costs a dropped reply, never a stall);
- ``batch``: the send path of a gathered slot.  It never copies batch bytes itself, but once:
  the BATCH's frames point into the slot (``copy=False``) and the slot is free again when
  ZeroMQ's ``MessageTracker`` says so (``leases.track``); on the same-host fast path the BATCH
  only names the slot, leased to the client (``leases.lease``); past the lease budget the
  batch's bytes are copied once into frames of their own, so the slot is free at once and no
  client can hold another's slots.  Either way the message's bytes count as its connection's
  *unsent* (``SessionTable.sending_on``) until ZeroMQ has handed them to the kernel.

Nothing to shut down: the front end owns and closes the socket.
"""

from __future__ import annotations

import logging
from collections import Counter

import zmq

from batchfeed.shared import protocol

from . import tasks
from .leases import Leases
from .ring import SlotRing
from .scheduler import InFlight
from .session import Session
from .session_table import SessionTable

log = logging.getLogger("batchfeed.server")


class Outbox:
    def __init__(self, sock: zmq.Socket, ring: SlotRing, leases: Leases,
                 sessions: SessionTable, counters: Counter[str]):
        self.sock = sock
        self.ring = ring
        self.leases = leases
        self.sessions = sessions
        self.counters = counters  # the front end's: batches, bytes, copied_sends

    def send(self, route: bytes, frames: list, copy: bool = True) -> bool:
        """Queue a message for the connection ``route``; False if it cannot be (gone, or not
        reading: past the socket's high-water mark)."""
        try:
            self.sock.send_multipart([route, *frames], zmq.NOBLOCK, copy=copy)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client is gone; EAGAIN: not reading
            log.debug("cannot send to client: %s", exc)
            return False

    def batch(self, s: Session, job: InFlight, done: tasks.Done) -> None:
        """Send the batches a worker gathered into ``job``'s slot to ``s``."""
        task, slot = job.task, job.task.slot
        where = dict(session=s.id, stream=s.stream, epoch=task.epoch, k0=task.k0,
                     dtypes=done.dtypes, shapes=done.shapes)
        nbytes = sum(done.nbytes)
        s.sent(len(done.shapes), nbytes)
        self.counters["batches"] += len(done.shapes)
        self.counters["bytes"] += nbytes
        views = [self.ring.view(slot, off, n) for off, n in zip(done.offsets, done.nbytes)]
        fastpath = s.fastpath
        if not self.leases.may_hold(s.table, fastpath):
            self.leases.reap_sends()
            self.leases.collect_all()  # maybe some came back meanwhile
        if not self.leases.may_hold(s.table, fastpath):
            # Over the budget: a copy, so the slot is free at once and nobody waits on it.
            self.counters["copied_sends"] += 1
            frames = [zmq.Frame(bytes(view), copy=False, track=True) for view in views]
            self.ring.release(slot, job.holder)
            self._tracked(s, protocol.batch(buffers=frames, **where), frames, nbytes)
        elif fastpath:
            assert s.table is not None
            self.leases.lease(s.table, slot, job.holder)  # the byte is set before the send
            if not self.send(s.route, protocol.batch(slot=slot, offsets=done.offsets,
                                                     **where)):
                self.leases.take_back(s.table, slot)  # never went out
        else:
            # Every data frame points into the slot (zero-copy); the slot is free again once
            # ZeroMQ has released all of them.
            frames = [zmq.Frame(view, copy=False, track=True) for view in views]
            tracker = zmq.MessageTracker(*frames)
            self.leases.track(s.id, slot, job.holder, tracker)
            self._tracked(s, protocol.batch(buffers=frames, **where), frames, nbytes, tracker)

    def _tracked(self, s: Session, message: list, frames: list, nbytes: int,
                 tracker: zmq.MessageTracker | None = None) -> None:
        """Send a BATCH whose data frames are tracked: its bytes count as the connection's
        unsent until ZeroMQ has handed them on."""
        if self.send(s.route, message, copy=False):
            self.sessions.sending_on(s, tracker or zmq.MessageTracker(*frames), nbytes)
