"""The benchmark (``benchmarks/``, ``python -m benchmarks``): a quick run of each section prints
every row, its peers measured or skipped with an install hint, and writes valid JSON; the bench
holds no code in the package, and its pieces (rows, guards, ratios, goals) behave.

No timing assertions: the numbers depend on the machine.  Every bench run is a subprocess in
its own process group, so that, whatever happens, the fixture stops it and everything it
started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import pid_alive

import batchfeed

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ sits beside the package, at the repository's root
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    common,
    inprocess,
    jpeg,
    loaders,
    peers,
    ray_bench,
    served,
    shard_servers,
    stalls,
)
from benchmarks import tokens as token_section  # noqa: E402
from benchmarks.workloads import WORKLOAD_NAMES, BenchOptions  # noqa: E402

RUN_TIMEOUT = 110
TABULAR_ROWS = [inprocess.ROW_RAW, inprocess.ROW_NAIVE, *inprocess.TORCH_ROWS, *peers.PEER_ROWS,
                served.ROW_TCP.format(n=1, s=""), served.ROW_STALL,
                *(served.ROW_TCP.format(n=n, s="s") for n in served.TCP_CLIENTS if n > 1),
                served.ROW_IPC_SOCKET, served.ROW_IPC_FAST, served.ROW_CURVE]


class BenchRun:
    """One ``python -m benchmarks`` subprocess in its own process group; ``stop`` ends the
    group."""

    def __init__(self, args: list[str], tmpdir: Path):
        self.args = args
        self.env = {**os.environ, "TMPDIR": str(tmpdir)}
        self.proc: subprocess.Popen | None = None

    def run(self, timeout: float) -> tuple[int, str, str]:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=ROOT, start_new_session=True)
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
    """Bench runs with their own TMPDIR, short enough for the ipc:// socket paths under it
    (a Unix socket's path has at most 107 bytes; pytest's tmp_path can be longer)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    (tmp_path / "tmp").symlink_to(tmpdir)
    started: list[BenchRun] = []

    def make(*args: str) -> BenchRun:
        started.append(BenchRun(list(args), tmpdir))
        return started[-1]

    try:
        yield make
    finally:
        for run in started:
            run.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)


def quick(bench: Callable[..., BenchRun], tmp_path: Path, workload: str,
          *extra: str) -> tuple[str, dict]:
    """A quick run of one section that exits 0, left nothing in its TMPDIR; (output, JSON)."""
    json_path = tmp_path / "bench.json"
    code, out, err = bench("--quick", "--workload", workload, "--json", str(json_path),
                           *extra).run(RUN_TIMEOUT)
    assert code == 0, f"bench failed:\n{out}\n{err}"
    assert list((tmp_path / "tmp").iterdir()) == []  # its data, sockets and the servers' dirs
    assert "bench took" in out
    return out, json.loads(json_path.read_text())


def table_line(out: str, row: str) -> str:
    [line] = [line for line in out.splitlines() if line.strip().startswith(row + "  ")]
    return line


def assert_measured_or_skipped_with_hint(rows: list[dict]) -> None:
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
        if r["status"].startswith("skipped"):
            assert "install" in r["status"], r  # says how to get it
        else:
            assert r["rate"] > 0, r


@pytest.mark.slow
def test_quick_tabular_has_every_loader_and_peer_with_its_setup_and_the_goal(bench,
                                                                             tmp_path) -> None:
    out, data = quick(bench, tmp_path, "tabular")
    lines = out.splitlines()
    assert lines[0].startswith("batchfeed bench ") and "cores:" in lines[0]
    assert lines[1].startswith("peers: torch ") and "torchdata" in lines[1] and "spdl" in lines[1]
    header = next(line for line in lines if line.strip().startswith("row "))
    for column in loaders.COLUMNS:
        assert column.title in header
    for row in TABULAR_ROWS:
        line = table_line(out, row)
        assert "failed" not in line, line
    result = data["workloads"]["tabular"]
    assert [r["name"] for r in result["rows"]] == TABULAR_ROWS
    assert_measured_or_skipped_with_hint(result["rows"])
    for r in result["rows"]:  # each torch and peer row says how it was set up
        if r["status"] == "ok" and (r["name"].startswith(("torch", "torchdata", "SPDL"))):
            assert r["setup"] and f"  {r['name']}: {r['setup']}" in out
    best = result["best_torch"]
    assert best in inprocess.TORCH_ROWS and f"the best torch setup is '{best}'" in out
    [goal] = result["goals"]
    assert "1.5x torch DataLoader batched, workers=0" in goal["goal"]
    assert goal["measured"] > 0 and goal["met"] in (True, False)
    assert "server PSS / dataset size" in out
    assert [e["workers"] for e in data["pss_by_workers"]] == [1, 2, 4]


