"""Finding servers: one name that stands for several loaders.

A Kubernetes headless Service (``clusterIP: None``) gives one DNS A record per ready loader
pod; so does docker-compose's DNS for a scaled service.  ``resolve_all("tcp://loaders:5555")``
turns such a name into one address per server, which ``Client`` then spreads its batches over.
``ResolvedServers(name)`` is the same as a server set: a client given it resolves the name again
every second, so loaders that are added are used at once and those removed are dropped.
"""

from __future__ import annotations

import re
import socket

from batchfeed.shared.errors import InvalidRequest, ServerUnavailable

_TCP = re.compile(r"^tcp://(\[[^\]]+\]|[^:/]+):(\d+)$")


def resolve_all(address: str) -> list[str]:
    """Every IPv4/IPv6 address the host name of ``tcp://NAME:PORT`` resolves to, sorted."""
    m = _TCP.match(address)
    if not m:
        raise InvalidRequest(f"resolve_all needs a tcp://NAME:PORT address, got {address!r}")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServerUnavailable(f"cannot resolve {host!r} ({exc}); is the service name "
                                "right and its DNS reachable from here?") from None
    out = set()
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.add(f"tcp://[{ip}]:{port}" if family == socket.AF_INET6 else f"tcp://{ip}:{port}")
    return sorted(out)


class ResolvedServers:
    """A server set (``Client(ResolvedServers("tcp://loaders:5555"))``): the addresses a
    name resolves to, now."""

    def __init__(self, address: str):
        resolve_all(address)  # a name that does not resolve is an error now, not later
        self.address = address

    def addresses(self) -> list[str]:
        return resolve_all(self.address)

    def __repr__(self) -> str:
        return f"ResolvedServers({self.address!r})"
