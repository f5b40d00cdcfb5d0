"""The loaders section: per workload (tabular, image, large: same data, full shuffle), every
in-process loader (``inprocess``: the raw copy limit, a naive loop, torch's DataLoader
per-sample and batched, the peers) and then batchfeed against real servers (``served``), in
one table; then, once per run, the server-side transform (image) and the server's memory by
workers (tabular).

Ratios: ``vs raw`` (the copy limit) and ``vs best torch`` (the fastest of torch's DataLoader
setups in this run, not the slowest).  The headline line names the best torch setup and the
best peer.  The goal: batchfeed over tcp (1 client) at least ``GOAL_TCP_VS_BATCHED0`` times
torch's batched DataLoader with ``num_workers=0`` on the tabular job, from the same run.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .common import (
    MIB,
    Column,
    Goal,
    Row,
    add_ratio,
    by_name,
    fastest,
    fmt,
    goal_lines,
    ratio,
    row_table,
    setup_lines,
)
from .inprocess import ROW_BATCHED0, ROW_RAW, TORCH_ROWS, in_process_rows
from .peers import PEER_ROWS
from .pool import ClientPool
from .served import ROW_IPC_FAST, ROW_STALL, ROW_TCP, TRANSFORM, server_rows
from .servers import RingInfo
from .workloads import BenchOptions, Workload, save_arrays

GOAL_TCP_VS_BATCHED0 = 1.5
ROW_TCP1 = ROW_TCP.format(n=1, s="")

COLUMNS = [Column("samples/s", "rate", ",.0f"), Column("GB/s", "gb_per_s", ".3f"),
           Column("vs raw", "vs_raw", ".3f"), Column("vs best torch", "vs_best_torch", ".2f"),
           Column("client CPU s/GB", "client_cpu_s_per_gb", ".2f"),
           Column("first batch ms", "first_batch_ms", ".0f"),
           Column("server PSS/data", "server_pss_over_data", ".2f")]

LEGEND = """\
  samples/s and GB/s: delivered into the consuming process(es), summed over clients.
  vs raw / vs best torch: samples/s relative to the raw copy and to the fastest torch
    DataLoader row of this run (per-sample or batched, 0 or 2 workers).
  client CPU s/GB: CPU seconds of the consuming process(es) (all threads, summed over clients)
    per GB delivered; torch's worker processes, like batchfeed's server, are not counted.
  first batch ms: batchfeed: Client() constructor start to first batch (slowest client);
    torch and the peers: iter() to first batch; raw and naive: n/a.
  server PSS/data: Pss of the server and all its children / dataset bytes, after the row.
  batchfeed servers run --workers {workers}."""


def run_workload(w: Workload, options: BenchOptions, pool: ClientPool,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """One workload's table: its data made, the in-process rows, the batchfeed rows."""
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    problems: list[str] = []
    try:
        progress(f"{w.name}: making {w.describe()}")
        arrays = w.make_arrays(options.seed)
        data_dir = None
        if not w.synthetic:
            data_dir = save_arrays(arrays, os.path.join(work_dir, "data"))
        rows = in_process_rows(w, arrays, options, progress)
        del arrays
        gc.collect()
        more, servers = server_rows(w, data_dir, work_dir, options, pool, progress, problems)
        rows += more
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    best_torch = fastest(rows, TORCH_ROWS)
    add_ratio(rows, "vs_raw", by_name(rows).get(ROW_RAW))
    add_ratio(rows, "vs_best_torch", best_torch)
    return {"workload": asdict(w), "dataset_bytes": w.nbytes, "description": w.describe(),
            "servers": servers, "rows": [asdict(r) for r in rows], "problems": problems,
            "best_torch": best_torch.name if best_torch else None,
            "goals": [asdict(g) for g in goals(w, rows)]}


def goals(w: Workload, rows: list[Row]) -> list[Goal]:
    if w.name != "tabular":
        return []
    best_torch, best_peer = fastest(rows, TORCH_ROWS), fastest(rows, PEER_ROWS)
    beside: dict[str, float | None] = {}
    if best_torch is not None:
        beside[f"vs {best_torch.name}"] = ratio(rows, ROW_TCP1, best_torch.name)
    if best_peer is not None:
        beside[f"vs {best_peer.name}"] = ratio(rows, ROW_TCP1, best_peer.name)
    return [Goal(f"tabular: {ROW_TCP1} >= {GOAL_TCP_VS_BATCHED0:g}x {ROW_BATCHED0}",
                 ratio(rows, ROW_TCP1, ROW_BATCHED0), GOAL_TCP_VS_BATCHED0, beside=beside)]


