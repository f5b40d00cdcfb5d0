"""CURVE keys: making them (``batchfeed keygen``) and reading them, for server and client.

Keys are stored in ZeroMQ's certificate format (``NAME.key`` holds the public key,
``NAME.key_secret`` both), as written by ``zmq.auth.create_certificates``.  A server
authorizes a client by having the client's public ``.key`` file in its authorized-keys directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth

from .errors import AuthenticationError

MIN_LIBZMQ = (4, 3, 5)  # CURVE fixes for CVE-2019-6250 and CVE-2019-13132 and later


def check_libzmq() -> None:
    """Refuse to run on a libzmq without the CURVE security fixes."""
    have = zmq.zmq_version_info()
    if tuple(have) < MIN_LIBZMQ:
        raise AuthenticationError(
            f"libzmq {zmq.zmq_version()} is older than {'.'.join(map(str, MIN_LIBZMQ))}, which "
            "has the CURVE security fixes; upgrade pyzmq (pip install -U pyzmq), whose wheels "
            "bundle a current libzmq"
        )


def make_keys(directory: str, names: tuple[str, ...] = ("server", "client")) -> list[Path]:
    """Write a key pair per name; with the default names also ``authorized/client.key``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(str(out), name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    if "client" in names:
        authorized = out / "authorized"
        authorized.mkdir(exist_ok=True)
        shutil.copy(out / "client.key", authorized / "client.key")
        written.append(authorized / "client.key")
    return written


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthenticationError(f"cannot read CURVE key file {path}: {exc}") from None
    if not secret:
        raise AuthenticationError(
            f"{path} holds only a public key; pass the matching .key_secret file"
        )
    return public, secret


def load_public(path: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthenticationError(f"cannot read CURVE key file {path}: {exc}") from None
    return public
