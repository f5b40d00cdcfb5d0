"""The fingerprint section (``--workload fingerprint``): what a dataset's identity costs a server
at start, in seconds per GB.

The data is the ``large`` workload's, written as .npy files (1.5 GB; 46 MB with ``--quick``),
read from the page cache (one untimed read first).  Rows, one after the other:

- ``read every byte``: the files read once into a reused buffer, the limit a full fingerprint
  is compared with;
- ``fingerprint full``: ``batchfeed.server.fingerprinting.file_fingerprint(mode="full")``, every
  byte hashed (SHA-256, in 32 MiB pieces on every core), as a server does by default;
- ``fingerprint sampled``: ``mode="sampled"``, sizes and 64 blocks of 64 KiB a file, as a
  server does with ``--mmap``.

The rate is GB/s; ``s/GB`` and the ratio to the read are shown.  The data directory is removed
in ``finally``.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from batchfeed.server.fingerprinting import data_files, file_fingerprint
from batchfeed.server.sources import inspect_source

from .common import GB, Column, Row, guarded, row_table
from .measure import usable_cores
from .workloads import BenchOptions, save_arrays, workloads

WORKLOAD = "large"
REPEATS = 3  # the best of this many runs per row
READ_CHUNK = 32 * 2**20

COLUMNS = (Column("GB/s", "rate", ".2f"),
           Column("s/GB", cell=lambda r: f"{1 / r.rate:.3f}" if r.rate else "n/a"),
           Column("x read", "read", ".2f"),
           Column("fingerprint", cell=lambda r: str(r.values.get("fingerprint", ""))))


def _read_all(path: Path) -> None:
    buf = bytearray(READ_CHUNK)
    for _, f in data_files(path):
        with open(f, "rb", buffering=0) as fp:
            while fp.readinto(buf):
                pass


def _best(what: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        result = what()
        best = min(best, time.perf_counter() - t0)
    return best, result


def fingerprint_section(options: BenchOptions, progress: Callable[[str], None]
                        ) -> dict[str, Any]:
    w = workloads(options.quick)[WORKLOAD]
    result: dict[str, Any] = {
        "workload": asdict(w), "description": w.describe(), "cores": usable_cores(),
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "rows": [], "problems": []}
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    try:
        progress(f"fingerprint: making {w.describe()}")
        data = Path(save_arrays(w.make_arrays(options.seed), os.path.join(work_dir, "data")))
        nbytes = sum(f.stat().st_size for _, f in data_files(data))
        result["data_bytes"] = nbytes
        sources = inspect_source(str(data))
        fields, rows = [s.field for s in sources], sources[0].rows
        _read_all(data)  # into the page cache

        def measure(name: str, run: Callable[[], object]) -> Row:
            seconds, fp = _best(run)
            return Row(name, rate=nbytes / GB / seconds,
                       values={"seconds": seconds, "fingerprint": str(fp or "")})

        out = [guarded("read every byte", lambda: measure("read every byte",
                                                           lambda: _read_all(data)))]
        for mode in ("full", "sampled"):
            progress(f"fingerprint: {mode}")
            out.append(guarded(f"fingerprint {mode}", lambda mode=mode: measure(
                f"fingerprint {mode}",
                lambda: file_fingerprint(data, fields, rows, mode=mode))))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    read = out[0].rate
    for r in out:
        if r.rate and read:
            r.ratios["read"] = r.rate / read
    result["rows"] = [asdict(r) for r in out]
    return result


def format_fingerprint(result: dict[str, Any], options: BenchOptions) -> list[str]:
    rows = [Row.from_dict(r) for r in result["rows"]]
    lines = [f"fingerprint: {result['description']} as .npy files "
             f"({result.get('data_bytes', 0) / GB:.2f} GB, from the page cache, best of "
             f"{REPEATS}), {result['cores']} cores; started {result['started_at']}"]
    lines += row_table(COLUMNS, rows)
    lines += [f"  problem: {p}" for p in result["problems"]]
    lines.append("  (a server computes the full fingerprint at start unless --mmap or "
                 "--fingerprint sampled; x read: its speed over reading the bytes once)")
    return lines
