"""What a running server is and what it costs: its workers and ring, from its STATS report
(``batchfeed.launch.server_report``), and the CPU time and memory (PSS) of its process tree,
read from /proc with ``shared.procs``."""

from __future__ import annotations

from dataclasses import dataclass

from batchfeed.launch import ServerProcess
from batchfeed.shared.errors import BatchfeedError
from batchfeed.shared.procs import cpu_seconds, process_tree, pss_bytes

from .measure import BenchError
from .workloads import MIB

STATS_TIMEOUT = 10.0  # seconds for a server to answer STATS, on a loaded 2-core machine


@dataclass(frozen=True)
class RingInfo:
    """A server's workers and slot ring, as its STATS report gives them."""

    workers: int
    slots: int
    slot_bytes: int

    @property
    def ring_bytes(self) -> int:
        return self.slots * self.slot_bytes

    def describe(self) -> str:
        return (f"{self.workers} workers, {self.slots} slots of {self.slot_bytes / MIB:.1f} MiB "
                f"(ring {self.ring_bytes / MIB:.0f} MiB)")


def ring_info(server: ServerProcess, curve: tuple[str, str] | None = None) -> RingInfo:
    """Ask the server for its STATS report (with the client's CURVE keys, if it has CURVE)."""
    try:
        report = server.report(STATS_TIMEOUT, curve)["server"]
    except BatchfeedError as exc:
        raise BenchError(f"server {server.pid} did not report its ring: {exc}") from exc
    return RingInfo(int(report["workers"]), int(report["slots"]), int(report["slot_bytes"]))


def server_cpu_seconds(server: ServerProcess) -> float:
    """CPU time so far of the server and all its descendants (its workers)."""
    return cpu_seconds(process_tree(server.pid))


def server_pss_bytes(server: ServerProcess) -> int:
    """PSS of the server and all its descendants: shared pages are split between users."""
    return pss_bytes(process_tree(server.pid))
