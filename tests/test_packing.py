"""Packed rows and token-budget batches: pure functions of (lengths, params, seed, epoch, rows),
checked against the obvious loops."""

from __future__ import annotations

import numpy as np
import pytest

from batchfeed.server.packing import (
    _TAG_BUDGET,
    PackedEpoch,
    PackedRows,
    batch_bounds,
    clip_lengths,
    epoch_batches,
    ragged_lengths,
    token_budget_batches,
)
from batchfeed.shared import orders as plan
from batchfeed.shared.errors import DatasetError, InvalidRequest
from batchfeed.shared.plan import full_order

PAD = -1


def ragged(lengths: np.ndarray, rng: np.random.Generator, dtype: type = np.int32,
           gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ragged field of these lengths with random values (``gap`` unused values up front)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    offsets += gap
    values: np.ndarray = rng.integers(0, 100, int(offsets[-1]), endpoint=True).astype(dtype)
    return values, offsets


def random_lengths(rng: np.random.Generator, n: int, L: int) -> np.ndarray:
    """Mostly short documents, some empty, a few far longer than a row."""
    lengths = rng.integers(0, 2 * L + 3, n)
    lengths[rng.random(n) < 0.2] = 0
    lengths[rng.random(n) < 0.05] = rng.integers(5 * L, 9 * L + 10)
    return lengths


def pack_reference(lengths: np.ndarray, order: np.ndarray, L: int,
                   fields: list[tuple[np.ndarray, np.ndarray]],
                   pads: list[int]) -> list[np.ndarray]:
    """Packing as the obvious loop: rows built token by token; returns fields, segments,
    positions, each (rows, L)."""
    tokens = [(int(d), p) for d in order for p in range(int(lengths[d]))]
    rows = -(-len(tokens) // L)
    out = [np.full((rows, L), pad, dtype=values.dtype) for (values, _), pad in zip(fields, pads)]
    segments = np.zeros((rows, L), dtype=np.int32)
    positions = np.zeros((rows, L), dtype=np.int32)
    for t, (d, p) in enumerate(tokens):
        r, c = divmod(t, L)
        for f, (values, offsets) in enumerate(fields):
            out[f][r, c] = values[offsets[d] + p]
        new_segment = c == 0 or p == 0
        segments[r, c] = 1 if c == 0 else segments[r, c - 1] + new_segment
        positions[r, c] = p
    return [*out, segments, positions]


def flat(rows: PackedRows) -> list[np.ndarray]:
    return [*rows.fields, rows.segment_ids, rows.positions]


def setup(seed: int, L: int, n: int = 60) -> tuple[np.ndarray, np.ndarray, list]:
    rng = np.random.default_rng(seed)
    lengths = random_lengths(rng, n, L)
    order = full_order(n, seed, epoch=1)
    tokens = ragged(lengths, rng)
    mask = ragged(lengths, rng, np.uint8, gap=3)  # aligned, but its own offsets
    return lengths, order, [tokens, mask]


# ---------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("L", [1, 7, 64])
def test_packing_matches_the_token_by_token_loop(seed: int, L: int) -> None:
    lengths, order, fields = setup(seed, L, n=40 if L == 64 else 60)
    packed = PackedEpoch.build(lengths, order, L)
    got = flat(packed.gather(0, packed.rows, fields, pad_value=[PAD, 0]))
    want = pack_reference(lengths, order, L, fields, [PAD, 0])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_a_small_epoch_written_out() -> None:
    lengths = np.array([3, 0, 5, 2])
    values = np.arange(10, dtype=np.int64) * 10  # doc 0: 0 10 20, doc 2: 30..70, doc 3: 80 90
    offsets = np.array([0, 3, 3, 8, 10])
    packed = PackedEpoch.build(lengths, np.array([2, 0, 1, 3]), L=4)
    assert (packed.rows, packed.total_tokens, packed.padding_tokens) == (3, 10, 2)
    rows = packed.gather(0, 3, [(values, offsets)], pad_value=-1)
    assert rows.fields[0].tolist() == [[30, 40, 50, 60], [70, 0, 10, 20], [80, 90, -1, -1]]
    assert rows.segment_ids.tolist() == [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 0, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 3], [4, 0, 1, 2], [0, 1, 0, 0]]


@pytest.mark.parametrize("L", [1, 7, 64])
def test_every_token_exactly_once_per_epoch(L: int) -> None:
    rng = np.random.default_rng(L)
    lengths = random_lengths(rng, 200, L)
    ids = np.arange(int(lengths.sum()), dtype=np.int64)  # each token's value is its own id
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    assert np.array_equal(ragged_lengths(offsets), lengths)
    packed = PackedEpoch.build(ragged_lengths(offsets), full_order(200, 5, 0), L)
    rows = packed.gather(0, packed.rows, [(ids, offsets)], pad_value=-1)
    real = rows.fields[0][rows.segment_ids > 0]
    assert np.array_equal(np.sort(real), ids)
    assert packed.total_tokens == len(ids)


@pytest.mark.parametrize("L", [1, 7, 64])
def test_rows_are_exactly_L_and_only_the_last_is_padded(L: int) -> None:
    rng = np.random.default_rng(L + 1)
    lengths = random_lengths(rng, 150, L)
    tokens = ragged(lengths, rng)
    packed = PackedEpoch.build(lengths, full_order(150, 0, 0), L)
    assert packed.rows == -(-int(lengths.sum()) // L)
    assert packed.padding_tokens == packed.rows * L - packed.total_tokens < L
    rows = packed.gather(0, packed.rows, [tokens])
    assert rows.fields[0].shape == rows.segment_ids.shape == rows.positions.shape == (
        packed.rows, L)
    padding = rows.segment_ids == 0
    assert not padding[:-1].any()
    assert padding[-1].sum() == packed.padding_tokens
    assert np.all(rows.segment_ids[:, 0] == 1)


def test_rows_are_the_same_every_epoch_for_a_permutation() -> None:
    lengths = random_lengths(np.random.default_rng(0), 300, 64)
    counts = {PackedEpoch.build(lengths, full_order(300, 0, e), 64).rows for e in range(5)}
    assert len(counts) == 1


@pytest.mark.parametrize("L", [1, 7, 64])
def test_gather_can_be_cut_anywhere(L: int) -> None:
    lengths, order, fields = setup(7, L, n=50)
    packed = PackedEpoch.build(lengths, order, L)
    rng = np.random.default_rng(L)
    for _ in range(20):
        a, m, b = np.sort(rng.integers(0, packed.rows + 1, 3))
        whole = flat(packed.gather(a, b, fields))
        parts = zip(flat(packed.gather(a, m, fields)), flat(packed.gather(m, b, fields)))
        for w, (left, right) in zip(whole, parts):
            np.testing.assert_array_equal(w, np.concatenate([left, right]))


def test_a_document_spanning_rows_continues_its_positions() -> None:
    lengths = np.array([10])
    tokens = (np.arange(10, dtype=np.int32), np.array([0, 10]))
    rows = PackedEpoch.build(lengths, np.array([0]), L=4).gather(0, 3, [tokens])
    assert rows.positions.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert rows.segment_ids.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_empty_documents_are_skipped() -> None:
    lengths = np.array([0, 2, 0, 0, 3, 0])
    tokens = (np.array([1, 2, 3, 4, 5], dtype=np.int32), np.array([0, 0, 2, 2, 2, 5, 5]))
    packed = PackedEpoch.build(lengths, np.arange(6), L=3)
    assert packed.docs.tolist() == [1, 4]
    rows = packed.gather(0, packed.rows, [tokens])
    assert rows.fields[0].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert rows.segment_ids.tolist() == [[1, 1, 2], [1, 1, 0]]


def test_an_epoch_of_empty_documents_has_no_rows() -> None:
    packed = PackedEpoch.build(np.zeros(5, dtype=np.int64), np.arange(5), L=8)
    assert (packed.rows, packed.total_tokens, packed.padding_tokens) == (0, 0, 0)
    rows = packed.gather(0, 0, [(np.zeros(0, np.int32), np.zeros(6, np.int64))])
    assert rows.fields[0].shape == rows.segment_ids.shape == (0, 8)


def test_rows_out_of_range_or_a_bad_row_length_are_refused() -> None:
    lengths, order, fields = setup(0, 7)
    packed = PackedEpoch.build(lengths, order, 7)
    for r0, r1 in [(-1, 2), (3, 2), (0, packed.rows + 1)]:
        with pytest.raises(InvalidRequest, match="out of range"):
            packed.gather(r0, r1, fields)
    with pytest.raises(InvalidRequest, match="L must be"):
        PackedEpoch.build(lengths, order, 0)
    with pytest.raises(InvalidRequest, match="outside"):
        PackedEpoch.build(lengths, np.array([0, len(lengths)]), 7)


def test_a_field_not_aligned_with_the_lengths_is_refused() -> None:
    lengths, order, fields = setup(0, 7)
    packed = PackedEpoch.build(lengths, order, 7)
    values, offsets = fields[0]
    shifted = offsets.copy()
    shifted[1:] += 1  # document 0 is one token longer in this field
    shifted[-1] -= 1  # ... and the last one shorter
    with pytest.raises(DatasetError, match="not aligned"):
        packed.gather(0, packed.rows, [(values, shifted)])
    with pytest.raises(DatasetError, match="offsets"):
        packed.gather(0, 1, [(values, offsets[:-1])])
    with pytest.raises(InvalidRequest, match="does not fit"):
        packed.gather(0, packed.rows, [fields[1]], pad_value=-1)  # uint8 cannot hold -1


# ---------------------------------------------------------------------------------------------
# Token-budget batches


def budget_reference(lengths: np.ndarray, max_tokens: int, seed: int, epoch: int,
                     max_length: int | None = None) -> list[list[int]]:
    """fairseq's scheme as the obvious loops: permute, stable-sort by length, grow batches one
    document at a time, shuffle the batches."""
    clipped = [min(int(x), max_length or int(x)) for x in lengths]
    rng = np.random.default_rng([seed, epoch, _TAG_BUDGET])
    shuffled = rng.permutation(len(lengths)).tolist()
    ordered = sorted(shuffled, key=lambda d: clipped[d])  # sorted() is stable
    batches: list[list[int]] = []
    for d in ordered:
        batch = batches[-1] if batches else []
        if not batch or (len(batch) + 1) * max(clipped[d], *(clipped[x] for x in batch)) \
                > max_tokens:
            batches.append([d])
        else:
            batch.append(d)
    return [batches[b] for b in rng.permutation(len(batches))]


CASES = [  # (n, max length drawn, max_tokens, max_length)
    (300, 200, 512, None), (300, 1000, 512, 300), (200, 40, 40, None), (50, 3, 1, 1),
    (500, 60, 1000, None), (1, 5, 5, None), (0, 1, 8, None),
]


@pytest.mark.parametrize("n,high,max_tokens,max_length", CASES)
@pytest.mark.parametrize("seed", [0, 3])
def test_token_budget_matches_the_greedy_loop(n: int, high: int, max_tokens: int,
                                              max_length: int | None, seed: int) -> None:
    lengths = np.random.default_rng(seed).integers(0, high, n, endpoint=True)
    for epoch in (0, 1):
        got = token_budget_batches(lengths, max_tokens, seed, epoch, max_length)
        assert [b.tolist() for b in got] == budget_reference(lengths, max_tokens, seed, epoch,
                                                             max_length)


def budget_case(seed: int = 0, n: int = 2000) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 700, n)


def test_every_document_exactly_once_per_epoch() -> None:
    lengths = budget_case()
    for epoch in range(3):
        docs = np.concatenate(token_budget_batches(lengths, 1024, 5, epoch, max_length=512))
        assert np.array_equal(np.sort(docs), np.arange(len(lengths)))


@pytest.mark.parametrize("max_tokens,max_length", [(700, None), (1024, 512), (4096, None)])
def test_every_batch_fits_the_token_budget(max_tokens: int, max_length: int | None) -> None:
    lengths = budget_case(1)
    clipped = lengths if max_length is None else np.minimum(lengths, max_length)
    for batch in token_budget_batches(lengths, max_tokens, 0, 0, max_length):
        assert len(batch) >= 1 and len(batch) * clipped[batch].max() <= max_tokens


def test_deterministic_per_seed_and_epoch_different_across_epochs() -> None:
    lengths = budget_case()

    def batches(seed: int, epoch: int) -> list[list[int]]:
        return [b.tolist() for b in token_budget_batches(lengths, 2048, seed, epoch)]

    assert batches(1, 2) == batches(1, 2)
    assert batches(1, 2) != batches(1, 3)
    assert batches(1, 2) != batches(2, 2)


def test_batch_count_and_sizes_are_fixed_and_known_up_front() -> None:
    lengths = budget_case()
    starts = batch_bounds(np.sort(clip_lengths(lengths, 2048)), 2048)
    for epoch in range(4):
        batches = token_budget_batches(lengths, 2048, 9, epoch)
        assert len(batches) == len(starts) - 1
        assert sorted(map(len, batches)) == sorted(np.diff(starts).tolist())


def test_equal_lengths_come_in_a_new_order_each_epoch() -> None:
    lengths = np.full(100, 8)
    orders = [epoch_batches(lengths, np.array([0, 100]), 0, e)[0].tolist() for e in range(3)]
    assert len({tuple(o) for o in orders}) == 3
    assert all(sorted(o) == list(range(100)) for o in orders)


def test_epoch_batches_reads_batch_k_from_the_cached_bounds() -> None:
    lengths = budget_case(2)
    starts = batch_bounds(np.sort(clip_lengths(lengths, 1500, 600)), 1500)
    order, batch_perm = epoch_batches(lengths, starts, 4, 1, max_length=600)
    want = token_budget_batches(lengths, 1500, 4, 1, max_length=600)
    for k, batch in enumerate(want):
        b = batch_perm[k]
        assert np.array_equal(order[starts[b] : starts[b + 1]], batch)
    assert sorted(batch_perm.tolist()) == list(range(len(starts) - 1))


def test_a_document_over_the_budget_says_what_to_do() -> None:
    lengths = np.array([10, 5000, 20])
    with pytest.raises(InvalidRequest, match="document 1 has 5000 tokens.*max_length.*max_tokens"):
        token_budget_batches(lengths, 4096, 0, 0)
    with pytest.raises(InvalidRequest, match="after clipping to max_length=4097"):
        token_budget_batches(lengths, 4096, 0, 0, max_length=4097)
    assert len(np.concatenate(token_budget_batches(lengths, 4096, 0, 0, max_length=4096))) == 3


def test_bad_budget_parameters_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="max_tokens"):
        token_budget_batches(np.array([1, 2]), 0, 0, 0)
    with pytest.raises(InvalidRequest, match=">= 0"):
        token_budget_batches(np.array([1, -2]), 8, 0, 0)
    with pytest.raises(InvalidRequest, match="sorted"):
        batch_bounds(np.array([3, 1]), 8)
    with pytest.raises(InvalidRequest, match="starts"):
        epoch_batches(np.array([1, 2, 3]), np.array([0, 2]), 0, 0)


