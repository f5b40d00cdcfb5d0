"""The shard section (``--workload shards``): one training job
reading the ``large`` workload from 2 shard servers (``serve --shard I/2``, each holding half of
the rows) against 1 server of all the rows, on this host.

The data is the ``large`` workload's (uint8 images of 150 KiB plus an int64 label), written as
.npy files that every server loads into its shared memory; big enough (1.5 GB, 46 MB with
``--quick``) that a server's PSS is mostly data.  Three server sets, one after the other:

- 1 full server, ``--workers 2`` (the reference);
- 2 shard servers, ``--workers 1`` each (the same number of worker processes);
- 2 shard servers, ``--workers 2`` each (more worker processes than this machine's 2 cores).

Each set is read twice by one ``Client`` in this process (``Client([a, b])`` for the shards),
same batch size, seed and full shuffle, over tcp loopback: through the socket
(``fastpath=False``), then on the same-host fast path (``fastpath=True``: batches are read from
the servers' shared memory, the socket carries only headers).  After each row: every server's
PSS (the client closed first), and a check that the first ``CHECK_BATCHES`` batches of an epoch
are the full server's (digests of every field); a row that differs is failed.  Servers are
stopped by ``servers.running_servers`` (a /dev/shm segment one left behind is a problem of the
run), the data directory removed, in ``finally``.
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchfeed.launch import ServerProcess

from .common import (
    GB,
    MIB,
    ROW_ERRORS,
    Column,
    Goal,
    Row,
    failed_status,
    goal_lines,
    guarded,
    row_table,
)
from .measure import client_epochs, consume, usable_cores
from .servers import running_servers, server_cpu_seconds, server_pss_bytes, stats
from .shards_check import CHECK_EPOCH, BatchCheck
from .workloads import BenchOptions, Workload, save_arrays, workloads

WORKLOAD = "large"
SHARDS = 2
GOAL_PSS_PER_SHARD = 0.55  # each shard server's PSS / the full server's, at most ("about half")
CLIENT_NAME = "bench-shards"


@dataclass(frozen=True)
class ServerSet:
    """Servers of one row pair: one of all the rows (``shards == 0``), or one per shard."""

    name: str
    shards: int
    workers: int  # per server

    def server_args(self, data_dir: str) -> list[list[str]]:
        base = ["--workers", str(self.workers), "--data", data_dir]
        if not self.shards:
            return [base]
        return [[*base, "--shard", f"{i}/{self.shards}"] for i in range(self.shards)]


FULL = ServerSet("1 full server x 2 workers", 0, 2)
SHARDED = ServerSet(f"{SHARDS} shard servers x 1 worker", SHARDS, 1)
SHARDED_MORE = ServerSet(f"{SHARDS} shard servers x 2 workers", SHARDS, 2)
SERVER_SETS = (FULL, SHARDED, SHARDED_MORE)
TCP, FAST = "tcp", "fast path"
TRANSPORTS = ((TCP, False), (FAST, True))  # (name, fastpath); every server binds tcp loopback


def row_name(servers: ServerSet, transport: str) -> str:
    return f"{servers.name}, {transport}"


SHARD_ROWS = tuple(row_name(s, t) for s in SERVER_SETS for t, _ in TRANSPORTS)


# ---------------------------------------------------------------------------------------------
# One row


def _copied_sends(reports: list[dict]) -> int:
    return sum(r["server"]["counters"].get("copied_sends", 0) for r in reports)


def client_row(name: str, which: ServerSet, servers: Sequence[ServerProcess], fastpath: bool,
               w: Workload, options: BenchOptions, check: BatchCheck) -> Row:
    """One ``Client`` in this process over ``servers``: epochs for the measured window, then
    the check; then each server's PSS (once the client has closed and unmapped their rings)."""
    from batchfeed import Client

    addresses = [s.address for s in servers if s.address is not None]
    copied0 = _copied_sends(stats(servers))
    start = time.perf_counter()  # the connect starts with the constructor
    with Client(addresses[0] if len(addresses) == 1 else addresses, batch_size=w.batch_size,
                shuffle="full", seed=options.seed, fastpath=fastpath,
                reconnect_timeout=10.0,  # a lost server fails the row, not the whole run
                name=CLIENT_NAME) as client:
        at_go: list[float] = []

        def ready() -> bool:
            at_go[:] = [client.stats()["wait_s"], server_cpu_seconds(*servers)]
            return True

        batches = client_epochs(client)
        try:
            m = consume(batches, options.warmup, options.seconds, start, ready)
            server_cpu = server_cpu_seconds(*servers) - at_go[1]
        finally:
            batches.close()
        m.wait_fraction = (client.stats()["wait_s"] - at_go[0]) / m.seconds
        reports = stats(servers)
        checked, wrong = check.run(client)
    gc.collect()  # unmap the rings now, so that they count in the servers' PSS only
    pss = [server_pss_bytes(s) for s in servers]
    sessions = [s for r in reports for s in r["sessions"] if s["name"] == CLIENT_NAME]
    granted = (bool(sessions) and all(s["fastpath"] for s in sessions)) if fastpath else None
    gb = m.nbytes / GB
    row = Row(name, rate=m.samples / m.seconds, values={
        "servers": len(servers), "workers_per_server": which.workers,
        "transport": FAST if fastpath else TCP, "samples": m.samples, "seconds": m.seconds,
        "gb_per_s": gb / m.seconds, "client_cpu_s_per_gb": m.cpu_s / gb if gb else None,
        "server_cpu_s_per_gb": server_cpu / gb if gb else None,
        "client_wait_fraction": m.wait_fraction,
        "first_batch_ms": None if m.first_batch_s is None else m.first_batch_s * 1e3,
        "server_pss_bytes": pss, "server_pss_over_data": [p / w.nbytes for p in pss],
        "pss_vs_full": [], "checked_batches": checked, "fastpath_granted": granted,
        "copied_sends": _copied_sends(reports) - copied0})
    if wrong is not None:
        row.status = f"failed: {wrong}"
    return row


