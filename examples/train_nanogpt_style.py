"""A nanoGPT-style training loop over batchfeed: one endless stream of batches, steps not epochs.

nanoGPT's loop is ``for iter_num in range(max_iters): X, Y = get_batch('train') ...``, where a
batch is rows of ``block_size + 1`` tokens shifted by one into inputs and targets.  With
batchfeed, ``get_batch`` reads ``client.stream()``, which runs on from epoch to epoch by itself,
and the server packs the documents into rows of exactly ``block_size + 1`` tokens::

    client = Client(address, batch_size=B, pack={"tokens": block_size + 1}, seed=0)
    batches = client.stream(format="torch")        # epoch 0, 1, 2, ... without end

    def get_batch():
        batch = next(batches)
        rows, seg = batch["tokens"].long(), batch["tokens_segment_ids"]
        x, y = rows[:, :-1], rows[:, 1:].clone()   # the (x, y) shift
        y[seg[:, 1:] == 0] = -1                    # padding (only the epoch's last row has it)
        return x, y

A checkpoint saves ``client.state_dict()`` beside the model; ``--resume`` rebuilds the client
with ``Client.from_state_dict`` and goes on with ``client.stream(state["epoch"],
state["next_batch"])``: exactly the batches the uninterrupted run would have read next.

The corpus is the running Python's standard library (``*.py`` files as bytes, vocabulary 256),
served by this script itself with ``batchfeed.serve`` unless ``--address`` names a server
(``python examples/train_lm.py --make-data stdlib.parquet`` writes one to serve).  As in
nanoGPT, attention runs across the documents packed into a row.  Every ``--eval-interval``
iterations it prints the mean training loss; the last line lists them (``losses: ...``).

    python examples/train_nanogpt_style.py --max-iters 200
    python examples/train_nanogpt_style.py --max-iters 100 --out-dir ckpt     # then:
    python examples/train_nanogpt_style.py --max-iters 200 --out-dir ckpt --resume

Needs torch (``pip install torch``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import batchfeed
from batchfeed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lm import read_documents, stdlib_files

VOCAB = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running server of the corpus (default: serve the "
                                     "stdlib files from this process)")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64, help="tokens of context (rows are "
                                                               "block_size + 1 tokens)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=0, help="serve this many stdlib files (0: all)")
    p.add_argument("--max-bytes", type=int, default=0,
                   help="keep only the first N bytes of each file (0: all; a small corpus "
                        "makes short epochs)")
    p.add_argument("--out-dir", help="save a checkpoint here every --eval-interval iterations")
    p.add_argument("--resume", action="store_true", help="resume from --out-dir/ckpt.pt")
    p.add_argument("--log-batches", help="append 'iter digest' of every batch to this file")
    return p.parse_args(argv)


class GPT(nn.Module):
    """A tiny causal transformer: token and learned position embeddings, pre-norm blocks."""

    def __init__(self, block_size: int, n_layer: int, n_embd: int, n_head: int):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


@contextlib.contextmanager
def corpus_address(args: argparse.Namespace) -> Iterator[str]:
    if args.address:
        yield args.address
        return
    docs = read_documents(stdlib_files(args.files, args.seed))
    if args.max_bytes:
        docs = [d[: args.max_bytes] for d in docs]
    with batchfeed.serve({"tokens": docs}, name="stdlib", workers=1) as server:
        print(f"serving {len(docs):,} stdlib files at {server.address}", flush=True)
        yield server.address


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model = GPT(args.block_size, args.n_layer, args.n_embd, args.n_head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ckpt_path = Path(args.out_dir, "ckpt.pt") if args.out_dir else None
    start_iter, state = 0, None
    if args.resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise SystemExit(f"train_nanogpt_style: --resume needs {ckpt_path or '--out-dir'}")
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, state = ckpt["iter_num"], ckpt["data"]
    log = open(args.log_batches, "a") if args.log_batches else None  # noqa: SIM115
    losses: list[float] = []
    with corpus_address(args) as address:
        if state is not None:  # the data's position, saved beside the model
            client = Client.from_state_dict(address, state)
            batches = client.stream(state["epoch"], state["next_batch"], format="torch")
            print(f"resumed at iteration {start_iter}: epoch {state['epoch']}, batch "
                  f"{state['next_batch']}", flush=True)
        else:
            client = Client(address, batch_size=args.batch_size, seed=args.seed,
                            pack={"tokens": args.block_size + 1})
            batches = client.stream(format="torch")

        def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
            batch = next(batches)
            rows, seg = batch["tokens"].long(), batch["tokens_segment_ids"]
            x, y = rows[:, :-1], rows[:, 1:].clone()
            y[seg[:, 1:] == 0] = -1  # padding: only in the epoch's last row
            return x, y

        with client:
            running = 0.0
            for iter_num in range(start_iter, args.max_iters):
                x, y = get_batch()
                if log is not None:
                    log.write(f"{iter_num} {hashlib.sha1(x.numpy().tobytes()).hexdigest()}\n")
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1),
                                       ignore_index=-1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += loss.item()
                if (iter_num + 1) % args.eval_interval == 0:
                    mean = running / args.eval_interval
                    running = 0.0
                    losses.append(mean)
                    print(f"iter {iter_num + 1}: loss {mean:.4f} ({mean / math.log(2):.2f} "
                          f"bits per byte), at epoch {batches.epoch} batch "
                          f"{batches.next_batch}", flush=True)
                    if ckpt_path is not None:
                        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                        torch.save({"model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(),
                                    "iter_num": iter_num + 1, "data": client.state_dict()},
                                   ckpt_path)
    if log is not None:
        log.close()
    print("losses: " + " ".join(f"{v:.4f}" for v in losses), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
