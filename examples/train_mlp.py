"""Train an MLP on tabular data from a batchfeed server, and watch the loss fall.

The data is the server's built-in synthetic dataset: ``x`` float32[64] ~ N(0, 1) and ``y`` one of
10 classes, ``argmax(x @ W + noise)`` for a fixed random W, so it is learnable.  Serve it and
train:

    batchfeed serve --synthetic-rows 200000 &
    python examples/train_mlp.py --address tcp://127.0.0.1:5555 --epochs 3

or write the very same data to a file first and serve that (the steps the other examples take):

    python examples/train_mlp.py --make-data mlp.npz --rows 200000   # prints the serve command
    batchfeed serve --data mlp.npz &
    python examples/train_mlp.py --address tcp://127.0.0.1:5555 --epochs 3

Each epoch shows a progress bar (samples/s and the share of time spent waiting on data), then
prints its mean loss and accuracy; the last line, ``losses: 1.2345 0.4567 ...``, lists the
per-epoch mean losses for scripts to read.  Several ``--address`` (or a comma list) spread the
batches over loaders that serve the same data.

Needs torch and tqdm (``pip install torch tqdm``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from batchfeed import Client
from batchfeed.server.dataset import synthetic_arrays

FEATURES, CLASSES = 64, 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", action="append", dest="addresses", metavar="ADDRESS",
                   help="a batchfeed server (default: tcp://127.0.0.1:5555); repeat it, or give "
                        "a comma list, for several loaders serving the same data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0,
                   help="the batch order's and the model's seed (and the data's, with --make-data)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--hidden", type=int, default=128, help="width of the two hidden layers")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--make-data", metavar="PATH",
                   help="write the dataset to PATH (.npz, or else a directory of .npy files), "
                        "print the command that serves it, and exit")
    p.add_argument("--rows", type=int, default=200_000, help="rows to write with --make-data")
    args = p.parse_args(argv)
    args.addresses = [a for arg in args.addresses or ["tcp://127.0.0.1:5555"]
                      for a in arg.split(",") if a]
    return args


def write_dataset(arrays: dict[str, np.ndarray], path: str) -> None:
    """``path.npz`` gets one array per field; any other path becomes a directory of .npy files."""
    if path.endswith(".npz"):
        np.savez(path, **arrays)
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.save(Path(path) / f"{name}.npy", arr)


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, CLASSES))


def check_batch(batch: dict[str, torch.Tensor]) -> None:
    """Fail with advice if the server does not serve the synthetic tabular data."""
    x = batch.get("x")
    if x is None or "y" not in batch or x.dtype != torch.float32 or x.shape[1:] != (FEATURES,):
        shapes = {name: (tuple(t.shape), str(t.dtype)) for name, t in batch.items()}
        raise SystemExit(f"train_mlp: batches hold {shapes}; this example needs x float32 "
                         f"(N, {FEATURES}) and y (N,): run `batchfeed serve` with no --data")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, client: Client, epoch: int,
                args: argparse.Namespace) -> tuple[float, float]:
    """One pass with a progress bar; prints and returns the epoch's mean loss and accuracy."""
    loss_fn = nn.CrossEntropyLoss()
    t0, wait0 = time.perf_counter(), client.stats()["wait_s"]
    loss_sum, correct, samples = 0.0, 0, 0

    def rates() -> str:
        elapsed = time.perf_counter() - t0
        waited = client.stats()["wait_s"] - wait0
        return f"{samples / elapsed:,.0f} samples/s, waiting on data {waited / elapsed:.1%}"

    bar = tqdm(client.epoch(epoch, format="torch"), total=client.batches_per_epoch,
               desc=f"epoch {epoch}", unit="batch", mininterval=1.0, disable=args.no_progress,
               file=sys.stderr)
    for k, batch in enumerate(bar):
        if k == 0:
            check_batch(batch)
        x, y = batch["x"], batch["y"]
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        samples += len(y)
        if k % 20 == 0:
            bar.set_postfix_str(rates(), refresh=False)
    bar.set_postfix_str(rates(), refresh=False)
    bar.close()
    mean_loss, accuracy = loss_sum / max(samples, 1), correct / max(samples, 1)
    print(f"epoch {epoch}: mean loss {mean_loss:.4f}, accuracy {accuracy:.1%}, {rates()}",
          flush=True)
    return mean_loss, accuracy


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = make_model(args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    address = args.addresses if len(args.addresses) > 1 else args.addresses[0]
    with Client(address, batch_size=args.batch_size, seed=args.seed,
                connect_timeout=args.connect_timeout, name="train-mlp") as client:
        print(f"{client.rows:,} rows of {client.dataset!r} from {', '.join(args.addresses)}, "
              f"{client.batches_per_epoch} batches of {args.batch_size} per epoch", flush=True)
        history = [train_epoch(model, optimizer, client, epoch, args)
                   for epoch in range(args.epochs)]
        stats = client.stats()
        print(f"done: {stats['batches']:,.0f} batches in {stats['wall_s']:.1f} s, waiting on "
              f"data {stats['wait_fraction']:.1%} of the time", flush=True)
    print("losses: " + " ".join(f"{loss:.4f}" for loss, _ in history), flush=True)
    print("accuracies: " + " ".join(f"{acc:.4f}" for _, acc in history), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_data:
        write_dataset(synthetic_arrays(args.rows, seed=args.seed), args.make_data)
        print(f"wrote {args.rows:,} rows to {args.make_data}; serve them with:")
        print(f"batchfeed serve --data {shlex.quote(args.make_data)}")
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
