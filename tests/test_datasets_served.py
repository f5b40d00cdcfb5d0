"""Several datasets on one server, and memory-mapped .npy data larger than shared memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import children, pss_bytes

from batchfeed import Client, InvalidRequest


def test_several_datasets_each_client_picks_one(serve, tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", v=np.arange(100), tag=np.zeros(100, np.int8))
    np.savez(tmp_path / "b.npz", v=np.arange(1000, 1250), w=np.ones((250, 2), np.float32))
    srv = serve("--data", f"train={tmp_path / 'a.npz'}", "--data", f"val={tmp_path / 'b.npz'}",
                "--workers", 1)
    assert "train: 100 rows" in srv.ready_line and "val: 250 rows" in srv.ready_line
    with Client(srv.address, batch_size=30, dataset="train") as a, \
            Client(srv.address, batch_size=30, dataset="val") as b:
        assert (a.rows, a.dataset, b.rows, b.dataset) == (100, "train", 250, "val")
        assert sorted(np.concatenate([x["v"] for x in a.epoch(0)]).tolist()) == list(range(100))
        got = np.concatenate([x["v"] for x in b.epoch(0)])
        assert sorted(got.tolist()) == list(range(1000, 1250))
        assert {f.name for f in b.fields} == {"v", "w"}
    with pytest.raises(InvalidRequest, match="serves several datasets \\(train, val\\); pick"):
        Client(srv.address, batch_size=30)


def write_npy_dir(path: Path, rows: int, width: int) -> None:
    path.mkdir()
    np.save(path / "id.npy", np.arange(rows))
    x = np.lib.format.open_memmap(path / "x.npy", mode="w+", dtype=np.float32,
                                  shape=(rows, width))
    for start in range(0, rows, 10_000):
        stop = min(rows, start + 10_000)
        x[start:stop] = np.arange(start, stop, dtype=np.float32)[:, None]
    x.flush()
    del x


def test_mmap_serves_npy_files_without_copying_them(serve, tmp_path: Path) -> None:
    rows, width = 100_000, 512  # ~200 MB of float32
    write_npy_dir(tmp_path / "big", rows, width)
    data_bytes = rows * (width * 4 + 8)
    srv = serve("--data", tmp_path / "big", "--workers", 2, "--mmap")
    assert "(memory-mapped)" in srv.ready_line
    pids = [srv.pid, *children(srv.pid)]
    assert pss_bytes(pids) < 0.5 * data_bytes  # nothing was copied in
    with Client(srv.address, batch_size=256, shuffle="buffer", buffer_size=4096, seed=1) as c:
        seen = 0
        for batch in c.epoch(0):
            assert np.array_equal(batch["x"][:, 0], batch["id"].astype(np.float32))
            assert np.array_equal(batch["x"][:, -1], batch["id"].astype(np.float32))
            seen += len(batch["id"])
            if seen > 20_000:
                break


def test_mmap_refuses_npz_archives(dataset_path) -> None:
    out = subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--mmap", "--data",
                          str(dataset_path(100)), "--bind", "tcp://127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--mmap maps .npy files" in out.stderr and "np.save" in out.stderr
