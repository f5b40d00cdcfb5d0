"""No client can hang another, and no peer can touch another's session: tried the way ordinary
loops and attackers on the same host use a server.

- fast path: loops that break early, keep views, or reopen 100 times leave nothing leased;
- sessions: forged RELEASE, BYE, PING, REQUEST, CLAIM and HELLO-resume from another connection
  (even with the victim's real session id) change nothing for the victim;
- the fast path is granted only on proof of shared memory, never on a claim;
- STATS and metrics show labels, never session ids; metrics and ipc binds are guarded.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import free_port, make_rows, server_report, shm_segments, wait_until

from batchfeed import Client
from batchfeed.launch import ServerProcess
from batchfeed.shared import protocol

N = 2003


def leased(address: str) -> int:
    return server_report(address)["server"]["slots_leased"]


def no_leases_left(address: str) -> bool:
    gc.collect()
    return leased(address) == 0


def epoch_ids(client: Client, epoch: int = 0) -> list[int]:
    return [int(i) for batch in client.epoch(epoch) for i in batch["id"]]


@pytest.fixture
def ipc_server(serve, dataset_path, ipc_address):
    return serve("--data", dataset_path(N), "--workers", 2, "--slots", 12, bind=ipc_address)


# ---------------------------------------------------------------------------------------------
# Ordinary loops on the fast path


def test_100_rounds_of_open_read_break_close_leave_nothing_leased(ipc_server) -> None:
    for _ in range(100):
        with Client(ipc_server.address, batch_size=16, seed=1) as client:
            for i, batch in enumerate(client.epoch(0)):
                assert batch["id"].shape == (16,)
                if i == 4:
                    break
    del batch
    with Client(ipc_server.address, batch_size=64, seed=2) as fresh:
        assert sorted(epoch_ids(fresh)) == list(range(N))
    wait_until(lambda: no_leases_left(ipc_server.address), what="0 leased slots")
    assert server_report(ipc_server.address)["server"]["sessions"] == 0


def test_views_kept_past_close_stay_valid_and_come_back_when_dropped(ipc_server) -> None:
    with Client(ipc_server.address, batch_size=100, shuffle="none") as client:
        kept = [batch["id"] for batch in client.epoch(0)]
        assert client.servers()[0]["in_place"]  # it really was the fast path
    with Client(ipc_server.address, batch_size=50, seed=3) as other:  # churns the ring
        for e in range(3):
            assert sorted(epoch_ids(other, e)) == list(range(N))
    assert np.array_equal(np.concatenate(kept), np.arange(N))  # never rewritten
    assert leased(ipc_server.address) > 0
    del kept
    wait_until(lambda: no_leases_left(ipc_server.address), what="0 leased slots")


def test_a_trainer_keeping_every_view_does_not_stall_another(ipc_server) -> None:
    results: dict[str, object] = {}

    def hoarder() -> None:
        with Client(ipc_server.address, batch_size=32, seed=4, prefetch=64) as client:
            kept = [batch for e in range(2) for batch in client.epoch(e)]
            results["hoarder"] = sorted(int(i) for b in kept[: client.batches_per_epoch]
                                        for i in b["id"])
            results["hoarded"] = len(kept)

    def ordinary(address: str, fastpath: bool) -> None:
        with Client(address, batch_size=64, seed=5, fastpath=fastpath) as client:
            results[f"ordinary{fastpath}"] = [sorted(epoch_ids(client, e)) for e in range(2)]

    threads = [threading.Thread(target=hoarder),
               threading.Thread(target=ordinary, args=(ipc_server.address, True)),
               threading.Thread(target=ordinary, args=(ipc_server.address, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert results["hoarder"] == list(range(N))
    for fastpath in (True, False):
        assert results[f"ordinary{fastpath}"] == [list(range(N))] * 2
    report = server_report(ipc_server.address)["server"]
    assert report["counters"].get("copied_sends", 0) > 0  # the hoarder went past its share
    wait_until(lambda: no_leases_left(ipc_server.address), what="0 leased slots")


# ---------------------------------------------------------------------------------------------
# Forged messages


def raw_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def ask(sock: zmq.Socket, frames: list, timeout_ms: int = 3000) -> protocol.Message | None:
    sock.send_multipart(frames)
    if not sock.poll(timeout_ms):
        return None
    return protocol.decode(sock.recv_multipart())


def test_forged_messages_from_another_connection_change_nothing(ipc_server) -> None:
    victim = Client(ipc_server.address, batch_size=100, shuffle="none", prefetch=4)
    try:
        it = victim.epoch(0)
        held = [next(it) for _ in range(3)]
        copies = [b["id"].copy() for b in held]
        victim_id = victim._conn._io.servers.links[0].session  # as if it had leaked
        report = server_report(ipc_server.address)
        labels = [s["id"] for s in report["sessions"]]
        assert f"{victim_id:x}" not in labels and str(victim_id) not in labels
        with zmq.Context() as ctx, raw_socket(ctx, ipc_server.address) as attacker:
            forged = [protocol.release(session=victim_id),
                      protocol.ping(victim_id),
                      protocol.request(session=victim_id, stream=99, epoch=0, k0=0, count=1),
                      protocol.claim(session=victim_id, proof="00" * 32),
                      protocol.bye(victim_id)]
            for frames in forged:
                reply = ask(attacker, frames)
                assert reply is not None and reply.kind == protocol.ERROR
                assert reply.header["code"] == "unknown_session"
            hello = protocol.hello({"batch_size": 10}, client="x", dataset=None, prefetch=4,
                                   fastpath=False, resume=victim_id, resume_secret="guess")
            reply = ask(attacker, hello)
            assert reply is not None and reply.kind == protocol.WELCOME
            assert reply.header["session"] != victim_id
        with Client(ipc_server.address, batch_size=37, seed=9) as churn:
            for e in range(3):
                assert sorted(epoch_ids(churn, e)) == list(range(N))
        for batch, copy in zip(held, copies):
            assert np.array_equal(batch["id"], copy)
        rest = [int(i) for b in it for i in b["id"]]
        assert [int(i) for c in copies for i in c] + rest == list(range(N))
    finally:
        victim.close()


def test_a_claim_without_the_proof_gets_no_fast_path_and_pins_nothing(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 2)  # tcp: a peer anywhere
    with zmq.Context() as ctx, raw_socket(ctx, srv.address) as peer:
        old_style = protocol.encode(protocol.HELLO, client="x", params={"batch_size": 10},
                                    dataset=None, prefetch=8, fastpath=True, pid=1,
                                    pid_start=1)
        reply = ask(peer, old_style)
        assert reply is not None and reply.header["code"] == "protocol"
        welcome = ask(peer, protocol.hello({"batch_size": 10}, client="x", dataset=None,
                                           prefetch=8, fastpath=True))
        assert welcome is not None and welcome.kind == protocol.WELCOME
        assert welcome.header["challenge"] is not None  # offered, but must be proven
        session = welcome.header["session"]
        before = {name for name in shm_segments() if "lease" in name}
        peer.send_multipart(protocol.claim(session=session, proof="11" * 32))
        peer.send_multipart(protocol.request(session=session, stream=0, epoch=0, k0=0,
                                             count=8))
        got = 0
        while got < 8:
            assert peer.poll(5000), "no batch came"
            msg = protocol.decode(peer.recv_multipart())
            assert msg.kind == protocol.BATCH and msg.header["slot"] is None and msg.buffers
            got += len(msg.header["shapes"])
        server = server_report(srv.address)["server"]
        assert server["slots_leased"] == 0 and server["counters"]["claims_refused"] == 1
        assert {name for name in shm_segments() if "lease" in name} == before  # no table made


# ---------------------------------------------------------------------------------------------
# What others are shown, and where a server may listen


def test_stats_and_metrics_show_labels_never_session_ids(serve, dataset_path) -> None:
    from urllib.request import urlopen

    port = free_port()
    srv = serve("--data", dataset_path(N), "--workers", 1, "--metrics-port", port)
    with Client(srv.address, batch_size=10, name="trainerA") as client:
        next(iter(client.epoch(0)))
        secret_id = f"{client._conn._io.servers.links[0].session:x}"
        report = server_report(srv.address)
        assert [s["id"] for s in report["sessions"]] == ["s1"]
        wait_until(lambda: b"trainerA" in urlopen(f"http://127.0.0.1:{port}/metrics").read(),
                   what="the session in the metrics")
        assert secret_id.encode() not in urlopen(f"http://127.0.0.1:{port}/metrics").read()


def test_metrics_on_a_public_interface_need_insecure(dataset_path) -> None:
    srv = ServerProcess(["--data", str(dataset_path(50)), "--metrics-port", "0",
                         "--metrics-bind", "0.0.0.0"])
    with pytest.raises(RuntimeError, match="refusing to serve metrics on 0.0.0.0"):
        srv.start(timeout=30)
    assert srv.proc is not None and srv.proc.returncode == 2


def test_a_second_server_on_a_live_ipc_path_is_refused(serve, dataset_path, tmp_path) -> None:
    first = serve("--data", dataset_path(50), bind=f"ipc://{tmp_path}/s.sock")
    second = ServerProcess(["--data", str(dataset_path(50))], bind=first.address)
    with pytest.raises(RuntimeError, match="in use by a running server"):
        second.start(timeout=30)
    with Client(first.address, batch_size=10, fastpath=False) as client:
        assert client.rows == 50  # the first one still serves its clients


def test_a_stale_ipc_socket_file_is_replaced(serve, dataset_path, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # a file nobody listens on, as a SIGKILLed server leaves
    dead.close()
    srv = serve("--data", dataset_path(50), bind=f"ipc://{path}")
    with Client(srv.address, batch_size=10) as client:
        assert sorted(epoch_ids(client)) == list(range(50))
    assert os.path.exists(path)


def test_a_closed_session_is_acknowledged_and_nothing_follows(ipc_server) -> None:
    rows = make_rows(N)["id"]
    with Client(ipc_server.address, batch_size=8, seed=0, prefetch=200) as client:
        it = client.epoch(0)
        first = next(it)
        assert first["id"].shape == (8,) and set(first["id"]) <= set(rows)
        del first, it  # 199 prefetched batches are in flight or queued: all must come back
    wait_until(lambda: no_leases_left(ipc_server.address), what="0 leased slots")


STRESS_CLIENT = r"""
import random, sys, threading
import numpy as np
from batchfeed import Client

