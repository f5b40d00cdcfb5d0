"""batchfeed: a streaming mini-batch loader service for ML training.

``from batchfeed import Client`` is the trainer-side API, and ``BatchfeedDataset`` its torch
``IterableDataset``; ``batchfeed serve`` starts a server, and ``batchfeed.serve(data)`` one for
data already in memory.  They are imported lazily, on first use: server processes never load
client code, and ``import batchfeed`` never imports torch (only ``BatchfeedDataset`` does).
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
    InvalidArgument,
    InvalidArgumentType,
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
    from batchfeed.client.torch_data import BatchfeedDataset
    from batchfeed.serving import serve

__all__ = [
    "AuthenticationError",
    "BatchfeedDataset",
    "BatchfeedError",
    "Client",
    "CreditExceeded",
    "DataMismatch",
    "DatasetError",
    "ForkError",
    "InvalidArgument",
    "InvalidArgumentType",
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
    if name == "BatchfeedDataset":
        from batchfeed.client.torch_data import BatchfeedDataset

        return BatchfeedDataset
    if name == "serve":
        from batchfeed.serving import serve

        return serve
    raise AttributeError(f"module 'batchfeed' has no attribute {name!r}")
