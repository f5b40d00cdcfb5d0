"""The batchfeed wire format, and the only module that knows it.

A message is a ZeroMQ multipart message.  Frame 0 is a msgpack map, the header, with at least
``v`` (the protocol version) and ``kind``.  A BATCH message carries one or more consecutive
batches of a session's plan: the header lists each field's dtype and, per batch, each field's
shape; then comes one raw frame per field holding that field's bytes for all the batches, back
to back.  On the same-host fast path the header names a slot of the server's shared ring and the
byte offset of each field in it instead, and no data frames follow.

Nothing here ever unpickles.  ``decode`` checks sizes before it parses, parses with msgpack's
explicit limits, and validates every header field's type; anything else raises ProtocolError.
Optional keys a peer left out are filled in with their defaults, so that a handler never meets
a missing key.  The ERROR kind and the ``v``/``kind`` keys are frozen across versions so that a
peer of another version still gets a readable error naming both versions.

Kinds, client -> server: HELLO, CLAIM, REQUEST, RELEASE, PING, BYE, STATS.
Kinds, server -> client: WELCOME, BATCH, PONG, ERROR, REPORT.

Sessions: WELCOME gives the session's id and a ``secret``.  The id names the session in every
later message, which the server honours only from the connection that said HELLO; the secret
(never shown to anyone else) proves, in a later HELLO's ``resume_secret``, that a reconnecting
client is the one that held the session.  The fast path: a HELLO asking for it gets a WELCOME
naming the server's ring and a lease table, a small shared segment holding a nonce; a client
on the same host reads the nonce and sends it back in CLAIM, and from then on may be sent
slots (a BATCH naming a slot and offsets) instead of data frames.  It gives a slot back by
clearing the slot's byte in the table; RELEASE only asks the server to look.  The server
answers BYE with PONG: after it, nothing of the session follows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError, VersionMismatch
from .schema import MAX_FIELDS, MAX_NAME_LEN, check_dtype, check_shape

VERSION = 2

HELLO = "hello"
WELCOME = "welcome"
CLAIM = "claim"
REQUEST = "request"
BATCH = "batch"
RELEASE = "release"
PING = "ping"
PONG = "pong"
BYE = "bye"
ERROR = "error"
STATS = "stats"
REPORT = "report"

# Limits, checked before and while parsing.
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 1 + MAX_FIELDS
MAX_BATCHES_PER_MESSAGE = 1024
MAX_STR_LEN = 4096
MAX_CONTAINER_LEN = 4096
MAX_INT = 2**63 - 1
MAX_RELEASE = 1024

_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,
    use_list=True,
    max_str_len=MAX_STR_LEN,
    max_bin_len=MAX_STR_LEN,
    max_array_len=MAX_CONTAINER_LEN,
    max_map_len=64,
    max_ext_len=0,
)

_INT = "int"
_STR = "str"
_BOOL = "bool"
_MAP = "map"
_LIST = "list"
_OPT_INT = "int?"
_OPT_STR = "str?"
_OPT_MAP = "map?"
_OPT_LIST = "list?"

# kind -> {key: type}; keys ending in "?" types may be missing or None.
_HEADERS: dict[str, dict[str, str]] = {
    HELLO: {
        "client": _STR,
        "params": _MAP,
        "dataset": _OPT_STR,
        "prefetch": _INT,
        "fastpath": _BOOL,
        "name": _OPT_STR,
        "resume": _OPT_INT,  # the session this client had before reconnecting ...
        "resume_secret": _OPT_STR,  # ... and the secret its WELCOME gave
    },
    WELCOME: {
        "session": _INT,
        "secret": _STR,
        "dataset": _STR,
        "rows": _INT,
        "batches_per_epoch": _INT,
        "prefetch": _INT,
        "fields": _LIST,
        "server": _STR,
        "units": _OPT_INT,  # packed rows or token-budget batches per epoch, for such plans
        "shard": _OPT_LIST,  # [I, N]: the server holds shard I of N (pieces of batches)
        "classes": _OPT_LIST,  # the label's class names (an image folder's classes)
        "ring": _OPT_MAP,  # fast path offered: the ring to map ...
        "claim": _OPT_STR,  # ... and the lease table whose nonce a CLAIM must send back
    },
    CLAIM: {"session": _INT, "nonce": _STR},
    REQUEST: {
        "session": _INT,
        "stream": _INT,
        "epoch": _INT,
        "k0": _INT,
        "count": _INT,
        "at": _OPT_LIST,  # [epoch, batch]: where the trainer is (for stats)
    },
    BATCH: {
        "session": _INT,
        "stream": _INT,
        "epoch": _INT,
        "k0": _INT,
        "dtypes": _LIST,
        "shapes": _LIST,
        "slot": _OPT_INT,
        "offsets": _OPT_LIST,
    },
    RELEASE: {"session": _INT},  # look at the lease table: slots were given back
    PING: {"session": _OPT_INT},
    PONG: {"session": _OPT_INT},  # the session whose BYE it answers, if it does
    BYE: {"session": _INT},
    STATS: {},
    REPORT: {"server": _MAP, "sessions": _LIST},
    ERROR: {
        "code": _STR,
        "message": _STR,
        "session": _OPT_INT,
        "stream": _OPT_INT,
        "epoch": _OPT_INT,
        "k0": _OPT_INT,
    },
}

KINDS = frozenset(_HEADERS)


@dataclass
class Message:
    """A decoded message: its kind, its validated header, and the raw frames after it."""

    kind: str
    header: dict[str, Any]
    buffers: list


def _check_value(kind: str, key: str, want: str, value: object) -> None:
    optional = want.endswith("?")
    if optional and value is None:
        return
    base = want.rstrip("?")
    if base == _INT:
        ok = type(value) is int and -MAX_INT <= value <= MAX_INT
    elif base == _STR:
        ok = isinstance(value, str)
    elif base == _BOOL:
        ok = type(value) is bool
    elif base == _MAP:
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, list)
    if not ok:
        raise ProtocolError(f"{kind} header field {key!r} must be {want}, got {value!r:.80}")


def encode(kind: str, buffers: Sequence = (), **header: Any) -> list:
    """Frames of a message: the msgpack header, then the given raw buffers as they are."""
    header["v"] = VERSION
    header["kind"] = kind
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def decode(frames: Sequence) -> Message:
    """Parse and validate a received multipart message, or raise ProtocolError.

    ``frames`` may be bytes or zmq.Frame objects; data frames are returned untouched.
    """
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"message has {len(frames)} frames; at most {MAX_FRAMES} are allowed")
    head = frames[0]
    raw = head if isinstance(head, bytes) else head.bytes
    if not raw:
        raise ProtocolError("empty header frame: expected a msgpack map")
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"header is {len(raw)} bytes; at most {MAX_HEADER_BYTES} are allowed"
        )
    try:
        header = msgpack.unpackb(raw, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    version, kind = header.get("v"), header.get("kind")
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r:.40}; known: {sorted(KINDS)}")
    if version != VERSION and kind != ERROR:
        raise VersionMismatch(
            f"peer speaks batchfeed protocol {version!r:.20}, this side speaks protocol {VERSION}; "
            "install the same batchfeed release on server and client"
        )
    schema = _HEADERS[kind]
    for key in header:
        if key not in schema and key not in ("v", "kind"):
            raise ProtocolError(f"{kind} header has unknown field {key!r:.40}")
    for key, want in schema.items():
        if key not in header:
            if not want.endswith("?"):
                raise ProtocolError(f"{kind} header is missing field {key!r}")
            header[key] = None
        _check_value(kind, key, want, header[key])
    if kind != BATCH and len(frames) > 1:
        raise ProtocolError(f"{kind} message must be a single frame, got {len(frames)}")
    return Message(kind, header, list(frames[1:]))


# ---------------------------------------------------------------------------------------------
# Constructors for each kind (the only way the rest of the code builds messages).


def hello(params: dict, *, client: str, dataset: str | None, prefetch: int, fastpath: bool,
          name: str | None = None, resume: int | None = None,
          resume_secret: str | None = None) -> list:
    return encode(HELLO, client=client, params=params, dataset=dataset, prefetch=prefetch,
                  fastpath=fastpath, name=name, resume=resume, resume_secret=resume_secret)


def welcome(*, session: int, secret: str, dataset: str, rows: int, batches_per_epoch: int,
            prefetch: int, fields: list, server: str, units: int | None = None,
            shard: list | None = None, classes: list | None = None,
            ring: dict | None = None, claim: str | None = None) -> list:
    return encode(WELCOME, session=session, secret=secret, dataset=dataset, rows=rows,
                  batches_per_epoch=batches_per_epoch, prefetch=prefetch, fields=fields,
                  server=server, units=units, shard=shard, classes=classes, ring=ring,
                  claim=claim)


def claim(*, session: int, nonce: str) -> list:
    return encode(CLAIM, session=session, nonce=nonce)


def request(*, session: int, stream: int, epoch: int, k0: int, count: int,
            at: list | None = None) -> list:
    return encode(REQUEST, session=session, stream=stream, epoch=epoch, k0=k0, count=count,
                  at=at)


def release(*, session: int) -> list:
    return encode(RELEASE, session=session)


def ping(session: int | None) -> list:
    return encode(PING, session=session)


def pong(session: int | None = None) -> list:
    return encode(PONG, session=session)


def bye(session: int) -> list:
    return encode(BYE, session=session)


def error(code: str, message: str, **where: Any) -> list:
    """An ERROR; ``where`` may name the session, stream, epoch and k0 it is about."""
    return encode(ERROR, code=code, message=message, **where)


def stats() -> list:
    return encode(STATS)


def report(server: dict, sessions: list) -> list:
    """The server's state for ``batchfeed stats``: plain numbers and strings only."""
    return encode(REPORT, server=server, sessions=sessions)


