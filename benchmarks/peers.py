"""The peers a user would pick instead of batchfeed, each in its fastest documented setup for
the job, measured in the same run as batchfeed.  Every peer is optional: one that does not
import is a skipped row whose status says how to install it.

- torchdata 0.11 ``nodes`` (the successor of DataPipes): a ``SamplerWrapper`` over a
  ``BatchSampler``, a thread ``ParallelMapper`` that gathers a whole batch per call (numpy
  releases the GIL while it copies), a ``Prefetcher``, a ``Loader``;
- SPDL 0.8 (``spdl.pipeline``): an async pipeline whose source yields the batches' index
  lists and whose one stage gathers each batch on a thread pool, with a sink buffer.

Their thread counts are the ones that ran fastest on this 2-core machine; SPDL hands batches
out as they complete (``output_order="completion"``, its default), torchdata in order.  The
JPEG section's SPDL row (FFmpeg's decoder and filters) is in ``jpeg_peers.py``.

Ray Data's rows are ``InProcess`` plans too (``ray_peers.py``, with ``RAY_HINT``), measured in
the Ray section (``ray_bench.py``) beside batchfeed on Ray, in the one Ray instance that section
starts (not here: a Ray start per workload would cost more than its rows).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .inprocess import InProcess

ROW_TORCHDATA = "torchdata nodes, {n} threads"
ROW_SPDL = "SPDL pipeline, {n} threads"
# What ran fastest here on the tabular job, of 1, 2 and 4 threads (SPDL: and both orders).
TORCHDATA_THREADS = 4
SPDL_THREADS = 2
PREFETCH = 8  # batches buffered ahead, as batchfeed's client does by default at least
TORCHDATA_HINT = "not installed: pip install torchdata==0.11.0 (after torch, so pip keeps it)"
SPDL_HINT = "not installed: pip install spdl==0.8.0"
SPDL_IO_HINT = ("spdl.io needs FFmpeg's libraries: apt-get install libavutil57 libavcodec59 "
                "libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4")
RAY_HINT = "not installed: pip install 'batchfeed[ray]'"  # the Ray section (ray_bench.py)


def importable(module: str) -> bool:
    """Whether ``module`` imports (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def epoch_index_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """The index lists of a fresh permutation per epoch, epoch after epoch."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for k in range(0, n, batch_size):
            yield perm[k : k + batch_size]


def gather(arrays: dict[str, np.ndarray], idx: Any) -> dict[str, np.ndarray]:
    """One batch: each field gathered with one ``np.take`` (a fresh array, as a loader that
    hands batches to another thread must make)."""
    idx = np.asarray(idx, np.int64)
    return {k: np.take(a, idx, axis=0) for k, a in arrays.items()}


@contextlib.contextmanager
def torchdata_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                      threads: int) -> Iterator[Iterator[Any]]:
    import torch
    from torch.utils.data import BatchSampler, RandomSampler
    from torchdata.nodes import Loader, ParallelMapper, Prefetcher, SamplerWrapper

    n = len(next(iter(arrays.values())))
    sampler = BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(seed)),
                           batch_size, drop_last=False)
    mapper = ParallelMapper(SamplerWrapper(sampler), functools.partial(gather, arrays),
                            num_workers=threads, method="thread", in_order=True)
    prefetcher = Prefetcher(mapper, prefetch_factor=PREFETCH)
    loader = Loader(prefetcher)

    def epochs() -> Generator[Any, None, None]:
        while True:
            yield from loader

    gen = epochs()
    try:
        yield gen
    finally:
        gen.close()
        for part in (prefetcher, mapper):  # join their threads (torchdata 0.11 has no close())
            inner = getattr(part, "_it", None)
            while inner is not None:  # ParallelMapper -> _ParallelMapperImpl -> its iterator
                if hasattr(inner, "_shutdown"):
                    inner._shutdown()
                inner = getattr(inner, "_it", None)


@contextlib.contextmanager
def spdl_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                 threads: int) -> Iterator[Iterator[Any]]:
    from spdl.pipeline import PipelineBuilder

    n = len(next(iter(arrays.values())))
    builder: Any = PipelineBuilder()  # its generic types do not follow a chain of stages
    pipeline = (builder
                .add_source(epoch_index_batches(n, batch_size, seed))
                .pipe(functools.partial(gather, arrays), concurrency=threads)
                .add_sink(PREFETCH)
                .build(num_threads=threads))
    with pipeline.auto_stop():
        yield pipeline.get_iterator(timeout=120)


def tabular_plans(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> list[InProcess]:
    """The peers' rows of the loaders section (tabular, image and large workloads)."""
    from .inprocess import InProcess

    td, sp = version("torchdata"), version("spdl-core") or version("spdl")
    return [
        InProcess(PEER_ROWS[0],
                  functools.partial(torchdata_batches, arrays, batch_size, seed,
                                    TORCHDATA_THREADS),
                  f"torchdata {td}: Loader(Prefetcher(ParallelMapper(SamplerWrapper(BatchSampler"
                  f"(RandomSampler, {batch_size})), gather, num_workers={TORCHDATA_THREADS}, "
                  f"method='thread'), prefetch_factor={PREFETCH}))",
                  missing=None if importable("torchdata.nodes") else TORCHDATA_HINT),
        InProcess(PEER_ROWS[1],
                  functools.partial(spdl_batches, arrays, batch_size, seed, SPDL_THREADS),
                  f"SPDL {sp}: PipelineBuilder().add_source(index batches).pipe(gather, "
                  f"concurrency={SPDL_THREADS}).add_sink({PREFETCH})"
                  f".build(num_threads={SPDL_THREADS})",
                  missing=None if importable("spdl.pipeline") else SPDL_HINT),
    ]


PEER_ROWS = (ROW_TORCHDATA.format(n=TORCHDATA_THREADS), ROW_SPDL.format(n=SPDL_THREADS))
