"""``batchfeed bench``: a tiny run prints every row and column and writes valid JSON.

No timing assertions: the numbers depend on the machine.  The bench runs in its own process
group so that, whatever happens, the fixture can stop it and everything it started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import pid_alive

from batchfeed.bench import (
    COLUMNS,
    MEMORY_ROWS,
    ROW_CURVE,
    ROW_IPC_FAST,
    ROW_IPC_SOCKET,
    ROW_NAIVE,
    ROW_RAW,
    ROW_STALL,
    ROW_TCP,
    ROW_TORCH0,
    ROW_TORCH2,
    TCP_CLIENTS,
    TOKEN_ROWS,
    BenchOptions,
)

ROWS = [ROW_RAW, ROW_NAIVE, ROW_TORCH0, ROW_TORCH2, ROW_TCP.format(n=1, s=""), ROW_STALL,
        *(ROW_TCP.format(n=n, s="s") for n in TCP_CLIENTS if n > 1),
        ROW_IPC_SOCKET, ROW_IPC_FAST, ROW_CURVE]
RUN_TIMEOUT = 90


class BenchRun:
    """One ``batchfeed bench`` subprocess in its own process group; ``stop`` ends the group."""

    def __init__(self, args: list[str], tmpdir: Path):
        self.args = args
        self.env = {**os.environ, "TMPDIR": str(tmpdir)}
        self.proc: subprocess.Popen | None = None

    def run(self, timeout: float) -> tuple[int, str, str]:
        self.proc = subprocess.Popen([sys.executable, "-m", "batchfeed", "bench", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, start_new_session=True)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        """SIGTERM the group (servers clean up their segments), then SIGKILL what is left."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.communicate(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Callable[..., BenchRun]]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    started: list[BenchRun] = []

    def make(*args: str) -> BenchRun:
        started.append(BenchRun(list(args), tmpdir))
        return started[-1]

    yield make
    for run in started:
        run.stop()


@pytest.mark.slow
def test_quick_tabular_prints_every_row_and_column_and_valid_json(bench, tmp_path) -> None:
    json_path = tmp_path / "bench.json"
    code, out, err = bench("--quick", "--workload", "tabular", "--json",
                           str(json_path)).run(RUN_TIMEOUT)
    assert code == 0, f"bench failed:\n{out}\n{err}"
    lines = out.splitlines()

    assert lines[0].startswith("batchfeed bench ")
    for word in ("cores:", "python", "numpy", "torch", "pyzmq"):
        assert word in lines[0]
    assert "ratios" in lines[1]
    header = next(line for line in lines if line.strip().startswith("row "))
    for column in COLUMNS:
        assert column in header
    for row in ROWS:
        [line] = [line for line in lines if line.strip().startswith(row)]
        assert "failed" not in line, line
        cells = line.strip()[len(row):].split()
        assert line.endswith("not installed") or len(cells) == len(COLUMNS), line
    assert "server PSS / dataset size" in out
    assert "bench took" in out

    data = json.loads(json_path.read_text())
    result = data["workloads"]["tabular"]
    assert [r["name"] for r in result["rows"]] == ROWS
    for r in result["rows"]:
        if r["status"] == "not installed":
            continue
        assert r["status"] == "ok"
        assert r["samples_per_s"] > 0 and r["gb_per_s"] > 0 and r["vs_raw"] > 0
        if r["name"].startswith("batchfeed"):
            assert r["server_pss_over_data"] > 0 and r["first_batch_ms"] is not None
        else:
            assert r["server_pss_over_data"] is None
    assert [e["workers"] for e in data["pss_by_workers"]] == [1, 2, 4]
    assert all(e["status"] == "ok" and e["ring"]["slots"] > 0 for e in data["pss_by_workers"])


@pytest.mark.slow
def test_quick_run_stops_every_server_and_removes_its_data(bench, tmp_path) -> None:
    json_path = tmp_path / "bench.json"
    code, out, err = bench("--quick", "--workload", "image", "--seconds", "0.1",
                           "--json", str(json_path)).run(RUN_TIMEOUT)
    assert code == 0, f"bench failed:\n{out}\n{err}"
    data = json.loads(json_path.read_text())
    pids = [info["pid"] for info in data["workloads"]["image"]["servers"].values()]
    assert len(pids) == 2
    assert not any(pid_alive(pid) for pid in pids)
    assert list((tmp_path / "tmp").iterdir()) == []  # its data, sockets and the servers' dirs


@pytest.mark.slow
def test_quick_tokens_prints_throughput_memory_and_goal_rows(bench, tmp_path) -> None:
    pytest.importorskip("pyarrow", reason="the token rows serve an Arrow file")
    has_torch = importlib.util.find_spec("torch") is not None
    json_path = tmp_path / "bench.json"
    code, out, err = bench("--quick", "--workload", "tokens", "--json",
                           str(json_path)).run(RUN_TIMEOUT)
    assert code == 0, f"bench failed:\n{out}\n{err}"
    for row in TOKEN_ROWS + MEMORY_ROWS:  # a table line each (rows padded to one width)
        lines = [line for line in out.splitlines() if line.strip().startswith(row + "  ")]
        assert len(lines) == 1 and "failed" not in lines[0], (row, out)
    assert out.count("goals:") == 1 and "tokens/s" in out

    tokens = json.loads(json_path.read_text())["tokens"]
    assert [r["name"] for r in tokens["rows"]] == list(TOKEN_ROWS)
    assert [r["name"] for r in tokens["memory"]] == list(MEMORY_ROWS)
    for r in tokens["rows"] + tokens["memory"]:
        if r["name"].startswith("torch") and not has_torch:
            assert r["status"] == "not installed", r
            continue
        assert r["status"] == "ok", r
        assert (r.get("tokens_per_s") or r.get("pss_bytes")) > 0
    for r in tokens["rows"]:
        assert r["status"] != "ok" or r["vs_inprocess"] > 0
    for r in tokens["memory"]:
        assert r["status"] != "ok" or (r["pss_bytes"] > r["arrow_bytes"] > 0 and r["tokens"] > 0)
    assert [g["goal"] for g in tokens["goals"] if g["met"] is None] == (
        [] if has_torch else [g["goal"] for g in tokens["goals"] if "torch" in g["goal"]])
    assert list((tmp_path / "tmp").iterdir()) == []  # the corpora, sockets and servers' dirs


def test_bad_options_are_refused_at_the_edge() -> None:
    with pytest.raises(Exception, match="--workload"):
        BenchOptions(workloads=("video",))
    with pytest.raises(Exception, match="--seconds"):
        BenchOptions(seconds=0)


def test_the_cli_offers_every_workload_and_each_section_is_registered() -> None:
    from batchfeed.bench.run import SECTIONS
    from batchfeed.bench.workloads import WORKLOAD_NAMES
    from batchfeed.cli import BENCH_WORKLOADS

    assert BENCH_WORKLOADS == WORKLOAD_NAMES
    assert set(SECTIONS) <= set(WORKLOAD_NAMES)
