"""batchfeed on Ray: loader servers that Ray places, restarts and finds (``pip install
'batchfeed[ray]'``; Ray is imported only here, when this module is used).

    import batchfeed.ray as bfray

    with bfray.start_loaders("train.arrow", shards=2, workers=2) as loaders:
        handle = loaders.handle          # pickles: hand it to Ray Train workers, tasks, actors
        ...                              # in a worker: handle.client(batch_size=256, seed=0)

What it owns:

- **Placement.** ``start_loaders`` starts ``replicas x shards`` loader actors, each replica a
  placement group spread over the nodes (``SPREAD``: one bundle of ``num_cpus`` per shard).
  Each actor (``ray_loader.Loader``) runs ``batchfeed.serve`` on its node from its main thread
  (the server dies with it): its own workers and shared memory, bound to the node's address
  as Ray knows it and to an ``ipc://`` socket.  A trainer on a loader's node (Ray's node ids:
  ``local_loaders()``) reads it over that socket, in place; the others over tcp.
- **Security.** CURVE keys are made for the job: the loaders get the server's secret key and
  the clients' public key, the handle carries the client's; each side writes them to a private
  (0700) directory on its node.  No ``insecure``.
- **Finding.** Every loader heartbeats its address to a registry actor (on the driver's node);
  the handle's ``addresses()`` is the registry's live set, which a ``Client`` asks every
  second.  A loader not heard from for ``stale_after`` seconds leaves the set (its batches go to
  the others); one that Ray restarted, on this node or another, joins with its new address.
- **Faults.** Loader actors restart (``max_restarts``); a loader whose server died exits, so
  that Ray restarts it; a killed actor's server gets its parent-death SIGTERM and removes its
  segments; a server starting on a node removes what SIGKILLed servers left there.
- **Elastic.** ``add_replica()`` adds one replica (of every shard) while clients train;
  ``batchfeed.ray_elastic.WaitShareScaler`` adds them while the trainers wait.

``stop()`` (or leaving the ``with`` block) stops every loader (SIGTERM: each removes its
segments), then the registry, then removes the placement groups and sweeps each loader node's
``/dev/shm`` for segments of dead servers.  Bounded: every wait on Ray has a timeout.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfeed.ray_loader import (
    CALL_TIMEOUT_S,
    READY_TIMEOUT_S,
    JobKeys,
    Loader,
    Registry,
    private_files,
    sweep_segments,
)
from batchfeed.shared.errors import (
    BatchfeedError,
    InvalidRequest,
    ResourceError,
    ServerUnavailable,
)

if TYPE_CHECKING:
    from batchfeed.client import Client
    from batchfeed.client.torch_data import BatchfeedDataset

HEARTBEAT_S = 0.5  # a loader tells the registry it is alive this often
STALE_AFTER_S = 3.0  # ... and leaves the set when not heard from for this long
REPORT_S = 0.5  # a tracked client sends its wait statistics this often
RAY_HINT = "batchfeed.ray needs Ray: pip install 'batchfeed[ray]'"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ResourceError(RAY_HINT) from None
    if not ray.is_initialized():
        ray.init()
    return ray


def _cause(exc: BaseException) -> BaseException:
    """The batchfeed error a Ray error carries (a loader's DatasetError, say), rebuilt from
    its text if Ray passed only that; or ``exc``."""
    import re

    from batchfeed.shared import errors

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, BatchfeedError):
            return seen or exc
        seen = getattr(seen, "cause", None)
    m = re.search(r"batchfeed\.shared\.errors\.(\w+): (.+)", str(exc))
    kind = getattr(errors, m.group(1), None) if m else None
    if m and isinstance(kind, type) and issubclass(kind, BatchfeedError):
        return kind(m.group(2).strip())
    return exc


# ---------------------------------------------------------------------------------- the handle


@dataclass(frozen=True)
class LoaderSet:
    """What trainers are given: a server set (``addresses()``) with the job's client keys.
    It pickles; Ray hands it to workers, tasks and actors."""

    registry: Any
    keys: JobKeys | None
    name: str

    def addresses(self) -> list[str]:
        """The live loaders' addresses, as a ``Client`` asks for them every second: ``ipc://``
        for those on this process's Ray node (read in place), tcp for the others.  While none
        is live (Ray restarting them all) it waits up to ``CALL_TIMEOUT_S``, then raises
        ServerUnavailable."""
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not (live := self.loaders()):
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"no loader of {self.name!r} has served for {CALL_TIMEOUT_S:g} s: Ray may "
                    "be restarting them, or they were stopped; see their actors' logs (ray "
                    "logs), or start them again with batchfeed.ray.start_loaders")
            time.sleep(0.2)
        node = _ray().get_runtime_context().get_node_id()
        return [info["ipc"] if info["node_id"] == node else info["address"] for info in live]

    def loaders(self) -> list[dict[str, Any]]:
        """Each live loader: ``key``, ``address`` (tcp), ``ipc`` (for its node), ``node_id``,
        ``pid``, ``shard``."""
        return _ask(self.registry.live)

    def local_loaders(self) -> list[dict[str, Any]]:
        """The live loaders on this process's Ray node (by node id): read over their ``ipc``
        address, in place."""
        node = _ray().get_runtime_context().get_node_id()
        return [info for info in self.loaders() if info["node_id"] == node]

    def curve(self) -> tuple[str, str] | None:
        """(client secret key file, server public key file) on this node, for ``Client``'s
        ``curve=``: written once per process, 0600 in a private directory."""
        if self.keys is None:
            return None
        files = _CURVE_FILES.get(self.keys.client_public)
        if files is None:
            directory = private_files({"client.key_secret": self.keys.client_secret,
                                        "server.key": self.keys.server_public})
            files = (f"{directory}/client.key_secret", f"{directory}/server.key")
            _CURVE_FILES[self.keys.client_public] = files
        return files

    def client_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with the job's keys and, unless given, Ray Train's rank and world size."""
        out = dict(kwargs)
        out.setdefault("curve", self.curve())
        if "rank" not in out and "world_size" not in out:
            out["rank"], out["world_size"] = train_rank()
        return out

    def client(self, *, track: bool = True, **kwargs: Any) -> Client:
        """A ``Client`` of these loaders (``Client``'s arguments); with ``track``, its wait
        statistics go to the registry (for ``WaitShareScaler``)."""
        from batchfeed import Client

        kwargs = self.client_kwargs(kwargs)
        client = Client(self, **kwargs)
        if track:
            _track(client, self.registry, f"{client.params.rank}:{os.getpid()}")
        return client

    def dataset(self, **kwargs: Any) -> BatchfeedDataset:
        """A ``BatchfeedDataset`` of these loaders (it pickles, and connects on first use)."""
        from batchfeed.client.torch_data import BatchfeedDataset

        return BatchfeedDataset(self, **self.client_kwargs(kwargs))

    def trainer_reports(self) -> dict[str, dict[str, float]]:
        """The tracked clients' latest ``Client.stats()``, by trainer."""
        return _ask(self.registry.reports)

    def __repr__(self) -> str:
        return f"LoaderSet({self.name!r})"


_CURVE_FILES: dict[str, tuple[str, str]] = {}


def _ask(method: Any) -> Any:
    """Call a registry method; while the registry restarts (Ray restarts it, and the loaders'
    heartbeats fill it again), ask again, for up to ``CALL_TIMEOUT_S``."""
    ray = _ray()
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while True:
        try:
            return ray.get(method.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def train_rank() -> tuple[int, int]:
    """(rank, world size) of this Ray Train worker; (0, 1) outside Ray Train."""
    try:
        import ray.train

        context = ray.train.get_context()
        return int(context.get_world_rank()), int(context.get_world_size())
    except Exception:
        return 0, 1


def _track(client: Any, registry: Any, name: str) -> None:
    """Send ``client.stats()`` to the registry every ``REPORT_S`` until the client is gone."""
    ref = weakref.ref(client)
    stop = threading.Event()

    def run() -> None:
        import ray

        while not stop.wait(REPORT_S):
            live = ref()
            if live is None or live._conn is None or not ray.is_initialized():
                return  # the client closed, or Ray shut down
            try:
                registry.report.remote(name, {**live.stats(), "at": time.time()})
            except Exception:  # the registry is gone: the job is stopping
                return
            del live

    weakref.finalize(client, stop.set)
    threading.Thread(target=run, name="batchfeed-track", daemon=True).start()


# ---------------------------------------------------------------------------------- the group


@dataclass
class LoaderGroup:
    """The driver's side of a job's loaders: ``handle``, ``add_replica()``, ``stop()``."""

    handle: LoaderSet
    shards: int
    data: Any
    options: dict[str, Any]
    num_cpus: float
    max_restarts: int
    registry_name: str
    actors: dict[str, Any] = field(default_factory=dict)
    groups: list[Any] = field(default_factory=list)  # placement groups
    replicas: int = 0
    nodes: set[str] = field(default_factory=set)
    _stopped: bool = False

    def add_replica(self, timeout: float = READY_TIMEOUT_S) -> list[str]:
        """Start one more replica of every shard (spread over nodes); returns its loaders'
        keys once they serve.  Clients of the handle use them within a second."""
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group([{"CPU": self.num_cpus}] * self.shards, strategy="SPREAD")
        self.groups.append(pg)
        try:
            ray.get(pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ResourceError(
                f"Ray could not place {self.shards} loader(s) of {self.num_cpus:g} CPU within "
                f"{timeout:g} s: add nodes or CPUs, or start fewer or smaller loaders "
                "(num_cpus=)") from None
        replica, keys = self.replicas, []
        actor_class = ray.remote(Loader)
        for shard in range(self.shards):
            key = f"r{replica}s{shard}"
            options = dict(self.options)
            if self.shards > 1:
                options["shard"] = (shard, self.shards)
            self.actors[key] = actor_class.options(
                num_cpus=self.num_cpus, max_restarts=self.max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=shard),
            ).remote(key, self.data, self.registry_name, self.handle.keys, options,
                     HEARTBEAT_S)
            keys.append(key)
        self.replicas += 1
        for key in keys:
            self._wait_ready(key, timeout)
        return keys

    def _wait_ready(self, key: str, timeout: float) -> None:
        ray = _ray()
        try:
            info = ray.get(self.actors[key].describe.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ResourceError(f"loader {key} did not become ready within {timeout:g} s: "
                                "see its actor's log (ray logs)") from None
        except ray.exceptions.RayError as exc:
            cause = _cause(exc)
            if isinstance(cause, BatchfeedError):
                raise cause from None
            first = str(cause).strip().splitlines()
            raise ResourceError(f"loader {key} did not start: "
                                f"{first[-1] if first else type(cause).__name__}") from None
        self.nodes.add(info["node_id"])

    def stop(self) -> None:
        """Stop every loader, the registry and the placement groups; sweep the loaders'
        nodes.  Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        import ray

        if not ray.is_initialized():  # Ray was shut down first: its actors went with it
            return
        stops = [actor.stop.remote() for actor in self.actors.values()]
        for ref in stops:
            try:
                ray.get(ref, timeout=30.0)
            except ray.exceptions.RayError:
                pass  # a dead loader's server died with it (and a sweep follows)
        for actor in [*self.actors.values(), self.handle.registry]:
            ray.kill(actor, no_restart=True)
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups:
            remove_placement_group(pg)
        self._sweep(ray)

    def _sweep(self, ray: Any) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        sweep = ray.remote(num_cpus=0)(sweep_segments)
        refs = [sweep.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote() for node in self.nodes & alive]
        try:
            ray.get(refs, timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayError:
            pass

    def __enter__(self) -> LoaderGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_loaders(data: Any, *, shards: int = 1, replicas: int = 1, workers: int = 1,
                  num_cpus: float | None = None, curve: bool = True, max_restarts: int = -1,
                  name: str = "batchfeed", stale_after: float = STALE_AFTER_S,
                  ready_timeout: float = READY_TIMEOUT_S, **server_options: Any) -> LoaderGroup:
    """Start ``replicas`` x ``shards`` loader servers of ``data`` as Ray actors; returns once
    every one serves.

    ``data``: a path every node can read (as ``batchfeed serve --data`` takes), or data in
    memory (a dict of columns, a pyarrow Table, ...), put once into Ray's object store.
    ``workers`` server worker processes per loader, ``num_cpus`` Ray CPUs per loader (default:
    ``workers``).  ``curve=False`` binds without keys (the node's address must then be loopback,
    or pass ``insecure=True``).  ``server_options`` are ``ServerConfig`` fields
    (``transforms``, ``slots``, ...).  ``max_restarts``: Ray's, per loader (-1: always).
    """
    for what, value in (("shards", shards), ("replicas", replicas), ("workers", workers)):
        if type(value) is not int or value < 1:
            raise InvalidRequest(f"start_loaders: {what} must be an int >= 1, got {value!r}")
    if "shard" in server_options or "bind" in server_options:
        raise InvalidRequest("start_loaders places and binds the loaders itself: pass shards=N "
                             "(not shard=) and no bind=")
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not isinstance(data, (str, Path)):
        from batchfeed.server.sources import check_fields
        from batchfeed.server.sources.memory import memory_sources

        check_fields(memory_sources(data), "the data passed to start_loaders")  # here, at once
        data = [ray.put(data)]  # once; every loader (and every restart) reads it from there
    registry_name = f"batchfeed-registry-{uuid.uuid4().hex}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    registry = ray.remote(Registry).options(
        name=registry_name, num_cpus=0, max_restarts=-1, scheduling_strategy=here,
    ).remote(stale_after)
    handle = LoaderSet(registry, JobKeys.make() if curve else None, name)
    group = LoaderGroup(handle, shards, str(data) if isinstance(data, Path) else data,
                        {"workers": workers, **server_options},
                        float(num_cpus if num_cpus is not None else workers), max_restarts,
                        registry_name)
    try:
        for _ in range(replicas):
            group.add_replica(ready_timeout)
    except BaseException:
        group.stop()
        raise
    return group


__all__ = ["JobKeys", "LoaderGroup", "LoaderSet", "start_loaders", "train_rank"]