def test_the_budget_stream_is_apart_from_the_plan_streams() -> None:
    tags = {getattr(plan, name) for name in dir(plan) if name.startswith("_TAG_")}
    assert tags and _TAG_BUDGET not in tags


def test_numpy_integers_count_as_ints_and_bools_do_not() -> None:
    lengths = budget_case(n=50)
    plain = token_budget_batches(lengths, 1024, 3, 1, max_length=600)
    numpy = token_budget_batches(lengths, np.int64(1024), np.uint32(3), np.int32(1),
                                 max_length=np.int16(600))
    assert [b.tolist() for b in plain] == [b.tolist() for b in numpy]
    assert PackedEpoch.build(lengths, np.arange(50), np.int64(16)).row_length == 16
    with pytest.raises(InvalidRequest, match="max_tokens"):
        token_budget_batches(lengths, True, 0, 0)


def test_out_arrays_are_filled_whole_and_checked() -> None:
    rng = np.random.default_rng(12)
    lengths = random_lengths(rng, 300, L=16)
    fields = [ragged(lengths, rng), ragged(lengths, rng, np.uint8)]
    fields[1] = (fields[1][0], fields[0][1])  # aligned: one offsets array
    packed = PackedEpoch.build(lengths, rng.permutation(300), L=16)
    r0, r1 = packed.rows - 5, packed.rows  # ends with the epoch's padded row
    want = packed.gather(r0, r1, fields, pad_value=[PAD, 7])
    garbage = [np.full((5, 16), 99, np.int32), np.full((5, 16), 99, np.uint8)]
    out = PackedRows(garbage, np.full((5, 16), 99, np.int32), np.full((5, 16), 99, np.int32))
    assert packed.gather(r0, r1, fields, pad_value=[PAD, 7], out=out) is out
    assert all(np.array_equal(a, b) for a, b in zip(flat(out), flat(want)))
    wrong = PackedRows([np.zeros((5, 16), np.int64), garbage[1]], out.segment_ids, out.positions)
    with pytest.raises(InvalidRequest, match="out must hold"):
        packed.gather(r0, r1, fields, out=wrong)


