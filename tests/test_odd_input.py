"""Odd data files and odd messages get a clear refusal: never a traceback, a hang or an internal
error.  Each bad file exits 2 with one line naming the file, the field and what to do; every
header that ``decode`` accepts is handled (defaults filled in), and worker deaths are routine.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest
import zmq
from conftest import free_port, server_report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchfeed import Client, InvalidRequest
from batchfeed.shared import protocol
from batchfeed.shared.errors import ProtocolError

N = 3001


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def corrupt_member_data(path: Path) -> None:
    """Flip a byte near the end of the first member's data (its header stays readable)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    data = bytearray(path.read_bytes())
    at = info.header_offset + 30 + len(info.filename) + info.compress_size - 10
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def bad_crc_stored(d: Path) -> Path:
    path = d / "stored.npz"
    np.savez(path, x=np.arange(10_000, dtype=np.float64))
    corrupt_member_data(path)
    return path


def bad_crc_deflated(d: Path) -> Path:
    path = d / "deflated.npz"
    np.savez_compressed(path, x=np.random.default_rng(0).random(10_000))
    corrupt_member_data(path)
    return path


def subdirectory_named_npy(d: Path) -> Path:
    np.save(d / "a.npy", np.arange(5))
    (d / "sub.npy").mkdir()
    return d


def fifo_named_npy(d: Path) -> Path:
    np.save(d / "a.npy", np.arange(5))
    os.mkfifo(d / "b.npy")
    return d


def two_members_named_x(d: Path) -> Path:
    path = d / "twice.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy_bytes(np.arange(5)))
        zf.writestr("x.npy", npy_bytes(np.arange(5)))
    return path


def member_without_a_name(d: Path) -> Path:
    path = d / "noname.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(".npy", npy_bytes(np.arange(5)))
    return path


def field_name_too_long(d: Path) -> Path:
    path = d / "long.npz"
    np.savez(path, **{"f" * 300: np.arange(5)})
    return path


def seventeen_dimensions(d: Path) -> Path:
    path = d / "deep.npy"
    np.save(path, np.zeros((2,) + (1,) * 16, dtype=np.uint8))
    return path


BAD_FILES = {
    "bad CRC, stored": (bad_crc_stored, r"damaged"),
    "bad CRC, deflated": (bad_crc_deflated, r"damaged"),
    "a sub-directory named sub.npy": (subdirectory_named_npy, r"sub\.npy is a directory"),
    "a FIFO named b.npy": (fifo_named_npy, r"b\.npy is a FIFO"),
    "two members named x.npy": (two_members_named_x, r"two arrays named 'x'"),
    "a member named .npy": (member_without_a_name, r"empty name"),
    "a field name over 256 characters": (field_name_too_long, r"at most 256"),
    "a row of 16 dimensions": (seventeen_dimensions, r"at most 16"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_dataset_is_one_line_and_exit_code_2(case: str, tmp_path: Path) -> None:
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--data", str(path),
                           "--bind", "tcp://127.0.0.1:0", "--workers", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(message, lines[0]) and str(path.name) in lines[0], lines[0]
    assert time.monotonic() - started < 30


def test_weights_that_sum_past_float_range_still_sample(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(arrays={"id": np.arange(10),
                                               "w": np.full(10, 1e308)}))
    with Client(srv.address, batch_size=100, sampling="weighted", weights="w",
                epoch_rows=2000) as client:
        counts = np.bincount(np.concatenate([b["id"] for b in client.epoch(0)]), minlength=10)
    assert counts.sum() == 2000 and counts.min() > 120  # uniform: 200 each


def test_epoch_rows_over_the_servers_budget_is_refused_at_hello(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(arrays={"id": np.arange(10), "w": np.ones(10)}),
                "--max-order-mb", 1)
    with pytest.raises(InvalidRequest, match=r"--max-order-mb.*at most 262,144 rows"):
        Client(srv.address, batch_size=10, sampling="weighted", weights="w", epoch_rows=10**8)
    assert server_report(srv.address)["server"]["sessions"] == 0


# ---------------------------------------------------------------------------------------------
# Messages that decode accepts, while workers die


ODD_HEADERS = {
    "a PING with no session": protocol.encode(protocol.PING),
    "a HELLO with no dataset": protocol.encode(protocol.HELLO, client="x", prefetch=0,
                                               fastpath=False, params={"batch_size": 3}),
    "a REQUEST with no trainer position": protocol.encode(protocol.REQUEST, session=1, stream=0,
                                                          epoch=0, k0=0, count=1),
    "a BYE for no session of ours": protocol.encode(protocol.BYE, session=12345),
    "a CLAIM for no session": protocol.encode(protocol.CLAIM, session=1, proof="zz"),
    "a STATS": protocol.encode(protocol.STATS),
}

_ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                              st.text(max_size=12), st.binary(max_size=12)),
                    lambda kids: st.one_of(st.lists(kids, max_size=4),
                                           st.dictionaries(st.text(max_size=6), kids,
                                                           max_size=4)), max_leaves=12)
