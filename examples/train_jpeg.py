"""Train a small CNN on a folder of JPEG files that the batchfeed server decodes and augments.

The folder is in torchvision's ImageFolder layout (``DIR/<class>/<image>.jpg``).  The server
holds the encoded files once in shared memory; its workers decode each image, take a random
resized crop (torchvision's sampling), flip half of them and normalise them to float32 CHW
(``batchfeed.transforms:train_images``), so the trainer only trains.  The classes are the
folder's sub-directories, in the order the client's ``classes`` gives them.

The images are ``train_cnn.py``'s synthetic 10-class task (five textures in two colour schemes,
32x32 pixels), written as JPEG files.  Make the folder, serve it, train:

    python examples/train_jpeg.py --make-data jpegs/ --images 5000   # prints the serve command
    batchfeed serve --data jpegs/ --transform "batchfeed.transforms:train_images(size=32)" &
    python examples/train_jpeg.py --address tcp://127.0.0.1:5555 --epochs 5

Each epoch shows a progress bar (images/s, as ``samples/s``, and the share of time spent
waiting on data), then prints its mean loss and accuracy; the last line, ``losses: ...``,
lists the per-epoch mean losses for scripts to read.  Any ImageFolder of JPEG or PNG files
works the same way: serve it with the transform, and the model gets one output per class.

Needs torch, tqdm and Pillow (``pip install torch tqdm pillow``).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from batchfeed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py even when loaded by path
import common  # the options, the epoch loop and the output lines that the examples share
import train_cnn  # the synthetic textures

SIZE = train_cnn.SIZE  # the images' side, and the crop's
TRANSFORM = f"batchfeed.transforms:train_images(size={SIZE})"
NAME = "train-jpeg"
# Class k of train_cnn's images is texture k % 5 in colour scheme k // 5.
TEXTURES = ("stripes-across", "stripes-down", "diagonals", "checks", "disc")
SCHEMES = ("orange-on-blue", "green-on-purple")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.argument_parser(__doc__, epochs=5, batch_size=64, lr=2e-3)
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    common.add_run_options(p, rows=5000, noun="images", count="--images", metavar="DIR",
                           make_data="write an ImageFolder of JPEG files to DIR, print the "
                                     "command that serves it, and exit")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of --make-data")
    return common.parse_args(p, argv)


# ------------------------------------------------------------------------------ --make-data


def class_name(label: int) -> str:
    return f"{TEXTURES[label % 5]}-{SCHEMES[label // 5]}"


def make_folder(directory: str, images: int, seed: int, quality: int) -> None:
    """Write ``images`` JPEGs of train_cnn's textures as ``directory/<class>/<index>.jpg``, then
    print the command that serves them."""
    from PIL import Image

    root = Path(directory)
    data = train_cnn.make_images(images, seed=seed)
    for label in range(train_cnn.CLASSES):
        (root / class_name(label)).mkdir(parents=True, exist_ok=True)
    for i, (chw, label) in enumerate(zip(data["x"], data["y"].tolist())):
        hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
        Image.fromarray(hwc).save(root / class_name(label) / f"{i:06d}.jpg", quality=quality)
    print(f"wrote {images:,} JPEG images in {train_cnn.CLASSES} class folders to {directory}; "
          "serve them with:")
    print(f'batchfeed serve --data {shlex.quote(directory)} --transform "{TRANSFORM}"')


# ------------------------------------------------------------------------------ training


def check_batch(batch: dict[str, torch.Tensor]) -> None:
    """Fail with advice if the server does not decode and augment the images."""
    x = batch.get("image")
    if x is None or "label" not in batch:
        raise SystemExit(f"train_jpeg: batches hold {sorted(batch)}; this example needs an "
                         "image folder's image and label: serve the output of --make-data")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 4 \
            or x.shape[1] != 3:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "encoded bytes"
        raise SystemExit(f"train_jpeg: images arrive as {what}, not float32 (N, 3, H, W): "
                         f'start the server with --transform "{TRANSFORM}", which decodes, '
                         "crops, flips and normalises them")


def make_step(args: argparse.Namespace, client: Client) -> common.Step:
    """The step of a CNN with one output per class the server names."""
    if not client.classes:
        raise SystemExit("train_jpeg: the server names no classes; serve an image folder "
                         "(DIR/<class>/<image>.jpg), e.g. the output of --make-data")
    print(f"classes: {', '.join(client.classes)}", flush=True)
    # image: decoded, cropped, flipped and normalised by the server's workers
    return common.classifier_step(train_cnn.make_model(args.width, len(client.classes)),
                                  args.lr, "image", "label")


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    common.train(args, functools.partial(make_step, args), name=NAME, noun="images",
                 check=check_batch, postfix_every=10, per_client=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_data:
        make_folder(args.make_data, args.images, args.seed, args.quality)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
