"""The Ray section (``--workload ray``): the tabular job and the JPEG job through Ray Data
(``ray_peers``) and through batchfeed on Ray (``batchfeed.ray``), in one Ray instance, same run.

Ray runs as a one-node cluster on this host (``batchfeed.ray_local.simulated_cluster``: loopback
only, no dashboard, as many logical CPUs as this machine has cores, an object store big enough
for Ray Data's copy of the data and its shuffle).  The rows, per job:

- tabular (the ``tabular`` workload: 1M rows of 64 float32 and an int64 label, batches of 256):
  Ray Data with ``random_shuffle()`` per epoch (a true full shuffle), Ray Data with a local
  shuffle buffer (stated: not a full shuffle), and batchfeed on Ray: one loader actor
  (``start_loaders`` of the data as .npy files, ``--workers`` workers, the job's CURVE keys)
  read by a ``Client`` in this process (the driver) over tcp, then on the same-host fast path;
- JPEG (the JPEG section's 64px set, 5,000 of its images, decode + random-resized-crop to 32 +
  flip + normalise):
  Ray Data (``map_batches`` after ``random_shuffle``) and batchfeed on Ray over tcp.

Every row is timed from nothing (its first batch includes Ray Data's materialize or the loader's
start), starts once Ray's CPUs are idle, and is measured over the JPEG section's window (at
least 1 s of warm-up and 5 s: Ray Data's shuffles are long); the rows take turns twice, and
each keeps its best round (the machine is shared).  Loaders are stopped by their ``with``
block, the cluster by its own, the data directories removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import Any

from .common import Column, Goal, Row, add_ratio, by_name, goal_lines, guarded, row_table
from .inprocess import InProcess, measure_in_process
from .jpeg import window
from .jpeg_data import image_sets, write_image_set
from .measure import client_epochs, usable_cores
from .peers import version
from .ray_peers import jpeg_batches, jpeg_setup, ray_missing, tabular_batches, tabular_setup
from .workloads import BenchOptions, save_arrays, workloads

ROUNDS = 2  # each row runs this often (rows in turn) and keeps its best round (not --quick)
GOAL = 3.0  # batchfeed on Ray (tcp) over Ray Data with a full shuffle, on both jobs
ROW_RD_FULL = "Ray Data, random_shuffle per epoch"
ROW_RD_BUFFER = "Ray Data, local shuffle buffer (not full)"
ROW_BF_TCP = "batchfeed on Ray, tcp + CURVE"
ROW_BF_PLAIN = "batchfeed on Ray, tcp, no CURVE"
ROW_BF_FAST = "batchfeed on Ray, fast path"
ROW_RD_JPEG = "Ray Data, decode + crop"
ROW_BF_JPEG = "batchfeed on Ray, decode + crop, tcp + CURVE"
# batchfeed first: Ray Data's executor may still be busy for a while after its row ends.
TABULAR_ROWS = (ROW_BF_TCP, ROW_BF_PLAIN, ROW_BF_FAST, ROW_RD_FULL, ROW_RD_BUFFER)
JPEG_ROWS = (ROW_BF_JPEG, ROW_RD_JPEG)
MIB = 2**20
JPEG_IMAGES = 5_000  # the job (the JPEG section's 20,000 need more descriptors than
# a host with a 20,000-descriptor hard limit gives a server: it holds every file open)


@contextlib.contextmanager
def batchfeed_batches(data: str, batch_size: int, seed: int, fastpath: bool,
                      workers: int, curve: bool = True, **server_options: Any
                      ) -> Iterator[Iterator[Any]]:
    """One loader actor of ``data`` (a path), read by a client in this process; without
    ``curve`` it binds the node's address (loopback here) without keys."""
    import batchfeed.ray as bfray

    with bfray.start_loaders(data, workers=workers, curve=curve, **server_options) as loaders, \
            loaders.handle.client(batch_size=batch_size, seed=seed, fastpath=fastpath,
                                  rank=0, world_size=1, track=False,
                                  reconnect_timeout=10.0) as client:
        batches = client_epochs(client)
        try:
            yield batches
        finally:
            batches.close()


def measure(plan: InProcess, options: BenchOptions) -> Row:
    warmup, seconds = window(options)
    row = measure_in_process(plan, replace(options, warmup=warmup, seconds=seconds))
    row.setup = plan.setup
    return row


