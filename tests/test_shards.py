"""A dataset sharded across servers: a client of the N shard servers gets exactly the batches one
server of all the rows gives, for every order, sampling, rank and start; replicas of a shard
mix with shards; a missing shard is waited for, then named; bad server sets are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import mapped_segments, server_report

from batchfeed import Client, DataMismatch, ServerUnavailable
from batchfeed.launch import ServerProcess
from batchfeed.shared.shm import remove_stale_segments

N = 2003
pa = pytest.importorskip("pyarrow", reason="the ragged fields here are written with pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A Parquet file with fixed fields (sharded and held whole), a ragged and a str field."""
    ids = np.arange(N)
    rng = np.random.default_rng(0)
    table = pa.table({
        "id": ids,
        "x": list((ids[:, None] * np.array([1.0, -0.5, 0.25])).astype(np.float32)),
        "label": ids % 5,
        "weight": rng.random(N) + 0.1,
        "tokens": [list(range(i % 13)) for i in range(N)],
        "text": [f"row {i}" for i in range(N)],
    })
    table = table.set_column(1, "x", pa.array(table.column("x").to_pylist(),
                                              type=pa.list_(pa.float32(), 3)))
    path = tmp_path_factory.mktemp("shards") / "data.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def shards(data_file):
    """Three shard servers and one server of all the rows (for the whole module)."""
    servers = [ServerProcess(["--data", str(data_file), "--workers", "1", "--shard", f"{i}/3"])
               for i in range(3)]
    whole = ServerProcess(["--data", str(data_file), "--workers", "1"])
    try:
        for srv in (*servers, whole):
            srv.start()
        yield [s.address for s in servers], whole.address
    finally:
        codes = [srv.stop() for srv in (*servers, whole)]
        assert codes == [0] * 4, codes


def epoch_through_a_fault(addresses: list[str], whole: str, at: int, fault: Callable[[], None],
                          **params: object) -> None:
    """Epoch 0 from ``addresses``, with ``fault()`` after batch ``at``, equals the whole
    server's epoch 0."""
    with Client(addresses, prefetch=16, reconnect_timeout=30, **params) as client, \
            Client(whole, **params) as one:
        expected = [dict(b) for b in one.epoch(0)]
        got = []
        for k, batch in enumerate(client.epoch(0)):
            got.append(dict(batch))
            if k == at:
                fault()
    same_batches(got, expected)


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], list):
                assert x[key] == y[key], key
            else:
                assert np.array_equal(x[key], y[key]), key


