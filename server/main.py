"""``serve(config)``: bring a loader server up, run it, and take it down cleanly.

Start-up order matters and is written once here:
1. remove segments left by servers that were SIGKILLed (found by name prefix);
2. read every dataset's headers and check everything, including room in /dev/shm;
3. load the data into shared memory; run each transform on sample batches of its dataset
   (its output schema, or the one line that says why it cannot serve), size the slots for its
   output, and create the slot ring;
4. fork the workers (before this process has a ZeroMQ context), bind, wait for them;
5. print the ready line and run the event loop until SIGINT or SIGTERM.
Shutdown runs in ``finally`` in reverse: workers stopped and joined, sockets closed, segments
unlinked.  Exit code 0; 3 when the front end stopped because its own bookkeeping broke; 4 when
worker processes could not start, again and again (its clients were told why).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from batchfeed.shared.errors import DatasetError, ResourceError
from batchfeed.shared.fingerprint import Fingerprint
from batchfeed.shared.schema import describe_schema
from batchfeed.shared.shm import check_shm_room, human_bytes, new_token, remove_stale_segments

from .config import TRANSFORM_BATCH_ROWS, ServerConfig
from .dataset import (
    SYNTHETIC_NAME,
    FieldSource,
    SharedDataset,
    check_mappable,
    held_whole,
    inspect_source,
    shard_range,
    synthetic_sources,
)
from .fingerprinting import file_fingerprint, sources_fingerprint, synthetic_fingerprint
from .frontend import BookkeepingError, Frontend, WorkersFailed
from .ring import HEADER_BYTES, SlotRing
from .security import ServerSecurity
from .sources import default_names
from .transform_runner import Transform, load_transform
from .trial import derive
from .worker import keep_big_allocations_out_of_the_heap

log = logging.getLogger("batchfeed.server")

_NAMED = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


def load_transforms(config: ServerConfig, names: list[str]) -> dict[str, Transform]:
    """Dataset name -> transform, from ``--transform [DATASET=]package.module:function``."""
    out: dict[str, Transform] = {}
    for entry in config.transforms:
        m = _NAMED.match(entry)  # DATASET=spec (a factory's own "key=value" has a ':' before)
        target, spec = (m.group(1), m.group(2)) if m else ("", entry)
        if target and target not in names:
            raise DatasetError(f"--transform {entry}: no dataset is named {target!r} "
                               f"(datasets: {', '.join(names)})")
        transform = load_transform(spec)
        for name in [target] if target else names:
            out[name] = transform
    return out


def dataset_paths(config: ServerConfig) -> dict[str, str]:
    """Name -> path, from ``--data [NAME=]PATH`` entries."""
    out: dict[str, str] = {}
    for entry in config.data:
        m = _NAMED.match(entry)
        name, path = (m.group(1), m.group(2)) if m and not Path(entry).exists() else (
            Path(entry).stem or "data", entry)
        if name in out:
            raise ResourceError(f"two datasets are named {name!r}; name them with --data NAME=PATH")
        out[name] = path
    return out


def dataset_sources(config: ServerConfig) -> dict[str, list[FieldSource]]:
    """Name -> field sources, from ``--data [NAME=]PATH`` entries or the synthetic default."""
    if not config.data:
        return {SYNTHETIC_NAME: synthetic_sources(config.synthetic_rows)}
    out: dict[str, list[FieldSource]] = {}
    for name, path in dataset_paths(config).items():
        out[name] = inspect_source(path)
        unnamed = default_names(out[name])
        if unnamed:
            log.warning("%s has fields named %s (np.savez numbers the arrays it gets without "
                        "names), and batches hold them under those names; name them when saving: "
                        "np.savez(path, x=X, y=y)", path, ", ".join(unnamed))
    return out


class _Signals:
    """SIGINT/SIGTERM: stop the loop if it runs, else abort start-up (cleanly, via finally)."""

    def __init__(self) -> None:
        self.frontend: Frontend | None = None
        self.received: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.received = signum
        if self.frontend is not None:
            self.frontend.stop()
        else:
            raise KeyboardInterrupt

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def serve(config: ServerConfig, announce: Callable[[str], None] | None = None,
          sources: dict[str, list[FieldSource]] | None = None) -> int:
    """Run a server until SIGINT/SIGTERM; returns the exit code.  ``sources``: datasets given
    in memory (``batchfeed.serve``) instead of ``config.data``."""
    announce = announce or (lambda line: print(line, flush=True))
    security = ServerSecurity(config.bind, config.curve_secret_key, config.authorized_keys,
                              config.insecure)
    security.check()
    signals = _Signals()
    signals.install()
    raise_fd_limit()
    keep_big_allocations_out_of_the_heap()
    stale = remove_stale_segments()
    if stale:
        log.warning("removed %d shared-memory segments left by dead servers: %s", len(stale),
                    ", ".join(stale))
    token = new_token()
    datasets: list[SharedDataset] = []
    ring: SlotRing | None = None
    frontend: Frontend | None = None
    metrics = None
    try:
        paths = dataset_paths(config)
        synthetic = sources is None and not config.data
        if sources is None:
            sources = dataset_sources(config)
        if config.max_image_pixels:  # before the workers fork: they inherit it
            from batchfeed.transforms import images

            images.set_max_pixels(config.max_image_pixels)
        transforms = load_transforms(config, list(sources))
        widest = max(s.nbytes // max(1, s.rows) for srcs in sources.values() for s in srcs)
        slot_bytes = config.slot_size(widest)
        if config.mmap:
            for name in sources:
                check_mappable(name, sources[name])
        data_bytes = 0 if config.mmap else sum(shard_nbytes(s, config.shard)
                                               for srcs in sources.values() for s in srcs)
        ring_bytes = HEADER_BYTES + config.n_slots * slot_bytes
        check_shm_room(data_bytes + ring_bytes,
                       f"the data ({human_bytes(data_bytes)}) and the slot ring "
                       f"({config.n_slots} x {human_bytes(slot_bytes)})")
        for name in list(sources):
            datasets.append(SharedDataset.load(
                name, sources[name], token, mmap=config.mmap, shard=config.shard,
                fingerprint=fingerprint_of(sources[name], config, paths.get(name), synthetic)))
        # The sources may pin what they read (a memory-mapped Arrow file's pages count in every
        # process's PSS until unmapped): drop them before the workers fork.  Data passed to
        # batchfeed.serve() stays with its caller.
        sources = None
        specs = {d.spec.name: d.spec for d in datasets}
        transforms = {name: derive(transform, specs[name], by_name(datasets, name).arrays)
                      for name, transform in transforms.items()}
        sized = config.slot_size(widest, max((t.batch_bytes(TRANSFORM_BATCH_ROWS)
                                              for t in transforms.values()), default=0))
        if sized > slot_bytes:  # the transform's output is bigger than its input
            slot_bytes = sized
            check_shm_room(HEADER_BYTES + config.n_slots * slot_bytes,
                           f"the slot ring ({config.n_slots} x {human_bytes(slot_bytes)}, for "
                           f"batches of {TRANSFORM_BATCH_ROWS} rows of the transform's output)")
        ring = SlotRing(token, config.n_slots, slot_bytes)
        frontend = Frontend(config, specs, ring, security, transforms,
                            {d.spec.name: d.arrays for d in datasets}, datasets)
        gc.collect()
        _trim_heap()  # give loading's temporaries back before the workers inherit them
        gc.freeze()  # keep the workers' copy-on-write pages shared
        frontend.start_workers()
        try:
            frontend.bind()
        except zmq.ZMQError as exc:
            raise ResourceError(
                f"cannot bind {' and '.join((config.bind, *config.also_bind))}: "
                f"{exc.strerror}; is another server using it? Stop it or pick another --bind "
                "(or --also-bind) address"
            ) from None
        if config.metrics_port is not None:
            from .metrics_http import MetricsEndpoint  # prometheus_client only when asked for

            metrics = MetricsEndpoint(frontend, config.metrics_port, config.metrics_bind).start()
        frontend.wait_workers_ready()
        signals.frontend = frontend
        if signals.received is not None:
            return 0
        announce(ready_line(frontend, datasets, config, slot_bytes,
                            metrics.url if metrics is not None else None))
        frontend.run()
        return 0
    except KeyboardInterrupt:
        return 0
    except BookkeepingError as exc:
        log.critical("%s", exc)
        return 3
    except WorkersFailed:
        return 4
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if metrics is not None:
            metrics.close()
        if frontend is not None:
            frontend.close()
        if ring is not None:
            ring.close()
        for d in datasets:
            d.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdout.flush()


def by_name(datasets: list[SharedDataset], name: str) -> SharedDataset:
    return next(d for d in datasets if d.spec.name == name)


def fingerprint_of(sources: list[FieldSource], config: ServerConfig, path: str | None,
                   synthetic: bool) -> Fingerprint:
    """The dataset's fingerprint: of its files, of its data in memory, or of the synthetic
    dataset's parameters and first rows; its cost is logged."""
    started = time.perf_counter()
    fields = [s.field for s in sources]
    classes = next((s.classes for s in sources if s.classes), ())
    if path is not None:
        fp = file_fingerprint(Path(path), fields, sources[0].rows, classes,
                              config.fingerprint_mode)
    elif synthetic:
        fp = synthetic_fingerprint(sources)
    else:
        fp = sources_fingerprint(sources, classes=classes)
    log.info("fingerprint %s of %s (%.2f s)", fp, path or "the data in memory",
             time.perf_counter() - started)
    return fp


