"""``batchfeed bench``: every way of feeding a training loop, side by side, in one run.

Per workload (same data, full shuffle) it measures, one after the other on the same machine:
the raw in-process copy limit (``np.take`` into a preallocated batch), a naive per-sample loop,
torch's DataLoader with 0 and 2 workers, and batchfeed over tcp loopback (1, 2, 4 client
processes), over ipc through the socket, and over ipc on the same-host fast path.  Every row's
consumer does the same minimal work: it iterates and counts bytes, never copying.  The machine
is shared and noisy, so the ratios between rows of one run are what mean something.

Client processes are spawned once (a pool of four) and reused row after row; in each row they
all warm up, then measure the same window.  This module owns the temporary data directory, the
servers and the client pool it starts: each is removed, stopped or joined (then terminated) in
``finally``, also on SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import glob
import importlib
import itertools
import json
import os
import platform
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from batchfeed.launch import ServerProcess
from batchfeed.shared.errors import InvalidRequest

GB = 1e9
MIB = 2**20
WORKLOAD_NAMES = ("tabular", "image", "large")
PSS_WORKERS = (1, 2, 4)

ROW_RAW = "raw np.take copy (1 thread)"
ROW_NAIVE = "naive per-sample loop"
ROW_TORCH0 = "torch DataLoader workers=0"
ROW_TORCH2 = "torch DataLoader workers=2"
ROW_TCP = "batchfeed tcp, {n} client{s}"
ROW_IPC_SOCKET = "batchfeed ipc, socket (fastpath=False)"
ROW_IPC_FAST = "batchfeed ipc, fast path"
ROW_CURVE = "batchfeed tcp + CURVE, 1 client"
ROW_STALL = "batchfeed tcp, trainer at half rate"
ROW_TRANSFORM = "transform augment, {n} worker{s}"
TCP_CLIENTS = (1, 2, 4)
TRANSFORM = "batchfeed.transforms:augment"
TRANSFORM_WORKERS = (1, 2)

COLUMNS = ("samples/s", "GB/s", "vs raw", "vs torch w=2", "client CPU s/GB", "first batch ms",
           "server PSS/data")

READY_RING_RE = re.compile(r"\((\d+) workers, (\d+) slots of ([0-9.]+) (B|KiB|MiB|GiB)[,)]")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

CLIENT_START_TIMEOUT = 60.0  # spawning and connecting, on a loaded 2-core machine


class BenchError(Exception):
    """A row could not be measured (a server or client failed); the message says why."""


# ---------------------------------------------------------------------------------------------
# Options and workloads.


@dataclass(frozen=True)
class BenchOptions:
    """What to run, validated once (by the CLI)."""

    workloads: tuple[str, ...] = WORKLOAD_NAMES
    seconds: float = 2.0  # measured time per row
    warmup: float = 0.5  # excluded time per row, after the first batch
    quick: bool = False  # tiny datasets, for tests
    server_workers: int = 2
    json_path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOAD_NAMES]
        if unknown or not self.workloads:
            raise InvalidRequest(f"--workload must be one of {', '.join(WORKLOAD_NAMES)} or all, "
                                 f"got {', '.join(unknown) or 'nothing'}")
        if not self.seconds > 0 or not self.warmup >= 0:
            raise InvalidRequest(f"--seconds must be > 0 and --warmup >= 0, got {self.seconds} "
                                 f"and {self.warmup}")
        if self.server_workers < 1:
            raise InvalidRequest(f"--workers must be >= 1, got {self.server_workers}")

    @classmethod
    def from_args(cls, workload: str, seconds: float | None, warmup: float | None, quick: bool,
                  workers: int, json_path: str | None) -> BenchOptions:
        """``--quick`` shortens the time per row unless ``--seconds``/``--warmup`` say otherwise."""
        return cls(
            workloads=WORKLOAD_NAMES if workload == "all" else (workload,),
            seconds=seconds if seconds is not None else (0.25 if quick else 2.0),
            warmup=warmup if warmup is not None else (0.1 if quick else 0.5),
            quick=quick, server_workers=workers, json_path=json_path,
        )


@dataclass(frozen=True)
class Workload:
    """A dataset (``x`` features plus an int64 label ``y``) and the batch size to read it with."""

    name: str
    rows: int
    batch_size: int
    x_shape: tuple[int, ...]  # per row
    x_dtype: str
    synthetic: bool  # the server's built-in dataset (same seed), else written to --data

    @property
    def nbytes(self) -> int:
        row = int(np.prod(self.x_shape)) * np.dtype(self.x_dtype).itemsize + 8
        return self.rows * row

    def describe(self) -> str:
        shape = ",".join(map(str, self.x_shape))
        size = (f"{self.nbytes / GB:.2f} GB" if self.nbytes >= GB
                else f"{self.nbytes / 1e6:.1f} MB")
        return (f"{self.rows:,} rows [x: {self.x_dtype}[{shape}], y: int64] = {size}, "
                f"batch {self.batch_size}, full shuffle")

    def make_arrays(self, seed: int) -> dict[str, np.ndarray]:
        if self.synthetic:
            from batchfeed.server.dataset import synthetic_arrays

            return synthetic_arrays(self.rows, seed)
        rng = np.random.default_rng(seed)
        return {"x": _filler((self.rows, *self.x_shape), rng),
                "y": rng.integers(0, 10, self.rows, dtype=np.int64)}


def workloads(quick: bool) -> dict[str, Workload]:
    """The three workloads; ``quick`` makes them tiny (for tests)."""
    return {
        "tabular": Workload("tabular", 20_000 if quick else 1_000_000, 256, (64,), "float32",
                            synthetic=True),
        "image": Workload("image", 4_000 if quick else 60_000, 256, (3, 32, 32), "uint8",
                          synthetic=False),
        "large": Workload("large", 300 if quick else 10_000, 64, (153_600,), "uint8",
                          synthetic=False),
    }


def _filler(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random-looking uint8 data, fast: a 16 MiB random pool (odd length) tiled over the array."""
    out = np.empty(shape, np.uint8)
    flat = out.reshape(-1)
    pool = rng.integers(0, 256, min(flat.size, 16 * MIB + 4099), dtype=np.uint8)
    for start in range(0, flat.size, pool.size):
        n = min(pool.size, flat.size - start)
        flat[start : start + n] = pool[:n]
    return out


