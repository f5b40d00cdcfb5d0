"""Loading datasets: the three file layouts, and a clear error for every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rows

from batchfeed.server.dataset import SharedDataset, inspect_source, synthetic_arrays
from batchfeed.shared.errors import DatasetError
from batchfeed.shared.shm import new_token


def load(path: Path | str) -> dict[str, np.ndarray]:
    ds = SharedDataset.load("t", inspect_source(str(path)), new_token())
    try:
        return {k: v.copy() for k, v in ds.arrays.items()}  # type: ignore[union-attr]
    finally:
        ds.close()


def test_npz_fields_are_its_arrays(tmp_path: Path) -> None:
    rows = make_rows(50)
    np.savez_compressed(tmp_path / "d.npz", **rows)
    got = load(tmp_path / "d.npz")
    assert set(got) == set(rows)
    for k in rows:
        assert got[k].dtype == rows[k].dtype and np.array_equal(got[k], rows[k])


def test_npy_field_is_named_after_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "feats.npy", np.arange(20, dtype=np.int16).reshape(10, 2))
    got = load(tmp_path / "feats.npy")
    assert list(got) == ["feats"] and got["feats"].shape == (10, 2)


def test_directory_of_npy_files(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(5.0))
    np.save(tmp_path / "b.npy", np.ones((5, 3, 2), np.uint8))
    (tmp_path / "README.txt").write_text("ignored")
    got = load(tmp_path)
    assert sorted(got) == ["a", "b"] and got["b"].shape == (5, 3, 2)


def test_fortran_order_arrays_are_served_in_row_order(tmp_path: Path) -> None:
    a = np.asfortranarray(np.arange(24, dtype=np.float64).reshape(6, 4))
    np.save(tmp_path / "f.npy", a)
    assert np.array_equal(load(tmp_path / "f.npy")["f"], a)


def test_fields_of_different_lengths_name_each_field_and_length(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 2)), y=np.zeros(9), z=np.zeros(10))
    with pytest.raises(DatasetError, match="x: 10 rows, y: 9 rows, z: 10 rows"):
        inspect_source(str(tmp_path / "d.npz"))


@pytest.mark.parametrize("make,words", [
    (lambda p: p / "missing.npz", "no such file or directory"),
    (lambda p: (p / "t.txt").write_text("x") and p / "t.txt", "not a kind of file"),
    (lambda p: (p / "bad.npz").write_bytes(b"not a zip") and p / "bad.npz", "not a valid .npz"),
    (lambda p: (p / "bad.npy").write_bytes(b"\x93NUMPY garbage") and p / "bad.npy",
     "not a valid .npy"),
    (lambda p: p, "holds no data batchfeed can serve"),
])
def test_bad_paths_say_what_is_wrong(tmp_path: Path, make, words: str) -> None:
    with pytest.raises(DatasetError, match=words):
        inspect_source(str(make(tmp_path)))


def test_object_and_structured_dtypes_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="dtype object.*cannot serve"):
        inspect_source(str(tmp_path / "o.npy"))
    np.save(tmp_path / "s.npy", np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")]))
    with pytest.raises(DatasetError, match="cannot serve"):
        inspect_source(str(tmp_path / "s.npy"))


def test_zero_d_and_empty_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.float32(3))
    with pytest.raises(DatasetError, match="0-d array"):
        inspect_source(str(tmp_path / "s.npy"))
    np.save(tmp_path / "e.npy", np.zeros((0, 3)))
    with pytest.raises(DatasetError, match="0 rows"):
        inspect_source(str(tmp_path / "e.npy"))


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.int64))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        load(tmp_path / "t.npy")


def test_synthetic_dataset_is_learnable_and_deterministic() -> None:
    a, b = synthetic_arrays(5000), synthetic_arrays(5000)
    assert a["x"].shape == (5000, 64) and a["x"].dtype == np.float32
    assert a["y"].dtype == np.int64 and set(np.unique(a["y"])) <= set(range(10))
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
    assert len(np.unique(a["y"])) == 10


def test_serve_with_a_bad_path_exits_with_the_reason(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 2)), y=np.zeros(9))
    for path, words in [(tmp_path / "nope.npz", "no such file"), (tmp_path / "d.npz", "y: 9 rows")]:
        out = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--data", str(path),
                              "--bind", "tcp://127.0.0.1:0"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2
        assert "batchfeed serve: error:" in out.stderr and words in out.stderr
