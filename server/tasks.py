"""The server's internal channel between the main process and its workers.

Not the wire protocol (that is ``batchfeed.shared.protocol``): these messages only travel over
each worker's private socketpair.  Each is one msgpack map with a ``kind``, built from and read
back into one of the dataclasses below, so neither side ever indexes a raw dict:

- main -> worker: ``Task`` (fill ``slot`` with batches ``k0 .. k0+count-1``), ``OrderJob``
  (compute an epoch's order into a shared segment ahead of time, when the worker is idle),
  STOP;
- worker -> main: READY, ``Done`` (the layout it wrote: per field its dtype, region offset and
  size, per batch each field's shape), ``Failed`` (a typed error for the client), ``Ordered``
  (answers ``OrderJob``), ``Broken`` (it cannot start, and why; it exits next).  ``Done`` and
  ``Failed`` carry ``busy``, the seconds the task took.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import msgpack

TASK = "task"
ORDER = "order"
ORDERED = "ordered"
STOP = "stop"
READY = "ready"
BROKEN = "broken"
DONE = "done"
FAIL = "fail"
MAX_MESSAGE = 1 << 20  # a DONE for 1024 batches of 256 fields stays far below this


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


@dataclass(frozen=True)
class OrderJob:
    """Compute the order of ``epoch`` for a plan into the shared segment ``order``."""

    id: int
    dataset: str
    params: dict
    epoch: int
    order: str


@dataclass(frozen=True)
class Done:
    """A task's batches are in its slot: where each field lies and each batch's shapes."""

    id: int
    dtypes: list  # [[field name, dtype str], ...]
    shapes: list  # per batch, per field: the shape (fewer batches than asked: the slot was full)
    offsets: list  # per field: its region's offset in the slot
    nbytes: list  # per field: its region's size
    busy: float = 0.0


@dataclass(frozen=True)
class Failed:
    """A task failed: a typed error (``code``, ``message``) for the client."""

    id: int
    code: str
    message: str
    busy: float = 0.0


@dataclass(frozen=True)
class Ordered:
    id: int
    ok: bool


@dataclass(frozen=True)
class Ready:
    pid: int
    index: int


@dataclass(frozen=True)
class Broken:
    """The worker cannot start (``reason``, one line); it exits next."""

    reason: str


_KINDS: dict[str, type] = {TASK: Task, ORDER: OrderJob, DONE: Done, FAIL: Failed,
                           ORDERED: Ordered, READY: Ready, BROKEN: Broken}
_NAMES = {cls: kind for kind, cls in _KINDS.items()}
# Field names per class, read once: pack and unpack run per task, and dataclasses.asdict (which
# deep-copies every nested list, such as a DONE's per-batch shapes) cost 13% of a worker's time.
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _NAMES}
Message = Task | OrderJob | Done | Failed | Ordered | Ready | Broken | str


def pack(message: Any) -> bytes:
    """One message: a dataclass above, or the bare kind STOP."""
    if isinstance(message, str):
        body: dict[str, Any] = {}
        kind = message
    else:
        cls = type(message)
        body = {name: getattr(message, name) for name in _FIELDS[cls]}
        kind = _NAMES[cls]
    body["kind"] = kind
    return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes) -> Message:
    body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    kind = body.pop("kind")
    cls = _KINDS.get(kind)
    if cls is None:
        return str(kind)
    names = _FIELDS[cls]
    return cls(**{k: v for k, v in body.items() if k in names})
