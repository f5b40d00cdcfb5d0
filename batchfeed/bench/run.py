"""``run(options, out)``: one bench run from start to end.

Per workload it makes the data, measures the in-process rows, then the batchfeed rows; then the
transform (image) and server-PSS (tabular) tables, the ``SECTIONS`` (``tokens``, ``jpeg``,
``shards``: each measured and printed by its own module) and the epoch-boundary stall table.
It prints as it goes and writes ``--json`` at the end.  It owns the client pool and the
temporary data directories: each is closed or removed in ``finally``, also on SIGTERM (turned
into an exception while the run lasts).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import jpeg, report, shards, tokens
from .baselines import add_ratios, in_process_rows
from .pool import ClientPool
from .served import TCP_CLIENTS, pss_by_workers, server_rows, transform_scaling
from .stalls import epoch_stalls, format_stalls
from .workloads import BenchOptions, Workload, save_arrays, workloads


@dataclass(frozen=True)
class Section:
    """A workload measured by its own module, with its own table: ``measure(options,
    progress)`` returns the JSON-able result, ``lines(result, options)`` prints it and
    ``failures(result)`` names what went wrong."""

    measure: Callable[[BenchOptions, Callable[[str], None]], dict[str, Any]]
    lines: Callable[[dict[str, Any], BenchOptions], list[str]]
    failures: Callable[[dict[str, Any]], list[str]]


SECTIONS = {
    "tokens": Section(tokens.token_section, tokens.format_tokens, tokens.failures),
    "jpeg": Section(jpeg.jpeg_section, jpeg.format_jpeg, jpeg.failures),
    "shards": Section(shards.shard_section, shards.format_shards, shards.failures),
}


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def run_workload(w: Workload, options: BenchOptions, pool: ClientPool,
                 progress: Callable[[str], None]) -> dict[str, Any]:
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
    add_ratios(rows)
    return {"workload": asdict(w), "dataset_bytes": w.nbytes, "description": w.describe(),
            "servers": servers, "rows": [asdict(r) for r in rows], "problems": problems}


def failures(results: dict[str, Any]) -> list[str]:
    """What did not go right in a run: failed rows and entries, and every problem."""
    failed = [r["name"] for res in results["workloads"].values() for r in res["rows"]
              if r["status"].startswith("failed")]
    failed += [f"pss {e['workers']}" for e in results["pss_by_workers"] or []
               if e["status"] != "ok"]
    failed += [r["name"] for r in results.get("transform_scaling", [])
               if r["status"].startswith("failed")]
    failed += [f"epoch stalls {r['dataset']} {r['transport']}"
               for r in results.get("epoch_stalls", []) if r["status"] != "ok"]
    failed += [f for name, sec in SECTIONS.items() if name in results
               for f in sec.failures(results[name])]
    failed += results["problems"]
    failed += [p for res in results["workloads"].values() for p in res["problems"]]
    return failed


def run(options: BenchOptions, out: Callable[[str], None] = print) -> int:
    """Run the bench, print the tables, write ``--json``; 0 if every row was measured."""
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # clean up servers and temp data

    def progress(msg: str) -> None:
        print(f"  ... {time.perf_counter() - started:6.1f} s  {msg}", file=sys.stderr, flush=True)

    pool = ClientPool(max(TCP_CLIENTS))  # started at the first batchfeed row
    try:
        for line in report.header_lines():
            out(line)
        all_workloads = workloads(options.quick)
        results: dict[str, Any] = {"header": report.header_lines(), "options": asdict(options),
                                   "workloads": {}, "pss_by_workers": None, "problems": []}
        for name in options.workloads:
            if name in SECTIONS:  # their own sections, below
                continue
            result = run_workload(all_workloads[name], options, pool, progress)
            results["workloads"][name] = result
            out("")
            for line in report.format_workload(result, options):
                out(line)
        if "image" in options.workloads:
            problems = results["problems"]
            trows = transform_scaling(all_workloads["image"], options, pool, progress, problems)
            results["transform_scaling"] = [asdict(r) for r in trows]
            out("")
            for line in report.format_transform(results["transform_scaling"]):
                out(line)
        if "tabular" in options.workloads:
            problems = results["problems"]
            entries = pss_by_workers(all_workloads["tabular"], options, pool, progress, problems)
            results["pss_by_workers"] = entries
            out("")
            for line in report.format_pss(entries, all_workloads["tabular"]) + [
                    f"  problem: {p}" for p in problems]:
                out(line)
        for name, section in SECTIONS.items():
            if name in options.workloads:
                results[name] = section.measure(options, progress)
                out("")
                for line in section.lines(results[name], options):
                    out(line)
        stall_problems: list[str] = []
        stalls = epoch_stalls(options.server_workers, options.seed, progress, stall_problems)
        results["epoch_stalls"] = [asdict(r) for r in stalls]
        results["problems"] += stall_problems
        out("")
        for line in format_stalls(results["epoch_stalls"]) + [
                f"  problem: {p}" for p in stall_problems]:
            out(line)
        out("")
        out(report.legend(options))
        elapsed = time.perf_counter() - started
        results["elapsed_s"] = elapsed
        out(f"bench took {elapsed:.1f} s")
        if options.json_path:
            report.write_json(options.json_path, results)
        return 1 if failures(results) else 0
    except (_Terminated, KeyboardInterrupt):
        print("batchfeed bench: interrupted; servers stopped, temporary data removed",
              file=sys.stderr)
        return 130
    finally:
        pool.close()
        signal.signal(signal.SIGTERM, previous)
