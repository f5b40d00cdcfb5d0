"""Train a small byte-level language model on Python's own standard library, in packed rows.

The corpus is real text nobody here wrote: the ``*.py`` files of the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``, without site-packages), each file one
document of uint8 byte ids (vocabulary 256).  By default the script serves it itself, from this
process's memory, with ``batchfeed.serve`` (a forked server on an ``ipc://`` socket, so batches
come on the same-host fast path), and trains:

    python examples/train_lm.py --epochs 3

or writes it to a Parquet file first and trains against a running server:

    python examples/train_lm.py --make-data stdlib.parquet     # prints the serve command
    batchfeed serve --data stdlib.parquet &
    python examples/train_lm.py --address tcp://127.0.0.1:5555 --epochs 3

The client asks for packed rows, ``pack={"tokens": L}``: the epoch's documents, in a fresh
order each epoch, are cut into rows of exactly L tokens (a file longer than the rest of a row
continues in the next), with ``tokens_segment_ids`` (0 = padding, 1.. = the document within
the row) and ``tokens_positions`` (the position within the document).  The model is a causal
transformer (2 layers, width 128 by default) with sinusoidal embeddings of those positions.
Its attention mask is block-diagonal and causal: a token sees the earlier tokens of its own
document in the row, never another document's; padding is left out of the loss, and so are
predictions across a document boundary.

Each epoch shows a progress bar (tokens/s and the share of time spent waiting on data), then
prints its mean loss per token; the last line, ``losses: 3.1234 2.5678 ...``, lists the
per-epoch mean losses for scripts to read.  ``--steps`` stops each epoch early (the default
keeps a run to a minute or two on a CPU; 0 reads whole epochs).

Needs torch and tqdm (``pip install torch tqdm``); --make-data also needs pyarrow.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shlex
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import batchfeed
from batchfeed import Client

VOCAB = 256  # byte ids
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # not the standard library's source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", action="append", dest="addresses", metavar="ADDRESS",
                   help="train against this running server (repeat it, or give a comma list, "
                        "for several); default: serve the stdlib files from this process")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=100,
                   help="batches per epoch at most (0: the whole epoch)")
    p.add_argument("--batch-size", type=int, default=16, help="packed rows per batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed row (L)")
    p.add_argument("--seed", type=int, default=0,
                   help="the batch order's and the model's seed (and the file sample's)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's learning rate")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--files", type=int, default=0,
                   help="serve a random sample of this many stdlib files (0: all of them)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes of the server this script starts")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--make-data", metavar="PATH.parquet",
                   help="write the corpus to a Parquet file, print the command that serves "
                        "it, and exit")
    args = p.parse_args(argv)
    args.addresses = [a for arg in args.addresses or [] for a in arg.split(",") if a]
    return args


# ------------------------------------------------------------------------------ the corpus


def stdlib_files(limit: int = 0, seed: int = 0) -> list[Path]:
    """The standard library's ``*.py`` files (site-packages left out), sorted; with ``limit``,
    a random sample of that many (the same for the same seed)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS]  # not walked into
        files += [Path(directory, name) for name in names if name.endswith(".py")]
    files.sort()
    if not files:
        raise SystemExit(f"train_lm: no *.py files under {root}; this interpreter has no "
                         "standard library sources to train on")
    if limit:
        files = sorted(random.Random(seed).sample(files, min(limit, len(files))))
    return files


def read_documents(files: list[Path]) -> list[np.ndarray]:
    """Each file's bytes as a uint8 array: one document per file (empty files left out)."""
    docs = [np.frombuffer(path.read_bytes(), dtype=np.uint8) for path in files]
    return [d for d in docs if len(d)]


def write_parquet(docs: list[np.ndarray], path: str) -> None:
    """One ``tokens`` column of ``list<uint8>``: what ``batchfeed serve --data`` reads."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("train_lm: --make-data writes Parquet with pyarrow: "
                         "pip install pyarrow") from None
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(docs)))
    pq.write_table(pa.table({"tokens": column}), path)


# ------------------------------------------------------------------------------ the model


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query i may attend to key j: the same segment and j <= i.

    Block-diagonal and causal: a document never sees another one packed into its row.  Padding
    (segment 0) sees only padding, so that no query is left with nothing to attend to (which
    would give NaNs); its outputs are ignored by the loss.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, L, dim) embeddings of the positions within each document (any size: they continue
    across rows when a document does)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: masked self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = (self.qkv(self.norm1(x)).view(b, length, 3, self.heads, dim // self.heads)
                   .permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, length, dim))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Embed bytes and their positions, ``layers`` blocks, predict the next byte."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        if dim % heads or dim % 2:
            raise SystemExit(f"train_lm: --dim ({dim}) must be even and divisible by --heads "
                             f"({heads})")
        self.dim = dim
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens.long()) + sinusoidal(positions, self.dim)
        mask = document_mask(segment_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.out(self.norm(x))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor,
                    segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of predicting token t+1 from t, where both are real tokens of the same
    document (no padding, no prediction across a boundary); and how many predictions."""
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    targets = tokens[:, 1:].long()[same_doc]
    return F.cross_entropy(logits[:, :-1][same_doc], targets), int(same_doc.sum())


