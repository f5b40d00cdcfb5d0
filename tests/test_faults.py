"""Faults on real processes: each sample exactly once per epoch, whatever dies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    children,
    free_port,
    pid_alive,
    private_pss_bytes,
    pss_bytes,
    server_report,
    shm_segments,
    socket_fds,
    wait_until,
)

from batchfeed import Client, ServerUnavailable
from batchfeed.launch import ServerProcess

N = 20_003


def exact_epoch(client: Client, epoch: int, n: int = N, pause: float = 0.0) -> None:
    """Iterate one epoch and check every row came exactly once (and rows are intact)."""
    seen = []
    for batch in client.epoch(epoch):
        ids = batch["id"]
        assert np.array_equal(batch["x"][:, 0], ids.astype(np.float32))
        seen.append(ids.copy())
        if pause:
            time.sleep(pause)  # a slow trainer on purpose: faults land while batches are owed
    rows = np.sort(np.concatenate(seen))
    assert len(rows) == n and np.array_equal(rows, np.arange(n)), f"epoch {epoch} not exact"


def zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


class Killer(threading.Thread):
    """Every ``period`` seconds, send ``sig`` to one of the server's workers."""

    def __init__(self, server_pid: int, period: float, sig: int = signal.SIGKILL):
        super().__init__(daemon=True)
        self.server_pid, self.period, self.sig = server_pid, period, sig
        self.kills = 0
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(0)
        while not self.stop.wait(self.period):
            workers = children(self.server_pid)
            if workers:
                try:
                    os.kill(rng.choice(workers), self.sig)
                    self.kills += 1
                except ProcessLookupError:
                    pass


def test_worker_killed_repeatedly_loses_nothing(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 2)
    killer = Killer(srv.pid, period=0.3)
    with Client(srv.address, batch_size=64, seed=3, prefetch=16) as c:
        killer.start()
        try:
            for epoch in range(3):
                exact_epoch(c, epoch, pause=0.002)
        finally:
            killer.stop.set()
            killer.join()
    assert killer.kills >= 5
    report = server_report(srv.address)["server"]
    print(f"\n[worker SIGKILL] {killer.kills} kills every 0.3 s over 3 epochs of {N} rows: "
          f"0 lost, 0 duplicated; {report['counters']['worker_restarts']} restarts")
    assert report["counters"]["worker_restarts"] >= killer.kills - 1
    assert len(children(srv.pid)) == 2  # every worker was replaced


def test_hung_worker_is_replaced_and_its_work_redone(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 2, "--task-timeout", 1)
    stopped = children(srv.pid)[0]
    with Client(srv.address, batch_size=64, seed=4, prefetch=16) as c:
        it = c.epoch(0)
        seen = [next(it)["id"].copy()]
        os.kill(stopped, signal.SIGSTOP)
        try:
            seen += [b["id"].copy() for b in it]
            rows = np.sort(np.concatenate(seen))
            assert np.array_equal(rows, np.arange(N))  # no gap, no late duplicate
            # Keep the server busy until the hung worker has been given work and caught.
            epoch, deadline = 1, time.monotonic() + 30
            while not server_report(srv.address)["server"]["counters"].get("worker_timeouts"):
                assert time.monotonic() < deadline, "the hung worker was never detected"
                exact_epoch(c, epoch)
                epoch += 1
            exact_epoch(c, epoch)
        finally:
            if pid_alive(stopped):
                os.kill(stopped, signal.SIGCONT)
    wait_until(lambda: not pid_alive(stopped) or zombie(stopped), 5,
               what=f"the hung worker {stopped} to be killed")
    timeouts = server_report(srv.address)["server"]["counters"]["worker_timeouts"]
    print(f"\n[worker SIGSTOP] task timeout 1 s: {timeouts} hung worker(s) killed and replaced; "
          f"epochs exact, no late duplicate")


CLIENT_SCRIPT = """
import sys
from batchfeed import Client
c = Client(sys.argv[1], batch_size=64, seed=int(sys.argv[2]), fastpath=sys.argv[3] == "1")
it = c.epoch(0)
held = [next(it) for _ in range(3)]
print("ready", flush=True)
sys.stdin.read()
"""


