"""What a bench run prints and writes: the header (machine and versions), one table per
workload, the transform and server-PSS tables, the legend, and the ``--json`` file."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

import numpy as np

from .measure import Row
from .probes import RingInfo
from .served import ROW_STALL, TRANSFORM
from .workloads import MIB, BenchOptions, Workload

COLUMNS = ("samples/s", "GB/s", "vs raw", "vs torch w=2", "client CPU s/GB", "first batch ms",
           "server PSS/data")

LEGEND = """\
  samples/s and GB/s: delivered into the consuming process(es), summed over clients.
  vs raw / vs torch w=2: samples/s relative to those rows of this run.
  client CPU s/GB: CPU seconds of the consuming process(es) (all threads, summed over clients)
    per GB delivered; torch's worker processes, like batchfeed's server, are not counted.
  first batch ms: batchfeed: Client() constructor start to first batch (slowest client);
    torch: iter(DataLoader) to first batch; in-process rows: n/a.
  server PSS/data: Pss of the server and all its children / dataset bytes, after the row.
  torch workers=2 uses persistent_workers=True; batchfeed servers run --workers {workers}."""


def header_lines() -> list[str]:
    import zmq

    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:
        torch_version = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return [
        f"batchfeed bench  {now}  cores: {os.cpu_count()} ({usable} usable)  "
        f"python {platform.python_version()}  numpy {np.__version__}  torch {torch_version}  "
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})",
        "note: the machine is shared and noisy; the ratios between rows of one run are the "
        "meaningful numbers, not absolute times.",
    ]


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def text_table(header: list[str], rows: list[tuple[str, str, list[str]]]) -> list[str]:
    """Right-aligned columns after a left-aligned name; ``rows`` are (name, status, cells), a
    row whose status is not "ok" printing its status instead of cells."""
    name_w = max(len(header[0]), *(len(name) for name, _, _ in rows))
    widths = [max([len(h)] + [len(cells[i]) for _, status, cells in rows if status == "ok"])
              for i, h in enumerate(header[1:])]
    lines = ["  " + header[0].ljust(name_w)
             + "".join(f"  {h:>{w}}" for h, w in zip(header[1:], widths))]
    for name, status, cells in rows:
        if status != "ok":
            lines.append(f"  {name.ljust(name_w)}  {status}")
        else:
            lines.append("  " + name.ljust(name_w)
                         + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    return lines


def goal_line(g: dict[str, Any]) -> str:
    """A goal of a section: what it asks, what this run measured, met or missed, and beside it
    the same ratio for related rows."""
    if g["measured"] is None:
        return f"{g['goal']}: not measured"
    verdict = "" if g.get("met") is None else (", met" if g["met"] else ", missed")
    beside = ", ".join(f"{k}: {v:.2f}x" for k, v in (g.get("beside") or {}).items()
                       if v is not None)
    return f"{g['goal']}: {g['measured']:.2f}x{verdict}" + (f" ({beside})" if beside else "")


def _cells(r: Row) -> list[str]:
    return [fmt(r.samples_per_s, ",.0f"), fmt(r.gb_per_s, ".3f"), fmt(r.vs_raw, ".3f"),
            fmt(r.vs_torch2, ".2f"), fmt(r.client_cpu_s_per_gb, ".2f"),
            fmt(r.first_batch_ms, ".0f"), fmt(r.server_pss_over_data, ".2f")]


def format_table(rows: list[dict]) -> list[str]:
    objs = [Row(**r) for r in rows]
    return text_table(["row", *COLUMNS], [(r.name, r.status, _cells(r)) for r in objs])


def format_workload(result: dict, options: BenchOptions) -> list[str]:
    lines = [f"{result['workload']['name']}: {result['description']}; "
             f"{options.seconds:g} s per row after {options.warmup:g} s warm-up"]
    for kind, info in result["servers"].items():
        lines.append(f"  {kind} server: {RingInfo(**info['ring']).describe()}")
    lines += format_table(result["rows"])
    stall = next((r for r in result["rows"] if r["name"] == ROW_STALL and r["status"] == "ok"),
                 None)
    if stall is not None and stall["client_wait_fraction"] is not None:
        lines.append(f"  a trainer taking twice as long per batch as the service needs waits "
                     f"{stall['client_wait_fraction']:.2%} of its wall time on data")
    return lines + [f"  problem: {p}" for p in result["problems"]]


def format_transform(rows: list[dict]) -> list[str]:
    lines = [f"server-side transform {TRANSFORM} on the image data (float32 out), "
             "1 client on the fast path",
             f"  {'row':<36} {'samples/s':>11} {'GB/s':>6} {'vs 1 worker':>11}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  {r['name']:<36} {r['status']}")
            continue
        lines.append(f"  {r['name']:<36} {r['samples_per_s']:>11,.0f} {r['gb_per_s']:>6.3f} "
                     f"{r['extra_ratio']:>11.2f}")
    return lines


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


def legend(options: BenchOptions) -> str:
    return LEGEND.format(workers=options.server_workers)


def write_json(path: str, results: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