def tabular_plans(data_dir: str, arrays: dict, options: BenchOptions) -> list[InProcess]:
    bs, seed, w = 256, options.seed, options.server_workers
    missing = ray_missing()
    bf = (f"start_loaders(.npy dir, workers={w}{{}}); Client(handle, batch_size={bs}, "
          "shuffle='full') in the driver")
    return [
        InProcess(ROW_BF_TCP, functools.partial(batchfeed_batches, data_dir, bs, seed, False, w),
                  bf.format("") + ", fastpath=False: the job's CURVE keys (the default)",
                  missing=missing),
        InProcess(ROW_BF_PLAIN, functools.partial(batchfeed_batches, data_dir, bs, seed, False,
                                                  w, curve=False),
                  bf.format(", curve=False") + ", fastpath=False: plain tcp, as on a trusted "
                  "network", missing=missing),
        InProcess(ROW_BF_FAST, functools.partial(batchfeed_batches, data_dir, bs, seed, True, w),
                  bf.format("") + ", fastpath=True (the driver is on the loader's node)",
                  missing=missing),
        InProcess(ROW_RD_FULL, functools.partial(tabular_batches, arrays, bs, seed, "full"),
                  tabular_setup(bs, "full"), missing=missing),
        InProcess(ROW_RD_BUFFER, functools.partial(tabular_batches, arrays, bs, seed, "buffer"),
                  tabular_setup(bs, "buffer"), missing=missing),
    ]


def jpeg_plans(directory: str, spec: Any, options: BenchOptions) -> list[InProcess]:
    w = options.server_workers
    missing = ray_missing()
    return [
        InProcess(ROW_BF_JPEG, functools.partial(
            batchfeed_batches, directory, spec.batch_size, options.seed, False, w,
            transforms=(spec.transform,), slot_bytes=spec.slot_mb * MIB),
            f"start_loaders(folder, workers={w}, transforms=[{spec.transform}]), CURVE; "
            f"Client(handle, batch_size={spec.batch_size}, fastpath=False) in the driver",
            missing=missing),
        InProcess(ROW_RD_JPEG, functools.partial(jpeg_batches, directory, spec.crop,
                                                 spec.batch_size, options.seed),
                  jpeg_setup(spec.crop, spec.batch_size), missing=missing),
    ]


def settle(timeout: float = 30.0) -> None:
    """Wait (bounded) until no Ray task holds a CPU: Ray Data's executor may go on for a while
    after its iterator is closed, and the next row should not share the cores with it."""
    import gc

    import ray

    gc.collect()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.2)


def run_plans(plans: list[InProcess], job: str, options: BenchOptions,
              progress: Callable[[str], None]) -> list[Row]:
    """Each plan's row: the rows take turns, ``ROUNDS`` times over (once with ``--quick``), and
    each keeps its best round, as the JPEG section does (the machine is shared)."""
    tries: dict[str, list[Row]] = {plan.name: [] for plan in plans}
    for round_ in range(1 if options.quick else ROUNDS):
        for plan in plans:
            if plan.missing is not None:
                tries[plan.name] = [Row.skipped(plan.name, plan.missing, job=job)]
                continue
            settle()
            progress(f"ray: {job}: {plan.name} (round {round_ + 1})")
            row = guarded(plan.name, functools.partial(measure, plan, options), job=job)
            row.values["job"] = job
            tries[plan.name].append(row)
    rows = [best(rows) for rows in tries.values()]
    base = by_name(r for r in rows if r.rate).get(ROW_RD_FULL if job == "tabular"
                                                   else ROW_RD_JPEG)
    add_ratio(rows, "vs_ray_data", base)
    return rows


def best(tries: list[Row]) -> Row:
    """The round with the highest rate, knowing every round's (a failed round fails the row)."""
    bad = [r for r in tries if not r.ok]
    if bad:
        return bad[0]
    top = max(tries, key=lambda r: r.rate or 0.0)
    top.values["rounds"] = [r.rate for r in tries]
    return top


