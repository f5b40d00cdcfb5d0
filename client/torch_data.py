"""``BatchfeedDataset``: a ``torch.utils.data.IterableDataset`` over a batchfeed server.

Existing ``DataLoader(dataset, batch_size=None)`` code switches with one line::

    loader = DataLoader(BatchfeedDataset("tcp://127.0.0.1:5555", batch_size=256, seed=0),
                        batch_size=None)

Each pass over the loader is one epoch; the epoch advances by itself after a full pass, or is
set with ``set_epoch(e)`` as with ``DistributedSampler``.  Batching, shuffling and parallel
loading happen on the server, so keep ``num_workers=0``.  This module imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from batchfeed.shared.errors import InvalidRequest

from .client import Client


class BatchfeedDataset(IterableDataset):
    """Yields one dict of torch tensors per batch; the client connects on first use."""

    def __init__(self, address: str, *, epoch: int = 0, start_batch: int = 0,
                 pin_memory: bool = False, device: Any = None, **client_kwargs: Any):
        super().__init__()
        self.address = address
        self.epoch = epoch
        self.start_batch = start_batch
        self.pin_memory = pin_memory
        self.device = device
        self.client_kwargs = client_kwargs
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.address, **self.client_kwargs)
        return self._client

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.client.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is not None:
            raise InvalidRequest(
                "BatchfeedDataset already loads in parallel on the server; use "
                "DataLoader(..., batch_size=None, num_workers=0)"
            )
        epoch, start = self.epoch, self.start_batch
        yield from self.client.epoch(epoch, start, format="torch", pin_memory=self.pin_memory,
                                     device=self.device)
        self.epoch, self.start_batch = epoch + 1, 0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
