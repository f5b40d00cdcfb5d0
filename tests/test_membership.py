"""Server sets: a client's servers may change while it trains (a replica added, one removed, one
moved to another address), and the batches do not change; the fast path is taken wherever it
can be; a lost server is reported at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import server_report, wait_until

from batchfeed import Client, ServerUnavailable
from batchfeed.client import ResolvedServers
from batchfeed.launch import ServerProcess
from batchfeed.shared.plan import BatchPlan, PlanParams

N = 20_003
REPO = str(Path(__file__).resolve().parents[1])


class Servers:
    """A server set the test changes by hand (what an orchestrator would keep)."""

    def __init__(self, *addresses: str):
        self.now: list[str] = list(addresses)
        self.lock = threading.Lock()
        self.fail = False

    def set(self, *addresses: str) -> None:
        with self.lock:
            self.now = list(addresses)

    def addresses(self) -> Sequence[str]:
        if self.fail:
            raise RuntimeError("the orchestrator is away")
        with self.lock:
            return list(self.now)


def expected(epoch: int, **kw: object) -> list[list[int]]:
    plan = BatchPlan(N, PlanParams(**kw))
    return [plan.indices(epoch, k).tolist() for k in range(plan.batches_per_epoch)]


def batches(address: str) -> int:
    return sum(s["batches"] for s in server_report(address)["sessions"])


def test_a_replica_added_while_training_is_used_and_nothing_changes(serve, dataset_path
                                                                    ) -> None:
    path = dataset_path(N)
    sleepy = ("--transform", "tests.transforms.basic:sleepy")  # a loader that cannot keep up
    a = serve("--data", path, "--workers", 1, *sleepy, env={"PYTHONPATH": REPO})
    servers = Servers(a.address)
    with Client(servers, batch_size=64, seed=2, prefetch=16) as client:
        it = client.epoch(0)
        got = [next(it)["id"].tolist() for _ in range(20)]
        b = serve("--data", path, "--workers", 1, *sleepy,
                  env={"PYTHONPATH": REPO, "SLEEPY_MS": "0"})
        servers.set(a.address, b.address)
        got += [batch["id"].tolist() for batch in it]
        assert got == expected(0, batch_size=64, seed=2)
        assert batches(b.address) > 0  # the new one took part at once


def test_a_server_that_leaves_the_set_hands_its_batches_on(serve, dataset_path) -> None:
    path = dataset_path(N)
    a, b = (serve("--data", path, "--workers", 1) for _ in range(2))
    servers = Servers(a.address, b.address)
    with Client(servers, batch_size=64, seed=3, prefetch=16) as client:
        it = client.epoch(1)
        got = [next(it)["id"].tolist() for _ in range(30)]
        servers.set(b.address)
        wait_until(lambda: not server_report(a.address)["sessions"], timeout=20,
                   what="the departed server's session to close")
        before = batches(b.address)
        got += [batch["id"].tolist() for batch in it]
        assert got == expected(1, batch_size=64, seed=3)
        assert batches(b.address) > before


def test_a_server_moved_to_another_address_is_followed(serve, dataset_path) -> None:
    path = dataset_path(N)
    first = ServerProcess(["--data", str(path), "--workers", "1"]).start()
    assert first.address is not None
    servers = Servers(first.address)
    try:
        with Client(servers, batch_size=64, seed=4, prefetch=16,
                    reconnect_timeout=30) as client:
            it = client.epoch(0)
            got = [next(it)["id"].tolist() for _ in range(20)]
            os.kill(first.pid, signal.SIGKILL)  # its node died ...
            moved = serve("--data", path, "--workers", 1)  # ... and it came back elsewhere
            servers.set(moved.address)
            got += [batch["id"].tolist() for batch in it]
            assert got == expected(0, batch_size=64, seed=4)
    finally:
        first.stop()
        from batchfeed.shared.shm import remove_stale_segments

        remove_stale_segments()  # the SIGKILLed server's ring, as the next start would


def test_a_server_set_that_fails_keeps_the_servers_it_had(serve, dataset_path, caplog) -> None:
    a = serve("--data", dataset_path(N), "--workers", 1)
    servers = Servers(a.address)
    with caplog.at_level(logging.WARNING, logger="batchfeed.client"), \
            Client(servers, batch_size=64, seed=5) as client:
        servers.fail = True
        time.sleep(1.5)
        assert [b["id"].tolist() for b in client.epoch(0)] == expected(0, batch_size=64,
                                                                       seed=5)
    assert any("did not answer" in r.getMessage() for r in caplog.records)


def test_a_name_resolved_again_is_a_server_set(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    port = srv.address.rsplit(":", 1)[1]
    with Client(ResolvedServers(f"tcp://localhost:{port}"), batch_size=64) as client:
        assert client.rows == N


def test_a_tcp_client_on_the_servers_host_takes_the_fast_path(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    with Client(srv.address, batch_size=500, shuffle="none") as client:
        ids = [int(i) for b in client.epoch(0) for i in b["id"]]
        assert client.servers()[0]["in_place"]
    assert ids == list(range(N))
    with Client(srv.address, batch_size=500, fastpath=False) as socket_only:
        next(iter(socket_only.epoch(0)))
        assert not socket_only.servers()[0]["in_place"]


def test_a_lost_server_is_reported_at_once(dataset_path, caplog) -> None:
    srv = ServerProcess(["--data", str(dataset_path(N)), "--workers", "1"]).start()
    try:
        with caplog.at_level(logging.WARNING, logger="batchfeed.client"), \
                Client(srv.address, batch_size=64, reconnect_timeout=2) as client:
            it = client.epoch(0)
            next(it)
            srv.stop()
            started = time.monotonic()
            wait_until(lambda: any("lost the batchfeed server" in r.getMessage()
                                   for r in caplog.records), timeout=8,
                       what="the warning that the server was lost")
            assert time.monotonic() - started < 8
            with pytest.raises(ServerUnavailable, match="reconnect_timeout=2"):
                for _ in it:
                    pass
    finally:
        srv.stop()
