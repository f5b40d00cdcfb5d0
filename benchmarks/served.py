"""The batchfeed rows: real servers (``batchfeed serve`` processes) and the pooled clients.

Per workload: a tcp server for 1, 2 and 4 clients and a trainer at half rate, an ipc server
through the socket and on the fast path, and (tabular only) a tcp server with CURVE.  Then the
server's PSS with 1, 2 and 4 workers (tabular), and a server-side transform with 1 and 2
workers (image).  Each server is stopped when its rows are done, also on an error; what it
logged and a non-zero exit code become problems of the run, the measurements stand.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from batchfeed.launch import ServerProcess

from .common import GB, ROW_ERRORS, Row, add_ratio, failed_status, guarded
from .measure import samples_row
from .pool import ClientJob, ClientPool
from .servers import ring_info, running_server, server_cpu_seconds, server_pss_bytes
from .workloads import BenchOptions, Workload, save_arrays

ROW_TCP = "batchfeed tcp, {n} client{s}"
ROW_IPC_SOCKET = "batchfeed ipc, socket (fastpath=False)"
ROW_IPC_FAST = "batchfeed ipc, fast path"
ROW_CURVE = "batchfeed tcp + CURVE, 1 client"
ROW_STALL = "batchfeed tcp, trainer at half rate"
ROW_TRANSFORM = "transform augment, {n} worker{s}"
TCP_CLIENTS = (1, 2, 4)
PSS_WORKERS = (1, 2, 4)
TRANSFORM = "batchfeed.transforms:augment"
TRANSFORM_WORKERS = (1, 2)


def batchfeed_row(name: str, server: ServerProcess, w: Workload, n_clients: int,
                  fastpath: bool | None, options: BenchOptions, pool: ClientPool,
                  curve: tuple[str, str] | None = None, step_s: float = 0.0) -> Row:
    """Aggregate throughput of ``n_clients`` ranks splitting each epoch (rank/world_size)."""
    assert server.address is not None
    jobs = [ClientJob(server.address, w.batch_size, r, n_clients, fastpath, options.warmup,
                      options.seconds, options.seed, curve, step_s) for r in range(n_clients)]
    cpu0: list[float] = []
    ms = pool.run(jobs, on_go=lambda: cpu0.append(server_cpu_seconds(server)))
    cpu1 = server_cpu_seconds(server)
    pss = server_pss_bytes(server)  # after the row, while the server is still up
    nbytes = sum(m.nbytes for m in ms)
    return samples_row(name, ms, server_pss_bytes=pss, server_pss_over_data=pss / w.nbytes,
                       server_pid=server.pid,
                       server_cpu_s_per_gb=(cpu1 - cpu0[0]) / (nbytes / GB) if nbytes else None)


def server_rows(w: Workload, data_dir: str | None, work_dir: str, options: BenchOptions,
                pool: ClientPool, progress: Callable[[str], None],
                problems: list[str]) -> tuple[list[Row], dict]:
    """The batchfeed rows: a tcp server for 1, 2, 4 clients, an ipc server for two rows, and
    (tabular only) a tcp server with CURVE encryption."""
    base = ["--workers", str(options.server_workers)]
    base += ["--data", data_dir] if data_dir else ["--synthetic-rows", str(w.rows)]
    plan: list[tuple[str, list, list[str], Any]] = [
        ("tcp://127.0.0.1:0",
         # fastpath=False: the socket path, as for a trainer on another host (a client on the
         # server's host takes the fast path by default, whatever the address)
         [(ROW_TCP.format(n=n, s="" if n == 1 else "s"), n, False) for n in TCP_CLIENTS], [],
         None),
        (f"ipc://{work_dir}/bf.sock", [(ROW_IPC_SOCKET, 1, False), (ROW_IPC_FAST, 1, True)], [],
         None)]
    if w.name == "tabular":
        from batchfeed.shared.curve_keys import make_keys

        keys = os.path.join(work_dir, "keys")
        make_keys(keys)
        plan.append(("tcp://127.0.0.1:0", [(ROW_CURVE, 1, False)],
                     ["--curve-secret-key", os.path.join(keys, "server.key_secret"),
                      "--authorized-keys", os.path.join(keys, "authorized")],
                     (os.path.join(keys, "client.key_secret"), os.path.join(keys, "server.key"))))
    rows: list[Row] = []
    servers: dict[str, Any] = {}
    for bind, specs, extra, curve in plan:
        progress(f"{w.name}: starting a server at {bind}")
        try:
            with running_server(base + extra, bind, problems) as server:
                kind = bind.split(":")[0] + (" + CURVE" if curve else "")
                servers[kind] = {"ready_line": server.ready_line, "pid": server.pid,
                                 "ring": asdict(ring_info(server, curve))}
                for name, n, fastpath in specs:
                    progress(f"{w.name}: {name}")
                    rows.append(guarded(name, functools.partial(
                        batchfeed_row, name, server, w, n, fastpath, options, pool, curve)))
                    if name == ROW_TCP.format(n=1, s="") and rows[-1].rate:
                        # The same service, for a trainer that takes twice as long per batch.
                        step = 2 * w.batch_size / rows[-1].rate
                        progress(f"{w.name}: {ROW_STALL}")
                        rows.append(guarded(ROW_STALL, functools.partial(
                            batchfeed_row, ROW_STALL, server, w, 1, False, options, pool,
                            step_s=step)))
        except ROW_ERRORS as exc:
            done = {r.name for r in rows}
            rows += [Row(name, status=failed_status(exc)) for name, _, _ in specs
                     if name not in done]
    return rows, servers


def pss_by_workers(w: Workload, options: BenchOptions, pool: ClientPool,
                   progress: Callable[[str], None], problems: list[str]) -> list[dict[str, Any]]:
    """Server PSS / dataset size with 1, 2 and 4 workers, after one client used the ring."""
    out = []
    for workers in PSS_WORKERS:
        progress(f"server PSS: {workers} worker(s)")
        entry: dict[str, Any] = {"workers": workers}
        try:
            with running_server(["--workers", str(workers), "--synthetic-rows", str(w.rows)],
                                "tcp://127.0.0.1:0", problems) as server:
                assert server.address is not None
                job = ClientJob(server.address, w.batch_size, 0, 1, None, 0.0,
                                min(options.seconds, 0.5), options.seed)
                pool.run([job])
                pss = server_pss_bytes(server)
                ring = ring_info(server)
                entry.update(status="ok", pss_bytes=pss, pss_over_data=pss / w.nbytes,
                             ring=asdict(ring), server_pid=server.pid,
                             ready_line=server.ready_line)
        except ROW_ERRORS as exc:
            entry["status"] = failed_status(exc)
        out.append(entry)
    return out


def transform_scaling(w: Workload, options: BenchOptions, pool: ClientPool,
                      progress: Callable[[str], None], problems: list[str]) -> list[Row]:
    """A CPU-heavy server-side transform (crop, flip, normalise, jitter) on the image data,
    with 1 and 2 workers: does worker parallelism pay off?  One client on the fast path."""
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-")
    rows: list[Row] = []
    try:
        data_dir = save_arrays(w.make_arrays(options.seed), os.path.join(work_dir, "data"))
        for workers in TRANSFORM_WORKERS:
            name = ROW_TRANSFORM.format(n=workers, s="" if workers == 1 else "s")
            progress(f"{w.name}: {name}")

            args = ["--workers", str(workers), "--data", data_dir, "--transform", TRANSFORM]
            rows.append(guarded(name, functools.partial(
                _transform_row, name, args, f"ipc://{work_dir}/t.sock", w, options, pool,
                problems)))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    add_ratio(rows, "vs_one_worker", rows[0] if rows else None)
    return rows


def _transform_row(name: str, args: list[str], bind: str, w: Workload, options: BenchOptions,
                   pool: ClientPool, problems: list[str]) -> Row:
    with running_server(args, bind, problems) as server:
        return batchfeed_row(name, server, w, 1, True, options, pool)
