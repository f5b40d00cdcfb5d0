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
- ``as_tuple=("x", "y")`` yields ``(batch["x"], batch["y"])``, for ``for data, target in loader``;
  ``map=fn`` yields ``fn(batch)`` (e.g. ``causal_lm_inputs`` for Hugging Face models).
- It accepts exactly ``Client``'s keywords, through the same conversion (``plan_params``):
  ``pack={"tokens": 2048}``, ``max_tokens=`` with ``batch_size`` unset, and the rest.
- A new process starts at epoch 0.  A script that resumes from its own checkpoint
  (pytorch/examples' ``--resume`` sets its start epoch from the checkpoint) must say which
  epoch each pass is, with one line at the top of its epoch loop, as with DistributedSampler::

      for epoch in range(args.start_epoch, args.epochs):
          train_loader.dataset.set_epoch(epoch)     # without it, the run replays epoch 0

  or save ``state_dict()`` and ``load_state_dict()`` it.  A pass that starts at an earlier
  epoch than a state loaded with ``load_state_dict()`` warns (a RuntimeWarning naming both):
  something moved the epoch back (``set_epoch(0)`` from a loop that counts from 0 again), and
  the run would replay epochs it has trained on.  A warning, not an error, because the loop
  asked for that epoch explicitly and may mean it (a new schedule over the same data).
- One pass at a time: a new ``iter()`` while a pass is running makes that pass raise
  IteratorSuperseded.
- It pickles, connected or not: a copy carries the parameters and the position (where the next
  pass starts) and connects on its first use; never a socket, a lock or a thread.  In a child
  process forked from the one that connected it (a DataLoader worker, say), it connects anew
  on first use there and never touches the parent's connection.

Batching, shuffling and parallel loading happen on the server, so keep ``num_workers=0``.  The
client connects on first use; ``close()`` (or leaving a ``with`` block) closes it.

Hugging Face's ``Trainer`` always makes its own ``DataLoader`` with a numeric batch size, so
that each step's batch is a list of the dataset's items: ``collate_batches`` as the
``data_collator`` unwraps it (with ``per_device_train_batch_size=1``: one server batch a step).
``Trainer`` calls ``set_epoch`` at every epoch and, resuming from a checkpoint mid-epoch, reads
the batches it had trained on again and drops them, so a resumed run gets exactly the batches
the uninterrupted one would have.  ``examples/train_hf_trainer.py`` shows it.

This module imports torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from batchfeed.shared.errors import InvalidArgument, InvalidArgumentType, IteratorSuperseded
from batchfeed.shared.plan import PlanParams

from .arguments import PLAN_KEYWORDS, check_addresses, check_position, plan_params
from .checkpoint import STATE_FORMAT, TakenOn
from .client import Client, EpochIterator
from .membership import ServerSet

_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(PlanParams))
_CLIENT = inspect.signature(Client)


