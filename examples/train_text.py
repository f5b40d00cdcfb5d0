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
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py even when loaded by path
import common  # the options, the epoch loop and the output lines that the examples share

TRANSFORM = "batchfeed.transforms:trim_padding"
PAD, MIN_LEN = 0, 4
NOUN = "sequences"  # what the output calls a row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.argument_parser(__doc__, epochs=5, batch_size=64, lr=3e-3)
    p.add_argument("--dim", type=int, default=32, help="embedding width")
    common.add_run_options(p, rows=20_000, noun=NOUN)
    p.add_argument("--max-len", type=int, default=256, help="the padded width (--make-data)")
    p.add_argument("--vocab", type=int, default=2000,
                   help="word ids 1..vocab-1 (0 pads); with --make-data, and the model's "
                        "embedding table when training")
    p.add_argument("--classes", type=int, default=5, help="classes (--make-data)")
    return common.parse_args(p, argv)


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


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = MeanPoolClassifier(args.vocab, args.dim, args.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    widths: list[int] = []  # of this epoch's batches, which the server trimmed

    def step(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, length, y = batch["tokens"], batch["length"], batch["label"]
        logits = model(tokens, length)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        widths.append(tokens.shape[1])
        return loss, logits, y

    def width_note() -> str:
        """For the epoch's line, at its end; then the next epoch counts its own widths."""
        note = f"batch width {np.mean(widths):.0f} on average ({min(widths)}..{max(widths)})"
        widths.clear()
        return note

    common.train(args, step, name="train-text", noun=NOUN,
                 check=lambda batch: check_batch(batch, args.vocab, args.classes),
                 note=width_note)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_data:
        arrays = make_sequences(args.rows, args.max_len, args.vocab, args.classes, args.seed)
        common.make_data(arrays, args.make_data, NOUN, transform=TRANSFORM)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
