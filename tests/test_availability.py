"""No peer, file or batch exhausts the server or stalls its other clients: tried the way an
attacker or a careless user on this host would, each bounded in count and time.

(The metrics endpoint, stats/probe output and image bombs: tests/test_bounded_edges.py.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from conftest import (
    children,
    make_rows,
    pss_bytes,
    server_report,
    shm_segments,
    wait_until,
)

from batchfeed import Client, DatasetError, InvalidRequest, ResourceError, WorkerError
from batchfeed.launch import ServerProcess
from batchfeed.shared import protocol

REPO = Path(__file__).resolve().parents[1]
N = 1003
GIB = 2**30


def raw_peer(ctx: zmq.Context, address: str, rcvhwm: int = 1000) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvhwm = rcvhwm
    sock.connect(address)
    return sock


def ask(sock: zmq.Socket, frames: list, timeout_ms: int = 5000) -> protocol.Message:
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), "no answer"
    return protocol.decode(sock.recv_multipart())


def hello(fastpath: bool = False, batch_size: int = 10, prefetch: int = 8, **params) -> list:
    return protocol.hello({"batch_size": batch_size, **params}, client="attacker",
                          dataset=None, prefetch=prefetch, fastpath=fastpath)


def exact_epoch(address: str, epoch: int = 0, n: int = N, **kw) -> None:
    with Client(address, batch_size=kw.pop("batch_size", 50), seed=epoch, **kw) as client:
        ids = sorted(int(i) for b in client.epoch(epoch) for i in b["id"])
    assert ids == list(range(n))


def tree(pid: int) -> list[int]:
    return [pid, *children(pid)]


# ---------------------------------------------------------------------------------------------
# A peer that asks but never reads


@pytest.mark.slow
def test_a_peer_that_asks_but_never_reads_keeps_the_server_small(serve, dataset_path) -> None:
    """12 s of REQUESTs every 10 ms for 2 MiB batches, never reading: the server stays under
    1 GiB (it grew ~400 MB/s before), and an innocent client gets its epochs meanwhile."""
    n = 512
    arrays = {"id": np.arange(n), "big": np.zeros((n, 65536), np.uint8)}
    srv = serve("--data", dataset_path(arrays=arrays), "--workers", 2)
    stop = threading.Event()
    peaks: list[int] = []

    def attack() -> None:
        with zmq.Context() as ctx, raw_peer(ctx, srv.address, rcvhwm=1) as peer:
            welcome = ask(peer, hello(batch_size=32, prefetch=64))
            session, bpe = welcome.header["session"], welcome.header["batches_per_epoch"]
            k = 0
            while not stop.is_set():
                peer.send_multipart(protocol.request(session=session, stream=1, epoch=k // bpe,
                                                     k0=k % bpe, count=1))
                k += 1
                time.sleep(0.01)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    t0 = time.monotonic()
    try:
        epochs = 0
        while time.monotonic() - t0 < 12:
            peaks.append(pss_bytes(tree(srv.pid)))
            assert peaks[-1] < GIB, f"the server grew to {peaks[-1] / 2**20:.0f} MiB"
            with Client(srv.address, batch_size=16, seed=epochs) as innocent:
                ids = sorted(int(i) for b in innocent.epoch(epochs) for i in b["id"])
            assert ids == list(range(n))
            epochs += 1
    finally:
        stop.set()
        attacker.join(10)
    report = srv.report()
    assert "internal" not in report["server"]["errors"]
    print(f"\n[never-reading peer, 12 s] server PSS peak {max(peaks) / 2**20:.0f} MiB; the "
          f"innocent client read {epochs} epochs meanwhile")


# ---------------------------------------------------------------------------------------------
# Fast-path HELLOs, sessions and descriptors


@pytest.mark.slow
def test_2000_fast_path_hellos_on_one_connection_under_1024_descriptors(dataset_path) -> None:
    """One connection says HELLO (fast path) 2,000 times with bogus CLAIMs and PINGs, on a
    server limited to 1,024 descriptors: an innocent client gets its full epoch, no internal
    error, and no segment is left after SIGTERM."""
    srv = ServerProcess(["--data", str(dataset_path(N)), "--workers", "2"], nofile=1024).start()
    try:
        codes: dict[str, int] = {}
        with zmq.Context() as ctx, raw_peer(ctx, srv.address) as peer:
            for i in range(2000):
                peer.send_multipart(hello(fastpath=True))
                if i % 10 == 0:
                    peer.send_multipart(protocol.ping(None))
            deadline = time.monotonic() + 30
            while sum(codes.values()) < 2000 and time.monotonic() < deadline:
                if not peer.poll(1000):
                    continue
                msg = protocol.decode(peer.recv_multipart())
                if msg.kind == protocol.WELCOME:
                    codes["welcome"] = codes.get("welcome", 0) + 1
                    peer.send_multipart(protocol.claim(session=msg.header["session"],
                                                       proof="00" * 32))
                elif msg.kind == protocol.ERROR:
                    codes[msg.header["code"]] = codes.get(msg.header["code"], 0) + 1
            assert codes.get("welcome") == 8 and codes.get("resource") == 1992, codes
            exact_epoch(srv.address)  # meanwhile: an innocent client
            exact_epoch(srv.address, fastpath=True)
        report = srv.report()["server"]
        assert "internal" not in report["errors"] and report["workers"] == 2
        assert not [n for n in shm_segments() if "lease" in n and f"_{srv.pid}_" in n]
    finally:
        code = srv.stop()
    assert code == 0
    assert not [n for n in shm_segments() if n.startswith(f"bf_{srv.pid}_")]


def test_a_connection_past_its_session_limit_gets_an_error_naming_it(serve, dataset_path
                                                                     ) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1, "--max-sessions-per-connection", 2)
    with zmq.Context() as ctx, raw_peer(ctx, srv.address) as peer:
        assert ask(peer, hello()).kind == protocol.WELCOME
        assert ask(peer, hello()).kind == protocol.WELCOME
        refused = ask(peer, hello())
        assert refused.kind == protocol.ERROR and refused.header["code"] == "resource"
        assert "--max-sessions-per-connection" in refused.header["message"]
        exact_epoch(srv.address)  # another connection is served as ever


def test_past_the_servers_session_limit_a_client_is_told_why(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1, "--max-sessions", 2)
    with Client(srv.address, batch_size=10), Client(srv.address, batch_size=10), \
            pytest.raises(ResourceError, match="--max-sessions"):
        Client(srv.address, batch_size=10)
    exact_epoch(srv.address)  # closed ones make room


# ---------------------------------------------------------------------------------------------
# Work that keeps failing fails, once


def failing_server(serve, dataset_path, transform: str) -> ServerProcess:
    return serve("--data", dataset_path(N), "--workers", 2, "--task-timeout", 1,
                 "--transform", f"tests.transforms.basic:{transform}",
                 env={"PYTHONPATH": str(REPO)})


@pytest.mark.slow
@pytest.mark.parametrize("transform, how", [("hang_on_row_500", "no progress"),
                                            ("die_on_row_500", "died")])
def test_a_batch_that_hangs_or_kills_its_worker_fails_once(serve, dataset_path, transform,
                                                           how) -> None:
    srv = failing_server(serve, dataset_path, transform)
    started = time.monotonic()
    with Client(srv.address, batch_size=100, shuffle="none", prefetch=4) as client:
        got = []
        with pytest.raises(WorkerError) as err:
            for batch in client.epoch(0):
                got.append(batch["id"])
        assert len(got) == 5  # batches 0..4; batch 5 holds row 500
        message = str(err.value)
        assert "batch 5 of epoch 0" in message and how in message and "3 times" in message
        assert time.monotonic() - started < 60
        rest = [b["id"] for b in client.epoch(0, start_batch=6)]  # the server goes on
    assert np.array_equal(np.concatenate(got + rest),
                          np.concatenate([np.arange(500), np.arange(600, N)]))
    report = srv.report()["server"]
    assert report["errors"].get("gave_up") == 1 and "internal" not in report["errors"]


# ---------------------------------------------------------------------------------------------
# Files changed under a --mmap server


@pytest.fixture
def npy_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "npy"
    folder.mkdir()
    rows = make_rows(N)
    np.save(folder / "id.npy", rows["id"])
    np.save(folder / "x.npy", rows["x"])
    return folder


@pytest.mark.slow
def test_a_truncated_mapped_file_is_an_error_not_a_restart_storm(serve, npy_dir) -> None:
    srv = serve("--data", npy_dir, "--workers", 2, "--mmap")
    with Client(srv.address, batch_size=10, shuffle="none", prefetch=4) as client:
        it = client.epoch(0)
        for _ in range(3):
            next(it)
        started = time.monotonic()
        os.truncate(npy_dir / "x.npy", 1000)
        with pytest.raises(DatasetError, match="changed in place"):
            for _ in range(10):
                for _ in client.epoch(1):
                    pass
        assert time.monotonic() - started < 30
    report = srv.report()["server"]
    assert report["counters"].get("worker_restarts", 0) < 10
    with pytest.raises(DatasetError, match="served no more"):
        Client(srv.address, batch_size=10)


def test_a_file_renamed_over_is_never_mixed_in(serve, npy_dir) -> None:
    srv = serve("--data", npy_dir, "--workers", 2, "--mmap")
    with Client(srv.address, batch_size=10, shuffle="none", prefetch=2) as client:
        it = client.epoch(0)
        got = [next(it)["x"] for _ in range(3)]
        new = npy_dir / "x.new.npy"
        np.save(new, np.full((N, 3), -7, np.float32))
        os.replace(new, npy_dir / "x.npy")  # an atomic replacement of the file
        for pid in children(srv.pid):
            os.kill(pid, signal.SIGKILL)  # replacements start now, after the swap
        got += [b["x"] for b in it]
    x = np.concatenate(got)
    assert np.array_equal(x, make_rows(N)["x"])  # every row from the file opened at start


def test_a_file_written_in_place_fails_its_batches_saying_so(serve, npy_dir) -> None:
    srv = serve("--data", npy_dir, "--workers", 1, "--mmap")
    with Client(srv.address, batch_size=10, shuffle="none", prefetch=2) as client:
        it = client.epoch(0)
        next(it)
        with open(npy_dir / "x.npy", "r+b") as f:  # same size, other bytes
            f.seek(-12, os.SEEK_END)
            f.write(b"\xff" * 12)
        with pytest.raises(DatasetError, match=r"x\.npy changed in place"):
            for _ in range(20):
                for _ in client.epoch(0):
                    pass


# ---------------------------------------------------------------------------------------------
# Odd messages


def test_malformed_kinds_are_protocol_errors_not_internal_ones(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    kinds = [[], {}, 3, None, True, b"hello", 1.5, ["hello"], {"hello": 1}]
    with zmq.Context() as ctx, raw_peer(ctx, srv.address) as peer:
        for _ in range(300):
            for kind in kinds:
                peer.send(msgpack.packb({"v": protocol.VERSION, "kind": kind}))
        exact_epoch(srv.address)
        wait_until(lambda: srv.report()["server"]["errors"].get("protocol", 0) >= 2700,
                   what="every malformed message refused")
    errors = srv.report()["server"]["errors"]
    assert "internal" not in errors


def test_sampling_on_a_variable_length_field_is_refused_naming_it(serve, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tokens = pa.array([[1, 2], [3], [4, 5, 6], [7]] * 50, type=pa.list_(pa.uint8()))
    table = pa.table({"tokens": tokens, "label": [0, 1, 0, 1] * 50})
    pq.write_table(table, tmp_path / "t.parquet")
    srv = serve("--data", tmp_path / "t.parquet", "--workers", 1)
    with pytest.raises(InvalidRequest, match="'tokens' holds variable-length rows"):
        Client(srv.address, batch_size=8, sampling="balanced", label="tokens")
    with pytest.raises(InvalidRequest, match="'tokens' holds variable-length rows"):
        Client(srv.address, batch_size=8, sampling="weighted", weights="tokens")
    with pytest.raises(InvalidRequest, match=r"pad_value=300 does not fit field 'tokens'"):
        Client(srv.address, batch_size=8, pad_value=300)
    with pytest.raises(InvalidRequest, match=r"pad_value=0.5 does not fit"):
        Client(srv.address, batch_size=8, pad_value=0.5)
    with Client(srv.address, batch_size=8, sampling="balanced", label="label") as ok:
        assert len(next(iter(ok.epoch(0)))["label"]) == 8


def test_an_ipc_socket_file_is_removed_when_the_server_stops(dataset_path, tmp_path) -> None:
    path = tmp_path / "bf.sock"
    srv = ServerProcess(["--data", str(dataset_path(N)), "--workers", "1"],
                        bind=f"ipc://{path}").start()
    assert path.exists()
    exact_epoch(srv.address)
    assert srv.stop() == 0
    assert not path.exists()


def test_a_client_name_with_terminal_escapes_is_escaped_by_the_server(serve, dataset_path
                                                                      ) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    with Client(srv.address, batch_size=10, name="\x1b[2J\x1b[H\u202e" + "x" * 200):
        (session,) = server_report(srv.address)["sessions"]
    assert "\x1b" not in session["name"] and "\u202e" not in session["name"]
    assert session["name"].startswith("\\x1b[2J") and len(session["name"]) <= 64
