"""End to end: a real ``batchfeed serve`` process and real clients, checked row by row."""

from __future__ import annotations

import signal
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from conftest import (
    children,
    make_rows,
    pid_alive,
    server_report,
    shared_server,
    shm_segments,
    wait_until,
)

from batchfeed import (
    Client,
    InvalidArgument,
    InvalidRequest,
    ServerUnavailable,
    VersionMismatch,
)
from batchfeed.launch import ServerProcess
from batchfeed.shared import protocol
from batchfeed.shared.plan import BatchPlan, PlanParams

N = 1003  # not a multiple of any batch size used here


def collect(client: Client, epoch: int, start_batch: int = 0) -> list[dict[str, np.ndarray]]:
    return [{k: v.copy() for k, v in b.items()} for b in client.epoch(epoch, start_batch)]


def ids(batches: list[dict]) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that only read from it (each checks its own rows)."""
    yield from shared_server(tmp_path_factory, "--workers", 2, n=N)


def test_every_row_exactly_once_per_epoch(server) -> None:
    with Client(server.address, batch_size=64, seed=1) as c:
        assert c.batches_per_epoch == 16
        for epoch in range(3):
            batches = collect(c, epoch)
            assert [len(b["id"]) for b in batches] == [64] * 15 + [N % 64]
            rows = sorted(sum(ids(batches), []))
            assert rows == list(range(N))


def test_rows_arrive_intact(server) -> None:
    source = make_rows(N)
    with Client(server.address, batch_size=100, seed=3) as c:
        assert {f.name: (f.dtype, f.shape) for f in c.fields} == {
            k: (v.dtype, v.shape[1:]) for k, v in source.items()}
        for batch in c.epoch(0):
            rows = batch["id"]
            for name, arr in source.items():
                assert batch[name].dtype == arr.dtype
                assert batch[name].shape == (len(rows), *arr.shape[1:])
                assert np.array_equal(batch[name], arr[rows]), name


def test_order_is_deterministic_across_clients_and_worker_counts(serve, dataset_path) -> None:
    path = dataset_path(N)
    orders = []
    for workers in (1, 3):
        srv = serve("--data", path, "--workers", workers)
        with Client(srv.address, batch_size=50, seed=7) as a, \
                Client(srv.address, batch_size=50, seed=7, prefetch=3) as b:
            orders.append(ids(collect(a, 2)))
            assert ids(collect(b, 2)) == orders[-1]
        srv.stop()
    assert orders[0] == orders[1]
    plan = BatchPlan(N, PlanParams(batch_size=50, seed=7))
    assert orders[0] == [plan.indices(2, k).tolist() for k in range(plan.batches_per_epoch)]


def test_epochs_and_seeds_differ(server) -> None:
    with Client(server.address, batch_size=64, seed=1) as c, \
            Client(server.address, batch_size=64, seed=2) as d:
        e0, e1 = ids(collect(c, 0)), ids(collect(c, 1))
        assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
        assert ids(collect(d, 0)) != e0


def test_ranks_share_every_row_and_take_the_same_steps(server) -> None:
    world = 3
    per_rank = []
    for rank in range(world):
        with Client(server.address, batch_size=32, seed=5, rank=rank, world_size=world) as c:
            per_rank.append(ids(collect(c, 4)))
    assert len({tuple(map(len, r)) for r in per_rank}) == 1  # same steps, same sizes
    share = -(-N // world)  # ceil(N / W) rows per rank
    assert len(per_rank[0]) == -(-share // 32)
    rows = [row for r in per_rank for batch in r for row in batch]
    padded = -(-N // world) * world - N  # served twice, as DistributedSampler pads
    assert len(rows) == N + padded and set(rows) == set(range(N))


def test_drop_last(server) -> None:
    with Client(server.address, batch_size=64, seed=1, drop_last=True) as c:
        batches = collect(c, 0)
        assert c.batches_per_epoch == N // 64 == len(batches)
        assert all(len(b["id"]) == 64 for b in batches)
        assert len(set(sum(ids(batches), []))) == N - N % 64


def test_shuffle_none_is_dataset_order(server) -> None:
    with Client(server.address, batch_size=100, shuffle="none") as c:
        assert sum(ids(collect(c, 3)), []) == list(range(N))


def test_buffer_shuffle_bound_and_coverage(server) -> None:
    size = 50
    with Client(server.address, batch_size=64, shuffle="buffer", buffer_size=size, seed=2) as c:
        order = sum(ids(collect(c, 1)), [])
    assert sorted(order) == list(range(N))
    assert all(pos >= item - size for pos, item in enumerate(order))
    assert order != list(range(N))


def test_start_batch_resumes_exactly(server) -> None:
    with Client(server.address, batch_size=64, seed=11) as c:
        full = ids(collect(c, 2))
    with Client(server.address, batch_size=64, seed=11) as c:  # a new client, as after a restart
        it = c.epoch(2, start_batch=9)
        assert len(it) == len(full) - 9
        assert ids([{k: v.copy() for k, v in b.items()} for b in it]) == full[9:]
        assert ids(collect(c, 2, start_batch=c.batches_per_epoch)) == []


def test_a_new_epoch_call_abandons_the_old_one(server) -> None:
    with Client(server.address, batch_size=16, seed=1, prefetch=4) as c:
        it = c.epoch(0)
        first = next(it)["id"].copy()
        again = collect(c, 0)
        assert np.array_equal(again[0]["id"], first)
        assert sorted(sum(ids(again), [])) == list(range(N))


def test_several_clients_with_different_parameters_at_once(server) -> None:
    results: dict[int, object] = {}

    def run(i: int, **kw: object) -> None:
        try:
            with Client(server.address, **kw) as c:
                results[i] = [sorted(sum(ids(collect(c, e)), [])) for e in range(2)]
        except Exception as exc:
            results[i] = exc

    configs = [dict(batch_size=7, seed=1), dict(batch_size=64, shuffle="none"),
               dict(batch_size=33, shuffle="buffer", buffer_size=10, prefetch=2),
               dict(batch_size=100, drop_last=True, seed=4)]
    threads = [threading.Thread(target=run, args=(i,), kwargs=kw) for i, kw in enumerate(configs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, kw in enumerate(configs):
        assert not isinstance(results[i], Exception), results[i]
        expect = N - N % 100 if kw.get("drop_last") else N
        for rows in results[i]:
            assert len(rows) == expect and len(set(rows)) == expect


def test_ipc_fast_path_gives_the_same_batches(serve, dataset_path, ipc_address) -> None:
    path = dataset_path(N)
    srv = serve("--data", path, "--workers", 2, bind=ipc_address)
    with Client(srv.address, batch_size=64, seed=3) as fast, \
            Client(srv.address, batch_size=64, seed=3, fastpath=False) as slow:
        a, b = collect(fast, 0), collect(slow, 0)
    assert ids(a) == ids(b)
    for x, y in zip(a, b):
        for k in x:
            assert np.array_equal(x[k], y[k])


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,words", [
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=8, shuffle="random"), "shuffle must be one of"),
    (dict(batch_size=8, rank=2, world_size=2), "rank 2 is out of range for world_size 2"),
    (dict(batch_size=8, shuffle="buffer"), "needs buffer_size"),
])
def test_bad_parameters_raise_in_the_trainer(server, kwargs: dict, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):  # checked here, before the server is asked
        Client(server.address, **kwargs)


def raw_exchange(address: str, frames: list, timeout_ms: int = 5000) -> protocol.Message:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(address)
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply from the server"
        return protocol.decode(sock.recv_multipart())


@pytest.mark.parametrize("params,code,words", [
    ({"batch_size": 0}, "invalid_request", "batch_size must be an int >= 1, got 0"),
    ({"batch_size": 8, "shuffle": "random"}, "invalid_request", "shuffle must be one of"),
    ({"batch_size": 8, "rank": 3, "world_size": 2}, "invalid_request", "rank 3 is out of range"),
    ({"batch_size": 2000, "drop_last": True}, "invalid_request", "no batch for each rank"),
    ({"batch_size": 8, "evil": 1}, "invalid_request", "unknown plan parameters"),
])
def test_the_server_refuses_bad_parameters_itself(server, params: dict, code: str,
                                                  words: str) -> None:
    """What a client of another language (or a buggy one) gets back: a clear ERROR."""
    reply = raw_exchange(server.address, protocol.hello(params, client="x", dataset=None,
                                                        prefetch=4, fastpath=False))
    assert reply.kind == protocol.ERROR
    assert reply.header["code"] == code and words in reply.header["message"]


def test_the_server_names_both_versions_to_a_client_of_another_version(server) -> None:
    frames = [msgpack.packb({"v": 99, "kind": "hello"})]
    reply = raw_exchange(server.address, frames)
    assert reply.kind == protocol.ERROR and reply.header["code"] == "version"
    assert "protocol 99" in reply.header["message"]
    assert f"protocol {protocol.VERSION}" in reply.header["message"]


def test_a_client_of_another_version_gets_a_clear_error(server, monkeypatch) -> None:
    monkeypatch.setattr(protocol, "VERSION", protocol.VERSION + 1)
    with pytest.raises(VersionMismatch, match=r"protocol \d+.*protocol \d+"):
        Client(server.address, batch_size=8, connect_timeout=10)


def test_unknown_dataset_and_bad_start_batch(server) -> None:
    with pytest.raises(InvalidRequest, match="unknown dataset 'nope'; this server serves: data"):
        Client(server.address, batch_size=8, dataset="nope")
    with Client(server.address, batch_size=8) as c:
        with pytest.raises(InvalidArgument, match="start_batch"):
            c.epoch(0, start_batch=c.batches_per_epoch + 1)
        with pytest.raises(InvalidArgument, match="epoch"):
            c.epoch(-1)


def test_unreachable_server_times_out_with_a_clear_error() -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.REP) as s:  # a free port nobody answers on
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.unbind(f"tcp://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=f"no batchfeed server answered at .*:{port} "
                                                r"within 0.5 s.*batchfeed serve"):
        Client(f"tcp://127.0.0.1:{port}", batch_size=8, connect_timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_closed_client_says_so(server) -> None:
    c = Client(server.address, batch_size=8)
    c.close()
    c.close()
    with pytest.raises(InvalidArgument, match="closed"):
        c.epoch(0)


# ------------------------------------------------------------------------------ lifecycle


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_stops_cleanly_on_signal(dataset_path, sig: int) -> None:
    srv = ServerProcess(["--data", str(dataset_path(N)), "--workers", "2"]).start()
    try:
        workers = children(srv.pid)
        assert len(workers) == 2
        with Client(srv.address, batch_size=64) as c:
            next(iter(c.epoch(0)))
            srv.proc.send_signal(sig)
            t0 = time.monotonic()
            assert srv.proc.wait(10) == 0
            assert time.monotonic() - t0 < 10
        assert not any(pid_alive(w) for w in workers)
        assert not [n for n in shm_segments() if n.startswith(f"bf_{srv.pid}_")]
    finally:
        srv.stop()


def test_ready_line_lists_rows_fields_and_address(server) -> None:
    line = server.ready_line
    assert f"{N:,} rows" in line and server.address in line
    assert "id: int64[]" in line and "img: uint8[4,5,3]" in line and "x: float32[3]" in line


def test_default_dataset_is_the_synthetic_one(serve) -> None:
    srv = serve("--synthetic-rows", 5000, "--workers", 1)
    assert "synthetic: 5,000 rows [x: float32[64], y: int64[]]" in srv.ready_line
    with Client(srv.address, batch_size=1000) as c:
        batch = next(iter(c.epoch(0)))
        assert batch["x"].shape == (1000, 64) and batch["y"].max() < 10


# ------------------------------------------------------------------------------ data path


def test_credit_never_exceeds_prefetch(server, monkeypatch) -> None:
    from batchfeed.client.window import Window

    seen: list[int] = []
    original = Window.next_request

    def spy(self: Window, links: list):
        run = original(self, links)
        seen.append(self.requested - self.consumed)
        return run

    monkeypatch.setattr(Window, "next_request", spy)
    with Client(server.address, batch_size=8, prefetch=5) as c:
        for _ in c.epoch(0):
            time.sleep(0.0005)  # a slow trainer on purpose: credit runs out, then refills
    assert 0 < max(seen) <= 5

def test_the_server_enforces_credit(server) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(server.address)
        sock.send_multipart(protocol.hello({"batch_size": 8}, client="x", dataset=None,
                                           prefetch=2, fastpath=False))
        assert sock.poll(5000)
        session = protocol.decode(sock.recv_multipart()).header["session"]
        sock.send_multipart(protocol.request(session=session, stream=1, epoch=0, k0=0, count=3))
        assert sock.poll(5000)
        reply = protocol.decode(sock.recv_multipart())
        assert reply.kind == protocol.ERROR and reply.header["code"] == "credit"
        assert "exceeds the session's prefetch of 2" in reply.header["message"]


def test_batches_are_zero_copy_views_of_received_frames(server) -> None:
    with Client(server.address, batch_size=64, fastpath=False) as c:  # over the socket
        batch = next(iter(c.epoch(0)))
        for arr in batch.values():
            root = arr.base
            assert isinstance(root, np.ndarray) and isinstance(root.base, zmq.Frame)


def test_fast_path_views_are_never_rewritten(serve, dataset_path, ipc_address) -> None:
    """Keep many fast-path batches alive while the ring (only 4 slots) keeps turning over:
    every live view must keep the bytes it had when it was handed out."""
    srv = serve("--data", dataset_path(N), "--workers", 2, "--slots", 4, bind=ipc_address)
    source = make_rows(N)
    with Client(srv.address, batch_size=16, seed=0, prefetch=8) as c:
        held: list[tuple[dict, dict]] = []
        fast = 0
        for epoch in range(3):
            for batch in c.epoch(epoch):
                fast += not batch["x"].flags.writeable  # views of the read-only ring mapping
                held.append((batch, {k: v.copy() for k, v in batch.items()}))
                assert np.array_equal(batch["img"], source["img"][batch["id"]])
                if len(held) > 30:
                    held.pop(0)
                for view, copy in held:
                    for k in copy:
                        assert np.array_equal(view[k], copy[k]), "a live view was rewritten"
        assert fast > 0


def test_the_next_epoch_is_prefetched_across_the_boundary(server) -> None:
    """Reading an epoch to its end keeps the stream going: epoch e+1 is already on its way
    (its batches identical to a fresh request), and a different call starts afresh."""
    with Client(server.address, batch_size=64, seed=8, prefetch=32) as c:
        first = ids(collect(c, 0))
        it = c.epoch(1)
        stream = it._stream
        wait_until(lambda: stream.next_deliver > stream.position(1, 0), 10,
                   what="epoch 1 to arrive before it is asked for")
        second = ids([{k: v.copy() for k, v in b.items()} for b in it])
        assert c.epoch(2)._stream is stream  # the same stream runs on
    with Client(server.address, batch_size=64, seed=8) as fresh:
        assert ids(collect(fresh, 0)) == first and ids(collect(fresh, 1)) == second
        assert ids(collect(fresh, 3)) != ids(collect(fresh, 1))


def test_each_epoch_order_is_computed_once_for_all_workers_and_ranks(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 3)
    with Client(srv.address, batch_size=16, seed=5, rank=0, world_size=2, prefetch=8) as a, \
            Client(srv.address, batch_size=16, seed=5, rank=1, world_size=2, prefetch=8) as b:
        for epoch in range(3):
            rows = sorted(sum(ids(collect(a, epoch)) + ids(collect(b, epoch)), []))
            assert set(rows) == set(range(N)) and len(rows) == N + N % 2
        a.epoch(3).close()
        b.epoch(3).close()
    computed = server_report(srv.address)["server"]["counters"]["orders_computed"]
    assert 3 <= computed <= 5  # epochs 0-2, then 3-4 early: once each, not once per worker


def test_the_next_epochs_order_is_computed_before_it_is_asked_for(serve, dataset_path) -> None:
    """Reading epoch 0 puts epoch 1 in flight (the stream runs on); serving epoch 1 makes an
    idle worker compute epoch 2's order, which no client has asked for yet."""
    srv = serve("--data", dataset_path(N), "--workers", 2)
    with Client(srv.address, batch_size=16, seed=6, prefetch=8) as c:
        collect(c, 0)
        wait_until(lambda: server_report(srv.address)["server"]["counters"]
                   .get("orders_computed", 0) >= 3, 10, 0.05,
                   what="epoch 2's order to be computed ahead")
        assert ids(collect(c, 1))  # and the epochs are still right (checked elsewhere)