def set_rows(which: ServerSet, data_dir: str, w: Workload, options: BenchOptions,
             check: BatchCheck, progress: Callable[[str], None], problems: list[str],
             ) -> list[Row]:
    """Start the set's servers, run its rows (one per transport), stop the servers."""
    names = [row_name(which, t) for t, _ in TRANSPORTS]
    rows: list[Row] = []
    progress(f"shards: starting {which.name}")
    arg_lists = which.server_args(data_dir)
    try:
        with running_servers(arg_lists, ["tcp://127.0.0.1:0"] * len(arg_lists),
                             problems) as servers:
            for name, (_, fastpath) in zip(names, TRANSPORTS):
                progress(f"shards: {name}")
                rows.append(guarded(name, functools.partial(
                    client_row, name, which, servers, fastpath, w, options, check)))
    except ROW_ERRORS as exc:
        done = {r.name for r in rows}
        rows += [Row(n, status=failed_status(exc)) for n in names if n not in done]
    return rows


def add_ratios(rows: list[Row]) -> None:
    """Throughput and each server's PSS relative to the full server's row, same transport."""
    full = {r.values["transport"]: r for r in rows if r.ok and r.values["servers"] == 1}
    for r in rows:
        base = full.get(r.values.get("transport", ""))
        if not r.ok or base is None:
            continue
        if r.rate is not None and base.rate:
            r.ratios["vs_full"] = r.rate / base.rate
        r.values["pss_vs_full"] = [p / base.values["server_pss_bytes"][0]
                                   for p in r.values["server_pss_bytes"]]


# ---------------------------------------------------------------------------------------------
# The section


def goals(rows: list[Row]) -> list[Goal]:
    """Each shard server's PSS about half the full server's (the highest of the shards
    counts); the aggregate speed, for information."""
    table = {r.name: r for r in rows if r.ok}

    def worst(name: str) -> float | None:
        row = table.get(name)
        return max(row.values["pss_vs_full"]) if row and row.values["pss_vs_full"] else None

    def speed(name: str) -> float | None:
        row = table.get(name)
        return None if row is None else row.ratios.get("vs_full")

    return [
        Goal(f"each of {SHARDS} shard servers' PSS <= {GOAL_PSS_PER_SHARD:g}x the full "
             f"server's ({SHARDED.name} vs {FULL.name}, tcp)", worst(row_name(SHARDED, TCP)),
             GOAL_PSS_PER_SHARD, higher_is_better=False,
             beside={"fast path": worst(row_name(SHARDED, FAST)),
                     f"{SHARDED_MORE.name}, tcp": worst(row_name(SHARDED_MORE, TCP))}),
        Goal(f"aggregate samples/s, {SHARDED.name} vs {FULL.name}, tcp (no target)",
             speed(row_name(SHARDED, TCP)),
             beside={"fast path": speed(row_name(SHARDED, FAST)),
                     f"{SHARDED_MORE.name}, tcp": speed(row_name(SHARDED_MORE, TCP)),
                     f"{SHARDED_MORE.name}, fast path": speed(row_name(SHARDED_MORE, FAST))}),
    ]


