"""``run(options, out)``: one bench run from start to end.

The loaders section per workload (``loaders``), then the transform (image) and server-PSS
(tabular) tables, the ``SECTIONS`` (``tokens``, ``jpeg``, ``shards``, ``ray``: each measured and
printed by its own module) and the epoch-boundary stall table (``stalls``), each if its name
is among ``options.workloads``.  It prints as it goes and
writes ``--json`` at the end.  It owns the client pool and the temporary data directories:
each is closed or removed in ``finally``, also on SIGTERM (turned into an exception while the
run lasts).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import fingerprint_cost, jpeg, jpeg_report, loaders, ray_bench, report, shard_servers, tokens
from .common import failures as section_failures
from .pool import ClientPool
from .served import TCP_CLIENTS, pss_by_workers, transform_scaling
from .stalls import epoch_stalls, format_stalls
from .workloads import BenchOptions, workloads


@dataclass(frozen=True)
class Section:
    """A workload measured by its own module, with its own table: ``measure(options,
    progress)`` returns the JSON-able result (with "rows" and "problems"), ``lines(result,
    options)`` prints it."""

    measure: Callable[[BenchOptions, Callable[[str], None]], dict[str, Any]]
    lines: Callable[[dict[str, Any], BenchOptions], list[str]]


SECTIONS = {
    "tokens": Section(tokens.token_section, tokens.format_tokens),
    "jpeg": Section(jpeg.jpeg_section, jpeg_report.format_jpeg),
    "shards": Section(shard_servers.shard_section, shard_servers.format_shards),
    "fingerprint": Section(fingerprint_cost.fingerprint_section,
                           fingerprint_cost.format_fingerprint),
    "ray": Section(ray_bench.ray_section, ray_bench.format_ray),
}


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def failures(results: dict[str, Any]) -> list[str]:
    """What did not go right in a run: failed rows and entries, and every problem."""
    failed = loaders.failures(results)
    failed += [f"epoch stalls {r['dataset']} {r['transport']}"
               for r in results.get("epoch_stalls", []) if r["status"] != "ok"]
    failed += [f for name in SECTIONS if name in results
               for f in section_failures(results[name], name)]
    return failed + results["problems"]


def _print(out: Callable[[str], None], lines: list[str]) -> None:
    out("")
    for line in lines:
        out(line)


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
        problems = results["problems"]
        for name in options.workloads:
            if name in all_workloads:
                result = loaders.run_workload(all_workloads[name], options, pool, progress)
                results["workloads"][name] = result
                _print(out, loaders.format_workload(result, options))
        if results["workloads"]:
            _print(out, loaders.setup_section(results["workloads"]))
        if "image" in options.workloads:
            trows = transform_scaling(all_workloads["image"], options, pool, progress, problems)
            results["transform_scaling"] = [asdict(r) for r in trows]
            _print(out, loaders.format_transform(results["transform_scaling"]))
        if "tabular" in options.workloads:
            entries = pss_by_workers(all_workloads["tabular"], options, pool, progress, problems)
            results["pss_by_workers"] = entries
            _print(out, loaders.format_pss(entries, all_workloads["tabular"]))
        for name, section in SECTIONS.items():
            if name in options.workloads:
                results[name] = section.measure(options, progress)
                _print(out, section.lines(results[name], options))
        if "stalls" in options.workloads:
            stalls = epoch_stalls(options.server_workers, options.seed, progress, problems)
            results["epoch_stalls"] = [asdict(r) for r in stalls]
            _print(out, format_stalls(results["epoch_stalls"]))
        if results["workloads"]:
            _print(out, [loaders.LEGEND.format(workers=options.server_workers)])
        if problems:
            _print(out, [f"  problem: {p}" for p in problems])
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