@pytest.mark.parametrize("world_size,fits", [(1, None), (3, None), (3, 3)])
def test_a_server_writes_packed_rows_straight_into_its_slot(world_size: int, fits: int | None,
                                                            monkeypatch) -> None:
    """The worker's path (every output in one pass, in the slot, in blocks of rows) against
    fresh arrays, for ranks whose last batch wraps to the epoch's first rows and for a slot too
    small for the chunk."""
    from batchfeed.server import unit_batches
    from batchfeed.server.layout import ALIGN, RaggedFormat, write_outputs
    from batchfeed.server.unit_batches import packed_batches, packed_outputs

    monkeypatch.setattr(unit_batches, "_GATHER_TOKENS", 3 * 32)  # blocks of 3 rows: cut every batch
    from batchfeed.server.plan_units import plan_units
    from batchfeed.shared.plan import BatchPlan, PlanParams
    from batchfeed.shared.schema import Ragged

    rng = np.random.default_rng(5)
    lengths = random_lengths(rng, 400, L=32)
    values, offsets = ragged(lengths, rng)
    columns = {"tokens": Ragged(values, offsets),
               "mask": Ragged((values % 2).astype(np.int8), offsets)}
    params = PlanParams(batch_size=4, seed=3, pack=("tokens", "mask"), pack_length=32,
                        rank=world_size - 1, world_size=world_size, pad_value=-1)
    plan = BatchPlan(400, params, columns=columns, data_key="t",
                     units=plan_units(params, columns, "t", []))
    fmt = RaggedFormat.of(plan)
    k0, count = 1, plan.batches_per_epoch - 1
    batch_bytes = 4 * 32 * (4 + 1 + 4 + 4)  # tokens, mask, segment ids, positions
    slot = np.zeros((fits or count) * batch_bytes + 4 * ALIGN, np.uint8)
    outputs, fill = packed_outputs(plan, columns, 1, k0, count, fmt)
    dtypes, shapes, where, sizes = write_outputs(outputs, count, slot, "test", fill)
    want = packed_batches(plan, columns, 1, k0, len(shapes), fmt)
    assert [d[0] for d in dtypes] == ["tokens", "mask", "tokens_segment_ids", "tokens_positions"]
    assert len(shapes) == (fits or count)
    for i, (name, dtype) in enumerate(dtypes):
        got = slot[where[i] : where[i] + sizes[i]].view(dtype)
        expected = np.concatenate([b[name].reshape(-1) for b in want])
        assert np.array_equal(got, expected), name
