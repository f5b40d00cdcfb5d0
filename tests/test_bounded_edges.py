"""Bounded edges (issue 20, availability): what an idle, hostile or careless peer costs.

- The metrics endpoint: idle or slow HTTP peers cost no thread and little memory, a peer past
  its deadline or its header budget is cut, and a real scrape is answered meanwhile.
- ``batchfeed stats`` / ``batchfeed probe``: server-supplied strings are shown escaped, and a
  malformed REPORT is one line naming what was wrong, never a traceback.
- Images: a decompression bomb (a forged JPEG header, a single-colour PNG) or a very large
  photo is refused from its header, before a pixel is decoded: in milliseconds, for a few MB.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import children, free_port, pss_bytes, wait_until
from prometheus_client.parser import text_string_to_metric_families

from batchfeed import Client, WorkerError
from batchfeed.shared import protocol
from batchfeed.shared.procs import process_tree

MiB = 2**20


# ---------------------------------------------------------------------------------------------
# Helpers


def proc_status(pid: int | str, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM), in bytes; or Threads, as a count."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                value = int(line.split()[1])
                return value if key == "Threads" else value * 1024
    raise AssertionError(f"/proc/{pid}/status has no {key}")


def get(port: int, path: str = "/metrics", headers: dict | None = None,
        timeout: float = 5.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


def samples(body: bytes) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(body.decode())
            for s in family.samples if not s.labels}


def closed_by_peer(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``timeout`` s; None if still open."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got
    except TimeoutError:
        return None


class FakeFrontend:
    """What SnapshotCollector reads: a Frontend's snapshot."""

    snapshot = {
        "version": "0", "address": "tcp://x:1", "uptime_s": 10.0, "datasets": "d",
        "workers": 1, "worker_pids": [1], "slots": 4, "slots_free": 4, "slots_busy": 0,
        "slots_leased": 0, "sessions": 0, "counters": {"batches": 7}, "errors": {},
        "worker_busy_s": {"0": 1.0}, "session_list": [],
    }


@pytest.fixture
def endpoint() -> Iterator[Callable[..., object]]:
    """An in-process MetricsEndpoint over a fake front end with the given limits; closed at the
    end."""
    from batchfeed.server.metrics_http import MetricsEndpoint, MetricsLimits

    opened = []

    def start(**limits: object) -> MetricsEndpoint:
        ep = MetricsEndpoint(FakeFrontend(), 0, limits=MetricsLimits(**limits)).start()
        opened.append(ep)
        return ep

    yield start
    for ep in opened:
        ep.close()


# ---------------------------------------------------------------------------------------------
# 1. The metrics endpoint


HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no blank line: never complete
IDLE = 800


def test_800_idle_metrics_connections_cost_no_thread_and_a_scrape_is_answered(serve) -> None:
    port = free_port()
    srv = serve("--synthetic-rows", 2_000, "--workers", 1, "--metrics-port", port)
    wait_until(lambda: samples(get(port)[2]).get("batchfeed_workers") == 1, what="metrics")
    threads, rss = proc_status(srv.pid, "Threads"), proc_status(srv.pid, "VmRSS")
    idle = []
    try:
        for _ in range(IDLE):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(HALF_SENT)
            idle.append(sock)
        t0 = time.monotonic()
        status, _, body = get(port)
        scrape_s = time.monotonic() - t0
        assert status == 200 and samples(body)["batchfeed_workers"] == 1
        grown = proc_status(srv.pid, "Threads") - threads
        rss_grown = proc_status(srv.pid, "VmRSS") - rss
        print(f"\n{IDLE} idle connections: +{grown} threads, +{rss_grown / MiB:.1f} MiB RSS, "
              f"a scrape answered in {scrape_s * 1000:.0f} ms")
        assert grown <= 2, f"{IDLE} idle HTTP connections made {grown} more threads"
        assert rss_grown < 16 * MiB
        assert scrape_s < 2.0
    finally:
        for sock in idle:
            sock.close()