def shard_nbytes(src: FieldSource, shard: tuple[int, int] | None) -> int:
    """About what one field of a shard holds in shared memory (ragged values are split by
    rows, so this is an estimate; the segments are reserved up front anyway)."""
    if shard is None or held_whole(src.field):
        return src.nbytes
    lo, hi = shard_range(src.rows, shard)
    offsets = 8 * (src.rows + 1) if src.field.ragged else 0
    return offsets + src.values_nbytes * (hi - lo) // max(1, src.rows)


def raise_fd_limit() -> None:
    """Take the whole of the descriptor limit the system allows (many hosts set a soft limit
    of 1,024 under a much higher hard one): connections, workers and lease tables need them."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else max(soft, 1 << 20), hard))
    except (ValueError, OSError):  # pragma: no cover - not allowed here: keep what we have
        pass


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def ready_line(frontend: Frontend, datasets: list[SharedDataset], config: ServerConfig,
               slot_bytes: int, metrics_url: str | None = None) -> str:
    described = "; ".join(d.spec.describe() for d in datasets)
    prints = ", ".join(str(d.spec.fingerprint) for d in datasets if d.spec.fingerprint)
    extra = ", CURVE" if config.curve_secret_key else ""
    for name, t in frontend.transforms.items():  # what clients get: the sample run's schema
        output = describe_schema(t.outputs) if t.outputs is not None else "?"
        extra += f", transform {t.name} -> [{output}]"
        extra += f" of {name}" if len(datasets) > 1 else ""
    extra += "".join(f", also at {a}" for a in config.also_bind)
    extra += f", metrics at {metrics_url}" if metrics_url else ""
    extra += f", fingerprint {prints}" if prints else ""
    return (f"batchfeed serve: ready: {described} at {frontend.address} "
            f"({_count(config.n_workers, 'worker')}, {_count(config.n_slots, 'slot')} of "
            f"{human_bytes(slot_bytes)}{extra})")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
