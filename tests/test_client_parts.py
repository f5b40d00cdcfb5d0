"""The client's parts, driven in this process: a ``Link`` against a ROUTER socket of the test
(inproc), the ``Servers`` bookkeeping with WELCOMEs of the test's making, and the I/O thread
against a fake server that answers out of order and sends a damaged batch.  No server process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq

from batchfeed.client.iteration import EpochIterator, Progress
from batchfeed.client.lanes import Servers
from batchfeed.client.link import Link, LinkConfig, Welcome
from batchfeed.client.options import ClientConfig
from batchfeed.client.window import Positions
from batchfeed.shared import protocol
from batchfeed.shared.errors import DataMismatch, ProtocolError
from batchfeed.shared.fingerprint import Fingerprint
from batchfeed.shared.plan import PlanParams
from batchfeed.shared.schema import STR, Field, schema_to_wire

PARAMS = PlanParams(batch_size=2, shuffle="none")
FIELDS = (Field("id", np.dtype(np.int64), ()),)
PRINT_A = Fingerprint(full="a" * 32, sampled="b" * 32)


def welcome_header(session: int = 7, fingerprint: Fingerprint = PRINT_A, rows: int = 10,
                   shard: list | None = None, fields: tuple[Field, ...] = FIELDS) -> dict:
    frames = protocol.welcome(session=session, secret="s3cret", dataset="d", rows=rows,
                              batches_per_epoch=-(-rows // 2), prefetch=8,
                              fields=schema_to_wire(fields), server="test", shard=shard,
                              fingerprint=fingerprint.to_wire())
    return protocol.decode(frames).header


@pytest.fixture
def inproc() -> Iterator[tuple[zmq.Context, zmq.Socket, zmq.Poller]]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind("inproc://server")
    try:
        yield ctx, router, zmq.Poller()
    finally:
        router.close()
        ctx.term()


def link_on(ctx: zmq.Context, poller: zmq.Poller, heartbeat: float = 5.0) -> Link:
    config = LinkConfig(PARAMS, 0, None, heartbeat, "rank0", None)
    return Link("inproc://server", False, config, ctx, poller)


def received(router: zmq.Socket) -> tuple[bytes, protocol.Message]:
    assert router.poll(2000), "the link sent nothing"
    route, *frames = router.recv_multipart()
    return route, protocol.decode(frames)


# ---------------------------------------------------------------------------------------------
# Link


def test_a_link_says_hello_and_takes_the_session_its_welcome_gives(inproc) -> None:
    ctx, router, poller = inproc
    link = link_on(ctx, poller)
    link.open()
    try:
        _, hello = received(router)
        assert hello.kind == protocol.HELLO and hello.header["params"]["batch_size"] == 2
        welcome = link.accept(welcome_header(session=7))
        assert welcome is not None and link.up and link.session == 7
        assert welcome.fingerprint == PRINT_A
        assert link.accept(welcome_header(session=8)) is None  # a late answer to a HELLO ...
        _, bye = received(router)
        assert bye.kind == protocol.BYE and bye.header["session"] == 8  # ... is said goodbye
    finally:
        link.close()


def test_a_link_pings_with_the_trainers_position_and_resumes_after_a_loss(inproc) -> None:
    ctx, router, poller = inproc
    link = link_on(ctx, poller, heartbeat=0.5)
    link.open()
    lost: list[Link] = []
    try:
        received(router)  # HELLO
        link.accept(welcome_header(session=7))
        link._last_heard = time.monotonic()  # as receive() notes when the WELCOME arrives
        link.tick(time.monotonic(), lost.append, at=[0, 3])
        _, ping = received(router)
        assert ping.kind == protocol.PING and ping.header["at"] == [0, 3]
        link.tick(time.monotonic() + 1.0, lost.append)  # silent past the heartbeat
        assert lost == [link]
        link.lose(fresh_socket=False)
        again = received(router)[1]
        while again.kind == protocol.PING:  # the tick may have pinged before it gave up
            again = received(router)[1]
        assert again.kind == protocol.HELLO
        assert (again.header["resume"], again.header["resume_secret"]) == (7, "s3cret")
    finally:
        link.close()


# ---------------------------------------------------------------------------------------------
# Servers: the job's data, lanes and credit


def servers_of(*addresses: str) -> tuple[Servers, list[Link]]:
    config = ClientConfig(addresses=addresses, params=PARAMS, prefetch=8, dataset=None,
                          fastpath=False, connect_timeout=1, reconnect_timeout=1,
                          heartbeat_timeout=1, name="t")
    servers = Servers(config)
    ctx = zmq.Context.instance()
    links = [Link(a, False, servers._link_config, ctx, zmq.Poller()) for a in addresses]
    servers.links = links
    return servers, links


def welcomed(servers: Servers, link: Link, **kw: object) -> None:
    h = welcome_header(**kw)  # type: ignore[arg-type]
    link.session, link.welcome = h["session"], Welcome.from_header(h)
    servers.welcomed_by(link, link.welcome, None)


def test_servers_of_other_data_are_refused_naming_both_fingerprints() -> None:
    servers, (a, b) = servers_of("tcp://a:1", "tcp://b:1")
    welcomed(servers, a)
    other = Fingerprint(full="c" * 32, sampled="b" * 32)  # same samples, other bytes
    with pytest.raises(DataMismatch) as err:
        welcomed(servers, b, fingerprint=other)
    assert str(PRINT_A) in str(err.value) and str(other) in str(err.value)


def test_shards_become_lanes_and_a_joiner_takes_its_shards_lane() -> None:
    servers, (a, b) = servers_of("tcp://a:1", "tcp://b:1")
    welcomed(servers, a, shard=[1, 2])
    assert not servers.welcomed.is_set()
    welcomed(servers, b, shard=[0, 2])
    assert servers.welcomed.is_set() and (a.lane, b.lane) == (1, 0) and len(servers.lanes) == 2
    joiner = Link("tcp://c:1", False, servers._link_config, zmq.Context.instance(),
                  zmq.Poller())
    joiner.lane = -1
    servers.links.append(joiner)
    welcomed(servers, joiner, shard=[1, 2])
    assert joiner.lane == 1
    assert servers.lanes[1].link_cap == 4 and servers.lanes[0].link_cap == 8  # re-shared


def test_a_joiner_holding_another_layout_is_refused() -> None:
    servers, (a,) = servers_of("tcp://a:1")
    welcomed(servers, a)
    joiner = Link("tcp://c:1", False, servers._link_config, zmq.Context.instance(),
                  zmq.Poller())
    joiner.lane = -1
    servers.links.append(joiner)
    with pytest.raises(DataMismatch, match="joined holding shard 0/2, but this client's "
                                           "servers hold all rows"):
        welcomed(servers, joiner, shard=[0, 2])


# ---------------------------------------------------------------------------------------------
# The I/O thread against a fake server


class FakeServer(threading.Thread):
    """A ROUTER that answers HELLO with WELCOME and each REQUEST with its batches, the second
    message of each request before the first; the batch holding row ``bad`` carries a str
    field that is not UTF-8."""

    def __init__(self, address: str, rows: int = 10, bad: int = -1):
        super().__init__(daemon=True)
        self.address, self.rows, self.bad = address, rows, bad
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
            sock.linger = 0
            sock.bind(self.address)
            self.ready.set()
            fields = (Field("id", np.dtype(np.int64), ()), Field("text", np.dtype(np.uint8), (),
                                                                STR))
            while not self.stop.is_set():
                if not sock.poll(50):
                    continue
                route, *frames = sock.recv_multipart()
                msg = protocol.decode(frames)
                if msg.kind == protocol.HELLO:
                    sock.send_multipart([route, *protocol.welcome(
                        session=1, secret="x", dataset="d", rows=self.rows,
                        batches_per_epoch=self.rows // 2, prefetch=8,
                        fields=schema_to_wire(fields), server="fake",
                        fingerprint=PRINT_A.to_wire())])
                elif msg.kind == protocol.REQUEST:
                    h = msg.header
                    replies = [self.batch(h["stream"], h["epoch"], k)
                               for k in range(h["k0"], h["k0"] + h["count"])]
                    for reply in reversed(replies):  # out of order
                        sock.send_multipart([route, *reply])
                elif msg.kind == protocol.BYE:
                    sock.send_multipart([route, *protocol.pong(msg.header["session"])])

    def batch(self, stream: int, epoch: int, k: int) -> list:
        ids = np.arange(2 * k, 2 * k + 2, dtype=np.int64)
        text = b"\xff\xfe\xff\xfe" if self.bad in ids else b"abcd"
        offsets = np.array([0, 2, 4], np.int64)
        return protocol.batch(session=1, stream=stream, epoch=epoch, k0=k,
                              dtypes=[["id", "<i8"], ["text", "|u1", "values"],
                                      ["text_offsets", "<i8", "offsets"]],
                              shapes=[[[2], [4], [3]]],
                              buffers=[ids.tobytes(), text, offsets.tobytes()])


def connection_to(address: str):
    from batchfeed.client.connection import Connection

    config = ClientConfig(addresses=(address,), params=PARAMS, prefetch=8, dataset=None,
                          fastpath=False, connect_timeout=5, reconnect_timeout=5,
                          heartbeat_timeout=5, name="t")
    conn = Connection(config)
    conn.start()
    return conn


def test_the_io_thread_hands_batches_over_in_plan_order(tmp_path) -> None:
    server = FakeServer(f"ipc://{tmp_path}/fake.sock")
    server.start()
    server.ready.wait(5)
    conn = connection_to(server.address)
    try:
        stream = conn.stream_at(0, 0, 5)
        it = EpochIterator(conn, Progress(), stream, 0, 0)
        got = [batch for batch in it]
        assert [b["id"].tolist() for b in got] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
        assert got[0]["text"] == ["ab", "cd"]
    finally:
        conn.close()
        server.stop.set()
        server.join(5)


def test_a_batch_that_cannot_be_decoded_is_an_error_at_its_place(tmp_path) -> None:
    server = FakeServer(f"ipc://{tmp_path}/fake.sock", bad=5)
    server.start()
    server.ready.wait(5)
    conn = connection_to(server.address)
    try:
        stream = conn.stream_at(0, 0, 5)
        it = EpochIterator(conn, Progress(), stream, 0, 0)
        got = [next(it)["id"].tolist() for _ in range(2)]
        assert got == [[0, 1], [2, 3]]
        with pytest.raises(ProtocolError, match=r"batch 2 of epoch 0 from the server at "
                                                r"ipc://.* cannot be decoded"):
            next(it)
        assert conn._io.alive  # the I/O thread lives on
        again = EpochIterator(conn, Progress(), conn.stream_at(0, 3, 5, fresh=True), 0, 3)
        assert [b["id"].tolist() for b in again] == [[6, 7], [8, 9]]
    finally:
        conn.close()
        server.stop.set()
        server.join(5)


def test_positions_map_batches_to_a_running_stream() -> None:
    p = Positions(epoch0=2, start=3, bpe=5)
    assert p.where(0) == (2, 3) and p.where(2) == (3, 0) and p.position(3, 1) == 3
    assert msgpack.unpackb(msgpack.packb(list(p.where(7)))) == [4, 0]
