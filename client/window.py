"""The client's window over one stream: which batches to ask which server for, and in what
order to hand them to the trainer.  Plain objects, no sockets and no threads: the I/O thread
drives a window, and ``tests/test_window.py`` drives one directly.

- ``Positions``: stream position ``p`` <-> (epoch, local batch), epoch ends, and the request
  horizon (the end of the epoch after the trainer's, so the next epoch is prefetched).
- ``Credit``: how many positions may be requested and not consumed, in all and per link.
- ``Window``: the positions each link was asked for, the retry pool of what a lost link owed
  (asked again first), and the reorder buffer (arrivals held until they are next in plan
  order; duplicates and late arrivals dropped; an error held at its position, and nothing
  handed over after it).

Only a window's own methods change its state, and they refuse (``AssertionError``) a change that
would break its rules: more credit than ``prefetch``, more than a link's share, a run across an
epoch boundary, a position asked twice of one link, consumption going backwards or past what was
handed over.  ``credit`` is replaced when servers join or leave (each one's share changes); a
link over its new, smaller share is asked for nothing until it is below it.  There is nothing to
shut down: a window is dropped with its stream.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from batchfeed.shared.errors import ProtocolError

K = TypeVar("K", bound=Hashable)  # whatever names a link: the I/O thread uses its address


@dataclass(frozen=True)
class Positions:
    """Where a stream starts: position ``p`` is local batch ``(start + p) % bpe`` of epoch
    ``epoch0 + (start + p) // bpe``; the stream runs on across epochs."""

    epoch0: int
    start: int
    bpe: int  # batches per epoch

    def __post_init__(self) -> None:
        if self.bpe < 1 or self.epoch0 < 0 or not 0 <= self.start <= self.bpe:
            raise ValueError(f"no stream starts at batch {self.start} of epoch {self.epoch0} "
                             f"with {self.bpe} batches per epoch")

    def where(self, p: int) -> tuple[int, int]:
        """(epoch, local batch) of position ``p``."""
        q = self.start + p
        return self.epoch0 + q // self.bpe, q % self.bpe

    def position(self, epoch: int, k: int) -> int:
        return (epoch - self.epoch0) * self.bpe + k - self.start

    def epoch_end(self, p: int) -> int:
        """The first position of the epoch after ``p``'s."""
        return self.position(self.where(p)[0] + 1, 0)

    def horizon(self, consumed: int) -> int:
        """How far to request: to the end of the epoch after the one the trainer is in."""
        return self.position(self.where(consumed)[0] + 2, 0)

    def arrival(self, epoch: int, k0: int, count: int) -> int:
        """The position of the first of ``count`` batches from ``k0`` of ``epoch`` that a
        server sent; ProtocolError when they are not batches of this stream."""
        p0 = self.position(epoch, k0)
        if p0 < 0 or k0 < 0 or count < 0 or k0 + count > self.bpe:
            raise ProtocolError(f"server sent batches {k0}..{k0 + count - 1} of epoch {epoch}, "
                                "which this client did not ask for")
        return p0


