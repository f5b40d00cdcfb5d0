"""Keras 3 (torch backend) ``model.fit`` on batches from batchfeed, via a ``keras.utils.PyDataset``.

    KERAS_BACKEND=torch python3 examples/train_keras.py --epochs 3

The data is scikit-learn's 8x8 digits (64 features, 10 classes, shipped with scikit-learn), served
by ``batchfeed.serve`` from a child process that the script stops at exit (``--address`` trains
from a running server instead; it must serve float32 ``x`` (N, 64) and int ``y``).  The model
is a small MLP.  ``BatchfeedPyDataset`` is the part to copy: a PyDataset over a
``batchfeed.Client``, ``len()`` batches per epoch, batch ``i`` by index, and a new epoch, in a
new order, after each ``on_epoch_end``.  Call ``fit(..., shuffle=False)``: the server shuffles
(every epoch anew), and Keras's own shuffling of the indices would make every read a seek (see
the class).

Keras shows its progress bar (``--verbose 2``: one line per epoch); after each epoch a callback
prints ``epoch E (batchfeed epoch B): loss L, N samples/s, waiting on data P%, R rows (D
distinct), order <digest>`` (the digest is of the row ids in the order they came).  The
last lines, ``losses: ...`` and ``orders: ...``, are for scripts to read.

Needs keras 3, torch and scikit-learn (``pip install keras torch scikit-learn``).  The backend
is torch unless ``KERAS_BACKEND`` says otherwise; this script sets it before importing keras.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

import keras
import numpy as np
import torch
from sklearn.datasets import load_digits

import batchfeed


class BatchfeedPyDataset(keras.utils.PyDataset):
    """Batch ``i`` of the current epoch of a ``batchfeed.Client``, as ``(x, y)``.

    Keras asks a PyDataset for batches by index; a batchfeed client streams an epoch in order,
    prefetching ahead.  So ``__getitem__(i)`` reads the client's epoch iterator *sequentially*:
    when ``i`` is the batch after the last one served (what ``fit(shuffle=False)`` with
    ``workers=1`` asks), it is the next batch of the stream.  Asked out of order (Keras's
    ``shuffle=True``, several ``workers`` racing, or a second look at a batch), it restarts the
    stream at batch ``i`` with ``client.epoch(epoch, start_batch=i)``: the batch is still
    exactly batch ``i`` of the epoch's plan, but the prefetched batches are dropped, so each
    such read waits a round trip.  ``seeks`` counts those restarts, ``samples`` the rows served.

    ``on_epoch_end`` moves on to the next epoch (a new order).  The first ``fit()`` of a model
    whose metrics are not built yet reads batch 0 to build them, then ends that epoch: its
    Keras epoch 0 is then batchfeed epoch 1, and so on (set ``epoch`` to choose).  ``ids``
    names a field of row ids to record, per epoch, in ``rows[epoch]`` (which rows it saw, in
    order).
    """

    def __init__(self, client: batchfeed.Client, x: str = "x", y: str = "y", epoch: int = 0,
                 ids: str | None = None, **kwargs):
        super().__init__(**kwargs)  # workers, use_multiprocessing, max_queue_size
        self.client = client
        self.x, self.y, self.ids = x, y, ids
        self.epoch = epoch
        self.seeks = self.samples = 0
        self.rows: dict[int, list[np.ndarray]] = {}
        self._batches = None  # the client's iterator over this epoch
        self._next = 0  # the batch that iterator yields next

    def __len__(self) -> int:
        return self.client.batches_per_epoch

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of an epoch of {len(self)} batches")
        if self._batches is None or i != self._next:
            self.seeks += self._batches is not None
            self._batches = self.client.epoch(self.epoch, start_batch=i)
        batch = next(self._batches)
        self._next = i + 1
        self.samples += len(batch[self.y])
        if self.ids is not None:
            self.rows.setdefault(self.epoch, []).append(batch[self.ids].copy())
        return batch[self.x], batch[self.y]

    def on_epoch_end(self) -> None:
        if self._batches is not None:
            self._batches.close()
        self._batches, self._next = None, 0
        self.epoch += 1


class DataStats(keras.callbacks.Callback):
    """After each epoch: samples/s, the share of time waiting on data, and the rows it saw (if
    the dataset records ids)."""

    def __init__(self, dataset: BatchfeedPyDataset):
        super().__init__()
        self.dataset = dataset
        self.orders: list[str] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.t0, self.wait0 = time.perf_counter(), self.dataset.client.stats()["wait_s"]
        self.epoch, self.samples0 = self.dataset.epoch, self.dataset.samples

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self.t0
        waited = self.dataset.client.stats()["wait_s"] - self.wait0
        samples = self.dataset.samples - self.samples0
        line = (f"epoch {epoch} (batchfeed epoch {self.epoch}): loss {logs['loss']:.4f}, "
                f"{samples / elapsed:,.0f} samples/s, waiting on data {waited / elapsed:.1%}")
        if self.epoch in self.dataset.rows:
            ids = np.concatenate(self.dataset.rows[self.epoch])
            order = hashlib.sha1(ids.astype(np.int64).tobytes()).hexdigest()[:12]
            self.orders.append(order)
            line += f", {len(ids):,} rows ({len(np.unique(ids)):,} distinct), order {order}"
        print(line, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the model's and the batch order's seed")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="Keras's fit(verbose=): 1 a progress bar, 2 one line per epoch")
    p.add_argument("--address", help="train from this running server instead of serving the "
                                      "digits here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    torch.set_num_threads(args.threads)
    digits = load_digits()
    data = {"x": (digits.data / 16.0).astype(np.float32), "y": digits.target.astype(np.int64),
            "id": np.arange(len(digits.target), dtype=np.int64)}
    server = None if args.address else batchfeed.serve(data, workers=1)
    try:
        with batchfeed.Client(args.address or server.address, batch_size=args.batch_size,
                              seed=args.seed, name="keras") as client:
            served = {field.name for field in client.fields}
            dataset = BatchfeedPyDataset(client, ids="id" if "id" in served else None)
            model = keras.Sequential([
                keras.Input((data["x"].shape[1],)),
                keras.layers.Dense(args.hidden, activation="relu"),
                keras.layers.Dense(10),
            ])
            model.compile(optimizer=keras.optimizers.Adam(args.lr),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"])
            stats = DataStats(dataset)
            # The progress bar first, so that it ends its line before DataStats prints.
            callbacks = [keras.callbacks.ProgbarLogger()] if args.verbose else []
            history = model.fit(dataset, epochs=args.epochs, shuffle=False,
                                verbose=args.verbose, callbacks=[*callbacks, stats])
            print(f"done: {client.stats()['batches']:,.0f} batches, waiting on data "
                  f"{client.stats()['wait_fraction']:.1%} of the time, "
                  f"{dataset.seeks} out-of-order reads", flush=True)
    finally:
        if server is not None:
            server.stop()
    print("losses: " + " ".join(f"{loss:.4f}" for loss in history.history["loss"]))
    print("orders: " + " ".join(stats.orders), flush=True)


if __name__ == "__main__":
    main()
