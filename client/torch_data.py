"""``BatchfeedDataset``: a ``torch.utils.data.IterableDataset`` over a batchfeed server.

Existing ``DataLoader(dataset, batch_size=None)`` code switches with one line::

    loader = DataLoader(BatchfeedDataset("tcp://127.0.0.1:5555", batch_size=256, seed=0),
                        batch_size=None)

What training loops get:
- Each ``iter()`` (each pass over the loader) starts the next epoch, 0, 1, 2, ..., however the
  last pass ended (read to the end, ``break``, a step limit), unless ``set_epoch(e)`` was called
  since the last ``iter()``: then epoch ``e``, as with ``DistributedSampler``.  ``len()`` is the
  number of batches the next pass gives.
- ``state_dict()`` / ``load_state_dict()`` follow torchdata's Stateful protocol, so that
  ``StatefulDataLoader(dataset, batch_size=None)`` resumes mid-epoch row for row.  The state is
  the Client's (``Client.from_state_dict`` takes it too): the plan parameters, the dataset's
  size, and the epoch and next batch as the trainer consumed them.  A state of other parameters
  or another dataset size is refused.
- ``as_tuple=("x", "y")`` yields ``(batch["x"], batch["y"])``, for ``for data, target in loader``.
- One pass at a time: a new ``iter()`` while a pass is running makes that pass raise
  IteratorSuperseded.
- It pickles, connected or not: a copy carries the parameters and the position (where the next
  pass starts) and connects on its first use; never a socket, a lock or a thread.  In a child
  process forked from the one that connected it (a DataLoader worker, say), it connects anew
  on first use there and never touches the parent's connection.

Batching, shuffling and parallel loading happen on the server, so keep ``num_workers=0``.  The
client connects on first use; ``close()`` (or leaving a ``with`` block) closes it.  This module
imports torch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from batchfeed.shared.errors import InvalidRequest, IteratorSuperseded
from batchfeed.shared.plan import PlanParams

from .client import STATE_FORMAT, Client, EpochIterator, TakenOn

_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(PlanParams))


def _check_position(epoch: object, start_batch: object) -> None:
    if type(epoch) is not int or epoch < 0:
        raise InvalidRequest(f"epoch must be an int >= 0, got {epoch!r}")
    if type(start_batch) is not int or start_batch < 0:
        raise InvalidRequest(f"start_batch must be an int >= 0, got {start_batch!r}")


class BatchfeedDataset(IterableDataset):
    """Yields one batch per step (a dict of torch tensors, or a tuple with ``as_tuple``).

    Args:
        address: the server's address (or addresses), as for ``Client``.
        epoch, start_batch: where the first pass starts (default: epoch 0, batch 0).
        as_tuple: field names: yield a tuple of those fields, in that order, not a dict.
        pin_memory, device, zero_copy_readonly: as for ``Client.epoch(format="torch")``.
        client_kwargs: ``Client``'s arguments (``batch_size`` is required).
    """

    def __init__(self, address: str | Sequence[str], *, epoch: int = 0, start_batch: int = 0,
                 as_tuple: Sequence[str] | None = None, pin_memory: bool = False,
                 device: Any = None, zero_copy_readonly: bool = False, **client_kwargs: Any):
        super().__init__()
        _check_position(epoch, start_batch)
        try:
            inspect.signature(Client).bind(address, **client_kwargs)
        except TypeError as exc:
            raise InvalidRequest(f"BatchfeedDataset passes these to Client: {exc}") from None
        if "batch_size" not in client_kwargs:
            raise InvalidRequest("BatchfeedDataset needs batch_size=")
        if as_tuple is not None:
            if (isinstance(as_tuple, str) or not as_tuple
                    or not all(isinstance(name, str) for name in as_tuple)):
                raise InvalidRequest(f"as_tuple must be a sequence of field names, e.g. "
                                     f"('x', 'y'), got {as_tuple!r}")
            as_tuple = tuple(as_tuple)
        self.address = address
        self.as_tuple: tuple[str, ...] | None = as_tuple
        self.pin_memory = pin_memory
        self.device = device
        self.zero_copy_readonly = zero_copy_readonly
        self.client_kwargs = client_kwargs
        self.params = PlanParams(**{k: v for k, v in client_kwargs.items() if k in _PARAM_NAMES})
        self._next = (epoch, start_batch)  # where the next pass starts
        self._chosen = True  # ``_next`` was set (not derived from a pass) since the last iter()
        self._taken_on = TakenOn({})  # what a loaded state was taken on
        self._pass: _Pass | None = None  # the last pass started
        self._client: Client | None = None

    # ------------------------------------------------------------------ the client

    @property
    def client(self) -> Client:
        """The client, connected on first use (and checked against a loaded state's sizes);
        in a forked child, a client of its own."""
        if self._client is not None and self._client._forked:
            self._client, self._pass = None, None  # the parent's: left alone
        if self._client is None:
            client = Client(self.address, **self.client_kwargs)
            try:
                client._check_taken_on(self._taken_on)
            except BaseException:
                client.close()
                raise
            self._client = client
        return self._client

    def close(self) -> None:
        """Close the client (a later use connects again).  Safe to call twice."""
        self._pass = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> BatchfeedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """What a copy needs: the parameters and where the next pass starts; never the client
        (its sockets, lock and thread) or the running pass."""
        state = self.__dict__.copy()
        state["_client"] = state["_pass"] = None
        return state

    # ------------------------------------------------------------------ epochs

    @property
    def epoch(self) -> int:
        """The epoch the next pass is (the one after the last pass's, unless set)."""
        return self._next[0]

    @property
    def start_batch(self) -> int:
        """The batch the next pass starts at (0, unless set or resumed)."""
        return self._next[1]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next pass epoch ``epoch`` from batch ``start_batch``."""
        _check_position(epoch, start_batch)
        self._next = (epoch, start_batch)
        self._chosen = True

    def __len__(self) -> int:
        """Batches the next pass gives: an epoch's, or what is left of a resumed one."""
        return max(0, self.client.batches_per_epoch - self._next[1])

    def __iter__(self) -> _Pass:
        if get_worker_info() is not None:
            raise InvalidRequest(
                "BatchfeedDataset already loads in parallel on the server; use "
                "DataLoader(..., batch_size=None, num_workers=0)"
            )
        client = self.client
        epoch, start = self._next
        if self.as_tuple is not None and client.fields:
            missing = [n for n in self.as_tuple if n not in {f.name for f in client.fields}]
            if missing:
                raise InvalidRequest(f"as_tuple names {', '.join(map(repr, missing))}, but the "
                                     f"batches have: {', '.join(f.name for f in client.fields)}")
        previous = self._pass
        if previous is not None and previous.live:
            previous.superseded = (
                f"epoch {epoch} from batch {start} replaced this pass over epoch "
                f"{previous.epoch} (which was at batch {previous.next_batch}): a "
                "BatchfeedDataset serves one pass at a time (each iter() starts the next "
                "epoch); finish a pass before starting another, or make one dataset per "
                "concurrent reader")
        batches = client.epoch(epoch, start, format="torch", pin_memory=self.pin_memory,
                               device=self.device, zero_copy_readonly=self.zero_copy_readonly)
        self._pass = _Pass(batches, epoch, start, self.as_tuple)
        self._next, self._chosen = (epoch + 1, 0), False
        return self._pass

    # ------------------------------------------------------------------ checkpoints

    def _position(self) -> tuple[int, int]:
        """The epoch and next batch a resumed run starts with."""
        if self._pass is not None and not self._chosen:
            return self._pass.epoch, self._pass.next_batch
        return self._next

    def state_dict(self) -> dict[str, Any]:
        """A small, JSON-serialisable state (the Client's format): the plan parameters, what
        it was taken on (``dataset``, ``rows``, ``batches_per_epoch``), and ``epoch`` and
        ``next_batch``: the batch the trainer takes next.  Connects if not connected yet."""
        epoch, next_batch = self._position()
        return {**self.client.state_dict(), "epoch": epoch, "next_batch": next_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue where ``state`` was taken: the rest of its epoch (none
        if it was taken at the end of one), then the epochs after it.

        Raises InvalidRequest if the state was taken with other plan parameters, on another
        dataset, or on a dataset of another size (checked against the server on connecting).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InvalidRequest(f"not a batchfeed state (expected format {STATE_FORMAT}); pass "
                                 "what BatchfeedDataset.state_dict() returned")
        _check_position(state.get("epoch"), state.get("next_batch"))
        taken_on = TakenOn.of(state)
        params = PlanParams.from_wire({k: v for k, v in state.items() if k in _PARAM_NAMES})
        then = dataclasses.asdict(params)
        then["dataset"] = state.get("dataset")
        now = {**dataclasses.asdict(self.params), "dataset": self.client_kwargs.get("dataset")}
        differ = [key for key in now if then[key] != now[key]]
        if differ:
            raise InvalidRequest(
                "this state was taken with "
                + ", ".join(f"{key}={then[key]!r}" for key in differ)
                + ", but this dataset has "
                + ", ".join(f"{key}={now[key]!r}" for key in differ)
                + ": resuming would give other batches than the checkpointed run.  Make the "
                "dataset with the checkpoint's parameters (Client.from_state_dict shows them), "
                "or start a new run without loading the state"
            )
        if self._client is not None:
            self._client._check_taken_on(taken_on)
        self._taken_on = taken_on
        self._next, self._chosen = (state["epoch"], state["next_batch"]), True


class _Pass:
    """One pass over the dataset: the batches of one epoch from ``next_batch`` on, as the
    trainer takes them (``epoch`` and ``next_batch`` are the dataset's position)."""

    def __init__(self, batches: EpochIterator, epoch: int, start: int,
                 as_tuple: tuple[str, ...] | None):
        self._batches = batches
        self._as_tuple = as_tuple
        self.epoch = epoch
        self.next_batch = start
        self.superseded: str | None = None  # set by the dataset when a newer pass replaces it

    @property
    def live(self) -> bool:
        return self.superseded is None and self._batches.live

    def __iter__(self) -> _Pass:
        return self

    def __len__(self) -> int:
        return len(self._batches)

    def __next__(self) -> Any:
        if self.superseded is not None:
            raise IteratorSuperseded(self.superseded)
        try:
            batch = next(self._batches)
        except IteratorSuperseded:
            if self.superseded is None:
                raise
            raise IteratorSuperseded(self.superseded) from None
        self.next_batch += 1
        if self._as_tuple is None:
            return batch
        return tuple([batch[name] for name in self._as_tuple])

    def close(self) -> None:
        """Stop early: the client stops requesting."""
        self._batches.close()

