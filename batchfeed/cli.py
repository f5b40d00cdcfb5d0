"""The ``batchfeed`` command: serve, demo (and more as they land).

Every subcommand validates its arguments into a config object at this edge and passes it on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from batchfeed.shared.errors import BatchfeedError
from batchfeed.shared.version import __version__

MIB = 2**20

SERVE_EXAMPLES = """examples:
  batchfeed serve                                  # built-in synthetic dataset, 1,000,000 rows
  batchfeed serve --data train.npz --workers 4     # each array in the .npz is a field
  batchfeed serve --data features/ --bind ipc:///tmp/batchfeed.sock
  batchfeed serve --metrics-port 9100              # Prometheus: curl 127.0.0.1:9100/metrics
  batchfeed serve --data images.npz --transform myproject.augment:random_crop_flip
  batchfeed serve --data train=train.npz --data val=val.npz   # Client(..., dataset="val")
  batchfeed serve --data big/ --shard 0/2          # half the rows; a second server: --shard 1/2
"""

DEMO_EXAMPLES = """examples:
  batchfeed demo                       # server + 2 trainer ranks on the synthetic dataset
  batchfeed demo --rows 200000 --epochs 2 --trainers 1
"""


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run a loader server",
        description="Hold a dataset in shared memory and stream shuffled mini-batches to clients.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]PATH",
                   help="a .npz or .npy file, a directory of .npy files, an Arrow IPC or Parquet "
                        "file (or a directory of Parquet files), a Hugging Face save_to_disk "
                        "directory, or an image folder (DIR/<class>/<image>); repeatable, "
                        "NAME= names the dataset; default: the built-in synthetic dataset")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--also-bind", action="append", default=[], metavar="ipc://PATH",
                   help="also listen on this same-host socket (repeatable): trainers on this "
                        "host connect to it, others to --bind")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes (default: one per core)")
    p.add_argument("--synthetic-rows", type=int, default=1_000_000,
                   help="rows of the built-in dataset (default: %(default)s)")
    p.add_argument("--slots", type=int, default=0,
                   help="slots in the shared ring (default: 2 per worker + 8)")
    p.add_argument("--slot-mb", type=float, default=0,
                   help="size of a slot in MiB (default: --chunk-mb, or 128 of the widest rows)")
    p.add_argument("--chunk-mb", type=float, default=8.0,
                   help="target size of one streamed message, in MiB (default: %(default)s)")
    p.add_argument("--task-timeout", type=float, default=30.0,
                   help="seconds a worker may take on a task before it is replaced")
    p.add_argument("--session-timeout", type=float, default=10.0,
                   help="seconds of client silence after which its session is reclaimed "
                        "(clients ping every second)")
    p.add_argument("--curve-secret-key", metavar="FILE",
                   help="the server's .key_secret file: encrypt with CURVE (see keygen)")
    p.add_argument("--authorized-keys", metavar="DIR",
                   help="directory of the clients' public .key files allowed to connect")
    p.add_argument("--mmap", action="store_true",
                   help="memory-map .npy and uncompressed Arrow IPC files instead of copying "
                        "them into shared memory (for data larger than RAM; pairs well with "
                        "shuffle='buffer'); the files are held open, so a file replaced on "
                        "disk is not mixed in")
    p.add_argument("--transform", action="append", default=[],
                   metavar="[DATASET=]MODULE:FUNCTION",
                   help="run fn(batch, rng) -> batch on every batch in the workers "
                        "(repeatable; without DATASET= it applies to every dataset)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without CURVE (trusted networks only)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    p.add_argument("--metrics-bind", default="127.0.0.1", metavar="HOST",
                   help="interface of the metrics endpoint (default: %(default)s; another "
                        "interface needs --insecure)")
    p.add_argument("--shard", metavar="I/N", type=_shard,
                   help="hold only shard I of N of the rows (0 <= I < N); a client given the "
                        "N shard servers gets the batches one server of all rows would give")
    p.add_argument("--max-order-mb", type=float, default=256,
                   help="the largest epoch order a client may ask for with epoch_rows= "
                        "(balanced or weighted sampling), in MiB (default: %(default)s)")
    p.add_argument("--fingerprint", choices=("auto", "full", "sampled"), default="auto",
                   help="how the data's identity is computed at start: every byte (full), or "
                        "its sizes and samples (sampled); auto: full, sampled with --mmap")
    p.add_argument("--max-sessions", type=int, default=256,
                   help="open client sessions in all (default: %(default)s)")
    p.add_argument("--max-sessions-per-connection", type=int, default=8,
                   help="open sessions per client connection (default: %(default)s)")
    p.add_argument("--max-unsent-mb", type=float, default=32,
                   help="batch bytes a connection may have queued but not yet taken; past it "
                        "the server gathers nothing more for it (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=0,
                   help="the largest image (width x height) an image transform decodes, read "
                        "from its header; larger ones fail their batch before any pixel is "
                        "decoded (default: 64,000,000)")
    p.set_defaults(func=_run_serve)


def _shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        shard = int(i), int(n)
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N (e.g. 0/3)")
    return shard


def _run_serve(args: argparse.Namespace) -> int:
    # Workers are the parallelism: one BLAS thread each (set before numpy is imported; an
    # explicit setting in the environment wins).  This also saves OpenBLAS's per-thread buffers.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from batchfeed.server.config import ServerConfig
    from batchfeed.server.main import serve

    config = ServerConfig(
        data=tuple(args.data),
        bind=args.bind,
        also_bind=tuple(args.also_bind),
        workers=args.workers,
        synthetic_rows=args.synthetic_rows,
        slots=args.slots,
        slot_bytes=int(args.slot_mb * MIB),
        chunk_bytes=max(1, int(args.chunk_mb * MIB)),
        task_timeout=args.task_timeout,
        session_timeout=args.session_timeout,
        insecure=args.insecure,
        curve_secret_key=args.curve_secret_key,
        authorized_keys=args.authorized_keys,
        transforms=tuple(args.transform),
        mmap=args.mmap,
        metrics_port=args.metrics_port,
        metrics_bind=args.metrics_bind,
        max_order_bytes=max(1, int(args.max_order_mb * MIB)),
        shard=args.shard,
        fingerprint=args.fingerprint,
        max_sessions=args.max_sessions,
        max_sessions_per_connection=args.max_sessions_per_connection,
        max_unsent_bytes=max(1, int(args.max_unsent_mb * MIB)),
        max_image_pixels=args.max_image_pixels,
    )
    return serve(config)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job end to end: a server plus trainer ranks, on the built-in dataset",
        description="Start a loader server on the synthetic dataset and train a softmax "
                    "classifier from several data-parallel trainer processes.",
        epilog=DEMO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=1_000_000,
                   help="dataset rows (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs (default: %(default)s)")
    p.add_argument("--trainers", type=int, default=2,
                   help="data-parallel ranks, one process each (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="rows per batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="the server's worker processes (default: one per core)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from batchfeed.demo import run_demo

    return run_demo(rows=args.rows, epochs=args.epochs, trainers=args.trainers,
                    batch_size=args.batch_size, workers=args.workers)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``batchfeed bench`` runs ``python -m benchmarks`` of a source checkout: the benchmark
    sits beside the package, not in it, so an installed wheel has none."""
    examples = """examples:
  batchfeed bench                             # every section, about 10 minutes
  batchfeed bench --workload tokens --json bench-tokens.json
  batchfeed bench --quick --workload tabular  # tiny, a few seconds (a smoke test)
  (the same as python -m benchmarks ... from the repository's root)
"""
    p = sub.add_parser(
        "bench", add_help=False, prefix_chars="+",  # every argument goes to the benchmark
        help="measure batchfeed against torch, torchdata and SPDL (from a source checkout)",
        description="Run the repository's benchmark (python -m benchmarks) with these "
                    "arguments; --help lists them.",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="python -m benchmarks's arguments")

    def run_bench(args: argparse.Namespace) -> int:
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        if not (root / "benchmarks" / "__main__.py").is_file():
            print("batchfeed bench: error: the benchmark is not part of the installed package; "
                  "from a checkout of the batchfeed repository, run python -m benchmarks",
                  file=sys.stderr)
            return 2
        sys.stdout.flush()
        sys.stderr.flush()
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *args.args],
                  {**os.environ, "PYTHONPATH": path})

    p.set_defaults(func=run_bench)


