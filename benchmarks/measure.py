"""The consumer every row runs (the same minimal work: iterate and count, never copy), what one
consumer measures, and the CPU clocks a row reads around its measured window."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from .common import GB, BenchError, Row


@dataclass
class Measurement:
    """What one consumer saw in its measured window (warm-up excluded)."""

    samples: int = 0  # what the section counts: rows, tokens or images
    nbytes: int = 0  # bytes delivered (the token section: token positions, padding included)
    batches: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0  # process CPU (all its threads) during the window
    first_batch_s: float | None = None  # from ``start`` to the first batch
    wait_fraction: float | None = None  # batchfeed clients: share of the window spent waiting


def count_arrays(batch: Any) -> tuple[int, int]:
    """(rows, bytes) of a batch: a dict of arrays or a sequence of arrays or tensors (torch's
    ``nbytes`` too).  Never copies."""
    arrays = batch.values() if isinstance(batch, dict) else batch
    rows = -1
    nbytes = 0
    for a in arrays:
        nbytes += a.nbytes
        if rows < 0:
            rows = len(a)
    return rows, nbytes


def consume(batches: Iterator, warmup_s: float, seconds: float, start: float,
            ready: Callable[[], bool] | None = None, step_s: float = 0.0,
            count: Callable[[Any], tuple[int, int]] = count_arrays) -> Measurement:
    """Iterate: warm up for ``warmup_s`` after the first batch (and until ``ready()``), then
    count (``count(batch)``: samples and bytes) for ``seconds``.  ``step_s`` simulates a
    training step per batch that leaves the CPU free, as a step waiting on a GPU does (slept
    in pieces of >= 1 ms)."""
    m = Measurement()
    warm_until = None
    for batch in batches:
        count(batch)
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
    debt = 0.0
    for batch in batches:
        samples, size = count(batch)
        m.samples += samples
        m.nbytes += size
        m.batches += 1
        if step_s:
            debt += step_s
            if debt >= 0.001:
                time.sleep(debt)
                debt = 0.0
        if time.perf_counter() >= end:
            break
    m.seconds = time.perf_counter() - t0
    m.cpu_s = time.process_time() - cpu0
    return m


def epochs_of(loader: Any) -> Generator[Any, None, None]:
    """Epoch after epoch of an iterable loader (a DataLoader, a peer's pipeline)."""
    while True:
        yield from loader


def client_epochs(client: Any) -> Generator[dict, None, None]:
    """Epoch after epoch of a batchfeed client's batches (as a training loop would read them)."""
    for epoch in itertools.count():
        it = client.epoch(epoch)
        try:
            yield from it
        finally:
            it.close()


def samples_row(name: str, ms: list[Measurement], setup: str = "", **values: Any) -> Row:
    """The row of one or more consumers: rates add up, CPU adds up, first batch is the
    slowest.  ``values``: samples, GB/s, client CPU s/GB, first batch ms, wait, and ``values``."""
    nbytes = sum(m.nbytes for m in ms)
    firsts = [m.first_batch_s for m in ms if m.first_batch_s is not None]
    waits = [m.wait_fraction for m in ms if m.wait_fraction is not None]
    return Row(name, setup=setup, rate=sum(m.samples / m.seconds for m in ms), values={
        "clients": len(ms), "samples": sum(m.samples for m in ms), "nbytes": nbytes,
        "seconds": max(m.seconds for m in ms),
        "batches_per_s": sum(m.batches / m.seconds for m in ms),
        "gb_per_s": sum(m.nbytes / m.seconds for m in ms) / GB,
        "client_cpu_s_per_gb": sum(m.cpu_s for m in ms) / (nbytes / GB) if nbytes else None,
        "first_batch_ms": max(firsts) * 1e3 if firsts else None,
        "client_wait_fraction": sum(waits) / len(waits) if waits else None, **values})


def machine_busy_seconds() -> float:
    """The CPU seconds all cores of this machine have been busy since boot (/proc/stat: user,
    nice, system, irq, softirq and steal, the time the hypervisor gave to other guests)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
