"""batchfeed: a streaming mini-batch loader service for ML training.

``from batchfeed import Client`` is the trainer-side API; ``batchfeed serve`` starts a server,
and ``batchfeed.serve(data)`` one for data already in memory.  Both are imported lazily, so
that server processes never load client code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchfeed.shared.errors import (
    AuthenticationError,
    BatchfeedError,
    CreditExceeded,
    DataMismatch,
    DatasetError,
    ForkError,
    InvalidRequest,
    IteratorSuperseded,
    ProtocolError,
    ResourceError,
    ServerUnavailable,
    UnknownSession,
    VersionMismatch,
    WorkerError,
)
from batchfeed.shared.schema import Ragged
from batchfeed.shared.version import __version__

if TYPE_CHECKING:
    from batchfeed.client import Client
    from batchfeed.serving import serve

__all__ = [
    "AuthenticationError",
    "BatchfeedError",
    "Client",
    "CreditExceeded",
    "DataMismatch",
    "DatasetError",
    "ForkError",
    "InvalidRequest",
    "IteratorSuperseded",
    "ProtocolError",
    "Ragged",
    "ResourceError",
    "ServerUnavailable",
    "UnknownSession",
    "VersionMismatch",
    "WorkerError",
    "__version__",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from batchfeed.client import Client

        return Client
    if name == "serve":
        from batchfeed.serving import serve

        return serve
    raise AttributeError(f"module 'batchfeed' has no attribute {name!r}")