# ---------------------------------------------------------------------------------------------
# Batches.


@dataclass(frozen=True)
class ChunkLayout:
    """Where each batch of a BATCH message lives: output dtypes (and roles), and per batch each
    output's shape.

    Output ``f``'s bytes for batch ``b`` start at ``starts[f][b]`` inside that output's buffer
    (its data frame, or its region of a ring slot) and take ``nbytes[f][b]`` bytes.  An output
    with a role ``values`` or ``offsets`` (of a ragged field) is not one row per batch row: its
    first dimension is the batch's elements, or its rows + 1.  A shard server adds the output
    ``_positions`` (role ``positions``): where each of its rows goes in the whole batch.
    """

    names: tuple[str, ...]
    dtypes: tuple[np.dtype, ...]
    shapes: tuple[tuple[tuple[int, ...], ...], ...]  # [batch][field]
    starts: tuple[tuple[int, ...], ...]  # [field][batch]
    nbytes: tuple[tuple[int, ...], ...]  # [field][batch]
    roles: tuple[str | None, ...] = ()

    @property
    def count(self) -> int:
        return len(self.shapes)

    def field_nbytes(self, f: int) -> int:
        return sum(self.nbytes[f])

    def rows(self, b: int) -> int:
        for f, role in enumerate(self.roles or (None,) * len(self.names)):
            if role is None:
                return self.shapes[b][f][0]
            if role == ROLE_OFFSETS:
                return self.shapes[b][f][0] - 1
        return 0