# ---------------------------------------------------------------------------------------------
# The consumer: the same minimal work for every row.


@dataclass
class Measurement:
    """What one consumer saw in its measured window (warm-up excluded)."""

    samples: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0  # process CPU (all its threads) during the window
    first_batch_s: float | None = None  # from ``start`` to the first batch
    wait_fraction: float | None = None  # batchfeed clients: share of the window spent waiting


def _count(batch: Any) -> tuple[int, int]:
    """(rows, bytes) of a batch: a dict of arrays or a sequence of tensors.  Never copies."""
    arrays = batch.values() if type(batch) is dict else batch
    rows = -1
    nbytes = 0
    for a in arrays:
        nbytes += a.nbytes
        if rows < 0:
            rows = len(a)
    return rows, nbytes


def consume(batches: Iterator, warmup_s: float, seconds: float, start: float,
            ready: Callable[[], bool] | None = None, step_s: float = 0.0) -> Measurement:
    """Iterate: warm up for ``warmup_s`` after the first batch (and until ``ready()``), then
    count rows and bytes for ``seconds``.  ``step_s`` simulates a training step per batch that
    leaves the CPU free, as a step waiting on a GPU does (slept in pieces of >= 1 ms)."""
    m = Measurement()
    warm_until = None
    for batch in batches:
        _count(batch)
        now = time.perf_counter()
        if warm_until is None:
            m.first_batch_s = now - start
            warm_until = now + warmup_s
        if now >= warm_until and (ready is None or ready()):
            break
    else:
        raise BenchError("the batches ran out during the warm-up")
    del batch
    cpu0, t0 = time.process_time(), time.perf_counter()
    end = t0 + seconds
    samples = nbytes = 0
    debt = 0.0
    for batch in batches:
        rows, size = _count(batch)
        samples += rows
        nbytes += size
        if step_s:
            debt += step_s
            if debt >= 0.001:
                time.sleep(debt)
                debt = 0.0
        if time.perf_counter() >= end:
            break
    m.seconds = time.perf_counter() - t0
    m.cpu_s = time.process_time() - cpu0
    m.samples, m.nbytes = samples, nbytes
    return m


# ---------------------------------------------------------------------------------------------
# In-process rows.