def headline(rows: list[Row]) -> list[str]:
    """batchfeed against the best torch setup and the best peer of this run."""
    best_torch, best_peer = fastest(rows, TORCH_ROWS), fastest(rows, PEER_ROWS)
    lines = []
    if best_torch is not None:
        lines.append(f"  headline: the best torch setup is '{best_torch.name}'; batchfeed tcp "
                     f"(1 client) {fmt(ratio(rows, ROW_TCP1, best_torch.name), '.2f')}x it, "
                     f"the fast path {fmt(ratio(rows, ROW_IPC_FAST, best_torch.name), '.2f')}x")
    if best_peer is not None:
        lines.append(f"  the fastest peer, '{best_peer.name}', runs at "
                     f"{fmt(ratio(rows, best_peer.name, ROW_TCP1), '.2f')}x batchfeed tcp "
                     f"(1 client)")
    return lines


def format_workload(result: dict, options: BenchOptions) -> list[str]:
    rows = [Row.from_dict(r) for r in result["rows"]]
    lines = [f"{result['workload']['name']}: {result['description']}; "
             f"{options.seconds:g} s per row after {options.warmup:g} s warm-up"]
    for kind, info in result["servers"].items():
        lines.append(f"  {kind} server: {RingInfo(**info['ring']).describe()}")
    lines += row_table(COLUMNS, rows)
    stall = by_name(rows).get(ROW_STALL)
    wait = stall.get("client_wait_fraction") if stall is not None and stall.ok else None
    if wait is not None:
        lines.append(f"  a trainer taking twice as long per batch as the service needs waits "
                     f"{wait:.2%} of its wall time on data")
    lines += headline(rows)
    if result["goals"]:
        lines += goal_lines(result["goals"])
    return lines + [f"  problem: {p}" for p in result["problems"]]


def setup_section(results: dict[str, Any]) -> list[str]:
    """How each in-process row was set up (the same for every workload), printed once."""
    for result in results.values():
        rows = [Row.from_dict(r) for r in result["rows"]]
        if any(r.setup for r in rows):
            return ["how the torch and peer rows are set up (every workload):",
                    *setup_lines(rows)]
    return []


def format_transform(rows: list[dict]) -> list[str]:
    lines = [f"server-side transform {TRANSFORM} on the image data (float32 out), "
             "1 client on the fast path"]
    return lines + row_table([Column("samples/s", "rate", ",.0f"),
                              Column("GB/s", "gb_per_s", ".3f"),
                              Column("vs 1 worker", "vs_one_worker", ".2f")],
                             [Row.from_dict(r) for r in rows])


def format_pss(entries: list[dict], w: Workload) -> list[str]:
    lines = [f"server PSS / dataset size (tabular, {w.nbytes / MIB:.1f} MiB of data, "
             "after one tcp client ran through the ring)",
             f"  {'workers':>7}  {'ring':>28}  {'server PSS MiB':>14}  {'PSS/data':>8}"]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"  {e['workers']:>7}  {e['status']}")
            continue
        ring = RingInfo(**e["ring"])
        ring_s = (f"{ring.slots} slots of {ring.slot_bytes / MIB:.1f} MiB"
                  f" = {ring.ring_bytes / MIB:.0f} MiB")
        lines.append(f"  {e['workers']:>7}  {ring_s:>28}  {e['pss_bytes'] / MIB:>14.0f}  "
                     f"{e['pss_over_data']:>8.2f}")
    return lines


def failures(results: dict[str, Any]) -> list[str]:
    """The section's failed rows and entries, and its problems."""
    failed = [r["name"] for res in results["workloads"].values() for r in res["rows"]
              if r["status"].startswith("failed")]
    failed += [f"pss {e['workers']}" for e in results["pss_by_workers"] or []
               if e["status"] != "ok"]
    failed += [r["name"] for r in results.get("transform_scaling", [])
               if r["status"].startswith("failed")]
    return failed + [p for res in results["workloads"].values() for p in res["problems"]]
