"""The token rows of ``batchfeed bench`` (``--workload tokens``): packed language-model batches
of one corpus, delivered four ways, and what holding that corpus costs two training ranks.

Throughput, on one corpus (documents of long-tailed random lengths, int32 token ids, written as
an Arrow IPC file that the servers load), rows of ``ROW_LENGTH`` tokens, ``BATCH_ROWS`` per batch:

- in-process packing: ``PackedEpoch.gather`` in this process, one thread (the copy limit);
- torch's DataLoader, ``num_workers=2``, over a ``Dataset`` of Python token lists with a padding
  ``collate_fn`` (pad mode, the usual way; batches of as many documents as a packed batch holds
  tokens on average, truncated to the row length);
- batchfeed, ``pack={"tokens": L}``, over tcp and on the same-host fast path (a ``Client`` in
  this process, as in ``stalls``).

Tokens/s counts torch's real tokens only, not its padding; packed rows count whole (only the
epoch's last row has padding, under L tokens of some 10^7).  Memory, the pytorch #13246 case:
the PSS of every process after one epoch of two ranks, torch's (two DataLoader workers each)
against a batchfeed server's, on a corpus of short token lists small enough for torch to hold;
then batchfeed alone on the issue's 2M documents.  Ranks are spawned processes (``RankGroup``),
stopped with the ``shared.procs`` ladder in ``finally``; servers are stopped by
``served.running_server``; the corpus files live in a temporary directory removed at the end.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from batchfeed.shared.packing import PackedEpoch
from batchfeed.shared.procs import process_tree, pss_bytes, stop_process

from .measure import BenchError, failed_status
from .pool import client_epochs, collect_reports
from .probes import server_cpu_seconds, server_pss_bytes
from .report import fmt, goal_line, text_table
from .served import running_server
from .workloads import MIB, BenchOptions

ROW_LENGTH = 2048  # tokens per packed row
BATCH_ROWS = 16  # packed rows per batch
RANKS = 2  # the memory table's data-parallel ranks
TORCH_WORKERS = 2  # DataLoader workers per torch rank
GOAL_FAST_VS_INPROCESS = 0.8
GOAL_TCP_VS_TORCH = 20.0
GOAL_MEMORY_OVER_ARROW = 1.2
ISSUE_DOCUMENTS = 2_000_000  # the memory case as pytorch #13246 describes it

ROW_INPROCESS = "in-process packing (PackedEpoch.gather, 1 thread)"
ROW_TORCH = "torch DataLoader workers=2, pad collate"
ROW_TCP = "batchfeed tcp, packed"
ROW_FAST = "batchfeed fast path, packed"
ROW_MEM_TORCH = f"torch DataLoader, {RANKS} ranks x {TORCH_WORKERS} workers"
ROW_MEM_BATCHFEED = f"batchfeed server (2 workers) + {RANKS} ranks"
ROW_MEM_ISSUE = f"batchfeed server (2 workers) + {RANKS} ranks, issue size"
TOKEN_ROWS = (ROW_INPROCESS, ROW_TORCH, ROW_TCP, ROW_FAST)
MEMORY_ROWS = (ROW_MEM_BATCHFEED, ROW_MEM_TORCH, ROW_MEM_ISSUE)

RANK_IDLE_TIMEOUT = 120.0  # spawning and importing torch, on a loaded 2-core machine
RANK_EPOCH_TIMEOUT = 600.0


# ---------------------------------------------------------------------------------------------
# The corpora


@dataclass(frozen=True)
class TokenCorpus:
    """Documents of log-normal lengths (a long tail, clipped) of uniform random token ids."""

    name: str
    documents: int
    median_length: float
    max_length: int
    sigma: float = 1.0
    vocab: int = 50_257

    def make(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values, offsets)``: int32 token ids back to back, and int64 offsets (N+1)."""
        rng = np.random.default_rng([seed, self.documents])
        lengths = rng.lognormal(np.log(self.median_length), self.sigma, self.documents)
        lengths = np.clip(lengths.astype(np.int64), 1, self.max_length)
        offsets = np.zeros(self.documents + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = rng.integers(0, self.vocab, int(offsets[-1]), dtype=np.int32)
        return values, offsets


@dataclass(frozen=True)
class TokenCorpora:
    """The section's three corpora.

    ``memory`` is short documents (sentences), scaled down from the issue's 2M token lists so
    that torch can hold it: as Python lists a token costs ~40 bytes per copy, and a torch rank
    and each of its forked workers end up with a copy.  ``issue`` has the issue's 2M documents
    at ``throughput``'s lengths, for batchfeed alone (torch would need ~6 x 13 GB).
    """

    throughput: TokenCorpus
    memory: TokenCorpus
    issue: TokenCorpus


def corpora(quick: bool) -> TokenCorpora:
    """The corpora; ``quick`` makes them tiny (for tests)."""
    if quick:
        return TokenCorpora(TokenCorpus("throughput", 4_000, 100, 8192),
                            TokenCorpus("memory", 4_000, 12, 1024),
                            TokenCorpus("issue", 8_000, 100, 8192))
    return TokenCorpora(TokenCorpus("throughput", 200_000, 100, 16_384),
                        TokenCorpus("memory", 500_000, 12, 1024),
                        TokenCorpus("issue", ISSUE_DOCUMENTS, 100, 16_384))


@dataclass(frozen=True)
class CorpusFiles:
    """A corpus on disk in ``directory``: the Arrow IPC file the servers load and, for torch
    ranks, ``values.npy`` and ``offsets.npy`` (read with numpy alone, not pyarrow)."""

    corpus: TokenCorpus
    directory: str
    arrow: str
    tokens: int
    arrow_bytes: int  # the Arrow buffers: int32 values and int32 offsets

    def describe(self) -> str:
        c = self.corpus
        return (f"{c.documents:,} documents, {self.tokens / 1e6:.1f}M int32 tokens (log-normal "
                f"lengths, median {c.median_length:g}, mean {self.tokens / c.documents:.0f}, "
                f"max {c.max_length:,}), Arrow {self.arrow_bytes / MIB:.1f} MiB")


def write_corpus(corpus: TokenCorpus, values: np.ndarray, offsets: np.ndarray,
                 directory: str, npy: bool = True) -> CorpusFiles:
    import pyarrow as pa
    import pyarrow.ipc

    os.makedirs(directory)
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    table = pa.table({"tokens": column})
    arrow = os.path.join(directory, f"{corpus.name}.arrow")
    with pa.ipc.new_file(arrow, table.schema) as writer:
        writer.write_table(table)
    if npy:
        np.save(os.path.join(directory, "values.npy"), values)
        np.save(os.path.join(directory, "offsets.npy"), offsets)
    return CorpusFiles(corpus, directory, arrow, len(values), table.nbytes)


def make_corpus(corpus: TokenCorpus, seed: int, directory: str, npy: bool = True) -> CorpusFiles:
    values, offsets = corpus.make(seed)
    return write_corpus(corpus, values, offsets, directory, npy)


def token_lists(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    """The corpus as Python lists of ints, the way a torch ``Dataset`` usually holds it."""
    flat = values.tolist()
    return [flat[a:b] for a, b in itertools.pairwise(offsets.tolist())]


# ---------------------------------------------------------------------------------------------
# One row's consumer


@dataclass
class TokenMeasurement:
    """What one consumer saw in its measured window (warm-up excluded)."""

    tokens: int = 0  # real tokens
    slots: int = 0  # token positions delivered, padding included
    batches: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0  # this process's CPU (all threads) in the window
    first_batch_s: float | None = None
    wait_fraction: float | None = None


def consume_tokens(batches: Iterator, count: Callable[[Any], tuple[int, int]], warmup_s: float,
                   seconds: float, start: float,
                   mark: Callable[[], None] | None = None) -> TokenMeasurement:
    """Iterate: warm up ``warmup_s`` after the first batch, call ``mark()``, then count tokens
    (``count(batch)`` gives real tokens and slots) for ``seconds``.  Never copies a batch."""
    m = TokenMeasurement()
    warm_until = None
    for batch in batches:
        count(batch)
        now = time.perf_counter()
        if warm_until is None:
            m.first_batch_s = now - start
            warm_until = now + warmup_s
        if now >= warm_until:
            break
    else:
        raise BenchError("the batches ran out during the warm-up")
    del batch
    if mark is not None:
        mark()
    cpu0, t0 = time.process_time(), time.perf_counter()
    end = t0 + seconds
    for batch in batches:
        tokens, slots = count(batch)
        m.tokens += tokens
        m.slots += slots
        m.batches += 1
        if time.perf_counter() >= end:
            break
    m.seconds = time.perf_counter() - t0
    m.cpu_s = time.process_time() - cpu0
    return m


@dataclass
class TokenRow:
    """One line of the throughput table."""

    name: str
    status: str = "ok"  # "ok", "not installed", or "failed: ..."
    tokens: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None
    batches_per_s: float | None = None
    padding_fraction: float | None = None  # of the token positions delivered
    vs_inprocess: float | None = None
    vs_torch: float | None = None
    cpu_ns_per_token: float | None = None  # the consuming process's CPU
    server_cpu_ns_per_token: float | None = None  # the server's and its workers' CPU
    first_batch_ms: float | None = None
    wait_fraction: float | None = None
    server_pss_bytes: int | None = None
    server_pss_over_data: float | None = None
    note: str = ""

    @classmethod
    def from_measurement(cls, name: str, m: TokenMeasurement, **extra: Any) -> TokenRow:
        return cls(name, tokens=m.tokens, seconds=m.seconds, tokens_per_s=m.tokens / m.seconds,
                   batches_per_s=m.batches / m.seconds,
                   padding_fraction=1 - m.tokens / m.slots if m.slots else None,
                   cpu_ns_per_token=m.cpu_s / m.tokens * 1e9 if m.tokens else None,
                   first_batch_ms=None if m.first_batch_s is None else m.first_batch_s * 1e3,
                   wait_fraction=m.wait_fraction, **extra)


def _guarded(name: str, measure: Callable[[], TokenRow]) -> TokenRow:
    try:
        return measure()
    except (BenchError, RuntimeError, OSError) as exc:
        return TokenRow(name, status=failed_status(exc))


def _count_packed(batch: Any) -> tuple[int, int]:
    """Every position: packed rows are full, but for the epoch's last (not worth a pass)."""
    tokens = batch.fields[0] if hasattr(batch, "fields") else batch["tokens"]
    return tokens.size, tokens.size


def _count_padded(batch: tuple[Any, Any]) -> tuple[int, int]:
    padded, lengths = batch
    return int(lengths.sum()), padded.numel()


# ---------------------------------------------------------------------------------------------
# The throughput rows


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


class TokenLists:
    """A torch map-style ``Dataset`` of Python token lists."""

    def __init__(self, docs: list[list[int]]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> list[int]:
        return self.docs[i]


def pad_collate(batch: list[list[int]], max_length: int) -> tuple[Any, Any]:
    """The usual padding ``collate_fn``: truncate, make tensors, pad to the batch's longest."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    rows = [torch.tensor(doc[:max_length], dtype=torch.int32) for doc in batch]
    lengths = torch.tensor([len(r) for r in rows])
    return pad_sequence(rows, batch_first=True, padding_value=0), lengths


def torch_loader(docs: list[list[int]], batch_size: int, max_length: int, seed: int,
                 sampler: Any = None) -> Any:
    """DataLoader with ``TORCH_WORKERS`` persistent workers (the baseline at its best: small
    epochs do not pay a restart, and the workers live on to be measured), forked as on Linux by
    default (a spawned rank would otherwise spawn them too, each unpickling the whole corpus)."""
    import torch
    from torch.utils.data import DataLoader

    dataset: Any = TokenLists(docs)  # a map-style Dataset (torch is imported lazily here)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None,
                      sampler=sampler, num_workers=TORCH_WORKERS, persistent_workers=True,
                      collate_fn=functools.partial(pad_collate, max_length=max_length),
                      generator=torch.Generator().manual_seed(seed),
                      multiprocessing_context="fork")


def shutdown_loader(loader: Any) -> None:
    """Stop a DataLoader's persistent workers (joins with a timeout, then terminates)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def torch_docs_per_batch(offsets: np.ndarray, row_length: int, batch_rows: int) -> int:
    """As many documents as a packed batch holds tokens, on average (lengths truncated)."""
    mean = float(np.minimum(np.diff(offsets), row_length).mean())
    return max(1, round(batch_rows * row_length / mean))


def inprocess_row(values: np.ndarray, offsets: np.ndarray, options: BenchOptions) -> TokenRow:
    start = time.perf_counter()
    batches = packed_batches(values, offsets, ROW_LENGTH, BATCH_ROWS, options.seed)
    m = consume_tokens(batches, _count_packed, options.warmup, options.seconds, start)
    m.first_batch_s = None  # nothing to wait for
    return TokenRow.from_measurement(ROW_INPROCESS, m)


def torch_row(docs: list[list[int]], docs_per_batch: int, options: BenchOptions,
              note: str) -> TokenRow:
    loader = torch_loader(docs, docs_per_batch, ROW_LENGTH, options.seed)

    def epochs() -> Generator[Any, None, None]:
        while True:
            yield from loader

    batches = epochs()
    try:
        start = time.perf_counter()
        m = consume_tokens(batches, _count_padded, options.warmup, options.seconds, start)
    finally:
        batches.close()
        shutdown_loader(loader)
    return TokenRow.from_measurement(ROW_TORCH, m, note=note)


def client_row(name: str, address: str, fastpath: bool, options: BenchOptions,
               server: Any, data_bytes: int) -> TokenRow:
    """A batchfeed ``Client`` in this process reading packed batches epoch after epoch."""
    import gc

    from batchfeed import Client

    start = time.perf_counter()
    with Client(address, batch_size=BATCH_ROWS, pack={"tokens": ROW_LENGTH}, seed=options.seed,
                fastpath=fastpath, reconnect_timeout=10.0, name="bench-tokens") as client:
        at_start: list[float] = []

        def mark() -> None:
            at_start[:] = [client.stats()["wait_s"], server_cpu_seconds(server)]

        batches = client_epochs(client)
        try:
            m = consume_tokens(batches, _count_packed, options.warmup, options.seconds, start,
                               mark)
            server_cpu = server_cpu_seconds(server) - at_start[1]
        finally:
            batches.close()
        m.wait_fraction = (client.stats()["wait_s"] - at_start[0]) / m.seconds
    gc.collect()  # unmap the ring now, so that it counts in the server's PSS only
    pss = server_pss_bytes(server)
    return TokenRow.from_measurement(name, m, server_pss_bytes=pss,
                                     server_pss_over_data=pss / data_bytes,
                                     server_cpu_ns_per_token=server_cpu / m.tokens * 1e9)


def throughput_rows(files: CorpusFiles, values: np.ndarray, offsets: np.ndarray,
                    options: BenchOptions, work_dir: str, progress: Callable[[str], None],
                    problems: list[str]) -> list[TokenRow]:
    rows = [_guarded(ROW_INPROCESS, lambda: inprocess_row(values, offsets, options))]
    rows.append(_torch_throughput(files, values, offsets, options, progress))
    args = ["--workers", str(options.server_workers), "--data", files.arrow]
    for name, bind, fastpath in ((ROW_TCP, "tcp://127.0.0.1:0", False),
                                 (ROW_FAST, f"ipc://{work_dir}/tokens.sock", True)):
        progress(f"tokens: {name}")
        try:
            with running_server(args, bind, problems) as server:
                assert server.address is not None
                rows.append(_guarded(name, functools.partial(
                    client_row, name, server.address, fastpath, options, server,
                    files.arrow_bytes)))
        except (BenchError, RuntimeError, OSError) as exc:
            rows.append(TokenRow(name, status=failed_status(exc)))
    _add_ratios(rows)
    return rows


def _torch_throughput(files: CorpusFiles, values: np.ndarray, offsets: np.ndarray,
                      options: BenchOptions, progress: Callable[[str], None]) -> TokenRow:
    try:
        import torch  # noqa: F401
    except ImportError:
        return TokenRow(ROW_TORCH, status="not installed")
    progress(f"tokens: {files.corpus.documents:,} Python token lists for torch")
    t0 = time.perf_counter()
    docs = token_lists(values, offsets)
    built = time.perf_counter() - t0
    per_batch = torch_docs_per_batch(offsets, ROW_LENGTH, BATCH_ROWS)
    note = (f"batches of {per_batch} documents (a packed batch's tokens on average), truncated "
            f"to {ROW_LENGTH} and padded to the longest; building the lists took {built:.1f} s")
    progress(f"tokens: {ROW_TORCH}")
    return _guarded(ROW_TORCH, lambda: torch_row(docs, per_batch, options, note))


def _add_ratios(rows: list[TokenRow]) -> None:
    by_name = {r.name: r for r in rows}
    for base_name, attr in ((ROW_INPROCESS, "vs_inprocess"), (ROW_TORCH, "vs_torch")):
        base = by_name.get(base_name)
        if base is None or not base.tokens_per_s:
            continue
        for r in rows:
            if r.tokens_per_s is not None:
                setattr(r, attr, r.tokens_per_s / base.tokens_per_s)


# ---------------------------------------------------------------------------------------------
# The memory table: ranks in spawned processes


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
    """Body of a rank process (spawn imports it by its module path, ``batchfeed.bench.tokens``):
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
    loader = torch_loader(docs, job.batch_size, job.row_length, job.seed, sampler)
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


@dataclass
class MemoryRow:
    """One line of the memory table: PSS after one epoch, and of the ranks before any data."""

    name: str
    status: str = "ok"
    corpus: str = ""  # which corpus: "memory" or "issue"
    arrow_bytes: int | None = None
    processes: int | None = None
    pss_bytes: int | None = None
    idle_ranks_pss_bytes: int | None = None  # the ranks after their imports, before any data
    pss_over_arrow: float | None = None
    above_idle_over_arrow: float | None = None
    parts: dict[str, int] = field(default_factory=dict)  # PSS by process role
    epoch_s: float | None = None  # the slowest rank's epoch (torch: building its lists too)
    tokens: int | None = None  # read by all ranks in the epoch


def measure_ranks(name: str, jobs: list[RankJob], files: CorpusFiles,
                  server_pids: Callable[[], list[int]] = list) -> MemoryRow:
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
    return MemoryRow(name, corpus=files.corpus.name, arrow_bytes=files.arrow_bytes,
                     processes=len(mains) + len(helpers) + len(servers), pss_bytes=total,
                     idle_ranks_pss_bytes=idle, pss_over_arrow=total / files.arrow_bytes,
                     above_idle_over_arrow=(total - idle) / files.arrow_bytes, parts=parts,
                     epoch_s=max(d["seconds"] for d in done.values()),
                     tokens=sum(d["tokens"] for d in done.values()))


def batchfeed_memory_row(name: str, files: CorpusFiles, options: BenchOptions, work_dir: str,
                         problems: list[str]) -> MemoryRow:
    """A server (2 workers) loading the Arrow file, and ``RANKS`` ranks on the fast path."""
    try:
        with running_server(["--workers", "2", "--data", files.arrow],
                            f"ipc://{work_dir}/{files.corpus.name}.sock", problems) as server:
            assert server.address is not None
            jobs = [RankJob("batchfeed", server.address, r, RANKS, BATCH_ROWS, ROW_LENGTH,
                            options.seed) for r in range(RANKS)]
            return measure_ranks(name, jobs, files, lambda: process_tree(server.pid))
    except (BenchError, RuntimeError, OSError) as exc:
        return MemoryRow(name, status=failed_status(exc), corpus=files.corpus.name)


def torch_memory_row(files: CorpusFiles, options: BenchOptions) -> MemoryRow:
    """``RANKS`` torch ranks, each with its own lists and ``TORCH_WORKERS`` forked workers."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return MemoryRow(ROW_MEM_TORCH, status="not installed", corpus=files.corpus.name)
    offsets = np.load(os.path.join(files.directory, "offsets.npy"))
    per_batch = torch_docs_per_batch(offsets, ROW_LENGTH, BATCH_ROWS)
    jobs = [RankJob("torch", files.directory, r, RANKS, per_batch, ROW_LENGTH, options.seed)
            for r in range(RANKS)]
    try:
        return measure_ranks(ROW_MEM_TORCH, jobs, files)
    except (BenchError, RuntimeError, OSError) as exc:
        return MemoryRow(ROW_MEM_TORCH, status=failed_status(exc), corpus=files.corpus.name)


def memory_rows(which: TokenCorpora, options: BenchOptions, work_dir: str,
                progress: Callable[[str], None], problems: list[str],
                described: dict[str, Any]) -> list[MemoryRow]:
    """The memory table: batchfeed and torch on the ``memory`` corpus, then batchfeed alone on
    the ``issue`` corpus (each corpus written, used, then deleted)."""
    rows = []
    for corpus, makers in ((which.memory, (ROW_MEM_BATCHFEED, ROW_MEM_TORCH)),
                           (which.issue, (ROW_MEM_ISSUE,))):
        progress(f"tokens: making {corpus.documents:,} documents ({corpus.name})")
        files = make_corpus(corpus, options.seed, os.path.join(work_dir, corpus.name),
                            npy=ROW_MEM_TORCH in makers)
        described[corpus.name] = _describe(files)
        for name in makers:
            progress(f"tokens: memory, {name}")
            if name == ROW_MEM_TORCH:
                rows.append(torch_memory_row(files, options))
            else:
                rows.append(batchfeed_memory_row(name, files, options, work_dir, problems))
        shutil.rmtree(files.directory, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# The section


def goals(rows: list[TokenRow], memory: list[MemoryRow]) -> list[dict[str, Any]]:
    """Each goal of the issue with what this run measured, and whether it was met."""
    by_name: dict[str, Any] = {r.name: r for r in rows}
    by_name.update((r.name, r) for r in memory)

    def ratio(name: str, attr: str) -> float | None:
        row = by_name.get(name)
        return None if row is None else getattr(row, attr)

    out: list[dict[str, Any]] = [
        {"goal": f"fast path >= {GOAL_FAST_VS_INPROCESS:g}x in-process packing",
         "measured": ratio(ROW_FAST, "vs_inprocess"), "target": GOAL_FAST_VS_INPROCESS,
         "higher_is_better": True},
        {"goal": f"tcp >= {GOAL_TCP_VS_TORCH:g}x torch DataLoader(num_workers=2)",
         "measured": ratio(ROW_TCP, "vs_torch"), "target": GOAL_TCP_VS_TORCH,
         "higher_is_better": True},
        {"goal": f"batchfeed server + {RANKS} ranks PSS <= {GOAL_MEMORY_OVER_ARROW:g}x the "
                 "Arrow size (issue size)",
         "measured": ratio(ROW_MEM_ISSUE, "pss_over_arrow"), "target": GOAL_MEMORY_OVER_ARROW,
         "higher_is_better": False,
         "beside": {"batchfeed, short documents": ratio(ROW_MEM_BATCHFEED, "pss_over_arrow"),
                    "torch, short documents": ratio(ROW_MEM_TORCH, "pss_over_arrow")}},
    ]
    for g in out:
        m = g["measured"]
        g["met"] = None if m is None else (m >= g["target"] if g["higher_is_better"]
                                           else m <= g["target"])
    return out


def _describe(files: CorpusFiles) -> dict[str, Any]:
    return {**asdict(files.corpus), "tokens": files.tokens, "arrow_bytes": files.arrow_bytes,
            "description": files.describe()}


def token_section(options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole token section: throughput rows, memory rows, goals; a JSON-ready dict."""
    started = time.perf_counter()
    result: dict[str, Any] = {"row_length": ROW_LENGTH, "batch_rows": BATCH_ROWS, "corpora": {},
                              "rows": [], "memory": [], "goals": [], "problems": []}
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        result["rows"] = [asdict(TokenRow(n, status="not installed (pyarrow)"))
                          for n in TOKEN_ROWS]
        result["memory"] = [asdict(MemoryRow(n, status="not installed (pyarrow)"))
                            for n in MEMORY_ROWS]
        return result
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    which = corpora(options.quick)
    try:
        progress(f"tokens: making {which.throughput.documents:,} documents (throughput)")
        values, offsets = which.throughput.make(options.seed)
        files = write_corpus(which.throughput, values, offsets,
                             os.path.join(work_dir, "throughput"), npy=False)
        result["corpora"]["throughput"] = _describe(files)
        rows = throughput_rows(files, values, offsets, options, work_dir, progress,
                               result["problems"])
        del values, offsets
        mem_rows = memory_rows(which, options, work_dir, progress, result["problems"],
                               result["corpora"])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result["rows"] = [asdict(r) for r in rows]
    result["memory"] = [asdict(r) for r in mem_rows]
    result["goals"] = goals(rows, mem_rows)
    result["elapsed_s"] = time.perf_counter() - started
    return result


def failures(result: dict[str, Any]) -> list[str]:
    """The section's failed rows and problems (for ``run.failures``)."""
    failed = [r["name"] for r in result.get("rows", []) + result.get("memory", [])
              if r["status"].startswith("failed")]
    return failed + [f"tokens: {p}" for p in result.get("problems", [])]


# ---------------------------------------------------------------------------------------------
# Printing

LEGEND = """\
  tokens/s: tokens delivered into this process (torch's padding not counted); vs in-process / vs
    torch w=2: tokens/s relative to those rows.  client CPU ns/token: this process's CPU (all
    threads) per token; server CPU ns/token: the server's and its workers'.  first batch ms:
    Client() (torch: iter()) to the first batch.  server PSS/data: the server's PSS / Arrow size.
  memory: PSS of the ranks, their DataLoader workers and the server after one epoch (the ranks
    still hold their loaders); ranks idle: the ranks after their imports (torch, or batchfeed's
    client), before any data; above idle = PSS - ranks idle."""

TOKEN_COLUMNS = ["row", "tokens/s", "batches/s", "vs in-process", "vs torch w=2",
                 "client CPU ns/token", "server CPU ns/token", "first batch ms",
                 "server PSS/data"]
MEMORY_COLUMNS = ["loader", "corpus", "Arrow MiB", "processes", "PSS MiB", "PSS/Arrow",
                  "ranks idle MiB", "above idle/Arrow", "epoch s"]


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def format_tokens(result: dict[str, Any], options: BenchOptions) -> list[str]:
    described = result["corpora"]
    if "throughput" not in described:
        return ["tokens: " + "; ".join(f"{r['name']}: {r['status']}" for r in result["rows"])]
    lines = [f"tokens: {described['throughput']['description']}; packed rows of {ROW_LENGTH} "
             f"tokens, {BATCH_ROWS} per batch; {options.seconds:g} s per row after "
             f"{options.warmup:g} s warm-up"]
    cells = []
    for r in (TokenRow(**row) for row in result["rows"]):
        cells.append((r.name, r.status, [
            fmt(r.tokens_per_s, ",.0f"), fmt(r.batches_per_s, ",.0f"),
            fmt(r.vs_inprocess, ".3f"), fmt(r.vs_torch, ".2f"),
            fmt(r.cpu_ns_per_token, ".2f"), fmt(r.server_cpu_ns_per_token, ".2f"),
            fmt(r.first_batch_ms, ".0f"), fmt(r.server_pss_over_data, ".2f")]))
    lines += text_table(TOKEN_COLUMNS, cells)
    for r in result["rows"]:
        if r["status"] == "ok" and r["name"] == ROW_TORCH:
            lines.append(f"  torch: {r['note']}; {r['padding_fraction']:.0%} of the token "
                         "positions it delivers are padding")
        if r["status"] == "ok" and r["wait_fraction"] is not None:
            lines.append(f"  {r['name']}: the consumer waited {r['wait_fraction']:.0%} of its "
                         "time on data")
    lines += ["", f"memory after one epoch of {RANKS} ranks (pytorch #13246)"]
    for name in ("memory", "issue"):
        if name in described:
            lines.append(f"  {name}: {described[name]['description']}")
    mem_cells = []
    for m in (MemoryRow(**row) for row in result["memory"]):
        mem_cells.append((m.name, m.status, [
            m.corpus, fmt(_mib(m.arrow_bytes), ",.1f"), fmt(m.processes, "d"),
            fmt(_mib(m.pss_bytes), ",.0f"), fmt(m.pss_over_arrow, ".2f"),
            fmt(_mib(m.idle_ranks_pss_bytes), ",.0f"), fmt(m.above_idle_over_arrow, ".2f"),
            fmt(m.epoch_s, ".1f")]))
    lines += text_table(MEMORY_COLUMNS, mem_cells)
    for m in result["memory"]:
        if m["status"] == "ok":
            parts = ", ".join(f"{k} {v / MIB:,.0f}" for k, v in m["parts"].items())
            lines.append(f"  {m['name']}: PSS MiB by role: {parts}")
    lines += ["  goals:"] + [f"    {goal_line(g)}" for g in result["goals"]]
    return lines + [f"  problem: {p}" for p in result["problems"]] + [LEGEND]
