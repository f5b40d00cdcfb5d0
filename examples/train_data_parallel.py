"""Data-parallel training from a batchfeed server: torch DistributedDataParallel over gloo.

    batchfeed serve &                       # the built-in synthetic dataset
    python examples/train_data_parallel.py --address tcp://127.0.0.1:5555 --rank 0 \
        --world-size 1 --epochs 2

Each rank opens its own ``batchfeed.Client`` with its rank and the world size, so the ranks get
disjoint batches of the same epoch plan, and DDP averages the gradients across them.  Given
several ``--address`` (loaders serving the same dataset), rank r uses the (r mod n)-th: the
batches depend on the plan only, not on which loader serves them.  With ``--shards`` the
addresses are the shard servers of one dataset (``batchfeed serve --shard I/N``) and every
rank's client gets them all.  With
``--world-size`` > 1, every rank runs this script with its own ``--rank``; the ranks meet at
``--master-addr:--master-port`` (default: ``$MASTER_ADDR``/``$MASTER_PORT``, so torchrun works
too).  On one host, set ``GLOO_SOCKET_IFNAME=lo`` to keep gloo on loopback.

``--verify`` regenerates the server's synthetic dataset locally and checks that batch k of epoch
e holds exactly the rows ``BatchPlan.indices(e, k)``, that this rank saw each of its rows once,
and, across ranks, that every row the plan serves came as often as it serves it: the padding
rows (drop_last=False with an odd share) twice, the dropped tail (drop_last=True) never.
Any mismatch ends the run with exit code 1.

Needs torch and tqdm (``pip install torch tqdm``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from batchfeed import Client
from batchfeed.server.dataset import SYNTHETIC_NAME, synthetic_arrays
from batchfeed.shared.plan import BatchPlan, PlanParams


class VerifyError(Exception):
    """A batch or an epoch did not hold the rows the plan says."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", action="append", dest="addresses", metavar="ADDRESS",
                   help="a batchfeed server (default: tcp://127.0.0.1:5555); repeat it to "
                        "spread the ranks over several loaders: rank r uses the (r mod n)-th, "
                        "or with --shards every rank uses them all")
    p.add_argument("--shards", action="store_true",
                   help="the --address servers hold the dataset's shards (batchfeed serve "
                        "--shard I/N): every rank's client gets them all")
    p.add_argument("--rank", type=int, default=int(env.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(env.get("WORLD_SIZE", 1)))
    p.add_argument("--master-addr", default=env.get("MASTER_ADDR", "127.0.0.1"),
                   help="rank 0's host, where the ranks meet (default: $MASTER_ADDR or 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=int(env.get("MASTER_PORT", 29500)))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="the batch order's seed (all ranks alike)")
    p.add_argument("--linger", type=float, default=0.0,
                   help="seconds a rank other than 0 waits, after the last barrier, before it "
                        "exits (docker compose --exit-code-from trainer0 stops every container "
                        "when the first one exits: rank 0 should be that one)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for the server and for the other ranks")
    p.add_argument("--verify", action="store_true",
                   help="check every batch against the plan (needs the synthetic dataset)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        p.error(f"--rank {args.rank} is out of range for --world-size {args.world_size}")
    addresses = args.addresses or ["tcp://127.0.0.1:5555"]
    args.address = addresses if args.shards else addresses[args.rank % len(addresses)]
    return args


class RowChecker:
    """Knows every row of the synthetic dataset, and which rows each batch must hold.

    A row is recognised by its first two features (one uint64 key), so a batch's rows are
    identified from their content, not from what the plan says they should be.
    """

    def __init__(self, client: Client, params: PlanParams):
        if client.dataset != SYNTHETIC_NAME:
            raise VerifyError(f"--verify needs the server's built-in synthetic dataset, "
                              f"not {client.dataset!r}")
        self.rows = client.rows
        self.arrays = synthetic_arrays(self.rows)
        self.plan = BatchPlan(self.rows, params)
        if self.plan.batches_per_epoch != client.batches_per_epoch:
            raise VerifyError(f"the server plans {client.batches_per_epoch} batches per epoch, "
                              f"the local plan {self.plan.batches_per_epoch}")
        keys = self._keys(self.arrays["x"])
        self._by_key = np.argsort(keys)
        self._sorted_keys = keys[self._by_key]
        if np.any(self._sorted_keys[1:] == self._sorted_keys[:-1]):
            raise VerifyError("two rows of the synthetic dataset share a key; cannot verify")
        self._seen: list[np.ndarray] = []

    @staticmethod
    def _keys(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:, :2]).view(np.uint64).ravel()

    def row_ids(self, x: np.ndarray) -> np.ndarray:
        keys = self._keys(x)
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), self.rows - 1)
        ids = self._by_key[pos]
        unknown = np.flatnonzero(self._sorted_keys[pos] != keys)
        if len(unknown):
            raise VerifyError(f"{len(unknown)} rows of a batch are not rows of the dataset")
        return ids

    def check_batch(self, epoch: int, k: int, batch: dict[str, np.ndarray]) -> None:
        x, y = batch["x"], batch["y"]
        ids = self.row_ids(x)
        expected = self.plan.indices(epoch, k)
        if not np.array_equal(ids, expected):
            raise VerifyError(f"epoch {epoch} batch {k}: got rows {ids[:5].tolist()}..., "
                              f"the plan says {expected[:5].tolist()}...")
        if not np.array_equal(x, self.arrays["x"][expected]):
            raise VerifyError(f"epoch {epoch} batch {k}: x differs from the dataset's rows")
        if not np.array_equal(y, self.arrays["y"][expected]):
            raise VerifyError(f"epoch {epoch} batch {k}: y differs from the dataset's rows")
        self._seen.append(ids)

    def end_epoch(self, epoch: int) -> np.ndarray:
        """Check this rank saw each of its rows once; return them and start the next epoch."""
        seen = np.concatenate(self._seen) if self._seen else np.empty(0, np.int64)
        self._seen = []
        mine = self.plan_rows(self.plan, epoch)
        if len(seen) != len(mine):
            raise VerifyError(f"epoch {epoch}: got {len(seen)} rows, the plan gives this rank "
                              f"{len(mine)}")
        extra, missing = multiset_difference(seen, mine)
        if extra or missing:
            raise VerifyError(f"epoch {epoch}: {extra} rows came more often than the plan gives "
                              f"them, {missing} less often")
        return seen

    @staticmethod
    def plan_rows(plan: BatchPlan, epoch: int) -> np.ndarray:
        return np.concatenate([plan.indices(epoch, k) for k in range(plan.batches_per_epoch)])

    def check_ranks(self, epoch: int, per_rank: list[np.ndarray]) -> tuple[int, int, int]:
        """Across ranks: every row the plan serves, as often as it serves it (the padding rows
        twice, the dropped tail never); returns (distinct rows, padded rows, dropped rows)."""
        everything = np.concatenate(per_rank)
        plans = [BatchPlan(self.rows, dataclasses.replace(self.plan.params, rank=r))
                 for r in range(self.plan.params.world_size)]
        expected = np.concatenate([self.plan_rows(p, epoch) for p in plans])
        extra, missing = multiset_difference(everything, expected)
        if extra or missing:
            raise VerifyError(f"epoch {epoch}: {extra} rows went to ranks more often than the "
                              f"plan gives them, {missing} less often (to no rank)")
        return len(np.unique(everything)), self.plan.padded_rows, self.plan.dropped_rows


