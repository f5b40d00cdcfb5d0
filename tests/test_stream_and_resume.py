"""Training loops that count steps, and resumed runs that must not replay an epoch (issue 21).

- ``client.stream()`` is one endless iterator across epochs: it yields what ``epoch(0)``,
  ``epoch(1)``, ... would, and ``state_dict()`` taken anywhere in it resumes with exactly the
  next batch (also at an epoch's end);
- a BatchfeedDataset pass that starts before the epoch of a state loaded with
  ``load_state_dict()`` warns, naming both epochs; ``set_epoch`` (the one line a resumed
  pytorch/examples loop needs) starts the right epoch;
- HF Trainer's pieces: ``collate_batches`` unwraps one batch and refuses several,
  ``causal_lm_inputs`` leaves padding and document boundaries out of the labels.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import shared_server

from batchfeed import Client, InvalidArgument, IteratorSuperseded

N, BS = 1003, 100  # 11 batches an epoch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from shared_server(tmp_path_factory, "--workers", 1, n=N)


def ids(batches) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


def test_a_stream_runs_on_across_epochs_as_epoch_after_epoch_would(server) -> None:
    with Client(server.address, batch_size=BS, seed=5) as client:
        expected = ids(client.epoch(0)) + ids(client.epoch(1)) + ids(client.epoch(2))
    with Client(server.address, batch_size=BS, seed=5) as client:
        stream = client.stream()
        got = [next(stream)["id"].tolist() for _ in range(33)]
        assert (stream.epoch, stream.next_batch) == (3, 0)
    assert got == expected and len({tuple(sorted(sum(got[i:i + 11], []))) for i in
                                    (0, 11, 22)}) == 1  # each epoch every row once


@pytest.mark.parametrize("taken_after", [4, 11, 15])  # mid-epoch, at an epoch's end, later
def test_a_state_taken_mid_stream_resumes_with_exactly_the_next_batch(server,
                                                                     taken_after) -> None:
    with Client(server.address, batch_size=BS, seed=2) as client:
        stream = client.stream(format="numpy")
        whole = [next(stream)["id"].tolist() for _ in range(26)]
    with Client(server.address, batch_size=BS, seed=2) as client:
        stream = client.stream()
        for _ in range(taken_after):
            next(stream)
        state = client.state_dict()
    with Client.from_state_dict(server.address, state) as resumed:
        stream = resumed.stream(state["epoch"], state["next_batch"])
        rest = [next(stream)["id"].tolist() for _ in range(26 - taken_after)]
    assert rest == whole[taken_after:]


def test_a_stream_is_replaced_by_a_newer_iterator(server) -> None:
    with Client(server.address, batch_size=BS) as client:
        stream = client.stream(start_epoch=1, start_batch=10)
        next(stream)  # the last batch of epoch 1
        client.epoch(5)
        with pytest.raises(IteratorSuperseded, match="replaced this stream"):
            next(stream)
        with pytest.raises(InvalidArgument, match="format must be one of"):
            client.stream(format="tensorflow")


torch = pytest.importorskip("torch", reason="BatchfeedDataset is a torch IterableDataset")


def test_a_pass_before_a_loaded_states_epoch_warns_and_set_epoch_fixes_it(server) -> None:
    from batchfeed import BatchfeedDataset

    with BatchfeedDataset(server.address, batch_size=BS, seed=1, epoch=3) as trained:
        it = iter(trained)
        next(it)
        state = trained.state_dict()
        rest_of_3 = [b["id"].tolist() for b in it]
    assert (state["epoch"], state["next_batch"]) == (3, 1)
    with BatchfeedDataset(server.address, batch_size=BS, seed=1) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # a loop that counts from 0 again
        with pytest.warns(RuntimeWarning, match=r"this pass reads epoch 0, but the state "
                          r"loaded with load_state_dict\(\) was taken in epoch 3 \(at batch "
                          r"1\).*set_epoch\(epoch\)"):
            iter(resumed)
    with BatchfeedDataset(server.address, batch_size=BS, seed=1) as resumed, \
            warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state)
        assert [b["id"].tolist() for b in resumed] == rest_of_3  # where the state was taken
    with BatchfeedDataset(server.address, batch_size=BS, seed=1) as fresh, \
            BatchfeedDataset(server.address, batch_size=BS, seed=1, epoch=3) as reference:
        fresh.set_epoch(3)  # the one line a resumed pytorch/examples loop needs
        assert ids(fresh) == ids(reference)


def test_collate_batches_unwraps_one_batch_and_refuses_several() -> None:
    from batchfeed.client.torch_data import collate_batches

    batch = {"x": torch.arange(6).reshape(3, 2)}
    assert collate_batches([batch]) == batch and type(collate_batches([batch])) is dict
    with pytest.raises(InvalidArgument, match="per_device_train_batch_size=1"):
        collate_batches([batch, batch])


def test_causal_lm_labels_leave_out_padding_and_document_boundaries() -> None:
    from batchfeed.client.torch_data import causal_lm_inputs

    tokens = torch.tensor([[10, 11, 20, 21, 22, 0], [30, 31, 32, 33, 40, 41]], dtype=torch.int32)
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2]], dtype=torch.int32)
    out = causal_lm_inputs({"tokens": tokens, "tokens_segment_ids": seg,
                            "tokens_positions": torch.zeros_like(seg)})
    assert out["input_ids"].dtype == torch.int64 and torch.equal(out["input_ids"],
                                                                 tokens.long())
    assert out["labels"].tolist() == [[10, 11, -100, 21, 22, -100],
                                      [30, 31, 32, 33, -100, 41]]
    with pytest.raises(InvalidArgument, match="needs packed rows"):
        causal_lm_inputs({"x": np.zeros(3)})
