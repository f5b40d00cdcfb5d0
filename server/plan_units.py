"""What packed and token-budget plans count, from the data: the front end (to answer HELLO with
``batches_per_epoch``) and every worker (to build the same plan) count the same way.

- ``pack``: the units are packed rows, ceil(total tokens / ``pack_length``); the packed fields
  must be aligned (the same lengths per document, e.g. tokens and a loss mask);
- ``max_tokens``: the units are the token-budget batches, a fixed number K per epoch (see
  ``packing.batch_bounds``), counted over the lengths of ``token_field`` (by default the
  dataset's only ragged field of numbers) clipped to ``max_length``.

``budget_bounds`` keeps the last few batch bounds per process: computing them sorts the
documents' lengths, which is worth doing once per dataset, not once per plan.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from batchfeed.shared.errors import InvalidRequest
from batchfeed.shared.params import PlanParams
from batchfeed.shared.schema import RAGGED, Field, Ragged

from .packing import batch_bounds, clip_lengths

_BOUNDS_KEEP = 4
_bounds: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()


def _ragged(columns: Mapping[str, object], name: str, why: str) -> Ragged:
    column = columns.get(name)
    if column is None:
        raise InvalidRequest(f"{why} names field {name!r}, which the dataset does not have "
                             f"(it has {', '.join(columns)})")
    if not isinstance(column, Ragged):
        raise InvalidRequest(f"{why} needs a ragged field (variable-length rows), and "
                             f"{name!r} is not one")
    return column


def packed_fields(params: PlanParams, columns: Mapping[str, object]) -> list[Ragged]:
    """The fields ``pack`` names, checked to be ragged and aligned."""
    assert params.pack is not None
    fields = [_ragged(columns, name, "pack=") for name in params.pack]
    first = fields[0].offsets
    for name, f in zip(params.pack[1:], fields[1:]):
        if f.offsets is not first and not np.array_equal(np.diff(f.offsets), np.diff(first)):
            raise InvalidRequest(f"pack= packs fields together only when they are aligned (the "
                                 f"same length for every document); {name!r} is not aligned "
                                 f"with {params.pack[0]!r}")
    return fields


def token_field(params: PlanParams, fields: Sequence[Field]) -> str:
    if params.token_field is not None:
        return params.token_field
    ragged = [f.name for f in fields if f.kind == RAGGED]
    if len(ragged) != 1:
        raise InvalidRequest(f"max_tokens= counts the tokens of one ragged field; the dataset "
                             f"has {len(ragged) or 'no'} ragged fields ({', '.join(ragged)}): "
                             "name one with token_field=")
    return ragged[0]


def budget_bounds(params: PlanParams, columns: Mapping[str, object], data_key: str,
                  fields: Sequence[Field]) -> tuple[np.ndarray, np.ndarray]:
    """(clipped lengths, batch bounds) of a token-budget plan, cached per process."""
    assert params.max_tokens is not None
    name = token_field(params, fields)
    key = (data_key, name, params.max_tokens, params.max_length)
    hit = _bounds.get(key)
    if hit is None:
        offsets = _ragged(columns, name, "max_tokens=").offsets
        lengths = clip_lengths(np.diff(offsets), params.max_tokens, params.max_length)
        hit = _bounds[key] = (lengths, batch_bounds(np.sort(lengths), params.max_tokens))
        while len(_bounds) > _BOUNDS_KEEP:
            _bounds.popitem(last=False)
    _bounds.move_to_end(key)
    return hit


def plan_units(params: PlanParams, columns: Mapping[str, object], data_key: str,
               fields: Sequence[Field]) -> int | None:
    """The epoch's units of a packed or token-budget plan (None for a plan of rows)."""
    if params.pack is not None:
        offsets = packed_fields(params, columns)[0].offsets
        total = int(offsets[-1] - offsets[0])
        return -(-total // params.pack_length)
    if params.max_tokens is not None:
        return len(budget_bounds(params, columns, data_key, fields)[1]) - 1
    return None
