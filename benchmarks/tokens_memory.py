"""The memory table of the token section (the pytorch #13246 case): the PSS of every process
after one epoch of ``RANKS`` training ranks, torch's (``TORCH_WORKERS`` DataLoader workers each,
over Python token lists) against a batchfeed server's (ranks on the fast path), on a corpus of
short token lists small enough for torch to hold; then batchfeed alone on the issue's 2M
documents.  Ranks are spawned processes (``RankGroup``), stopped with the ``shared.procs``
ladder in ``finally``; servers are stopped by ``servers.running_server``; each corpus is
written, used, then deleted.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchfeed.shared.procs import process_tree, pss_bytes, stop_process

from .common import MIB, ROW_ERRORS, Column, Row, failed_status, row_table
from .inprocess import TORCH_HINT, shutdown_loader
from .pool import collect_reports
from .servers import running_server
from .tokens_data import (
    BATCH_ROWS,
    ROW_LENGTH,
    CorpusFiles,
    TokenCorpora,
    TokenLists,
    describe,
    make_corpus,
    token_lists,
    torch_docs_per_batch,
    torch_loader,
)
from .workloads import BenchOptions

RANKS = 2  # the memory table's data-parallel ranks
TORCH_WORKERS = 2  # DataLoader workers per torch rank
ROW_MEM_TORCH = f"torch DataLoader, {RANKS} ranks x {TORCH_WORKERS} workers"
ROW_MEM_BATCHFEED = f"batchfeed server (2 workers) + {RANKS} ranks"
ROW_MEM_ISSUE = f"batchfeed server (2 workers) + {RANKS} ranks, issue size"
MEMORY_ROWS = (ROW_MEM_BATCHFEED, ROW_MEM_TORCH, ROW_MEM_ISSUE)
RANK_IDLE_TIMEOUT = 120.0  # spawning and importing torch, on a loaded 2-core machine
RANK_EPOCH_TIMEOUT = 600.0


@dataclass(frozen=True)
class RankJob:
    """One training rank of the memory table: read one epoch, then hold on until told to go."""

    loader: str  # "torch" or "batchfeed"
    source: str  # torch: the corpus directory (values.npy, offsets.npy); batchfeed: an address
    rank: int
    world_size: int
    batch_size: int  # torch: documents; batchfeed: packed rows
    row_length: int
    seed: int


def rank_main(job: RankJob, messages: Any, go_load: Any, go_exit: Any, parent: int) -> None:
    """Body of a rank process (spawn imports it by its module path, ``benchmarks.tokens_memory``):
    import, say "idle", wait for ``go_load``, read one epoch, say "done", then keep the loader
    (its workers, its client) alive until ``go_exit``, the parent's death, or a timeout."""
    try:
        if job.loader == "torch":
            import torch  # noqa: F401  (a torch trainer has it loaded before any data)
        else:
            import batchfeed.client  # noqa: F401
        messages.put(("idle", job.rank, None))
        if not _wait_or_orphaned(go_load, parent, RANK_IDLE_TIMEOUT):
            return
        start = time.perf_counter()
        read_epoch = _torch_epoch if job.loader == "torch" else _batchfeed_epoch
        tokens, loader, close = read_epoch(job)
        try:
            messages.put(("done", job.rank, {"tokens": tokens,
                                             "seconds": time.perf_counter() - start}))
            _wait_or_orphaned(go_exit, parent, RANK_EPOCH_TIMEOUT)
        finally:
            close(loader)
    except BaseException as exc:  # report everything; the parent decides
        messages.put(("error", job.rank, f"{type(exc).__name__}: {exc}\n"
                                         f"{traceback.format_exc(limit=-4)}"))


