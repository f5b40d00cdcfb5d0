"""The wire format: round trips, limits, and a ProtocolError for everything malformed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from batchfeed.shared import protocol
from batchfeed.shared.errors import ProtocolError, VersionMismatch, WorkerError, error_from_code


def raw(header: dict, *buffers: bytes) -> list:
    return [msgpack.packb(header), *buffers]


def test_every_kind_round_trips() -> None:
    messages = [
        protocol.hello({"batch_size": 4}, client="0.1.0", dataset=None, prefetch=8, fastpath=False),
        protocol.welcome(session=5, secret="s", dataset="d", rows=10, batches_per_epoch=3,
                         prefetch=8, fields=[["x", "<f4", [2]]], server="0.1.0", ring=None),
        protocol.claim(session=5, proof="ab"),
        protocol.grant(session=5, table="bf_1_ab_lease1"),
        protocol.request(session=5, stream=1, epoch=0, k0=0, count=2, at=[0, 1]),
        protocol.release(session=5),
        protocol.ping(5),
        protocol.ping(None),
        protocol.pong(),
        protocol.pong(5),
        protocol.bye(5),
        protocol.error("invalid_request", "bad", session=5),
    ]
    for frames in messages:
        msg = protocol.decode(frames)
        assert msg.header["v"] == protocol.VERSION
        assert msg.buffers == []


def test_optional_keys_a_peer_left_out_are_filled_in() -> None:
    msg = protocol.decode([msgpack.packb({"v": protocol.VERSION, "kind": "ping"})])
    assert msg.header["session"] is None
    hello = protocol.decode([msgpack.packb({"v": protocol.VERSION, "kind": "hello",
                                            "client": "x", "params": {}, "prefetch": 0,
                                            "fastpath": False})])
    assert {k: hello.header[k] for k in ("dataset", "name", "resume", "resume_secret")} == \
        dict.fromkeys(("dataset", "name", "resume", "resume_secret"))


def test_batch_round_trip_gives_zero_copy_views() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6, dtype=np.int64)
    frames = protocol.batch(session=1, stream=1, epoch=0, k0=3,
                            dtypes=[["x", "<f4"], ["y", "<i8"]],
                            shapes=[[[4, 2], [4]], [[2, 2], [2]]],
                            buffers=[x.tobytes(), y.tobytes()])
    msg = protocol.decode(frames)
    layout = protocol.chunk_layout(msg.header)
    buffers = [bytearray(b) for b in msg.buffers]
    batches = protocol.field_views(layout, buffers)
    assert [b["y"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert np.array_equal(batches[1]["x"], x[4:])
    assert np.shares_memory(batches[1]["x"], np.frombuffer(buffers[0], np.uint8))


def test_other_version_gets_an_error_naming_both_versions() -> None:
    frames = raw({"v": 99, "kind": "hello"})
    with pytest.raises(VersionMismatch, match=f"protocol 99.*protocol {protocol.VERSION}"):
        protocol.decode(frames)


def test_error_messages_stay_readable_across_versions() -> None:
    msg = protocol.decode(raw({"v": 99, "kind": "error", "code": "version", "message": "m"}))
    assert msg.kind == protocol.ERROR


@pytest.mark.parametrize("frames,words", [
    ([], "empty message"),
    ([b""], "empty header"),
    ([b"\xc1garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "must be a msgpack map"),
    ([b"x" * (protocol.MAX_HEADER_BYTES + 1)], "at most"),
    (raw({"v": protocol.VERSION, "kind": "launch_missiles"}), "unknown message kind"),
    (raw({"v": protocol.VERSION}), "unknown message kind"),
    (raw({"v": protocol.VERSION, "kind": "bye"}), "missing field 'session'"),
    (raw({"v": protocol.VERSION, "kind": "bye", "session": "x"}), "must be int"),
    (raw({"v": protocol.VERSION, "kind": "bye", "session": True}), "must be int"),
    (raw({"v": protocol.VERSION, "kind": "bye", "session": 1, "extra": 2}), "unknown field"),
    (raw({"v": protocol.VERSION, "kind": "bye", "session": 1}, b"data"), "single frame"),
    ([msgpack.packb({1: 2})], "not valid msgpack"),
    ([msgpack.packb({"v": protocol.VERSION, "kind": "ping"})] + [b""] * 300, "frames"),
    ([msgpack.packb({"a": "x" * 10_000})], "not valid msgpack"),
    ([b"\x91" * 5000 + b"\xc0"], "not valid msgpack"),
])
def test_malformed_messages_raise_protocol_error(frames: list, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        protocol.decode(frames)


def _batch_header(**changes: object) -> dict:
    h = dict(v=protocol.VERSION, kind="batch", session=1, stream=1, epoch=0, k0=0,
             dtypes=[["x", "<f4"]], shapes=[[[2, 3]]], slot=None, offsets=None)
    h.update(changes)
    return h


@pytest.mark.parametrize("changes,words", [
    (dict(dtypes=[["x", "O"]]), "not supported"),
    (dict(dtypes=[["x", "f4,f4"]]), "not supported"),
    (dict(dtypes=[["x", "<V8"]]), "not supported"),
    (dict(dtypes=[]), "1 to"),
    (dict(shapes=[[[-1, 3]]]), "bad dimension"),
    (dict(shapes=[[[2, 3], [2]]]), "one shape per field"),
    (dict(shapes=[[[]]]), "no batch dimension"),
    (dict(shapes=[]), "1 to"),
    (dict(shapes=[[[2**50, 2**50]]]), "bad dimension|absurdly"),
])
def test_batch_headers_are_checked(changes: dict, words: str) -> None:
    msg = protocol.decode([msgpack.packb(_batch_header(**changes)), b"\0" * 24])
    with pytest.raises(ProtocolError, match=words):
        protocol.chunk_layout(msg.header)


def test_buffer_that_does_not_match_its_shape_is_refused() -> None:
    msg = protocol.decode([msgpack.packb(_batch_header()), b"\0" * 20])
    layout = protocol.chunk_layout(msg.header)
    with pytest.raises(ProtocolError, match="has 20 bytes but"):
        protocol.field_views(layout, msg.buffers)
    with pytest.raises(ProtocolError, match="data frames"):
        protocol.field_views(layout, [])


def test_errors_come_back_as_their_own_type() -> None:
    err = error_from_code("worker", "transform failed")
    assert isinstance(err, WorkerError) and str(err) == "transform failed"
    assert type(error_from_code("no-such-code", "m")).__name__ == "BatchfeedError"