def shard_section(options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole shard section: the rows of each server set, the goals; a JSON-ready dict."""
    started = time.perf_counter()
    w = workloads(options.quick)[WORKLOAD]
    result: dict[str, Any] = {
        "workload": asdict(w), "description": w.describe(), "data_bytes": w.nbytes,
        "cores": usable_cores(), "load_before": list(os.getloadavg()),
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "rows": [], "goals": [], "problems": []}
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    rows: list[Row] = []
    try:
        progress(f"shards: making {w.describe()}")
        data_dir = save_arrays(w.make_arrays(options.seed), os.path.join(work_dir, "data"))
        gc.collect()
        check = BatchCheck()
        for which in SERVER_SETS:
            rows += set_rows(which, data_dir, w, options, check, progress, result["problems"])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    add_ratios(rows)
    result["rows"] = [asdict(r) for r in rows]
    result["goals"] = [asdict(g) for g in goals(rows)]
    result["load_after"] = list(os.getloadavg())
    result["elapsed_s"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------
# Printing

LEGEND = """\
  One Client in this process per row, reading epoch after epoch; samples/s and GB/s delivered
    into it.  vs full: samples/s relative to the full server's row of the same transport.
  client CPU s/GB: this process's CPU (all threads: the I/O thread, and with shards the merge)
    per GB; server CPU s/GB: every server's and its workers' CPU per GB.  waited: the share
    of the window the consumer waited on data (it does no work, so nearly all: the rate is the
    service's).
  server PSS MiB: each server with its workers, after the row (the client closed first);
    PSS/data: / the whole dataset's bytes; vs full: / the full server's PSS, same transport.
  checked: batches of epoch {epoch} compared with the full server's (digests of every field).
  What the split buys and costs: the {cores} cores here are shared by the client, every server
    and every worker, so the shards add no CPU; what they buy is memory per host (a shard server
    holds its rows only; labels are held whole), which counts when the shards run on different
    hosts.  What they cost: each batch arrives in {shards} pieces (twice the messages, headers
    and requests) and the client merges them into a fresh batch, one copy more; on the fast
    path that copy replaces zero-copy views into the server's ring."""

def _each(values: list | None, spec: str) -> str:
    return " + ".join(format(v, spec) for v in values) if values else "n/a"


COLUMNS = [Column("samples/s", "rate", ",.0f"), Column("GB/s", "gb_per_s", ".3f"),
           Column("vs full", "vs_full", ".2f"),
           Column("client CPU s/GB", "client_cpu_s_per_gb", ".2f"),
           Column("server CPU s/GB", "server_cpu_s_per_gb", ".2f"),
           Column("waited", "client_wait_fraction", ".0%"),
           Column("first batch ms", "first_batch_ms", ".0f"),
           Column("server PSS MiB", cell=lambda r: _each(
               [p / MIB for p in r.values["server_pss_bytes"]], ",.0f")),
           Column("PSS/data", cell=lambda r: _each(r.values["server_pss_over_data"], ".2f")),
           Column("PSS vs full", cell=lambda r: _each(r.values["pss_vs_full"], ".2f")),
           Column("checked", "checked_batches", "d")]


def format_shards(result: dict[str, Any], options: BenchOptions) -> list[str]:
    rows = [Row.from_dict(r) for r in result["rows"]]
    load = ", ".join(f"{v:.2f}" for v in result["load_before"])
    lines = [f"shards: {result['description']}, as .npy files; every server binds tcp "
             f"loopback; {options.seconds:g} s per row after {options.warmup:g} s warm-up; "
             f"started {result['started_at']}, load average {load}"]
    lines += row_table(COLUMNS, rows)
    for r in rows:
        if not r.ok:
            continue
        if r.values["fastpath_granted"] is False:
            lines.append(f"  {r.name}: the fast path was not granted; batches came through "
                         "the socket")
        if r.values["copied_sends"]:
            lines.append(f"  {r.name}: {r.values['copied_sends']} sends were copied (the "
                         "servers' lease budget was spent)")
    more = SHARDED_MORE.shards * SHARDED_MORE.workers
    lines.append(f"  {SHARDED_MORE.name}: {more} worker processes on {result['cores']} cores")
    lines += goal_lines(result["goals"])
    lines += [f"  problem: {p}" for p in result["problems"]]
    return lines + [LEGEND.format(epoch=CHECK_EPOCH, cores=result["cores"], shards=SHARDS)]
