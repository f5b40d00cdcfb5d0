"""The trainer-side client library."""

from .client import Client
from .discovery import ResolvedServers, resolve_all
from .iteration import EpochIterator
from .membership import ServerSet

__all__ = ["Client", "EpochIterator", "ResolvedServers", "ServerSet", "resolve_all"]