def test_an_idle_or_trickling_request_is_cut_at_its_deadline(endpoint) -> None:
    ep = endpoint(request_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", ep.port), timeout=5) as trickle:
        t0 = time.monotonic()
        idle.sendall(HALF_SENT)
        cut = None
        for byte in HALF_SENT * 4:  # a byte every 50 ms: each read is prompt, the whole is not
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                cut = b""
            cut = cut if cut is not None else closed_by_peer(trickle, 0.05)
            if cut is not None:
                break
        trickle_s = time.monotonic() - t0
        answer = closed_by_peer(idle, 2)
    assert cut is not None, "a request trickling in was never cut"
    assert 0.4 < trickle_s < 3.0, trickle_s
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert get(ep.port)[0] == 200


def test_a_request_head_over_its_budget_is_refused(endpoint) -> None:
    ep = endpoint()
    with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Junk: " + b"a" * 20_000)
        answer = closed_by_peer(sock, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        answer = closed_by_peer(sock, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 400 ")


def test_past_the_connection_cap_the_oldest_idle_peer_goes_and_a_scrape_is_answered(
        endpoint) -> None:
    ep = endpoint(max_connections=4)
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", ep.port), timeout=5) for _ in range(12)]
    try:
        for sock in idle:
            sock.sendall(HALF_SENT)
        status, _, body = get(ep.port)
        assert status == 200 and samples(body)["batchfeed_batches_served_total"] == 7
        assert threading.active_count() == threads  # the endpoint's one thread, still
        # 12 idle peers and the scrape through 4 places: the 9 oldest made room
        assert all(closed_by_peer(sock, 2) is not None for sock in idle[:9])
    finally:
        for sock in idle:
            sock.close()


def test_the_exposition_is_prometheus_clients_negotiated_and_compressed(endpoint) -> None:
    ep = endpoint()
    status, headers, body = get(ep.port)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert headers["Connection"] == "close"
    status, headers, body = get(ep.port, headers={
        "Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert gzip.decompress(body).rstrip().endswith(b"# EOF")
    with pytest.raises(urllib.error.HTTPError, match="405"):  # prometheus_client's answer
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{ep.port}/metrics", data=b"x", method="POST"), timeout=5)


def test_the_endpoint_closes_every_connection_it_holds(endpoint) -> None:
    ep = endpoint()
    idle = socket.create_connection(("127.0.0.1", ep.port), timeout=5)
    idle.sendall(HALF_SENT)
    get(ep.port)  # the idle one has been accepted by now
    ep.close()
    ep.close()  # twice is fine
    assert closed_by_peer(idle, 2) is not None
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ep.port), timeout=1).close()


# ---------------------------------------------------------------------------------------------
# 2 and 3. What stats and probe print of what a server says


EVIL = "\x1b[2J\x1b[H evil"


def report(**server_changes: object) -> dict:
    server = {"version": "9.9", "address": "tcp://h:1", "uptime_s": 12.5, "workers": 2,
              "slots": 8, "slots_free": 8, "slots_busy": 0, "slots_leased": 0, "sessions": 1,
              "counters": {"batches": 3, "bytes": 100}, "errors": {}}
    server.update(server_changes)
    session = {"id": "s1", "name": "rank0", "dataset": "train", "epoch": 0, "next": 1,
               "batches_per_epoch": 4, "rate": 1.5, "credit": 8, "queued": 0, "leased": 0,
               "bytes": 10, "idle_s": 0.1}
    return {"server": server, "sessions": [session]}


class FakeServer:
    """A ZeroMQ ROUTER in a thread that answers every message with ``reply`` (frames)."""

    def __init__(self, reply: list) -> None:
        self.reply = reply
        self.address = ""
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "the fake server did not start"

    def _run(self) -> None:
        with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
            sock.linger = 0
            self.address = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
            self._ready.set()
            while not self._stop.is_set():
                if sock.poll(50):
                    route = sock.recv_multipart()[0]
                    sock.send_multipart([route, *self.reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def fake_server() -> Iterator[Callable[[list], FakeServer]]:
    started: list[FakeServer] = []

    def start(reply: list) -> FakeServer:
        started.append(FakeServer(reply))
        return started[-1]

    yield start
    for srv in started:
        srv.close()


def batchfeed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchfeed", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_client_name_with_terminal_escapes_is_shown_escaped_by_stats(serve) -> None:
    srv = serve("--synthetic-rows", 2_000, "--workers", 1)
    with Client(srv.address, batch_size=100, seed=0, name=EVIL) as c:
        it = c.epoch(0)
        next(it)
        out = batchfeed("stats", srv.address, "--once")
        it.close()
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    assert r"\x1b[2J\x1b[H evil" in out.stdout.splitlines()[2]


def test_every_server_supplied_string_is_escaped_in_stats_and_probe(fake_server,
                                                                    capsys) -> None:
    from batchfeed import probe
    from batchfeed.stats import StatsOptions, run

    evil = report(version=EVIL, address="tcp://\x07h:1\u202e", errors={EVIL: 1})
    evil["sessions"][0].update(id="\x1bs1", name=EVIL, dataset="\x9b2J\u2028")
    srv = fake_server(protocol.encode(protocol.REPORT, **evil))
    out = io.StringIO()
    assert run(StatsOptions(srv.address, once=True), out) == 0
    text = out.getvalue()
    assert not [c for c in text if not c.isprintable() and c != "\n"], repr(text)
    assert text.startswith(r"batchfeed \x1b[2J\x1b[H evil at tcp://\x07h:1\u202e, up 0m12s")
    assert r"errors: \x1b[2J\x1b[H evil 1" in text
    row = text.splitlines()[2].split()
    assert row[:4] == [r"\x1bs1", r"\x1b[2J\x1b[H", "evil", r"\x9b2J\u2028"], row

    wrong = fake_server(protocol.error("worker", f"{EVIL}\nSECOND LINE"))
    out = batchfeed("stats", wrong.address, "--once")
    assert out.returncode == 2 and "\x1b" not in out.stderr
    assert out.stderr == r"batchfeed stats: error: \x1b[2J\x1b[H evil\nSECOND LINE" + "\n"
    assert probe.run(wrong.address, 5) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and r"\x1b[2J\x1b[H evil\n" in err


MALFORMED = {
    "a session that is a list": ({}, [["s1", "rank0"]], r"sessions\[0\] must be a map"),
    "a missing key": ({"uptime_s": None}, None, r"server has no 'uptime_s'"),
    "a string for a number": ({"uptime_s": "long"}, None,
                              r"server\['uptime_s'\] must be a number from 0 to 2\*\*63-1, "
                              r"got 'long'"),
    "an infinite number": ({"uptime_s": float("inf")}, None, r"server\['uptime_s'\].*got inf"),
    "a huge count": ({"workers": 2**64 - 1}, None, r"server\['workers'\] must be a whole"),
    "a list for a map": ({"counters": [1, 2]}, None, r"server\['counters'\] must be a map"),
    "a map of the wrong things": ({"errors": {"protocol": "many"}}, None,
                                  r"server\['errors'\] must map names to whole numbers"),
    "a session without its name key": ({}, [{"id": "s1"}], r"sessions\[0\] has no 'name'"),
}


def malformed_report(server_changes: dict, sessions: list | None) -> dict:
    bad = report(**{k: v for k, v in server_changes.items() if v is not None})
    for key in [k for k, v in server_changes.items() if v is None]:
        del bad["server"][key]
    if sessions is not None:
        bad["sessions"] = sessions
    return bad


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_report_is_one_line_naming_it_and_exit_2_from_stats(fake_server,
                                                                        case: str) -> None:
    server_changes, sessions, words = MALFORMED[case]
    srv = fake_server(protocol.encode(protocol.REPORT,
                                      **malformed_report(server_changes, sessions)))
    out = batchfeed("stats", srv.address, "--once")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"batchfeed stats: error: malformed REPORT from {srv.address}: ")
    assert re.search(words, lines[0]), lines[0]
    assert lines[0].endswith("install the same batchfeed on both sides)")


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_report_fails_the_probe_with_one_line(fake_server, capsys,
                                                          case: str) -> None:
    from batchfeed import probe

    server_changes, sessions, words = MALFORMED[case]
    srv = fake_server(protocol.encode(protocol.REPORT,
                                      **malformed_report(server_changes, sessions)))
    assert probe.run(srv.address, 5) == 1  # the probe's contract: 1, the server is not healthy
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"batchfeed probe: failed: {srv.address}: malformed REPORT")
    assert re.search(words, captured.err), captured.err


def test_a_malformed_report_prints_no_traceback_from_the_probe_command(fake_server) -> None:
    srv = fake_server(protocol.encode(protocol.REPORT,
                                      **malformed_report({"uptime_s": "long"}, None)))
    out = batchfeed("probe", srv.address, "--timeout", "5")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "server['uptime_s'] must be a number" in out.stderr


# ---------------------------------------------------------------------------------------------
# 4. Decompression bombs


Image = pytest.importorskip("PIL.Image", reason="the image tests need Pillow ([images] extra)")


def jpeg_bomb(side: int = 20_000) -> bytes:
    """A 16x16 progressive JPEG (4:4:4) whose frame header says ``side`` x ``side``: libjpeg
    keeps every DCT coefficient of a progressive image (2.4 GB at 20000x20000)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(
        buf, "JPEG", progressive=True, quality=50, subsampling=0)
    data = bytearray(buf.getvalue())
    sof2 = data.index(b"\xff\xc2")  # marker, length (2), precision (1), height, width
    struct.pack_into(">HH", data, sof2 + 5, side, side)
    return bytes(data)


def png_bomb(width: int, height: int, rows: int = 500) -> bytes:
    """A real single-colour 8-bit greyscale PNG (20000x20000: 389 KB for 400 MB of pixels).

    Built in 0.4 s rather than deflating 400 MB: after a full flush zlib starts afresh, so
    every further block of ``rows`` black rows compresses to the same bytes."""
    block = bytes(1 + width) * rows  # each row: filter byte 0, then black pixels
    comp = zlib.compressobj(6)
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    assert again == comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows):
        adler = zlib.adler32(block, adler)
    idat = first + again * (height // rows - 1) + comp.flush()[:-4] + struct.pack(">I", adler)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def test_the_png_bomb_is_a_real_png() -> None:
    img = Image.open(io.BytesIO(png_bomb(700, 1500)))
    assert img.size == (700, 1500) and np.asarray(img).max() == 0


BOMBS = {"jpeg": jpeg_bomb, "png": lambda: png_bomb(20_000, 20_000),
         "photo": lambda: png_bomb(12_000, 12_000)}


@pytest.fixture(scope="module")
def bombs() -> Callable[[str], bytes]:
    """``bombs(kind)``: the bomb's bytes, built once per module."""
    built: dict[str, bytes] = {}
    return lambda kind: built[kind] if kind in built else built.setdefault(kind, BOMBS[kind]())


def cost(fn: Callable[[], object]) -> tuple[float, int, BaseException | None]:
    """Seconds, peak RSS growth (bytes) and the exception of ``fn()`` in this process: the
    peak is reset first (/proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here ({exc})")
    base = proc_status("self", "VmRSS")
    t0 = time.perf_counter()
    error = None
    try:
        fn()
    except Exception as exc:
        error = exc
    return time.perf_counter() - t0, proc_status("self", "VmHWM") - base, error


def crop32(data: bytes, name: str) -> Callable[[], object]:
    from batchfeed.transforms import images

    rng = np.random.default_rng(0)
    return lambda: images.crop_resize(
        data, 32, lambda w, h: images.random_resized_crop_box(w, h, rng), name=name)


@pytest.fixture
def warm() -> None:
    """The decoders imported and used once, so that a measurement counts the image only."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    crop32(buf.getvalue(), "warm.png")()
    crop32(jpeg_bomb(16), "warm.jpg")()


@pytest.mark.parametrize("kind,name,size", [
    ("jpeg", "cat/bomb.jpg", r"is 20000x20000 \(400,000,000 pixels\)"),
    ("png", "cat/bomb.png", r"is 20000x20000 \(400,000,000 pixels\)"),
    ("photo", "cat/big.png", r"is 12000x12000 \(144,000,000 pixels\)"),
])
def test_an_image_over_the_limit_fails_in_a_second_for_a_few_mb(bombs, warm, kind: str,
                                                                  name: str, size: str) -> None:
    from batchfeed.transforms import images

    seconds, grown, error = cost(crop32(bombs(kind), name))
    print(f"\n{name} ({len(bombs(kind)):,} bytes): refused in {seconds * 1000:.1f} ms, "
          f"peak RSS +{grown / MiB:.1f} MiB")
    assert isinstance(error, images.ImageTooLarge), error
    assert isinstance(error, ValueError)
    assert seconds < 1.0 and grown < 8 * MiB
    words = (rf"^{name} {size}.*over the limit of 64,000,000 pixels per image.*resize the image, "
             r"or raise the limit with batchfeed serve --max-image-pixels$")
    assert re.search(words, str(error)), str(error)


def test_without_simplejpeg_the_jpeg_bomb_is_refused_by_pillow_from_its_header(
        bombs, warm, monkeypatch) -> None:
    from batchfeed.transforms import images

    monkeypatch.setattr(images, "_optional", lambda module: None)
    seconds, grown, error = cost(crop32(bombs("jpeg"), "cat/bomb.jpg"))
    assert isinstance(error, images.ImageTooLarge) and "400,000,000 pixels" in str(error)
    assert seconds < 1.0 and grown < 8 * MiB


@contextlib.contextmanager
def max_pixels(n: int) -> Iterator[None]:
    from batchfeed.transforms import images

    before = images.MAX_PIXELS
    images.set_max_pixels(n)
    try:
        yield
    finally:
        images.set_max_pixels(before)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_set_max_pixels_moves_the_limit_for_batchfeed_and_pillow_alike() -> None:
    from batchfeed.transforms import images

    assert images.MAX_PIXELS == images.DEFAULT_MAX_PIXELS == 64_000_000
    images.open_image(png(4, 4))  # Pillow is aligned once batchfeed.transforms.images uses it
    assert 2 * Image.MAX_IMAGE_PIXELS == images.MAX_PIXELS  # Pillow refuses above twice it
    with max_pixels(1_000):
        assert images.crop_resize(png(40, 25), 8, lambda w, h: (0, 0, w, h)).shape == (8, 8, 3)
        with pytest.raises(images.ImageTooLarge, match=r"^big\.png is 40x26 \(1,040 pixels\)"
                                                       r", over the limit of 1,000 pixels"):
            images.crop_resize(png(40, 26), 8, lambda w, h: (0, 0, w, h), name="big.png")
        with pytest.raises(Image.DecompressionBombError):  # Pillow refuses it too
            Image.open(io.BytesIO(png(40, 26)))
    assert images.MAX_PIXELS == 64_000_000 and 2 * Image.MAX_IMAGE_PIXELS == 64_000_000
    for bad in (0, -5, 2.5, True, None):
        with pytest.raises(ValueError, match="must be a positive int"):
            images.set_max_pixels(bad)  # type: ignore[arg-type]


def write_folder_with_a_bomb(root: Path, bomb: bytes) -> list[str]:
    """Three classes of 8 small images each, and the bomb as cat/004_bomb.jpg: the paths in
    the server's order (by class, then file name)."""
    rng = np.random.default_rng(0)
    paths = []
    for cls in ("cat", "dog", "eel"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG" if i % 2 else "PNG")
            name = f"{i:03d}.{'jpg' if i % 2 else 'png'}"
            (root / cls / name).write_bytes(buf.getvalue())
            paths.append(f"{cls}/{name}")
    (root / "cat" / "004_bomb.jpg").write_bytes(bomb)
    return sorted(paths + ["cat/004_bomb.jpg"], key=lambda p: tuple(p.split("/")))


class PeakPss:
    """Samples the PSS of a process tree every 50 ms in a thread; ``peak`` is the largest."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, pss_bytes(process_tree(self.pid)))
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def test_a_bomb_in_a_served_folder_fails_its_batch_only_and_costs_the_server_nothing(
        serve, tmp_path: Path, bombs) -> None:
    root = tmp_path / "images"
    order = write_folder_with_a_bomb(root, bombs("jpeg"))
    batch = 5
    srv = serve("--data", root, "--workers", 2, "--transform",
                "batchfeed.transforms:train_images(size=32)")
    pss = PeakPss(srv.pid)
    served: list[int] = []
    failed: dict[int, str] = {}
    batches = -(-len(order) // batch)
    try:
        with Client(srv.address, batch_size=batch, shuffle="none", seed=0) as client:
            k = 0
            t0 = time.monotonic()
            while k < batches:
                try:
                    for got in client.epoch(0, start_batch=k):
                        assert got["image"].shape[1:] == (3, 32, 32)
                        served.extend(got["label"].tolist())
                        k += 1
                except WorkerError as exc:
                    failed[k] = str(exc)
                    k += 1
            epoch_s = time.monotonic() - t0
        workers_peak = max(proc_status(pid, "VmHWM") for pid in children(srv.pid))
    finally:
        peak = pss.stop()
    bomb_batch = order.index("cat/004_bomb.jpg") // batch
    print(f"\nthe epoch with the bomb: {epoch_s:.2f} s; peak PSS of the server's processes "
          f"{peak / MiB:.0f} MiB; largest worker peak RSS {workers_peak / MiB:.0f} MiB")
    assert list(failed) == [bomb_batch]
    assert "cat/004_bomb.jpg is 20000x20000" in failed[bomb_batch]
    assert "--max-image-pixels" in failed[bomb_batch]
    classes = ("cat", "dog", "eel")
    assert served == [classes.index(p.split("/")[0]) for i, p in enumerate(order)
                      if i // batch != bomb_batch]  # every other batch, in order
    assert 0 < peak < 1024 * MiB and workers_peak < 1024 * MiB
    assert os.path.exists(f"/proc/{srv.pid}")