@pytest.mark.slow
def test_quick_image_stops_every_server_and_scales_the_transform(bench, tmp_path) -> None:
    out, data = quick(bench, tmp_path, "image", "--seconds", "0.1")
    pids = [info["pid"] for info in data["workloads"]["image"]["servers"].values()]
    assert len(pids) == 2 and not any(pid_alive(pid) for pid in pids)
    assert data["workloads"]["image"]["goals"] == []  # the tcp goal is the tabular job's
    names = [r["name"] for r in data["transform_scaling"]]
    assert names == ["transform augment, 1 worker", "transform augment, 2 workers"]
    assert data["transform_scaling"][1]["ratios"]["vs_one_worker"] > 0


@pytest.mark.slow
def test_quick_tokens_prints_throughput_memory_and_goal_rows(bench, tmp_path) -> None:
    pytest.importorskip("pyarrow", reason="the token rows serve an Arrow file")
    out, data = quick(bench, tmp_path, "tokens")
    for row in token_section.TOKEN_ROWS + token_section.MEMORY_ROWS:
        assert "failed" not in table_line(out, row)
    tokens = data["tokens"]
    assert [r["name"] for r in tokens["rows"]] == list(token_section.TOKEN_ROWS)
    assert [r["name"] for r in tokens["memory"]] == list(token_section.MEMORY_ROWS)
    assert_measured_or_skipped_with_hint(tokens["rows"])
    for r in tokens["memory"]:
        assert r["status"] != "ok" or (r["values"]["pss_bytes"] > r["values"]["arrow_bytes"] > 0
                                       and r["values"]["tokens"] > 0)
    assert len(tokens["goals"]) == 3 and out.count("goals:") == 1


@pytest.mark.slow
def test_quick_jpeg_has_batchfeed_torch_and_spdl_rows_per_set(bench, tmp_path) -> None:
    pytest.importorskip("PIL", reason="the JPEG section writes its folders with Pillow")
    out, data = quick(bench, tmp_path, "jpeg")
    rows = data["jpeg"]["rows"]
    assert [r["name"] for r in rows] == list(jpeg.JPEG_ROWS) * 2  # both sets
    assert_measured_or_skipped_with_hint(rows)
    spdl = [r for r in rows if r["name"].startswith("SPDL")]
    for r in spdl:
        assert r["status"] != "ok" or r["ratios"]["vs_tcp"] > 0
    assert "vs bf tcp" in out and len(data["jpeg"]["goals"]) == 6
    assert data["jpeg"]["problems"] == []


