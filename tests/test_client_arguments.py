"""Client and BatchfeedDataset take the same arguments, through one conversion (``plan_params``),
and refuse bad ones where they are given (issue 21).

- every keyword of ``Client`` goes through ``BatchfeedDataset`` to the same plan, the same
  connection settings and the same batches (``pack={"tokens": L}`` and ``max_tokens=`` with
  ``batch_size`` unset or None among them: the dataset used to refuse both);
- a bad argument is an ``InvalidArgument`` (a ValueError; ``InvalidArgumentType``, also a
  TypeError, for a wrong type or an unknown keyword), raised before any server is asked;
  ``InvalidRequest`` stays what the server refuses;
- ``from batchfeed import BatchfeedDataset`` works, and only it imports torch.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import batchfeed
from batchfeed import Client, InvalidArgument, InvalidArgumentType, InvalidRequest
from batchfeed.shared.curve_keys import make_keys

torch = pytest.importorskip("torch", reason="BatchfeedDataset is a torch IterableDataset")

from batchfeed.client.torch_data import BatchfeedDataset  # noqa: E402

DOCS = 60


def corpus() -> dict:
    rng = np.random.default_rng(0)
    return {"id": np.arange(DOCS),
            "tokens": [rng.integers(0, 1000, int(n)).astype(np.int32)
                       for n in rng.integers(1, 21, DOCS)],
            "label": np.arange(DOCS) % 3,
            "w": np.linspace(0.5, 1.5, DOCS)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    make_keys(str(path))
    return path


@pytest.fixture(scope="module")
def server(keys):
    """A CURVE server (so that ``curve=`` is passed too) of documents with a label and
    weights, on loopback tcp."""
    with batchfeed.serve(corpus(), name="docs", workers=1, bind="tcp://127.0.0.1:0",
                         curve_secret_key=str(keys / "server.key_secret"),
                         authorized_keys=str(keys / "authorized")) as srv:
        yield srv


# Each keyword of Client with a value other than its default, in combinations a plan accepts.
COMBINATIONS = [
    dict(batch_size=4, shuffle="buffer", buffer_size=7, seed=3, drop_last=True, rank=1,
         world_size=2, prefetch=4, dataset="docs", fastpath=False, connect_timeout=9.0,
         reconnect_timeout=30.0, heartbeat_timeout=4.0, name="every-keyword", ragged="flat",
         pad_value=-1, max_length=5),
    dict(batch_size=6, sampling="balanced", label="label", epoch_rows=24, seed=1),
    dict(batch_size=6, sampling="weighted", weights="w", epoch_rows=24, shuffle=True),
    dict(batch_size=2, pack={"tokens": 16}),
    dict(batch_size=2, pack=("tokens",), pack_length=16),  # the form a state holds
    dict(max_tokens=64, token_field="tokens"),
    dict(batch_size=None, max_tokens=64),
]


def test_the_combinations_pass_every_keyword_of_client() -> None:
    given = set().union(*COMBINATIONS) | {"address", "curve"}
    assert given == set(inspect.signature(Client).parameters)


def batches_of(it) -> list[dict]:
    return [{k: np.asarray(v).copy() for k, v in batch.items()} for batch in it]


@pytest.mark.parametrize("kwargs", COMBINATIONS, ids=lambda kw: ",".join(kw))
def test_every_client_keyword_works_the_same_through_the_dataset(server, keys, kwargs) -> None:
    curve = (keys / "client.key_secret", keys / "server.key")
    with Client(server.address, curve=curve, **kwargs) as client, \
            BatchfeedDataset(server.address, curve=curve, **kwargs) as dataset:
        assert dataset.params == client.params  # one conversion
        assert dataset.client._live.config == client._live.config  # every connection setting
        expected = batches_of(client.epoch(0, format="torch"))
        got = batches_of(dataset)
    assert [sorted(b) for b in got] == [sorted(b) for b in expected] and got
    for g, e in zip(got, expected):
        assert all(np.array_equal(g[k], e[k]) for k in e)


def test_packed_rows_and_token_budgets_through_the_dataset(server, keys) -> None:
    curve = (keys / "client.key_secret", keys / "server.key")
    with BatchfeedDataset(server.address, curve=curve, batch_size=2,
                          pack={"tokens": 16}) as packed:
        first = next(iter(packed))
        assert first["tokens"].shape == (2, 16)
        assert set(first) >= {"tokens", "tokens_segment_ids", "tokens_positions"}
        assert packed.params.pack == ("tokens",) and packed.params.pack_length == 16
    for budget in ({"max_tokens": 64}, {"max_tokens": 64, "batch_size": None}):
        with BatchfeedDataset(server.address, curve=curve, **budget) as dataset:
            batches = list(dataset)
            assert len(batches) == len(dataset.client.epoch(0)) > 1
            assert all(b["tokens"].numel() <= 64 for b in batches)
            assert sorted(torch.cat([b["id"] for b in batches]).tolist()) == list(range(DOCS))


def test_bad_arguments_are_refused_where_they_are_given(server) -> None:
    for make in (Client, BatchfeedDataset):
        with pytest.raises(InvalidArgument, match=r"batch_size= is needed \(or max_tokens="):
            make(server.address)
        with pytest.raises(InvalidArgument, match="pack= packs aligned fields into rows of one"):
            make(server.address, batch_size=2, pack={"tokens": 16, "mask": 8})
        with pytest.raises(InvalidArgumentType, match=r"e.g. pack=\{'tokens': 2048\}"):
            make(server.address, batch_size=2, pack="tokens")
        with pytest.raises(InvalidArgument, match="max_tokens= replaces batch_size"):
            make(server.address, batch_size=8, max_tokens=64)
        with pytest.raises(InvalidArgument, match="address must be tcp://HOST:PORT"):
            make("localhost:5555", batch_size=8)
        with pytest.raises(TypeError, match="batch_size must be an int"):
            make(server.address, batch_size="8")
    with pytest.raises(InvalidArgumentType, match="BatchfeedDataset takes Client's keywords"):
        BatchfeedDataset(server.address, batch_size=8, batchsize=8)
    with pytest.raises(TypeError, match="batchsize"):
        Client(server.address, batch_size=8, batchsize=8)


def test_client_side_errors_are_value_errors_and_server_refusals_stay_invalid_request(
        server, keys) -> None:
    with pytest.raises(InvalidArgument) as info:
        Client(server.address, batch_size=0)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, InvalidRequest)
    with pytest.raises(InvalidArgumentType) as type_info:
        Client(server.address, batch_size=8, prefetch="4")
    assert isinstance(type_info.value, TypeError) and isinstance(type_info.value, ValueError)
    curve = (keys / "client.key_secret", keys / "server.key")
    with pytest.raises(InvalidRequest, match="unknown dataset 'nope'"):  # the server's refusal
        Client(server.address, batch_size=8, dataset="nope", curve=curve)
    with Client(server.address, batch_size=8, curve=curve) as client:
        with pytest.raises(InvalidArgument, match="start_batch must be in"):
            client.epoch(0, start_batch=10_000)
        with pytest.raises(InvalidArgumentType, match="epoch must be an int"):
            client.epoch("0")
    assert {InvalidArgument, InvalidArgumentType} <= {
        getattr(batchfeed, name) for name in batchfeed.__all__ if name[0].isupper()}


def test_batchfeed_dataset_is_exported_lazily() -> None:
    code = ("import sys, batchfeed\n"
            "assert 'torch' not in sys.modules, 'import batchfeed pulled torch'\n"
            "from batchfeed import BatchfeedDataset\n"
            "from batchfeed.client.torch_data import BatchfeedDataset as Same\n"
            "assert BatchfeedDataset is Same and 'torch' in sys.modules\n"
            "assert 'BatchfeedDataset' in batchfeed.__all__\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
