"""Server-side transforms: run by the workers, deterministic, and they never kill the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rows, server_report

import batchfeed
from batchfeed import Client, WorkerError

REPO = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(REPO)}
N = 1003


@pytest.fixture
def transformed(serve, dataset_path):
    def start(transform: str, *extra: object):
        return serve("--data", dataset_path(N), "--workers", 2, "--transform",
                     f"tests.transforms.basic:{transform}", *extra, env=ENV)
    return start


def ids_and(client: Client, epoch: int, field: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b["id"].copy(), b[field].copy()) for b in client.epoch(epoch)]


def test_a_transform_changes_dtypes_and_is_deterministic(transformed) -> None:
    srv = transformed("scale_and_noise")
    source = make_rows(N)
    with Client(srv.address, batch_size=64, seed=3) as a, \
            Client(srv.address, batch_size=64, seed=3, prefetch=2) as b:
        # undeclared: read off a sample batch at start, and told at HELLO
        assert {f.name: f.dtype.name for f in a.fields} == {"id": "int64", "x": "float64",
                                                           "noise": "float32"}
        first = [{k: v.copy() for k, v in batch.items()} for batch in a.epoch(0)]
        again = [{k: v.copy() for k, v in batch.items()} for batch in b.epoch(0)]
    rows = np.sort(np.concatenate([batch["id"] for batch in first]))
    assert np.array_equal(rows, np.arange(N))
    for x, y in zip(first, again):  # same (seed, epoch, k): same random numbers
        assert np.array_equal(x["x"], y["x"]) and np.array_equal(x["noise"], y["noise"])
        expected = source["x"][x["id"]] * 2.0 + x["noise"].astype(np.float64)
        assert np.allclose(x["x"], expected, atol=1e-6)


def test_a_declared_schema_is_announced_and_shapes_change(transformed) -> None:
    srv = transformed("crop_flip")
    source = make_rows(N)
    with Client(srv.address, batch_size=100, seed=1) as c:
        assert {f.name: (f.dtype.name, f.shape) for f in c.fields} == {
            "id": ("int64", ()), "img": ("uint8", (3, 3, 3))}
        for batch in c.epoch(0):
            assert batch["img"].shape == (len(batch["id"]), 3, 3, 3)
            # every output pixel comes from the source image of that row
            for i, row in enumerate(batch["id"][:5]):
                assert set(batch["img"][i].ravel()) <= set(source["img"][row].ravel())


def test_shapes_may_vary_from_batch_to_batch(transformed) -> None:
    srv = transformed("pad_tokens")
    with Client(srv.address, batch_size=5, shuffle="none") as c:
        widths = set()
        for batch in c.epoch(0):
            lengths = batch["length"]
            assert batch["tokens"].shape == (len(lengths), lengths.max())
            widths.add(batch["tokens"].shape[1])
        assert len(widths) > 1


def test_a_transform_that_raises_names_itself_and_the_batch_and_spares_the_server(
        transformed) -> None:
    srv = transformed("explode")
    words = r"transform tests.transforms.basic:explode raised on epoch 0 batch 1: ValueError"
    with Client(srv.address, batch_size=50, shuffle="none") as c, \
            pytest.raises(WorkerError, match=words):
        for _ in c.epoch(0):
            pass
    with Client(srv.address, batch_size=50, shuffle="none") as c:  # the server still serves
        assert len(next(iter(c.epoch(0)))["id"]) == 50


def test_a_transform_returning_garbage_is_a_clear_error(transformed) -> None:
    srv = transformed("not_a_dict_on_row_96")  # the sample run at start passes
    with Client(srv.address, batch_size=50, shuffle="none") as c, \
            pytest.raises(WorkerError, match="returned list.*must return a non-empty dict"):
        for _ in c.epoch(0):
            pass


@pytest.mark.parametrize("spec,words", [
    ("nodots", "must look like package.module:function"),
    ("no.such.module:f", "cannot import transform module 'no.such.module'"),
    ("tests.transforms.basic:missing", "has no function 'missing'"),
    ("ghost=tests.transforms.basic:explode", "no dataset is named 'ghost'"),
])
def test_a_bad_transform_stops_the_start_with_the_reason(dataset_path, spec: str,
                                                         words: str) -> None:
    out = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--data",
                          str(dataset_path(N)), "--transform", spec, "--bind",
                          "tcp://127.0.0.1:0"], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 2 and words in out.stderr, out.stderr


def test_stock_random_crop_flip_crops_and_flips_each_image() -> None:
    from batchfeed.transforms import augment, random_crop_flip

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 3, 8, 10), dtype=np.uint8)
    out = random_crop_flip({"x": x, "y": np.arange(16)}, np.random.default_rng(1))
    assert out["x"].shape == x.shape and out["x"].dtype == np.uint8
    assert np.array_equal(out["y"], np.arange(16))
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(16):
        crops = [padded[i, :, top:top + 8, left:left + 10] for top in range(9)
                 for left in range(9)]
        assert any(np.array_equal(out["x"][i], c) or np.array_equal(out["x"][i], c[:, :, ::-1])
                   for c in crops)
    again = random_crop_flip({"x": x}, np.random.default_rng(1))
    assert np.array_equal(again["x"], out["x"])
    aug = augment({"x": x}, np.random.default_rng(2))
    assert aug["x"].dtype == np.float32 and aug["x"].shape == x.shape


def test_a_stock_transform_through_the_server(serve, dataset_path) -> None:
    rng = np.random.default_rng(0)
    data = {"x": rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8), "y": np.arange(300)}
    srv = serve("--data", dataset_path(arrays=data), "--workers", 1, "--transform",
                "batchfeed.transforms:augment", "--slot-mb", 0.25)
    with Client(srv.address, batch_size=32) as c:
        batches = [b["x"].copy() for b in c.epoch(0)]
    assert sum(len(b) for b in batches) == 300 and batches[0].dtype == np.float32


def test_output_that_outgrows_the_size_guess_is_cut_into_smaller_messages(transformed) -> None:
    srv = transformed("expand_past_the_samples", "--slot-mb", 1 / 16)
    source = make_rows(N)
    with Client(srv.address, batch_size=20, seed=2) as c:
        for epoch in range(2):
            seen = []
            for batch in c.epoch(epoch):
                img = source["img"][batch["id"]].astype(np.float64)
                if (batch["id"] >= 16).any():
                    img = np.concatenate([img] * 4, axis=1)
                assert np.array_equal(batch["img"], img)
                seen.append(batch["id"].copy())
            assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N))
    assert server_report(srv.address)["server"]["counters"]["chunks_cut"] >= 1


def test_a_declared_pass_through_keeps_str_fields_str(tmp_path) -> None:
    (tmp_path / "passtx.py").write_text(
        "def same(batch, rng):\n    return dict(batch)\n"
        "same.output_schema = {'text': 'same', 'y': 'same'}\n"
        "def missing(batch, rng):\n    return dict(batch)\n"
        "missing.output_schema = {'nope': 'same'}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        data = {"text": ["ab", "c", "déf"], "y": np.arange(3)}
        with batchfeed.serve(data, workers=1, transforms=("passtx:same",)) as srv, \
                Client(srv.address, batch_size=3, shuffle="none") as client:
            assert [f.kind for f in client.fields] == ["str", "fixed"]
            [batch] = list(client.epoch(0))
        assert batch["text"] == ["ab", "c", "déf"] and batch["y"].tolist() == [0, 1, 2]
        with pytest.raises(batchfeed.DatasetError, match="passes through 'nope'"):
            batchfeed.serve(data, workers=1, transforms=("passtx:missing",))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("passtx", None)
