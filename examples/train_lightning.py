"""PyTorch Lightning, two DDP ranks on CPU, each reading its share of batches from batchfeed.

    python3 examples/train_lightning.py --epochs 3 --limit-train-batches 0.5

The data is scikit-learn's 8x8 digits (64 features, 10 classes, shipped with scikit-learn, plus
an ``id`` field of row numbers), served by ``batchfeed.serve`` from a child process that the
script stops at exit.  What to copy:
- ``DigitsData.train_dataloader``: a ``BatchfeedDataset`` per rank, made with the trainer's
  ``global_rank`` and ``world_size`` (the ranks get disjoint batches of one epoch plan; with
  ``drop_last=False`` the plan pads the epoch with at most ``world_size - 1`` rows, like
  DistributedSampler), wrapped in ``DataLoader(dataset, batch_size=None)`` (here in a
  ``BatchfeedLoader``, to resume: below).  Lightning adds no
  sampler to an IterableDataset, so keep ``num_workers=0``: the server does the loading.
- Each pass Lightning makes over the loader starts the dataset's next epoch, even when
  ``limit_train_batches`` (or ``max_steps``) ends the pass early: every epoch a new order.
- Resuming (``--ckpt-dir``, then ``--resume CKPT``): Lightning never calls ``set_epoch`` on an
  IterableDataset and restores a loader's state only from a mid-epoch checkpoint, so
  ``train_dataloader`` starts the dataset at the epoch Lightning runs next and returns a
  ``BatchfeedLoader``, a torchdata ``StatefulDataLoader`` whose state Lightning saves and,
  mid-epoch, restores.  ``BatchfeedLoader`` saves a checkpoint on an epoch's last batch as
  "next epoch, batch 0" and lets each DDP rank keep its rank when Lightning hands rank 0's state
  to all; ``PositionCheck`` stops a run whose batch is ever not the one Lightning counts.  A
  callback calling ``set_epoch`` in ``on_train_epoch_start`` would not do: Lightning makes each
  ``fit()``'s first pass before that hook, and skips the hook for an epoch resumed mid-way.
- ``BatchfeedStats``: samples/s and the share of time waiting on data (``client.stats()``) in
  the progress bar, and, after each epoch, the rows every rank saw.

The strategy is ``ddp_spawn`` by default: Lightning starts the rank processes itself, and the
datamodule carries only the server's address to them.  ``--strategy ddp_fork`` starts faster
(the ranks are forked, not started afresh: no second import of torch and Lightning).
Lightning's plain ``ddp`` runs this whole script again for each rank, so each rank would serve
its own copy of the digits (the batches would still be right: they depend on the plan only);
with a server you run yourself, ``ddp`` is the usual choice.  ``--devices 1`` trains in this
process.  After each epoch, rank 0 prints ``epoch E (batchfeed epoch B): loss L, rank R:
N rows, first ..., rows on several ranks: P, S samples/s, waiting on data W%``; the last line,
``losses: ...``, and the ``--record`` file (JSON: every rank's row ids per epoch) are for
scripts to read.

Needs lightning, torch, torchdata and scikit-learn (``pip install lightning torch torchdata
scikit-learn``); without torchdata it warns and resumes only from end-of-epoch checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

import batchfeed
from batchfeed.client.torch_data import BatchfeedDataset

try:
    from torchdata.stateful_dataloader import StatefulDataLoader
except ImportError:  # resumes from end-of-epoch checkpoints only
    StatefulDataLoader = None

# Lightning warns that len() can be wrong with num_workers > 1; here num_workers is 0.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11, torch 2.13

if StatefulDataLoader is not None:

    class BatchfeedLoader(StatefulDataLoader):
        """``StatefulDataLoader(dataset, batch_size=None)``, whose state says where Lightning
        takes its next batch.

        Lightning saves ``state_dict()`` in every checkpoint (``FitLoop.on_save_checkpoint``)
        and loads it when it resumes mid-epoch (``FitLoop._load_combined_loader_states``), before
        its first ``iter()``.  Two things differ from the plain loader's state:
        - On the last batch Lightning takes from an epoch (the epoch's end, or
          ``limit_train_batches``), the state is the next epoch from batch 0: Lightning resumes
          from such a checkpoint with the next epoch, but without a new ``iter()``.
        - Lightning saves rank 0's state and loads it on every rank.  The ranks step together,
          so each takes the epoch and batch and keeps its own rank (the dataset still refuses a
          state of other parameters, such as another ``world_size``).
        """

        def __init__(self, dataset: BatchfeedDataset, trainer: L.Trainer):
            super().__init__(dataset, batch_size=None)
            self.trainer = trainer

        def state_dict(self) -> dict:
            state = super().state_dict()
            position = state["dataset_state"]
            epoch_done = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            if position is not None and epoch_done:
                state["dataset_state"] = {**position, "epoch": position["epoch"] + 1,
                                          "next_batch": 0}
            return state

        def load_state_dict(self, state: dict) -> None:
            position = state.get("dataset_state")
            if position is not None:
                state = {**state, "dataset_state": {**position, "rank": self.dataset.params.rank}}
            super().load_state_dict(state)


class DigitsData(L.LightningDataModule):
    """The training batches of one rank, from the batchfeed server at ``address``."""

    def __init__(self, address: str, batch_size: int, seed: int):
        super().__init__()
        self.address, self.batch_size, self.seed = address, batch_size, seed
        self.dataset: BatchfeedDataset | None = None

    def train_dataloader(self) -> DataLoader:
        # The epoch Lightning runs next: 0, or the one a checkpoint resumes with.  It is what
        # Lightning would pass to a sampler's set_epoch; each later pass starts the next epoch.
        epoch = self.trainer.fit_loop.epoch_progress.current.processed
        self.dataset = BatchfeedDataset(
            self.address, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
            rank=self.trainer.global_rank, world_size=self.trainer.world_size,
            as_tuple=("x", "y", "id"))
        if StatefulDataLoader is None:
            warnings.warn("torchdata is not installed (pip install torchdata): a run resumed "
                          "from a mid-epoch checkpoint will stop with an error", stacklevel=1)
            return DataLoader(self.dataset, batch_size=None)
        return BatchfeedLoader(self.dataset, self.trainer)

    def teardown(self, stage: str) -> None:
        if self.dataset is not None:
            self.dataset.close()


class MLP(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2, threads: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def setup(self, stage: str) -> None:
        torch.set_num_threads(self.hparams.threads)  # in each rank's process

    def training_step(self, batch, batch_idx):
        x, y, ids = batch  # ids: which rows; BatchfeedStats reads them
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class PositionCheck(L.Callback):
    """Stops the run if a batch is not the one Lightning counts (batch ``batch_idx`` of epoch
    ``current_epoch``), rather than train on another epoch's batches without a word."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = trainer.datamodule.dataset.state_dict()
        epoch, k = state["epoch"], state["next_batch"] - 1
        if (epoch, k) != (trainer.current_epoch, batch_idx):
            raise RuntimeError(
                f"batchfeed gave batch {k} of epoch {epoch}, but Lightning counts batch "
                f"{batch_idx} of epoch {trainer.current_epoch}: the dataset was not started "
                "where Lightning resumed.  Make the dataset in train_dataloader() with "
                "epoch=trainer.fit_loop.epoch_progress.current.processed, wrap it in a "
                "BatchfeedLoader, and do not call trainer.estimated_stepping_batches before "
                "the fit starts (Lightning then asks for the loader before restoring it)")


