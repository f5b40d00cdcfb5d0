"""Fixtures: real server processes on ephemeral ports, datasets on disk, leak checks.

Every server a test starts is stopped by its fixture, and every test checks afterwards that no
batchfeed segment was left in /dev/shm and no server process is still running.  Tests wait for
what they expect with ``wait_until`` (bounded), not with a fixed sleep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from batchfeed import launch
from batchfeed.launch import ServerProcess
from batchfeed.shared.procs import (  # noqa: F401 - the tests import these from here
    children,
    pid_alive,
    private_pss_bytes,
    pss_bytes,
)

SHM = Path("/dev/shm")


def shm_segments() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("bf_")}


def mapped_segments(pid: int) -> dict[str, int]:
    """Segment name -> size of the batchfeed segments process ``pid`` maps (a server's data
    segments are mapped but have no name left in /dev/shm once loaded)."""
    out = {}
    for entry in Path(f"/proc/{pid}/map_files").iterdir():
        try:
            target = os.readlink(entry)
            size = os.stat(entry).st_size
        except OSError:
            continue
        name = target.removeprefix("/dev/shm/").removesuffix(" (deleted)")
        if target.startswith("/dev/shm/bf_"):
            out[name] = size
    return out


def leaked_segments(before: set[str]) -> set[str]:
    """New segments whose creating server is gone (those of live servers are still in use)."""
    return {name for name in shm_segments() - before
            if not pid_alive(int(name.split("_")[1]))}


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               what: str = "the condition", detail: Callable[[], object] | None = None) -> object:
    """Poll ``predicate`` until it returns something true, and return that; after ``timeout``
    seconds fail, naming ``what`` was awaited (and ``detail()``, the state things were in)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            state = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{state}")
        time.sleep(interval)


def make_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A dataset whose every field is a known function of the row id."""
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return {
        "id": ids,
        "x": (ids[:, None] * np.array([1.0, -0.5, 0.25], np.float32)).astype(np.float32),
        "img": rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8),
        "flag": (ids % 3 == 0),
    }


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = shm_segments()
    yield
    deadline = time.monotonic() + 5
    while leaked_segments(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = leaked_segments(before)
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"


@pytest.fixture
def dataset_path(tmp_path: Path) -> Callable[..., Path]:
    """Write a dataset (default: make_rows(n)) as .npz and return its path."""

    def write(n: int = 1003, arrays: dict | None = None, name: str = "data.npz") -> Path:
        path = tmp_path / name
        np.savez(path, **(arrays if arrays is not None else make_rows(n)))
        return path

    return write


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``batchfeed serve`` with the given arguments; stopped (and checked) at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, bind: str = "tcp://127.0.0.1:0", **kw: object) -> ServerProcess:
        srv = ServerProcess([str(a) for a in args], bind=bind, **kw)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        check_stopped(srv, srv.stop())


INTERNAL = ("internal error", "Traceback")  # in a server's log: a bug, whatever the test did


def check_stopped(srv: ServerProcess, code: int | None) -> None:
    """A server a test started exited 0 and never logged an internal error or a traceback."""
    output = "\n".join(srv.output)
    assert code == 0, f"server exited with {code}:\n{output}"
    bad = [line for line in srv.output if any(word in line for word in INTERNAL)]
    assert not bad, f"the server logged an internal error:\n{output}"


def shared_server(tmp_path_factory: pytest.TempPathFactory, *args: object, n: int = 1003,
                  arrays: dict | None = None) -> Iterator[ServerProcess]:
    """Body of a module-scoped fixture: one server of ``arrays`` (default ``make_rows(n)``)
    for a module's tests
    that only read from it, as trainers share a long-running server (sessions of earlier tests
    must cost later ones nothing).  Stopped at the module's end, then checked: exit code 0
    and none of its segments left."""
    path = tmp_path_factory.mktemp("shared") / "data.npz"
    np.savez(path, **(arrays if arrays is not None else make_rows(n)))
    srv = ServerProcess(["--data", str(path), *map(str, args)],
                        bind="tcp://127.0.0.1:0").start()
    try:
        yield srv
    finally:
        code = srv.stop()
    check_stopped(srv, code)
    left = {name for name in shm_segments() if name.split("_")[1] == str(srv.pid)}
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


@pytest.fixture
def ipc_address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/bf.sock"


def server_report(address: str, timeout_ms: int = 5000) -> dict:
    """The server's STATS report: {"server": {...}, "sessions": [...]}."""
    return launch.server_report(address, timeout_ms / 1000)


def socket_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: object, timeout: float = 90.0) -> tuple[int, str, str]:
    """Run ``examples/<script>``; returns (exit code, stdout, stderr).  Killed on a timeout."""
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    return proc.returncode, out, err
