"""The batchfeed servers of a run: started and stopped around their rows (``running_server``,
``running_servers``), and what a running one is and costs: its workers and ring (its STATS
report), the CPU time and memory (PSS) of its process tree (/proc, ``shared.procs``), and the
shared-memory segments a stopped one left behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from batchfeed.launch import ServerProcess
from batchfeed.shared.errors import BatchfeedError
from batchfeed.shared.procs import cpu_seconds, process_tree, pss_bytes
from batchfeed.shared.shm import PREFIX, SHM_DIR

from .common import MIB, BenchError

STATS_TIMEOUT = 10.0  # seconds for a server to answer STATS, on a loaded 2-core machine
START_TIMEOUT = 180.0  # a server loading a large dataset, on a loaded 2-core machine


@contextlib.contextmanager
def running_server(args: list[str], bind: str, problems: list[str]) -> Iterator[ServerProcess]:
    """A started server, stopped on exit.  What it logged besides its ready line, and a
    non-zero exit code, are added to ``problems`` (the measurements stand)."""
    server = ServerProcess(args, bind=bind)
    try:
        server.start(timeout=START_TIMEOUT)
        yield server
    finally:
        code = server.stop()
        logged = [line for line in server.output if line != server.ready_line]
        if server.ready_line and (code != 0 or logged):
            pid = server.proc.pid if server.proc is not None else "?"
            problems.append(f"server {pid} at {bind} exited with code {code}"
                            + ("; it logged: " + " | ".join(logged[-8:]) if logged else ""))


@contextlib.contextmanager
def running_servers(arg_lists: Sequence[list[str]], binds: Sequence[str],
                    problems: list[str]) -> Iterator[list[ServerProcess]]:
    """One server per argument list, all stopped on exit; a shared-memory segment one of them
    left behind is a problem of the run."""
    pids: list[int] = []
    try:
        with contextlib.ExitStack() as stack:
            servers = []
            for args, bind in zip(arg_lists, binds):
                servers.append(stack.enter_context(running_server(args, bind, problems)))
                pids.append(servers[-1].pid)
            yield servers
    finally:
        left = leftover_segments(pids)
        if left:
            problems.append(f"stopped servers left {len(left)} shared-memory segment(s) in "
                            f"{SHM_DIR}: {', '.join(left[:4])}")


def leftover_segments(pids: list[int]) -> list[str]:
    """Shared-memory segments that the (stopped) servers ``pids`` created and left behind."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    mine = tuple(f"{PREFIX}{pid}_" for pid in pids)
    return sorted(n for n in names if n.startswith(mine)) if mine else []


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


def stats(servers: Sequence[ServerProcess], curve: tuple[str, str] | None = None) -> list[dict]:
    """Each server's STATS report (with the client's CURVE keys, if it has CURVE)."""
    try:
        return [s.report(STATS_TIMEOUT, curve) for s in servers]
    except BatchfeedError as exc:
        raise BenchError(f"a server did not answer STATS: {exc}") from exc


def ring_info(server: ServerProcess, curve: tuple[str, str] | None = None) -> RingInfo:
    report = stats([server], curve)[0]["server"]
    return RingInfo(int(report["workers"]), int(report["slots"]), int(report["slot_bytes"]))


def server_cpu_seconds(*servers: ServerProcess) -> float:
    """CPU time so far of the servers and all their descendants (their workers)."""
    return sum(cpu_seconds(process_tree(s.pid)) for s in servers)


def server_pss_bytes(server: ServerProcess) -> int:
    """PSS of the server and all its descendants: shared pages are split between users."""
    return pss_bytes(process_tree(server.pid))
