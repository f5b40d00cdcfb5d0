"""A client's servers, as its I/O thread sees them: one ``Link`` per server, the *lanes* they
serve (one lane over servers of the whole dataset, or one per shard) and each lane's credit.

- At start every server must answer (``welcomed``); the first WELCOME sets the job's data (its
  fingerprint, transform, size and fields) and every later one (another server, a reconnect, a
  server that joined) must agree, or the client stops with ``DataMismatch``.
- Once all have answered, their shards decide the lanes (``shards.assign_lanes``: complete, or
  an error); a server that joins later is placed in its shard's lane.  A lane's prefetch is
  split over the servers it has now (``reshare``), whenever one joins or leaves.
- A server set may change them (``set_members``): links to servers that appeared, none to
  those that left; what a departed or lost server owed goes back to its lane's window.
- Liveness: a lost server is reported at once, and every ``RECONNECT_WARN_S`` while its lane has
  none; after ``reconnect_timeout`` the trainer gets ServerUnavailable.

Owned by the I/O thread (``io_thread.py``), which calls everything here; the trainer's thread
reads ``welcome``, ``credit``, ``lanes`` and waits on ``welcomed``.  ``close`` is the I/O
thread's goodbye: BYE to every server, then the sockets closed.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import zmq

from batchfeed.shared.errors import DataMismatch, ServerUnavailable

from .link import Link, LinkConfig, Welcome
from .options import ClientConfig
from .shards import ShardMerger, assign_lanes, held
from .window import Credit

if TYPE_CHECKING:
    from .stream import Stream

log = logging.getLogger("batchfeed.client")

BYE_TIMEOUT_MS = 1000  # how long closing waits for a server to acknowledge BYE
RECONNECT_WARN_S = 10.0  # while a server stays away, a warning this often


class Servers:
    def __init__(self, config: ClientConfig):
        self.config = config
        self.links: list[Link] = []
        self.welcome: Welcome | None = None  # the first server's: what the job's data is
        self.first_address = ""  # ... and which server said it
        self.credit: Credit | None = None  # the whole prefetch, set from the first WELCOME
        self.lanes: list[Credit] = []  # one per shard (one: servers of the whole dataset)
        self.unwelcomed = set(config.addresses)  # not yet answered, at start
        self.welcomed = threading.Event()  # every server answered (or the client failed)
        self._link_config = LinkConfig(config.params, config.prefetch, config.dataset,
                                       config.heartbeat_timeout, config.name, config.curve)
        self._down_since: dict[int, float] = {}  # lane -> since when no server of it is up
        self._warned_at: dict[int, float] = {}  # lane -> when its loss was last reported
        self._ctx: zmq.Context | None = None
        self._poller: zmq.Poller | None = None

    def describe(self) -> list[dict[str, Any]]:
        """Each server: ``address``, ``up`` (in session) and ``in_place`` (the fast path)."""
        return [{"address": link.address, "up": link.up, "in_place": link.in_place}
                for link in list(self.links)]  # a copy: the I/O thread may change the list

    # ------------------------------------------------------------------ links

    def open(self, ctx: zmq.Context, poller: zmq.Poller) -> None:
        self._ctx, self._poller = ctx, poller
        for address in self.config.addresses:
            self.add(address)

    def add(self, address: str) -> None:
        """A link to one more server (its lane is known once it answers)."""
        assert self._ctx is not None and self._poller is not None
        fastpath = True if self.config.fastpath is None else self.config.fastpath
        link = Link(address, fastpath, self._link_config, self._ctx, self._poller)
        link.lane = -1 if self.lanes else 0  # -1: to be placed by its WELCOME
        self.links.append(link)
        if not self.lanes:
            self.unwelcomed.add(address)
        link.open()

    def up(self, lane: int) -> dict[str, Link]:
        """The live links of ``lane``, by address."""
        return {link.address: link for link in self.links if link.up and link.lane == lane}

    def set_members(self, addresses: tuple[str, ...], stream: Stream | None) -> None:
        """The server set changed: links to new servers, and none to departed ones (what
        those owed goes to the others)."""
        current = {link.address: link for link in self.links}
        for address, link in current.items():
            if address not in addresses:
                log.info("server %s left the client's server set", address)
                if stream is not None and link.lane >= 0:
                    stream.windows[link.lane].forget_link(address)
                link.bye()
                link.close()
                self.links.remove(link)
                self.unwelcomed.discard(address)
        for address in addresses:
            if address not in current:
                log.info("server %s joined the client's server set", address)
                self.add(address)
        if not self.lanes and not self.unwelcomed and self.credit is not None:
            self._set_lanes()  # the servers not yet heard from left: the rest are all there
            self.welcomed.set()
        self.reshare(stream)

    def reshare(self, stream: Stream | None) -> None:
        """Each lane's credit split over the servers it has now."""
        if not self.lanes or self.credit is None:
            return
        for lane in range(len(self.lanes)):
            n = sum(1 for link in self.links if link.lane == lane)
            self.lanes[lane] = Credit.shared_by(self.credit.prefetch, max(1, n))
            if stream is not None:
                stream.windows[lane].credit = self.lanes[lane]

    def close(self) -> None:
        for link in self.links:
            link.bye()
        for link in self.links:
            link.finish_bye(BYE_TIMEOUT_MS)

    # ------------------------------------------------------------------ WELCOME

    def welcomed_by(self, link: Link, welcome: Welcome, stream: Stream | None) -> None:
        """``link``'s server said WELCOME (at start, after a reconnect, or having joined):
        it must serve the job's data, and hold what it held."""
        first = self.welcome
        if first is None:
            self.credit = Credit.shared_by(self.config.prefetch or welcome.prefetch,
                                           len(self.config.addresses))
            self.welcome, self.first_address = welcome, link.address
        else:
            differs = welcome.differs(first)
            if differs is not None:
                again = "came back serving" if link.address not in self.unwelcomed else "serves"
                raise DataMismatch(
                    f"the server at {link.address} {again} {welcome.dataset!r} with {differs} "
                    f"({self.first_address} serves {first.dataset!r}, fingerprint "
                    f"{first.fingerprint}): it holds other data, and mixing them would train "
                    "on rows of both.  Every server of a client must serve the same data: "
                    "restart it on the same files (and transform), or give this client only "
                    "servers of one dataset")
        self.unwelcomed.discard(link.address)
        if not self.lanes and not self.unwelcomed:
            self._set_lanes()
        elif self.lanes and link.lane < 0:
            self._place(link, welcome, stream)
        elif self.lanes:
            self._check_lane(link, welcome)
        if not self.unwelcomed:
            self.welcomed.set()

    def _set_lanes(self) -> None:
        """Once every server answered: one lane, or one per shard (checked complete)."""
        assert self.credit is not None
        lanes = assign_lanes({link.address: link.welcome.shard for link in self.links
                              if link.welcome is not None})
        for link in self.links:
            link.lane = lanes[link.address]
        self.lanes = [Credit.shared_by(self.credit.prefetch, list(lanes.values()).count(lane))
                      for lane in range(max(lanes.values()) + 1)]

    def _place(self, link: Link, welcome: Welcome, stream: Stream | None) -> None:
        """A server that joined after the start: its lane is its shard (or the one lane)."""
        n = len(self.lanes)
        if (welcome.shard is None) != (n == 1) or (welcome.shard is not None and
                                                   welcome.shard[1] != n):
            raise DataMismatch(
                f"the server at {link.address} joined holding {held(welcome.shard)}, but this "
                f"client's servers hold {held(None) if n == 1 else f'{n} shards'}: start it "
                "as the others were")
        link.lane = welcome.shard[0] if welcome.shard is not None else 0
        self.reshare(stream)

    def _check_lane(self, link: Link, welcome: Welcome) -> None:
        """A server that came back must still hold what it held."""
        expected = (link.lane, len(self.lanes)) if len(self.lanes) > 1 else None
        if welcome.shard != expected:
            raise ServerUnavailable(
                f"the server at {link.address} came back holding {held(welcome.shard)}, not "
                f"{held(expected)} as before; restart it as it was")

    def new_merger(self) -> ShardMerger | None:
        """What puts a stream's pieces together: None over servers of the whole dataset."""
        if len(self.lanes) < 2:
            return None
        assert self.welcome is not None
        params = self.config.params
        return ShardMerger(len(self.lanes), self.welcome.fields, params.ragged == "flat",
                           params.pad_value)

    # ------------------------------------------------------------------ liveness

    def lose(self, link: Link, fresh_socket: bool, stream: Stream | None) -> None:
        """A server is gone: what it owed goes to the other links (or to it, once back)."""
        if link.up:
            others = sum(1 for other in self.links if other.up and other.lane == link.lane)
            log.warning("lost the batchfeed server at %s; %s, for up to %g s "
                        "(reconnect_timeout)", link.address,
                        "the others serve meanwhile, and it is asked to come back"
                        if others > 1 else "reconnecting", self.config.reconnect_timeout)
        if stream is not None and link.lane >= 0:
            stream.windows[link.lane].forget_link(link.address)
        link.lose(fresh_socket)

    def check_reachable(self, now: float) -> None:
        """ServerUnavailable once a lane (all servers, or one shard's) has had no live server
        for ``reconnect_timeout``; a warning every ``RECONNECT_WARN_S`` until then."""
        for lane in range(len(self.lanes)):
            links = [link for link in self.links if link.lane == lane]
            if any(link.up for link in links):
                self._down_since.pop(lane, None)
                continue
            since = self._down_since.setdefault(lane, now)
            where = ", ".join(link.address for link in links) or "this client"
            if now - since >= RECONNECT_WARN_S and \
                    now - self._warned_at.get(lane, since) >= RECONNECT_WARN_S:
                self._warned_at[lane] = now
                log.warning("still no batchfeed server for %s after %.0f s; giving up at "
                            "reconnect_timeout=%g s", where, now - since,
                            self.config.reconnect_timeout)
            if now - since > self.config.reconnect_timeout:
                what = f"shard {lane} of {len(self.lanes)} (at {where})" \
                    if len(self.lanes) > 1 else f"the batchfeed server at {where}"
                raise ServerUnavailable(
                    f"lost {what} and it did not come back within "
                    f"reconnect_timeout={self.config.reconnect_timeout:g} s")
