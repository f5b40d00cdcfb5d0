"""Variable-length data: token lists, strings and bytes from Arrow, Parquet, Hugging Face
datasets and memory, held once in shared memory, served padded, flat or packed, exactly once
per epoch with ranks, resumes and worker deaths."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import mapped_segments, server_report

import batchfeed
from batchfeed import Client, DatasetError

pa = pytest.importorskip("pyarrow", reason="pyarrow is the [arrow] extra")
datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets tests need it")

N = 3001


def corpus(n: int = N) -> dict:
    """Documents whose every token says where it came from: doc i is i*1000 + 0..len-1."""
    lengths = (np.arange(n) * 7919) % 97
    return {"tokens": [np.arange(length, dtype=np.int32) + 1000 * i
                       for i, length in enumerate(lengths)],
            "label": np.arange(n, dtype=np.int64),
            "text": [f"document {i} " + "é" * (i % 5) for i in range(n)]}


def check_rows(batch: dict) -> list[int]:
    """The labels of a padded batch, after checking every row against its label."""
    labels = batch["label"].tolist()
    for row, length, label, text in zip(batch["tokens"], batch["tokens_lengths"], labels,
                                        batch["text"]):
        assert length == (label * 7919) % 97
        assert row[:length].tolist() == list(range(1000 * label, 1000 * label + length))
        assert not row[length:].any()  # padded with 0
        assert text == f"document {label} " + "é" * (label % 5)
    return labels


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    data = corpus()
    ds = datasets.Dataset.from_dict({"tokens": [t.tolist() for t in data["tokens"]],
                                     "label": data["label"].tolist(), "text": data["text"]})
    root = tmp_path_factory.mktemp("hf")
    ds.save_to_disk(str(root / "saved"))
    ds.to_parquet(str(root / "corpus.parquet"))
    return {"save_to_disk": root / "saved", "parquet": root / "corpus.parquet"}


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "memory"])
def test_every_document_once_per_epoch_padded_with_strings(kind: str, hf_dirs) -> None:
    data = hf_dirs[kind] if kind != "memory" else corpus()
    with batchfeed.serve(data, workers=2) as srv:
        assert "tokens: int" in srv.ready_line and "text: str" in srv.ready_line
        with Client(srv.address, batch_size=64, seed=3) as client:
            for epoch in range(2):
                labels = [label for batch in client.epoch(epoch) for label in check_rows(batch)]
                assert sorted(labels) == list(range(N))


def test_ranks_start_batch_and_a_worker_kill_lose_nothing() -> None:
    with batchfeed.serve(corpus(), workers=2) as srv:
        ranks = [Client(srv.address, batch_size=50, seed=5, rank=r, world_size=3)
                 for r in range(3)]
        try:
            seen: list[int] = []
            pids = server_report(srv.address)["server"]["worker_pids"]
            for r, client in enumerate(ranks):
                for k, batch in enumerate(client.epoch(1)):
                    seen += check_rows(batch)
                    if r == 1 and k == 3:
                        os.kill(pids[0], signal.SIGKILL)
            assert set(seen) == set(range(N))  # every row reaches some rank
            ref = [check_rows(b) for b in ranks[0].epoch(2)]
            resumed = [check_rows(b) for b in ranks[0].epoch(2, start_batch=7)]
            assert resumed == ref[7:]
        finally:
            for client in ranks:
                client.close()


def test_a_client_resumes_a_ragged_epoch_from_its_state() -> None:
    with batchfeed.serve(corpus(), workers=1) as srv:
        with Client(srv.address, batch_size=32, seed=9) as client:
            whole = [check_rows(b) for b in client.epoch(0)]
        with Client(srv.address, batch_size=32, seed=9) as client:
            it = client.epoch(0)
            first = [check_rows(next(it)) for _ in range(10)]
            state = client.state_dict()
        with Client.from_state_dict(srv.address, state) as again:
            rest = [check_rows(b) for b in again.epoch(state["epoch"],
                                                     start_batch=state["next_batch"])]
        assert first + rest == whole


def test_bytes_come_as_a_list_of_bytes() -> None:
    blobs = [bytes([i % 256]) * (i % 13) for i in range(500)]
    with batchfeed.serve({"blob": blobs, "i": np.arange(500)}, workers=1) as srv, \
            Client(srv.address, batch_size=20, shuffle="none") as client:
        got = [b for batch in client.epoch(0) for b in batch["blob"]]
    assert got == blobs


def test_a_flat_token_array_and_its_offsets_serve_like_a_list_of_documents() -> None:
    documents = corpus()["tokens"]
    offsets = np.zeros(N + 1, np.int64)
    np.cumsum([len(d) for d in documents], out=offsets[1:])
    flat = batchfeed.Ragged(np.concatenate(documents), offsets)
    got = {}
    for name, column in (("list", documents), ("Ragged", flat)):
        with batchfeed.serve({"tokens": column}, workers=1) as srv, \
                Client(srv.address, batch_size=8, seed=2, pack={"tokens": 128}) as client:
            got[name] = [b["tokens"] for b in client.epoch(1)]
    assert all(np.array_equal(a, b) for a, b in zip(got["list"], got["Ragged"], strict=True))


@pytest.mark.parametrize("offsets,match", [
    (np.array([0, 5, 3]), "non-decreasing"),
    (np.array([0, 5, 11]), "within the 10 values"),
    (np.array([[0, 10]]), "1-D integer array"),
])
def test_bad_ragged_offsets_are_refused_before_serving(offsets: np.ndarray, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        batchfeed.serve({"tokens": batchfeed.Ragged(np.arange(10), offsets)})


def test_the_ragged_data_is_held_once_in_shared_memory() -> None:
    data = corpus()
    tokens = sum(len(t) for t in data["tokens"])
    with batchfeed.serve(data, workers=2) as srv:
        # Mapped by the server (their names are unlinked once filled: the workers inherit
        # the mappings).
        sizes = sorted(size for name, size in mapped_segments(srv.pid).items() if "data" in name)
    # tokens: values + offsets; text: values + offsets; label: one array
    expected = sorted([4 * tokens, 8 * (N + 1), sum(len(t.encode()) for t in data["text"]),
                       8 * (N + 1), 8 * N])
    assert sizes == expected


# ---------------------------------------------------------------------------------------------
# Refusals


def test_a_nested_column_is_refused_naming_it(tmp_path: Path) -> None:
    table = pa.table({"ok": [1, 2], "nested": [[[1], [2, 3]], [[4]]]})
    pa.parquet.write_table(table, tmp_path / "nested.parquet")
    with pytest.raises(DatasetError, match=r"column .nested. has type list<\w+: list"):
        batchfeed.serve(tmp_path / "nested.parquet")


def test_a_truncated_arrow_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.arrow"
    with pa.ipc.new_file(str(path), pa.schema([("x", pa.int64())])) as writer:
        writer.write_table(pa.table({"x": list(range(1000))}))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"not a readable Arrow IPC file"):
        batchfeed.serve(path)


def test_nulls_are_refused_with_what_to_do(tmp_path: Path) -> None:
    pa.parquet.write_table(pa.table({"x": [1, None, 3]}), tmp_path / "n.parquet")
    with pytest.raises(DatasetError, match=r"null values; fill or drop them"):
        batchfeed.serve(tmp_path / "n.parquet")


def test_mmap_maps_an_arrow_file_with_one_record_batch(serve, tmp_path: Path) -> None:
    data = corpus(500)
    table = pa.table({"tokens": [t.tolist() for t in data["tokens"]], "label": data["label"],
                      "text": data["text"]})
    path = tmp_path / "one.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table.combine_chunks())
    srv = serve("--data", path, "--mmap", "--workers", 2)
    assert "(memory-mapped)" in srv.ready_line
    assert not [p for p in Path("/dev/shm").iterdir()
                if p.name.startswith(f"bf_{srv.pid}_") and "one" in p.name]
    with Client(srv.address, batch_size=16, seed=1) as client:
        labels = [label for batch in client.epoch(0) for label in check_rows(batch)]
    assert sorted(labels) == list(range(500))


def test_mmap_refuses_a_compressed_arrow_file(tmp_path: Path) -> None:
    """Every process would decompress its own copy: refused, saying how to write it."""
    from pyarrow import feather

    table = pa.table({"label": np.arange(500)})
    feather.write_feather(table, tmp_path / "lz4.arrow", chunksize=500)  # LZ4 by default
    with pytest.raises(DatasetError, match="compressed.*compression='uncompressed'"):
        batchfeed.serve(tmp_path / "lz4.arrow", mmap=True)


# ---------------------------------------------------------------------------------------------
# Flat, packed and token-budget batches


def all_tokens(n: int = N) -> np.ndarray:
    return np.sort(np.concatenate(corpus(n)["tokens"]))


def test_flat_batches_are_values_and_offsets_from_zero() -> None:
    with batchfeed.serve(corpus(), workers=2) as srv, \
            Client(srv.address, batch_size=40, seed=2, ragged="flat") as client:
        seen = []
        for batch in client.epoch(0):
            values, offsets = batch["tokens"], batch["tokens_offsets"]
            assert offsets[0] == 0 and offsets[-1] == len(values) == values.shape[0]
            assert len(offsets) == len(batch["label"]) + 1
            for i, label in enumerate(batch["label"].tolist()):
                row = values[offsets[i] : offsets[i + 1]]
                assert row.tolist() == [1000 * label + j for j in range(len(row))]
            seen.append(values)
        assert np.array_equal(np.sort(np.concatenate(seen)), all_tokens())


def test_max_length_truncates_rows() -> None:
    with batchfeed.serve(corpus(), workers=1) as srv, \
            Client(srv.address, batch_size=64, seed=2, max_length=10) as client:
        for batch in client.epoch(0):
            assert batch["tokens"].shape[1] <= 10 and batch["tokens_lengths"].max() <= 10


def check_packed(batches: list[dict], length: int) -> np.ndarray:
    """Every packed row is exactly ``length`` tokens whose segment ids and positions agree with
    the token values (doc i's j-th token is 1000*i + j); returns the real tokens."""
    real = []
    for batch in batches:
        tokens, seg, pos = batch["tokens"], batch["tokens_segment_ids"], batch["tokens_positions"]
        assert tokens.shape[1:] == seg.shape[1:] == pos.shape[1:] == (length,)
        used = seg > 0
        assert np.array_equal(pos[used], tokens[used] % 1000)
        assert not tokens[~used].any()  # padding is pad_value, 0
        for row_tokens, row_seg in zip(tokens, seg):  # a new segment where the doc changes
            docs = row_tokens[row_seg > 0] // 1000
            assert np.array_equal(np.diff(row_seg[row_seg > 0]) != 0, np.diff(docs) != 0)
        real.append(tokens[used])
    return np.concatenate(real)


def test_packed_rows_hold_every_token_once_per_epoch() -> None:
    total = len(all_tokens())
    with batchfeed.serve(corpus(), workers=2) as srv, \
            Client(srv.address, batch_size=8, seed=4, pack={"tokens": 128}) as client:
        rows = -(-total // 128)
        assert client.batches_per_epoch == -(-rows // 8)
        epochs = [check_packed(list(client.epoch(e)), 128) for e in range(2)]
    assert all(np.array_equal(np.sort(t), all_tokens()) for t in epochs)
    assert not np.array_equal(epochs[0], epochs[1])  # another document order each epoch


def test_packing_aligned_fields_with_ranks_resume_and_a_worker_kill() -> None:
    data = corpus()
    data["mask"] = [(t % 2).astype(np.uint8) for t in data["tokens"]]
    with batchfeed.serve(data, workers=2) as srv:
        ranks = [Client(srv.address, batch_size=4, seed=6, pack={"tokens": 64, "mask": 64},
                        rank=r, world_size=2) for r in range(2)]
        try:
            pids = server_report(srv.address)["server"]["worker_pids"]
            got = []
            for r, client in enumerate(ranks):
                batches = []
                for k, batch in enumerate(client.epoch(0)):
                    batches.append(dict(batch))
                    if r == 0 and k == 5:
                        os.kill(pids[1], signal.SIGKILL)
                for b in batches:
                    real = b["tokens_segment_ids"] > 0
                    assert np.array_equal(b["mask"], b["tokens"] % 2 * real)
                got.append(check_packed(batches, 64))
            union = np.concatenate(got)
            assert set(union.tolist()) == set(all_tokens().tolist())
            assert len(union) - len(all_tokens()) <= 64  # at most one packed row padded
            ref = list(ranks[1].epoch(1))
            state = ranks[1].state_dict()
            resumed = list(ranks[1].epoch(1, start_batch=3))
            assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(ref[3:], resumed))
            assert state["pack"] == ["tokens", "mask"] or state["pack"] == ("tokens", "mask")
        finally:
            for client in ranks:
                client.close()


def test_token_budget_batches_stay_within_max_tokens() -> None:
    with batchfeed.serve(corpus(), workers=2) as srv, \
            Client(srv.address, max_tokens=512, seed=8) as client:
        epochs = []
        for e in range(2):
            labels = []
            for batch in client.epoch(e):
                assert batch["tokens"].size <= 512  # rows x longest
                labels += check_rows(batch)
            assert sorted(labels) == list(range(N))
            epochs.append(labels)
        assert epochs[0] != epochs[1]
        assert client.batches_per_epoch > N // 512


def test_a_transform_sees_ragged_fields_and_may_return_them(serve, tmp_path: Path) -> None:
    table = pa.table({"text": [f"w{i} " * (i % 7) for i in range(400)],
                      "label": list(range(400))})
    pa.parquet.write_table(table, tmp_path / "t.parquet")
    srv = serve("--data", tmp_path / "t.parquet", "--workers", 1,
                "--transform", "tests.transforms.basic:tokenize_text")
    with Client(srv.address, batch_size=16, shuffle="none") as client:
        for batch in client.epoch(0):
            for row, length, label in zip(batch["ids"], batch["ids_lengths"], batch["label"]):
                assert length == len((f"w{label} " * (label % 7)).encode())
                assert bytes(row[:length].astype(np.uint8)) == (f"w{label} " * (label % 7)).encode()


def test_the_core_never_imports_pyarrow() -> None:
    import subprocess
    import sys

    code = ("import sys, batchfeed, batchfeed.server.main, batchfeed.client; "
            "from batchfeed.server.sources import inspect_source; "
            "assert 'pyarrow' not in sys.modules, 'pyarrow was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