@dataclass(frozen=True)
class Credit:
    """How much a client asks for ahead of its trainer."""

    prefetch: int  # positions requested and not consumed, over all links
    link_cap: int  # positions one link may owe at once (its share)
    link_unit: int  # the smallest new run worth a request (below it, a link waits for room)

    def __post_init__(self) -> None:
        if not 1 <= self.link_unit <= self.link_cap <= self.prefetch:
            raise ValueError(f"credit needs 1 <= link_unit <= link_cap <= prefetch, got "
                             f"{self.link_unit}, {self.link_cap}, {self.prefetch}")

    @classmethod
    def shared_by(cls, prefetch: int, links: int) -> Credit:
        """``prefetch`` split over ``links`` servers (each may owe its share, rounded up)."""
        cap = max(1, -(-prefetch // links))
        return cls(prefetch, cap, max(1, cap // 4))

    @property
    def poke_every(self) -> int:
        """The trainer wakes the I/O thread after this many batches, to refill the window."""
        return max(1, self.prefetch // 4)


@dataclass(frozen=True)
class Run(Generic[K]):
    """Consecutive positions asked of one link: batches ``k .. k + count - 1`` of ``epoch``."""

    link: K
    first: int  # the position of batch k
    count: int
    epoch: int
    k: int


class Window(Generic[K]):
    """The credit and the reorder buffer of one stream (see the module docstring)."""

    def __init__(self, positions: Positions, credit: Credit):
        self.positions = positions
        self.credit = credit
        self.consumed = 0  # positions the trainer has taken, as last noted
        self.requested = 0  # the first position never requested
        self.next_deliver = 0  # the first position not yet handed over
        self.broken = False  # an error was handed over: nothing after it is, or is asked for
        self._held: dict[int, Any] = {}  # arrivals (and errors) waiting for their turn
        self._retry: set[int] = set()  # positions a lost link owed: asked again first
        self._asked: dict[K, set[int]] = {}  # positions each link owes

    # ------------------------------------------------------------------ what it knows

    def owed_by(self, link: K) -> frozenset[int]:
        return frozenset(self._asked.get(link, ()))

    @property
    def retry(self) -> frozenset[int]:
        return frozenset(self._retry)

    @property
    def held(self) -> int:
        """Arrivals held until the positions before them arrive."""
        return len(self._held)

    # ------------------------------------------------------------------ the trainer's pace

    def note_consumed(self, consumed: int) -> None:
        """The trainer has taken ``consumed`` positions: their credit is free again."""
        if not self.consumed <= consumed <= self.next_deliver:
            raise AssertionError(
                f"consumption must move forward within what was handed over: was "
                f"{self.consumed}, now {consumed}, handed over {self.next_deliver}")
        self.consumed = consumed

    # ------------------------------------------------------------------ asking

    def next_request(self, links: Sequence[K]) -> Run[K] | None:
        """The next run to ask for, of the link (among ``links``, those up) that owes least;
        what a lost link owed first, then new positions.  None when nothing is due now."""
        if self.broken or not links:
            return None
        link = min(links, key=lambda lk: len(self._asked.get(lk, ())))
        free = self.credit.link_cap - len(self._asked.get(link, ()))
        if free <= 0:  # (below 0 when more servers joined and the shares shrank)
            return None
        first, count = self._retry_run(free) if self._retry else self._new_run(free)
        if count == 0:
            return None
        self._ask(link, first, count)
        epoch, k = self.positions.where(first)
        return Run(link, first, count, epoch, k)

    def _retry_run(self, free: int) -> tuple[int, int]:
        """The first consecutive retry positions (already within the credit): at most
        ``free``, within one epoch."""
        ps = sorted(self._retry)
        limit = min(free, len(ps), self.positions.epoch_end(ps[0]) - ps[0])
        run = 1
        while run < limit and ps[run] == ps[0] + run:
            run += 1
        self._retry.difference_update(range(ps[0], ps[0] + run))
        return ps[0], run

    def _new_run(self, free: int) -> tuple[int, int]:
        """Positions never requested: as many as credit, the link's share, the horizon and
        the epoch allow; none while that is less than a worthwhile unit."""
        p0 = self.requested
        remaining = self.positions.horizon(self.consumed) - p0
        in_epoch = self.positions.epoch_end(p0) - p0
        room = self.credit.prefetch - (p0 - self.consumed)
        count = min(room, free, remaining, in_epoch)
        if count <= 0 or count < min(self.credit.link_unit, remaining, in_epoch):
            return p0, 0
        self.requested += count
        return p0, count

    def _ask(self, link: K, first: int, count: int) -> None:
        """Record that ``link`` owes ``first .. first + count - 1``, refusing what breaks
        the credit rules."""
        run = range(first, first + count)
        owed = self._asked.setdefault(link, set())
        if count < 1 or first + count > self.positions.epoch_end(first):
            raise AssertionError(f"a run of {count} from position {first} is empty or crosses "
                                 f"the epoch boundary at {self.positions.epoch_end(first)}")
        if len(owed) + count > self.credit.link_cap or not owed.isdisjoint(run):
            raise AssertionError(f"link {link!r} owes {len(owed)} positions and was asked for "
                                 f"{first}..{first + count - 1}: over its share of "
                                 f"{self.credit.link_cap}, or twice for one position")
        if self.requested - self.consumed > self.credit.prefetch:
            raise AssertionError(f"{self.requested - self.consumed} positions requested and "
                                 f"not consumed, over prefetch={self.credit.prefetch}")
        if first + count > self.positions.horizon(self.consumed):
            raise AssertionError(f"positions up to {first + count - 1} requested, past the "
                                 f"horizon {self.positions.horizon(self.consumed)}")
        owed.update(run)

    def forget_link(self, link: K) -> None:
        """``link`` was lost: what it owed and has not arrived goes to the retry pool."""
        owed = self._asked.pop(link, set())
        self._retry.update(p for p in owed if p >= self.next_deliver and p not in self._held)

    # ------------------------------------------------------------------ arrivals

    def arrived(self, link: K, p: int, item: Any) -> bool:
        """``link`` sent position ``p``; True if it is kept (not a duplicate, not late)."""
        self._asked.get(link, set()).discard(p)
        self._retry.discard(p)
        if self.broken or p < self.next_deliver or p in self._held:
            return False
        if p >= self.requested:
            raise ProtocolError(f"a server sent the batch at stream position {p}, which this "
                                f"client never asked for (it asked up to {self.requested - 1})")
        self._held[p] = item
        return True

    def hold_error(self, p: int, error: BaseException) -> bool:
        """Hold ``error`` at position ``p``: it is raised when the trainer gets there (unless
        a batch is already held there).  False when ``p`` was handed over already."""
        if p < self.next_deliver:
            return False
        if not self.broken:
            self._held.setdefault(p, error)
        return True

    def break_off(self) -> None:
        """An error ends the stream here: nothing more is handed over or asked for."""
        self.broken = True
        self._held.clear()
        self._retry.clear()

    def take_in_order(self) -> tuple[list[Any], BaseException | None]:
        """Every held item that is next in plan order, and the error that ends the stream
        if one is next after them."""
        out: list[Any] = []
        while self.next_deliver in self._held:
            item = self._held.pop(self.next_deliver)
            if isinstance(item, BaseException):
                self.break_off()
                return out, item
            out.append(item)
            self.next_deliver += 1
        return out, None
