"""The token section (``--workload tokens``): packed language-model batches of one corpus,
delivered four ways, and what holding a corpus costs two training ranks (``tokens_memory``).

Throughput, on one corpus (``tokens_data``: written as an Arrow IPC file that the servers
load), rows of ``ROW_LENGTH`` tokens, ``BATCH_ROWS`` per batch:

- in-process packing: ``PackedEpoch.gather`` in this process, one thread (the copy limit);
- torch's DataLoader, ``num_workers=2``, over a ``Dataset`` of Python token lists with a padding
  ``collate_fn`` (pad mode, the usual way; batches of as many documents as a packed batch holds
  tokens on average, truncated to the row length);
- batchfeed, ``pack={"tokens": L}``, over tcp and on the same-host fast path (a ``Client`` in
  this process).

Tokens/s counts torch's real tokens only, not its padding; packed rows count whole (only the
epoch's last row has padding, under L tokens of some 10^7).
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from batchfeed.server.packing import PackedEpoch

from .common import (
    ROW_ERRORS,
    Column,
    Goal,
    Row,
    add_ratio,
    by_name,
    failed_status,
    goal_lines,
    guarded,
    row_table,
)
from .inprocess import TORCH_HINT, shutdown_loader
from .measure import Measurement, client_epochs, consume, epochs_of
from .servers import running_server, server_cpu_seconds, server_pss_bytes
from .tokens_data import (
    BATCH_ROWS,
    ROW_LENGTH,
    corpora,
    describe,
    token_lists,
    torch_docs_per_batch,
    torch_loader,
    write_corpus,
)
from .tokens_memory import (
    MEMORY_ROWS,
    RANKS,
    ROW_MEM_BATCHFEED,
    ROW_MEM_ISSUE,
    ROW_MEM_TORCH,
    format_memory,
    memory_rows,
    pss_ratio,
)
from .workloads import BenchOptions

TORCH_WORKERS = 2
GOAL_FAST_VS_INPROCESS = 0.8
GOAL_TCP_VS_TORCH = 20.0
GOAL_MEMORY_OVER_ARROW = 1.2

ROW_INPROCESS = "in-process packing (PackedEpoch.gather, 1 thread)"
ROW_TORCH = "torch DataLoader workers=2, pad collate"
ROW_TCP = "batchfeed tcp, packed"
ROW_FAST = "batchfeed fast path, packed"
TOKEN_ROWS = (ROW_INPROCESS, ROW_TORCH, ROW_TCP, ROW_FAST)


def count_packed(batch: Any) -> tuple[int, int]:
    """Every position: packed rows are full, but for the epoch's last (not worth a pass)."""
    tokens = batch.fields[0] if hasattr(batch, "fields") else batch["tokens"]
    return tokens.size, tokens.size


def count_padded(batch: tuple[Any, Any]) -> tuple[int, int]:
    padded, lengths = batch
    return int(lengths.sum()), padded.numel()


def token_row(name: str, m: Measurement, **values: Any) -> Row:
    """``samples`` are real tokens, ``nbytes`` token positions (padding included)."""
    return Row(name, rate=m.samples / m.seconds, values={
        "tokens": m.samples, "seconds": m.seconds, "batches_per_s": m.batches / m.seconds,
        "padding_fraction": 1 - m.samples / m.nbytes if m.nbytes else None,
        "cpu_ns_per_token": m.cpu_s / m.samples * 1e9 if m.samples else None,
        "first_batch_ms": None if m.first_batch_s is None else m.first_batch_s * 1e3,
        "wait_fraction": m.wait_fraction, **values})


def packed_batches(values: np.ndarray, offsets: np.ndarray, row_length: int, batch_rows: int,
                   seed: int) -> Iterator[Any]:
    """The copy limit: each epoch packed (a fresh permutation), then ``gather`` per batch."""
    lengths = np.diff(offsets)
    rng = np.random.default_rng(seed)
    fields = [(values, offsets)]
    while True:
        epoch = PackedEpoch.build(lengths, rng.permutation(len(lengths)), row_length)
        for r0 in range(0, epoch.rows, batch_rows):
            yield epoch.gather(r0, min(r0 + batch_rows, epoch.rows), fields)


def inprocess_row(values: np.ndarray, offsets: np.ndarray, options: BenchOptions) -> Row:
    batches = packed_batches(values, offsets, ROW_LENGTH, BATCH_ROWS, options.seed)
    m = consume(batches, options.warmup, options.seconds, time.perf_counter(),
                count=count_packed)
    m.first_batch_s = None  # nothing to wait for
    return token_row(ROW_INPROCESS, m)


