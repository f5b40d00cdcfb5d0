"""One client over several servers: plan order kept, load follows speed, a lost server's
batches are asked of the others."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import server_report

from batchfeed import Client, DataMismatch, ServerUnavailable
from batchfeed.launch import ServerProcess
from batchfeed.shared.plan import BatchPlan, PlanParams

REPO = Path(__file__).resolve().parents[1]
N = 20_003


def sessions_batches(address: str) -> int:
    return sum(s["batches"] for s in server_report(address)["sessions"])


def expected_ids(epoch: int, **kw: object) -> list[list[int]]:
    plan = BatchPlan(N, PlanParams(**kw))
    return [plan.indices(epoch, k).tolist() for k in range(plan.batches_per_epoch)]


def test_three_servers_give_the_single_server_order(serve, dataset_path) -> None:
    path = dataset_path(N)
    servers = [serve("--data", path, "--workers", 1) for _ in range(3)]
    addresses = [s.address for s in servers]
    with Client(addresses, batch_size=64, seed=4, prefetch=24) as c:
        got = [b["id"].tolist() for b in c.epoch(1)]
        assert got == expected_ids(1, batch_size=64, seed=4)
        counts = [sessions_batches(a) for a in addresses]
    assert all(n > 0 for n in counts) and sum(counts) >= len(got)


def test_a_faster_server_is_asked_for_more(serve, dataset_path) -> None:
    path = dataset_path(N)
    sleepy = ("--transform", "tests.transforms.basic:sleepy")  # the same transform on both
    fast = serve("--data", path, "--workers", 1, *sleepy,
                 env={"PYTHONPATH": str(REPO), "SLEEPY_MS": "0"})
    slow = serve("--data", path, "--workers", 1, *sleepy, env={"PYTHONPATH": str(REPO)})
    with Client([fast.address, slow.address], batch_size=64, seed=1, prefetch=16) as c:
        got = [b["id"].tolist() for b in c.epoch(0)]
        assert got == expected_ids(0, batch_size=64, seed=1)
        n_fast, n_slow = sessions_batches(fast.address), sessions_batches(slow.address)
    assert n_fast > 2 * n_slow, (n_fast, n_slow)


def test_a_server_killed_mid_epoch_loses_nothing(serve, dataset_path) -> None:
    path = dataset_path(N)
    doomed = ServerProcess(["--data", str(path), "--workers", 1]).start()
    others = [serve("--data", path, "--workers", 1) for _ in range(2)]
    try:
        with Client([doomed.address] + [s.address for s in others], batch_size=64, seed=9,
                    prefetch=24) as c:
            it = c.epoch(2)
            got = [next(it)["id"].tolist() for _ in range(60)]
            assert sessions_batches(doomed.address) > 0  # it did take part
            os.kill(doomed.pid, signal.SIGKILL)
            got += [b["id"].tolist() for b in it]  # no exception
            assert got == expected_ids(2, batch_size=64, seed=9)
            assert sorted(sum(got, [])) == list(range(N))
            # the next epoch runs on the two that are left
            assert [b["id"].tolist() for b in c.epoch(3)] == expected_ids(3, batch_size=64,
                                                                           seed=9)
    finally:
        doomed.stop()
        import subprocess
        import sys
        subprocess.run([sys.executable, "-c", "from batchfeed.shared.shm import "
                        "remove_stale_segments as r; r()"], check=True)


def test_servers_with_different_data_are_refused(serve, dataset_path, tmp_path) -> None:
    a = serve("--data", dataset_path(N), "--workers", 1)
    np.savez(tmp_path / "other.npz", id=np.arange(500))
    b = serve("--data", tmp_path / "other.npz", "--workers", 1)
    with pytest.raises(DataMismatch, match="Every server of a client must serve the same data"):
        Client([a.address, b.address], batch_size=64)


def test_a_name_with_several_records_resolves_to_every_server() -> None:
    from batchfeed.client import resolve_all
    from batchfeed.shared.errors import InvalidRequest

    assert "tcp://127.0.0.1:5555" in resolve_all("tcp://localhost:5555")
    assert resolve_all("tcp://127.0.0.1:9") == ["tcp://127.0.0.1:9"]
    with pytest.raises(InvalidRequest, match="tcp://NAME:PORT"):
        resolve_all("ipc:///tmp/x")
    with pytest.raises(ServerUnavailable, match="cannot resolve"):
        resolve_all("tcp://no-such-host.invalid:5555")
