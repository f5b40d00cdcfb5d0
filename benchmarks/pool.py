"""The batchfeed clients of a row, each in its own spawned process.

``ClientPool`` owns them: spawned once (a pool of four) and reused row after row; in each row
they all warm up, then measure the same window.  A row that fails restarts the pool.  ``close``
sends each client None, then stops it with the ``shared.procs`` ladder (join, terminate, kill).
``client_loop`` is the body of a client process: spawn imports it by its module path,
``benchmarks.pool``.
"""

from __future__ import annotations

import gc
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from batchfeed.shared.procs import stop_process

from .common import BenchError
from .measure import Measurement, client_epochs, consume

CLIENT_START_TIMEOUT = 60.0  # spawning and connecting, on a loaded 2-core machine


def collect_reports(messages: Any, procs: list, n: int, kind: str, timeout: float,
                    parse: Callable[[Any], tuple | None], who: str) -> dict[int, Any]:
    """Wait for ``n`` ``kind`` reports ``(what, rank, payload)`` from ``procs`` on the queue
    ``messages`` (``parse`` turns a message into one, or None to skip it); BenchError on an
    "error" report, a dead process or the timeout."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            report = parse(messages.get(timeout=0.25))
        except queue.Empty:
            if time.monotonic() > deadline:
                raise BenchError(f"{n - len(got)} {who}(s) did not report {kind!r} within "
                                 f"{timeout:.0f} s") from None
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise BenchError(f"{who} process exited with code {dead[0].exitcode}") from None
            continue
        if report is None:
            continue
        what, rank, payload = report
        if what == "error":
            raise BenchError(f"{who} rank {rank} failed: {payload}")
        if what == kind:
            got[rank] = payload
    return got


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
        row = self._row
        return collect_reports(self.messages, self.procs, n, kind, timeout,
                               lambda m: m[1:] if m[0] == row else None, "client")

    def close(self) -> None:
        if not self.procs:
            return
        self.go.set()  # a client waiting to measure finishes within its budget
        for jobs in self.jobs:
            jobs.put(None)
        for p in self.procs:
            stop_process(p, 10.0, terminate_wait=2.0, kill_wait=2.0)
        for q in (self.messages, *self.jobs):
            q.close()
            q.cancel_join_thread()
        self.procs = []

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