# ------------------------------------------------------------------------------ training


def check_batch(batch: dict[str, torch.Tensor], seq_len: int) -> None:
    """Fail with advice if the server does not serve byte documents as packed rows."""
    tokens = batch.get("tokens")
    if tokens is None or "tokens_segment_ids" not in batch or tokens.shape[1:] != (seq_len,):
        shapes = {name: tuple(t.shape) for name, t in batch.items()}
        raise SystemExit(f"train_lm: batches hold {shapes}; this example needs a ragged "
                         "'tokens' field packed into rows: serve the output of --make-data")
    if int(tokens.max()) >= VOCAB:
        raise SystemExit(f"train_lm: token ids reach {int(tokens.max())}; this example reads "
                         f"bytes (ids < {VOCAB}): serve the output of --make-data")


def run_epoch(client: Client, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
              args: argparse.Namespace) -> float:
    """Up to ``args.steps`` batches of ``epoch`` with a progress bar; prints and returns the
    mean loss per predicted token."""
    t0, wait0 = time.perf_counter(), client.stats()["wait_s"]
    loss_sum, predicted, tokens = 0.0, 0, 0
    steps = client.batches_per_epoch if not args.steps else min(args.steps,
                                                                 client.batches_per_epoch)

    def rates() -> str:
        elapsed = time.perf_counter() - t0
        waited = client.stats()["wait_s"] - wait0
        return f"{tokens / elapsed:,.0f} tokens/s, waiting on data {waited / elapsed:.1%}"

    it = client.epoch(epoch, format="torch")
    bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="batch", mininterval=1.0,
               disable=args.no_progress, file=sys.stderr)
    with contextlib.closing(it), bar:
        for k, batch in zip(range(steps), it):
            if k == 0:
                check_batch(batch, args.seq_len)
            seg = batch["tokens_segment_ids"]
            logits = model(batch["tokens"], seg, batch["tokens_positions"])
            loss, n = next_token_loss(logits, batch["tokens"], seg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * n
            predicted += n
            tokens += int((seg > 0).sum())
            bar.update()
            if k % 10 == 0:
                bar.set_postfix_str(rates(), refresh=False)
        bar.set_postfix_str(rates(), refresh=False)
    mean = loss_sum / max(predicted, 1)
    print(f"epoch {epoch}: mean loss {mean:.4f} ({mean / math.log(2):.2f} bits per byte) over "
          f"{predicted:,} predictions, {rates()}", flush=True)
    return mean


def train(args: argparse.Namespace, addresses: list[str]) -> list[float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = ByteLM(args.dim, args.layers, args.heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    address = addresses if len(addresses) > 1 else addresses[0]
    with Client(address, batch_size=args.batch_size, pack={"tokens": args.seq_len},
                seed=args.seed, connect_timeout=args.connect_timeout, name="train-lm") as client:
        params = sum(p.numel() for p in model.parameters())
        print(f"{client.rows:,} documents of {client.dataset!r} from {', '.join(addresses)}, "
              f"packed into {client.batches_per_epoch} batches of {args.batch_size} rows x "
              f"{args.seq_len} tokens per epoch; model: {params:,} parameters", flush=True)
        losses = [run_epoch(client, epoch, model, optimizer, args)
                  for epoch in range(args.epochs)]
        stats = client.stats()
        print(f"done: {stats['batches']:,.0f} batches in {stats['wall_s']:.1f} s, waiting on "
              f"data {stats['wait_fraction']:.1%} of the time", flush=True)
    print("losses: " + " ".join(f"{loss:.4f}" for loss in losses), flush=True)
    return losses


@contextlib.contextmanager
def addresses_to_train_on(args: argparse.Namespace) -> Iterator[list[str]]:
    """``--address`` as given, or else a server of the stdlib files started here (stopped on
    exit).  It is forked before torch starts any thread of its own."""
    if args.addresses:
        yield args.addresses
        return
    files = stdlib_files(args.files, args.seed)
    docs = read_documents(files)
    size = sum(len(d) for d in docs)
    with batchfeed.serve({"tokens": docs}, name="stdlib", workers=args.workers) as server:
        print(f"serving {len(docs):,} stdlib files ({size / 1e6:.1f} MB) at {server.address}",
              flush=True)
        yield [server.address]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_data:
        docs = read_documents(stdlib_files(args.files, args.seed))
        write_parquet(docs, args.make_data)
        print(f"wrote {len(docs):,} stdlib files ({sum(map(len, docs)) / 1e6:.1f} MB) to "
              f"{args.make_data}; serve them with:")
        print(f"batchfeed serve --data {shlex.quote(args.make_data)}")
        return 0
    with addresses_to_train_on(args) as addresses:
        train(args, addresses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
