"""Typed errors shared by server and client.

Every error carries a stable wire ``code``.  The server sends ``(code, message)`` in an ERROR
message; the client turns it back into the same class with :func:`error_from_code` and raises it
in the trainer's thread.  Messages say what was wrong and what to do about it.

Two families say who refused: ``InvalidArgument`` (a ``ValueError``; ``InvalidArgumentType``, of
the wrong type, is also a ``TypeError``) is a call's argument refused where the call was made,
before any server was asked (``Client(batch_size=0)``, ``client.epoch(-1)``); ``InvalidRequest``
is a request the server refused against its data and limits (an unknown dataset or field, a
batch bigger than its slots).  Both are ``ValueError``s, so ``except ValueError`` catches either.
"""

from __future__ import annotations


class BatchfeedError(Exception):
    """Base class of every error batchfeed raises on purpose."""

    code = "error"


class ProtocolError(BatchfeedError):
    """A message that does not follow the wire format (garbage, bad sizes, wrong kinds)."""

    code = "protocol"


class VersionMismatch(ProtocolError):
    """The two sides speak different protocol versions."""

    code = "version"


class InvalidRequest(BatchfeedError, ValueError):
    """A request the server refused: parameters that cannot make a batch plan on its data
    (an unknown dataset or field, a batch bigger than its slots, an epoch order over its
    budget, ...)."""

    code = "invalid_request"


class InvalidArgument(BatchfeedError, ValueError):
    """An argument refused where the call was made, before any server was asked: a bad value
    (``batch_size=0``, ``rank >= world_size``), arguments that do not go together, or a call
    on a closed client."""

    code = "invalid_argument"


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of the wrong type (``batch_size="256"``), or an unknown keyword."""

    code = "invalid_argument_type"


class DatasetError(BatchfeedError):
    """A dataset that cannot be served (wrong path, bad dtype, fields of different lengths)."""

    code = "dataset"


class ServerUnavailable(BatchfeedError, ConnectionError):
    """The server could not be reached, or stayed away longer than the client's timeout."""

    code = "unavailable"


class UnknownSession(BatchfeedError):
    """The server does not know the session (it restarted, or the session expired)."""

    code = "unknown_session"


class WorkerError(BatchfeedError):
    """A worker failed to produce a batch (for example a server-side transform raised)."""

    code = "worker"


class CreditExceeded(BatchfeedError):
    """A client asked for more batches ahead than its declared prefetch allows."""

    code = "credit"


class ResourceError(BatchfeedError):
    """The host lacks a resource the server needs (shared memory, a free address)."""

    code = "resource"


class AuthenticationError(BatchfeedError):
    """The server refused the client's keys (CURVE/ZAP)."""

    code = "auth"


class DataMismatch(BatchfeedError):
    """Two servers of one job, or a checkpoint and a server, name different data (their
    dataset fingerprints or server-side transforms differ)."""

    code = "data_mismatch"


class ForkError(BatchfeedError, RuntimeError):
    """A client (its I/O thread, sockets and leases belong to the process that made it) was
    used in a child process forked from that process."""

    code = "fork"


class IteratorSuperseded(BatchfeedError):
    """A newer iteration of the same client replaced this iterator (a client serves one
    iterator at a time); the message names what replaced it."""

    code = "superseded"


_BY_CODE: dict[str, type[BatchfeedError]] = {
    cls.code: cls
    for cls in (
        BatchfeedError,
        ProtocolError,
        VersionMismatch,
        InvalidRequest,
        InvalidArgument,
        InvalidArgumentType,
        DatasetError,
        ServerUnavailable,
        UnknownSession,
        WorkerError,
        CreditExceeded,
        ResourceError,
        AuthenticationError,
        DataMismatch,
        ForkError,
        IteratorSuperseded,
    )
}


def error_from_code(code: str, message: str) -> BatchfeedError:
    """Rebuild the typed error that a peer reported as ``(code, message)``."""
    return _BY_CODE.get(code, BatchfeedError)(message)
