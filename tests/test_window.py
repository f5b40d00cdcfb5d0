"""The client's window, driven directly: fake links (plain names), no processes, no sockets.

One test per promise the window makes to the trainer and to the servers; a randomised run at
the end plays many servers, losses, duplicates and a trainer against it at once.
"""

from __future__ import annotations

import random

import pytest

from batchfeed.client.window import Credit, Positions, Run, Window
from batchfeed.shared.errors import ProtocolError, WorkerError


def window(bpe: int = 10, prefetch: int = 8, links: int = 1, epoch: int = 0,
           start: int = 0) -> Window[str]:
    return Window(Positions(epoch, start, bpe), Credit.shared_by(prefetch, links))


def ask_all(w: Window[str], links: tuple[str, ...] = ("a",)) -> list[Run[str]]:
    """Every run the window asks for now."""
    runs = []
    while (run := w.next_request(list(links))) is not None:
        runs.append(run)
    return runs


def asked(runs: list[Run[str]]) -> list[int]:
    return [p for run in runs for p in range(run.first, run.first + run.count)]


def arrive(w: Window[str], link: str, *ps: int) -> list[int]:
    """``link`` sends positions ``ps`` (item: ("batch", p)); the positions handed over."""
    for p in ps:
        w.arrived(link, p, ("batch", p))
    batches, error = w.take_in_order()
    assert error is None
    return [p for _, p in batches]


def test_positions_map_to_epoch_and_batch_across_epochs() -> None:
    pos = Positions(epoch0=2, start=3, bpe=10)
    assert pos.where(0) == (2, 3) and pos.where(6) == (2, 9) and pos.where(7) == (3, 0)
    assert pos.position(3, 0) == 7 and pos.position(4, 5) == 22
    assert pos.epoch_end(0) == 7 and pos.epoch_end(7) == 17
    assert pos.horizon(0) == 17 and pos.horizon(7) == 27  # to the end of the next epoch
    with pytest.raises(ProtocolError, match="did not ask for"):
        pos.arrival(2, 8, 3)  # runs past the end of the epoch
    with pytest.raises(ProtocolError, match="did not ask for"):
        pos.arrival(2, 1, 1)  # before the stream's start


def test_credit_is_split_over_links_and_validated() -> None:
    assert Credit.shared_by(8, 1) == Credit(8, 8, 2)
    assert Credit.shared_by(5, 2) == Credit(5, 3, 1)
    with pytest.raises(ValueError):
        Credit(4, 5, 1)  # a link's share above the whole credit


def test_out_of_order_arrivals_are_handed_over_in_plan_order() -> None:
    w = window()
    assert asked(ask_all(w)) == list(range(8))
    assert arrive(w, "a", 3, 1, 2) == []  # held: position 0 is not there yet
    assert w.held == 3
    assert arrive(w, "a", 0) == [0, 1, 2, 3]
    assert arrive(w, "a", 6, 5) == []
    assert arrive(w, "a", 4) == [4, 5, 6]
    assert w.held == 0


def test_a_duplicate_or_a_late_arrival_is_dropped() -> None:
    w = window()
    ask_all(w)
    assert w.arrived("a", 1, "first copy")
    assert not w.arrived("a", 1, "second copy")  # twice while held
    assert w.arrived("a", 0, "zero")
    assert w.take_in_order() == (["zero", "first copy"], None)
    assert not w.arrived("a", 0, "again")  # after it was handed over
    assert w.take_in_order() == ([], None) and w.held == 0


def test_credit_never_exceeds_prefetch_and_refills_as_the_trainer_consumes() -> None:
    w = window(bpe=100, prefetch=5)
    assert asked(ask_all(w)) == [0, 1, 2, 3, 4]
    assert arrive(w, "a", 0, 1, 2, 3, 4) == [0, 1, 2, 3, 4]
    assert ask_all(w) == []  # all five handed over, none consumed: no credit left
    w.note_consumed(2)
    assert asked(ask_all(w)) == [5, 6]  # two consumed: two more
    assert w.requested - w.consumed == 5
    w.note_consumed(5)
    assert asked(ask_all(w)) == [7, 8, 9]


def test_each_link_owes_at_most_its_share() -> None:
    w = window(bpe=100, prefetch=8, links=2)
    runs = ask_all(w, ("a", "b"))
    assert [(r.link, r.first, r.count) for r in runs] == [("a", 0, 4), ("b", 4, 4)]
    assert arrive(w, "a", 0, 1) == [0, 1]
    w.note_consumed(2)
    runs = ask_all(w, ("a", "b"))
    assert [(r.link, r.first, r.count) for r in runs] == [("a", 8, 2)]  # a had two free
    assert len(w.owed_by("a")) == 4 and len(w.owed_by("b")) == 4


def test_a_run_never_crosses_an_epoch_boundary() -> None:
    w = window(bpe=10, prefetch=8, start=7)
    runs = ask_all(w)
    assert [(r.epoch, r.k, r.count) for r in runs] == [(0, 7, 3), (1, 0, 5)]


