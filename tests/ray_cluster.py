"""The Ray tests' cluster: ``batchfeed.ray_local.simulated_cluster`` (several real raylets on
this host, loopback only, small), plus the check that none of the processes it started is left
once it shut down.  Import this module before ``ray``: it keeps Ray's node addresses on
loopback for this process too."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchfeed.ray_local import NODE, keep_ray_on_loopback, node_of, simulated_cluster
from batchfeed.shared.procs import process_tree

keep_ray_on_loopback()

REPO = str(Path(__file__).resolve().parents[1])
# The nodes' workers import tests.transforms and the test modules (their functions run there).
ENV = {"PYTHONPATH": os.pathsep.join([REPO, f"{REPO}/tests"]), "SLEEPY_MS": "24"}

__all__ = ["ENV", "NODE", "local_cluster", "node_of"]


@contextlib.contextmanager
def local_cluster(nodes: int = 3) -> Iterator[Any]:
    """A connected cluster of ``nodes`` nodes; on exit, shut down with no process left."""
    before = set(process_tree(os.getpid()))
    with simulated_cluster(nodes, ENV) as cluster:
        yield cluster
    deadline = time.monotonic() + 30
    while set(process_tree(os.getpid())) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = set(process_tree(os.getpid())) - before
    assert not left, f"Ray processes left after the cluster shut down: {sorted(left)}"