def goals(rows: list[Row]) -> list[Goal]:
    table = {(r.values.get("job"), r.name): r for r in rows}

    def ratio(job: str, name: str) -> float | None:
        row = table.get((job, name))
        return None if row is None else row.ratios.get("vs_ray_data")

    return [
        Goal(f"tabular: batchfeed on Ray, tcp + CURVE >= {GOAL:g}x Ray Data random_shuffle",
             ratio("tabular", ROW_BF_TCP), GOAL,
             beside={"no CURVE": ratio("tabular", ROW_BF_PLAIN),
                     "fast path": ratio("tabular", ROW_BF_FAST),
                     "Ray Data shuffle buffer": ratio("tabular", ROW_RD_BUFFER)}),
        Goal(f"jpeg: batchfeed on Ray, tcp + CURVE >= {GOAL:g}x Ray Data",
             ratio("jpeg", ROW_BF_JPEG),
             GOAL),
    ]


@contextlib.contextmanager
def ray_instance(data_bytes: int) -> Iterator[None]:
    """A one-node Ray on this host for the section (nothing, if Ray is missing)."""
    if ray_missing() is not None:
        yield
        return
    from batchfeed.ray_local import simulated_cluster

    store = max(256 * MIB, 4 * data_bytes)  # Ray Data's copy and its shuffle's
    temp_dir = tempfile.mkdtemp(prefix="bf-ray-")  # Ray's session: logs, sockets; removed
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir  # where Ray puts its files (the nodes inherit it)
    try:
        with simulated_cluster(1, node_args={"num_cpus": usable_cores(),
                                             "object_store_memory": store}):
            yield
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_section(options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole Ray section: both jobs' rows and the goals; a JSON-ready dict."""
    started = time.perf_counter()
    w = workloads(options.quick)["tabular"]
    spec = image_sets(options.quick)[0]
    if not options.quick:
        spec = replace(spec, images=JPEG_IMAGES)
    warmup, seconds = window(options)
    result: dict[str, Any] = {"tabular": w.describe(), "jpeg": spec.describe(),
                              "ray": version("ray"), "cores": usable_cores(),
                              "warmup_s": warmup, "seconds": seconds,
                              "rows": [], "goals": [], "problems": []}
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-ray-")
    rows: list[Row] = []
    try:
        progress(f"ray: making {w.describe()}")
        arrays = w.make_arrays(options.seed)
        data_dir = save_arrays(arrays, os.path.join(work_dir, "tabular"))
        with ray_instance(w.nbytes):
            rows += run_plans(tabular_plans(data_dir, arrays, options), "tabular", options,
                              progress)
            del arrays
            progress(f"ray: writing {spec.images:,} JPEGs")
            directory = os.path.join(work_dir, "jpeg")
            write_image_set(spec, directory, options.seed)
            rows += run_plans(jpeg_plans(directory, spec, options), "jpeg", options, progress)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result["rows"] = [asdict(r) for r in rows]
    result["goals"] = [asdict(g) for g in goals(rows)]
    result["elapsed_s"] = time.perf_counter() - started
    return result


COLUMNS = [Column("samples/s", "rate", ",.0f"),
           Column("rounds", cell=lambda r: " / ".join(f"{v:,.0f}" for v in
                                                     r.values.get("rounds", [r.rate or 0]))),
           Column("vs Ray Data", "vs_ray_data", ".2f"),
           Column("first batch ms", "first_batch_ms", ",.0f"),
           Column("client CPU s/GB", "client_cpu_s_per_gb", ".2f")]

LEGEND = """\
  samples/s: rows or images delivered to one consumer in this process (the Ray driver), which
    only counts them; vs Ray Data: over Ray Data's full-shuffle row of the same job.  first
    batch: from nothing (Ray Data's materialize, the loader actor's start) to the first batch.
  Ray Data's local shuffle buffer mixes rows within {buffer:,} rows of the stored order only: not
    the full shuffle the other rows give."""


def format_ray(result: dict[str, Any], options: BenchOptions) -> list[str]:
    from .ray_peers import SHUFFLE_BUFFER

    rows = [Row.from_dict(r) for r in result["rows"]]
    lines = [f"ray: Ray {result['ray'] or '(not installed)'}, a one-node Ray on this host "
             f"({result['cores']} cores); {result['seconds']:g} s per row after "
             f"{result['warmup_s']:g} s warm-up",
             f"  tabular: {result['tabular']}", f"  jpeg: {result['jpeg']}"]
    lines += row_table(COLUMNS, rows)
    lines += [f"  {r.name}: {r.setup}" for r in rows if r.setup]
    lines += goal_lines(result["goals"])
    lines += [f"  problem: {p}" for p in result["problems"]]
    return lines + [LEGEND.format(buffer=SHUFFLE_BUFFER)]
