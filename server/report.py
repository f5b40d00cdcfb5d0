"""What a server tells about itself: the ``server`` map of a STATS report (and of the metrics
endpoint's snapshot), and its sessions as others may see them (labels, never session ids).

Plain numbers and strings only; the front end's loop builds them, readers in other threads get
a snapshot (``Frontend.snapshot``), never the live state.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from batchfeed.shared.version import __version__

from .ring import LEASE, SEND, TASK

if TYPE_CHECKING:
    from .frontend import Frontend
    from .sessions import Session

MAX_REPORTED = 200  # sessions listed in a REPORT (its header must stay under the size limit)


def describe_server(fe: Frontend) -> dict:
    held = fe.ring.held()
    counters = fe.counters + fe.scheduler.counters
    counters["worker_restarts"] = fe.supervisor.restarts
    counters["worker_timeouts"] = fe.supervisor.timeouts
    return {
        "version": __version__, "address": fe.address,
        "uptime_s": round(time.monotonic() - fe.started, 1),
        "datasets": ", ".join(fe.datasets), "workers": len(fe.workers),
        "worker_pids": [w.pid or 0 for w in fe.workers],
        "slots": fe.ring.n_slots, "slot_bytes": fe.ring.slot_bytes,
        "slots_free": fe.ring.free_count,
        "slots_busy": held[TASK] + held[SEND], "slots_leased": held[LEASE],
        "sessions": len(fe.sessions),
        "counters": dict(counters), "errors": dict(fe.errors),
        "worker_busy_s": {str(i): round(v, 3) for i, v in fe.worker_busy.items()},
    }


def session_list(sessions: Iterable[Session], most: int | None = MAX_REPORTED) -> list[dict]:
    now = time.monotonic()
    return [s.describe(now) for s in list(sessions)[:most]]