def raw_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
    """The copy limit: one thread, ``np.take`` per field into preallocated batch arrays."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(arrays.values())))
    out = {k: np.empty((batch_size, *a.shape[1:]), a.dtype) for k, a in arrays.items()}
    while True:
        perm = rng.permutation(n)  # a fresh permutation per epoch
        for k in range(0, n, batch_size):
            idx = perm[k : k + batch_size]
            batch = {}
            for name, a in arrays.items():
                dst = out[name][: len(idx)]
                # mode="clip" avoids numpy's buffered out= path (mode="raise" gathers into a
                # temporary and copies it over); the permutation's indices are all in range.
                np.take(a, idx, axis=0, out=dst, mode="clip")
                batch[name] = dst
            yield batch


def naive_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
    """What a hand-written loader often does: index each row, then ``np.array`` of the list."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(arrays.values())))
    while True:
        perm = rng.permutation(n)
        for k in range(0, n, batch_size):
            idx = perm[k : k + batch_size]
            yield {name: np.array([a[i] for i in idx]) for name, a in arrays.items()}


@contextlib.contextmanager
def torch_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                  workers: int) -> Iterator[Iterator[list]]:
    """DataLoader over a TensorDataset, shuffle=True; its worker processes stop on exit.

    ``persistent_workers`` (with workers) so that small epochs do not pay a restart each: the
    baseline at its best, not its defaults.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(*(torch.from_numpy(a) for a in arrays.values()))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))

    def epochs() -> Generator[list, None, None]:
        while True:
            yield from loader

    gen = epochs()
    try:
        yield gen
    finally:
        gen.close()
        iterator = getattr(loader, "_iterator", None)  # persistent workers live here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # joins with a timeout, then terminates


def measure_in_process(make: Callable[[], contextlib.AbstractContextManager],
                       options: BenchOptions, first_batch: bool) -> Measurement:
    """One in-process row; ``first_batch``: whether its time to first batch means anything."""
    start = time.perf_counter()
    with make() as batches:
        m = consume(batches, options.warmup, options.seconds, start)
    if not first_batch:
        m.first_batch_s = None
    return m


# ---------------------------------------------------------------------------------------------
# batchfeed clients, each in its own (spawned) process.


@dataclass(frozen=True)
class ClientJob:
    """One client process's part of a row."""

    address: str
    batch_size: int
    rank: int
    world_size: int
    fastpath: bool | None
    warmup_s: float
    seconds: float
    seed: int = 0
    curve: tuple[str, str] | None = None  # (client secret key file, server public key file)
    step_s: float = 0.0  # a simulated training step per batch


def client_epochs(client: Any) -> Generator[dict, None, None]:
    """Epoch after epoch of the client's batches (as a training loop would read them)."""
    for epoch in itertools.count():
        it = client.epoch(epoch)
        try:
            yield from it
        finally:
            it.close()


def run_client(row: int, job: ClientJob, messages: Any, go: Any) -> None:
    """One client's part of a row: connect, warm up, say "warm", measure once told to go."""
    try:
        from batchfeed import Client

        start = time.perf_counter()  # the connect starts with the constructor
        with Client(job.address, batch_size=job.batch_size, seed=job.seed, rank=job.rank,
                    world_size=job.world_size, fastpath=job.fastpath, curve=job.curve,
                    reconnect_timeout=10.0,  # a lost server fails the row, not the whole run
                    name=f"bench-rank{job.rank}") as client:
            told: list[bool] = []
            waited: list[float] = []

            def ready() -> bool:
                if not told:
                    messages.put((row, "warm", job.rank, None))
                    told.append(True)
                if go.is_set():
                    waited.append(client.stats()["wait_s"])
                    return True
                return False

            batches = client_epochs(client)
            try:
                m = consume(batches, job.warmup_s, job.seconds, start, ready, job.step_s)
            finally:
                batches.close()
            if m.seconds > 0:
                m.wait_fraction = (client.stats()["wait_s"] - waited[0]) / m.seconds
        messages.put((row, "done", job.rank, asdict(m)))
    except BaseException as exc:  # report everything; the parent decides
        messages.put((row, "error", job.rank, f"{type(exc).__name__}: {exc}\n"
                                              f"{traceback.format_exc(limit=-4)}"))


def client_loop(jobs: Any, messages: Any, go: Any, parent: int) -> None:
    """Body of a pooled client process: run one job after another until None, or orphaned."""
    while True:
        try:
            item = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if item is None:
            return
        row, job = item
        run_client(row, job, messages, go)
        gc.collect()  # unmap the server's ring now, so that it counts in the server's PSS only


