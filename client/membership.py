"""Server sets: the servers of a client, when they may change while it trains.

A client is given addresses (a fixed set), or a *server set*: any object with an
``addresses()`` method that returns the servers' current addresses (a Ray loader group's
handle, a DNS name resolved again, a list an orchestrator keeps).  ``Watcher`` asks it every
``period`` seconds on a thread of its own, so that a slow or failing set never stalls the I/O
thread, and hands each new list to the I/O thread, which opens links to servers that appeared
and closes those that left; what a departed server owed goes to the others (the plan, not the
server, decides every batch, so the batches do not change).

``close()`` stops the watcher (bounded); it asks nothing after that.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from batchfeed.shared.addresses import check_address
from batchfeed.shared.errors import InvalidArgument, InvalidArgumentType, InvalidRequest

log = logging.getLogger("batchfeed.client")

WATCH_PERIOD_S = 1.0


@runtime_checkable
class ServerSet(Protocol):
    """What a client can take instead of addresses: its servers, as they are now."""

    def addresses(self) -> Sequence[str]: ...


def checked_addresses(addresses: object, what: str = "address") -> tuple[str, ...]:
    """A non-empty tuple of distinct, valid server addresses (InvalidArgument otherwise)."""
    if isinstance(addresses, str):
        addresses = (addresses,)
    if not isinstance(addresses, Sequence):
        raise InvalidArgumentType(f"{what} must be tcp://HOST:PORT or ipc://PATH (or a list of "
                                  f"them, or a server set), got {addresses!r:.80}")
    if not addresses or len(set(addresses)) != len(addresses) or not all(
            isinstance(a, str) for a in addresses):
        raise InvalidArgument(f"{what} must be tcp://HOST:PORT or ipc://PATH (or a list of "
                              f"distinct ones, or a server set), got {addresses!r:.200}")
    for a in addresses:
        try:
            check_address(a)
        except InvalidRequest as exc:
            raise InvalidArgument(str(exc)) from None
    return tuple(addresses)


class Watcher:
    """Asks a server set for its addresses now and then; calls ``on_change`` with each list
    that differs from the last (from its own thread)."""

    def __init__(self, servers: ServerSet, first: tuple[str, ...],
                 on_change: Callable[[tuple[str, ...]], None],
                 period: float = WATCH_PERIOD_S):
        self.servers = servers
        self.on_change = on_change
        self.period = period
        self._last = first
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="batchfeed-servers",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                now = checked_addresses(self.servers.addresses(), "a server set's addresses")
            except Exception as exc:  # a set that fails now and then: keep the servers we have
                if not self._failing:
                    log.warning("the server set %r did not answer (%s: %s); keeping its last "
                                "servers %s", self.servers, type(exc).__name__, exc,
                                ", ".join(self._last))
                self._failing = True
                continue
            self._failing = False
            if now != self._last:
                self._last = now
                self.on_change(now)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