def multiset_difference(got: np.ndarray, expected: np.ndarray) -> tuple[int, int]:
    """How many rows ``got`` has more often than ``expected``, and how many less often."""
    rows = max(int(got.max(initial=0)), int(expected.max(initial=0))) + 1
    diff = np.bincount(got, minlength=rows) - np.bincount(expected, minlength=rows)
    return int(diff[diff > 0].sum()), int(-diff[diff < 0].sum())


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, client: Client, epoch: int,
                checker: RowChecker | None, args: argparse.Namespace) -> None:
    """One pass over this rank's batches, with a progress bar; prints the epoch's summary."""
    loss_fn = nn.CrossEntropyLoss()
    t0, wait0 = time.perf_counter(), client.stats()["wait_s"]
    losses, samples = [], 0
    bar = tqdm(client.epoch(epoch, format="torch"), total=client.batches_per_epoch,
               desc=f"rank {args.rank} epoch {epoch}", unit="batch", mininterval=1.0,
               disable=args.no_progress, file=sys.stderr)
    for k, batch in enumerate(bar):
        x, y = batch["x"], batch["y"]
        if checker is not None:
            checker.check_batch(epoch, k, {"x": x.numpy(), "y": y.numpy()})
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        losses.append(loss.item())
        samples += len(y)
        if k % 20 == 0:
            elapsed = time.perf_counter() - t0
            waited = client.stats()["wait_s"] - wait0
            bar.set_postfix_str(f"{samples / elapsed:,.0f} samples/s, "
                                f"waiting {waited / elapsed:.0%}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - t0
    waited = client.stats()["wait_s"] - wait0
    print(f"rank {args.rank}: epoch {epoch}: mean loss {np.mean(losses):.4f}, "
          f"{samples / elapsed:,.0f} samples/s, waiting on data {waited / elapsed:.1%}",
          flush=True)


def verify_epoch(checker: RowChecker, epoch: int, rank: int, world: int) -> None:
    """This rank saw each of its rows once; across ranks, no row twice and no gap but the tail."""
    seen = checker.end_epoch(epoch)
    print(f"rank {rank}: epoch {epoch}: {len(seen):,} rows exactly once", flush=True)
    if world > 1:
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, seen)
        union, padded, tail = checker.check_ranks(epoch, per_rank)  # every rank checks alike
        if rank == 0:
            print(f"all ranks: epoch {epoch}: {union:,} rows across {world} ranks as the plan "
                  f"gives them, {padded:,} padded, {tail:,} in the dropped tail", flush=True)


def train(args: argparse.Namespace) -> None:
    rank, world = args.rank, args.world_size
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = make_model(args.hidden)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://{args.master_addr}:{args.master_port}", rank=rank,
            world_size=world, timeout=datetime.timedelta(seconds=max(args.connect_timeout, 60)),
        )
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    params = PlanParams(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world)

    with Client(args.address, batch_size=args.batch_size, seed=args.seed, rank=rank,
                world_size=world, connect_timeout=args.connect_timeout,
                name=f"ddp-rank{rank}") as client:
        checker = RowChecker(client, params) if args.verify else None
        print(f"rank {rank}: {client.rows:,} rows from {args.address}, "
              f"{client.batches_per_epoch} batches of {args.batch_size} per epoch", flush=True)
        for epoch in range(args.epochs):
            train_epoch(model, optimizer, client, epoch, checker, args)
            if checker is not None:
                verify_epoch(checker, epoch, rank, world)
        stats = client.stats()
        print(f"rank {rank}: done: {stats['batches']:,.0f} batches, "
              f"{stats['batches_per_s'] * args.batch_size:,.0f} samples/s, "
              f"waiting on data {stats['wait_fraction']:.1%} of the time", flush=True)
    if world > 1:
        dist.barrier()  # every rank has checked and printed its last line
        if rank != 0:
            time.sleep(args.linger)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except VerifyError as exc:
        print(f"rank {args.rank}: verify failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