def torch_row(docs: list[list[int]], docs_per_batch: int, options: BenchOptions,
              note: str) -> Row:
    loader = torch_loader(docs, docs_per_batch, ROW_LENGTH, options.seed, TORCH_WORKERS)
    batches = epochs_of(loader)
    try:
        m = consume(batches, options.warmup, options.seconds, time.perf_counter(),
                    count=count_padded)
    finally:
        batches.close()
        shutdown_loader(loader)
    return token_row(ROW_TORCH, m, note=note)


def client_row(name: str, address: str, fastpath: bool, options: BenchOptions,
               server: Any, data_bytes: int) -> Row:
    """A batchfeed ``Client`` in this process reading packed batches epoch after epoch."""
    from batchfeed import Client

    start = time.perf_counter()
    with Client(address, batch_size=BATCH_ROWS, pack={"tokens": ROW_LENGTH}, seed=options.seed,
                fastpath=fastpath, reconnect_timeout=10.0, name="bench-tokens") as client:
        at_start: list[float] = []

        def ready() -> bool:
            at_start[:] = [client.stats()["wait_s"], server_cpu_seconds(server)]
            return True

        batches = client_epochs(client)
        try:
            m = consume(batches, options.warmup, options.seconds, start, ready,
                        count=count_packed)
            server_cpu = server_cpu_seconds(server) - at_start[1]
        finally:
            batches.close()
        m.wait_fraction = (client.stats()["wait_s"] - at_start[0]) / m.seconds
    gc.collect()  # unmap the ring now, so that it counts in the server's PSS only
    pss = server_pss_bytes(server)
    return token_row(name, m, server_pss_bytes=pss, server_pss_over_data=pss / data_bytes,
                     server_cpu_ns_per_token=server_cpu / m.samples * 1e9)


def throughput_rows(files: Any, values: np.ndarray, offsets: np.ndarray,
                    options: BenchOptions, work_dir: str, progress: Callable[[str], None],
                    problems: list[str]) -> list[Row]:
    rows = [guarded(ROW_INPROCESS, lambda: inprocess_row(values, offsets, options))]
    rows.append(_torch_throughput(files, values, offsets, options, progress))
    args = ["--workers", str(options.server_workers), "--data", files.arrow]
    for name, bind, fastpath in ((ROW_TCP, "tcp://127.0.0.1:0", False),
                                 (ROW_FAST, f"ipc://{work_dir}/tokens.sock", True)):
        progress(f"tokens: {name}")
        try:
            with running_server(args, bind, problems) as server:
                assert server.address is not None
                rows.append(guarded(name, functools.partial(
                    client_row, name, server.address, fastpath, options, server,
                    files.arrow_bytes)))
        except ROW_ERRORS as exc:
            rows.append(Row(name, status=failed_status(exc)))
    table = by_name(rows)
    add_ratio(rows, "vs_inprocess", table.get(ROW_INPROCESS))
    add_ratio(rows, "vs_torch", table.get(ROW_TORCH))
    return rows


def _torch_throughput(files: Any, values: np.ndarray, offsets: np.ndarray,
                      options: BenchOptions, progress: Callable[[str], None]) -> Row:
    try:
        import torch  # noqa: F401
    except ImportError:
        return Row.skipped(ROW_TORCH, TORCH_HINT)
    progress(f"tokens: {files.corpus.documents:,} Python token lists for torch")
    t0 = time.perf_counter()
    docs = token_lists(values, offsets)
    built = time.perf_counter() - t0
    per_batch = torch_docs_per_batch(offsets, ROW_LENGTH, BATCH_ROWS)
    note = (f"batches of {per_batch} documents (a packed batch's tokens on average), truncated "
            f"to {ROW_LENGTH} and padded to the longest; building the lists took {built:.1f} s")
    progress(f"tokens: {ROW_TORCH}")
    return guarded(ROW_TORCH, lambda: torch_row(docs, per_batch, options, note))


