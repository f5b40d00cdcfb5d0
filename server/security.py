"""Who may connect: the loopback-only default, and CURVE encryption with ZAP authentication.

``check_ipc_free`` refuses to take over a live server's ipc:// socket; ``IpcPath`` removes
the socket file a server made when it closes (only that file: not one a later server made at
the same path).  ``ServerSecurity.check``
runs before anything is loaded: a non-loopback bind without CURVE is
refused unless ``--insecure``.  ``apply`` starts pyzmq's ZAP authenticator thread (allowing
exactly the public keys in the authorized-keys directory) and makes the client socket a CURVE
server.  ``close`` stops the authenticator.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from batchfeed.shared.addresses import is_loopback
from batchfeed.shared.curve_keys import check_libzmq, load_secret
from batchfeed.shared.errors import AuthenticationError, InvalidRequest, ResourceError

log = logging.getLogger("batchfeed.server")

class ServerSecurity:
    def __init__(self, bind: str, curve_secret_key: str | None, authorized_keys: str | None,
                 insecure: bool):
        self.bind = bind
        self.curve_secret_key = curve_secret_key
        self.authorized_keys = authorized_keys
        self.insecure = insecure
        self._auth: ThreadAuthenticator | None = None

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None

    def check(self) -> None:
        check_libzmq()
        if bool(self.curve_secret_key) != bool(self.authorized_keys):
            raise InvalidRequest("--curve-secret-key and --authorized-keys go together")
        if self.curve_secret_key is not None and self.authorized_keys is not None:
            load_secret(self.curve_secret_key)  # fail now, not at bind
            keys = Path(self.authorized_keys)
            if not keys.is_dir() or not any(keys.glob("*.key")):
                raise AuthenticationError(
                    f"--authorized-keys {self.authorized_keys} must be a directory holding the "
                    "clients' public .key files (batchfeed keygen makes them)"
                )
        elif not is_loopback(self.bind):
            if not self.insecure:
                raise InvalidRequest(
                    f"refusing to bind {self.bind} without encryption: anyone who can reach it "
                    "could read the data. Use --curve-secret-key and --authorized-keys (make "
                    "keys with `batchfeed keygen`), or pass --insecure on a trusted private "
                    "network"
                )
            log.warning("serving %s WITHOUT encryption or authentication (--insecure)",
                        self.bind)

    def apply(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        if not self.curve:
            return
        assert self.curve_secret_key is not None and self.authorized_keys is not None
        public, secret = load_secret(self.curve_secret_key)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=self.authorized_keys)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def check_ipc_free(path: str) -> None:
    """Refuse to take over the socket of a live server (ZeroMQ would silently replace it, and
    new clients would reach this server instead); a stale file of a dead one is replaced."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # nobody listens there: a leftover, which bind replaces
    except OSError as exc:
        raise ResourceError(f"cannot bind ipc://{path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ResourceError(f"ipc://{path} is in use by a running server; stop it, or pick another "
                        "--bind address")


@dataclass(frozen=True)
class IpcPath:
    """The socket file of an ipc:// bind, as this server made it."""

    path: str
    dev: int
    ino: int

    @classmethod
    def made(cls, path: str) -> IpcPath | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(path, st.st_dev, st.st_ino)

    def remove(self) -> None:
        """Unlink the file if it is still the one this server made.  Idempotent."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                os.unlink(self.path)
        except OSError:
            pass
