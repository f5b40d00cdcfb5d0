"""Bad input: every malformed message gets an ERROR or a dropped connection, never a crash or a
hang, and a well-behaved client served meanwhile loses nothing."""

from __future__ import annotations

import socket
import threading

import msgpack
import numpy as np
import pytest
import zmq
from conftest import pid_alive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchfeed import Client
from batchfeed.shared import protocol
from batchfeed.shared.errors import ProtocolError

N = 5003

# msgpack-able values, nested, with the odd non-string key
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.floats(),
                  st.text(max_size=20), st.binary(max_size=20))
_values = st.recursive(_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=5),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), kids, max_size=5)),
    max_leaves=20)
_kinds = st.sampled_from(sorted(protocol.KINDS) + ["nope", ""])
_headers = st.fixed_dictionaries(
    {"v": st.one_of(st.just(protocol.VERSION), st.integers(-3, 3)), "kind": _kinds},
    optional={k: _values for k in ("session", "stream", "epoch", "k0", "count", "params",
                                   "dtypes", "shapes", "slot", "offsets", "fields", "code",
                                   "message", "at", "proof", "prefetch", "fastpath",
                                   "client", "dataset", "secret", "resume", "resume_secret",
                                   "extra")})


def _packed(value: object) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return b"\xc1"


_frames = st.lists(st.one_of(st.binary(max_size=64), _headers.map(_packed),
                             _values.map(_packed)), max_size=6)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frames)
def test_decode_either_decodes_or_raises_protocol_error(frames: list) -> None:
    try:
        msg = protocol.decode(frames)
    except ProtocolError:
        return
    if msg.kind == protocol.BATCH:
        try:
            layout = protocol.chunk_layout(msg.header)
            protocol.field_views(layout, msg.buffers)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_decode_of_random_bytes(raw: bytes) -> None:
    try:
        protocol.decode([raw])
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------ live server


BAD_MESSAGES = {
    "garbage": [b"\x00\xffgarbage\x13"],
    "empty frame": [b""],
    "no frames at all but an empty one": [b"", b""],
    "thousands of frames": [b"x"] * 5000,
    "huge header": [msgpack.packb({"v": 1, "kind": "ping", "pad": "x" * 200_000})],
    "deeply nested header": [b"\x91" * 5000 + b"\xc0"],
    "non-string map keys": [msgpack.packb({1: 2, b"k": 3})],
    "unknown kind": [msgpack.packb({"v": 1, "kind": "launch"})],
    "wrong version": [msgpack.packb({"v": 7, "kind": "hello"})],
    "batch sent to a server": protocol.batch(session=1, stream=1, epoch=0, k0=0,
                                             dtypes=[["x", "<f4"]], shapes=[[[4, 2]]],
                                             buffers=[b"\0" * 3]),
    "negative dimension": protocol.batch(session=1, stream=1, epoch=0, k0=0,
                                         dtypes=[["x", "<f4"]], shapes=[[[-4, 2]]],
                                         buffers=[b""]),
    "request for no session": protocol.request(session=123, stream=1, epoch=0, k0=0, count=1),
    # (a batch_size over the dataset's rows is one batch of all of them: drop_last=True
    # makes it a plan with no batch at all)
    "hello with absurd params": protocol.hello({"batch_size": 2**62, "drop_last": True},
                                               client="x", dataset=None, prefetch=1,
                                               fastpath=False),
    "hello with a list for params": [msgpack.packb({"v": 1, "kind": "hello", "client": "x",
                                                     "params": [1], "prefetch": 1,
                                                     "fastpath": False})],
    "release for a session it does not own": protocol.release(session=5),
    "over-long message": [b"x" * (2 * 2**20)],
}


def expect_error_or_drop(sock: zmq.Socket, frames: list, timeout_ms: int = 3000) -> str:
    """The code of the server's ERROR reply, or "dropped" if it hung up or stayed silent."""
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.send_multipart(frames)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.poll(timeout_ms)  # returns at the reply, the hang-up or the timeout
        if not sock.poll(0):
            return "dropped"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    reply = protocol.decode(sock.recv_multipart())
    assert reply.kind == protocol.ERROR, reply
    return reply.header["code"]


@pytest.mark.timeout(300)
def test_bad_input_never_costs_a_good_client_anything(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 2)
    errors: list[BaseException] = []
    epochs_done = []
    stop = threading.Event()

    def good_client() -> None:
        try:
            with Client(srv.address, batch_size=64, seed=1) as c:
                epoch = 0
                while not stop.is_set() or epoch < 3:
                    rows = np.sort(np.concatenate([b["id"].copy() for b in c.epoch(epoch)]))
                    assert np.array_equal(rows, np.arange(N)), f"epoch {epoch} lost rows"
                    epochs_done.append(epoch)
                    epoch += 1
        except BaseException as exc:
            errors.append(exc)

    good = threading.Thread(target=good_client)
    good.start()
    outcomes = {}
    try:
        with zmq.Context() as ctx:
            for name, frames in BAD_MESSAGES.items():
                with ctx.socket(zmq.DEALER) as sock:
                    sock.linger = 0
                    sock.connect(srv.address)
                    outcomes[name] = expect_error_or_drop(sock, frames)
            # and a stream of random messages from one socket
            rng = np.random.default_rng(0)
            with ctx.socket(zmq.DEALER) as sock:
                sock.linger = 0
                sock.connect(srv.address)
                for _ in range(400):
                    n = int(rng.integers(1, 4))
                    sock.send_multipart([rng.bytes(int(rng.integers(0, 40))) for _ in range(n)])
                assert sock.poll(3000)  # it answered (ERRORs), it did not go silent
        # raw bytes that are not ZeroMQ at all
        host, port = srv.address[len("tcp://"):].rsplit(":", 1)
        for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 40):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(payload)
                raw.settimeout(1)  # either way is fine; pid_alive and the newcomer tell the rest
                try:
                    while raw.recv(4096):
                        pass  # the server hangs up on it (or sends its greeting, then hangs up)
                except (TimeoutError, ConnectionResetError):
                    pass
    finally:
        stop.set()
        good.join(120)
    assert not errors, errors
    assert len(epochs_done) >= 3
    assert pid_alive(srv.pid)
    for name, outcome in outcomes.items():
        assert outcome in ("protocol", "version", "invalid_request", "unknown_session",
                           "dropped"), (name, outcome)
    assert outcomes["wrong version"] == "version"
    assert outcomes["garbage"] == "protocol"
    assert outcomes["request for no session"] == "unknown_session"
    assert outcomes["hello with absurd params"] == "invalid_request"
    with Client(srv.address, batch_size=1000) as c:  # and it serves newcomers
        assert sum(len(b["id"]) for b in c.epoch(0)) == N