ROLE_VALUES = "values"
ROLE_OFFSETS = "offsets"
ROLE_POSITIONS = "positions"  # a shard's rows: where each goes in the whole batch
_ROLES = (ROLE_VALUES, ROLE_OFFSETS, ROLE_POSITIONS)
POSITIONS = "_positions"  # the name of a shard's positions output


def batch(*, session: int, stream: int, epoch: int, k0: int, dtypes: list, shapes: list,
          buffers: Sequence = (), slot: int | None = None, offsets: list | None = None) -> list:
    """A BATCH message: inline ``buffers`` (one per field) or a ring ``slot`` with ``offsets``."""
    return encode(BATCH, buffers, session=session, stream=stream, epoch=epoch, k0=k0,
                  dtypes=dtypes, shapes=shapes, slot=slot, offsets=offsets)


def chunk_layout(header: dict) -> ChunkLayout:
    """Validate a BATCH header's dtypes and shapes and work out each batch's byte range."""
    dtypes_in, shapes_in = header["dtypes"], header["shapes"]
    if not 0 < len(dtypes_in) <= MAX_FIELDS:
        raise ProtocolError(f"a batch must have 1 to {MAX_FIELDS} fields")
    if not 0 < len(shapes_in) <= MAX_BATCHES_PER_MESSAGE:
        raise ProtocolError(f"a message must carry 1 to {MAX_BATCHES_PER_MESSAGE} batches")
    names, dtypes, roles = [], [], []
    for item in dtypes_in:
        if not (isinstance(item, list) and len(item) in (2, 3) and isinstance(item[0], str)
                and 0 < len(item[0]) <= MAX_NAME_LEN
                and (len(item) == 2 or item[2] in _ROLES)):
            raise ProtocolError(f"a batch field must be [name, dtype(, role)], got {item!r:.80}")
        names.append(item[0])
        dtypes.append(check_dtype(item[1]))
        roles.append(item[2] if len(item) == 3 else None)
    n_fields = len(names)
    itemsizes = [d.itemsize for d in dtypes]
    counts: dict[tuple, int] = {}  # each distinct shape is checked once (most batches share one)
    shapes = []
    starts = [[0] * len(shapes_in) for _ in range(n_fields)]
    nbytes = [[0] * len(shapes_in) for _ in range(n_fields)]
    for b, per_field in enumerate(shapes_in):
        if not isinstance(per_field, list) or len(per_field) != n_fields:
            raise ProtocolError(f"batch {b} must give one shape per field ({n_fields})")
        batch_shapes: list[tuple[int, ...]] = []
        rows = None
        for f, raw_shape in enumerate(per_field):
            cached = tuple(raw_shape) if isinstance(raw_shape, list) else None
            count = counts.get(cached) if cached is not None else None
            if count is None or cached is None:
                shape = check_shape(raw_shape)
                if not shape:
                    raise ProtocolError(f"field {names[f]!r} of batch {b} has no batch dimension")
                count = counts[shape] = math.prod(shape)
            else:
                shape = cached
            n_rows = shape[0] - 1 if roles[f] == ROLE_OFFSETS else \
                None if roles[f] == ROLE_VALUES else shape[0]
            if n_rows is not None:
                if rows is None:
                    rows = n_rows
                elif n_rows != rows:
                    raise ProtocolError(f"fields of batch {b} disagree on the number of rows")
            size = count * itemsizes[f]
            if size > MAX_INT:
                raise ProtocolError(f"field {names[f]!r} of batch {b} is absurdly large")
            nbytes[f][b] = size
            if b:
                starts[f][b] = starts[f][b - 1] + nbytes[f][b - 1]
            batch_shapes.append(shape)
        shapes.append(tuple(batch_shapes))
    return ChunkLayout(tuple(names), tuple(dtypes), tuple(shapes),
                       tuple(map(tuple, starts)), tuple(map(tuple, nbytes)), tuple(roles))


