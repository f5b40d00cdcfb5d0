"""Hugging Face ``Trainer`` over batchfeed: a tiny GPT-2 on packed rows, resumable.

What makes ``Trainer`` work is three lines::

    train = BatchfeedDataset(address, batch_size=8, pack={"tokens": 128}, seed=0,
                             map=causal_lm_inputs)                 # input_ids and labels
    args = TrainingArguments(out, per_device_train_batch_size=1, max_steps=...)  # 1 batch a step
    Trainer(model, args, train_dataset=train, data_collator=collate_batches).train()

- ``BatchfeedDataset`` yields whole batches from the server (its ``batch_size`` is the rows a
  step), so ``Trainer``'s own DataLoader takes one item a step
  (``per_device_train_batch_size=1``) and ``collate_batches`` unwraps it;
- ``causal_lm_inputs`` turns packed rows into what a causal LM takes: ``input_ids``, and
  ``labels`` that leave out padding and the first token of every document packed after another
  (the model shifts labels itself); those names are in the model's signature, so Trainer's
  ``remove_unused_columns`` keeps them;
- ``dataloader_num_workers`` stays 0 (the default): the server does the loading.

``Trainer`` calls the dataset's ``set_epoch`` at every epoch, and resuming mid-epoch
(``trainer.train(resume_from_checkpoint=...)``) it reads the batches it had trained on again and
drops them: the resumed run trains on exactly the batches the uninterrupted one would have.

The model is built from a config (no download): GPT-2 with 2 layers of width 64 over byte ids
(vocabulary 256), trained on the running Python's standard library (``*.py`` files as bytes),
which this script serves itself with ``batchfeed.serve`` unless ``--address`` names a server.

    python examples/train_hf_trainer.py --max-steps 60 --out-dir hf-run
    python examples/train_hf_trainer.py --max-steps 120 --out-dir hf-run --resume

The last line lists the logged training losses (``losses: ...``).  Needs torch and
transformers (``pip install transformers accelerate``, after torch).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import batchfeed
from batchfeed import BatchfeedDataset
from batchfeed.client.torch_data import causal_lm_inputs, collate_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lm import read_documents, stdlib_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running server of the corpus (default: serve the "
                                     "stdlib files from this process)")
    p.add_argument("--out-dir", required=True, help="Trainer's output_dir (checkpoints)")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=0, help="serve this many stdlib files (0: all)")
    p.add_argument("--resume", nargs="?", const="last", metavar="CHECKPOINT",
                   help="resume from a checkpoint dir (default: the last in --out-dir)")
    p.add_argument("--log-batches", help="append 'step digest' of every batch to this file")
    return p.parse_args(argv)


@contextlib.contextmanager
def corpus_address(args: argparse.Namespace) -> Iterator[str]:
    if args.address:
        yield args.address
        return
    docs = read_documents(stdlib_files(args.files, args.seed))
    with batchfeed.serve({"tokens": docs}, name="stdlib", workers=1) as server:
        print(f"serving {len(docs):,} stdlib files at {server.address}", flush=True)
        yield server.address


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=64, n_layer=2,
                        n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)  # from a config: nothing is downloaded

    class LoggedTrainer(Trainer):
        """Writes a digest of each step's inputs (for checking a resumed run's batches)."""

        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
            if args.log_batches:
                digest = hashlib.sha1(inputs["input_ids"].cpu().numpy().tobytes()).hexdigest()
                with open(args.log_batches, "a") as log:
                    log.write(f"{self.state.global_step + 1} {digest}\n")
            return super().training_step(model, inputs, num_items_in_batch)

    with corpus_address(args) as address:
        train = BatchfeedDataset(address, batch_size=args.batch_size, seed=args.seed,
                                 pack={"tokens": args.seq_len}, map=causal_lm_inputs)
        training_args = TrainingArguments(
            output_dir=args.out_dir, per_device_train_batch_size=1, max_steps=args.max_steps,
            learning_rate=args.lr, warmup_steps=0, save_steps=args.save_steps,
            logging_steps=args.logging_steps, report_to=[], seed=args.seed, use_cpu=True,
            disable_tqdm=True)
        trainer = LoggedTrainer(model=model, args=training_args, train_dataset=train,
                                data_collator=collate_batches)
        resume: str | bool | None = None
        if args.resume:
            resume = True if args.resume == "last" else args.resume
        with train:
            trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}", flush=True)
    print("losses: " + " ".join(f"{v:.4f}" for v in losses), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
