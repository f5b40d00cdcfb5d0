"""Variable-length fields as the trainer gets them.

Workers send a ragged field padded (``f`` as ``(rows, longest)`` plus ``f_lengths``) or flat
(``f`` values plus ``f_offsets``, rows + 1 from 0); ``str`` and ``bytes`` fields always come
flat.  Here, in the client's I/O thread (off the trainer's thread), ``str`` fields become a list
of ``str`` per batch, and ``bytes`` fields a list of ``bytes`` unless ``ragged="flat"`` asked
for the arrays.  Nothing else is touched: padded and flat arrays stay zero-copy views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from batchfeed.shared.schema import BYTES, STR, Field


class RaggedDecoder:
    """Decodes the ``str`` (and, unless ``flat``, ``bytes``) fields of a schema."""

    def __init__(self, fields: Sequence[Field], flat: bool):
        self.names = [(f.name, f.kind == STR) for f in fields
                      if f.kind == STR or (f.kind == BYTES and not flat)]

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, batch: dict) -> dict:
        for name, text in self.names:
            values = batch.get(name)
            offsets = batch.pop(f"{name}_offsets", None)
            if values is None or offsets is None:
                continue
            batch[name] = split(values, offsets, text)
        return batch


def split(values: np.ndarray, offsets: np.ndarray, text: bool) -> list:
    """Rows of a flat byte field, as ``str`` (UTF-8) or ``bytes``."""
    data = values.tobytes()
    bounds = offsets.tolist()
    if text:
        return [data[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]
