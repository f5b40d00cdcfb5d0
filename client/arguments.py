"""Client arguments: the one conversion of ``Client``'s keywords into a plan (``plan_params``),
and the checks of its addresses and positions, shared by ``Client`` and ``BatchfeedDataset``
so that both accept exactly the same arguments and refuse the same ones, in the caller
(``InvalidArgument``, a ValueError; ``InvalidArgumentType``, a TypeError)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

from batchfeed.shared.errors import InvalidArgument, InvalidArgumentType
from batchfeed.shared.plan import PlanParams

from .membership import ServerSet, checked_addresses


def plan_params(batch_size: int | None = None, shuffle: str | bool = "full", seed: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1, *,
                buffer_size: int = 0, sampling: str = "uniform", label: str | None = None,
                weights: str | None = None, epoch_rows: int | None = None, ragged: str = "pad",
                pad_value: float = 0, max_length: int | None = None,
                pack: Mapping[str, int] | Sequence[str] | None = None, pack_length: int = 0,
                max_tokens: int | None = None, token_field: str | None = None) -> PlanParams:
    """``Client``'s plan keywords (see ``Client``) as ``PlanParams``: the one conversion that
    ``Client`` and ``BatchfeedDataset`` share, so both accept exactly the same arguments.

    Users' forms become the plan's: ``pack={"tokens": 2048}`` becomes ``pack=("tokens",)``
    with ``pack_length=2048`` (the form a state holds, also accepted), and ``batch_size``
    unset (or None) with ``max_tokens=`` becomes the plan's ``batch_size=1`` (each batch is
    one token budget).  InvalidArgument (InvalidArgumentType: wrong type) otherwise.
    """
    if isinstance(pack, str):
        raise InvalidArgumentType(f"pack= maps the ragged fields to pack to the row length, "
                                  f"e.g. pack={{{pack!r}: 2048}}; got pack={pack!r}")
    if isinstance(pack, Mapping):
        pack, length = _pack_lengths(pack)
        if pack_length and pack_length != length:
            raise InvalidArgument(f"pack= gives rows of {length!r} tokens but pack_length="
                                  f"{pack_length!r}; leave pack_length out")
        pack_length = length
    elif pack is not None:
        if not isinstance(pack, Sequence):
            raise InvalidArgumentType(f"pack= maps the ragged fields to pack to the row "
                                      f"length, e.g. pack={{'tokens': 2048}}; got {pack!r:.80}")
        pack = tuple(pack)
    if batch_size is None:
        if max_tokens is None:
            raise InvalidArgument("batch_size= is needed (or max_tokens= for batches of a "
                                  "token budget, with batch_size left unset)")
        batch_size = 1
    return PlanParams(batch_size=batch_size, shuffle=shuffle, seed=seed,
                      buffer_size=buffer_size, drop_last=drop_last, rank=rank,
                      world_size=world_size, sampling=sampling, label=label, weights=weights,
                      epoch_rows=epoch_rows, ragged=ragged, pad_value=pad_value,
                      max_length=max_length, pack=pack, pack_length=pack_length,
                      max_tokens=max_tokens, token_field=token_field)


PLAN_KEYWORDS = tuple(inspect.signature(plan_params).parameters)  # the plan's part of Client's


def check_addresses(address: object) -> tuple[tuple[str, ...], ServerSet | None]:
    """The servers a client is given: one address, a list of distinct ones (each
    tcp://HOST:PORT or ipc://PATH), or a server set (with its addresses now)."""
    if isinstance(address, ServerSet):
        return checked_addresses(address.addresses(), "a server set's addresses"), address
    return checked_addresses(address), None


def check_position(epoch: object, start_batch: object, what: str = "epoch") -> None:
    """``epoch`` and ``start_batch`` are ints >= 0 (InvalidArgument, or InvalidArgumentType)."""
    for name, value in ((what, epoch), ("start_batch", start_batch)):
        if type(value) is not int:
            raise InvalidArgumentType(f"{name} must be an int >= 0, got {value!r}")
        if value < 0:
            raise InvalidArgument(f"{name} must be an int >= 0, got {value!r}")


def _pack_lengths(pack: Mapping[str, int]) -> tuple[tuple[str, ...], int]:
    """``pack={"tokens": 2048, "mask": 2048}`` as (fields, row length)."""
    lengths = set(pack.values())
    if len(lengths) != 1:
        raise InvalidArgument(f"pack= packs aligned fields into rows of one length, e.g. "
                              f"pack={{'tokens': 2048, 'mask': 2048}}; got {dict(pack)!r}")
    return tuple(pack), lengths.pop()
