"""Balanced and weighted sampling: still a pure function of (data, parameters, seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_server

from batchfeed import Client, InvalidArgument, InvalidRequest
from batchfeed.shared.plan import BatchPlan, PlanParams

N = 1003


def imbalanced(n: int = N) -> dict[str, np.ndarray]:
    """Class 0: 80%, class 1: ~20%, class 2: 5 rows, class 3: a single row."""
    rng = np.random.default_rng(0)
    y = np.zeros(n, np.int64)
    y[rng.choice(n, n // 5, replace=False)] = 1
    rest = np.flatnonzero(y == 0)
    y[rest[:5]] = 2
    y[rest[5]] = 3
    return {"id": np.arange(n), "y": y, "w": rng.random(n).astype(np.float32)}


def plan(columns: dict, **kw: object) -> BatchPlan:
    return BatchPlan(N, PlanParams(**kw), columns=columns, data_key="t")


@pytest.mark.parametrize("batch_size", [8, 10, 64, 100])
def test_balanced_batches_hold_every_class_within_one(batch_size: int) -> None:
    data = imbalanced()
    p = plan(data, batch_size=batch_size, sampling="balanced", label="y", seed=1)
    assert p.batches_per_epoch == -(-N // batch_size)
    for k in range(p.batches_per_epoch):
        counts = np.bincount(data["y"][p.indices(2, k)], minlength=4)
        assert counts.max() - counts.min() <= 1, (k, counts)


def test_balanced_epoch_oversamples_minorities_and_shows_every_row() -> None:
    data = imbalanced()
    p = plan(data, batch_size=32, sampling="balanced", label="y", seed=3)
    rows = np.concatenate([p.indices(0, k) for k in range(p.batches_per_epoch)])
    assert len(rows) == N
    labels = data["y"][rows]
    assert abs(np.bincount(labels).max() - np.bincount(labels).min()) <= 1
    for c in (1, 2, 3):  # every row of each minority class appears
        assert set(np.flatnonzero(data["y"] == c)) <= set(rows.tolist())
    majority = rows[labels == 0]
    assert len(set(majority.tolist())) == len(majority)  # undersampled without repeats


def test_balanced_epoch_rows_and_determinism() -> None:
    data = imbalanced()
    kw = dict(batch_size=50, sampling="balanced", label="y", seed=5, epoch_rows=400)
    a, b = plan(data, **kw), plan(data, **kw)
    assert a.batches_per_epoch == 8
    assert all(np.array_equal(a.indices(1, k), b.indices(1, k)) for k in range(8))
    assert not np.array_equal(a.indices(1, 0), a.indices(2, 0))


def labelled(sizes: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Classes of the given sizes, rows in random order."""
    y = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(seed).shuffle(y)
    return {"id": np.arange(len(y)), "y": y}


def balanced_batches(data: dict, rows: int, epoch: int = 0, **kw: object) -> list[np.ndarray]:
    p = BatchPlan(len(data["y"]), PlanParams(sampling="balanced", label="y", epoch_rows=rows,
                                             **kw), columns=data, data_key="l")
    return [p.indices(epoch, k) for k in range(p.batches_per_epoch)]


# Minority classes about as large as their picks per batch: whole permutations of them start
# inside batches all the time (the first two used to repeat a row in 61 of 640 and 48 of 80
# batches).
REPEAT_CASES = [([5000, 40, 9], 32, 20480), ([3000, 300, 100, 64], 256, 20480),
                ([20000, 37, 11, 8], 32, 20480), ([700, 70, 16, 1], 48, 5000),
                ([50, 7, 6], 19, 3001), ([10, 3], 5, 999)]


@pytest.mark.parametrize("sizes,batch_size,rows", REPEAT_CASES)
def test_balanced_batches_repeat_a_row_only_when_its_class_is_too_small(
        sizes: list[int], batch_size: int, rows: int) -> None:
    data = labelled(sizes)
    batches = balanced_batches(data, rows, batch_size=batch_size, seed=7)
    assert sum(map(len, batches)) == rows
    for k, batch in enumerate(batches):
        labels = data["y"][batch]
        counts = np.bincount(labels, minlength=len(sizes))
        assert counts.max() - counts.min() <= 1, (k, counts)
        for c, size in enumerate(sizes):
            picks = batch[labels == c]
            if len(picks) <= size:  # enough rows: none twice
                assert len(np.unique(picks)) == len(picks), (k, c, np.sort(picks))
    seen = np.bincount(np.concatenate(batches), minlength=sum(sizes))
    for c in range(len(sizes)):  # whole permutations: a class's rows come equally often, +-1
        of_class = seen[data["y"] == c]
        assert of_class.max() - of_class.min() <= 1 and (of_class.min() >= 1 or
                                                          of_class.max() <= 1)


