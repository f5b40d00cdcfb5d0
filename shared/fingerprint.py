"""A dataset's identity: its fingerprint, as servers announce it and clients compare it.

A server computes its dataset's fingerprint from the data's content when it starts
(``batchfeed.server.fingerprinting``); WELCOME carries it, a client checks every server it talks
to (at connect and at every reconnect) against the first, and ``state_dict`` records it, so
that servers of different data, a server replaced by one of other data, or a checkpoint
restored on other data are refused instead of mixed.

A fingerprint has two digests, each a SHA-256 (first 128 bits, hex):

- ``full``: over every byte of the data (absent when the server was told to sample only, the
  default with ``--mmap``);
- ``sampled``: over the sizes and evenly spaced blocks of the data: cheap for data of any size,
  and blind to a change that misses every block.

Two fingerprints *agree* when their ``full`` digests are equal, or, if one side has no full
digest, when their ``sampled`` ones are.  Shards of one dataset carry the whole dataset's
fingerprint (their range travels beside it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ProtocolError

DIGEST_HEX = 32  # 128 bits
_HEX = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Fingerprint:
    full: str | None = None
    sampled: str | None = None

    def __post_init__(self) -> None:
        for name in ("full", "sampled"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _HEX.match(value)):
                raise ProtocolError(f"a fingerprint's {name} digest must be {DIGEST_HEX} hex "
                                    f"digits, got {value!r:.80}")
        if self.full is None and self.sampled is None:
            raise ProtocolError("a fingerprint needs a full or a sampled digest")

    def agrees(self, other: Fingerprint) -> bool:
        """The same data, as far as both sides can tell."""
        if self.full is not None and other.full is not None:
            return self.full == other.full
        if self.sampled is not None and other.sampled is not None:
            return self.sampled == other.sampled
        return False

    def comparable(self, other: Fingerprint) -> bool:
        """Whether ``agrees`` can tell (False: one has only a full digest, the other only a
        sampled one)."""
        return (self.full is not None and other.full is not None) or (
            self.sampled is not None and other.sampled is not None)

    def __str__(self) -> str:
        if self.full is not None:
            return f"full:{self.full[:16]}"
        return f"sampled:{self.sampled[:16] if self.sampled else ''}"

    def to_wire(self) -> dict:
        return {"full": self.full, "sampled": self.sampled}

    @classmethod
    def from_wire(cls, data: object) -> Fingerprint:
        """From a WELCOME or a checkpoint; ProtocolError if it is not a fingerprint."""
        if not isinstance(data, dict) or set(data) - {"full", "sampled"}:
            raise ProtocolError(f"a fingerprint must be a map of 'full' and 'sampled' digests, "
                                f"got {data!r:.80}")
        return cls(data.get("full"), data.get("sampled"))

