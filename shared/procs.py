"""Process identity on Linux: a pid plus its start time, so a reused pid is not mistaken for it.

The server uses it to tell whether a same-host (fast-path) client that went silent is dead, in
which case the ring slots it holds can be taken back, or merely stalled, in which case they
cannot: the client may still hold views of them.
"""

from __future__ import annotations

import os


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
