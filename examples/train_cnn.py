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
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py even when loaded by path
import common  # the options, the epoch loop and the output lines that the examples share

SIZE, CLASSES = 32, 10
TRANSFORM = "batchfeed.transforms:augment"
NOUN = "images"  # what the output calls a row
# (foreground, background) RGB of the two colour schemes; class = texture + 5 * scheme.
PALETTES = np.array([[[230, 110, 40], [30, 60, 150]],
                     [[70, 220, 90], [150, 40, 130]]], np.float32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.argument_parser(__doc__, epochs=5, batch_size=64, lr=2e-3)
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    common.add_run_options(p, rows=5000, noun=NOUN)
    return common.parse_args(p, argv)


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


def make_model(width: int, classes: int = CLASSES) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # 16 x 16
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 8 x 8
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes),
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


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # x: float32 images, augmented by the server's workers
    step = common.classifier_step(make_model(args.width), args.lr, "x", "y")

    common.train(args, step, name="train-cnn", noun=NOUN, check=check_batch, postfix_every=10)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_data:
        common.make_data(make_images(args.rows, seed=args.seed), args.make_data, NOUN,
                         transform=TRANSFORM)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
