"""The trainer-side client library."""

from .client import Client, EpochIterator

__all__ = ["Client", "EpochIterator"]
