"""Addresses, checked once: what batchfeed accepts as a server address, and what is loopback.

- ``check_address``: ``tcp://HOST:PORT`` (HOST a name, an IPv4 address, ``[IPv6]`` or ``*``;
  PORT a number, ``0`` or ``*`` to bind any free port) or ``ipc://PATH``; anything else is an
  ``InvalidRequest`` that says what is expected.
- ``is_loopback`` / ``is_loopback_host``: ipc:// and 127.0.0.0/8, ::1 and ``localhost`` are
  reachable only from this host; every other host (``*``, ``0.0.0.0``, a name, an interface)
  is assumed reachable from outside.
- ``split_tcp``: (host, port) of a tcp:// address.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import InvalidRequest

_TCP = re.compile(r"^tcp://(\[[^\]/]+\]|[^:/\[\]]+):(\*|\d{1,5})$")


def check_address(address: object, what: str = "address") -> str:
    if isinstance(address, str):
        if address.startswith("ipc://") and len(address) > len("ipc://"):
            return address
        m = _TCP.match(address)
        if m and (m.group(2) == "*" or int(m.group(2)) <= 65535):
            return address
    raise InvalidRequest(f"{what} must be tcp://HOST:PORT or ipc://PATH, got {address!r}")


def split_tcp(address: str) -> tuple[str, str]:
    m = _TCP.match(address)
    if not m:
        raise InvalidRequest(f"{address!r} is not a tcp://HOST:PORT address")
    return m.group(1).strip("[]"), m.group(2)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: assume reachable from outside


def is_loopback(address: str) -> bool:
    """True for ipc:// and for tcp:// on 127.0.0.0/8, ::1 or localhost."""
    if address.startswith("ipc://"):
        return True
    m = _TCP.match(address)
    return m is not None and is_loopback_host(m.group(1))
