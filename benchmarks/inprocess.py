"""The in-process rows of the loaders section, the baselines batchfeed is compared with: the
raw copy limit (``np.take`` into a preallocated batch, one thread), a naive per-sample loop,
torch's DataLoader as most code uses it (a ``TensorDataset`` read sample by sample, collated),
and torch's DataLoader configured for speed (a ``BatchSampler`` whose dataset takes the whole
list of indices, ``__getitems__``), each with 0 and 2 workers; then the peers (``peers.py``).
A DataLoader's worker processes are shut down when its row ends."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import peers
from .common import Row, guarded
from .measure import consume, epochs_of, samples_row
from .workloads import BenchOptions, Workload

ROW_RAW = "raw np.take copy (1 thread)"
ROW_NAIVE = "naive per-sample loop"
ROW_TORCH0 = "torch DataLoader per-sample, workers=0"
ROW_TORCH2 = "torch DataLoader per-sample, workers=2"
ROW_BATCHED0 = "torch DataLoader batched, workers=0"
ROW_BATCHED2 = "torch DataLoader batched, workers=2"
TORCH_ROWS = (ROW_TORCH0, ROW_TORCH2, ROW_BATCHED0, ROW_BATCHED2)
TORCH_HINT = ("not installed: pip install torch==2.13.0 --index-url "
              "https://download.pytorch.org/whl/cpu")


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


class BatchGather:
    """A torch map-style ``Dataset`` that reads a whole batch at once: ``__getitems__`` takes
    the sampler's list of indices and gathers each field with one ``np.take`` (torch's fetcher
    calls it instead of ``__getitem__`` per sample), returning tensors that share its memory."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        import torch

        idx = np.fromiter(indices, np.int64, len(indices))
        return {k: torch.from_numpy(np.take(a, idx, axis=0)) for k, a in self.arrays.items()}


def as_is(batch: Any) -> Any:
    """A ``collate_fn`` for datasets that return whole batches: nothing left to collate."""
    return batch


@contextlib.contextmanager
def torch_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, workers: int,
                  batched: bool) -> Iterator[Iterator[Any]]:
    """Epoch after epoch of a shuffled DataLoader, its worker processes stopped on exit.

    Per-sample: a ``TensorDataset`` and the default collate.  Batched: ``BatchGather`` (each
    batch one ``__getitems__`` call) with no collate.  With workers: ``persistent_workers`` (so
    that small epochs do not pay a restart each) and the default prefetch: the baseline at its
    best, not its defaults.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    dataset: Any = (BatchGather(arrays) if batched
                    else TensorDataset(*(torch.from_numpy(a) for a in arrays.values())))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0,
                        collate_fn=as_is if batched else None,
                        generator=torch.Generator().manual_seed(seed))
    gen = epochs_of(loader)
    try:
        yield gen
    finally:
        gen.close()
        shutdown_loader(loader)


def shutdown_loader(loader: Any) -> None:
    """Stop a DataLoader's persistent workers (joins with a timeout, then terminates)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


@dataclass(frozen=True)
class InProcess:
    """An in-process row: how to make its batches (a context manager giving an iterator), how
    it is set up, whether its time to the first batch means anything, and the install hint if
    its library is missing (None: it is there)."""

    name: str
    make: Callable[[], contextlib.AbstractContextManager]
    setup: str
    first_batch: bool = True
    missing: str | None = None


def _torch_missing() -> str | None:
    return None if peers.importable("torch") else TORCH_HINT


def in_process_plans(arrays: dict[str, np.ndarray], bs: int, seed: int) -> list[InProcess]:
    missing = _torch_missing()
    plans = [
        InProcess(ROW_RAW, lambda: contextlib.nullcontext(raw_batches(arrays, bs, seed)),
                  "", first_batch=False),
        InProcess(ROW_NAIVE, lambda: contextlib.nullcontext(naive_batches(arrays, bs, seed)),
                  "", first_batch=False)]
    for name, workers, batched in ((ROW_TORCH0, 0, False), (ROW_TORCH2, 2, False),
                                   (ROW_BATCHED0, 0, True), (ROW_BATCHED2, 2, True)):
        how = ("BatchGather dataset (__getitems__: one np.take per field), collate_fn=as_is"
               if batched else "TensorDataset, default collate (the usual way)")
        extra = ", persistent_workers=True" if workers else ""
        plans.append(InProcess(
            name, functools.partial(torch_batches, arrays, bs, seed, workers, batched),
            f"DataLoader({how}, batch_size={bs}, shuffle=True, num_workers={workers}{extra})",
            missing=missing))
    return plans + peers.tabular_plans(arrays, bs, seed)


def measure_in_process(plan: InProcess, options: BenchOptions) -> Row:
    start = time.perf_counter()
    with plan.make() as batches:
        m = consume(batches, options.warmup, options.seconds, start)
    if not plan.first_batch:
        m.first_batch_s = None
    return samples_row(plan.name, [m], plan.setup)


def in_process_rows(w: Workload, arrays: dict[str, np.ndarray], options: BenchOptions,
                    progress: Callable[[str], None]) -> list[Row]:
    rows = []
    for plan in in_process_plans(arrays, w.batch_size, options.seed):
        if plan.missing is not None:
            rows.append(Row.skipped(plan.name, plan.missing))
            continue
        progress(f"{w.name}: {plan.name}")
        rows.append(guarded(plan.name, functools.partial(measure_in_process, plan, options)))
    return rows
