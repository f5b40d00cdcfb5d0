"""The JPEG section (``--workload jpeg``): training images decoded and augmented from a folder
of JPEG files (``jpeg_data``), by batchfeed's workers, by torch's DataLoader (``jpeg_torch``)
and by SPDL (``jpeg_peers``).

Every row does the same work per image: decode, a random-resized-crop (torchvision's sampling:
area 8-100 %, aspect 3/4-4/3), a left-right flip of half the images, normalise to float32 CHW
with the ImageNet mean and std; batches are consumed and not copied (``measure.consume``).  Per
set: batchfeed with 1 and 2 workers on the same-host fast path, torch's DataLoader with 1 and 2
workers, batchfeed with two servers of 1 worker each, batchfeed over tcp with 2 workers, and
SPDL with 2 threads.

The rows take turns, ``ROUNDS`` times over (once with ``--quick``), and each keeps its best
round: the machine is shared, and a round that another job slowed down says little.  Beside
images/s, each row gives the CPU that the client, the loader (servers or DataLoader workers)
and the rest of the machine used in its window, so that a 2-worker row that did not get two
cores shows it.  Servers are stopped by ``servers.running_servers``, the DataLoaders' workers
on exit of ``jpeg_torch.torch_batches``; the folders live in a temporary directory removed at
the end (also on an error, or SIGTERM, which ``run`` turns into an exception).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from batchfeed.shared.procs import children, cpu_seconds

from .common import BenchError, Goal, Row, add_ratio, by_name, guarded
from .jpeg_data import ImageSet, class_name, image_sets, write_image_set
from .jpeg_peers import ROW_SPDL, SPDL_THREADS, spdl_batches, spdl_missing, spdl_setup
from .jpeg_torch import torch_batches, torch_dataset
from .measure import Measurement, client_epochs, consume, machine_busy_seconds, usable_cores
from .peers import version
from .servers import running_servers, server_cpu_seconds
from .workloads import BenchOptions

MIN_SECONDS = 5.0  # a 256x256 batch takes ~0.1-0.3 s: measure longer than the other sections
MIN_WARMUP = 1.0
ROUNDS = 2  # each row runs this often (rows in turn), and keeps its best round (not --quick)
GOAL_VS_TORCH = 1.5  # batchfeed over torch's DataLoader with as many worker processes
GOAL_SCALING = 1.8  # batchfeed 2 workers over 1

ROW_BATCHFEED = "batchfeed fast path, {n} worker{s}"
ROW_TORCH = "torch DataLoader, {n} worker{s}"
ROW_TWO_SERVERS = "batchfeed fast path, 2 servers x 1 worker"
ROW_TCP = "batchfeed tcp, 2 workers"
WORKERS = (1, 2)


def plural(template: str, n: int) -> str:
    return template.format(n=n, s="" if n == 1 else "s")


JPEG_ROWS = (plural(ROW_BATCHFEED, 1), plural(ROW_TORCH, 1), plural(ROW_BATCHFEED, 2),
             plural(ROW_TORCH, 2), ROW_TWO_SERVERS, ROW_TCP,
             ROW_SPDL.format(n=SPDL_THREADS))  # run in this order, per set


def window(options: BenchOptions) -> tuple[float, float]:
    """(warm-up, measured) seconds per row: at least ``MIN_WARMUP`` and ``MIN_SECONDS``
    unless ``--quick``."""
    if options.quick:
        return options.warmup, options.seconds
    return max(options.warmup, MIN_WARMUP), max(options.seconds, MIN_SECONDS)


def image_row(name: str, spec: ImageSet, batches: Iterator[Any], options: BenchOptions,
              start: float, loader_cpu: Callable[[], float], setup: str = "",
              **values: Any) -> Row:
    """Consume ``batches`` for the row's window; its rate, and the CPU spent in that window
    by this process, the loader (``loader_cpu()``) and the rest of the machine."""
    warmup, seconds = window(options)
    at_start: list[float] = []

    def ready() -> bool:
        at_start[:] = [loader_cpu(), machine_busy_seconds()]
        return True

    m: Measurement = consume(batches, warmup, seconds, start, ready)
    loader_s = loader_cpu() - at_start[0]
    machine_s = machine_busy_seconds() - at_start[1]
    rate = m.samples / m.seconds
    return Row(name, setup=setup, rate=rate, values={
        "set": spec.name, "images": m.samples, "seconds": m.seconds,
        "mb_per_s": m.nbytes / m.seconds / 1e6,
        "first_batch_ms": None if m.first_batch_s is None else m.first_batch_s * 1e3,
        "client_cpu_cores": m.cpu_s / m.seconds, "loader_cpu_cores": loader_s / m.seconds,
        "other_cpu_cores": max(0.0, machine_s - loader_s - m.cpu_s) / m.seconds,
        "loader_cpu_ms_per_image": loader_s / m.samples * 1e3 if m.samples else None,
        "runs": [rate], **values})


def batchfeed_row(name: str, spec: ImageSet, directory: str, count: int, workers: int,
                  bind: str, fastpath: bool, options: BenchOptions, problems: list[str]) -> Row:
    """``count`` servers of ``workers`` workers each, read by a ``Client`` in this process."""
    from batchfeed import Client

    args = ["--workers", str(workers), "--data", directory, "--transform", spec.transform,
            "--slot-mb", str(spec.slot_mb)]
    t0 = time.perf_counter()
    with running_servers([args] * count, [bind.format(i=i) for i in range(count)],
                         problems) as servers:
        took = (time.perf_counter() - t0) / count
        addresses = [s.address for s in servers if s.address is not None]
        start = time.perf_counter()  # the connect starts with the constructor
        with Client(addresses if count > 1 else addresses[0], batch_size=spec.batch_size,
                    seed=options.seed, fastpath=fastpath, reconnect_timeout=10.0,
                    name="bench-jpeg") as client:
            check_served(client, spec)
            batches = client_epochs(client)
            try:
                return image_row(name, spec, batches, options, start,
                                 lambda: server_cpu_seconds(*servers),
                                 loader="batchfeed", workers=count * workers,
                                 server_start_s=took)
            finally:
                batches.close()


def check_served(client: Any, spec: ImageSet) -> None:
    """The server serves the set's classes, and float32 CHW images of the crop's size."""
    fields = {f.name: f for f in client.fields}
    image = fields.get("image")
    if image is None or str(image.dtype) != "float32" or \
            tuple(image.shape) != (3, spec.crop, spec.crop):
        raise BenchError(f"the server serves {list(fields.values())}, not float32 images "
                         f"(3, {spec.crop}, {spec.crop})")
    expected = tuple(sorted(class_name(label) for label in range(10)))
    if tuple(client.classes) != expected:
        raise BenchError(f"the server's classes are {client.classes}, not {expected}")


def torch_row(name: str, spec: ImageSet, dataset: Any, workers: int, setup: str,
              options: BenchOptions) -> Row:
    start = time.perf_counter()
    with torch_batches(dataset, spec.batch_size, workers, options.seed) as (batches, pids):
        return image_row(name, spec, batches, options, start, lambda: cpu_seconds(pids()),
                         setup, loader="torch", workers=workers)


def spdl_row(name: str, spec: ImageSet, directory: str, options: BenchOptions) -> Row:
    start = time.perf_counter()
    with spdl_batches(spec, directory, options.seed) as batches:
        return image_row(name, spec, batches, options, start, lambda: 0.0, spdl_setup(),
                         loader="spdl", workers=0)


def plans(spec: ImageSet, directory: str, options: BenchOptions, work_dir: str,
          problems: list[str]) -> dict[str, Callable[[], Row] | str]:
    """Each row's measurement, or its install hint if its library is missing."""
    out: dict[str, Callable[[], Row] | str] = {}
    try:
        import torch  # noqa: F401

        dataset, baseline = torch_dataset(directory, spec.crop)
    except ImportError:
        dataset, baseline = None, ""
    ipc = f"ipc://{work_dir}/{spec.name[:3]}{{i}}.sock"  # short: a socket path has <= 107 bytes
    for n in WORKERS:
        out[plural(ROW_BATCHFEED, n)] = functools.partial(
            batchfeed_row, plural(ROW_BATCHFEED, n), spec, directory, 1, n, ipc, True, options,
            problems)
        setup = (f"DataLoader(batch_size={spec.batch_size}, shuffle=True, num_workers={n}, "
                 f"persistent_workers=True), default collate; {baseline}")
        out[plural(ROW_TORCH, n)] = "skipped: not installed: pip install torch" \
            if dataset is None else functools.partial(torch_row, plural(ROW_TORCH, n), spec,
                                                      dataset, n, setup, options)
    out[ROW_TWO_SERVERS] = functools.partial(
        batchfeed_row, ROW_TWO_SERVERS, spec, directory, 2, 1, ipc, True, options, problems)
    out[ROW_TCP] = functools.partial(
        batchfeed_row, ROW_TCP, spec, directory, 1, 2, "tcp://127.0.0.1:0", False, options,
        problems)
    spdl_name = ROW_SPDL.format(n=SPDL_THREADS)
    missing = spdl_missing()
    out[spdl_name] = f"skipped: {missing}" if missing else functools.partial(
        spdl_row, spdl_name, spec, directory, options)
    return out


