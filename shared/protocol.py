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
Kinds, server -> client: WELCOME, GRANT, BATCH, PONG, ERROR, REPORT.

Sessions: WELCOME gives the session's id and a ``secret``.  The id names the session in every
later message, which the server honours only from the connection that said HELLO; the secret
(never shown to anyone else) proves, in a later HELLO's ``resume_secret``, that a reconnecting
client is the one that held the session.  WELCOME also names the data: its ``fingerprint``
(``batchfeed.shared.fingerprint``) and the server-side ``transform``, which a client checks
against every other server of its job.

The fast path: a HELLO asking for it gets a WELCOME naming the server's ring and a random
``challenge``.  A client on the same host maps the ring, reads the key the server wrote in the
ring's first page (only a process that can read this server's shared memory can), and answers
CLAIM with ``proof`` = HMAC-SHA256(key, challenge).  Only then does the server make the
session's lease table and name it in GRANT; the client opens the table and holds a lock on it
for as long as it may hold views, and from then on may be sent slots (a BATCH naming a slot and
offsets) instead of data frames.  It gives a slot back by clearing the slot's byte in the
table; RELEASE only asks the server to look.  The server answers BYE with PONG: after it,
nothing of the session follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from .batches import MAX_CONTAINER_LEN, MAX_INT
from .errors import ProtocolError, VersionMismatch
from .schema import MAX_FIELDS

VERSION = 3

HELLO = "hello"
WELCOME = "welcome"
CLAIM = "claim"
GRANT = "grant"
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
MAX_STR_LEN = 4096

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
        "fingerprint": _OPT_MAP,  # the data's identity (shared/fingerprint.py)
        "transform": _OPT_STR,  # the server-side transform every batch goes through
        "ring": _OPT_MAP,  # fast path offered: the ring to map ...
        "challenge": _OPT_STR,  # ... and what a CLAIM must prove it can sign with its key
    },
    CLAIM: {"session": _INT, "proof": _STR},
    GRANT: {"session": _INT, "table": _STR},  # the lease table of a proved CLAIM
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
    PING: {"session": _OPT_INT, "at": _OPT_LIST},  # at: [epoch, batch] the trainer is at
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
    if type(kind) is not str or kind not in KINDS:
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
            fingerprint: dict | None = None, transform: str | None = None,
            ring: dict | None = None, challenge: str | None = None) -> list:
    return encode(WELCOME, session=session, secret=secret, dataset=dataset, rows=rows,
                  batches_per_epoch=batches_per_epoch, prefetch=prefetch, fields=fields,
                  server=server, units=units, shard=shard, classes=classes,
                  fingerprint=fingerprint, transform=transform, ring=ring, challenge=challenge)


def claim(*, session: int, proof: str) -> list:
    return encode(CLAIM, session=session, proof=proof)


def grant(*, session: int, table: str) -> list:
    return encode(GRANT, session=session, table=table)


def request(*, session: int, stream: int, epoch: int, k0: int, count: int,
            at: list | None = None) -> list:
    return encode(REQUEST, session=session, stream=stream, epoch=epoch, k0=k0, count=count,
                  at=at)


def release(*, session: int) -> list:
    return encode(RELEASE, session=session)


def ping(session: int | None, at: list | None = None) -> list:
    return encode(PING, session=session, at=at)


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


def batch(*, session: int, stream: int, epoch: int, k0: int, dtypes: list, shapes: list,
          buffers: Sequence = (), slot: int | None = None, offsets: list | None = None) -> list:
    """A BATCH message: inline ``buffers`` (one per field) or a ring ``slot`` with ``offsets``."""
    return encode(BATCH, buffers, session=session, stream=stream, epoch=epoch, k0=k0,
                  dtypes=dtypes, shapes=shapes, slot=slot, offsets=offsets)


# The BATCH body's layout lives in batches.py; it is part of this wire format.
from .batches import (  # noqa: E402
    POSITIONS,
    ROLE_OFFSETS,
    ROLE_POSITIONS,
    ROLE_VALUES,
    ChunkLayout,
    FieldBatch,
    check_int_list,
    chunk_layout,
    field_views,
)

__all__ = ["BATCH", "BYE", "CLAIM", "ERROR", "GRANT", "HELLO", "KINDS", "PING", "PONG",
           "POSITIONS", "RELEASE", "REPORT", "REQUEST", "ROLE_OFFSETS", "ROLE_POSITIONS",
           "ROLE_VALUES", "STATS", "VERSION", "WELCOME", "ChunkLayout", "FieldBatch", "Message",
           "batch", "bye", "check_int_list", "chunk_layout", "claim", "decode", "encode",
           "error", "field_views", "grant", "hello", "ping", "pong", "release", "report",
           "request", "stats", "welcome"]