KEYGEN_EXAMPLES = """examples:
  batchfeed keygen keys/            # keys/server.key(_secret), keys/client.key(_secret),
                                    # keys/authorized/client.key
  batchfeed serve --bind tcp://0.0.0.0:5555 \\
      --curve-secret-key keys/server.key_secret --authorized-keys keys/authorized
  # in the trainer:
  Client("tcp://loader:5555", ..., curve=("keys/client.key_secret", "keys/server.key"))
  batchfeed keygen keys/ --name trainer2   # another client; copy keys/trainer2.key into
                                           # keys/authorized/
"""


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen",
        help="make CURVE key pairs for encrypted, authenticated connections",
        description="Write CURVE key pairs in ZeroMQ's certificate format.",
        epilog=KEYGEN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", help="where to write the keys")
    p.add_argument("--name", action="append",
                   help="key pair name (repeatable; default: server and client)")
    p.set_defaults(func=_run_keygen)


def _run_keygen(args: argparse.Namespace) -> int:
    from batchfeed.shared.curve_keys import make_keys

    for path in make_keys(args.directory, tuple(args.name or ("server", "client"))):
        print(path)
    return 0


STATS_EXAMPLES = """examples:
  batchfeed stats tcp://127.0.0.1:5555            # live table, refreshed every second
  batchfeed stats ipc:///tmp/batchfeed.sock --once
  batchfeed stats tcp://loader:5555 --interval 5 \\
      --curve keys/client.key_secret keys/server.key
"""


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="show a running server's sessions and counters (a live table)",
        description="Print a loader server's sessions and counters, refreshed in place "
                    "until Ctrl-C.",
        epilog=STATS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("address", help="the server's address, tcp://HOST:PORT or ipc://PATH")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds to wait for the server's answer (default: %(default)s)")
    p.add_argument("--curve", nargs=2, metavar=("CLIENT_SECRET_FILE", "SERVER_PUBLIC_FILE"),
                   help="CURVE keys for a server started with --curve-secret-key")
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from batchfeed.stats import StatsOptions, run

    return run(StatsOptions(address=args.address, interval=args.interval, once=args.once,
                            timeout=args.timeout, curve=tuple(args.curve) if args.curve else None))


def _add_probe(sub: argparse._SubParsersAction) -> None:
    from batchfeed import probe

    p = sub.add_parser(
        "probe",
        help="ask a server for its STATS once: exit 0 if it answers, 1 if not (health checks)",
        description="One STATS round trip to a loader server, for readiness and liveness "
                    "probes: exit 0 if it answered within --timeout, 1 if not.",
        epilog=probe.EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    probe.add_arguments(p)
    p.set_defaults(func=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from batchfeed.probe import run

    return run(args.address, args.timeout, tuple(args.curve) if args.curve else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchfeed",
        description="A streaming mini-batch loader service for ML training.",
    )
    parser.add_argument("--version", action="version", version=f"batchfeed {__version__}")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_demo(sub)
    _add_keygen(sub)
    _add_bench(sub)
    _add_stats(sub)
    _add_probe(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except BatchfeedError as exc:
        print(f"batchfeed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
