"""A Ray cluster of several nodes on this one host, for the Ray tests and the Ray example.

``ray.cluster_utils.Cluster`` starts real raylets (nodes), each with its own node id,
workers and object store, all on this host.  Kept small for a shared 2-core machine: 2 logical
CPUs and an 80 MiB object store per node, no dashboard, no usage stats.  Every address is
loopback: Ray resolves "127.0.0.1" to the host's routable address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which must be set before Ray is imported (this module
sets it, so import it before ``ray``).  Node failures are noticed within about 2 s (health
checks every 500 ms).

``local_cluster(nodes)`` starts it, connects this process, and on exit disconnects, shuts every
node down and waits (bounded) until none of Ray's processes that it started is left.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node addresses stay 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from batchfeed.shared.procs import process_tree

REPO = str(Path(__file__).resolve().parents[1])
MIB = 2**20
NODE: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 80 * MIB,
                        "node_ip_address": "127.0.0.1"}
HEAD: dict[str, Any] = {**NODE, "include_dashboard": False, "_system_config": {
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}}
ENV = {"PYTHONPATH": os.pathsep.join([REPO, f"{REPO}/tests"]), "SLEEPY_MS": "24"}  # the
# nodes' workers import tests.transforms and the test modules (their functions run there)


@contextlib.contextmanager
def local_cluster(nodes: int = 3) -> Iterator[Any]:
    """A connected cluster of ``nodes`` nodes (the first the head); shut down on exit."""
    import ray
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # the raylets and their workers inherit it
    before = set(process_tree(os.getpid()))
    cluster = Cluster(initialize_head=True, head_node_args=HEAD, shutdown_at_exit=True)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**NODE)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        deadline = time.monotonic() + 30
        while set(process_tree(os.getpid())) - before and time.monotonic() < deadline:
            time.sleep(0.1)
        left = set(process_tree(os.getpid())) - before
        assert not left, f"Ray processes left after the cluster shut down: {sorted(left)}"


def node_of(cluster: Any, node_id: str) -> Any:
    """The cluster's node object with this Ray node id."""
    for node in [cluster.head_node, *cluster.worker_nodes]:
        if node.node_id == node_id:
            return node
    raise AssertionError(f"no node {node_id} in the cluster")
