"""Train a small CNN on images that the batchfeed server augments, and watch the loss fall.

The images are a synthetic 10-class task stored as uint8 (N, 3, 32, 32): five textures
(horizontal, vertical or diagonal stripes, a checkerboard, a disc) in two colour schemes, each
image with its own period, phase, position and colours, plus pixel noise.  The classes survive a
random crop and a left-right flip, so the server's workers can augment every batch with
``batchfeed.transforms:augment`` (random crop + flip, normalise to float32, brightness and
contrast jitter) while the trainer only trains.  Make the data, serve it, train:

    python examples/train_cnn.py --make-data images.npz --rows 5000   # prints the serve command
    batchfeed serve --data images.npz --transform batchfeed.transforms:augment &
    python examples/train_cnn.py --address tcp://127.0.0.1:5555 --epochs 5

Each epoch shows a progress bar (samples/s and the share of time spent waiting on data), then
prints its mean loss and accuracy; the last line, ``losses: 2.1234 1.4567 ...``, lists the
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

SIZE, CLASSES = 32, 10
TRANSFORM = "batchfeed.transforms:augment"
# (foreground, background) RGB of the two colour schemes; class = texture + 5 * scheme.
PALETTES = np.array([[[230, 110, 40], [30, 60, 150]],
                     [[70, 220, 90], [150, 40, 130]]], np.float32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", action="append", dest="addresses", metavar="ADDRESS",
                   help="a batchfeed server (default: tcp://127.0.0.1:5555); repeat it, or give "
                        "a comma list, for several loaders serving the same data")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0,
                   help="the batch order's and the model's seed (and the data's, with --make-data)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate")
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--make-data", metavar="PATH",
                   help="write the dataset to PATH (.npz, or else a directory of .npy files), "
                        "print the command that serves it, and exit")
    p.add_argument("--rows", type=int, default=5000, help="images to write with --make-data")
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


def texture_masks(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 32, 32) bool: where each image's foreground is, for textures 0..4."""
    n = len(texture)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period = rng.integers(4, 9, (n, 1, 1))
    phase = rng.integers(0, 8, (n, 1, 1))
    slope = rng.choice([-1, 1], (n, 1, 1))  # diagonals either way: a flip maps one to the other
    rows_on = (yy + phase) % period < period / 2
    cols_on = (xx + phase) % period < period / 2
    diagonal = (xx + slope * yy + phase) % period < period / 2
    cy, cx = rng.integers(10, 23, (2, n, 1, 1))
    radius = rng.integers(6, 11, (n, 1, 1))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    t = texture[:, None, None]
    return np.select([t == 0, t == 1, t == 2, t == 3], [rows_on, cols_on, diagonal,
                                                          rows_on ^ cols_on], disc)


def make_images(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``x`` uint8 (rows, 3, 32, 32) and ``y`` int64 labels in 0..9."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, rows).astype(np.int64)
    x = np.empty((rows, 3, SIZE, SIZE), np.uint8)
    for start in range(0, rows, 1000):  # in chunks, to keep the float intermediates small
        label = y[start : start + 1000]
        n = len(label)
        mask = texture_masks(label % 5, rng)[:, None]
        colours = PALETTES[label // 5] + rng.normal(0, 25, (n, 2, 3)).astype(np.float32)
        fg, bg = colours[:, 0, :, None, None], colours[:, 1, :, None, None]
        img = np.where(mask, fg, bg) + rng.normal(0, 30, (n, 3, SIZE, SIZE)).astype(np.float32)
        x[start : start + n] = np.clip(img, 0, 255).astype(np.uint8)
    return {"x": x, "y": y}


def make_model(width: int) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # 16 x 16
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 8 x 8
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, CLASSES),
    )


def check_batch(batch: dict[str, torch.Tensor]) -> None:
    """Fail with advice if the server does not serve augmented images."""
    x = batch.get("x")
    if x is None or "y" not in batch or x.ndim != 4 or tuple(x.shape[1:]) != (3, SIZE, SIZE):
        shapes = {name: tuple(t.shape) for name, t in batch.items()}
        raise SystemExit(f"train_cnn: batches hold {shapes}; this example needs x (N, 3, {SIZE}, "
                         f"{SIZE}) and y (N,): serve the output of --make-data")
    if x.dtype != torch.float32:
        raise SystemExit(f"train_cnn: x arrives as {x.dtype}, not float32: start the server "
                         f"with --transform {TRANSFORM}, which augments and normalises it")


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
        if k % 10 == 0:
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
    model = make_model(args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    address = args.addresses if len(args.addresses) > 1 else args.addresses[0]
    with Client(address, batch_size=args.batch_size, seed=args.seed,
                connect_timeout=args.connect_timeout, name="train-cnn") as client:
        print(f"{client.rows:,} images of {client.dataset!r} from {', '.join(args.addresses)}, "
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
        write_dataset(make_images(args.rows, seed=args.seed), args.make_data)
        print(f"wrote {args.rows:,} images to {args.make_data}; serve them with:")
        print(f"batchfeed serve --data {shlex.quote(args.make_data)} --transform {TRANSFORM}")
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
