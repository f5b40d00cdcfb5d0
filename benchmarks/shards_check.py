"""The shard section's check: the first ``CHECK_BATCHES`` batches of ``CHECK_EPOCH`` as the full
server gives them, to compare each sharded row with (digests of every field); a row whose
batches differ is failed."""

from __future__ import annotations

import hashlib
from typing import Any

CHECK_BATCHES = 20  # batches of CHECK_EPOCH compared with the full server's, per row
CHECK_EPOCH = 1


def batch_digests(batch: Any) -> dict[str, str]:
    """A digest of each field of a batch (its dtype, shape and bytes)."""
    out = {}
    for name in sorted(batch):
        a = batch[name]
        h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=16)
        h.update(a.data if a.flags.c_contiguous else a.tobytes())
        out[name] = h.hexdigest()
    return out


class BatchCheck:
    """The first batches of ``CHECK_EPOCH`` as the full server gives them, to compare rows with.
    The first row that reads it (the full server, over tcp) sets the reference."""

    def __init__(self) -> None:
        self.reference: list[dict[str, str]] | None = None

    def run(self, client: Any) -> tuple[int, str | None]:
        """Read and compare; (batches read, what differs or None).  The first call sets the
        reference and finds nothing different."""
        count = min(CHECK_BATCHES, client.batches_per_epoch)
        got = []
        it = client.epoch(CHECK_EPOCH)
        try:
            for _, batch in zip(range(count), it):
                got.append(batch_digests(batch))
                del batch
        finally:
            it.close()
        if self.reference is None:
            self.reference = got
            return len(got), None
        return len(got), differs(got, self.reference)


def differs(got: list[dict[str, str]], expected: list[dict[str, str]]) -> str | None:
    """Where ``got`` first differs from ``expected`` (a sentence), or None."""
    for k, (a, b) in enumerate(zip(got, expected)):
        if a.keys() != b.keys():
            return f"batch {k} of epoch {CHECK_EPOCH} has fields {sorted(a)}, not {sorted(b)}"
        wrong = [name for name in a if a[name] != b[name]]
        if wrong:
            return (f"batch {k} of epoch {CHECK_EPOCH} differs from the full server's in "
                    f"{', '.join(wrong)}")
    if len(got) != len(expected):
        return (f"{len(got)} batches of epoch {CHECK_EPOCH} read, the full server gave "
                f"{len(expected)}")
    return None