class BatchfeedStats(L.Callback):
    """Samples/s and the share of time waiting on data in the progress bar; after each epoch,
    rank 0 gathers and prints what every rank saw; at the end, the ``losses:`` line and the
    ``record`` file (if given).  It runs in each rank's process, so it prints and writes there.
    """

    def __init__(self, record: str | None = None, every: int = 5):
        self.record, self.every = record, every
        self.epochs: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.on_train_epoch_start(trainer, pl_module)  # a resumed epoch may have no start hook

    def on_train_epoch_start(self, trainer, pl_module):
        self.client = trainer.datamodule.dataset.client
        self.t0, self.wait0 = time.perf_counter(), self.client.stats()["wait_s"]
        self.rows: list[torch.Tensor] = []
        self.loss_sum = 0.0

    def rates(self) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.t0
        samples = sum(len(ids) for ids in self.rows)
        return samples / elapsed, (self.client.stats()["wait_s"] - self.wait0) / elapsed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = batch[2]
        self.rows.append(ids.clone())
        self.loss_sum += float(outputs["loss"]) * len(ids)
        if batch_idx % self.every == 0:
            samples_s, waiting = self.rates()
            pl_module.log_dict({"samples/s": samples_s, "waiting": waiting}, prog_bar=True)

    def on_train_epoch_end(self, trainer, pl_module):
        samples_s, waiting = self.rates()
        ids = torch.cat(self.rows).tolist() if self.rows else []
        mine = {"rows": ids, "loss_sum": self.loss_sum, "samples_s": samples_s,
                "waiting": waiting}
        ranks = [mine]
        if trainer.world_size > 1:
            ranks = [None] * trainer.world_size
            dist.all_gather_object(ranks, mine)
        if not trainer.is_global_zero:
            return
        seen = sum(len(r["rows"]) for r in ranks)
        epoch = {"epoch": trainer.current_epoch,
                 "batchfeed_epoch": trainer.datamodule.dataset.state_dict()["epoch"],
                 "loss": sum(r["loss_sum"] for r in ranks) / max(seen, 1),
                 "rows": [r["rows"] for r in ranks]}
        self.epochs.append(epoch)
        counts = np.bincount(np.concatenate([np.unique(rows) for rows in epoch["rows"]]))
        per_rank = ", ".join(f"rank {k}: {len(r['rows'])} rows, first {r['rows'][:4]}"
                             for k, r in enumerate(ranks))
        print(f"epoch {epoch['epoch']} (batchfeed epoch {epoch['batchfeed_epoch']}): loss "
              f"{epoch['loss']:.4f}, {per_rank}, rows on several ranks: "
              f"{int((counts > 1).sum())}, {sum(r['samples_s'] for r in ranks):,.0f} "
              f"samples/s, waiting on data {np.mean([r['waiting'] for r in ranks]):.1%}",
              flush=True)

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        print("losses: " + " ".join(f"{e['loss']:.4f}" for e in self.epochs), flush=True)
        if self.record:
            with open(self.record, "w") as f:
                json.dump({"world_size": trainer.world_size, "epochs": self.epochs}, f)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the model's and the batch order's seed")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--devices", type=int, default=2, help="DDP ranks (CPU processes)")
    p.add_argument("--strategy", default="ddp_spawn",
                   help="Lightning's strategy when --devices > 1 (ddp_spawn, ddp_fork)")
    p.add_argument("--limit-train-batches", type=float, default=0.5,
                   help="the share of each epoch's batches to train on")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--record", metavar="PATH",
                   help="write the per-epoch losses and every rank's row ids (JSON) here")
    p.add_argument("--ckpt-dir", metavar="DIR",
                   help="save a checkpoint at each epoch's end here (epoch<E>-end.ckpt)")
    p.add_argument("--ckpt-every", type=int, default=0, metavar="N",
                   help="with --ckpt-dir, also save one every N training steps (step<S>.ckpt)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    args = p.parse_args(argv)
    if args.ckpt_every and not args.ckpt_dir:
        p.error("--ckpt-every needs --ckpt-dir")
    return args


def checkpoints(args) -> list[ModelCheckpoint]:
    """Every epoch's end, and every ``--ckpt-every`` steps, all kept."""
    if not args.ckpt_dir:
        return []
    kept = {"dirpath": args.ckpt_dir, "save_top_k": -1, "auto_insert_metric_name": False}
    found = [ModelCheckpoint(filename="epoch{epoch}-end", every_n_epochs=1, **kept)]
    if args.ckpt_every:
        found.append(ModelCheckpoint(filename="step{step}", every_n_train_steps=args.ckpt_every,
                                     **kept))
    return found


def main(argv=None):
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    digits = load_digits()
    data = {"x": (digits.data / 16.0).astype(np.float32), "y": digits.target.astype(np.int64),
            "id": np.arange(len(digits.target), dtype=np.int64)}
    with batchfeed.serve(data, workers=1) as server:
        saving = checkpoints(args)
        trainer = L.Trainer(
            accelerator="cpu", devices=args.devices,
            strategy=args.strategy if args.devices > 1 else "auto",
            max_epochs=args.epochs, limit_train_batches=args.limit_train_batches,
            callbacks=[PositionCheck(), BatchfeedStats(record=args.record), *saving],
            logger=False, enable_checkpointing=bool(saving),
            enable_model_summary=False, enable_progress_bar=not args.no_progress)
        trainer.fit(MLP(args.hidden, args.lr, args.threads),
                    datamodule=DigitsData(server.address, args.batch_size, args.seed),
                    ckpt_path=args.resume)


if __name__ == "__main__":
    main()