def set_rows(spec: ImageSet, directory: str, options: BenchOptions, work_dir: str,
             progress: Callable[[str], None], problems: list[str]) -> list[Row]:
    """The set's rows, in ``JPEG_ROWS`` order, round after round (batchfeed, torch and SPDL
    alternate, so that a slow spell of the shared machine does not fall on one side only)."""
    measures = plans(spec, directory, options, work_dir, problems)
    runs: dict[str, list[Row]] = {name: [] for name in JPEG_ROWS}
    for round_ in range(1 if options.quick else ROUNDS):
        for name in JPEG_ROWS:
            measure = measures[name]
            if isinstance(measure, str):
                runs[name].append(Row(name, status=measure, values={"set": spec.name}))
                continue
            progress(f"jpeg: {spec.name}, {name} (round {round_ + 1})")
            runs[name].append(guarded(name, measure, set=spec.name))
    rows = [best(tries) for tries in runs.values()]
    add_ratios(rows)
    return rows


def best(tries: list[Row]) -> Row:
    """The round with the most images/s (the one least disturbed by the machine's other
    work), knowing every round's rate; a failed row if any round failed."""
    bad = [r for r in tries if not r.ok]
    if bad:
        return bad[0]
    top = max(tries, key=lambda r: r.rate or 0.0)
    top.values["runs"] = [rate for r in tries for rate in r.values["runs"]]
    return top


