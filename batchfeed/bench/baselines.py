"""The in-process rows, the baselines batchfeed is compared with: the raw copy limit
(``np.take`` into a preallocated batch), a naive per-sample loop, and torch's DataLoader with 0
and 2 workers (whose worker processes are shut down when their row ends); and the ratios of
every row to the first and the last of these."""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Callable, Generator, Iterator

import numpy as np

from .measure import Measurement, Row, consume, guarded
from .workloads import BenchOptions, Workload

ROW_RAW = "raw np.take copy (1 thread)"
ROW_NAIVE = "naive per-sample loop"
ROW_TORCH0 = "torch DataLoader workers=0"
ROW_TORCH2 = "torch DataLoader workers=2"


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
        rows.append(guarded(name, functools.partial(_in_process_row, name, make, options,
                                                    first_batch)))
    if not torch_ok:
        rows += [Row(ROW_TORCH0, status="not installed"), Row(ROW_TORCH2, status="not installed")]
    return rows


def _in_process_row(name: str, make: Callable, options: BenchOptions, first_batch: bool) -> Row:
    return Row.from_measurements(name, [measure_in_process(make, options, first_batch)])


def add_ratios(rows: list[Row]) -> None:
    """Set every measured row's ``vs_raw`` and ``vs_torch2`` (samples/s over theirs)."""
    by_name = {r.name: r for r in rows}
    for base_name, attr in ((ROW_RAW, "vs_raw"), (ROW_TORCH2, "vs_torch2")):
        base = by_name.get(base_name)
        if base is None or not base.samples_per_s:
            continue
        for r in rows:
            if r.samples_per_s is not None:
                setattr(r, attr, r.samples_per_s / base.samples_per_s)