class BatchfeedDataset(IterableDataset):
    """Yields one batch per step (a dict of torch tensors, or a tuple with ``as_tuple``).

    Args:
        address: the server's address (or addresses), as for ``Client``.
        epoch, start_batch: where the first pass starts (default: epoch 0, batch 0).
        as_tuple: field names: yield a tuple of those fields, in that order, not a dict.
        map: a function applied to each batch (after ``as_tuple``) in the trainer's process,
            e.g. ``causal_lm_inputs``; a module-level function keeps the dataset picklable.
        pin_memory, device, zero_copy_readonly: as for ``Client.epoch(format="torch")``.
        client_kwargs: every keyword ``Client`` takes (``batch_size``, or ``max_tokens=``
            with ``batch_size`` unset; ``pack={"tokens": 2048}``; ``seed``, ``rank``, ...),
            turned into the plan by the same ``plan_params`` as Client's.

    Bad arguments raise ``InvalidArgument`` (``InvalidArgumentType`` for a wrong type or an
    unknown keyword) at once, before any server is asked.

    Resuming a run in a new process: passes count from epoch 0 again unless told otherwise.
    Call ``set_epoch(epoch)`` at the top of each epoch of the training loop (as with
    DistributedSampler; pytorch/examples' ``--resume`` otherwise replays epoch 0), or
    ``load_state_dict()`` the state saved with the model.
    """

    def __init__(self, address: str | Sequence[str] | ServerSet, *, epoch: int = 0,
                 start_batch: int = 0,
                 as_tuple: Sequence[str] | None = None,
                 map: Callable[[Any], Any] | None = None, pin_memory: bool = False,
                 device: Any = None, zero_copy_readonly: bool = False, **client_kwargs: Any):
        super().__init__()
        check_position(epoch, start_batch)
        check_addresses(address)
        try:
            bound = _CLIENT.bind(address, **client_kwargs)
        except TypeError as exc:
            raise InvalidArgumentType(f"BatchfeedDataset takes Client's keywords: {exc}"
                                      ) from None
        self.params = plan_params(**{k: v for k, v in bound.arguments.items()
                                     if k in PLAN_KEYWORDS})
        if as_tuple is not None:
            if (isinstance(as_tuple, str) or not isinstance(as_tuple, Sequence) or not as_tuple
                    or not all(isinstance(name, str) for name in as_tuple)):
                raise InvalidArgumentType(f"as_tuple must be a sequence of field names, e.g. "
                                          f"('x', 'y'), got {as_tuple!r}")
            as_tuple = tuple(as_tuple)
        if map is not None and not callable(map):
            raise InvalidArgumentType(f"map must be a function of a batch, got {map!r:.80}")
        self.address = address
        self.as_tuple: tuple[str, ...] | None = as_tuple
        self.map = map
        self.pin_memory = pin_memory
        self.device = device
        self.zero_copy_readonly = zero_copy_readonly
        self.client_kwargs = client_kwargs
        self._next = (epoch, start_batch)  # where the next pass starts
        self._chosen = True  # ``_next`` was set (not derived from a pass) since the last iter()
        self._taken_on = TakenOn({})  # what a loaded state was taken on
        self._loaded: tuple[int, int] | None = None  # where a loaded state was taken
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
        """Make the next pass epoch ``epoch`` from batch ``start_batch``.

        A resumed run calls it with the epoch it is at, at the top of each epoch (a new
        process otherwise starts at epoch 0 and replays its batches)."""
        check_position(epoch, start_batch)
        self._next = (epoch, start_batch)
        self._chosen = True

    def __len__(self) -> int:
        """Batches the next pass gives: an epoch's, or what is left of a resumed one."""
        return max(0, self.client.batches_per_epoch - self._next[1])

    def __iter__(self) -> _Pass:
        if get_worker_info() is not None:
            raise InvalidArgument(
                "BatchfeedDataset already loads in parallel on the server; use "
                "DataLoader(..., batch_size=None, num_workers=0) (Hugging Face's Trainer: "
                "dataloader_num_workers=0, the default)"
            )
        client = self.client
        epoch, start = self._next
        if self.as_tuple is not None and client.fields:
            missing = [n for n in self.as_tuple if n not in {f.name for f in client.fields}]
            if missing:
                raise InvalidArgument(f"as_tuple names {', '.join(repr(n) for n in missing)}, "
                                      "but the batches have: "
                                      f"{', '.join(f.name for f in client.fields)}")
        if self._loaded is not None:
            if epoch < self._loaded[0]:
                warnings.warn(
                    f"BatchfeedDataset: this pass reads epoch {epoch}, but the state loaded "
                    f"with load_state_dict() was taken in epoch {self._loaded[0]} (at batch "
                    f"{self._loaded[1]}): set_epoch() moved it back since, and the run replays "
                    "epochs it has trained on.  Call set_epoch(epoch) with the epoch the "
                    "training loop is at, or leave the position to the loaded state",
                    RuntimeWarning, stacklevel=2)
            self._loaded = None
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
        self._pass = _Pass(batches, epoch, start, self.as_tuple, self.map)
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

        Raises InvalidArgument if the state was taken with other plan parameters or on another
        dataset; InvalidRequest if on a dataset of another size (checked against the server on
        connecting).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InvalidArgument(f"not a batchfeed state (expected format {STATE_FORMAT}); "
                                  "pass what BatchfeedDataset.state_dict() returned")
        check_position(state.get("epoch"), state.get("next_batch"))
        taken_on = TakenOn.of(state)
        params = PlanParams.from_wire({k: v for k, v in state.items() if k in _PARAM_NAMES},
                                      InvalidArgument)
        then = dataclasses.asdict(params)
        then["dataset"] = state.get("dataset")
        now = {**dataclasses.asdict(self.params), "dataset": self.client_kwargs.get("dataset")}
        differ = [key for key in now if then[key] != now[key]]
        if differ:
            raise InvalidArgument(
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
        self._loaded = self._next


class _Pass:
    """One pass over the dataset: the batches of one epoch from ``next_batch`` on, as the
    trainer takes them (``epoch`` and ``next_batch`` are the dataset's position)."""

    def __init__(self, batches: EpochIterator, epoch: int, start: int,
                 as_tuple: tuple[str, ...] | None, map: Callable[[Any], Any] | None = None):
        self._batches = batches
        self._as_tuple = as_tuple
        self._map = map
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
        out: Any = batch if self._as_tuple is None else tuple(
            [batch[name] for name in self._as_tuple])
        return out if self._map is None else self._map(out)

    def close(self) -> None:
        """Stop early: the client stops requesting."""
        self._batches.close()



# ---------------------------------------------------------------------------------------------
# Hugging Face: Trainer's collator, and inputs for a causal language model


def collate_batches(items: Sequence[Any]) -> Any:
    """A ``collate_fn`` (Hugging Face ``Trainer``'s ``data_collator``) for a ``DataLoader`` that
    was given a numeric batch size over a ``BatchfeedDataset``: each item is already a whole
    batch, so a list of one is unwrapped (a dict batch as a plain dict).

    ``Trainer`` needs ``per_device_train_batch_size=1`` with it: the batch size is the
    dataset's ``batch_size``.  A list of several is refused, saying so.
    """
    if len(items) != 1:
        raise InvalidArgument(
            f"collate_batches got {len(items)} items, but each item of a BatchfeedDataset is "
            "already a whole batch (its batch_size= sets the rows): give the DataLoader "
            "batch_size=1 (Hugging Face's Trainer: per_device_train_batch_size=1)")
    (batch,) = items
    return dict(batch) if isinstance(batch, Mapping) else batch


def causal_lm_inputs(batch: Mapping[str, Any], field: str = "tokens") -> dict[str, Any]:
    """A packed batch (``pack={field: L}``) as a Hugging Face causal LM's inputs:
    ``input_ids`` (the tokens, int64) and ``labels``, the tokens but -100 (left out of the
    loss) at padding and at the first token of every document that follows another in its
    row, so that no token is predicted across a document boundary (the model shifts labels by
    itself: ``labels[t]`` is predicted from the tokens before t).  For ``map=`` of a
    ``BatchfeedDataset``.  Attention still crosses documents within a row, as GPT-2's
    pretraining on concatenated text did; the positions restart in every row.
    """
    for name in (field, f"{field}_segment_ids"):
        if name not in batch:
            raise InvalidArgument(f"causal_lm_inputs needs packed rows ({field!r} and "
                                  f"{field}_segment_ids: pack={{{field!r}: L}}); the batch has "
                                  f"{', '.join(map(str, batch))}")
    tokens = torch.as_tensor(batch[field]).long()
    segments = torch.as_tensor(batch[f"{field}_segment_ids"])
    labels = tokens.clone()
    labels[segments == 0] = -100
    labels[:, 1:][segments[:, 1:] != segments[:, :-1]] = -100
    return {"input_ids": tokens, "labels": labels}
