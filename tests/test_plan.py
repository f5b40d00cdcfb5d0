"""The batch plan is a pure function of (rows, parameters, epoch, k)."""

from __future__ import annotations

import numpy as np
import pytest

from batchfeed.shared.errors import InvalidRequest
from batchfeed.shared.plan import BatchPlan, PlanParams, buffer_order, full_order


def simulate_shuffle_buffer(n: int, size: int, seed: int, epoch: int) -> list[int]:
    """The shuffle buffer written as the obvious loop, drawing the same random numbers."""
    rng = np.random.default_rng([seed, epoch, 0x42554646])
    size = min(size, n)
    slots = rng.integers(0, size, n - size)
    buf = list(range(size))
    out = []
    for step, j in enumerate(slots):
        out.append(buf[j])
        buf[j] = size + step
    out.extend(rng.permutation(np.array(buf, dtype=np.int64)).tolist())
    return out


def epoch_batches(plan: BatchPlan, epoch: int) -> list[np.ndarray]:
    return [plan.indices(epoch, k) for k in range(plan.batches_per_epoch)]


@pytest.mark.parametrize("n,size", [(1, 1), (10, 1), (10, 3), (10, 10), (10, 50), (1000, 64),
                                    (5000, 999)])
def test_buffer_order_is_the_shuffle_buffer_loop(n: int, size: int) -> None:
    assert buffer_order(n, size, seed=3, epoch=2).tolist() == simulate_shuffle_buffer(n, size, 3, 2)


@pytest.mark.parametrize("n,size", [(1000, 1), (1000, 17), (1000, 1000), (20000, 256)])
def test_buffer_order_bound_and_coverage(n: int, size: int) -> None:
    order = buffer_order(n, size, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(n))  # every item exactly once
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    # item i never comes out before position i - buffer_size
    assert np.all(position >= np.arange(n) - size)
    if size < n:
        assert not np.array_equal(order, np.arange(n)) or size == 1


def test_buffer_of_one_is_dataset_order() -> None:
    assert buffer_order(100, 1, seed=5, epoch=1).tolist() == list(range(100))


def test_full_order_is_a_fresh_permutation_per_seed_and_epoch() -> None:
    a = full_order(1000, seed=0, epoch=0)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, full_order(1000, seed=0, epoch=0))
    assert not np.array_equal(a, full_order(1000, seed=0, epoch=1))
    assert not np.array_equal(a, full_order(1000, seed=1, epoch=0))


@pytest.mark.parametrize("shuffle", ["full", "buffer", "none"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_row_once_per_epoch(shuffle: str, drop_last: bool) -> None:
    n, bs = 1003, 64
    plan = BatchPlan(n, PlanParams(batch_size=bs, shuffle=shuffle, buffer_size=100,
                                   drop_last=drop_last))
    batches = epoch_batches(plan, 0)
    rows = np.concatenate(batches)
    assert len(rows) == len(set(rows.tolist()))
    if drop_last:
        assert plan.batches_per_epoch == n // bs
        assert all(len(b) == bs for b in batches)
        assert len(rows) == n - n % bs
    else:
        assert plan.batches_per_epoch == -(-n // bs)
        assert len(batches[-1]) == n % bs
        assert sorted(rows.tolist()) == list(range(n))
    assert [plan.batch_rows(k) for k in range(plan.batches_per_epoch)] == [len(b) for b in batches]


def test_none_is_dataset_order() -> None:
    plan = BatchPlan(10, PlanParams(batch_size=4, shuffle="none"))
    assert [b.tolist() for b in epoch_batches(plan, 7)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_are_disjoint_and_the_same_size(world: int, drop_last: bool) -> None:
    n, bs = 1003, 32
    plans = [BatchPlan(n, PlanParams(batch_size=bs, seed=9, rank=r, world_size=world,
                                     drop_last=drop_last)) for r in range(world)]
    counts = {p.batches_per_epoch for p in plans}
    assert len(counts) == 1
    per_rank = [np.concatenate(epoch_batches(p, 1)) for p in plans]
    union = np.concatenate(per_rank)
    assert len(union) == len(set(union.tolist()))
    # What is dropped: the last global_batches % world batches of the epoch's order.
    single = BatchPlan(n, PlanParams(batch_size=bs, seed=9, drop_last=drop_last))
    kept = single.global_batches - single.global_batches % world
    expected = np.concatenate([single.indices(1, g) for g in range(kept)])
    assert sorted(union.tolist()) == sorted(expected.tolist())


def test_chunk_indices_are_the_batches_concatenated() -> None:
    for world, rank in [(1, 0), (3, 2)]:
        plan = BatchPlan(1000, PlanParams(batch_size=10, rank=rank, world_size=world))
        chunk = plan.chunk_indices(4, 5, 7)
        assert chunk.tolist() == np.concatenate([plan.indices(4, k) for k in range(5, 12)]).tolist()


def test_order_does_not_depend_on_cache_state() -> None:
    a = BatchPlan(500, PlanParams(batch_size=7, seed=1))
    b = BatchPlan(500, PlanParams(batch_size=7, seed=1))
    for e in range(6):  # run a through more epochs than its cache holds
        a.indices(e, 0)
    assert all(np.array_equal(a.indices(0, k), b.indices(0, k)) for k in range(a.batches_per_epoch))


@pytest.mark.parametrize("kwargs,words", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-3), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(batch_size=8, shuffle="random"), "shuffle must be one of"),
    (dict(batch_size=8, shuffle="buffer"), "buffer_size"),
    (dict(batch_size=8, rank=2, world_size=2), "rank 2 is out of range for world_size 2"),
    (dict(batch_size=8, rank=-1), "rank"),
    (dict(batch_size=8, world_size=0), "world_size"),
    (dict(batch_size=8, seed=-1), "seed"),
    (dict(batch_size=8, drop_last=1), "drop_last"),
])
def test_bad_parameters_are_refused_with_the_reason(kwargs: dict, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        PlanParams(**kwargs)


def test_a_plan_with_no_batch_per_rank_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="no batch for each rank"):
        BatchPlan(10, PlanParams(batch_size=64, drop_last=True))
    with pytest.raises(InvalidRequest, match="no batch for each rank"):
        BatchPlan(10, PlanParams(batch_size=8, world_size=4, rank=1))


def test_wire_form_round_trips_and_rejects_unknown_keys() -> None:
    p = PlanParams(batch_size=8, shuffle="buffer", buffer_size=5, seed=2, rank=1, world_size=3)
    assert PlanParams.from_wire(p.to_wire()) == p
    with pytest.raises(InvalidRequest, match="unknown plan parameters"):
        PlanParams.from_wire({"batch_size": 8, "evil": 1})
    with pytest.raises(InvalidRequest, match="need batch_size"):
        PlanParams.from_wire({})


def test_batch_out_of_range_is_refused() -> None:
    plan = BatchPlan(100, PlanParams(batch_size=10))
    with pytest.raises(InvalidRequest, match="out of range"):
        plan.indices(0, 10)