class ClientPool:
    """Owns the client processes (spawned once, reused row after row: on a loaded 2-core
    machine each spawn costs about a second).  A row that fails restarts the pool, so that
    no straggler of it can run into the next row.  ``close`` sends None, joins, terminates
    then kills; safe to call twice."""

    def __init__(self, size: int):
        import multiprocessing

        self.size = size
        self._ctx = multiprocessing.get_context("spawn")
        self._row = 0
        self.procs: list = []

    def start(self) -> ClientPool:
        self.messages = self._ctx.Queue()
        self.go = self._ctx.Event()
        self.jobs = [self._ctx.Queue() for _ in range(self.size)]
        for i, jobs in enumerate(self.jobs):
            p = self._ctx.Process(target=client_loop,
                                  args=(jobs, self.messages, self.go, os.getpid()),
                                  name=f"batchfeed-bench-client{i}", daemon=True)
            p.start()
            self.procs.append(p)
        return self

    def run(self, jobs: list[ClientJob], on_go: Callable[[], None] = lambda: None,
            ) -> list[Measurement]:
        """Run one row: all clients warm up, then measure together.  ``on_go`` runs just
        before they are told to go."""
        if not self.procs:
            self.start()
        assert len(jobs) <= self.size
        self._row += 1
        self.go.clear()
        try:
            for i, job in enumerate(jobs):
                self.jobs[i].put((self._row, job))
            self._collect(len(jobs), "warm", CLIENT_START_TIMEOUT)
            on_go()
            self.go.set()
            done = self._collect(len(jobs), "done", max(j.seconds for j in jobs) + 30.0)
        except BaseException:
            self.close()
            raise
        return [Measurement(**done[r]) for r in sorted(done)]

    def _collect(self, n: int, kind: str, timeout: float) -> dict[int, Any]:
        """Wait for ``n`` ``kind`` messages of this row; raise BenchError on an error or a death."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < n:
            try:
                row, what, rank, payload = self.messages.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchError(f"{n - len(got)} client(s) did not report {kind!r} within "
                                     f"{timeout:.0f} s") from None
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise BenchError(
                        f"client process exited with code {dead[0].exitcode}") from None
                continue
            if row != self._row:
                continue
            if what == "error":
                raise BenchError(f"client rank {rank} failed: {payload}")
            if what == kind:
                got[rank] = payload
        return got

    def close(self) -> None:
        if not self.procs:
            return
        self.go.set()  # a client waiting to measure finishes within its budget
        for jobs in self.jobs:
            jobs.put(None)
        for p in self.procs:
            p.join(10.0)
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for q in (self.messages, *self.jobs):
            q.close()
            q.cancel_join_thread()
        self.procs = []

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The server's processes: memory and CPU.


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/PID/task/*/children)."""
    out, i = [pid], 0
    while i < len(out):
        for path in glob.glob(f"/proc/{out[i]}/task/*/children"):
            try:
                with open(path) as f:
                    out += [int(c) for c in f.read().split()]
            except OSError:
                pass  # the task ended meanwhile
        i += 1
    return out


