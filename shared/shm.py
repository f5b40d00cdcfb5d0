"""POSIX shared-memory segments with explicit ownership.

This is what ``multiprocessing.shared_memory.SharedMemory`` does underneath (``shm_open`` +
``mmap``), minus its resource tracker: on Python < 3.13 the tracker is an extra process that
registers every attach and may unlink segments another process still owns.  Here the creator
(the server's main process) is the only one that unlinks; workers and same-host clients attach
by name, read-only where they only read.

Every segment of a server is named ``bf_<pid>_<token>_<tag>``, so that segments left behind by
a server that was SIGKILLed can be found by prefix and removed at the next start.
"""

from __future__ import annotations

import _posixshmem
import errno
import hashlib
import hmac
import math
import mmap
import os
import re
import secrets

from .errors import ResourceError
from .procs import pid_alive

PREFIX = "bf_"
# A server's slot ring starts with a page holding RING_MAGIC, the ring's public proof (sent in
# WELCOME: a client checks it mapped this server's ring), then its secret key (never sent: a
# client proves it could read it, see ``claim_proof``).
RING_MAGIC = b"batchfeed-ring-1"
RING_PROOF_BYTES = 16
RING_KEY_BYTES = 32
RING_KEY_OFFSET = len(RING_MAGIC) + RING_PROOF_BYTES
# A fast-path lease table: LEASE_TABLE_HEADER bytes (reserved), then one byte per ring slot
# (1: leased to the client, 0: given back).  See server/leases.py.
LEASE_TABLE_HEADER = 64
SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^bf_(\d+)_[0-9a-f]+_")


def claim_proof(key: bytes, challenge: str) -> str:
    """What a fast-path CLAIM sends: HMAC-SHA256 of the WELCOME's challenge under the ring's key
    (which only a process that can map this server's ring can read)."""
    return hmac.new(key, challenge.encode(), hashlib.sha256).hexdigest()


def new_token() -> str:
    return secrets.token_hex(4)


def segment_name(token: str, tag: str, pid: int | None = None) -> str:
    return f"{PREFIX}{os.getpid() if pid is None else pid}_{token}_{tag}"


class SharedSegment:
    """One mapped segment.  ``create`` makes and owns it; ``attach`` maps an existing one."""

    def __init__(self, name: str, fd: int, size: int, writable: bool, owner: bool,
                 keep_fd: bool = False):
        self.name = name
        self.size = size
        self.owner = owner
        self.fd: int | None = None  # kept open only when asked (to flock it)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.buf: mmap.mmap | None = mmap.mmap(fd, size, prot=prot) if size else None
        except BaseException:
            os.close(fd)
            raise
        if keep_fd:
            self.fd = fd
        else:
            os.close(fd)

    @classmethod
    def create(cls, name: str, size: int, *, keep_fd: bool = False) -> SharedSegment:
        """Create a segment of ``size`` bytes with every page reserved up front.

        Reserving (``posix_fallocate``) turns "shared memory is full" into an error here instead
        of a SIGBUS on first write later.
        """
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            _posixshmem.shm_unlink("/" + name)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise ResourceError(
                    f"cannot reserve {human_bytes(size)} of shared memory for {name}: "
                    f"{SHM_DIR} is full; give the server more shared memory (docker: shm_size)"
                ) from None
            raise
        try:  # the constructor closes the descriptor if it cannot map it
            return cls(name, fd, size, writable=True, owner=True, keep_fd=keep_fd)
        except BaseException:
            _posixshmem.shm_unlink("/" + name)  # whatever failed, no name is left behind
            raise

    @classmethod
    def attach(cls, name: str, *, writable: bool = False, keep_fd: bool = False) -> SharedSegment:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR if writable else os.O_RDONLY, mode=0)
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, size, writable=writable, owner=False, keep_fd=keep_fd)

    def close(self) -> None:
        """Unmap (if no view still uses the mapping), close a kept descriptor and, for the
        owner, unlink.  Idempotent."""
        if self.buf is not None:
            try:
                self.buf.close()
                self.buf = None
            except BufferError:
                pass  # views still alive; the mapping goes when they do
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.unlink()

    def unlink(self) -> None:
        """Remove the name (the owner's; mappings and descriptors stay valid).  Idempotent."""
        if self.owner:
            self.owner = False
            try:
                _posixshmem.shm_unlink("/" + self.name)
            except FileNotFoundError:
                pass

    def __enter__(self) -> SharedSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def check_shm_room(needed: int, what: str) -> None:
    """Fail early, with what to do, when /dev/shm cannot hold ``needed`` bytes."""
    free = shm_free_bytes()
    if needed > free:
        suggest_gb = math.ceil(needed * 1.25 / 2**30)
        raise ResourceError(
            f"{what} need {human_bytes(needed)} of shared memory but {SHM_DIR} has only "
            f"{human_bytes(free)} free. In Docker, give the loader a bigger shm_size "
            f"(docker-compose: shm_size: '{suggest_gb}gb'; "
            "docker run: --shm-size); otherwise free space in /dev/shm, shrink --slots/--slot-mb, "
            "or serve .npy files with --mmap"
        )


def remove_stale_segments() -> list[str]:
    """Unlink batchfeed segments whose creating process is gone.  Returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _NAME_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                _posixshmem.shm_unlink("/" + name)
                removed.append(name)
            except (FileNotFoundError, PermissionError):
                pass
    return removed


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
