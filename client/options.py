"""``ClientConfig``: a client's validated settings, made once by ``Client`` and read by its
I/O thread, its servers and its links."""

from __future__ import annotations

from dataclasses import dataclass

from batchfeed.shared.plan import PlanParams

from .membership import ServerSet


@dataclass(frozen=True)
class ClientConfig:
    """Validated client settings (the plan parameters plus how to talk to the servers)."""

    addresses: tuple[str, ...]  # the servers at start
    params: PlanParams
    prefetch: int  # 0: the server chooses
    dataset: str | None
    fastpath: bool | None  # None: wherever it can be (a server on this host)
    connect_timeout: float
    reconnect_timeout: float
    heartbeat_timeout: float
    name: str
    curve: tuple[bytes, bytes, bytes] | None = None  # (public, secret, server public)
    servers: ServerSet | None = None  # asked for the servers now and then, if given
