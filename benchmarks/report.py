"""What a bench run prints first and writes last: the header (machine, versions of batchfeed's
dependencies and of every peer) and the ``--json`` file."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import numpy as np

from .measure import usable_cores
from .peers import version

PEER_DISTS = ("torch", "torchdata", "spdl-core", "spdl-io", "ray")


def header_lines() -> list[str]:
    import zmq

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    peers = "  ".join(f"{d} {version(d) or 'not installed'}" for d in PEER_DISTS)
    return [
        f"batchfeed bench  {now}  cores: {os.cpu_count()} ({usable_cores()} usable)  "
        f"python {platform.python_version()}  numpy {np.__version__}  "
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})",
        f"peers: {peers}",
        "note: the machine is shared and noisy; the ratios between rows of one run are the "
        "meaningful numbers, not absolute times.",
    ]


def write_json(path: str, results: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
