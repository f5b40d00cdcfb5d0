"""An example trainer rank for batchfeed on Kubernetes (mounted into trainer-job.yaml's pods).

    python trainer.py --loaders tcp://batchfeed-loaders.NAMESPACE.svc:5555 --min-loaders 4 \
        --rank 0 --world-size 2 --curve client.key_secret server.key

It resolves the loaders' headless Service into one address per ready loader pod
(``batchfeed.client.resolve_all``), waiting (bounded by ``--wait``) until ``--min-loaders`` of
them answer DNS: with one pod per shard that is every shard, so no rank starts on part of the
data.  Then it reads its share of each epoch (``rank`` of ``world_size``) and prints rows/s
and the share of time spent waiting on data.  Put the training step where the comment says.

Exit codes: 0 done; 1 the loaders did not appear in time, or a batchfeed error.
"""

from __future__ import annotations

import argparse
import sys
import time

from batchfeed import BatchfeedError, Client
from batchfeed.client import resolve_all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loaders", required=True,
                   help="tcp://SERVICE.NAMESPACE.svc:PORT of the loaders' headless Service")
    p.add_argument("--min-loaders", type=int, default=1,
                   help="wait until this many loaders resolve (the number of shards)")
    p.add_argument("--wait", type=float, default=600.0,
                   help="seconds to wait for them (default: %(default)s)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", nargs=2, metavar=("CLIENT_SECRET_FILE", "SERVER_PUBLIC_FILE"),
                   help="CURVE keys (the loaders' --curve-secret-key needs them)")
    args = p.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        p.error(f"--rank {args.rank} is out of range for --world-size {args.world_size}")
    return args


def find_loaders(service: str, at_least: int, wait: float) -> list[str]:
    """One address per ready loader pod, once there are ``at_least``; [] after ``wait`` s."""
    deadline = time.monotonic() + wait
    found: list[str] = []
    while True:
        try:
            found = resolve_all(service)
        except BatchfeedError:  # not resolvable yet: no pod is ready
            found = []
        if len(found) >= at_least or time.monotonic() >= deadline:
            return found if len(found) >= at_least else []
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    who = f"rank {args.rank}/{args.world_size}"
    addresses = find_loaders(args.loaders, args.min_loaders, args.wait)
    if not addresses:
        print(f"{who}: fewer than {args.min_loaders} loaders behind {args.loaders} after "
              f"{args.wait:g} s; are the loader pods ready (kubectl get pods)?", file=sys.stderr)
        return 1
    print(f"{who}: loaders {', '.join(addresses)}", flush=True)
    try:
        with Client(addresses, batch_size=args.batch_size, seed=args.seed, rank=args.rank,
                    world_size=args.world_size, connect_timeout=60.0,
                    curve=tuple(args.curve) if args.curve else None,
                    name=f"trainer-{args.rank}") as client:
            for epoch in range(args.epochs):
                rows, started = 0, time.perf_counter()
                for batch in client.epoch(epoch):
                    rows += len(next(iter(batch.values())))
                    # The training step goes here: model(batch["x"]), loss, backward, step.
                seconds = time.perf_counter() - started
                stats = client.stats()
                print(f"{who}: epoch {epoch}: {rows:,} rows in {seconds:.1f} s "
                      f"({rows / max(seconds, 1e-9):,.0f} rows/s), waited on data "
                      f"{stats['wait_fraction']:.1%} of the time", flush=True)
    except BatchfeedError as exc:
        print(f"{who}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