class FieldBatch(dict):
    """A batch as the trainer gets it: field name -> array.  A plain dict but for the error a
    wrong field name raises, which says what the batch has (``__missing__`` runs only then,
    so a lookup costs what a dict's does)."""

    __slots__ = ()

    def __missing__(self, key: object) -> Any:
        raise KeyError(f"no field {key!r} in this batch; it has: {', '.join(map(str, self))}")


def field_views(layout: ChunkLayout, field_buffers: Sequence) -> list[FieldBatch]:
    """Split one buffer per field into per-batch dicts (``FieldBatch``) of zero-copy numpy views.

    Each view's ``base`` chain ends at the buffer object (a zmq.Frame or a slot array), which
    therefore stays alive as long as any view does.
    """
    if len(field_buffers) != len(layout.names):
        raise ProtocolError(
            f"batch has {len(field_buffers)} data frames for {len(layout.names)} fields"
        )
    flat = []
    for f, buf in enumerate(field_buffers):
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        if arr.nbytes != layout.field_nbytes(f):
            raise ProtocolError(
                f"field {layout.names[f]!r} frame has {arr.nbytes} bytes but its dtype "
                f"{layout.dtypes[f]} and shapes need {layout.field_nbytes(f)}"
            )
        flat.append(arr)
    batches = []
    for b, shapes in enumerate(layout.shapes):
        batches.append(FieldBatch(
            (name, flat[f][layout.starts[f][b] : layout.starts[f][b] + layout.nbytes[f][b]]
             .view(layout.dtypes[f])
             .reshape(shapes[f]))
            for f, name in enumerate(layout.names)
        ))
    return batches


def check_int_list(values: object, what: str, *, low: int = 0, high: int = MAX_INT,
                   max_len: int = MAX_CONTAINER_LEN) -> list[int]:
    """Validate a list of ints from a header (slot numbers, offsets)."""
    if not isinstance(values, list) or len(values) > max_len:
        raise ProtocolError(f"{what} must be a list of at most {max_len} ints")
    for v in values:
        if type(v) is not int or not low <= v <= high:
            raise ProtocolError(f"{what} has a bad entry {v!r:.40}")
    return values