def pss_bytes(pids: list[int]) -> int:
    """Sum of Pss over the processes (shared pages are split between their users)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU of the processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


@dataclass(frozen=True)
class RingInfo:
    workers: int
    slots: int
    slot_bytes: int

    @property
    def ring_bytes(self) -> int:
        return self.slots * self.slot_bytes

    def describe(self) -> str:
        return (f"{self.workers} workers, {self.slots} slots of {self.slot_bytes / MIB:.1f} MiB "
                f"(ring {self.ring_bytes / MIB:.0f} MiB)")


def ring_info(ready_line: str) -> RingInfo | None:
    m = READY_RING_RE.search(ready_line)
    if m is None:
        return None
    return RingInfo(int(m.group(1)), int(m.group(2)),
                    int(float(m.group(3)) * _UNITS[m.group(4)]))


@contextlib.contextmanager
def running_server(args: list[str], bind: str, problems: list[str]) -> Iterator[ServerProcess]:
    """A started server, stopped on exit.  What it logged besides its ready line, and a
    non-zero exit code, are added to ``problems`` (the measurements stand)."""
    server = ServerProcess(args, bind=bind)
    try:
        server.start(timeout=180.0)
        yield server
    finally:
        code = server.stop()
        logged = [line for line in server.output if line != server.ready_line]
        if server.ready_line and (code != 0 or logged):
            pid = server.proc.pid if server.proc is not None else "?"
            problems.append(f"server {pid} at {bind} exited with code {code}"
                            + ("; it logged: " + " | ".join(logged[-8:]) if logged else ""))


# ---------------------------------------------------------------------------------------------
# Rows.


@dataclass
class Row:
    """One line of the table: a measurement and what it is relative to the baselines."""

    name: str
    status: str = "ok"  # "ok", "not installed", or "failed: ..."
    clients: int | None = None
    samples: int | None = None
    nbytes: int | None = None
    seconds: float | None = None
    samples_per_s: float | None = None
    gb_per_s: float | None = None
    vs_raw: float | None = None
    vs_torch2: float | None = None
    client_cpu_s_per_gb: float | None = None
    first_batch_ms: float | None = None
    server_pss_over_data: float | None = None
    server_pss_bytes: int | None = None
    server_cpu_s_per_gb: float | None = None
    client_wait_fraction: float | None = None
    server_pid: int | None = None
    extra_ratio: float | None = None  # the transform rows: relative to 1 worker

    @classmethod
    def from_measurements(cls, name: str, ms: list[Measurement], **extra: Any) -> Row:
        """Aggregate over consumers: rates add up, CPU adds up, first batch is the slowest."""
        nbytes = sum(m.nbytes for m in ms)
        firsts = [m.first_batch_s for m in ms if m.first_batch_s is not None]
        waits = [m.wait_fraction for m in ms if m.wait_fraction is not None]
        return cls(
            name=name, clients=len(ms),
            samples=sum(m.samples for m in ms), nbytes=nbytes,
            seconds=max(m.seconds for m in ms),
            samples_per_s=sum(m.samples / m.seconds for m in ms),
            gb_per_s=sum(m.nbytes / m.seconds for m in ms) / GB,
            client_cpu_s_per_gb=sum(m.cpu_s for m in ms) / (nbytes / GB) if nbytes else None,
            first_batch_ms=max(firsts) * 1e3 if firsts else None,
            client_wait_fraction=sum(waits) / len(waits) if waits else None,
            **extra,
        )


def _guarded(name: str, measure: Callable[[], Row]) -> Row:
    """Run one row; a failure becomes a row saying so (the other rows still run)."""
    try:
        return measure()
    except (BenchError, RuntimeError, OSError) as exc:
        return Row(name, status=f"failed: {exc}".splitlines()[0][:200])


def in_process_rows(w: Workload, arrays: dict[str, np.ndarray], options: BenchOptions,
                    progress: Callable[[str], None]) -> list[Row]:
    bs, seed = w.batch_size, options.seed
    makers: list[tuple[str, Callable, bool]] = [
        (ROW_RAW, lambda: contextlib.nullcontext(raw_batches(arrays, bs, seed)), False),
        (ROW_NAIVE, lambda: contextlib.nullcontext(naive_batches(arrays, bs, seed)), False),
    ]
    try:
        importlib.import_module("torch")
        makers += [(ROW_TORCH0, lambda: torch_batches(arrays, bs, seed, 0), True),
                   (ROW_TORCH2, lambda: torch_batches(arrays, bs, seed, 2), True)]
        torch_ok = True
    except ImportError:
        torch_ok = False
    rows = []
    for name, make, first_batch in makers:
        progress(f"{w.name}: {name}")
        rows.append(_guarded(name, functools.partial(_in_process_row, name, make, options,
                                                     first_batch)))
    if not torch_ok:
        rows += [Row(ROW_TORCH0, status="not installed"), Row(ROW_TORCH2, status="not installed")]
    return rows


def _in_process_row(name: str, make: Callable, options: BenchOptions, first_batch: bool) -> Row:
    return Row.from_measurements(name, [measure_in_process(make, options, first_batch)])


def batchfeed_row(name: str, server: ServerProcess, w: Workload, n_clients: int,
                  fastpath: bool | None, options: BenchOptions, pool: ClientPool,
                  curve: tuple[str, str] | None = None, step_s: float = 0.0) -> Row:
    """Aggregate throughput of ``n_clients`` ranks splitting each epoch (rank/world_size)."""
    assert server.address is not None
    jobs = [ClientJob(server.address, w.batch_size, r, n_clients, fastpath, options.warmup,
                      options.seconds, options.seed, curve, step_s) for r in range(n_clients)]
    cpu0: list[float] = []
    ms = pool.run(jobs, on_go=lambda: cpu0.append(cpu_seconds(process_tree(server.pid))))
    cpu1 = cpu_seconds(process_tree(server.pid))
    pss = pss_bytes(process_tree(server.pid))  # after the row, while the server is still up
    row = Row.from_measurements(name, ms, server_pss_bytes=pss,
                                server_pss_over_data=pss / w.nbytes, server_pid=server.pid)
    if row.nbytes:
        row.server_cpu_s_per_gb = (cpu1 - cpu0[0]) / (row.nbytes / GB)
    return row


def server_rows(w: Workload, data_dir: str | None, work_dir: str, options: BenchOptions,
                pool: ClientPool, progress: Callable[[str], None],
                problems: list[str]) -> tuple[list[Row], dict]:
    """The batchfeed rows: a tcp server for 1, 2, 4 clients, an ipc server for two rows, and
    (tabular only) a tcp server with CURVE encryption."""
    base = ["--workers", str(options.server_workers)]
    base += ["--data", data_dir] if data_dir else ["--synthetic-rows", str(w.rows)]
    plan: list[tuple[str, list, list[str], Any]] = [
        ("tcp://127.0.0.1:0",
         [(ROW_TCP.format(n=n, s="" if n == 1 else "s"), n, None) for n in TCP_CLIENTS], [], None),
        (f"ipc://{work_dir}/bf.sock", [(ROW_IPC_SOCKET, 1, False), (ROW_IPC_FAST, 1, True)], [],
         None)]
    if w.name == "tabular":
        from batchfeed.shared.security import make_keys

        keys = os.path.join(work_dir, "keys")
        make_keys(keys)
        plan.append(("tcp://127.0.0.1:0", [(ROW_CURVE, 1, None)],
                     ["--curve-secret-key", os.path.join(keys, "server.key_secret"),
                      "--authorized-keys", os.path.join(keys, "authorized")],
                     (os.path.join(keys, "client.key_secret"), os.path.join(keys, "server.key"))))
    rows: list[Row] = []
    servers: dict[str, Any] = {}
    for bind, specs, extra, curve in plan:
        progress(f"{w.name}: starting a server at {bind}")
        try:
            with running_server(base + extra, bind, problems) as server:
                ring = ring_info(server.ready_line)
                kind = bind.split(":")[0] + (" + CURVE" if curve else "")
                servers[kind] = {"ready_line": server.ready_line, "pid": server.pid,
                                 "ring": asdict(ring) if ring else None}
                for name, n, fastpath in specs:
                    progress(f"{w.name}: {name}")
                    rows.append(_guarded(name, functools.partial(
                        batchfeed_row, name, server, w, n, fastpath, options, pool, curve)))
                    if name == ROW_TCP.format(n=1, s="") and rows[-1].samples_per_s:
                        # The same service, for a trainer that takes twice as long per batch.
                        step = 2 * w.batch_size / rows[-1].samples_per_s
                        progress(f"{w.name}: {ROW_STALL}")
                        rows.append(_guarded(ROW_STALL, functools.partial(
                            batchfeed_row, ROW_STALL, server, w, 1, None, options, pool,
                            step_s=step)))
        except (BenchError, RuntimeError, OSError) as exc:
            failed = f"failed: {exc}".splitlines()[0][:200]
            done = {r.name for r in rows}
            rows += [Row(name, status=failed) for name, _, _ in specs if name not in done]
    return rows, servers


def add_ratios(rows: list[Row]) -> None:
    by_name = {r.name: r for r in rows}
    for base_name, attr in ((ROW_RAW, "vs_raw"), (ROW_TORCH2, "vs_torch2")):
        base = by_name.get(base_name)
        if base is None or not base.samples_per_s:
            continue
        for r in rows:
            if r.samples_per_s is not None:
                setattr(r, attr, r.samples_per_s / base.samples_per_s)


def run_workload(w: Workload, options: BenchOptions, pool: ClientPool,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    problems: list[str] = []
    try:
        progress(f"{w.name}: making {w.describe()}")
        arrays = w.make_arrays(options.seed)
        data_dir = None
        if not w.synthetic:
            data_dir = os.path.join(work_dir, "data")
            os.mkdir(data_dir)
            for name, a in arrays.items():
                np.save(os.path.join(data_dir, f"{name}.npy"), a)
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


def pss_by_workers(w: Workload, options: BenchOptions, pool: ClientPool,
                   progress: Callable[[str], None], problems: list[str]) -> list[dict[str, Any]]:
    """Server PSS / dataset size with 1, 2 and 4 workers, after one client used the ring."""
    out = []
    for workers in PSS_WORKERS:
        progress(f"server PSS: {workers} worker(s)")
        entry: dict[str, Any] = {"workers": workers}
        try:
            with running_server(["--workers", str(workers), "--synthetic-rows", str(w.rows)],
                                "tcp://127.0.0.1:0", problems) as server:
                assert server.address is not None
                job = ClientJob(server.address, w.batch_size, 0, 1, None, 0.0,
                                min(options.seconds, 0.5), options.seed)
                pool.run([job])
                pss = pss_bytes(process_tree(server.pid))
                ring = ring_info(server.ready_line)
                entry.update(status="ok", pss_bytes=pss, pss_over_data=pss / w.nbytes,
                             ring=asdict(ring) if ring else None, server_pid=server.pid,
                             ready_line=server.ready_line)
        except (BenchError, RuntimeError, OSError) as exc:
            entry["status"] = f"failed: {exc}".splitlines()[0][:200]
        out.append(entry)
    return out


def transform_scaling(w: Workload, options: BenchOptions, pool: ClientPool,
                      progress: Callable[[str], None], problems: list[str]) -> list[Row]:
    """A CPU-heavy server-side transform (crop, flip, normalise, jitter) on the image data,
    with 1 and 2 workers: does worker parallelism pay off?  One client on the fast path."""
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    rows: list[Row] = []
    try:
        data_dir = os.path.join(work_dir, "data")
        os.mkdir(data_dir)
        for name, a in w.make_arrays(options.seed).items():
            np.save(os.path.join(data_dir, f"{name}.npy"), a)
        for workers in TRANSFORM_WORKERS:
            name = ROW_TRANSFORM.format(n=workers, s="" if workers == 1 else "s")
            progress(f"{w.name}: {name}")

            args = ["--workers", str(workers), "--data", data_dir, "--transform", TRANSFORM]
            rows.append(_guarded(name, functools.partial(
                _transform_row, name, args, f"ipc://{work_dir}/t.sock", w, options, pool,
                problems)))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if rows and rows[0].samples_per_s:
        for r in rows:
            if r.samples_per_s:
                r.vs_raw = None
                r.extra_ratio = r.samples_per_s / rows[0].samples_per_s
    return rows


def _transform_row(name: str, args: list[str], bind: str, w: Workload, options: BenchOptions,
                   pool: ClientPool, problems: list[str]) -> Row:
    with running_server(args, bind, problems) as server:
        return batchfeed_row(name, server, w, 1, True, options, pool)


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


# ---------------------------------------------------------------------------------------------
# Output.


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


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _cells(r: Row) -> list[str]:
    return [_fmt(r.samples_per_s, ",.0f"), _fmt(r.gb_per_s, ".3f"), _fmt(r.vs_raw, ".3f"),
            _fmt(r.vs_torch2, ".2f"), _fmt(r.client_cpu_s_per_gb, ".2f"),
            _fmt(r.first_batch_ms, ".0f"), _fmt(r.server_pss_over_data, ".2f")]


def format_table(rows: list[dict]) -> list[str]:
    objs = [Row(**r) for r in rows]
    name_w = max(len("row"), *(len(r.name) for r in objs))
    cells = [_cells(r) for r in objs]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  " + "row".ljust(name_w) + "".join(f"  {c:>{wd}}" for c, wd in zip(COLUMNS, widths))]
    for r, row_cells in zip(objs, cells):
        if r.status != "ok":
            lines.append(f"  {r.name.ljust(name_w)}  {r.status}")
        else:
            lines.append("  " + r.name.ljust(name_w)
                         + "".join(f"  {c:>{wd}}" for c, wd in zip(row_cells, widths)))
    return lines


def format_workload(result: dict, options: BenchOptions) -> list[str]:
    lines = [f"{result['workload']['name']}: {result['description']}; "
             f"{options.seconds:g} s per row after {options.warmup:g} s warm-up"]
    for kind, info in result["servers"].items():
        ring = RingInfo(**info["ring"]) if info["ring"] else None
        lines.append(f"  {kind} server: {ring.describe() if ring else info['ready_line']}")
    lines += format_table(result["rows"])
    stall = next((r for r in result["rows"] if r["name"] == ROW_STALL and r["status"] == "ok"),
                 None)
    if stall is not None and stall["client_wait_fraction"] is not None:
        lines.append(f"  a trainer taking twice as long per batch as the service needs waits "
                     f"{stall['client_wait_fraction']:.2%} of its wall time on data")
    return lines + [f"  problem: {p}" for p in result["problems"]]


def format_pss(entries: list[dict], w: Workload) -> list[str]:
    lines = [f"server PSS / dataset size (tabular, {w.nbytes / MIB:.1f} MiB of data, "
             "after one tcp client ran through the ring)",
             f"  {'workers':>7}  {'ring':>28}  {'server PSS MiB':>14}  {'PSS/data':>8}"]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"  {e['workers']:>7}  {e['status']}")
            continue
        ring = e["ring"]
        ring_s = (f"{ring['slots']} slots of {ring['slot_bytes'] / MIB:.1f} MiB"
                  f" = {ring['slots'] * ring['slot_bytes'] / MIB:.0f} MiB") if ring else "?"
        lines.append(f"  {e['workers']:>7}  {ring_s:>28}  {e['pss_bytes'] / MIB:>14.0f}  "
                     f"{e['pss_over_data']:>8.2f}")
    return lines


LEGEND = """\
  samples/s and GB/s: delivered into the consuming process(es), summed over clients.
  vs raw / vs torch w=2: samples/s relative to those rows of this run.
  client CPU s/GB: CPU seconds of the consuming process(es) (all threads, summed over clients)
    per GB delivered; torch's worker processes, like batchfeed's server, are not counted.
  first batch ms: batchfeed: Client() constructor start to first batch (slowest client);
    torch: iter(DataLoader) to first batch; in-process rows: n/a.
  server PSS/data: Pss of the server and all its children / dataset bytes, after the row.
  torch workers=2 uses persistent_workers=True; batchfeed servers run --workers {workers}."""


# ---------------------------------------------------------------------------------------------
# Entry point.


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def run(options: BenchOptions, out: Callable[[str], None] = print) -> int:
    """Run the bench, print the tables, write ``--json``; 0 if every row was measured."""
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # clean up servers and temp data

    def progress(msg: str) -> None:
        print(f"  ... {time.perf_counter() - started:6.1f} s  {msg}", file=sys.stderr, flush=True)

    pool = ClientPool(max(TCP_CLIENTS))  # started at the first batchfeed row
    try:
        for line in header_lines():
            out(line)
        all_workloads = workloads(options.quick)
        results: dict[str, Any] = {"header": header_lines(), "options": asdict(options),
                                   "workloads": {}, "pss_by_workers": None, "problems": []}
        for name in options.workloads:
            result = run_workload(all_workloads[name], options, pool, progress)
            results["workloads"][name] = result
            out("")
            for line in format_workload(result, options):
                out(line)
        if "image" in options.workloads:
            problems = results["problems"]
            trows = transform_scaling(all_workloads["image"], options, pool, progress, problems)
            results["transform_scaling"] = [asdict(r) for r in trows]
            out("")
            for line in format_transform(results["transform_scaling"]):
                out(line)
        if "tabular" in options.workloads:
            problems = results["problems"]
            entries = pss_by_workers(all_workloads["tabular"], options, pool, progress, problems)
            results["pss_by_workers"] = entries
            out("")
            for line in format_pss(entries, all_workloads["tabular"]) + [
                    f"  problem: {p}" for p in problems]:
                out(line)
        out("")
        out(LEGEND.format(workers=options.server_workers))
        elapsed = time.perf_counter() - started
        results["elapsed_s"] = elapsed
        out(f"bench took {elapsed:.1f} s")
        if options.json_path:
            with open(options.json_path, "w") as f:
                json.dump(results, f, indent=2)
                f.write("\n")
        failed = [r["name"] for res in results["workloads"].values() for r in res["rows"]
                  if r["status"].startswith("failed")]
        failed += [f"pss {e['workers']}" for e in results["pss_by_workers"] or []
                   if e["status"] != "ok"]
        failed += [r["name"] for r in results.get("transform_scaling", [])
                   if r["status"].startswith("failed")]
        failed += results["problems"]
        failed += [p for res in results["workloads"].values() for p in res["problems"]]
        return 1 if failed else 0
    except (_Terminated, KeyboardInterrupt):
        print("batchfeed bench: interrupted; servers stopped, temporary data removed",
              file=sys.stderr)
        return 130
    finally:
        pool.close()
        signal.signal(signal.SIGTERM, previous)
