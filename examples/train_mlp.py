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
import sys
from pathlib import Path

import torch
from torch import nn

from batchfeed.server.dataset import synthetic_arrays

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py even when loaded by path
import common  # the options, the epoch loop and the output lines that the examples share

FEATURES, CLASSES = 64, 10
NOUN = "rows"  # what the output calls a row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.argument_parser(__doc__, epochs=3, batch_size=256, lr=1e-3)
    p.add_argument("--hidden", type=int, default=128, help="width of the two hidden layers")
    common.add_run_options(p, rows=200_000, noun=NOUN)
    return common.parse_args(p, argv)


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


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    step = common.classifier_step(make_model(args.hidden), args.lr, "x", "y")

    common.train(args, step, name="train-mlp", noun=NOUN, check=check_batch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_data:
        common.make_data(synthetic_arrays(args.rows, seed=args.seed), args.make_data, NOUN)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