def add_ratios(rows: list[Row]) -> None:
    """``vs_torch``: batchfeed over the torch row with as many worker processes; ``vs_one_worker``:
    the 2-worker rows over their 1-worker row; ``vs_tcp``: every row over batchfeed tcp."""
    table = by_name(r for r in rows if r.rate)
    for r in rows:
        workers = r.values.get("workers")
        if r.values.get("loader") == "batchfeed" and workers in WORKERS:
            add_ratio([r], "vs_torch", table.get(plural(ROW_TORCH, workers)))
        if workers == 2:
            one = plural(ROW_TORCH if r.values["loader"] == "torch" else ROW_BATCHFEED, 1)
            add_ratio([r], "vs_one_worker", table.get(one))
    add_ratio(rows, "vs_tcp", table.get(ROW_TCP))


def goals(rows: list[Row], sets: tuple[ImageSet, ...]) -> list[Goal]:
    """Each goal per set, with what this run measured and whether it was met."""
    table = {(r.values.get("set"), r.name): r for r in rows}
    out: list[Goal] = []
    for spec in sets:

        def measured(name: str, key: str, set_name: str = spec.name) -> float | None:
            row = table.get((set_name, name))
            return None if row is None else row.ratios.get(key)

        for n in WORKERS:
            out.append(Goal(f"{spec.name}: batchfeed >= {GOAL_VS_TORCH:g}x torch DataLoader, "
                            f"{n} worker{'' if n == 1 else 's'} each",
                            measured(plural(ROW_BATCHFEED, n), "vs_torch"), GOAL_VS_TORCH))
        out.append(Goal(f"{spec.name}: batchfeed 2 workers >= {GOAL_SCALING:g}x 1 worker",
                        measured(plural(ROW_BATCHFEED, 2), "vs_one_worker"), GOAL_SCALING,
                        beside={"torch": measured(plural(ROW_TORCH, 2), "vs_one_worker")}))
    return out


def versions() -> dict[str, str]:
    """The image libraries installed here (batchfeed.transforms.images picks among them)."""
    found = {d: version(d) for d in ("pillow", "simplejpeg", "opencv-python-headless",
                                     "opencv-python", "torch", "torchvision", "spdl-io")}
    return {d: v for d, v in found.items() if v is not None}


def jpeg_section(options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole JPEG section: per set, write the folder, measure its rows; then the goals."""
    started = time.perf_counter()
    sets = image_sets(options.quick)
    warmup, seconds = window(options)
    result: dict[str, Any] = {"sets": {}, "rows": [], "goals": [], "problems": [],
                              "warmup_s": warmup, "seconds": seconds,
                              "rounds": 1 if options.quick else ROUNDS,
                              "versions": versions(), "cores": usable_cores()}
    try:
        import PIL  # noqa: F401
    except ImportError:
        result["rows"] = [asdict(Row.skipped(name, "not installed: pip install pillow",
                                             set=s.name)) for s in sets for name in JPEG_ROWS]
        return result
    before = set(children(os.getpid()))
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-jpeg-")
    rows: list[Row] = []
    try:
        for spec in sets:
            progress(f"jpeg: writing {spec.images:,} {spec.image_size}x{spec.image_size} JPEGs")
            directory = os.path.join(work_dir, spec.name)
            result["sets"][spec.name] = write_image_set(spec, directory, options.seed)
            rows += set_rows(spec, directory, options, work_dir, progress, result["problems"])
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result["problems"] += [f"process {pid} still running after the section"
                           for pid in sorted(set(children(os.getpid())) - before)]
    result["rows"] = [asdict(r) for r in rows]
    result["goals"] = [asdict(g) for g in goals(rows, sets)]
    result["elapsed_s"] = time.perf_counter() - started
    return result