def test_a_lost_links_positions_are_asked_again_of_another_link_first() -> None:
    w = window(bpe=100, prefetch=8, links=2)
    ask_all(w, ("a", "b"))  # a owes 0..3, b owes 4..7
    assert arrive(w, "a", 0) == [0]
    assert arrive(w, "b", 4, 5, 6, 7) == []
    w.note_consumed(1)
    w.forget_link("a")  # lost with 1, 2, 3 still owed
    assert w.retry == {1, 2, 3}
    runs = ask_all(w, ("b",))
    assert [(r.link, r.first, r.count) for r in runs][0] == ("b", 1, 3)  # before anything new
    assert asked(runs) == [1, 2, 3, 8]
    assert arrive(w, "b", 3, 2, 1) == [1, 2, 3, 4, 5, 6, 7]


def test_an_error_is_handed_over_at_its_position_and_nothing_after_it() -> None:
    w = window()
    ask_all(w)
    failure = WorkerError("batch 3 could not be read")
    assert w.hold_error(3, failure)
    assert arrive(w, "a", 0, 1, 4) == [0, 1]
    w.arrived("a", 2, ("batch", 2))
    assert w.take_in_order() == ([("batch", 2)], failure)
    assert w.broken and w.held == 0
    assert not w.arrived("a", 3, ("batch", 3)) and not w.arrived("a", 5, ("batch", 5))
    assert w.take_in_order() == ([], None)
    w.note_consumed(3)  # the trainer took 0, 1, 2: room for more, but
    assert ask_all(w) == []  # a broken stream asks for nothing more
    assert not w.hold_error(0, failure)  # already handed over: the caller raises it now


def test_the_next_epoch_is_prefetched_up_to_the_horizon() -> None:
    w = window(bpe=4, prefetch=100)
    assert asked(ask_all(w)) == list(range(8))  # epochs 0 and 1, not 2
    assert arrive(w, "a", *range(8)) == list(range(8))
    w.note_consumed(3)
    assert ask_all(w) == []  # the trainer is still in epoch 0
    w.note_consumed(4)
    runs = ask_all(w)
    assert [(r.epoch, r.k, r.count) for r in runs] == [(2, 0, 4)]


def test_consumption_never_goes_backwards_or_past_what_was_handed_over() -> None:
    w = window()
    ask_all(w)
    arrive(w, "a", 0, 1, 2)
    w.note_consumed(2)
    with pytest.raises(AssertionError, match="forward"):
        w.note_consumed(1)
    with pytest.raises(AssertionError, match="handed over"):
        w.note_consumed(4)


def test_a_batch_never_asked_for_is_a_protocol_error() -> None:
    w = window(prefetch=4)
    ask_all(w)
    with pytest.raises(ProtocolError, match="never asked for"):
        w.arrived("a", 6, ("batch", 6))


def test_asking_over_a_share_twice_or_across_an_epoch_is_refused() -> None:
    """The guard behind ``next_request``: it refuses runs that break the credit rules."""
    w = window(bpe=10, prefetch=8, links=2)
    w.requested = 8
    with pytest.raises(AssertionError, match="share"):
        w._ask("a", 0, 5)
    w._ask("a", 0, 2)
    with pytest.raises(AssertionError, match="twice"):
        w._ask("a", 1, 2)
    with pytest.raises(AssertionError, match="epoch boundary"):
        w._ask("b", 8, 3)
    w.requested = 9
    with pytest.raises(AssertionError, match="over prefetch"):
        w._ask("b", 2, 1)


@pytest.mark.parametrize("seed", range(20))
def test_any_interleaving_hands_over_each_batch_once_in_plan_order(seed: int) -> None:
    """Three servers answer out of order, send duplicates, get lost and come back; the trainer
    consumes at its own pace.  Every step keeps the credit rules, and the trainer gets every
    position once, in order."""
    rng = random.Random(seed)
    links = ("a", "b", "c")
    credit = Credit.shared_by(rng.randint(3, 20), len(links))
    w: Window[str] = Window(Positions(epoch0=1, start=rng.randint(0, 6), bpe=7), credit)
    up = set(links)
    owed: dict[str, list[int]] = {link: [] for link in links}  # what each fake server sends
    stale: list[tuple[str, int]] = []  # sent by a server before it was lost, arriving late
    handed: list[int] = []
    for _ in range(5000):
        if len(handed) >= 60:
            break
        action = rng.random()
        if action < 0.3:
            for run in ask_all(w, tuple(sorted(up))):
                assert run.k + run.count <= 7 and w.positions.where(run.first) == (
                    run.epoch, run.k)
                owed[run.link] += range(run.first, run.first + run.count)
        elif action < 0.75:
            link = rng.choice(links)
            if owed[link]:
                p = owed[link].pop(rng.randrange(len(owed[link])))
                handed += arrive(w, link, p)
                if rng.random() < 0.1:
                    handed += arrive(w, link, p)  # a duplicate
        elif action < 0.8 and len(up) > 1:
            link = rng.choice(sorted(up))
            up.discard(link)
            stale += [(link, p) for p in owed[link] if rng.random() < 0.3]
            owed[link].clear()
            w.forget_link(link)
        elif action < 0.82 and stale:
            handed += arrive(w, *stale.pop(rng.randrange(len(stale))))
        elif action < 0.85:
            up.add(rng.choice(links))
        else:
            w.note_consumed(rng.randint(w.consumed, len(handed)))
        assert 0 <= w.requested - w.consumed <= credit.prefetch
        assert all(len(w.owed_by(link)) <= credit.link_cap for link in links)
    assert handed[:60] == list(range(60))
    assert len(handed) == len(set(handed))
