"""The server's bookkeeping, driven in-process: the slot ring's holders, a session's credit and
queue, the scheduler and the order board, with fake workers and no processes or sockets.

Each test states one rule and fails when the code stops enforcing it.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from batchfeed.server import supervisor as sup
from batchfeed.server import tasks
from batchfeed.server.config import ServerConfig
from batchfeed.server.dataset import DatasetSpec
from batchfeed.server.frontend import BookkeepingError, Frontend
from batchfeed.server.leases import TABLE_HEADER, Leases
from batchfeed.server.order_board import OrderBoard, OrderState
from batchfeed.server.ring import LEASE, SEND, TASK, Holder, RingError, SlotRing
from batchfeed.server.scheduler import TASKS_PER_WORKER, Scheduler
from batchfeed.server.session import Session, new_session
from batchfeed.server.session_table import SessionTable
from batchfeed.server.sizing import BatchEstimate, size_session
from batchfeed.shared.errors import CreditExceeded, InvalidRequest, UnknownSession
from batchfeed.shared.plan import BatchPlan, PlanParams
from batchfeed.shared.schema import Field
from batchfeed.shared.shm import SharedSegment, claim_proof

ROWS = 1000
SPEC = DatasetSpec("d", ROWS, (Field("x", np.dtype(np.float32), (4,)),), ("seg",))


class FakeWorker:
    """What the scheduler sees of a worker: it records the messages it is sent."""

    def __init__(self, index: int):
        self.index = index
        self.ready = True
        self.tasks: dict[int, float] = {}
        self.sent: list = []
        self.alive = True

    def send(self, message: object) -> bool:
        if self.alive:
            self.sent.append(message)
        return self.alive

    def assigned(self, task_id: int) -> None:
        self.tasks[task_id] = 0.0

    def completed(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def given(self) -> list[tasks.Task]:
        return [m for m in self.sent if isinstance(m, tasks.Task)]


def session(sid: int, prefetch: int = 64, max_chunk: int = 4, shuffle: str = "none",
            batch_size: int = 10) -> Session:
    plan = BatchPlan(ROWS, PlanParams(batch_size=batch_size, shuffle=shuffle), data_key="d")
    sizing = size_session(BatchEstimate(batch_size * 16 + 128), prefetch, 1 << 20, 1 << 20)
    s = new_session((b"route", ""), SPEC, plan, sizing)
    s.id, s.max_chunk = sid, max_chunk
    return s


@pytest.fixture
def board() -> Iterator[OrderBoard]:
    b = OrderBoard("test" + format(np.random.default_rng().integers(1 << 30), "x"))
    yield b
    b.close()


def make_scheduler(board: OrderBoard, n_slots: int = 8,
                   sessions: list[Session] = ()) -> tuple[Scheduler, SlotRing]:
    ring = SlotRing("t", n_slots, 4096, create=False)
    table = {s.id: s for s in sessions}
    return Scheduler(ring, board, table), ring


# ---------------------------------------------------------------------------------------------
# The slot ring


def test_only_a_slots_holder_can_release_it() -> None:
    ring = SlotRing("t", 4, 4096, create=False)
    slot = ring.acquire(Holder(TASK, 1))
    assert slot is not None
    with pytest.raises(RingError, match="held by"):
        ring.release(slot, Holder(TASK, 2))
    with pytest.raises(RingError):
        ring.release(slot, Holder(LEASE, 1))
    ring.hand_over(slot, Holder(TASK, 1), Holder(SEND, 7))
    with pytest.raises(RingError):
        ring.hand_over(slot, Holder(TASK, 1), Holder(LEASE, 7))
    ring.release(slot, Holder(SEND, 7))
    with pytest.raises(RingError):  # once free, nobody holds it: a second release is refused
        ring.release(slot, Holder(SEND, 7))
    ring.check()


def test_ring_check_finds_a_slot_both_free_and_held() -> None:
    ring = SlotRing("t", 4, 4096, create=False)
    slot = ring.acquire(Holder(TASK, 1))
    ring.check()
    ring._free.append(slot)  # corrupt it the way a double release would
    with pytest.raises(RingError):
        ring.check()


def test_ring_hands_out_the_slot_released_last() -> None:
    ring = SlotRing("t", 4, 4096, create=False)
    a = ring.acquire(Holder(TASK, 1))
    b = ring.acquire(Holder(TASK, 2))
    ring.release(a, Holder(TASK, 1))
    assert ring.acquire(Holder(TASK, 3)) == a  # cache-hot first
    assert b is not None and ring.held() == {TASK: 2}


# ---------------------------------------------------------------------------------------------
# A session's credit and queue


def test_credit_refuses_more_than_prefetch_queued_or_gathering() -> None:
    s = session(1, prefetch=8)
    assert s.request(0, 0, 0, 5)
    s.take()
    with pytest.raises(CreditExceeded):
        s.request(0, 0, 5, 4)
    assert s.request(0, 0, 5, 3)
    s.check()


def test_requests_outside_the_epoch_are_refused() -> None:
    s = session(1)
    with pytest.raises(InvalidRequest, match="out of range"):
        s.request(0, 0, 99, 2)  # 100 batches: 0..99
    with pytest.raises(InvalidRequest):
        s.request(0, -1, 0, 1)
    with pytest.raises(InvalidRequest):
        s.request(0, 0, 0, 0)
    assert not s.has_work


def test_a_newer_stream_drops_the_queue_and_a_late_one_is_ignored() -> None:
    s = session(1)
    s.request(3, 0, 0, 10)
    s.take()
    s.request(4, 1, 0, 2)
    assert (s.queued, s.gathering, s.peek()) == (2, 0, (1, 0, 2))
    assert not s.request(3, 0, 50, 1)  # the old stream: ignored, not queued
    assert s.queued == 2
    s.check()


def test_tasks_start_small_then_grow_to_max_chunk() -> None:
    s = session(1, max_chunk=8)
    s.request(0, 0, 0, 40)
    sizes = [s.take()[2] for _ in range(6)]
    assert sizes == [1, 2, 4, 8, 8, 8]
    assert s.gathering == 31 and s.queued == 9
    s.check()


def test_a_lost_task_goes_back_first_and_a_cut_one_asks_for_the_rest() -> None:
    s = session(1, max_chunk=4)
    s.request(0, 0, 0, 12)
    first = s.take()
    s.untake(*first)
    assert s.peek() == (0, 0, 12 - first[2] + first[2]) or s.peek()[1] == 0
    for _ in range(3):
        s.take()
    epoch, k0, count = s.take()
    s.finished(epoch, k0, count, done=1)  # the slot held only one of them
    assert s.peek() == (epoch, k0 + 1, count - 1) and s.max_chunk == 1
    s.check()


def test_session_check_catches_counters_that_do_not_match_the_queue() -> None:
    s = session(1)
    s.request(0, 0, 0, 4)
    s.check()
    s._queued += 1  # a handler that forgot to update the queue
    with pytest.raises(AssertionError, match="queued"):
        s.check()


def test_negative_gathering_is_refused_at_once() -> None:
    s = session(1)
    s.request(0, 0, 0, 2)
    epoch, k0, take = s.take()
    s.finished(epoch, k0, take, take)
    with pytest.raises(AssertionError, match="negative"):
        s.failed(take)  # the same task reported twice


def test_sizing_refuses_a_batch_bigger_than_a_slot() -> None:
    with pytest.raises(InvalidRequest, match="--slot-mb"):
        size_session(BatchEstimate(10_000 * 16, what="one batch of 10000 rows"), 0,
                     64 * 1024, 1 << 20)
    sizing = size_session(BatchEstimate(64 * 16 + 128), 0, 1 << 20, 1 << 20)
    assert sizing.max_chunk == (1 << 20) // sizing.batch_bytes and 8 <= sizing.prefetch <= 1024


# ---------------------------------------------------------------------------------------------
# The scheduler


def test_dispatch_shares_workers_round_robin_and_fills_each_to_two_tasks(board) -> None:
    a, b = session(1), session(2)
    sched, ring = make_scheduler(board, sessions=[a, b])
    workers = [FakeWorker(0), FakeWorker(1)]
    for s in (a, b):
        s.request(0, 0, 0, 20)
        sched.wake(s)
    sched.dispatch(workers)
    assert all(len(w.tasks) == TASKS_PER_WORKER for w in workers)
    given = [t for w in workers for t in w.given()]
    assert sorted(t.id for t in given) == [1, 2, 3, 4]
    owners = [sched.inflight[t.id].session for t in sorted(given, key=lambda t: t.id)]
    assert owners == [1, 2, 1, 2]  # round robin
    assert ring.free_count == 8 - 4 and ring.held() == {TASK: 4}
    sched.check()


def test_dispatch_stops_when_the_ring_is_full(board) -> None:
    s = session(1, prefetch=100, max_chunk=1)
    sched, ring = make_scheduler(board, n_slots=3, sessions=[s])
    workers = [FakeWorker(i) for i in range(4)]
    s.request(0, 0, 0, 50)
    sched.wake(s)
    sched.dispatch(workers)
    assert len(sched.inflight) == 3 and ring.free_count == 0
    sched.check()


def test_a_dead_workers_tasks_go_back_to_the_head_of_the_queue(board) -> None:
    s = session(1, max_chunk=2)
    sched, ring = make_scheduler(board, sessions=[s])
    dead, other = FakeWorker(0), FakeWorker(1)
    s.request(0, 0, 0, 9)
    sched.wake(s)
    sched.dispatch([dead])
    lost = sorted((t.k0, t.count) for t in dead.given())
    sched.lost(dead)
    assert ring.free_count == 8 and not sched.inflight and s.gathering == 0
    assert s.peek()[1] == lost[0][0]  # asked again first
    sched.dispatch([other])
    assert sorted((t.k0, t.count) for t in other.given())[0][0] == 0
    sched.check()
    s.check()


def test_a_task_that_cannot_be_sent_is_undone(board) -> None:
    s = session(1)
    sched, ring = make_scheduler(board, sessions=[s])
    gone = FakeWorker(0)
    gone.alive = False
    s.request(0, 0, 0, 5)
    sched.wake(s)
    sched.dispatch([gone])
    assert not gone.ready and ring.free_count == 8 and s.queued == 5 and s.gathering == 0
    sched.check()


def test_a_late_reply_from_another_worker_is_ignored(board) -> None:
    s = session(1)
    sched, _ = make_scheduler(board, sessions=[s])
    w0, w1 = FakeWorker(0), FakeWorker(1)
    s.request(0, 0, 0, 1)
    sched.wake(s)
    sched.dispatch([w0])
    task = w0.given()[0]
    assert sched.complete(w1, task.id, ok=True) is None
    assert sched.complete(w0, task.id, ok=True) is not None
    assert sched.complete(w0, task.id, ok=True) is None  # and only once


def test_scheduler_check_catches_a_gathering_count_its_tasks_do_not_explain(board) -> None:
    s = session(1)
    sched, _ = make_scheduler(board, sessions=[s])
    s.request(0, 0, 0, 4)
    sched.wake(s)
    sched.dispatch([FakeWorker(0)])
    sched.check()
    s._gathering += 1
    with pytest.raises(AssertionError, match="gathering"):
        sched.check()


def test_the_first_task_fills_the_epoch_order_and_others_queue_behind_it(board) -> None:
    a, b = session(1, shuffle="full"), session(2, shuffle="full")
    sched, _ = make_scheduler(board, sessions=[a, b])
    w0, w1 = FakeWorker(0), FakeWorker(1)
    for s in (a, b):
        s.request(0, 0, 0, 1)
        sched.wake(s)
    sched.dispatch([w0, w1])
    first, second = w0.given()
    assert first.fill and not second.fill and first.order == second.order  # behind the fill
    assert not w1.given()
    key = a.plan.order_key(0)
    assert board.filling() == {key: 0}
    sched.complete(w0, first.id, ok=True)
    assert board.entry(key, a.plan).state is OrderState.FILLED


def test_a_fillers_death_leaves_the_order_to_be_filled_again(board) -> None:
    s = session(1, shuffle="full")
    sched, _ = make_scheduler(board, sessions=[s])
    w0, w1 = FakeWorker(0), FakeWorker(1)
    s.request(0, 0, 0, 1)
    sched.wake(s)
    sched.dispatch([w0])
    sched.lost(w0)
    assert board.entry(s.plan.order_key(0), s.plan).state is OrderState.EMPTY
    sched.dispatch([w1])
    assert w1.given()[0].fill


def test_the_next_epochs_order_is_computed_ahead_by_an_idle_worker(board) -> None:
    s = session(1, shuffle="full")
    sched, _ = make_scheduler(board, sessions=[s])
    busy, idle = FakeWorker(0), FakeWorker(1)
    s.request(0, 0, 0, 1)
    sched.wake(s)
    sched.dispatch([busy])
    sched.order_ahead([busy, idle])
    jobs = [m for m in idle.sent if isinstance(m, tasks.OrderJob)]
    assert [j.epoch for j in jobs] == [1]
    assert board.filling()[s.plan.order_key(1)] == 1
    sched.ordered(idle, jobs[0].id, ok=True)
    assert board.entry(s.plan.order_key(1), s.plan).state is OrderState.FILLED


def test_order_states_move_only_from_where_they_may(board) -> None:
    plan = BatchPlan(ROWS, PlanParams(batch_size=10), data_key="d")
    key = plan.order_key(0)
    board.entry(key, plan)
    board.start_fill(key, 0)
    with pytest.raises(AssertionError, match="filling"):
        board.start_fill(key, 1)
    board.finished(key, 1, ok=True)  # not the filler: a stale report changes nothing
    assert board.filling() == {key: 0}
    board.finished(key, 0, ok=True)
    with pytest.raises(AssertionError, match="filled"):
        board.start_fill(key, 0)


# ---------------------------------------------------------------------------------------------
# The front end's cross-checks


def test_front_end_check_finds_a_lease_the_ring_does_not_know() -> None:
    ring = SlotRing("t", 4, 4096, create=False)
    fe = Frontend(ServerConfig(workers=1), {"d": SPEC}, ring)
    try:
        table = fe.leases.grant()
        assert table is not None
        slot = ring.acquire(Holder(TASK, 1))
        fe.leases.lease(table, slot, Holder(TASK, 1))
        fe.check_invariants()
        other = next(i for i in range(4) if ring.holder(i) is None)
        table.slots.add(other)  # a lease recorded on one side only
        with pytest.raises(AssertionError, match=f"holds slot {other}"):
            fe.check_invariants()
    finally:
        fe.close()


def test_an_internal_error_that_broke_the_bookkeeping_stops_the_server() -> None:
    ring = SlotRing("t", 4, 4096, create=False)
    fe = Frontend(ServerConfig(workers=1), {"d": SPEC}, ring)
    calls = []

    def buggy_iteration() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug that left the state intact")  # logged, serving goes on
        ring._free.append(ring._free[0])  # a bug that corrupted the ring
        raise KeyError("a bug that broke the ring")

    fe._iterate = buggy_iteration  # type: ignore[method-assign]
    try:
        with pytest.raises(BookkeepingError, match="inconsistent"):
            fe.run()
        assert len(calls) == 2 and fe.errors["internal"] == 2
    finally:
        fe.close()


# ---------------------------------------------------------------------------------------------
# Sessions belong to their connection; leases come back only through their table


def test_a_session_answers_only_its_own_connection() -> None:
    table = SessionTable(Leases(SlotRing("t", 4, 4096, create=False), reserve=2))
    s = session(7)
    s.owner = (b"victim", "")
    table.open(s, None, None)
    assert table.find(7, (b"victim", "")) is s
    with pytest.raises(UnknownSession):
        table.find(7, (b"attacker", ""))
    with pytest.raises(UnknownSession):
        table.find(7, (b"victim", "another curve key"))


def test_resume_needs_the_secret_from_welcome() -> None:
    table = SessionTable(Leases(SlotRing("t", 4, 4096, create=False), reserve=2))
    old = session(1)
    table.open(old, None, None)
    table.open(session(2), resume=1, resume_secret="not the secret")
    assert 1 in table.by_id  # a guess closes nothing
    table.open(session(3), resume=1, resume_secret=old.secret)
    assert 1 not in table.by_id
    assert len({s.label for s in table}) == 2 and all(s.label != "" for s in table)


def test_a_lease_table_is_unlinked_once_its_client_holds_it() -> None:
    leases = Leases(SlotRing(f"t{os.getpid()}", 4, 4096, create=False), reserve=2)
    try:
        table = leases.grant()
        assert table is not None and os.path.exists(f"/dev/shm/{table.name}")
        assert not table.held() and not table.holder_alive()  # nobody opened it yet
        client = SharedSegment.attach(table.name, writable=True, keep_fd=True)
        fcntl.flock(client.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert table.held()
        assert not os.path.exists(f"/dev/shm/{table.name}")  # nobody else can open it now
        client.close()
    finally:
        leases.close()


def test_a_table_is_alive_while_a_process_holds_its_lock() -> None:
    leases = Leases(SlotRing(f"t{os.getpid()}", 4, 4096, create=False), reserve=2)
    try:
        table = leases.grant()
        assert table is not None
        client = SharedSegment.attach(table.name, writable=True, keep_fd=True)
        fcntl.flock(client.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert table.held() and table.holder_alive()
        assert leases.gone() == []
        client.close()  # the client process let go (or died)
        assert not table.holder_alive()
        assert leases.gone() == [table]  # its session closes at once
    finally:
        leases.close()


def test_a_claim_proof_needs_the_rings_key() -> None:
    ring = SlotRing(f"t{os.getpid()}", 4, 4096, create=False)
    challenge = "c0ffee" * 4
    assert claim_proof(ring.key, challenge) != claim_proof(b"\0" * 32, challenge)
    assert claim_proof(ring.key, challenge) != claim_proof(ring.key, challenge + "0")


def test_only_slots_the_client_cleared_come_back() -> None:
    ring = SlotRing(f"t{os.getpid()}", 6, 4096, create=False)
    leases = Leases(ring, reserve=2)
    try:
        table = leases.grant()
        assert table is not None
        slots = [ring.acquire(Holder(TASK, i)) for i in range(3)]
        for i, slot in enumerate(slots):
            leases.lease(table, slot, Holder(TASK, i))
        assert leases.collect(table) == 0  # the client holds all three
        table.buf[TABLE_HEADER + slots[1]] = 0  # it dropped its views of one
        assert leases.collect(table) == 1 and table.slots == {slots[0], slots[2]}
        leases.check()
        leases.end(table)  # session over, nobody holds the lock: everything comes back
        assert ring.free_count == 6
        leases.check()
    finally:
        leases.close()


def test_the_budget_keeps_slots_for_the_workers() -> None:
    ring = SlotRing(f"t{os.getpid()}", 8, 4096, create=False)
    leases = Leases(ring, reserve=4)
    try:
        a, b = session(1), session(2)
        a.table, b.table = leases.grant(), leases.grant()
        assert a.table is not None and b.table is not None and leases.limit == 4
        a.table.claimed = b.table.claimed = True  # two fast-path sessions: 2 leases each
        assert leases.fair_share() == 2
        for i in range(2):
            leases.lease(a.table, ring.acquire(Holder(TASK, i)), Holder(TASK, i))
        assert not leases.may_hold(a.table, lease=True)  # a holds its share of leases ...
        assert leases.may_hold(a.table, lease=False) and leases.may_hold(b.table, lease=False)
        for _ in range(2):
            ring.acquire(Holder(SEND, b.id))
        assert not leases.may_hold(b.table, lease=False)  # at the limit: the rest go copied
        assert ring.free_count == 4  # ... and the workers keep their reserve
    finally:
        leases.close()


# ---------------------------------------------------------------------------------------------
# Failing work fails once


def test_lost_batches_are_retried_alone_and_given_up_after_3_losses() -> None:
    s = session(1)
    s.request(0, 0, 0, 8)
    epoch, k0, count = s.take()
    assert count >= 1
    assert s.lost(epoch, k0, count, blamed=False) is None  # not the one running: retried
    runs = []
    while s.has_work:  # each batch lost before now goes alone
        e, k, c = s.take()
        runs.append(c)
        s.finished(e, k, c, c)
    assert all(c == 1 for c in runs[:count])
    s.request(0, 0, 8, 1)
    for attempt in range(3):
        e, k, c = s.take()
        assert (e, k, c) == (0, 8, 1)
        given_up = s.lost(e, k, c, blamed=True)
        assert (given_up is None) == (attempt < 2)
    assert given_up == (0, 8) and not s.has_work and s.gathering == 0
    s.check()


def test_workers_that_cannot_start_back_off_then_the_server_gives_up() -> None:
    class FakeWorker:
        def __init__(self, index: int) -> None:
            self.index, self.ready, self.broken, self.timed_out = index, False, "boom", False
            self.sentinel = self.fd = -1
            self.pid, self.exitcode = 1, 1

        def alive(self) -> bool:
            return False

        def finish(self, timeout: float) -> None:
            pass

        def describe_exit(self) -> str:
            return "could not start: boom"

    class Poller:
        def register(self, *a) -> None:
            pass

        def unregister(self, *a) -> None:
            pass

    s = sup.Supervisor(lambda i: None, 1, 1.0, Poller())  # type: ignore[arg-type]
    spawned: list[float] = []

    def spawn(index: int) -> FakeWorker:
        spawned.append(time.monotonic())
        return FakeWorker(index)

    s._spawn = spawn  # type: ignore[method-assign]
    s.workers = [FakeWorker(0)]  # type: ignore[list-item]
    delays = []
    while s.broken is None:
        s.replace(s.workers[0])  # it died before READY
        if s.broken is not None:
            break
        when = s._due[0][0]
        delays.append(round(when - time.monotonic(), 2))
        s.tick(when + 0.001)
    assert len(delays) == sup.MAX_FAILED_STARTS - 1
    assert delays == sorted(delays) and delays[0] <= 0.1 and delays[-1] >= 0.7  # doubling
    assert "could not start" in s.broken and str(sup.MAX_FAILED_STARTS) in s.broken
