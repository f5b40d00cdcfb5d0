"""What the example trainers share: their common options, the epoch loop, the output lines.

Each script keeps what is its own: the model, the synthetic data maker, the check of the first
batch and the per-batch step (forward, loss, backward, optimizer step).  This module has the
rest:

- ``argument_parser``, ``add_run_options`` and ``parse_args``: ``--address`` (repeatable, or a
  comma list), ``--epochs``, ``--batch-size``, ``--seed``, ``--lr``, then, after the script's
  model options, ``--threads``, ``--connect-timeout``, ``--no-progress``, ``--make-data`` and
  ``--rows``;
- ``train``: connects a ``batchfeed.Client``, runs the epochs with ``run_epoch`` (a tqdm bar
  showing samples/s and the share of time spent waiting on data, then the epoch's line), and
  prints the ``done:`` summary and the ``losses:`` and ``accuracies:`` lines that scripts read;
- ``make_data``: writes a dataset (``.npz``, or else a directory of ``.npy`` files) and prints
  the ``batchfeed serve`` command that serves it.

A script run as ``python examples/train_x.py`` imports this module from its own directory.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batchfeed import Client

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

Batch = dict[str, torch.Tensor]
# A training step on one batch: forward, loss, backward and optimizer step.  It returns the
# loss, the logits and the labels, from which the epoch's mean loss and accuracy are counted.
Step = Callable[[Batch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------ the options


def argument_parser(doc: str, *, epochs: int, batch_size: int,
                    lr: float) -> argparse.ArgumentParser:
    """A parser with the options every example starts with, and these defaults.

    Its description is the first paragraph of ``doc`` (the script's docstring).  The script adds
    its model's options next, then calls ``add_run_options``.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--address", action="append", dest="addresses", metavar="ADDRESS",
                   help=f"a batchfeed server (default: {DEFAULT_ADDRESS}); repeat it, or give "
                        "a comma list, for several loaders serving the same data")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0,
                   help="the batch order's and the model's seed (and the data's, with --make-data)")
    p.add_argument("--lr", type=float, default=lr, help="Adam's learning rate")
    return p


def add_run_options(p: argparse.ArgumentParser, *, rows: int, noun: str, count: str = "--rows",
                    make_data: str = "write the dataset to PATH (.npz, or else a directory of "
                                     ".npy files), print the command that serves it, and exit",
                    metavar: str = "PATH") -> None:
    """--threads, --connect-timeout, --no-progress, --make-data (``make_data`` says what it
    writes), and ``count`` (default ``rows``), how many ``noun`` it writes."""
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--make-data", metavar=metavar, help=make_data)
    p.add_argument(count, type=int, default=rows, help=f"{noun} to write with --make-data")


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``args.addresses`` is the list of every --address, comma lists split."""
    args = p.parse_args(argv)
    args.addresses = [a for arg in args.addresses or [DEFAULT_ADDRESS]
                      for a in arg.split(",") if a]
    return args


# ------------------------------------------------------------------------------ --make-data


def write_dataset(arrays: dict[str, np.ndarray], path: str) -> None:
    """``path.npz`` gets one array per field; any other path becomes a directory of .npy files."""
    if path.endswith(".npz"):
        np.savez(path, **arrays)
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.save(Path(path) / f"{name}.npy", arr)


def make_data(arrays: dict[str, np.ndarray], path: str, noun: str,
              transform: str | None = None) -> None:
    """Write the dataset to ``path`` and print the command that serves it (with ``transform``)."""
    write_dataset(arrays, path)
    rows = len(next(iter(arrays.values())))
    print(f"wrote {rows:,} {noun} to {path}; serve them with:")
    print(f"batchfeed serve --data {shlex.quote(path)}"
          + (f" --transform {transform}" if transform else ""))


# ------------------------------------------------------------------------------ training


def classifier_step(model: torch.nn.Module, lr: float, x: str, y: str) -> Step:
    """A step of Adam on the cross-entropy of ``model(batch[x])`` against ``batch[y]``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, target = model(batch[x]), batch[y]
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits, target

    return step


def run_epoch(client: Client, epoch: int, step: Step, *, check: Callable[[Batch], None],
              no_progress: bool = False, postfix_every: int = 20,
              note: Callable[[], str] | None = None) -> tuple[float, float]:
    """One pass with a progress bar; prints and returns the epoch's mean loss and accuracy.

    ``check`` sees the first batch before it is trained on (to fail with advice if the server
    serves other data).  The bar's samples/s and waiting share are updated every
    ``postfix_every`` batches.  ``note``, called once after the last batch, adds its text to
    the epoch's line after the accuracy.
    """
    t0, wait0 = time.perf_counter(), client.stats()["wait_s"]
    loss_sum, correct, samples = 0.0, 0, 0

    def rates() -> str:
        elapsed = time.perf_counter() - t0
        waited = client.stats()["wait_s"] - wait0
        return f"{samples / elapsed:,.0f} samples/s, waiting on data {waited / elapsed:.1%}"

    bar = tqdm(client.epoch(epoch, format="torch"), total=client.batches_per_epoch,
               desc=f"epoch {epoch}", unit="batch", mininterval=1.0, disable=no_progress,
               file=sys.stderr)
    for k, batch in enumerate(bar):
        if k == 0:
            check(batch)
        loss, logits, y = step(batch)
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        samples += len(y)
        if k % postfix_every == 0:
            bar.set_postfix_str(rates(), refresh=False)
    bar.set_postfix_str(rates(), refresh=False)
    bar.close()
    mean_loss, accuracy = loss_sum / max(samples, 1), correct / max(samples, 1)
    extra = f"{note()}, " if note is not None else ""
    print(f"epoch {epoch}: mean loss {mean_loss:.4f}, accuracy {accuracy:.1%}, {extra}{rates()}",
          flush=True)
    return mean_loss, accuracy


def train(args: argparse.Namespace, step: Step | Callable[[Client], Step], *, name: str,
          noun: str, check: Callable[[Batch], None], postfix_every: int = 20,
          note: Callable[[], str] | None = None,
          per_client: bool = False) -> list[tuple[float, float]]:
    """Train ``args.epochs`` epochs with ``step`` on the batches of ``args.addresses``
    (``per_client``: ``step(client)`` makes the step, for a model that needs what the server
    serves, e.g. its classes).

    Prints what is served, each epoch's line (see ``run_epoch``), the ``done:`` summary, and
    last the per-epoch mean losses and accuracies, which it returns.  ``name`` is the client's
    name on the server; ``noun`` what a row is called (rows, images, ...).
    """
    address = args.addresses if len(args.addresses) > 1 else args.addresses[0]
    with Client(address, batch_size=args.batch_size, seed=args.seed,
                connect_timeout=args.connect_timeout, name=name) as client:
        print(f"{client.rows:,} {noun} of {client.dataset!r} from {', '.join(args.addresses)}, "
              f"{client.batches_per_epoch} batches of {args.batch_size} per epoch", flush=True)
        if per_client:
            step = step(client)  # type: ignore[call-arg,assignment]
        history = [run_epoch(client, epoch, step, check=check, no_progress=args.no_progress,
                             postfix_every=postfix_every, note=note)
                   for epoch in range(args.epochs)]
        stats = client.stats()
        print(f"done: {stats['batches']:,.0f} batches in {stats['wall_s']:.1f} s, waiting on "
              f"data {stats['wait_fraction']:.1%} of the time", flush=True)
    print("losses: " + " ".join(f"{loss:.4f}" for loss, _ in history), flush=True)
    print("accuracies: " + " ".join(f"{acc:.4f}" for _, acc in history), flush=True)
    return history
