"""Real training loops get what they expect from ``BatchfeedDataset`` and ``Client``.

Lightning and Keras start a pass per epoch and may stop one early (``limit_train_batches``,
``steps_per_epoch``, ``break``); DDP calls ``set_epoch``; torchdata's StatefulDataLoader
checkpoints mid-epoch; ``for data, target in loader`` unpacks tuples; spawned processes pickle
the dataset.  And a client serves one iterator at a time: a replaced one raises at once.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import threading
import time

import pytest
from conftest import shared_server, wait_until

from batchfeed import Client, InvalidArgument, InvalidRequest, IteratorSuperseded
from batchfeed.shared.plan import BatchPlan, PlanParams

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from batchfeed.client.torch_data import BatchfeedDataset  # noqa: E402

N = 1003
BS = 100  # 11 batches per epoch, the last of 3 rows
SEED = 3
BPE = 11


def expected(epoch: int, start: int = 0, **params) -> list[list[int]]:
    """The plan's batches of ``epoch`` from ``start`` on, as lists of row ids."""
    plan = BatchPlan(N, PlanParams(**{"batch_size": BS, "seed": SEED, **params}))
    return [plan.indices(epoch, k).tolist() for k in range(start, plan.batches_per_epoch)]


def ids(batches) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: each test checks its own rows against the plan."""
    yield from shared_server(tmp_path_factory, "--workers", 1, n=N)


@pytest.fixture
def make_dataset(server):
    """BatchfeedDatasets on the server (batch_size=BS, seed=SEED unless told); closed after."""
    made: list[BatchfeedDataset] = []

    def make(**kwargs) -> BatchfeedDataset:
        made.append(BatchfeedDataset(server.address, **{"batch_size": BS, "seed": SEED,
                                                        **kwargs}))
        return made[-1]

    yield make
    for ds in made:
        ds.close()


# ---------------------------------------------------------------------------- epochs


def test_each_pass_is_the_next_epoch_however_the_last_one_ended(make_dataset) -> None:
    loader = DataLoader(make_dataset(), batch_size=None)
    seen = []
    for epoch in range(4):
        batches = []
        for i, batch in enumerate(loader):
            batches.append(batch["id"].tolist())
            if epoch % 2 == 0 and i == 2:
                break  # limit_train_batches=3 / steps_per_epoch=3
        seen.append(batches)
    assert seen == [expected(0)[:3], expected(1), expected(2)[:3], expected(3)]
    # Keras-style: a pass made and dropped after a few steps still counts as an epoch
    assert ids(itertools.islice(loader, 2)) == expected(4)[:2]
    assert ids(loader) == expected(5)


def test_set_epoch_since_the_last_pass_chooses_the_epoch(make_dataset) -> None:
    ds = make_dataset()
    loader = DataLoader(ds, batch_size=None)
    for epoch in (0, 1, 1, 7):  # DistributedSampler-style
        ds.set_epoch(epoch)
        assert ids(loader) == expected(epoch)
    assert ids(loader) == expected(8)  # no set_epoch since: the next one
    ds.set_epoch(2, start_batch=9)
    assert len(loader) == 2 and ids(loader) == expected(2, 9)


def test_ranks_get_disjoint_batches_of_the_same_epoch(make_dataset) -> None:
    ranks = [make_dataset(rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        for ds in ranks:
            ds.set_epoch(epoch)
        got = [ids(DataLoader(ds, batch_size=None)) for ds in ranks]
        bpe = BatchPlan(N, PlanParams(batch_size=BS, rank=0, world_size=2)).batches_per_epoch
        assert len(got[0]) == len(got[1]) == len(ranks[0]) == bpe
        assert got == [expected(epoch, rank=r, world_size=2) for r in (0, 1)]
        batches = [set(map(tuple, g)) for g in got]
        assert not batches[0] & batches[1]


def test_len_is_what_the_next_pass_gives(make_dataset) -> None:
    ds = make_dataset()
    loader = DataLoader(ds, batch_size=None)
    assert len(ds) == len(loader) == BPE
    state = {**ds.state_dict(), "epoch": 1, "next_batch": 5}
    ds.load_state_dict(state)
    assert len(loader) == BPE - 5
    assert ids(loader) == expected(1, 5)
    assert len(loader) == BPE


# ---------------------------------------------------------------------------- checkpoints


STATEFUL_WARNING = "ignore:'set_vital' is deprecated"  # torchdata 0.11 on torch 2.13


@pytest.mark.filterwarnings(STATEFUL_WARNING)
def test_stateful_dataloader_resumes_mid_epoch_row_for_row(make_dataset) -> None:
    tdl = pytest.importorskip("torchdata.stateful_dataloader")
    loader = tdl.StatefulDataLoader(make_dataset(), batch_size=None)
    assert ids(loader) == expected(0)
    it = iter(loader)
    first = ids(itertools.islice(it, 5))
    state = loader.state_dict()
    json.dumps(state)  # plain data
    rest = ids(it)
    assert first + rest == expected(1)
    after = ids(loader)
    assert after == expected(2)

    resumed = tdl.StatefulDataLoader(make_dataset(), batch_size=None)
    resumed.load_state_dict(state)  # (the dataset gets it at the next iter())
    assert ids(resumed) == rest
    assert ids(resumed) == after


@pytest.mark.filterwarnings(STATEFUL_WARNING)
def test_stateful_dataloader_state_at_an_epochs_end_resumes_with_the_next(make_dataset) -> None:
    tdl = pytest.importorskip("torchdata.stateful_dataloader")
    loader = tdl.StatefulDataLoader(make_dataset(), batch_size=None)
    for _ in range(2):
        list(loader)
    state = loader.state_dict()
    resumed = tdl.StatefulDataLoader(make_dataset(), batch_size=None)
    resumed.load_state_dict(state)
    assert ids(resumed) == expected(2)


def test_a_state_is_the_clients_and_resumes_a_client(make_dataset, server) -> None:
    ds = make_dataset()
    it = iter(DataLoader(ds, batch_size=None))
    for _ in range(4):
        next(it)
    state = ds.state_dict()
    assert (state["epoch"], state["next_batch"], state["rows"]) == (0, 4, N)
    with Client.from_state_dict(server.address, state) as client:
        assert ids(client.epoch(state["epoch"], state["next_batch"])) == expected(0, 4)


def test_a_state_of_other_parameters_or_data_is_refused(make_dataset) -> None:
    state = make_dataset().state_dict()
    with pytest.raises(InvalidArgument, match=r"taken with seed=3, .* has seed=4"):
        make_dataset(seed=4).load_state_dict(state)
    with pytest.raises(InvalidArgument, match="not a batchfeed state"):
        make_dataset().load_state_dict({"epoch": 1})
    bigger = {**state, "rows": N + 1}
    connected = make_dataset()
    len(connected)
    with pytest.raises(InvalidRequest, match="1,004 rows"):
        connected.load_state_dict(bigger)
    fresh = make_dataset()
    fresh.load_state_dict(bigger)  # not connected: checked on connecting
    with pytest.raises(InvalidRequest, match="1,004 rows"):
        iter(fresh)


# ---------------------------------------------------------------------------- shapes of batches


def test_as_tuple_unpacks_fields_in_order(make_dataset) -> None:
    loader = DataLoader(make_dataset(as_tuple=("x", "id")), batch_size=None)
    rows = []
    for data, target in loader:
        assert data.shape == (len(target), 3)
        assert torch.equal(data[:, 0], target.float())
        rows.append(target.tolist())
    assert rows == expected(0)
    with pytest.raises(InvalidArgument, match="as_tuple names .z., but the batches have: "):
        iter(make_dataset(as_tuple=("x", "z")))
    with pytest.raises(TypeError, match="as_tuple must be a sequence of field names"):
        make_dataset(as_tuple="x")


def test_pickles_before_and_after_connecting(make_dataset) -> None:
    ds = make_dataset()
    before = pickle.loads(pickle.dumps(ds))
    assert before._client is None
    loader = DataLoader(ds, batch_size=None)
    assert ids(loader) == expected(0)
    it = iter(loader)
    next(it)
    blob = pickle.dumps(ds)  # connected, in the middle of a pass
    assert b"zmq" not in blob and b"_thread" not in blob and b"socket" not in blob
    copy = pickle.loads(blob)
    try:
        assert copy._client is None and copy._pass is None  # connects on first use
        assert ids(DataLoader(copy, batch_size=None)) == expected(2)  # where ds goes next
        assert ids(DataLoader(before, batch_size=None)) == expected(0)
    finally:
        copy.close()
        before.close()
    assert ids(it) == expected(1)[1:]  # the original went on undisturbed


# ---------------------------------------------------------------------------- one iterator


def test_a_superseded_iterator_raises_at_once_and_the_new_one_is_exact(server) -> None:
    with Client(server.address, batch_size=BS, seed=SEED) as client:
        old = client.epoch(2)
        next(old), next(old)
        new = client.epoch(3)
        with pytest.raises(IteratorSuperseded,
                           match="epoch 3 from batch 0 replaced this iterator over epoch 2"):
            next(old)
        with pytest.raises(IteratorSuperseded):
            next(old)  # and it stays so
        assert ids(new) == expected(3)
        # replaced at exactly where it was: the new iterator still gets every batch
        old = client.epoch(1)
        first = ids(itertools.islice(old, 4))
        new = client.epoch(1, 4)
        with pytest.raises(IteratorSuperseded, match="over epoch 1 .which was at batch 4"):
            next(old)
        assert first + ids(new) == expected(1)
        # read to its end, an iterator is not replaced: the next epoch continues its stream
        assert ids(client.epoch(2)) == expected(2)


def test_a_thread_blocked_in_a_superseded_next_gets_the_error_at_once(server) -> None:
    with Client(server.address, batch_size=BS, seed=SEED, prefetch=2) as client:
        old = client.epoch(0)
        next(old)
        outcome: dict = {}

        def read_on() -> None:
            try:
                for _ in old:
                    pass
                outcome["end"] = time.monotonic()
            except BaseException as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

        os.kill(server.pid, signal.SIGSTOP)  # no batch comes while it is stopped
        try:
            reader = threading.Thread(target=read_on, daemon=True)
            reader.start()
            stream = old._stream
            wait_until(lambda: stream.ready.empty() and stream.read >= len(stream.items),
                       what="the reader to take what had arrived and wait")
            time.sleep(0.05)  # (it is blocked now; nothing can arrive)
            assert reader.is_alive() and not outcome
            replaced = time.monotonic()
            new = client.epoch(0)
            reader.join(1.0)
            assert not reader.is_alive(), "the blocked reader was not woken"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert isinstance(outcome.get("error"), IteratorSuperseded), outcome
        assert outcome["at"] - replaced < 1.0
        assert ids(new) == expected(0)


def test_a_second_pass_over_one_dataset_supersedes_the_first(make_dataset) -> None:
    loader = DataLoader(make_dataset(), batch_size=None)
    first = iter(loader)
    next(first)
    second = iter(loader)
    with pytest.raises(IteratorSuperseded,
                       match="epoch 1 from batch 0 replaced this pass over epoch 0"):
        next(first)
    assert ids(second) == expected(1)


# ---------------------------------------------------------------------------- the client


@pytest.mark.parametrize("drop_last", [False, True])
def test_client_says_how_many_rows_are_padded_or_dropped(server, drop_last) -> None:
    params = {"batch_size": 64, "rank": 1, "world_size": 3, "drop_last": drop_last}
    plan = BatchPlan(N, PlanParams(**params))
    with Client(server.address, **params) as client:
        assert client.padded_rows == getattr(plan, "padded_rows", 0)
        assert client.dropped_rows == getattr(plan, "dropped_rows", 0)
        assert client.padded_rows >= 0 and client.dropped_rows >= 0
