"""Security: loopback by default, CURVE with authorized keys, libzmq version, never pickle."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from conftest import server_report

from batchfeed import AuthenticationError, Client
from batchfeed.server.security import is_loopback
from batchfeed.shared import curve_keys, protocol
from batchfeed.shared.curve_keys import make_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    good = tmp_path_factory.mktemp("keys")
    make_keys(str(good))
    make_keys(str(good / "other"))  # a second, unauthorized set
    return good


@pytest.fixture
def curve_server(serve, keys):
    return serve("--synthetic-rows", 3000, "--workers", 1,
                 "--curve-secret-key", keys / "server.key_secret",
                 "--authorized-keys", keys / "authorized")


def test_keygen_writes_key_pairs_and_the_authorized_directory(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "batchfeed", "keygen", str(tmp_path / "k")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    names = sorted(str(p.relative_to(tmp_path / "k")) for p in (tmp_path / "k").rglob("*.key*"))
    assert names == ["authorized/client.key", "client.key", "client.key_secret", "server.key",
                     "server.key_secret"]
    assert oct(os.stat(tmp_path / "k" / "server.key_secret").st_mode & 0o777) == "0o600"


def test_an_authorized_client_gets_its_data_encrypted(curve_server, keys) -> None:
    assert "CURVE" in curve_server.ready_line
    with Client(curve_server.address, batch_size=500,
                curve=(keys / "client.key_secret", keys / "server.key")) as c:
        assert sum(len(b["y"]) for b in c.epoch(0)) == 3000


@pytest.mark.parametrize("which,words", [
    ("none", "requires CURVE encryption; pass curve="),
    ("unauthorized", "does not accept this client's CURVE key"),
    ("wrong server key", "server public key given to the client is not the server's"),
])
def test_clients_without_the_right_keys_get_no_data_and_a_clear_error(curve_server, keys,
                                                                      which: str,
                                                                      words: str) -> None:
    curve = {
        "none": None,
        "unauthorized": (keys / "other" / "client.key_secret", keys / "server.key"),
        "wrong server key": (keys / "client.key_secret", keys / "other" / "server.key"),
    }[which]
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError, match=words):
        Client(curve_server.address, batch_size=500, curve=curve, connect_timeout=20)
    assert time.monotonic() - t0 < 10  # told at once, not after the connect timeout


def test_plain_sockets_get_nothing_from_a_curve_server(curve_server) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(curve_server.address)
        sock.send_multipart(protocol.hello({"batch_size": 8}, client="x", dataset=None,
                                           prefetch=2, fastpath=False))
        assert not sock.poll(1500)


def test_a_non_loopback_bind_needs_curve_or_insecure(serve) -> None:
    out = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--bind",
                          "tcp://0.0.0.0:0", "--synthetic-rows", "100"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to bind tcp://0.0.0.0:0 without encryption" in out.stderr
    assert "--insecure" in out.stderr and "batchfeed keygen" in out.stderr
    srv = serve("--synthetic-rows", 1000, "--workers", 1, "--insecure",
                bind="tcp://0.0.0.0:0")
    assert any("WITHOUT encryption" in line for line in srv.output)
    port = srv.address.rsplit(":", 1)[1]
    with Client(f"tcp://127.0.0.1:{port}", batch_size=100) as c:
        assert c.batches_per_epoch == 10


@pytest.mark.parametrize("address,expected", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:1", True), ("tcp://localhost:5", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False), ("tcp://10.0.0.2:5555", False), ("tcp://eth0:5555", False),
])
def test_what_counts_as_loopback(address: str, expected: bool) -> None:
    assert is_loopback(address) is expected


def test_an_old_libzmq_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 4))
    monkeypatch.setattr(zmq, "zmq_version", lambda: "4.3.4")
    with pytest.raises(AuthenticationError, match="libzmq 4.3.4 is older than 4.3.5"):
        curve_keys.check_libzmq()


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_payload_is_never_unpickled(serve, tmp_path: Path) -> None:
    srv = serve("--synthetic-rows", 1000, "--workers", 1)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)))
    attempts = [
        [payload],
        [payload, payload],
        protocol.hello({"batch_size": 8}, client="x", dataset=None, prefetch=2,
                       fastpath=False)[:1] + [payload],
        [msgpack.packb({"v": 1, "kind": "hello", "params": payload})],
        [msgpack.packb({"v": 1, "kind": "batch", "session": 1, "stream": 1, "epoch": 0,
                        "k0": 0, "dtypes": [["x", "O"]], "shapes": [[[1]]]}), payload],
    ]
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(srv.address)
        for frames in attempts:
            sock.send_multipart(frames)
            assert sock.poll(5000)
            reply = protocol.decode(sock.recv_multipart())
            assert reply.kind == protocol.ERROR  # sent once the payload was read and refused
    assert not marker.exists()
    with Client(srv.address, batch_size=100) as c:  # and it still serves
        assert sum(len(b["y"]) for b in c.epoch(0)) == 1000
    assert not marker.exists()  # nor later, while the server went on working


# --------------------------------------------------------------- a second, same-host endpoint

def test_also_bind_serves_the_same_batches_on_ipc_in_place_and_tcp_copied(serve,
                                                                          tmp_path: Path) -> None:
    """A loader that trainers on other hosts reach by tcp also listens on ipc for trainers on
    its own host: both read identical batches, and the ipc one reads in place."""
    sock = tmp_path / "loader.sock"
    srv = serve("--synthetic-rows", 3000, "--workers", 1, "--also-bind", f"ipc://{sock}")
    assert f"also at ipc://{sock}" in srv.ready_line and srv.address.startswith("tcp://")
    with Client(f"ipc://{sock}", batch_size=500, seed=3, name="near") as near, \
            Client(srv.address, batch_size=500, seed=3, name="far", fastpath=False) as far:
        ipc_batches = list(near.epoch(0))  # views of the server's ring: its slots leased
        tcp_batches = list(far.epoch(0))
        for a, b in zip(ipc_batches, tcp_batches, strict=True):
            assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
        sessions = {s["name"]: s for s in server_report(srv.address)["sessions"]}
        assert sessions["near"]["fastpath"] and sessions["near"]["leased"] > 0
        assert not sessions["far"]["fastpath"] and sessions["far"]["leased"] == 0
        assert near.servers() == [{"address": f"ipc://{sock}", "up": True, "in_place": True}]
        assert far.servers() == [{"address": srv.address, "up": True, "in_place": False}]
    assert srv.stop() == 0
    assert not sock.exists()  # the socket file goes with the server


def test_also_bind_does_not_bypass_curve(curve_server_with_ipc, keys) -> None:
    srv, sock = curve_server_with_ipc
    with pytest.raises(AuthenticationError, match="requires CURVE encryption"):
        Client(f"ipc://{sock}", batch_size=500, connect_timeout=20)
    with Client(f"ipc://{sock}", batch_size=500,
                curve=(keys / "client.key_secret", keys / "server.key")) as c:
        assert sum(len(b["y"]) for b in c.epoch(0)) == 3000


@pytest.fixture
def curve_server_with_ipc(serve, keys, tmp_path: Path):
    sock = tmp_path / "loader.sock"
    srv = serve("--synthetic-rows", 3000, "--workers", 1, "--also-bind", f"ipc://{sock}",
                "--curve-secret-key", keys / "server.key_secret",
                "--authorized-keys", keys / "authorized")
    return srv, sock


@pytest.mark.parametrize("also,words", [
    ("tcp://127.0.0.1:0", "--also-bind takes ipc://PATH"),
    ("ipc://", "--also-bind"),
    ("SAME", "name the same address twice"),
])
def test_bad_also_bind_is_refused_with_what_to_do(tmp_path: Path, also: str, words: str) -> None:
    bind = f"ipc://{tmp_path}/a.sock"
    out = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--synthetic-rows", "100",
                          "--bind", bind, "--also-bind", bind if also == "SAME" else also],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr


def test_an_also_bind_socket_in_use_is_refused_and_the_first_endpoint_let_go(
        serve, tmp_path: Path) -> None:
    busy = tmp_path / "busy.sock"
    serve("--synthetic-rows", 100, "--workers", 1, bind=f"ipc://{busy}")
    free = tmp_path / "free.sock"
    out = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--synthetic-rows", "100",
                          "--workers", "1", "--bind", f"ipc://{free}",
                          "--also-bind", f"ipc://{busy}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and str(busy) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not free.exists()  # the endpoint it had bound is gone with it
    assert busy.exists()  # and the other server's is untouched
