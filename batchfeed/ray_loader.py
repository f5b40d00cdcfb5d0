"""What runs on the cluster for ``batchfeed.ray``: the loader actor (one server on its node),
the registry actor (the job's live loaders and its trainers' wait statistics), the job's CURVE
keys and the private files they are written to, and the sweep of a node's ``/dev/shm``.

The classes are plain; ``batchfeed.ray`` makes them Ray actors when it starts them (Ray is
imported only there and in these methods, which run in Ray's workers).  A loader stops with
``stop()`` (its server's SIGTERM: the server removes its segments); a loader killed by Ray
takes its server down with it (the server's parent-death signal), and what that server left in
``/dev/shm`` if Ray SIGKILLed it first is swept by the loaders on its node every few seconds.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 180.0  # loaders loading their data, on a busy 2-core host
CALL_TIMEOUT_S = 10.0  # one call to the registry or a loader
SWEEP_EVERY = 4  # heartbeats between two sweeps of this node's /dev/shm by a loader


# ---------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class JobKeys:
    """The job's CURVE certificates, as file texts (ZeroMQ's format): the server's secret
    and public, the client's secret and public."""

    server_secret: str
    server_public: str
    client_secret: str
    client_public: str

    @classmethod
    def make(cls) -> JobKeys:
        import zmq.auth

        with tempfile.TemporaryDirectory(prefix="batchfeed-keys-") as tmp:
            for name in ("server", "client"):
                zmq.auth.create_certificates(tmp, name)
            text = {f: Path(tmp, f).read_text() for f in
                    ("server.key_secret", "server.key", "client.key_secret", "client.key")}
        return cls(text["server.key_secret"], text["server.key"],
                   text["client.key_secret"], text["client.key"])


KEY_DIRS: list[str] = []


def _remove_key_dirs() -> None:
    for directory in KEY_DIRS:
        shutil.rmtree(directory, ignore_errors=True)


def private_files(files: Mapping[str, str]) -> str:
    """Write ``files`` (relative name -> text) 0600 into a fresh 0700 directory, removed at
    this process's exit; returns the directory."""
    directory = tempfile.mkdtemp(prefix="batchfeed-keys-")
    if not KEY_DIRS:
        atexit.register(_remove_key_dirs)
    KEY_DIRS.append(directory)
    for name, text in files.items():
        path = Path(directory, name)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return directory


# ---------------------------------------------------------------------------------- registry


class Registry:
    """The live set of a job's loaders and what its tracked trainers report (a Ray actor)."""

    def __init__(self, stale_after: float):
        self.stale_after = stale_after
        self.loaders: dict[str, dict[str, Any]] = {}
        self.trainers: dict[str, dict[str, float]] = {}

    def heartbeat(self, key: str, info: dict[str, Any]) -> None:
        self.loaders[key] = {**info, "seen": time.monotonic()}

    def leave(self, key: str) -> None:
        self.loaders.pop(key, None)

    def live(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{**info, "key": key} for key, info in sorted(self.loaders.items())
                if now - info["seen"] <= self.stale_after]

    def report(self, trainer: str, stats: dict[str, float]) -> None:
        self.trainers[trainer] = stats

    def reports(self) -> dict[str, dict[str, float]]:
        return dict(self.trainers)


# ---------------------------------------------------------------------------------- loaders


class Loader:
    """One loader server on one node (a Ray actor): serves, heartbeats, and exits if its
    server dies (so that Ray restarts it)."""

    def __init__(self, key: str, data: Any, registry_name: str, keys: JobKeys | None,
                 server_options: dict[str, Any], heartbeat_s: float):
        import ray

        import batchfeed

        self.key = key
        # The registry by name: an actor handle among the arguments of an actor that Ray
        # restarts makes Ray log an error at every start.
        registry: Any = ray.get_actor(registry_name)
        self.registry = registry
        host = ray.util.get_node_ip_address()
        bind = f"tcp://[{host}]:0" if ":" in host else f"tcp://{host}:0"
        options = dict(server_options)
        # Trainers on this node read over ipc (and in place); others over the node's tcp.
        self.socket_dir = tempfile.mkdtemp(prefix="bf-ray-")  # 0700, this user's only
        atexit.register(shutil.rmtree, self.socket_dir, True)
        options["also_bind"] = (f"ipc://{self.socket_dir}/loader.sock",)
        directory = None
        if keys is not None:
            directory = private_files({"server.key_secret": keys.server_secret,
                                       "authorized/client.key": keys.client_public})
            options.update(curve_secret_key=f"{directory}/server.key_secret",
                           authorized_keys=f"{directory}/authorized")
        if isinstance(data, list):  # [ObjectRef]: data in memory, in the object store
            data = ray.get(data[0], timeout=READY_TIMEOUT_S)
        try:
            self.server = batchfeed.serve(data, bind=bind, **options)  # from this thread
        finally:  # the server read its keys at start: no copy stays on the node's disk
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        self.info = {"address": self.server.address, "ipc": options["also_bind"][0],
                     "node_id": ray.get_runtime_context().get_node_id(),
                     "pid": self.server.pid, "actor_pid": os.getpid(),
                     "shard": server_options.get("shard"), "started": time.time()}
        self._stop = threading.Event()
        ray.get(registry.heartbeat.remote(key, self.info), timeout=CALL_TIMEOUT_S)
        self._beat: threading.Thread = threading.Thread(target=self._heartbeat, args=(heartbeat_s,),
                                      name="batchfeed-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self, period: float) -> None:
        beats = 0
        while not self._stop.wait(period):
            if self.server.process.exitcode is not None and not self._stop.is_set():
                os._exit(1)  # the server died: this loader dies too, and Ray restarts it
            self.registry.heartbeat.remote(self.key, self.info)
            beats += 1
            if beats % SWEEP_EVERY == 0:
                # A killed loader's server gets SIGTERM from its parent's death, but Ray may
                # SIGKILL a dead worker's children before it is done: what such a server left
                # on this node goes within seconds, not at the next server's start.
                sweep_segments()

    def describe(self) -> dict[str, Any]:
        return self.info

    def stop(self) -> int | None:
        """Leave the set and stop the server (SIGTERM: it removes its segments)."""
        import ray

        self._stop.set()
        self._beat.join(CALL_TIMEOUT_S)
        try:
            ray.get(self.registry.leave.remote(self.key), timeout=CALL_TIMEOUT_S)
        except Exception:  # the registry is gone: nobody is left to tell
            pass
        code = self.server.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        return code


def sweep_segments() -> list[str]:
    """Remove this node's segments of dead batchfeed servers (by loaders now and then, and by
    a Ray task per node at ``stop()``)."""
    from batchfeed.shared.shm import remove_stale_segments

    try:
        return remove_stale_segments()
    except OSError:  # /dev/shm unreadable: nothing this loader can do about it
        return []