def _wait_or_orphaned(event: Any, parent: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not event.wait(0.5):
        if os.getppid() != parent or time.monotonic() > deadline:
            return False
    return True


def _torch_epoch(job: RankJob) -> tuple[int, Any, Callable[[Any], None]]:
    from torch.utils.data import DistributedSampler

    values = np.load(os.path.join(job.source, "values.npy"), mmap_mode="r")
    offsets = np.load(os.path.join(job.source, "offsets.npy"))
    docs = token_lists(values, offsets)
    del values, offsets
    dataset: Any = TokenLists(docs)
    sampler: Any = DistributedSampler(dataset, num_replicas=job.world_size, rank=job.rank,
                                 shuffle=True, seed=job.seed)
    loader = torch_loader(docs, job.batch_size, job.row_length, job.seed, TORCH_WORKERS,
                          sampler)
    del docs
    tokens = sum(int(lengths.sum()) for _, lengths in loader)
    return tokens, loader, shutdown_loader


def _batchfeed_epoch(job: RankJob) -> tuple[int, Any, Callable[[Any], None]]:
    from batchfeed import Client

    client = Client(job.source, batch_size=job.batch_size, pack={"tokens": job.row_length},
                    seed=job.seed, rank=job.rank, world_size=job.world_size, fastpath=True,
                    reconnect_timeout=10.0, name=f"bench-tokens-rank{job.rank}")
    try:
        it = client.epoch(0)
        tokens = sum(batch["tokens"].size for batch in it)
    except BaseException:
        client.close()
        raise
    return tokens, client, lambda c: c.close()


class RankGroup:
    """Owns the spawned rank processes of one memory row.  ``close`` says go, then stops each
    with the ``shared.procs`` ladder (join, terminate, kill); safe to call twice."""

    def __init__(self, jobs: list[RankJob]):
        import multiprocessing

        self.jobs = jobs
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: list = []

    def start(self) -> RankGroup:
        self.messages = self._ctx.Queue()
        self.go_load = self._ctx.Event()
        self.go_exit = self._ctx.Event()
        for job in self.jobs:
            p = self._ctx.Process(target=rank_main, args=(job, self.messages, self.go_load,
                                                          self.go_exit, os.getpid()),
                                  name=f"batchfeed-bench-{job.loader}-rank{job.rank}",
                                  daemon=False)  # torch ranks start DataLoader workers
            p.start()
            self.procs.append(p)
        return self

    def pids(self) -> list[int]:
        """Every rank process and its descendants (a torch rank's DataLoader workers)."""
        return [pid for p in self.procs for pid in process_tree(p.pid)]

    def collect(self, kind: str, timeout: float) -> dict[int, Any]:
        """Wait for every rank's ``kind`` message; BenchError on an error, a death or a timeout."""
        return collect_reports(self.messages, self.procs, len(self.jobs), kind, timeout,
                               tuple, "rank")

    def close(self) -> None:
        if not self.procs:
            return
        self.go_exit.set()
        for p in self.procs:
            if stop_process(p, 10.0, terminate_wait=5.0, kill_wait=5.0) is not None:
                p.close()
        self.messages.close()
        self.messages.cancel_join_thread()
        self.procs = []

    def __enter__(self) -> RankGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_ranks(name: str, jobs: list[RankJob], files: CorpusFiles,
                  server_pids: Callable[[], list[int]] = list) -> Row:
    """Start the ranks, measure them idle, let them read one epoch, measure everything."""
    with RankGroup(jobs) as group:
        group.collect("idle", RANK_IDLE_TIMEOUT)
        idle = pss_bytes(group.pids())
        group.go_load.set()
        done = group.collect("done", RANK_EPOCH_TIMEOUT)
        mains = [p.pid for p in group.procs]
        helpers = [pid for pid in group.pids() if pid not in mains]
        servers = server_pids()
        parts = {"ranks": pss_bytes(mains)}
        if helpers:
            parts["rank workers"] = pss_bytes(helpers)
        if servers:
            parts["server"] = pss_bytes(servers)
    total = sum(parts.values())
    return Row(name, values={
        "corpus": files.corpus.name, "arrow_bytes": files.arrow_bytes,
        "processes": len(mains) + len(helpers) + len(servers), "pss_bytes": total,
        "idle_ranks_pss_bytes": idle, "pss_over_arrow": total / files.arrow_bytes,
        "above_idle_over_arrow": (total - idle) / files.arrow_bytes, "parts": parts,
        "epoch_s": max(d["seconds"] for d in done.values()),
        "tokens": sum(d["tokens"] for d in done.values())})


def batchfeed_memory_row(name: str, files: CorpusFiles, options: BenchOptions, work_dir: str,
                         problems: list[str]) -> Row:
    """A server (2 workers) loading the Arrow file, and ``RANKS`` ranks on the fast path."""
    try:
        with running_server(["--workers", "2", "--data", files.arrow],
                            f"ipc://{work_dir}/{files.corpus.name}.sock", problems) as server:
            assert server.address is not None
            jobs = [RankJob("batchfeed", server.address, r, RANKS, BATCH_ROWS, ROW_LENGTH,
                            options.seed) for r in range(RANKS)]
            return measure_ranks(name, jobs, files, lambda: process_tree(server.pid))
    except ROW_ERRORS as exc:
        return Row(name, status=failed_status(exc), values={"corpus": files.corpus.name})


def torch_memory_row(files: CorpusFiles, options: BenchOptions) -> Row:
    """``RANKS`` torch ranks, each with its own lists and ``TORCH_WORKERS`` forked workers."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return Row.skipped(ROW_MEM_TORCH, TORCH_HINT, corpus=files.corpus.name)
    offsets = np.load(os.path.join(files.directory, "offsets.npy"))
    per_batch = torch_docs_per_batch(offsets, ROW_LENGTH, BATCH_ROWS)
    jobs = [RankJob("torch", files.directory, r, RANKS, per_batch, ROW_LENGTH, options.seed)
            for r in range(RANKS)]
    try:
        return measure_ranks(ROW_MEM_TORCH, jobs, files)
    except ROW_ERRORS as exc:
        return Row(ROW_MEM_TORCH, status=failed_status(exc), values={"corpus": files.corpus.name})


def memory_rows(which: TokenCorpora, options: BenchOptions, work_dir: str,
                progress: Callable[[str], None], problems: list[str],
                described: dict[str, Any]) -> list[Row]:
    """The memory table: batchfeed and torch on the ``memory`` corpus, then batchfeed alone on
    the ``issue`` corpus (each corpus written, used, then deleted)."""
    rows = []
    for corpus, makers in ((which.memory, (ROW_MEM_BATCHFEED, ROW_MEM_TORCH)),
                           (which.issue, (ROW_MEM_ISSUE,))):
        progress(f"tokens: making {corpus.documents:,} documents ({corpus.name})")
        files = make_corpus(corpus, options.seed, os.path.join(work_dir, corpus.name),
                            npy=ROW_MEM_TORCH in makers)
        described[corpus.name] = describe(files)
        for name in makers:
            progress(f"tokens: memory, {name}")
            if name == ROW_MEM_TORCH:
                rows.append(torch_memory_row(files, options))
            else:
                rows.append(batchfeed_memory_row(name, files, options, work_dir, problems))
        shutil.rmtree(files.directory, ignore_errors=True)
    return rows


MEMORY_COLUMNS = [Column("corpus", "corpus", "s"), Column("Arrow MiB", "arrow_mib", ",.1f"),
                  Column("processes", "processes", "d"), Column("PSS MiB", "pss_mib", ",.0f"),
                  Column("PSS/Arrow", "pss_over_arrow", ".2f"),
                  Column("ranks idle MiB", "idle_mib", ",.0f"),
                  Column("above idle/Arrow", "above_idle_over_arrow", ".2f"),
                  Column("epoch s", "epoch_s", ".1f")]
MEMORY_LEGEND = """\
  memory: PSS of the ranks, their DataLoader workers and the server after one epoch (the ranks
    still hold their loaders); ranks idle: the ranks after their imports (torch, or batchfeed's
    client), before any data; above idle = PSS - ranks idle."""


def format_memory(result: dict[str, Any]) -> list[str]:
    described = result["corpora"]
    lines = ["", f"memory after one epoch of {RANKS} ranks (pytorch #13246)"]
    for name in ("memory", "issue"):
        if name in described:
            lines.append(f"  {name}: {described[name]['description']}")
    rows = [Row.from_dict(r) for r in result["memory"]]
    for r in rows:
        for key in ("arrow", "pss", "idle"):
            src = {"arrow": "arrow_bytes", "pss": "pss_bytes", "idle": "idle_ranks_pss_bytes"}[key]
            if r.values.get(src) is not None:
                r.values[f"{key}_mib"] = r.values[src] / MIB
    lines += row_table(MEMORY_COLUMNS, rows, "loader")
    for r in rows:
        if r.ok:
            parts = ", ".join(f"{k} {v / MIB:,.0f}" for k, v in r.values["parts"].items())
            lines.append(f"  {r.name}: PSS MiB by role: {parts}")
    return lines + [MEMORY_LEGEND]


def pss_ratio(rows: list[Row], name: str) -> float | None:
    """A memory row's PSS over the Arrow size (None if not measured)."""
    row = next((r for r in rows if r.name == name), None)
    return None if row is None else row.values.get("pss_over_arrow")
