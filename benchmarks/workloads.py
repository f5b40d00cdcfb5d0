"""What a bench run measures on: its options (validated once, by ``__main__``) and the three
loader workloads, each a dataset (made in memory here, then served or copied) and a batch size."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from batchfeed.shared.errors import InvalidRequest

from .common import GB, MIB

# The first three are the loaders section (loaders.py); the others are sections of their own
# (run.SECTIONS: tokens.py, jpeg.py, shard_servers.py, fingerprint_cost.py, ray_bench.py; and
# stalls.py).
WORKLOAD_NAMES = ("tabular", "image", "large", "tokens", "jpeg", "shards", "stalls",
                  "fingerprint", "ray")


@dataclass(frozen=True)
class BenchOptions:
    """What to run, validated once (by ``__main__``)."""

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


def save_arrays(arrays: dict[str, np.ndarray], directory: str) -> str:
    """Write each array to a new ``directory`` as NAME.npy (what ``serve --data`` reads)."""
    os.mkdir(directory)
    for name, a in arrays.items():
        np.save(os.path.join(directory, f"{name}.npy"), a)
    return directory
