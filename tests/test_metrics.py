"""Observability: the Prometheus endpoint of ``serve --metrics-port`` and ``batchfeed stats``."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
import zmq
from conftest import children, free_port, server_report
from prometheus_client.parser import text_string_to_metric_families

from batchfeed import Client, __version__
from batchfeed.server.metrics import SnapshotCollector
from batchfeed.shared.curve_keys import make_keys
from batchfeed.stats import _Screen, render

N = 5_003
BATCH = 64


def scrape(port: int) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, from a real HTTP GET of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def eventually(port: int, check: Callable[[dict], bool], timeout: float = 5.0) -> dict:
    """Scrape until ``check`` holds (the snapshot is refreshed every 0.25 s)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def ring_consistent(m: dict) -> bool:
    return value(m, "batchfeed_slots_free") + value(m, "batchfeed_slots_busy") + \
        value(m, "batchfeed_slots_leased") == value(m, "batchfeed_slots")


def batchfeed(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchfeed", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_metrics_count_what_the_client_received(serve, dataset_path) -> None:
    port = free_port()
    srv = serve("--data", dataset_path(N), "--workers", 2, "--metrics-port", port)
    with Client(srv.address, batch_size=BATCH, seed=1, prefetch=8, name="metrics-probe") as c:
        it = c.epoch(0)
        received = sum(1 for _ in it)
        it.close()  # no more prefetching of epoch 1 (within the credit of 8 batches)
        assert received == -(-N // BATCH)

        def settled(m: dict) -> bool:
            return received <= value(m, "batchfeed_batches_served_total") <= received + 8

        m = eventually(port, settled)
        assert settled(m)
        assert value(m, "batchfeed_bytes_served_total") > 0
        assert value(m, "batchfeed_sessions") == 1
        rates = [key for key in m if key[0] == "batchfeed_session_batch_rate"]
        assert len(rates) == 1 and ("client", "metrics-probe") in rates[0][1]
        assert ("dataset", "data") in rates[0][1]
        assert value(m, "batchfeed_workers") == 2
        busy = [value(m, "batchfeed_worker_busy_seconds_total", worker=w) for w in ("0", "1")]
        assert None not in busy and sum(busy) > 0
        for w in ("0", "1"):
            assert 0 <= value(m, "batchfeed_worker_busy_fraction", worker=w) <= 1
        assert value(m, "batchfeed_slots") > 0 and ring_consistent(m)
        assert value(m, "batchfeed_uptime_seconds") > 0
        assert value(m, "batchfeed_worker_restarts_total") == 0
    m = eventually(port, lambda m: value(m, "batchfeed_sessions") == 0 and
                   value(m, "batchfeed_slots_free") == value(m, "batchfeed_slots"))
    assert value(m, "batchfeed_sessions") == 0
    assert not [key for key in m if key[0] == "batchfeed_session_batch_rate"]
    assert value(m, "batchfeed_slots_free") == value(m, "batchfeed_slots") and ring_consistent(m)


def test_worker_kill_and_garbage_message_are_counted(serve) -> None:
    port = free_port()
    srv = serve("--synthetic-rows", 20_000, "--workers", 2, "--metrics-port", port)
    m = eventually(port, lambda m: value(m, "batchfeed_workers") == 2)
    assert value(m, "batchfeed_worker_restarts_total") == 0
    assert value(m, "batchfeed_errors_total", kind="protocol") is None

    os.kill(children(srv.pid)[0], signal.SIGKILL)
    m = eventually(port, lambda m: value(m, "batchfeed_worker_restarts_total") == 1)
    assert value(m, "batchfeed_worker_restarts_total") == 1

    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(srv.address)
        sock.send(b"garbage")
        assert sock.poll(5000), "the server did not answer the malformed message"
    m = eventually(port, lambda m: value(m, "batchfeed_errors_total", kind="protocol") == 1)
    assert value(m, "batchfeed_errors_total", kind="protocol") == 1
    with Client(srv.address, batch_size=256, seed=0) as c:  # the replacement works
        assert sum(1 for _ in c.epoch(0)) == -(-20_000 // 256)


def test_metrics_endpoint_closes_with_the_server(serve) -> None:
    port = free_port()
    srv = serve("--synthetic-rows", 2_000, "--workers", 1, "--metrics-port", port)
    scrape(port)
    assert srv.stop() == 0
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_metrics_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = batchfeed("serve", "--bind", "tcp://127.0.0.1:0", "--workers", "1",
                        "--synthetic-rows", "2000", "--metrics-port", str(port))
    assert out.returncode == 2, out.stderr
    assert f"--metrics-port {port} is in use; pick another" in out.stderr
    assert "Traceback" not in out.stderr


def test_stats_once_shows_the_session_and_the_summary(serve) -> None:
    srv = serve("--synthetic-rows", 20_000, "--workers", 2)
    with Client(srv.address, batch_size=100, seed=0, prefetch=8, name="stats-probe") as c:
        it = c.epoch(0)
        for _ in range(10):
            next(it)
        session = server_report(srv.address)["sessions"][0]
        out = batchfeed("stats", srv.address, "--once")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"batchfeed {__version__} at {srv.address}, up ")
    assert "1 session, 2 workers" in lines[0] and "slots: " in lines[0]
    assert lines[1].split()[:3] == ["SESSION", "CLIENT", "DATASET"]
    row = lines[2].split()
    assert row[:4] == [session["id"][:8], "stats-probe", "synthetic", "0"]
    assert row[4].endswith(f"/{session['batches_per_epoch']}")


def test_stats_unreachable_server_exits_2_within_the_timeout() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    out = batchfeed("stats", address, "--once", "--timeout", "0.5")
    assert out.returncode == 2
    assert time.monotonic() - t0 < 30
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"batchfeed stats: error: no answer from "
                                                   f"{address} within 0.5 s")


def test_stats_speaks_curve_to_a_curve_server(serve, tmp_path) -> None:
    make_keys(str(tmp_path))
    srv = serve("--synthetic-rows", 2_000, "--workers", 1,
                "--curve-secret-key", tmp_path / "server.key_secret",
                "--authorized-keys", tmp_path / "authorized")
    out = batchfeed("stats", srv.address, "--once", "--curve", str(tmp_path / "client.key_secret"),
                    str(tmp_path / "server.key"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"batchfeed {__version__} at {srv.address}")
    plain = batchfeed("stats", srv.address, "--once", "--timeout", "0.5")
    assert plain.returncode == 2 and "a server with CURVE needs --curve" in plain.stderr


# ---------------------------------------------------------------------------------------------
# Pieces, without a server.


class FakeFrontend:
    def __init__(self) -> None:
        self.snapshot: dict = {}

    def tick(self, uptime: float, busy: float) -> None:
        self.snapshot = {
            "version": "0", "address": "tcp://x:1", "uptime_s": uptime, "datasets": "d",
            "workers": 1, "worker_pids": [1], "slots": 4, "slots_free": 4, "slots_busy": 0,
            "slots_leased": 0, "sessions": 0, "counters": {}, "errors": {},
            "worker_busy_s": {"0": busy}, "session_list": [],
        }


def busy_fraction(collector: SnapshotCollector) -> float:
    family = next(f for f in collector.collect() if f.name == "batchfeed_worker_busy_fraction")
    return family.samples[0].value


def test_busy_fraction_is_measured_between_scrapes() -> None:
    frontend = FakeFrontend()
    collector = SnapshotCollector(frontend)
    assert list(collector.collect()) == []  # before the loop's first tick: nothing to say
    frontend.tick(uptime=10.0, busy=5.0)
    assert busy_fraction(collector) == 0.5  # first scrape: the average since the start
    frontend.tick(uptime=12.0, busy=5.5)
    assert busy_fraction(collector) == 0.25
    frontend.tick(uptime=12.5, busy=6.5)  # under a second later: the last reading stands
    assert busy_fraction(collector) == 0.25
    frontend.tick(uptime=14.0, busy=9.5)  # a long task credited at once reads at most 1
    assert busy_fraction(collector) == 1.0


REPORT = {
    "server": {"version": "9.9", "address": "tcp://h:1", "uptime_s": 3725.0, "workers": 3,
               "slots": 8, "slots_free": 5, "slots_busy": 2, "slots_leased": 1, "sessions": 1,
               "counters": {"batches": 1234, "bytes": 3 * 2**20, "worker_restarts": 2},
               "errors": {"protocol": 4}},
    "sessions": [{"id": "abcdef0123", "name": "rank0", "dataset": "train", "epoch": 2,
                  "next": 17, "batches_per_epoch": 40, "rate": 12.5, "credit": 8, "queued": 3,
                  "leased": 1, "bytes": 2**20, "idle_s": 0.3}],
}


def test_stats_table_reads_plainly() -> None:
    lines = render(REPORT)
    assert lines[0] == ("batchfeed 9.9 at tcp://h:1, up 1h02m | 1 session, 3 workers | slots: "
                        "5 free, 2 busy, 1 leased of 8 | sent 1,234 batches (prefetch "
                        "included), 3.0 MiB | 2 worker restarts | errors: protocol 4")
    assert lines[2].split() == ["abcdef01", "rank0", "train", "2", "17/40", "12.5", "8", "3",
                                "1", "1.0", "MiB", "0.3"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stats_redraws_in_place_on_a_terminal_only() -> None:
    tty, pipe = FakeTerminal(), io.StringIO()
    for out in (tty, pipe):
        screen = _Screen(out)
        screen.show(["a", "b"])
        screen.show(["c", "d"])
    assert tty.getvalue() == "\x1b[Ja\nb\n\x1b[2F\x1b[Jc\nd\n"
    assert pipe.getvalue() == "a\nb\n\nc\nd\n"


def test_stats_shows_where_the_trainer_is_within_a_second(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(20_000), "--workers", 1)
    with Client(srv.address, batch_size=10, shuffle="none", name="slow") as client:
        it = client.epoch(0)
        for _ in range(37):
            next(it)
        deadline = time.monotonic() + 1.5
        while True:  # the trainer rests: its position must show without more REQUESTs
            (session,) = server_report(srv.address)["sessions"]
            if (session["epoch"], session["next"]) == (0, 37) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (session["epoch"], session["next"]) == (0, 37)
        assert session["batches"] >= 37  # "sent" counts what was prefetched too
