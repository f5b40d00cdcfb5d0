"""The trainer-side client library."""

from .client import Client, EpochIterator
from .discovery import resolve_all

__all__ = ["Client", "EpochIterator", "resolve_all"]
