"""HELLO's sizing policy: how big one of a session's batches is in a slot (``BatchEstimate``,
from the catalog), how many batches go in one task and message (``max_chunk``), and its
default prefetch (``auto_prefetch``); ``size_session`` refuses a batch that cannot fit a slot,
saying what to change."""

from __future__ import annotations

from dataclasses import dataclass

from batchfeed.shared.batches import MAX_BATCHES_PER_MESSAGE
from batchfeed.shared.errors import InvalidRequest

MAX_PREFETCH = 4096
AUTO_PREFETCH_BYTES = 64 * 2**20
AUTO_PREFETCH_MAX = 1024  # batches


@dataclass(frozen=True)
class BatchEstimate:
    """How big one batch is in a slot: exact for fixed fields, an estimate for ragged ones
    (workers cut chunks that outgrow their slot, and refuse a single batch too big)."""

    nbytes: int
    exact: bool = True
    growth: int = 1  # an undeclared transform's output may be this much bigger (uint8->float32)
    what: str = "one batch"
    hint: str = ""  # what to ask for instead, when more rows than the data has made it big


@dataclass(frozen=True)
class Sizing:
    batch_bytes: int  # one batch of the served fields, as gathered into a slot
    max_chunk: int  # batches per task (and per message)
    prefetch: int


def size_session(estimate: BatchEstimate, prefetch: int, slot_bytes: int,
                 chunk_bytes: int) -> Sizing:
    """Size a session's messages; raise InvalidRequest when one batch cannot fit a slot."""
    batch_bytes = max(1, estimate.nbytes)
    prefetch = prefetch or auto_prefetch(batch_bytes, chunk_bytes)
    if not 1 <= prefetch <= MAX_PREFETCH:
        raise InvalidRequest(f"prefetch must be in [1, {MAX_PREFETCH}], got {prefetch}")
    if estimate.exact and batch_bytes > slot_bytes:
        if estimate.hint:  # more rows than the data has: a smaller batch_size is the fix
            raise InvalidRequest(
                f"{estimate.what} is {batch_bytes:,} bytes, more than this server's slot "
                f"size ({slot_bytes:,} bytes); ask for {estimate.hint}")
        raise InvalidRequest(
            f"{estimate.what} is {batch_bytes} bytes, more than this server's slot size "
            f"({slot_bytes} bytes); use a smaller batch_size or restart the server with "
            f"--slot-mb {-(-batch_bytes // 2**20)} or more"
        )
    budget = min(slot_bytes, chunk_bytes)
    max_chunk = max(1, min(budget // (batch_bytes * estimate.growth),
                           MAX_BATCHES_PER_MESSAGE))
    return Sizing(batch_bytes, max_chunk, prefetch)


def auto_prefetch(batch_bytes: int, chunk_bytes: int) -> int:
    """The default prefetch: 64 MiB of batches, or four messages' worth if more (so that
    several are on their way at once), between 8 and 1,024 batches.  Over a socket the window
    must cover the time a request takes to come back as batches (the gather, two copies through
    the kernel, a loaded host's scheduling): 64 MiB gave 20-40% more than 24 MiB on the tabular
    job on this 2-core machine, and more gave nothing."""
    window = max(AUTO_PREFETCH_BYTES, 4 * chunk_bytes)
    return max(8, min(AUTO_PREFETCH_MAX, window // batch_bytes))
