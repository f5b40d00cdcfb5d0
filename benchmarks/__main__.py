"""``python -m benchmarks``: the command line of the bench (from a checkout of the repository;
``batchfeed bench`` forwards here).  Options are validated once, into ``BenchOptions``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from batchfeed.shared.errors import BatchfeedError

from .workloads import WORKLOAD_NAMES, BenchOptions

EXAMPLES = """examples:
  python -m benchmarks                             # every section, about 10 minutes
  python -m benchmarks --workload tabular --json bench-tabular.json
  python -m benchmarks --quick --workload jpeg     # tiny, a smoke test (seconds)
  batchfeed bench --workload tokens                # the same, from a source checkout
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure batchfeed against the loaders users would pick, side by side on "
                    "the same data in one run: the raw in-process copy limit, a naive loop, "
                    "torch's DataLoader per-sample and batched (0 and 2 workers), torchdata "
                    "nodes, SPDL and Ray Data, and batchfeed over tcp, ipc and the same-host fast "
                    "path (and on Ray); "
                    "packed tokens, JPEG decoding (with SPDL's FFmpeg decoder), sharded servers, "
                    "and epoch-boundary stalls.  A peer that is not installed is a skipped row "
                    "with its install hint.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="all", choices=[*WORKLOAD_NAMES, "all"],
                   help="which section to measure (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="tiny datasets and 0.25 s per row (a smoke test, not a measurement)")
    p.add_argument("--seconds", type=float, default=None,
                   help="measured seconds per row (default: 2, or 0.25 with --quick)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds per row excluded after the first batch (default: 0.5, or 0.1 "
                        "with --quick)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes of the batchfeed servers (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = BenchOptions.from_args(args.workload, args.seconds, args.warmup, args.quick,
                                         args.workers, args.json)
    except BatchfeedError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return 2
    from .run import run

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
