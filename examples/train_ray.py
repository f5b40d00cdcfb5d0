"""Ray Train with batchfeed loaders on Ray: a ``TorchTrainer`` of 2 workers (DDP on CPU) reads
from loaders that ``batchfeed.ray`` started on the cluster, checkpoints the model with each
rank's loader state, and resumes exactly after a worker failure (``FailureConfig``).

    python examples/train_ray.py                      # a simulated 3-node cluster on this host
    python examples/train_ray.py --address auto       # an existing Ray cluster
    python examples/train_ray.py --fail-at 1:5 --verify

The data (``--rows`` rows of 16 float32 features and a label a linear rule gives) is put once
into Ray's object store; ``--shards`` loaders (``--shard I/N``) each hold their part on their
node, spread over the nodes.  Each worker opens a client from the loaders' handle for its Ray
Train rank (``handle.client``: the job's CURVE keys, rank and world size from Ray Train).  Every
``--checkpoint-every`` steps every rank reports a checkpoint: rank 0 writes the model, every
rank its ``client.state_dict()``.  ``--fail-at E:K`` makes rank 1 raise once at batch K of epoch
E; Ray Train restarts the workers (``FailureConfig(max_failures=1)``), which restore the
model and continue each rank's epoch at the checkpoint's batch.

``--verify``: every rank logs the rows of each batch it trained on; at the end the driver checks
that, for each rank and epoch, the last time each batch was trained on it held exactly the rows
the plan gives (``BatchPlan``), and that both ranks together saw every row once per epoch.
Exit code 1 on a mismatch.  Needs ``pip install 'batchfeed[ray]' torch``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=None,
                   help="a Ray cluster to join (e.g. auto); default: start a simulated "
                        "cluster of --nodes nodes on this host (loopback only)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="STEPS")
    p.add_argument("--fail-at", default=None, metavar="EPOCH:BATCH",
                   help="rank 1 raises once at this batch (Ray Train then resumes)")
    p.add_argument("--storage", default=None,
                   help="checkpoints and logs (default: a temporary directory)")
    p.add_argument("--verify", action="store_true")
    return p.parse_args(argv)


def make_data(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    y = (x @ rng.standard_normal(FEATURES) > 0).astype(np.int64)
    return {"id": np.arange(rows, dtype=np.int64), "x": x, "y": y}


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP over the ranks, batches from the loaders' handle."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from batchfeed import Client

    context = ray.train.get_context()
    rank = context.get_world_rank()
    handle, storage = config["handle"], Path(config["storage"])
    model = prepare_model(torch.nn.Linear(FEATURES, 2))  # DDP (gloo) on CPU
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epoch, start = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart: the model and this rank's place in the epoch
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d, "model.pt")))
            state = json.loads(Path(d, f"loader_rank{rank}.json").read_text())
        client = Client.from_state_dict(handle, state, curve=handle.curve())
        epoch, start = state["epoch"], state["next_batch"]
        print(f"rank {rank}: resumed at epoch {epoch}, batch {start}", flush=True)
    else:
        client = handle.client(batch_size=config["batch_size"], seed=config["seed"])
    seen = (storage / "seen" / f"rank{rank}.jsonl").open("a")
    fail = config["fail_at"]
    with client, seen:
        for e in range(epoch, config["epochs"]):
            losses = []
            for k, batch in enumerate(client.epoch(e, start_batch=start if e == epoch else 0),
                                      start=start if e == epoch else 0):
                if fail is not None and rank == 1 and (e, k) == tuple(fail) and \
                        not (storage / "failed-once").exists():
                    (storage / "failed-once").touch()
                    raise RuntimeError(f"rank {rank}: injected failure at epoch {e}, batch {k}")
                x, y = torch.from_numpy(batch["x"]), torch.from_numpy(batch["y"])
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                seen.write(json.dumps({"epoch": e, "k": k, "ids": batch["id"].tolist()}) + "\n")
                seen.flush()
                if (k + 1) % config["checkpoint_every"] == 0:
                    _report(client, model, rank, {"epoch": e, "batch": k,
                                                  "loss": float(np.mean(losses))})
            if losses:  # (none when a resume starts at an epoch's end)
                print(f"rank {rank}: epoch {e}: mean loss {np.mean(losses):.4f} over "
                      f"{len(losses)} batches", flush=True)


def _report(client: Any, model: Any, rank: int, metrics: dict[str, Any]) -> None:
    """Every rank reports the same checkpoint: rank 0's model, each rank's loader state."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save(model.state_dict(), Path(d, "model.pt"))
        Path(d, f"loader_rank{rank}.json").write_text(json.dumps(client.state_dict()))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def verify(storage: Path, args: argparse.Namespace) -> list[str]:
    """What the logs show against the plan (empty: every batch and row as the plan says)."""
    from batchfeed.shared.plan import BatchPlan, PlanParams

    problems = []
    for epoch in range(args.epochs):
        rows: list[int] = []
        for rank in range(2):
            plan = BatchPlan(args.rows, PlanParams(batch_size=args.batch_size, seed=args.seed,
                                                   rank=rank, world_size=2))
            last: dict[int, list[int]] = {}
            for line in (storage / "seen" / f"rank{rank}.jsonl").read_text().splitlines():
                entry = json.loads(line)
                if entry["epoch"] == epoch:
                    last[entry["k"]] = entry["ids"]  # a batch trained on again after a resume
            for k in range(plan.batches_per_epoch):
                if last.get(k) != plan.indices(epoch, k).tolist():
                    problems.append(f"rank {rank}: epoch {epoch}: batch {k} is not the plan's")
            rows += [i for ids in last.values() for i in ids]
        if sorted(rows) != list(range(args.rows)):
            problems.append(f"epoch {epoch}: the ranks did not see every row exactly once")
        else:
            print(f"verify: epoch {epoch}: {args.rows:,} rows exactly once over 2 ranks, "
                  "every batch as the plan gives it")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import contextlib

    from batchfeed.ray_local import keep_ray_on_loopback, simulated_cluster

    keep_ray_on_loopback()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import batchfeed.ray as bfray

    storage = Path(args.storage or tempfile.mkdtemp(prefix="batchfeed-ray-"))
    (storage / "seen").mkdir(parents=True, exist_ok=True)
    fail_at = [int(v) for v in args.fail_at.split(":")] if args.fail_at else None
    started = time.perf_counter()
    cluster = (simulated_cluster(args.nodes, log_to_driver=True) if args.address is None
               else contextlib.nullcontext(ray.init(address=args.address)))
    with cluster, bfray.start_loaders(make_data(args.rows, args.seed), shards=args.shards,
                                      workers=1) as loaders:
        for info in loaders.handle.loaders():
            print(f"loader {info['key']} (shard {info['shard']}) at {info['address']} on node "
                  f"{info['node_id'][:8]}", flush=True)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"handle": loaders.handle, "batch_size": args.batch_size,
                               "seed": args.seed, "epochs": args.epochs, "fail_at": fail_at,
                               "checkpoint_every": args.checkpoint_every,
                               "storage": str(storage)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(storage / "runs"), name="train_ray",
                                 failure_config=FailureConfig(max_failures=1)))
        result = trainer.fit()
        print(f"trained: {result.metrics} in {time.perf_counter() - started:.1f} s", flush=True)
    if args.verify:
        problems = verify(storage, args)
        for p in problems[:20]:
            print(f"verify: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