CASES = [
    dict(batch_size=64, seed=1),
    dict(batch_size=50, shuffle="none"),
    dict(batch_size=32, shuffle="buffer", buffer_size=300, seed=2),
    dict(batch_size=40, sampling="balanced", label="label", seed=3),
    dict(batch_size=40, sampling="weighted", weights="weight", epoch_rows=1000, seed=4),
    dict(batch_size=30, seed=5, rank=1, world_size=3),
    dict(batch_size=30, seed=5, drop_last=True, rank=0, world_size=2),
    dict(batch_size=16, seed=6, ragged="flat"),
    dict(max_tokens=200, seed=7),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_the_shards_give_the_batches_of_one_whole_server(shards, params: dict) -> None:
    addresses, whole = shards
    with Client(addresses, **params) as sharded, Client(whole, **params) as one:
        assert sharded.batches_per_epoch == one.batches_per_epoch
        for epoch, start in ((0, 0), (1, 3)):
            same_batches([dict(b) for b in sharded.epoch(epoch, start_batch=start)],
                         [dict(b) for b in one.epoch(epoch, start_batch=start)])


def test_each_shard_holds_about_its_share(serve, data_file) -> None:
    srv = serve("--data", data_file, "--workers", 1, "--shard", "1/3")
    assert "shard 1/3: rows 667..1,334" in srv.ready_line
    sizes = {name: size for name, size in mapped_segments(srv.pid).items() if "data" in name}
    x = [size for name, size in sizes.items() if name.endswith("_1")]
    assert x == [12 * (1335 - 667)]  # x: this shard's rows only


@pytest.mark.slow
def test_replicas_and_shards_mix_and_losing_a_replica_costs_nothing(serve, data_file) -> None:
    servers = [ServerProcess(["--data", str(data_file), "--workers", "1", "--shard",
                              f"{i % 2}/2"]).start() for i in range(4)]
    whole = serve("--data", data_file, "--workers", 1)
    try:
        epoch_through_a_fault([s.address for s in servers], whole.address, 10,
                              lambda: os.kill(servers[2].pid, signal.SIGKILL),  # a replica
                              batch_size=20, seed=9)
    finally:
        for s in servers:
            s.stop()
        remove_stale_segments()  # the SIGKILLed one's, as the next server start would


@pytest.mark.slow
def test_a_missing_shard_is_waited_for_then_named(serve, data_file, tmp_path: Path) -> None:
    a = serve("--data", data_file, "--workers", 1, "--shard", "0/2")
    b = ServerProcess(["--data", str(data_file), "--workers", "1", "--shard", "1/2"]).start()
    try:
        with Client([a.address, b.address], batch_size=20, seed=1, reconnect_timeout=2) as c:
            it = c.epoch(0)
            next(it)
            b.stop()
            started = time.monotonic()
            with pytest.raises(ServerUnavailable, match=r"lost shard 1 of 2"):
                for _ in it:
                    pass
            assert time.monotonic() - started < 15
    finally:
        b.stop()


@pytest.mark.slow
def test_a_restarted_shard_resumes_exactly(data_file, tmp_path: Path) -> None:
    from conftest import free_port

    ports = [free_port(), free_port()]
    args = [["--data", str(data_file), "--workers", "1", "--shard", f"{i}/2"] for i in range(2)]
    servers = [ServerProcess(a, bind=f"tcp://127.0.0.1:{p}").start() for a, p in zip(args, ports)]
    whole = ServerProcess(["--data", str(data_file), "--workers", "1"])
    try:
        whole.start()

        def restart() -> None:
            os.kill(servers[1].pid, signal.SIGKILL)
            time.sleep(0.5)
            servers[1] = ServerProcess(args[1], bind=f"tcp://127.0.0.1:{ports[1]}").start()

        epoch_through_a_fault([s.address for s in servers], whole.address, 5, restart,
                              batch_size=25, seed=2)
    finally:
        for s in (*servers, whole):
            s.stop()
        remove_stale_segments()  # the SIGKILLed one's, as the next server start would


@pytest.mark.parametrize("layout,why", [
    (["0/3", "2/3"], r"no server given holds shard 1"),
    (["0/3", "whole"], r"together its N shards"),
    (["0/2", "1/3"], r"together its N shards"),
])
def test_bad_server_sets_are_refused_at_connect(serve, data_file, shards, layout,
                                                why: str) -> None:
    parts, whole = shards
    known = {"0/3": parts[0], "1/3": parts[1], "2/3": parts[2], "whole": whole}
    addresses = [known[name] if name in known
                 else serve("--data", data_file, "--workers", 1, "--shard", name).address
                 for name in layout]
    with pytest.raises(ServerUnavailable, match=why):
        Client(addresses, batch_size=10)


def test_servers_of_different_data_are_refused(serve, data_file, dataset_path) -> None:
    a = serve("--data", data_file, "--workers", 1, "--shard", "0/2")
    b = serve("--data", dataset_path(999), "--workers", 1, "--shard", "1/2")
    with pytest.raises(DataMismatch, match="fingerprint"):
        Client([a.address, b.address], batch_size=10)


def test_packing_and_transforms_are_refused_with_shards(serve, data_file) -> None:
    a = serve("--data", data_file, "--workers", 1, "--shard", "0/1")
    with pytest.raises(Exception, match="pack= needs every document on one server"):
        Client(a.address, batch_size=4, pack={"tokens": 16})
    proc = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--data", str(data_file),
                           "--shard", "0/2", "--transform", "batchfeed.transforms:augment",
                           "--bind", "tcp://127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--shard serves each batch in pieces" in proc.stderr
    assert server_report(a.address)["server"]["sessions"] == 0
