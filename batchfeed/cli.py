"""The ``batchfeed`` command: serve, demo (and more as they land).

Every subcommand validates its arguments into a config object at this edge and passes it on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from batchfeed.shared.errors import BatchfeedError
from batchfeed.shared.version import __version__

MIB = 2**20

SERVE_EXAMPLES = """examples:
  batchfeed serve                                  # built-in synthetic dataset, 1,000,000 rows
  batchfeed serve --data train.npz --workers 4     # each array in the .npz is a field
  batchfeed serve --data features/ --bind ipc:///tmp/batchfeed.sock
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
                   help="a .npz file, a .npy file or a directory of .npy files (repeatable); "
                        "default: the built-in synthetic dataset")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes (default: one per core)")
    p.add_argument("--synthetic-rows", type=int, default=1_000_000,
                   help="rows of the built-in dataset (default: %(default)s)")
    p.add_argument("--slots", type=int, default=0,
                   help="slots in the shared ring (default: 4 per worker + 8)")
    p.add_argument("--slot-mb", type=float, default=0,
                   help="size of a slot in MiB (default: 4, or 128 of the widest rows)")
    p.add_argument("--task-timeout", type=float, default=30.0,
                   help="seconds a worker may take on a task before it is replaced")
    p.add_argument("--session-timeout", type=float, default=60.0,
                   help="seconds of client silence after which its session is reclaimed")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from batchfeed.server.config import ServerConfig
    from batchfeed.server.main import serve

    config = ServerConfig(
        data=tuple(args.data),
        bind=args.bind,
        workers=args.workers,
        synthetic_rows=args.synthetic_rows,
        slots=args.slots,
        slot_bytes=int(args.slot_mb * MIB),
        task_timeout=args.task_timeout,
        session_timeout=args.session_timeout,
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
    p.add_argument("--rows", type=int, default=1_000_000, help="dataset rows (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trainers", type=int, default=2, help="data-parallel ranks (processes)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from batchfeed.demo import run_demo

    return run_demo(rows=args.rows, epochs=args.epochs, trainers=args.trainers,
                    batch_size=args.batch_size, workers=args.workers)


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
