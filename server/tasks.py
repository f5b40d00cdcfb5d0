"""The server's internal channel between the main process and its workers.

Not the wire protocol (that is ``batchfeed.shared.protocol``): these messages only travel over
each worker's private socketpair.  Each is one msgpack map with a ``kind``:

- main -> worker: TASK (fill ``slot`` with batches ``k0 .. k0+count-1``), ORDER (compute an
  epoch's order into a shared segment ahead of time, when the worker is idle), STOP;
- worker -> main: READY, DONE (the layout it wrote: per field its dtype, region offset and
  size, per batch each field's shape), FAIL (a typed error for the client).  Both carry
  ``busy``, the seconds the task took, for the busy-fraction metric; ORDERED answers ORDER.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack

TASK = "task"
ORDER = "order"
ORDERED = "ordered"
STOP = "stop"
MAX_MESSAGE = 1 << 20  # a DONE for 1024 batches of 256 fields stays far below this
READY = "ready"
DONE = "done"
FAIL = "fail"


@dataclass(frozen=True)
class Task:
    """Gather local batches ``k0 .. k0+count-1`` of ``epoch`` of a plan into ``slot``."""

    id: int
    dataset: str
    params: dict
    epoch: int
    k0: int
    count: int
    slot: int
    order: str | None = None  # the shared segment holding the epoch's order, if any
    fill: bool = False  # compute the order into that segment first


def pack(kind: str, **body: object) -> bytes:
    body["kind"] = kind
    return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def task_message(task: Task) -> bytes:
    return pack(TASK, **asdict(task))


def task_from(body: dict) -> Task:
    return Task(**{k: v for k, v in body.items() if k != "kind"})
