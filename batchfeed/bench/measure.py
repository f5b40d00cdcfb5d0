"""The consumer every row runs (the same minimal work: iterate and count bytes, never copy),
what one consumer measures, and the table row that its measurements become."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .workloads import GB


class BenchError(Exception):
    """A row could not be measured (a server or client failed); the message says why."""


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
    arrays = batch.values() if isinstance(batch, dict) else batch
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


def failed_status(exc: BaseException) -> str:
    """A row's (or entry's) status for a failure: its first line, at most 200 characters."""
    return f"failed: {exc}".splitlines()[0][:200]


def guarded(name: str, measure: Callable[[], Row]) -> Row:
    """Run one row; a failure becomes a row saying so (the other rows still run)."""
    try:
        return measure()
    except (BenchError, RuntimeError, OSError) as exc:
        return Row(name, status=failed_status(exc))