def test_balanced_order_is_deterministic_per_seed_and_epoch() -> None:
    data = labelled([3000, 300, 100, 64])
    kw: dict = dict(batch_size=256, seed=3)
    a = balanced_batches(data, 20480, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, balanced_batches(data, 20480, **kw)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(
        balanced_batches(data, 20480, epoch=1, **kw)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(
        balanced_batches(data, 20480, batch_size=256, seed=4)))


def test_balanced_with_ranks_and_whole_rounds_keeps_every_batch_balanced() -> None:
    """With ranks and drop_last=False the last batches are cut across the order's batches
    unless epoch_rows is a multiple of world_size * batch_size (then every batch is one)."""
    data = labelled([5000, 40, 9])
    world, bs = 4, 32
    for rank in range(world):
        p = BatchPlan(5049, PlanParams(batch_size=bs, sampling="balanced", label="y", seed=2,
                                       rank=rank, world_size=world, epoch_rows=world * bs * 20),
                      columns=data, data_key="l")
        assert p.padded_rows == 0 and p.batches_per_epoch == 20
        for k in range(20):
            labels = data["y"][p.indices(0, k)]
            counts = np.bincount(labels, minlength=3)
            assert counts.max() - counts.min() <= 1
            for c in (0, 1):  # 5000 and 40 rows, 11 picks at most
                picks = p.indices(0, k)[labels == c]
                assert len(np.unique(picks)) == len(picks)


def test_weighted_frequencies_follow_the_weights() -> None:
    from scipy.stats import chisquare

    rng = np.random.default_rng(1)
    w = rng.random(50)
    w[3] = 0.0
    data = {"w": w}
    rows = 200_000
    p = BatchPlan(50, PlanParams(batch_size=1000, sampling="weighted", weights="w", seed=7,
                                 epoch_rows=rows), columns=data, data_key="w")
    drawn = np.concatenate([p.indices(0, k) for k in range(p.batches_per_epoch)])
    counts = np.bincount(drawn, minlength=50)
    assert counts[3] == 0
    expected = w / w.sum() * rows
    keep = expected > 0
    assert chisquare(counts[keep], expected[keep]).pvalue > 0.001


@pytest.mark.parametrize("sampling,extra", [("balanced", dict(label="y")),
                                            ("weighted", dict(weights="w"))])
def test_sampling_with_ranks_drop_last_and_start_batch(sampling: str, extra: dict) -> None:
    data = imbalanced()
    kw = dict(batch_size=30, sampling=sampling, seed=2, drop_last=True, **extra)
    single = plan(data, **kw)
    ranks = [plan(data, rank=r, world_size=3, **kw) for r in range(3)]
    assert len({r.batches_per_epoch for r in ranks}) == 1
    for r, rp in enumerate(ranks):  # each rank's batches are the plan's, disjoint by position
        for k in range(rp.batches_per_epoch):
            assert np.array_equal(rp.indices(0, k), single.indices(0, 3 * k + r))
            assert len(rp.indices(0, k)) == 30


@pytest.mark.parametrize("kwargs,words", [
    (dict(sampling="stratified"), "sampling must be one of"),
    (dict(sampling="balanced"), "needs label=FIELD"),
    (dict(sampling="weighted"), "needs weights=FIELD"),
    (dict(label="y"), "label= goes with sampling='balanced'"),
    (dict(sampling="balanced", label="y", shuffle="none"), "shuffles by itself"),
    (dict(epoch_rows=10), "epoch_rows= goes with"),
    (dict(sampling="weighted", weights="w", epoch_rows=0), "epoch_rows must be"),
])
def test_bad_sampling_parameters(kwargs: dict, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        PlanParams(batch_size=8, **kwargs)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from shared_server(tmp_path_factory, "--workers", 2, arrays=imbalanced())


def test_balanced_batches_from_the_server(server) -> None:
    data = imbalanced()
    with Client(server.address, batch_size=16, sampling="balanced", label="y", seed=4) as c:
        seen = []
        for batch in c.epoch(0):
            counts = np.bincount(batch["y"], minlength=4)
            assert counts.max() - counts.min() <= 1
            assert np.array_equal(batch["y"], data["y"][batch["id"]])
            seen.append(batch["id"].copy())
        rows = np.concatenate(seen)
        assert set(np.flatnonzero(data["y"] == 3)) <= set(rows.tolist())
        resumed = [b["id"].copy() for b in c.epoch(0, start_batch=10)]
        assert all(np.array_equal(a, b) for a, b in zip(seen[10:], resumed))


def test_weighted_sampling_from_the_server(server) -> None:
    with Client(server.address, batch_size=100, sampling="weighted", weights="w", seed=1,
                epoch_rows=5000) as c:
        assert c.batches_per_epoch == 50
        rows = np.concatenate([b["id"].copy() for b in c.epoch(0)])
        assert len(rows) == 5000


@pytest.mark.parametrize("kwargs,words", [
    (dict(sampling="balanced", label="nope"), "has no field 'nope'"),
    (dict(sampling="balanced", label="w"), "must hold one integer per row"),
    (dict(sampling="weighted", weights="img"), "has no field 'img'"),
])
def test_the_server_checks_the_sampling_fields(server, kwargs: dict, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        Client(server.address, batch_size=10, **kwargs)


def test_weights_must_be_finite_non_negative_with_a_positive_sum() -> None:
    from batchfeed.shared.plan import check_weights

    for bad in ([1.0, -0.5], [0.0, 0.0], [1.0, np.nan], [np.inf, 1.0]):
        with pytest.raises(InvalidRequest, match="finite and non-negative"):
            check_weights(np.array(bad), "w")


def test_arrays_saved_without_names_get_one_warning_at_start(serve, tmp_path) -> None:
    path = tmp_path / "unnamed.npz"
    np.savez(path, np.arange(100.0), np.arange(100))  # fields arr_0 and arr_1
    srv = serve("--data", path, "--workers", 1)
    warned = [line for line in srv.output if "np.savez" in line]
    assert len(warned) == 1, srv.output
    assert "WARNING" in warned[0] and "arr_0, arr_1" in warned[0]
    assert "np.savez(path, x=X, y=y)" in warned[0]
    with Client(srv.address, batch_size=10) as c:  # served all the same
        assert sorted(next(iter(c.epoch(0)))) == ["arr_0", "arr_1"]


def test_named_arrays_get_no_warning(server) -> None:
    assert not [line for line in server.output if "WARNING" in line], server.output