def goals(rows: list[Row], memory: list[Row]) -> list[Goal]:
    """Each goal of the section with what this run measured, and whether it was met."""
    table = by_name(rows)

    def ratio_of(name: str, key: str) -> float | None:
        row = table.get(name)
        return None if row is None else row.ratios.get(key)

    return [
        Goal(f"fast path >= {GOAL_FAST_VS_INPROCESS:g}x in-process packing",
             ratio_of(ROW_FAST, "vs_inprocess"), GOAL_FAST_VS_INPROCESS),
        Goal(f"tcp >= {GOAL_TCP_VS_TORCH:g}x torch DataLoader(num_workers=2)",
             ratio_of(ROW_TCP, "vs_torch"), GOAL_TCP_VS_TORCH),
        Goal(f"batchfeed server + {RANKS} ranks PSS <= {GOAL_MEMORY_OVER_ARROW:g}x the Arrow "
             "size (issue size)", pss_ratio(memory, ROW_MEM_ISSUE), GOAL_MEMORY_OVER_ARROW,
             higher_is_better=False,
             beside={"batchfeed, short documents": pss_ratio(memory, ROW_MEM_BATCHFEED),
                     "torch, short documents": pss_ratio(memory, ROW_MEM_TORCH)}),
    ]


def token_section(options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole token section: throughput rows, memory rows, goals; a JSON-ready dict."""
    started = time.perf_counter()
    result: dict[str, Any] = {"row_length": ROW_LENGTH, "batch_rows": BATCH_ROWS, "corpora": {},
                              "rows": [], "memory": [], "goals": [], "problems": []}
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        hint = "not installed: pip install pyarrow (the servers load an Arrow file)"
        result["rows"] = [asdict(Row.skipped(n, hint)) for n in TOKEN_ROWS]
        result["memory"] = [asdict(Row.skipped(n, hint)) for n in MEMORY_ROWS]
        return result
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    which = corpora(options.quick)
    try:
        progress(f"tokens: making {which.throughput.documents:,} documents (throughput)")
        values, offsets = which.throughput.make(options.seed)
        files = write_corpus(which.throughput, values, offsets,
                             os.path.join(work_dir, "throughput"), npy=False)
        result["corpora"]["throughput"] = describe(files)
        rows = throughput_rows(files, values, offsets, options, work_dir, progress,
                               result["problems"])
        del values, offsets
        mem_rows = memory_rows(which, options, work_dir, progress, result["problems"],
                               result["corpora"])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result["rows"] = [asdict(r) for r in rows]
    result["memory"] = [asdict(r) for r in mem_rows]
    result["goals"] = [asdict(g) for g in goals(rows, mem_rows)]
    result["elapsed_s"] = time.perf_counter() - started
    return result


LEGEND = """\
  tokens/s: tokens delivered into this process (torch's padding not counted); vs in-process / vs
    torch w=2: tokens/s relative to those rows.  client CPU ns/token: this process's CPU (all
    threads) per token; server CPU ns/token: the server's and its workers'.  first batch ms:
    Client() (torch: iter()) to the first batch.  server PSS/data: the server's PSS / Arrow size."""

COLUMNS = [Column("tokens/s", "rate", ",.0f"), Column("batches/s", "batches_per_s", ",.0f"),
           Column("vs in-process", "vs_inprocess", ".3f"),
           Column("vs torch w=2", "vs_torch", ".2f"),
           Column("client CPU ns/token", "cpu_ns_per_token", ".2f"),
           Column("server CPU ns/token", "server_cpu_ns_per_token", ".2f"),
           Column("first batch ms", "first_batch_ms", ".0f"),
           Column("server PSS/data", "server_pss_over_data", ".2f")]


def format_tokens(result: dict[str, Any], options: BenchOptions) -> list[str]:
    described = result["corpora"]
    rows = [Row.from_dict(r) for r in result["rows"]]
    if "throughput" not in described:
        return ["tokens: " + "; ".join(f"{r.name}: {r.status}" for r in rows)]
    lines = [f"tokens: {described['throughput']['description']}; packed rows of {ROW_LENGTH} "
             f"tokens, {BATCH_ROWS} per batch; {options.seconds:g} s per row after "
             f"{options.warmup:g} s warm-up"]
    lines += row_table(COLUMNS, rows)
    for r in rows:
        if r.ok and r.name == ROW_TORCH:
            lines.append(f"  torch: {r.values['note']}; {r.values['padding_fraction']:.0%} of "
                         "the token positions it delivers are padding")
        if r.ok and r.values.get("wait_fraction") is not None:
            lines.append(f"  {r.name}: the consumer waited {r.values['wait_fraction']:.0%} of "
                         "its time on data")
    lines += format_memory(result)
    lines += goal_lines(result["goals"])
    return lines + [f"  problem: {p}" for p in result["problems"]] + [LEGEND]
