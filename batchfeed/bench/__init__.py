"""``batchfeed bench``: every way of feeding a training loop, side by side, in one run.

Per workload (same data, full shuffle) it measures, one after the other on the same machine:
the raw in-process copy limit (``np.take`` into a preallocated batch), a naive per-sample loop,
torch's DataLoader with 0 and 2 workers, and batchfeed over tcp loopback (1, 2, 4 client
processes), over ipc through the socket, and over ipc on the same-host fast path.  Then, once
per run, how long a trainer waits for the first batch of an epoch (``stalls``).  Every row's
consumer does the same minimal work: it iterates and counts bytes, never copying.  The machine
is shared and noisy, so the ratios between rows of one run are what mean something.

- ``workloads``: the options and the datasets;    ``measure``: the consumer and a table row;
- ``baselines``: the in-process rows;              ``pool``: the spawned client processes;
- ``served``: the rows against real servers;      ``probes``: a server's ring, CPU and PSS;
- ``report``: tables and JSON;                     ``run``: ``run(options, out)``, the whole run;
- ``stalls``: the epoch-boundary stall table;   ``tokens``: packed token data (``--workload
  tokens``): throughput against in-process packing and torch, and the memory of two ranks.
"""

from __future__ import annotations

from .baselines import ROW_NAIVE, ROW_RAW, ROW_TORCH0, ROW_TORCH2
from .measure import BenchError
from .report import COLUMNS
from .run import run
from .served import (
    ROW_CURVE,
    ROW_IPC_FAST,
    ROW_IPC_SOCKET,
    ROW_STALL,
    ROW_TCP,
    ROW_TRANSFORM,
    TCP_CLIENTS,
)
from .stalls import STALL_GOAL_MS, epoch_stalls
from .tokens import MEMORY_ROWS, TOKEN_ROWS
from .workloads import WORKLOAD_NAMES, BenchOptions

__all__ = [
    "COLUMNS",
    "MEMORY_ROWS",
    "ROW_CURVE",
    "ROW_IPC_FAST",
    "ROW_IPC_SOCKET",
    "ROW_NAIVE",
    "ROW_RAW",
    "ROW_STALL",
    "ROW_TCP",
    "ROW_TORCH0",
    "ROW_TORCH2",
    "ROW_TRANSFORM",
    "STALL_GOAL_MS",
    "TCP_CLIENTS",
    "TOKEN_ROWS",
    "WORKLOAD_NAMES",
    "BenchError",
    "BenchOptions",
    "epoch_stalls",
    "run",
]
