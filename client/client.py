"""``Client``: what a training loop uses.

    with Client("tcp://127.0.0.1:5555", batch_size=256, seed=0) as client:
        for epoch in range(3):
            for batch in client.epoch(epoch):      # dict[str, np.ndarray], zero-copy views
                ...

The constructor validates the parameters, connects and learns the dataset's schema; a
background I/O thread then keeps up to ``prefetch`` batches on their way.  ``epoch(e,
start_batch=k)`` yields exactly the batches an uninterrupted epoch yields from ``k`` on; a client
serves one iterator at a time, and a newer ``epoch()`` call makes the last one raise
IteratorSuperseded.  ``stream(start_epoch, start_batch)`` is one endless iterator across epochs,
for loops that count steps, not epochs.  ``state_dict()`` / ``from_state_dict()`` checkpoint and
resume (refusing a dataset of another size).  ``close()`` (or leaving the ``with`` block) says
goodbye and stops the I/O thread.

``plan_params`` turns Client's plan keywords into ``PlanParams``: the one conversion that
``Client`` and ``BatchfeedDataset`` share.  Arguments are checked here, before any server is
asked: a bad one is an ``InvalidArgument`` (a ValueError; ``InvalidArgumentType``, also a
TypeError, for a wrong type).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from batchfeed.shared.curve_keys import check_libzmq, load_public, load_secret
from batchfeed.shared.errors import (
    InvalidArgument,
    InvalidArgumentType,
)
from batchfeed.shared.plan import BatchPlan, PlanParams
from batchfeed.shared.schema import Field

from .adapters import converter
from .arguments import check_addresses, check_position, plan_params
from .checkpoint import STATE_FORMAT, TakenOn
from .connection import Connection
from .iteration import EpochIterator, Progress, StreamIterator
from .membership import ServerSet
from .options import ClientConfig


class Client:
    """A connection to one loader server, for one set of plan parameters.

    Args:
        address: the server's address, e.g. ``tcp://127.0.0.1:5555`` or ``ipc:///tmp/bf.sock``;
            or a list of addresses of servers that serve the same dataset: the client spreads
            its batches over them (faster servers get more), yields them in the same plan order
            as one server would, and moves a lost server's batches to the others; or a *server
            set*, any object with an ``addresses()`` method (``batchfeed.client.ServerSet``:
            a Ray loader group's handle, ``batchfeed.client.ResolvedServers``), asked again
            every second: servers that join are used at once, those that leave hand their
            batches to the others.
        batch_size: rows per batch.  The last batch of an epoch is short unless ``drop_last``.
            Leave it unset (or None) with ``max_tokens=``.
        shuffle: ``"full"`` (a fresh permutation per seed and epoch), ``"buffer"`` (a shuffle
            buffer of ``buffer_size`` over the dataset order) or ``"none"``.
        seed: makes the order reproducible; the same seed and epoch give the same batches.
        rank, world_size: data-parallel ranks split one epoch plan, each taking the same
            number of steps.  ``drop_last=False``: every row reaches a rank; the epoch is
            padded with at most ``world_size - 1`` rows from its start, as torch's
            DistributedSampler does (``padded_rows``).  ``drop_last=True``: full batches only,
            disjoint; the rest reaches no rank (``dropped_rows``).
        sampling: ``"uniform"`` (every row once per epoch), ``"balanced"`` (every batch holds
            each class of the integer field ``label`` within one of the others; minority
            classes oversampled, majority ones undersampled) or ``"weighted"`` (rows drawn
            with replacement with probability proportional to the field ``weights``).
            ``epoch_rows`` sets the epoch's length for those two (default: the dataset's rows).
        prefetch: batches requested ahead of the trainer (default: the server picks 64 MiB
            worth, or four of its messages if more, between 8 and 1,024 batches).
        dataset: which dataset, when the server serves several.
        fastpath: read batches straight from the server's shared memory.  By default it is
            used wherever it can be: with a server on this host, over ``ipc://`` or tcp (the
            client proves it can read the server's shared memory); with a server elsewhere the
            client stays on the socket.
        connect_timeout: seconds to wait for the server at start.
        reconnect_timeout: seconds a lost server may take to come back before the trainer
            gets ServerUnavailable.
        curve: ``(client_secret_key_file, server_public_key_file)`` to encrypt and
            authenticate with CURVE (files from ``batchfeed keygen``).
        ragged, pad_value, max_length: how variable-length fields arrive: ``"pad"`` (padded
            to the batch's longest, plus ``<field>_lengths``) or ``"flat"`` (values plus
            ``<field>_offsets``); ``max_length`` truncates every row first.
        pack: ``{"tokens": L}`` packs the epoch's documents into rows of exactly L tokens
            (``batch_size`` is then rows per batch), with ``tokens_segment_ids`` and
            ``tokens_positions``; more fields of the same lengths may be packed alongside.
            (``pack=("tokens",), pack_length=L``, the form a state holds, means the same.)
        max_tokens: batches of whole documents whose padded size stays within this budget
            (fairseq's scheme; the batch count is the same every epoch).

    Several addresses may also name the shards of one dataset (servers run with ``--shard
    I/N``): each batch is put together from every shard's rows, identical to one server's.

    Once connected, ``rows``, ``batches_per_epoch``, ``fields`` and ``prefetch`` say what the
    server serves; ``padded_rows`` and ``dropped_rows`` say what the plan does to make the ranks'
    epochs equal: rows repeated to pad the epoch (``drop_last=False``), and rows no rank gets
    (``drop_last=True``), per epoch over all ranks.

    Bad arguments raise ``InvalidArgument`` here, before the server is asked
    (``InvalidArgumentType``, also a TypeError, for a wrong type); what the server refuses
    against its data raises ``InvalidRequest``.

    One iterator at a time: ``epoch()`` returns an iterator over one epoch (``stream()`` one
    over every epoch from a start on), and a newer call replaces the last (which then raises
    IteratorSuperseded, also in a thread blocked in its ``next()``).  Use one Client per
    concurrent reader.
    """

    def __init__(
        self,
        address: str | Sequence[str] | ServerSet,
        batch_size: int | None = None,
        shuffle: str = "full",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int | None = None,
        *,
        buffer_size: int = 0,
        sampling: str = "uniform",
        label: str | None = None,
        weights: str | None = None,
        epoch_rows: int | None = None,
        dataset: str | None = None,
        fastpath: bool | None = None,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 60.0,
        heartbeat_timeout: float = 5.0,
        name: str | None = None,
        curve: tuple[str, str] | None = None,
        ragged: str = "pad",
        pad_value: float = 0,
        max_length: int | None = None,
        pack: Mapping[str, int] | Sequence[str] | None = None,
        pack_length: int = 0,
        max_tokens: int | None = None,
        token_field: str | None = None,
    ):
        params = plan_params(batch_size, shuffle, seed, drop_last, rank, world_size,
                             buffer_size=buffer_size, sampling=sampling, label=label,
                             weights=weights, epoch_rows=epoch_rows, ragged=ragged,
                             pad_value=pad_value, max_length=max_length, pack=pack,
                             pack_length=pack_length, max_tokens=max_tokens,
                             token_field=token_field)
        addresses, servers = check_addresses(address)
        if prefetch is not None and (type(prefetch) is not int or prefetch < 1):
            raise (InvalidArgumentType if type(prefetch) is not int else InvalidArgument)(
                f"prefetch must be a positive int, got {prefetch!r}")
        for what, value in (("connect_timeout", connect_timeout),
                            ("reconnect_timeout", reconnect_timeout),
                            ("heartbeat_timeout", heartbeat_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgumentType(f"{what} must be a number of seconds, got {value!r}")
            if not value > 0:
                raise InvalidArgument(f"{what} must be positive, got {value!r}")
        self.params = params
        self._dataset_name = dataset
        keys = None
        if curve is not None:
            check_libzmq()
            client_secret, server_public = curve
            keys = (*load_secret(str(client_secret)), load_public(str(server_public)))
        config = ClientConfig(
            addresses=addresses, servers=servers, params=params, prefetch=prefetch or 0,
            dataset=dataset,
            fastpath=None if fastpath is None else bool(fastpath),
            connect_timeout=connect_timeout, reconnect_timeout=reconnect_timeout,
            heartbeat_timeout=heartbeat_timeout, name=name or f"rank{rank}", curve=keys,
        )
        self._progress = Progress()  # where the trainer is, and its counters
        self._iterator: weakref.ref[EpochIterator] | None = None  # the last one epoch() made
        self._plan: BatchPlan | None = None  # made from the WELCOME's rows, when first asked
        self._conn: Connection | None = Connection(config)
        self._conn.start()

    # ------------------------------------------------------------------ what the server said

    @property
    def batches_per_epoch(self) -> int:
        """Batches each epoch gives this rank."""
        return self._welcome.batches_per_epoch

    @property
    def rows(self) -> int:
        """Rows in the dataset."""
        return self._welcome.rows

    @property
    def fields(self) -> tuple[Field, ...]:
        """The fields batches carry: name, dtype and per-row shape.

        With a server-side transform that declares no schema, they are known once the first
        batch has arrived (``()`` before), and the shapes are that batch's: a transform may
        change them from batch to batch (e.g. padding to each batch's longest sequence).
        """
        return self._welcome.fields or self._live.seen_fields

    @property
    def classes(self) -> tuple[str, ...]:
        """The label's class names, as the server knows them (an image folder's sub-directory
        names, in label order), or ()."""
        return self._welcome.classes

    @property
    def dataset(self) -> str:
        return self._welcome.dataset

    @property
    def padded_rows(self) -> int:
        """Rows of an epoch read a second time (over all ranks) to pad it, so that with
        ``drop_last=False`` every rank gets as many rows; 0 when nothing needs padding."""
        return int(getattr(self._local_plan, "padded_rows", 0))

    @property
    def dropped_rows(self) -> int:
        """Rows of an epoch that no rank gets with ``drop_last=True`` (those that do not make
        a full batch for every rank); 0 when nothing is dropped."""
        return int(getattr(self._local_plan, "dropped_rows", 0))

    @property
    def _local_plan(self) -> BatchPlan:
        """The plan of these parameters over the server's rows (counting only: cheap)."""
        if self._plan is None:
            self._plan = BatchPlan(self.rows, self.params, units=self._welcome.units)
        return self._plan

    @property
    def prefetch(self) -> int:
        """Batches requested ahead of the trainer (as given, or as the server chose)."""
        return self._live.prefetch

    @property
    def _welcome(self):
        welcome = self._live.welcome
        assert welcome is not None
        return welcome

    @property
    def _forked(self) -> bool:
        """Whether this is a forked child's copy of a parent's client."""
        return self._conn is not None and self._conn.pid != os.getpid()

    @property
    def _live(self) -> Connection:
        if self._conn is None:
            raise InvalidArgument("this client is closed; make a new Client to read on")
        self._conn.check_process()
        return self._conn

    # ------------------------------------------------------------------ iteration

    def epoch(self, epoch: int, start_batch: int = 0, *, format: str = "numpy",
              pin_memory: bool = False, device: Any = None,
              zero_copy_readonly: bool = False) -> EpochIterator:
        """Iterate over batches ``start_batch ..`` of ``epoch``, in plan order.

        Batches are ``FieldBatch`` dicts (field name -> array).  ``format="torch"`` yields torch
        tensors (zero-copy via ``torch.from_numpy``; with ``pin_memory`` and ``device`` placed
        for you), ``format="jax"`` jax arrays.  See ``batchfeed.client.adapters`` for read-only
        fast-path batches.

        A client serves one iterator at a time.  If the iterator the last call returned has
        not been read to its end (nor closed), this call replaces it: that iterator stops
        asking for batches and raises IteratorSuperseded, naming what replaced it, at its next
        ``next()``; a thread already blocked in its ``next()`` gets that error at once.  The
        new iterator starts a fresh stream, so it yields exactly its epoch's batches.  Asking
        for ``epoch + 1`` after reading ``epoch`` to the end replaces nothing: it continues the
        stream, whose batches were prefetched meanwhile.
        """
        convert = converter(format, pin_memory=pin_memory, device=device,
                            zero_copy_readonly=zero_copy_readonly)
        check_position(epoch, start_batch)
        bpe = self.batches_per_epoch
        if start_batch > bpe:
            raise InvalidArgument(
                f"start_batch must be in [0, {bpe}] (an epoch has {bpe} batches), "
                f"got {start_batch!r}"
            )
        previous = self._last_iterator()
        replacing = previous is not None and previous.live
        if replacing:
            assert previous is not None
            previous._supersede(f"epoch {epoch} from batch {start_batch} replaced this iterator "
                                f"over epoch {previous.epoch}")
        self._progress.epoch, self._progress.next_batch = epoch, start_batch
        stream = self._live.stream_at(epoch, start_batch, bpe, fresh=replacing)
        iterator = EpochIterator(self._live, self._progress, stream, epoch, start_batch, convert)
        self._iterator = weakref.ref(iterator)
        return iterator

    def stream(self, start_epoch: int = 0, start_batch: int = 0, *, format: str = "numpy",
               pin_memory: bool = False, device: Any = None,
               zero_copy_readonly: bool = False) -> StreamIterator:
        """Every batch from batch ``start_batch`` of ``start_epoch`` on, epoch after epoch,
        without end: for loops that count steps, not epochs (nanoGPT's ``get_batch()``)::

            batches = client.stream()
            for step in range(max_steps):
                batch = next(batches)

        It yields what ``epoch(e)`` then ``epoch(e + 1)`` ... would (the next epoch's batches
        are prefetched across the boundary), takes ``epoch()``'s ``format`` and placement
        options, and tells where it is (``.epoch``, ``.next_batch``).  ``state_dict()`` covers
        it: after ``Client.from_state_dict(address, state)``,
        ``client.stream(state["epoch"], state["next_batch"])`` goes on with exactly the batch
        the checkpointed run would have taken next.  Like ``epoch()``, a newer ``epoch()`` or
        ``stream()`` call replaces it.
        """
        check_position(start_epoch, start_batch)
        options = {"format": format, "pin_memory": pin_memory, "device": device,
                   "zero_copy_readonly": zero_copy_readonly}
        converter(format, pin_memory=pin_memory, device=device,
                  zero_copy_readonly=zero_copy_readonly)  # bad options fail here, at once
        return StreamIterator(lambda e, k: self.epoch(e, k, **options), self._last_iterator,
                              self.batches_per_epoch, start_epoch, start_batch)

    def _last_iterator(self) -> EpochIterator | None:
        return self._iterator() if self._iterator is not None else None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """A small, JSON-serialisable checkpoint: the parameters, plus ``epoch`` (the epoch
        last iterated) and ``next_batch`` (the first batch not yet handed to the trainer),
        and what it was taken on (``dataset``, ``rows``, ``batches_per_epoch``, the data's
        ``fingerprint`` and the server's ``transform``).

        Save it with the model; ``Client.from_state_dict(address, state)`` and then
        ``client.epoch(state["epoch"], start_batch=state["next_batch"])`` continue with
        exactly the batches the uninterrupted run would have given.
        """
        epoch, next_batch = self._progress.at
        welcome = self._welcome
        return {**self.params.to_wire(), "dataset": self._dataset_name, "epoch": epoch,
                "next_batch": next_batch, "rows": self.rows,
                "batches_per_epoch": self.batches_per_epoch,
                "fingerprint": welcome.fingerprint.to_wire() if welcome.fingerprint else None,
                "transform": welcome.transform, "format": STATE_FORMAT}

    @classmethod
    def from_state_dict(cls, address: str | Sequence[str], state: dict[str, Any],
                        **kwargs: Any) -> Client:
        """A client with the parameters of ``state`` (connection options may be passed).

        Raises DataMismatch if the server's data is not what the checkpoint was taken on
        (another fingerprint or transform), InvalidRequest if its size differs: its batches
        would be other rows.  What a state from an older release did not record is not
        checked.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InvalidArgument(f"not a batchfeed client state (expected format "
                                  f"{STATE_FORMAT}); pass what Client.state_dict() returned")
        taken_on = TakenOn.of(state)
        known = {f.name for f in dataclasses.fields(PlanParams)}
        params = PlanParams.from_wire({k: v for k, v in state.items() if k in known},
                                      InvalidArgument)
        client = cls(address, **params.to_wire(), dataset=state.get("dataset"), **kwargs)
        try:
            client._check_taken_on(taken_on)
        except BaseException:
            client.close()
            raise
        return client

    def _check_taken_on(self, taken_on: TakenOn) -> None:
        """Refuse to resume on data other than the checkpoint's (see ``TakenOn.check``)."""
        taken_on.check(self._welcome, ", ".join(self._live.config.addresses))

    def servers(self) -> list[dict[str, Any]]:
        """Each server read: ``address``, ``up`` and ``in_place`` (from shared memory)."""
        return self._live.servers.describe()

    def stats(self) -> dict[str, float]:
        """Batches and bytes received, time spent waiting on data, and their rates."""
        return self._progress.stats.snapshot()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Say goodbye and stop the I/O thread.  Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else ", ".join(self._conn.config.addresses)
        return f"Client({state}, {self.params})"
