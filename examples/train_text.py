"""Train a text classifier on padded token sequences, trimmed per batch by the batchfeed server.

The data is a synthetic 5-class task: ``tokens`` int32 (N, max_len), each row a sequence of
random word ids padded with 0 to the dataset's longest, ``length`` int64 (N,), its valid length
(most sequences short, a few long) and ``label`` int64 (N,).  Each class owns a few keyword ids;
a sequence holds one to three keywords of its class (and half the time one of another class)
its random words, so the classes are learnable.  The server's workers cut every batch to its
own longest sequence with ``batchfeed.transforms:trim_padding`` (dynamic padding), so a batch
of short sentences reaches the trainer short, and batch widths vary.  Make the data, serve it,
train:

    python examples/train_text.py --make-data text.npz --rows 20000   # prints the serve command
    batchfeed serve --data text.npz --transform batchfeed.transforms:trim_padding &
    python examples/train_text.py --address tcp://127.0.0.1:5555 --epochs 5

The model embeds the tokens, averages the embeddings over each sequence's valid length and
classifies the average with one linear layer.  Each epoch shows a progress bar (samples/s and
the share of time spent waiting on data), then prints its mean loss, accuracy and the batches'
mean width; the last line, ``losses: 1.6012 1.2345 ...``, lists the per-epoch mean losses for
scripts to read.  Several ``--address`` (or a comma list) spread the batches over loaders that
serve the same data.

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

TRANSFORM = "batchfeed.transforms:trim_padding"
PAD, MIN_LEN = 0, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", action="append", dest="addresses", metavar="ADDRESS",
                   help="a batchfeed server (default: tcp://127.0.0.1:5555); repeat it, or give "
                        "a comma list, for several loaders serving the same data")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0,
                   help="the batch order's and the model's seed (and the data's, with --make-data)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    p.add_argument("--dim", type=int, default=32, help="embedding width")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--make-data", metavar="PATH",
                   help="write the dataset to PATH (.npz, or else a directory of .npy files), "
                        "print the command that serves it, and exit")
    p.add_argument("--rows", type=int, default=20_000, help="sequences to write with --make-data")
    p.add_argument("--max-len", type=int, default=256, help="the padded width (--make-data)")
    p.add_argument("--vocab", type=int, default=2000,
                   help="word ids 1..vocab-1 (0 pads); with --make-data, and the model's "
                        "embedding table when training")
    p.add_argument("--classes", type=int, default=5, help="classes (--make-data)")
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


def make_sequences(rows: int, max_len: int = 256, vocab: int = 2000, classes: int = 5,
                   seed: int = 0, keywords_per_class: int = 8) -> dict[str, np.ndarray]:
    """``tokens`` int32 (rows, max_len) padded with 0, ``length`` int64, ``label`` int64.

    Word ids 1 .. classes * keywords_per_class are the keywords (class c owns a run of them);
    the rest of the vocabulary is filler.
    """
    n_keywords = classes * keywords_per_class
    if max_len < MIN_LEN or vocab <= n_keywords + 1:
        raise ValueError(f"need --max-len >= {MIN_LEN} and --vocab > {n_keywords + 1}")
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, rows).astype(np.int64)
    # Mostly short sequences, a long tail: what makes trimming each batch worth it.
    length = np.minimum(MIN_LEN + rng.exponential(max_len / 8, rows).astype(np.int64), max_len)
    tokens = rng.integers(n_keywords + 1, vocab, (rows, max_len)).astype(np.int32)
    tokens[np.arange(max_len) >= length[:, None]] = PAD
    for i in range(rows):
        n_own = rng.integers(1, 4)
        words = 1 + label[i] * keywords_per_class + rng.integers(0, keywords_per_class, n_own)
        if rng.random() < 0.5:  # a distractor: one keyword of another class
            other = (label[i] + rng.integers(1, classes)) % classes
            words = np.append(words, 1 + other * keywords_per_class
                              + rng.integers(0, keywords_per_class))
        places = rng.choice(length[i], min(len(words), length[i]), replace=False)
        tokens[i, places] = words[: len(places)]
    return {"tokens": tokens, "length": length, "label": label}


class MeanPoolClassifier(nn.Module):
    """Embed, average over each sequence's valid length, classify."""

    def __init__(self, vocab: int, dim: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(tokens.shape[1]) < length[:, None]  # (N, L)
        summed = (self.embed(tokens.long()) * valid[..., None]).sum(1)
        return self.out(summed / length.clamp(min=1)[:, None])


def check_batch(batch: dict[str, torch.Tensor], vocab: int, classes: int) -> None:
    """Fail with advice if the batches are not what --make-data writes."""
    if not {"tokens", "length", "label"} <= batch.keys() or batch["tokens"].ndim != 2:
        shapes = {name: tuple(t.shape) for name, t in batch.items()}
        raise SystemExit(f"train_text: batches hold {shapes}; this example needs tokens (N, L), "
                         "length (N,) and label (N,): serve the output of --make-data")
    if int(batch["tokens"].max()) >= vocab:
        raise SystemExit(f"train_text: word ids reach {int(batch['tokens'].max())}; pass the "
                         f"--vocab the data was made with (now {vocab})")
    if int(batch["label"].max()) >= classes:
        raise SystemExit(f"train_text: labels reach {int(batch['label'].max())}; pass the "
                         f"--classes the data was made with (now {classes})")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, client: Client, epoch: int,
                args: argparse.Namespace) -> tuple[float, float]:
    """One pass with a progress bar; prints and returns the epoch's mean loss and accuracy."""
    loss_fn = nn.CrossEntropyLoss()
    t0, wait0 = time.perf_counter(), client.stats()["wait_s"]
    loss_sum, correct, samples, widths = 0.0, 0, 0, []

    def rates() -> str:
        elapsed = time.perf_counter() - t0
        waited = client.stats()["wait_s"] - wait0
        return f"{samples / elapsed:,.0f} samples/s, waiting on data {waited / elapsed:.1%}"

    bar = tqdm(client.epoch(epoch, format="torch"), total=client.batches_per_epoch,
               desc=f"epoch {epoch}", unit="batch", mininterval=1.0, disable=args.no_progress,
               file=sys.stderr)
    for k, batch in enumerate(bar):
        if k == 0:
            check_batch(batch, args.vocab, args.classes)
        tokens, length, y = batch["tokens"], batch["length"], batch["label"]
        logits = model(tokens, length)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        samples += len(y)
        widths.append(tokens.shape[1])
        if k % 20 == 0:
            bar.set_postfix_str(rates(), refresh=False)
    bar.set_postfix_str(rates(), refresh=False)
    bar.close()
    mean_loss, accuracy = loss_sum / max(samples, 1), correct / max(samples, 1)
    print(f"epoch {epoch}: mean loss {mean_loss:.4f}, accuracy {accuracy:.1%}, batch width "
          f"{np.mean(widths):.0f} on average ({min(widths)}..{max(widths)}), {rates()}",
          flush=True)
    return mean_loss, accuracy


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    address = args.addresses if len(args.addresses) > 1 else args.addresses[0]
    with Client(address, batch_size=args.batch_size, seed=args.seed,
                connect_timeout=args.connect_timeout, name="train-text") as client:
        model = MeanPoolClassifier(args.vocab, args.dim, args.classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        print(f"{client.rows:,} sequences of {client.dataset!r} from "
              f"{', '.join(args.addresses)}, {client.batches_per_epoch} batches of "
              f"{args.batch_size} per epoch", flush=True)
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
        arrays = make_sequences(args.rows, args.max_len, args.vocab, args.classes, args.seed)
        write_dataset(arrays, args.make_data)
        print(f"wrote {args.rows:,} sequences to {args.make_data}; serve them with:")
        print(f"batchfeed serve --data {shlex.quote(args.make_data)} --transform {TRANSFORM}")
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