@pytest.mark.slow
def test_quick_shards_checks_every_row_against_the_full_server(bench, tmp_path) -> None:
    out, data = quick(bench, tmp_path, "shards")
    rows = data["shards"]["rows"]
    assert [r["name"] for r in rows] == list(shard_servers.SHARD_ROWS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["values"]["checked_batches"] > 0 and len(r["values"]["pss_vs_full"]) in (1, 2)
    assert data["shards"]["goals"][0]["measured"] > 0


@pytest.mark.slow
def test_quick_stalls_prints_a_row_per_dataset_and_transport(bench, tmp_path) -> None:
    out, data = quick(bench, tmp_path, "stalls")
    rows = data["epoch_stalls"]
    assert len(rows) == len(stalls.CASES) * len(stalls.TRANSPORTS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["values"]["first_median_ms"] >= 0
        assert r["name"] in out


@pytest.mark.slow
def test_quick_fingerprint_prints_its_cost_per_gb(bench, tmp_path) -> None:
    out, data = quick(bench, tmp_path, "fingerprint")
    rows = {r["name"]: r for r in data["fingerprint"]["rows"]}
    assert set(rows) == {"read every byte", "fingerprint full", "fingerprint sampled"}
    assert all(r["status"] == "ok" and r["rate"] > 0 for r in rows.values())
    assert rows["fingerprint full"]["values"]["fingerprint"].startswith("full:")
    assert "s/GB" in out


@pytest.mark.slow
def test_quick_ray_has_ray_data_and_batchfeed_on_ray_rows_per_job(bench, tmp_path) -> None:
    out, data = quick(bench, tmp_path, "ray")
    rows = data["ray"]["rows"]
    assert [r["name"] for r in rows] == [*ray_bench.TABULAR_ROWS, *ray_bench.JPEG_ROWS]
    assert_measured_or_skipped_with_hint(rows)
    if all(r["status"] == "ok" for r in rows):  # Ray is installed: the goals were measured
        assert [g["measured"] > 0 for g in data["ray"]["goals"]] == [True, True]
        assert "vs Ray Data" in out and "not a full shuffle" in out
    assert data["ray"]["problems"] == []


def test_a_trainer_is_not_stalled_at_epoch_boundaries(serve, dataset_path) -> None:
    tiny = stalls.CASES[0]  # many short epochs, with the server-chosen prefetch
    srv = serve("--data", f"{tiny.name}={dataset_path(tiny.rows)}", "--workers", 1)
    row = stalls.measure_stalls(srv.address, tiny, "tcp", False, epochs=10)
    assert row.values["prefetch"] > row.values["batches_per_epoch"]
    assert row.values["first_median_ms"] < 10, row


def test_the_package_holds_no_benchmark_and_no_bench_module_is_long() -> None:
    package = Path(batchfeed.__file__).parent
    assert not (package / "bench").exists()
    assert not any("bench" in p.name for p in package.rglob("*.py"))
    lengths = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "benchmarks").glob("*.py")}
    assert max(lengths.values()) <= 400, lengths
    assert "decoders.py" not in lengths  # the decoder study is retired (docs/data.md)


def test_batchfeed_bench_forwards_to_python_m_benchmarks() -> None:
    out = subprocess.run([sys.executable, "-m", "batchfeed", "bench", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "python -m benchmarks" in out.stdout and "--workload" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "batchfeed", "bench", "--workload", "video"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'video'" in bad.stderr


def test_bad_options_are_refused_at_the_edge() -> None:
    with pytest.raises(Exception, match="--workload"):
        BenchOptions(workloads=("video",))
    with pytest.raises(Exception, match="--seconds"):
        BenchOptions(seconds=0)
    assert set(WORKLOAD_NAMES) >= {"tabular", "tokens", "jpeg", "shards", "stalls"}


def test_a_missing_peer_is_a_skipped_row_with_its_install_hint(monkeypatch) -> None:
    import numpy as np

    monkeypatch.setattr(peers, "importable", lambda module: False)
    arrays = {"x": np.zeros((10, 2), np.float32)}
    plans = peers.tabular_plans(arrays, 4, 0)
    assert [p.name for p in plans] == list(peers.PEER_ROWS)
    assert [p.missing for p in plans] == [peers.TORCHDATA_HINT, peers.SPDL_HINT]
    row = common.Row.skipped(plans[1].name, plans[1].missing or "")
    assert row.status == "skipped: not installed: pip install spdl==0.8.0" and not row.failed


def test_rows_guards_ratios_and_goals_share_one_meaning() -> None:
    def broken() -> common.Row:
        raise common.BenchError("the server went away\nsecond line")

    failed = common.guarded("x", broken, set="64px")
    assert failed.failed and failed.status == "failed: the server went away"
    assert failed.values == {"set": "64px"}
    rows = [common.Row("a", rate=2.0), common.Row("b", rate=8.0), failed]
    common.add_ratio(rows, "vs_a", rows[0])
    assert rows[1].ratios == {"vs_a": 4.0} and failed.ratios == {}
    assert common.fastest(rows, ["a", "b", "x"]) is rows[1]
    assert common.ratio(rows, "b", "a") == 4.0 and common.ratio(rows, "x", "a") is None
    assert common.Goal("g", 1.6, 1.5).line() == "g: 1.60x, met"
    assert common.Goal("g", 1.3, 1.2, higher_is_better=False).met is False
    assert common.Goal("g", None, 1.5).line() == "g: not measured"
    table = common.row_table([common.Column("r", "rate", ".1f"),
                              common.Column("vs a", "vs_a", ".2f")], rows)
    assert table[2].split() == ["b", "8.0", "4.00"] and table[3].endswith("failed: the server "
                                                                          "went away")
