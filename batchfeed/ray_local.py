"""A simulated multi-node Ray cluster on this one host: for trying ``batchfeed.ray``, and for
its tests, example and bench.  Not a multi-host cluster: every node shares this host's CPUs,
memory, ``/dev/shm`` and file system.

``ray.cluster_utils.Cluster`` starts real raylets (nodes), each with its own node id, workers
and object store.  ``simulated_cluster(nodes)`` starts one, small enough for a shared 2-core
machine (2 logical CPUs and an 80 MiB object store per node, no dashboard, no usage stats),
connects this process, and on exit disconnects and shuts every node down.  Every address is
loopback: Ray turns "127.0.0.1" into the host's routable address unless its
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is 0, which this module sets for the nodes it starts (in
the environment they inherit) and for this process.  Node failures are noticed within about
2 s (health checks every 500 ms).  ``env`` adds variables for the nodes' workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

MIB = 2**20
NODE: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 80 * MIB,
                        "node_ip_address": "127.0.0.1"}
HEAD: dict[str, Any] = {**NODE, "include_dashboard": False, "_system_config": {
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "GLOO_SOCKET_IFNAME": "lo"}  # Ray on loopback; torch's gloo too


def keep_ray_on_loopback() -> None:
    """Make this process (and the Ray nodes it starts) use 127.0.0.1 as the node address."""
    os.environ.update(LOOPBACK_ENV)
    try:
        from ray._private import ray_constants
    except ImportError:
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray looks up this node's address


@contextlib.contextmanager
def simulated_cluster(nodes: int = 3, env: Mapping[str, str] | None = None,
                      node_args: Mapping[str, Any] | None = None,
                      log_to_driver: bool = False) -> Iterator[Any]:
    """A connected ``ray.cluster_utils.Cluster`` of ``nodes`` nodes (the first the head);
    ``log_to_driver``: show the workers' output here."""
    keep_ray_on_loopback()
    import ray
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})  # the raylets and their workers inherit it
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**HEAD, **(node_args or {})})
        for _ in range(nodes - 1):
            cluster.add_node(**{**NODE, **(node_args or {})})
        ray.init(address=cluster.address, logging_level=logging.WARNING,
                 log_to_driver=log_to_driver)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def node_of(cluster: Any, node_id: str) -> Any:
    """The cluster's node with this Ray node id."""
    for node in [cluster.head_node, *cluster.worker_nodes]:
        if node.node_id == node_id:
            return node
    raise KeyError(f"no node {node_id} in the cluster")