_BY_TYPE = {"int": st.integers(-(2**63) + 1, 2**63 - 1), "str": st.text(max_size=40),
            "bool": st.booleans(), "map": st.dictionaries(st.text(max_size=12), _ANY, max_size=6),
            "list": st.lists(_ANY, max_size=6)}


def _header_for(kind: str) -> st.SearchStrategy:
    required, optional = {}, {}
    for key, want in protocol._HEADERS[kind].items():
        value = _BY_TYPE[want.rstrip("?")]
        if want.endswith("?"):
            optional[key] = st.one_of(st.none(), value)
        else:
            required[key] = value
    return st.fixed_dictionaries({"v": st.just(protocol.VERSION), "kind": st.just(kind),
                                  **required}, optional=optional)


CLIENT_KINDS = [protocol.HELLO, protocol.CLAIM, protocol.REQUEST, protocol.RELEASE,
                protocol.PING, protocol.BYE, protocol.STATS, protocol.PONG, protocol.WELCOME]
_ACCEPTED_HEADERS = st.one_of(*(_header_for(k) for k in CLIENT_KINDS))


def metric(port: int, name: str) -> float:
    text = urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
def test_odd_headers_and_30_worker_kills_cost_no_internal_error(serve, dataset_path) -> None:
    import msgpack

    port = free_port()
    srv = serve("--data", dataset_path(N), "--workers", 2, "--metrics-port", port,
                log_level="INFO")
    sent = 0
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as peer, \
            Client(srv.address, batch_size=16, seed=1, reconnect_timeout=30) as client:
        peer.linger = 0
        peer.connect(srv.address)

        def send(frames: list) -> None:
            nonlocal sent
            peer.send_multipart(frames)
            sent += 1
            while peer.poll(0):
                peer.recv_multipart()

        for frames in ODD_HEADERS.values():
            send(frames)

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(_ACCEPTED_HEADERS)
        def fire(header: dict) -> None:
            frames = [msgpack.packb(header, use_bin_type=True)]
            try:
                protocol.decode(frames)
            except ProtocolError:
                return
            send(frames)

        fire()
        ids: list[int] = []
        kills = 0
        for e in range(3):
            epoch_ids = []
            for batch in client.epoch(e):
                epoch_ids.extend(batch["id"].tolist())
                if kills < 30 and len(epoch_ids) % 320 == 0:
                    pids = server_report(srv.address)["server"]["worker_pids"]
                    os.kill(pids[kills % 2], signal.SIGKILL)
                    kills += 1
                    time.sleep(0.05)
            assert sorted(epoch_ids) == list(range(N))
            ids += epoch_ids
        while kills < 30:
            pids = server_report(srv.address)["server"]["worker_pids"]
            os.kill(pids[kills % 2], signal.SIGKILL)
            kills += 1
            time.sleep(0.1)
        assert sorted(ids[-N:]) == list(range(N))
    report = server_report(srv.address)["server"]
    assert report["counters"]["worker_restarts"] >= 30
    assert metric(port, 'batchfeed_errors_total{kind="internal"}') == 0
    assert report["errors"].get("internal", 0) == 0, report["errors"]
    assert sent > 100
    refusals = [line for line in srv.output if "refused a client message" in line]
    assert len(refusals) <= 10 * 8 + 20, "a flood of bad messages must not flood the log"


def test_a_flood_of_refused_messages_writes_a_bounded_log(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(50), "--workers", 1, log_level="INFO")
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as peer:
        peer.linger = 0
        peer.connect(srv.address)
        for i in range(5000):
            peer.send_multipart(protocol.ping(1000 + i))  # unknown sessions
        got = 0
        while got < 5000 and peer.poll(5000):
            peer.recv_multipart()
            got += 1
    assert got == 5000
    report = server_report(srv.address)["server"]
    assert report["errors"]["unknown_session"] == 5000
    time.sleep(0.2)
    refusals = [line for line in srv.output if "refused a client message" in line]
    assert 1 <= len(refusals) <= 12