def start_doomed_client(address: str, seed: int, fastpath: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, address, str(seed),
                             "1" if fastpath else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fastpath", [False, True], ids=["tcp", "fastpath"])
def test_dead_clients_are_reclaimed_over_50_cycles(serve, dataset_path, fastpath: bool,
                                                   tmp_path) -> None:
    bind = f"ipc://{tmp_path}/s.sock" if fastpath else "tcp://127.0.0.1:0"
    srv = serve("--data", dataset_path(N), "--workers", 2, "--session-timeout", 1, bind=bind)
    pids = lambda: [srv.pid, *children(srv.pid)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def well_behaved() -> None:
        try:
            with Client(srv.address, batch_size=128, seed=9) as good:
                epoch = 0
                while not stop.is_set():
                    exact_epoch(good, epoch)
                    epoch += 1
        except BaseException as exc:
            errors.append(exc)

    good = threading.Thread(target=well_behaved)
    good.start()
    try:
        for warmup in range(10):  # caches and the allocator settle on the first clients
            doomed = start_doomed_client(srv.address, 1000 + warmup, fastpath)
            doomed.kill()
            doomed.wait()
        wait_until(lambda: server_report(srv.address)["server"]["sessions"] == 1, 20, 0.1,
                   what="the first dead clients to be reclaimed")
        # Fixed on purpose: workers drop a plan idle for 5 s (the warm-up clients'), and
        # nothing tells when they have.
        time.sleep(6)
        base_pss, base_sockets = private_pss_bytes(pids()), socket_fds(srv.pid)
        for cycle in range(50):
            doomed = start_doomed_client(srv.address, cycle, fastpath)
            doomed.kill()
            doomed.wait()

        def reclaimed() -> bool:
            s = server_report(srv.address)["server"]
            return s["sessions"] == 1 and s["slots_leased"] <= 8  # the good client's, if any

        wait_until(reclaimed, 30, 0.1,
                   what="sessions and slots of 50 dead clients to be reclaimed")
        wait_until(lambda: socket_fds(srv.pid) <= base_sockets, 30, 0.1,
                   what="sockets back to baseline")
        t_wait = time.monotonic()
        wait_until(lambda: private_pss_bytes(pids()) < base_pss + 4 * 2**20, 30, 0.1,
                   what="memory back to baseline",
                   detail=lambda: f"private PSS {[private_pss_bytes([p]) >> 10 for p in pids()]} "
                                  f"KiB per process, baseline {base_pss >> 10} KiB in all")
        print(f"\n[client SIGKILL x50, {'fast path' if fastpath else 'tcp'}] sessions 1, "
              f"sockets {socket_fds(srv.pid)} (baseline {base_sockets}), private PSS "
              f"{private_pss_bytes(pids()) / 2**20:.1f} MiB (baseline {base_pss / 2**20:.1f}), "
              f"{time.monotonic() - t_wait:.1f} s after the last kill")
    finally:
        stop.set()
        good.join(60)
    assert not errors, errors


def test_server_killed_and_restarted_costs_only_a_delay(dataset_path) -> None:
    path = dataset_path(N)
    address = f"tcp://127.0.0.1:{free_port()}"
    first = ServerProcess(["--data", str(path), "--workers", 2], bind=address).start()
    second = None
    try:
        with Client(address, batch_size=64, seed=5, prefetch=8, reconnect_timeout=60) as c:
            full = [b["id"].copy() for b in c.epoch(0)]
            it = c.epoch(1)
            seen = [next(it)["id"].copy() for _ in range(40)]
            os.kill(first.pid, signal.SIGKILL)
            first.proc.wait(10)
            t_kill = time.monotonic()
            time.sleep(1.0)  # the point: a real outage, the trainer asking into the void
            second = ServerProcess(["--data", str(path), "--workers", 2], bind=address).start()
            seen.append(next(it)["id"].copy())
            delay = time.monotonic() - t_kill
            seen += [b["id"].copy() for b in it]  # no exception: only a delay
            rows = np.sort(np.concatenate(seen))
            assert np.array_equal(rows, np.arange(N))
            # and it is the very same epoch 1 an uninterrupted run gives
            again = [b["id"].copy() for b in c.epoch(1)]
            assert all(np.array_equal(a, b) for a, b in zip(seen, again))
            assert len(full) == len(again)
            print(f"\n[server SIGKILL + restart 1 s later] trainer resumed {delay:.1f} s after "
                  "the kill; epoch exact and equal to an uninterrupted one")
        stale = [n for n in shm_segments() if n.startswith(f"bf_{first.pid}_")]
        assert not stale  # removed by the second server at start
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0


def test_server_gone_past_reconnect_timeout_is_a_clear_error(dataset_path) -> None:
    srv = ServerProcess(["--data", str(dataset_path(N)), "--workers", 1]).start()
    try:
        with Client(srv.address, batch_size=64, reconnect_timeout=1) as c:
            it = c.epoch(0)
            next(it)
            os.kill(srv.pid, signal.SIGKILL)
            srv.proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailable, match="did not come back within "
                                                        "reconnect_timeout=1 s"):
                for _ in it:
                    pass
            assert time.monotonic() - t0 < 15
            print(f"\n[server gone] ServerUnavailable after {time.monotonic() - t0:.1f} s "
                  "(reconnect_timeout=1)")
    finally:
        srv.stop()
        subprocess.run([sys.executable, "-c", "from batchfeed.shared.shm import "
                        "remove_stale_segments as r; r()"], check=True)


def test_sigkilled_server_leaves_no_workers_and_its_segments_go_at_next_start(
        serve, dataset_path) -> None:
    path = dataset_path(N)
    srv = ServerProcess(["--data", str(path), "--workers", 2]).start()
    workers = children(srv.pid)
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(10)
    srv.stop()
    wait_until(lambda: not any(pid_alive(w) for w in workers), 10,
               what="orphaned workers to exit")
    left = [n for n in shm_segments() if n.startswith(f"bf_{srv.pid}_")]
    assert left  # a SIGKILL leaves them ...
    nxt = serve("--data", path, "--workers", 1, log_level="INFO")
    assert not [n for n in shm_segments() if n.startswith(f"bf_{srv.pid}_")]  # ... until now
    assert any("removed" in line and left[0] in line for line in nxt.output)


def test_too_little_shared_memory_fails_before_workers_start(tmp_path) -> None:
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            "mount -t tmpfs -o size=8m tmpfs /dev/shm && echo ok"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "ok":
        pytest.skip(f"cannot mount a small /dev/shm here: {probe.stderr.strip()}")
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "
         f"{sys.executable} -m batchfeed serve --synthetic-rows 1000000 "
         "--bind tcp://127.0.0.1:0"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "need 3" in out.stderr and "of shared memory but /dev/shm has only 8.0 MiB" in \
        out.stderr
    assert "shm_size" in out.stderr
    assert "Traceback" not in out.stderr and "Bus error" not in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stalled_consumer_keeps_server_memory_bounded(serve, dataset_path) -> None:
    """A client stops consuming for 60 s while another keeps the server busy: the server's
    memory stays flat (the stalled client's credit caps what it is owed)."""
    n = 200_000
    arrays = {"id": np.arange(n), "x": np.zeros((n, 256), np.float32)}
    srv = serve("--data", dataset_path(arrays=arrays), "--workers", 2)
    pids = [srv.pid, *children(srv.pid)]
    with Client(srv.address, batch_size=256, prefetch=16, name="stalled") as stalled, \
            Client(srv.address, batch_size=256, prefetch=16, name="busy") as busy:
        it = stalled.epoch(0)
        next(it)
        for epoch in range(2):  # warm up: every ring slot gets touched
            for _ in busy.epoch(epoch):
                pass
        samples, epoch, t0 = [], 2, time.monotonic()
        while time.monotonic() - t0 < 60:
            for _ in busy.epoch(epoch):
                pass
            epoch += 1
            samples.append((pss_bytes(pids), private_pss_bytes(pids)))
        sessions = {s["name"]: s for s in server_report(srv.address)["sessions"]}
    assert sessions["stalled"]["batches"] <= 16 + 1  # never more than its credit was sent
    totals, private = zip(*samples)
    half = len(samples) // 2
    assert max(private[half:]) - max(private[:half]) < 2 * 2**20  # no upward trend
    assert max(private) - min(private) < 8 * 2**20  # allocator noise, not a backlog
    # All the rest is the dataset and the ring, fixed in size whatever the client does.
    ring = srv.report()["server"]
    ring_bytes = ring["slots"] * ring["slot_bytes"]
    data_bytes = n * (256 * 4 + 8)
    assert max(totals) <= data_bytes + ring_bytes + max(private)
    print(f"\n[stalled consumer 60 s] {len(samples)} samples: server PSS "
          f"{min(totals) / 2**20:.1f}..{max(totals) / 2**20:.1f} MiB, private "
          f"{min(private) / 2**20:.1f}..{max(private) / 2**20:.1f} MiB; stalled client got "
          f"{sessions['stalled']['batches']} batches (credit 16)")


@pytest.mark.slow  # the server's heartbeat timeout is 5 s
def test_silent_peer_is_dropped_by_zeromq_heartbeats(serve, dataset_path) -> None:
    """A client frozen with SIGSTOP answers no heartbeat: the server drops its connection
    (TCP alone would keep it: the kernel still ACKs) and reclaims its session."""
    srv = serve("--data", dataset_path(N), "--workers", 1, "--session-timeout", 30)
    doomed = start_doomed_client(srv.address, 0, fastpath=False)
    try:
        base = socket_fds(srv.pid)
        os.kill(doomed.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        wait_until(lambda: socket_fds(srv.pid) < base, 20,
                   what="the heartbeat to drop the connection")
        print(f"\n[silent peer] connection dropped {time.monotonic() - t0:.1f} s after SIGSTOP")
    finally:
        doomed.kill()
        doomed.wait()
