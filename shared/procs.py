"""Process helpers, written once: liveness, identity, the process tree, its CPU and memory, and
the shutdown ladder.

Linux only (everything is read from /proc) and stdlib only.  A process may end while it is being
read: its files then raise OSError and it is skipped, so a sum covers the processes still there.

- ``pid_alive`` / ``start_time`` / ``same_process_alive``: is this pid (still the same
  process) running?  The server uses the last two to tell whether a same-host (fast-path) client
  that went silent is dead, in which case the ring slots it holds can be taken back, or merely
  stalled, in which case they cannot: the client may still hold views of them.
- ``children`` / ``process_tree``: a process's children, and it plus all its descendants.
- ``cpu_seconds`` / ``pss_bytes`` / ``private_pss_bytes``: what a set of processes costs.
- ``stop_process``: wait, terminate, kill, each step bounded; for ``multiprocessing.Process``
  and ``subprocess.Popen`` alike.
"""

from __future__ import annotations

import glob
import os
import subprocess
from multiprocessing.process import BaseProcess

Stoppable = BaseProcess | subprocess.Popen


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts as alive)."""
    if pid <= 0:  # 0 and negative pids would name process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_time(pid: int | None = None) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist here."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def same_process_alive(pid: int, started: int) -> bool:
    return start_time(pid) == started


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (of all its threads); [] once it is gone."""
    out: list[int] = []
    for path in sorted(glob.glob(f"/proc/{pid}/task/*/children")):
        try:
            with open(path) as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass  # the thread ended meanwhile
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents before their children."""
    out, i = [pid], 0
    while i < len(out):
        out += children(out[i])
        i += 1
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU of the processes so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def pss_bytes(pids: list[int]) -> int:
    """Sum of Pss over the processes (shared pages are split between their users)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def private_pss_bytes(pids: list[int]) -> int:
    """Pss outside /dev/shm mappings: what a leak in the processes would grow.

    (Shared-memory pages, such as a dataset or a ring, count in ``pss_bytes`` once touched; they
    are bounded by design and measured apart.)
    """
    total = 0
    for pid in pids:
        part, skip = 0, False
        try:
            with open(f"/proc/{pid}/smaps") as f:
                for line in f:
                    first = line.split(None, 1)[0]
                    if "-" in first and not first.endswith(":"):  # a mapping's header line
                        skip = "/dev/shm/" in line
                    elif first == "Pss:" and not skip:
                        part += int(line.split()[1]) * 1024
        except OSError:
            continue  # the process ended mid-read: count none of it
        total += part
    return total


def stop_process(proc: Stoppable, timeout: float, *, terminate_wait: float = 1.0,
                 kill_wait: float = 5.0) -> int | None:
    """The shutdown ladder: wait up to ``timeout`` for ``proc`` to exit by itself, then
    terminate (SIGTERM) and wait ``terminate_wait``, then kill (SIGKILL) and wait ``kill_wait``.

    ``proc`` is a ``multiprocessing.Process`` or a ``subprocess.Popen``.  Returns its exit code
    (negative: the signal that ended it), or None if it never started or outlived the ladder.
    Safe on a process that already exited, and to call twice.  It does not ``close()`` a
    ``multiprocessing.Process``: its owner does.
    """
    if proc.pid is None:  # a multiprocessing.Process that was never started
        return None
    for signal_it, seconds in ((None, timeout), (proc.terminate, terminate_wait),
                               (proc.kill, kill_wait)):
        if _exit_code(proc) is not None:
            break
        if signal_it is not None:
            signal_it()
        _wait(proc, seconds)
    return _exit_code(proc)


def _exit_code(proc: Stoppable) -> int | None:
    if isinstance(proc, subprocess.Popen):
        return proc.poll()
    return proc.exitcode


def _wait(proc: Stoppable, seconds: float) -> None:
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            pass
    else:
        proc.join(seconds)
