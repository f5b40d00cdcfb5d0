"""Server configuration: one frozen dataclass, validated once where it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass

from batchfeed.shared.addresses import check_address, is_loopback_host
from batchfeed.shared.errors import InvalidRequest

DEFAULT_BIND = "tcp://127.0.0.1:5555"
MIB = 2**20
TRANSFORM_BATCH_ROWS = 256  # with a transform, slots hold a batch of this many output rows


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Limits:
    """What one peer may hold of the server (``docs/security.md`` lists each with its flag)."""

    sessions: int = 256  # open sessions in all (--max-sessions)
    per_connection: int = 8  # open sessions per connection (--max-sessions-per-connection)
    unsent_bytes: int = 32 * 2**20  # a connection's messages ZeroMQ has not handed on
    total_unsent_bytes: int = 512 * 2**20  # everyone's (a session with none may always send)


@dataclass(frozen=True)
class ServerConfig:
    """How to run a loader server.  ``data`` empty means the built-in synthetic dataset."""

    data: tuple[str, ...] = ()
    bind: str = DEFAULT_BIND
    also_bind: tuple[str, ...] = ()  # more ipc:// endpoints of the same socket (same host)
    workers: int = 0  # 0: one per core
    synthetic_rows: int = 1_000_000
    slots: int = 0  # 0: 2 per worker + 8
    slot_bytes: int = 0  # 0: max(chunk_bytes, 128 of the widest rows, 256 transformed rows)
    chunk_bytes: int = 8 * MIB  # target size of one streamed message
    task_timeout: float = 30.0
    session_timeout: float = 10.0
    insecure: bool = False  # allow a non-loopback bind without CURVE
    curve_secret_key: str | None = None
    authorized_keys: str | None = None
    transforms: tuple[str, ...] = ()  # "[DATASET=]package.module:function"
    mmap: bool = False  # map .npy and Arrow IPC files instead of copying them into shm
    metrics_port: int | None = None  # serve Prometheus metrics over HTTP on this port
    metrics_bind: str = "127.0.0.1"
    max_order_bytes: int = 256 * MIB  # the largest epoch order a session may ask for
    shard: tuple[int, int] | None = None  # (I, N): hold only shard I of N of every dataset
    fingerprint: str = "auto"  # "full", "sampled", or "auto": full, sampled with --mmap
    max_sessions: int = Limits.sessions
    max_sessions_per_connection: int = Limits.per_connection
    max_unsent_bytes: int = Limits.unsent_bytes  # per connection
    max_image_pixels: int = 0  # 0: batchfeed.transforms.images' default

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise InvalidRequest(f"--workers must be >= 1, got {self.workers}")
        if self.slots < 0:
            raise InvalidRequest(f"--slots must be >= 1, got {self.slots}")
        if self.slot_bytes and self.slot_bytes < 4096:
            raise InvalidRequest(f"--slot-mb is too small ({self.slot_bytes} bytes)")
        if self.chunk_bytes < 1:
            raise InvalidRequest("chunk_bytes must be positive")
        if self.task_timeout <= 0 or self.session_timeout <= 0:
            raise InvalidRequest("timeouts must be positive")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidRequest(f"--metrics-port must be 0..65535, got {self.metrics_port}")
        check_address(self.bind, "--bind")
        if isinstance(self.also_bind, str):
            object.__setattr__(self, "also_bind", (self.also_bind,))
        object.__setattr__(self, "also_bind", tuple(self.also_bind))
        for address in self.also_bind:
            if not isinstance(address, str) or not address.startswith("ipc://"):
                raise InvalidRequest(
                    f"--also-bind takes ipc://PATH (a second endpoint for trainers on this "
                    f"host), got {address!r}; give a tcp:// address as --bind")
            check_address(address, "--also-bind")
        if len({self.bind, *self.also_bind}) != 1 + len(self.also_bind):
            raise InvalidRequest(f"--bind and --also-bind name the same address twice "
                                 f"({self.bind}, {', '.join(self.also_bind)}): give each once")
        if self.metrics_port is not None and not is_loopback_host(self.metrics_bind) \
                and not self.insecure:
            raise InvalidRequest(
                f"refusing to serve metrics on {self.metrics_bind}: they name sessions, "
                "clients and datasets to anyone who can reach the port, over plain HTTP. "
                "Keep --metrics-bind on loopback (the default) and scrape through a tunnel or "
                "a sidecar, or pass --insecure on a trusted private network")
        for flag, value in (("--max-sessions", self.max_sessions),
                            ("--max-sessions-per-connection", self.max_sessions_per_connection),
                            ("--max-unsent-mb", self.max_unsent_bytes)):
            if type(value) is not int or value < 1:
                raise InvalidRequest(f"{flag} must be positive, got {value!r}")
        if self.max_image_pixels < 0:
            raise InvalidRequest(f"--max-image-pixels must be positive, got "
                                 f"{self.max_image_pixels}")
        if self.fingerprint not in ("auto", "full", "sampled"):
            raise InvalidRequest(f"--fingerprint must be auto, full or sampled, got "
                                 f"{self.fingerprint!r}")
        if self.max_order_bytes < 1:
            raise InvalidRequest("--max-order-mb must be positive")
        if self.shard is not None:
            i, n = self.shard
            if not (type(i) is int and type(n) is int and 0 <= i < n):
                raise InvalidRequest(f"--shard I/N needs 0 <= I < N, got {i}/{n}")
            if self.transforms:
                raise InvalidRequest("--shard serves each batch in pieces, one per shard, and a "
                                     "transform sees whole batches: run the transform without "
                                     "--shard (replicas), or in the trainer")

    @property
    def n_workers(self) -> int:
        return self.workers or cpu_count()

    @property
    def limits(self) -> Limits:
        """What one peer may hold (the total unsent allows 16 connections at their limit)."""
        return Limits(sessions=self.max_sessions, per_connection=self.max_sessions_per_connection,
                      unsent_bytes=self.max_unsent_bytes,
                      total_unsent_bytes=max(Limits.total_unsent_bytes,
                                             16 * self.max_unsent_bytes))

    @property
    def fingerprint_mode(self) -> str:
        """What ``auto`` means: every byte, or samples of data too big to read at each start
        (``--mmap``)."""
        if self.fingerprint != "auto":
            return self.fingerprint
        return "sampled" if self.mmap else "full"

    @property
    def n_slots(self) -> int:
        return self.slots or 2 * self.n_workers + 8

    def slot_size(self, widest_row_bytes: int, transformed_batch_bytes: int = 0) -> int:
        """Bytes per slot: as configured, or one message's worth (at least 128 of the widest
        rows), or, with a transform, one batch of ``TRANSFORM_BATCH_ROWS`` rows of its output
        (``transformed_batch_bytes``, from the sample run at start: a train_images(size=224)
        batch of 256 is 147 MiB), in whole MiB.  Big messages pay: each costs ~0.25 ms of CPU
        to route whatever its size.  The ring is reserved whole in /dev/shm at start:
        ``n_slots`` x this (12 x 148 MiB = 1.7 GiB with 2 workers for that transform)."""
        if self.slot_bytes:
            return self.slot_bytes
        need = max(128 * widest_row_bytes, transformed_batch_bytes)
        return max(self.chunk_bytes, -(-need // MIB) * MIB)