address, proc, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
failures = []

def run(c):
    rng = random.Random(proc * 100 + c)
    kwargs = dict(batch_size=rng.choice([1, 7, 32, 100, 333]),
                  shuffle=rng.choice(["full", "none", "buffer"]), seed=rng.randrange(1000),
                  prefetch=rng.choice([None, 2, 16, 64]), reconnect_timeout=30)
    if kwargs["shuffle"] == "buffer":
        kwargs["buffer_size"] = rng.choice([1, 50, 5000])
    keep = rng.random() < 0.3  # some trainers keep every view of an epoch
    try:
        with Client(address, **kwargs) as client:
            for epoch in range(2):
                kept, ids = [], []
                for batch in client.epoch(epoch):
                    ids.extend(batch["id"].tolist())
                    if keep:
                        kept.append(batch["id"])
                if sorted(ids) != list(range(n)):
                    failures.append(f"client {c} epoch {epoch}: {len(ids)} rows, not exact")
                if keep and sorted(np.concatenate(kept).tolist()) != list(range(n)):
                    failures.append(f"client {c}: a kept view was rewritten")
    except Exception as exc:
        failures.append(f"client {c}: {type(exc).__name__}: {exc}")

threads = [threading.Thread(target=run, args=(c,)) for c in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join(240)
hung = sum(t.is_alive() for t in threads)
print("FAIL " + "; ".join(failures) if failures or hung else "OK", hung, flush=True)
"""


@pytest.mark.slow
def test_24_fast_path_clients_with_worker_kills_are_exact_and_never_hang(ipc_server) -> None:
    import signal
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", STRESS_CLIENT, ipc_server.address, str(p),
                               str(N)], stdout=subprocess.PIPE, text=True) for p in range(4)]
    kills = 0
    try:
        while any(p.poll() is None for p in procs) and kills < 40:
            time.sleep(0.4)
            pids = server_report(ipc_server.address)["server"]["worker_pids"]
            os.kill(pids[kills % len(pids)], signal.SIGKILL)
            kills += 1
        outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert outputs == ["OK 0"] * 4, outputs
    assert kills >= 5
    report = server_report(ipc_server.address)["server"]
    assert report["errors"].get("internal", 0) == 0
    wait_until(lambda: no_leases_left(ipc_server.address), what="0 leased slots")
