"""batchfeed: a streaming mini-batch loader service for ML training.

``from batchfeed import Client`` is the trainer-side API; ``batchfeed serve`` starts a server.
The client is imported lazily, so that server processes never load client code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchfeed.shared.errors import (
    AuthenticationError,
    BatchfeedError,
    CreditExceeded,
    DatasetError,
    InvalidRequest,
    IteratorSuperseded,
    ProtocolError,
    ResourceError,
    ServerUnavailable,
    UnknownSession,
    VersionMismatch,
    WorkerError,
)
from batchfeed.shared.version import __version__

if TYPE_CHECKING:
    from batchfeed.client import Client

__all__ = [
    "AuthenticationError",
    "BatchfeedError",
    "Client",
    "CreditExceeded",
    "DatasetError",
    "InvalidRequest",
    "IteratorSuperseded",
    "ProtocolError",
    "ResourceError",
    "ServerUnavailable",
    "UnknownSession",
    "VersionMismatch",
    "WorkerError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from batchfeed.client import Client

        return Client
    raise AttributeError(f"module 'batchfeed' has no attribute {name!r}")
