"""Epoch-boundary stalls: how long a trainer waits for the first batch of each epoch after the
first, on a tiny dataset (many short epochs) and a larger one, over tcp and on the same-host
fast path.  The stream runs on across epochs, so the next epoch should already be on its way
when the trainer gets there: the goal is a wait under ``STALL_GOAL_MS``.

One server per transport serves both datasets (``--data tiny=... --data large=...``); the
trainer is a ``Client`` in this process that takes a simulated training step (a sleep, which
leaves the CPU free as a step waiting on a GPU does) per batch, so that the service keeps
ahead of it and only what happens at the boundary can make it wait.  Each server is stopped,
and the temporary data removed, when the table is done (also on an error).
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .common import ROW_ERRORS, Column, Row, failed_status, guarded, row_table
from .servers import running_server

STALL_GOAL_MS = 5.0
STALL_EPOCHS = 20  # epochs measured, after the first


@dataclass(frozen=True)
class StallCase:
    """A dataset (``x``: float32[64], ``y``: int64), how it is read, and the trainer's step."""

    name: str
    rows: int
    batch_size: int
    step_s: float  # simulated training step per batch

    def describe(self) -> str:
        bpe = -(-self.rows // self.batch_size)
        return f"{self.name} ({self.rows:,} rows, {bpe} batches of {self.batch_size})"


CASES = (StallCase("tiny", 2_000, 256, 0.001), StallCase("large", 100_000, 1024, 0.0005))
TRANSPORTS = (("tcp", "tcp://127.0.0.1:0", False), ("fast path", "ipc://{dir}/stall.sock", True))


def _write(case: StallCase, directory: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    path = os.path.join(directory, case.name)
    os.mkdir(path)
    np.save(os.path.join(path, "x.npy"), rng.standard_normal((case.rows, 64), np.float32))
    np.save(os.path.join(path, "y.npy"), rng.integers(0, 10, case.rows, dtype=np.int64))
    return path


def measure_stalls(address: str, case: StallCase, transport: str, fastpath: bool,
                   epochs: int = STALL_EPOCHS, seed: int = 0) -> Row:
    """Read ``epochs + 1`` epochs, timing each ``next()``; the first epoch warms up."""
    from batchfeed import Client

    firsts: list[float] = []
    others: list[float] = []
    with Client(address, batch_size=case.batch_size, seed=seed, dataset=case.name,
                fastpath=fastpath, reconnect_timeout=10.0, name="bench-stalls") as client:
        for epoch in range(epochs + 1):
            it = client.epoch(epoch)
            for k in range(len(it)):
                t0 = time.perf_counter()
                batch = next(it)
                waited = time.perf_counter() - t0
                if epoch > 0:
                    (firsts if k == 0 else others).append(waited)
                del batch
                time.sleep(case.step_s)
        bpe, prefetch = client.batches_per_epoch, client.prefetch
    return Row(row_name(case, transport), values={
        "dataset": case.name, "transport": transport, "batches_per_epoch": bpe,
        "prefetch": prefetch, "epochs": epochs, "first_median_ms": statistics.median(firsts) * 1e3,
        "first_max_ms": max(firsts) * 1e3,
        "other_median_ms": statistics.median(others) * 1e3 if others else None})


def row_name(case: StallCase, transport: str) -> str:
    return f"{case.describe()}, {transport}"


def epoch_stalls(server_workers: int, seed: int, progress: Callable[[str], None],
                 problems: list[str], epochs: int = STALL_EPOCHS) -> list[Row]:
    """The table's rows: every case over every transport."""
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    rows: list[Row] = []
    try:
        args = ["--workers", str(server_workers)]
        for case in CASES:
            args += ["--data", f"{case.name}={_write(case, work_dir, seed)}"]
        for transport, bind, fastpath in TRANSPORTS:
            bind = bind.format(dir=work_dir)
            progress(f"epoch-boundary stalls: starting a server at {bind}")
            done = 0
            try:
                with running_server(args, bind, problems) as server:
                    assert server.address is not None
                    for case in CASES:
                        progress(f"epoch-boundary stalls: {case.name} over {transport}")
                        rows.append(guarded(row_name(case, transport), functools.partial(
                            measure_stalls, server.address, case, transport, fastpath, epochs,
                            seed)))
                        done += 1
            except ROW_ERRORS as exc:
                rows += [Row(row_name(case, transport), status=failed_status(exc))
                         for case in CASES[done:]]
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return rows


COLUMNS = [Column("prefetch", "prefetch", "d"), Column("epochs", "epochs", "d"),
           Column("median ms", "first_median_ms", ".2f"), Column("max ms", "first_max_ms", ".2f"),
           Column("other batches median ms", "other_median_ms", ".3f")]


def format_stalls(rows: list[dict]) -> list[str]:
    steps = " and ".join(f"{c.step_s * 1e3:g} ms ({c.name})" for c in CASES)
    return [f"epoch-boundary stalls: the wait for the first batch of each epoch after the first "
            f"(goal < {STALL_GOAL_MS:g} ms)",
            f"  the trainer sleeps a step of {steps} per batch; 'other batches' is the wait "
            "for every other batch",
            *row_table(COLUMNS, [Row.from_dict(r) for r in rows], "dataset, transport")]
