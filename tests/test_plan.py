"""The batch plan is a pure function of (rows, parameters, epoch, k)."""

from __future__ import annotations

import numpy as np
import pytest

from batchfeed.shared.errors import InvalidArgument, InvalidArgumentType, InvalidRequest
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


# ------------------------------------------------------------------------------ ranks

# (rows, batch_size, world_size): uneven ends, fewer rows than ranks, a batch larger than a
# rank's share, batches of one row, exact multiples.
RANK_CASES = [(1437, 64, 1), (1437, 64, 2), (1437, 64, 4), (1437, 64, 8), (1437, 512, 4),
              (1003, 32, 3), (1000, 10, 5), (1000, 10, 4), (100, 7, 3), (10, 3, 4), (7, 100, 2),
              (5, 4, 8), (3, 1, 8), (1, 1, 4), (1, 5, 1), (64, 64, 1), (65, 64, 2), (50, 1, 3),
              (129, 16, 8)]
WITH_DROP_LAST = [(*case, drop_last) for case in RANK_CASES for drop_last in (False, True)
                  if not drop_last or case[0] // case[1] >= case[2]]  # else refused (tested)


def reference_positions(n: int, bs: int, world: int, rank: int, drop_last: bool) -> list[range]:
    """The rank layout written out from its rule: each local batch's epoch positions."""
    if drop_last:  # full global batches only, global batch g at g*bs; the rest to no rank
        return [range((k * world + rank) * bs, (k * world + rank + 1) * bs)
                for k in range(n // bs // world)]
    share = -(-n // world)  # the order padded to share * world positions
    steps = -(-share // bs)
    last = share - (steps - 1) * bs  # every rank's last round: batches of this size
    full = [range((k * world + rank) * bs, (k * world + rank + 1) * bs) for k in range(steps - 1)]
    start = (steps - 1) * world * bs + rank * last
    return full + [range(start, start + last)]


def rank_plans(n: int, bs: int, world: int, drop_last: bool, **kw: object) -> list[BatchPlan]:
    return [BatchPlan(n, PlanParams(batch_size=bs, seed=9, rank=r, world_size=world,
                                    drop_last=drop_last, **kw)) for r in range(world)]


def rank_batches(plans: list[BatchPlan], epoch: int) -> list[list[np.ndarray]]:
    return [epoch_batches(p, epoch) for p in plans]


@pytest.mark.parametrize("n,bs,world,drop_last", WITH_DROP_LAST)
def test_each_rank_gets_the_batches_the_rule_gives(n: int, bs: int, world: int,
                                                   drop_last: bool) -> None:
    for plan in rank_plans(n, bs, world, drop_last):
        order = plan.order(2)
        want = [order[np.array(pos) % n].tolist()
                for pos in reference_positions(n, bs, world, plan.params.rank, drop_last)]
        assert [b.tolist() for b in epoch_batches(plan, 2)] == want
        assert [plan.batch_rows(k) for k in range(plan.batches_per_epoch)] == list(map(len, want))
        assert [plan.global_batch(k) for k in range(len(want))] == [
            k * world + plan.params.rank for k in range(len(want))]


@pytest.mark.parametrize("n,bs,world", RANK_CASES)
def test_without_drop_last_every_row_reaches_a_rank(n: int, bs: int, world: int) -> None:
    plans = rank_plans(n, bs, world, drop_last=False)
    per_rank = rank_batches(plans, 1)
    sizes = {tuple(map(len, batches)) for batches in per_rank}
    assert len(sizes) == 1  # the same steps with the same batch sizes on every rank
    padded = plans[0].padded_rows
    assert padded == -(-n // world) * world - n <= world - 1
    assert padded <= world * bs - 1  # the issue's bound
    order = plans[0].order(1)
    rows = np.concatenate([b for batches in per_rank for b in batches]).tolist()
    # every row exactly once, plus the padding: the order's first rows again
    assert sorted(rows) == sorted(order.tolist() + order[np.arange(padded) % n].tolist())
    padding = set(order[np.arange(padded) % n].tolist())
    mine = [set(np.concatenate(batches).tolist()) for batches in per_rank]
    for a in range(world):  # ranks are disjoint but for the padded rows
        for b in range(a + 1, world):
            assert mine[a] & mine[b] <= padding
    assert all(len(set(b.tolist())) == len(b) for batches in per_rank for b in batches)
    assert all(p.dropped_rows == 0 for p in plans)


@pytest.mark.parametrize("n,bs,world", [case[:3] for case in WITH_DROP_LAST if case[3]])
def test_with_drop_last_ranks_get_full_batches_and_the_rest_is_counted(n: int, bs: int,
                                                                      world: int) -> None:
    plans = rank_plans(n, bs, world, drop_last=True)
    per_rank = rank_batches(plans, 1)
    assert {len(batches) for batches in per_rank} == {n // bs // world}
    assert all(len(b) == bs for batches in per_rank for b in batches)
    rows = np.concatenate([b for batches in per_rank for b in batches])
    assert len(set(rows.tolist())) == len(rows)  # disjoint
    served = len(rows)
    assert plans[0].dropped_rows == n - served < world * bs and plans[0].padded_rows == 0
    assert sorted(rows.tolist()) == sorted(plans[0].order(1)[:served].tolist())


@pytest.mark.parametrize("n,bs,drop_last", [(1437, 64, False), (1437, 64, True),
                                             (1003, 1, False), (1003, 1, True), (10, 3, False),
                                             (10, 3, True), (64, 64, True), (5, 100, False)])
def test_one_rank_is_the_plain_cut(n: int, bs: int, drop_last: bool) -> None:
    plan = BatchPlan(n, PlanParams(batch_size=bs, seed=4, drop_last=drop_last))
    order = plan.order(3).tolist()
    cut = [order[i : i + bs] for i in range(0, n, bs) if not drop_last or i + bs <= n]
    assert [b.tolist() for b in epoch_batches(plan, 3)] == cut
    assert plan.padded_rows == 0 and plan.dropped_rows == (n % bs if drop_last else 0)


def test_the_issues_examples() -> None:
    """1437 rows in batches of 64: nothing unseen on any number of ranks; batch 512 on 4 ranks
    is one short batch each, where it used to be refused."""
    for world in (2, 4, 8):
        plans = rank_plans(1437, 64, world, drop_last=False)
        rows = {int(i) for batches in rank_batches(plans, 0) for b in batches for i in b}
        assert rows == set(range(1437))
    plan = BatchPlan(1437, PlanParams(batch_size=64, world_size=4, rank=1))
    assert plan.batches_per_epoch == 6 and plan.padded_rows == 3
    assert [plan.batch_rows(k) for k in range(6)] == [64] * 5 + [40]
    plan = BatchPlan(1437, PlanParams(batch_size=512, world_size=4, rank=3))
    assert plan.batches_per_epoch == 1 and plan.batch_rows(0) == 360
    plan = BatchPlan(1437, PlanParams(batch_size=64, world_size=4, drop_last=True))
    assert plan.batches_per_epoch == 5 and plan.dropped_rows == 157


@pytest.mark.parametrize("n,bs,world", [(1437, 64, 4), (1437, 512, 4), (10, 3, 4), (5, 4, 8)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_steps_and_batch_sizes_match_torchs_distributed_sampler(n: int, bs: int, world: int,
                                                                drop_last: bool) -> None:
    torch_data = pytest.importorskip("torch.utils.data")
    for rank in range(world):
        sampler = torch_data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                shuffle=False, drop_last=drop_last)
        loader = torch_data.DataLoader(range(n), batch_size=bs, sampler=sampler,
                                       drop_last=drop_last)
        theirs = [len(b) for b in loader]
        if not theirs:  # torch gives this rank nothing; we refuse, saying why
            with pytest.raises(InvalidRequest, match="no batch for each rank"):
                rank_plans(n, bs, world, drop_last)
            continue
        plan = rank_plans(n, bs, world, drop_last)[rank]
        assert [plan.batch_rows(k) for k in range(plan.batches_per_epoch)] == theirs


@pytest.mark.parametrize("n,bs,world,rank,drop_last", [
    (1000, 10, 1, 0, False), (1003, 10, 1, 0, False), (1003, 10, 1, 0, True),
    (1000, 10, 3, 2, False), (1003, 10, 3, 2, False), (1003, 10, 3, 2, True),
    (10, 3, 4, 3, False), (3, 1, 8, 7, False)])
def test_chunk_indices_are_the_batches_concatenated(n: int, bs: int, world: int, rank: int,
                                                    drop_last: bool) -> None:
    plan = BatchPlan(n, PlanParams(batch_size=bs, rank=rank, world_size=world,
                                   drop_last=drop_last))
    order = plan.order(4)
    for k0 in range(plan.batches_per_epoch):
        for count in range(1, plan.batches_per_epoch - k0 + 1):
            chunk = plan.chunk_indices(4, k0, count, order)
            batches = [plan.indices(4, k, order) for k in range(k0, k0 + count)]
            assert chunk.tolist() == np.concatenate(batches).tolist()
            if world == 1:  # one slice of the order, no copy
                assert np.shares_memory(chunk, order)


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
    (dict(batch_size=True), "batch_size must be an int"),  # bools are not ints here
    (dict(batch_size=8, seed=True), "seed must be an int"),
    (dict(batch_size=8, world_size=True), "world_size must be an int"),
    (dict(batch_size=8, world_size=2, rank=np.True_), "rank .*True.* is out of range"),
    (dict(batch_size=8, shuffle="buffer", buffer_size=True), "needs buffer_size >= 1"),
    (dict(batch_size=np.float64(8)), "batch_size must be an int"),
    (dict(batch_size=8, shuffle=1), "shuffle must be one of"),
])
def test_bad_parameters_are_refused_with_the_reason(kwargs: dict, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):  # where they were given: a ValueError
        PlanParams(**kwargs)
    with pytest.raises(InvalidRequest, match=words):  # a server reading them: its refusal
        PlanParams.from_wire(kwargs)


def test_a_parameter_of_the_wrong_type_is_also_a_type_error() -> None:
    for kwargs in (dict(batch_size="8"), dict(batch_size=8, drop_last="yes"),
                   dict(batch_size=8, pad_value="0"), dict(batch_size=8, seed=1.5)):
        with pytest.raises(InvalidArgumentType) as info:
            PlanParams(**kwargs)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(InvalidArgument) as info:
        PlanParams(batch_size=0)
    assert not isinstance(info.value, (TypeError, InvalidRequest))


def test_drop_last_with_no_full_batch_per_rank_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"no batch for each rank; use drop_last=False \(each "
                       r"rank then gets one batch of 10 rows\) or batch_size <= 10"):
        BatchPlan(10, PlanParams(batch_size=64, drop_last=True))
    with pytest.raises(InvalidRequest, match=r"make 2 full batches of 512: .* world_size 4 .* "
                       r"one batch of 360 rows\) or batch_size <= 359"):
        BatchPlan(1437, PlanParams(batch_size=512, world_size=4, drop_last=True))
    with pytest.raises(InvalidRequest, match=r"or world_size <= 3"):
        BatchPlan(3, PlanParams(batch_size=1, world_size=8, drop_last=True))
    plan = BatchPlan(10, PlanParams(batch_size=8, world_size=4, rank=1))  # served without it
    assert plan.batches_per_epoch == 1 and len(plan.indices(0, 0)) == 3


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


def test_shuffle_true_and_false_mean_full_and_none() -> None:
    assert PlanParams(batch_size=8, shuffle=True) == PlanParams(batch_size=8, shuffle="full")
    off = PlanParams(batch_size=8, shuffle=False)
    assert off.shuffle == "none" and off.to_wire()["shuffle"] == "none"  # the wire is unchanged
    assert PlanParams(batch_size=8, shuffle=np.True_).shuffle == "full"
    assert PlanParams.from_wire({"batch_size": 8, "shuffle": False}) == off
    weighted = PlanParams(batch_size=8, sampling="weighted", weights="w", shuffle=True)
    assert weighted.shuffle == "full"
    with pytest.raises(InvalidArgument, match="shuffles by itself"):
        PlanParams(batch_size=8, sampling="balanced", label="y", shuffle=False)


@pytest.mark.parametrize("np_int", [np.int64, np.int32, np.int16, np.uint8, np.uint64])
def test_numpy_integers_are_taken_as_ints(np_int: type) -> None:
    got = [PlanParams(batch_size=np_int(8), seed=np_int(3), rank=np_int(1), world_size=np_int(2),
                      shuffle="buffer", buffer_size=np_int(5)),
           PlanParams(batch_size=np_int(8), sampling="weighted", weights="w",
                      epoch_rows=np_int(100))]
    want = [PlanParams(batch_size=8, seed=3, rank=1, world_size=2, shuffle="buffer",
                       buffer_size=5),
            PlanParams(batch_size=8, sampling="weighted", weights="w", epoch_rows=100)]
    assert got == want
    for params, plain in zip(got, want):  # stored as ints, so the wire form is unchanged
        assert [type(v) for v in params.to_wire().values()] == [
            type(v) for v in plain.to_wire().values()]
    assert BatchPlan(100, got[0]).batches_per_epoch == 7
    assert PlanParams(batch_size=8, drop_last=np.True_).drop_last is True
    with pytest.raises(InvalidArgument, match="batch_size must be an int >= 1"):
        PlanParams(batch_size=np_int(0))
