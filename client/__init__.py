"""The trainer-side client library."""

from .client import Client
from .discovery import resolve_all
from .iteration import EpochIterator

__all__ = ["Client", "EpochIterator", "resolve_all"]
