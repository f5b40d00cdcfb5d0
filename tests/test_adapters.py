"""Framework adapters: torch tensors share memory with the received frames."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_rows, shared_server

from batchfeed import Client, InvalidArgument

torch = pytest.importorskip("torch")

N = 500


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from shared_server(tmp_path_factory, "--workers", 1, n=N)


def test_torch_format_is_zero_copy_and_exact(server) -> None:
    source = make_rows(N)
    with Client(server.address, batch_size=64, seed=1) as c:
        plain = [{k: v.copy() for k, v in b.items()} for b in c.epoch(0)]
        for batch, ref in zip(c.epoch(0, format="torch"), plain):
            assert isinstance(batch["x"], torch.Tensor) and batch["x"].dtype == torch.float32
            assert batch["img"].dtype == torch.uint8 and batch["flag"].dtype == torch.bool
            assert torch.equal(batch["id"], torch.from_numpy(ref["id"]))
            assert np.array_equal(batch["img"].numpy(), source["img"][ref["id"]])
            # zero-copy: the tensor's storage is the numpy view over the received frame
            arr = batch["x"].numpy()
            assert arr.base is not None and not arr.flags.owndata


def test_torch_device_and_pin_memory_on_cpu(server) -> None:
    with Client(server.address, batch_size=64) as c:
        with pytest.warns(UserWarning, match="pin_memory"):
            it = c.epoch(0, format="torch", pin_memory=True, device="cpu")
        batch = next(iter(it))
        assert batch["x"].device.type == "cpu"


def test_torch_on_the_fast_path_copies_read_only_fields_unless_told(serve, dataset_path,
                                                                   ipc_address) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1, bind=ipc_address)
    with Client(srv.address, batch_size=64) as c:
        safe = next(iter(c.epoch(0, format="torch")))
        safe["x"].mul_(2)  # in place: allowed, it is the client's own copy
        shared = next(iter(c.epoch(0, format="torch", zero_copy_readonly=True)))
        assert torch.equal(shared["x"] * 2, safe["x"])


def test_torch_converter_copies_only_read_only_fields() -> None:
    from batchfeed.client.adapters import converter

    ro = np.arange(6, dtype=np.float32)
    ro.flags.writeable = False
    rw = np.arange(6, dtype=np.int64)
    out = converter("torch")({"ro": ro, "rw": rw, "s": np.array([b"ab", b"c"])})
    assert out["ro"].data_ptr() != ro.ctypes.data
    assert out["rw"].data_ptr() == rw.ctypes.data  # zero-copy
    assert out["s"] == [b"ab", b"c"]  # torch has no string tensors: a list
    shared = converter("torch", zero_copy_readonly=True)({"ro": ro})
    assert shared["ro"].data_ptr() == ro.ctypes.data


def test_iterable_dataset_in_a_dataloader(server) -> None:
    from torch.utils.data import DataLoader

    from batchfeed.client.torch_data import BatchfeedDataset

    ds = BatchfeedDataset(server.address, batch_size=100, seed=3)
    try:
        loader = DataLoader(ds, batch_size=None)
        assert len(loader) == 5
        e0 = torch.cat([b["id"] for b in loader])
        e1 = torch.cat([b["id"] for b in loader])  # the next pass is the next epoch
        assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(N))
        assert e0.tolist() != e1.tolist()
        ds.set_epoch(0)
        assert torch.cat([b["id"] for b in loader]).tolist() == e0.tolist()
        forked = iter(DataLoader(ds, batch_size=None, num_workers=1))
        try:
            with pytest.raises(InvalidArgument, match="num_workers=0"):
                next(forked)
        finally:  # left to the garbage collector, its shutdown stalls a later test for 5 s
            forked._shutdown_workers()
    finally:
        ds.close()


def test_unknown_format_is_refused(server) -> None:
    with Client(server.address, batch_size=64) as c:
        with pytest.raises(InvalidArgument, match="format must be one of"):
            c.epoch(0, format="tensorflow")
        with pytest.raises(InvalidArgument, match="pin_memory"):
            c.epoch(0, pin_memory=True)


def test_jax_format_yields_jax_arrays(server) -> None:
    jax = pytest.importorskip("jax")
    with Client(server.address, batch_size=64, seed=2) as c:
        plain = [{k: v.copy() for k, v in b.items()} for b in c.epoch(0)]
        for batch, ref in zip(c.epoch(0, format="jax"), plain):
            assert isinstance(batch["x"], jax.Array)
            assert np.array_equal(np.asarray(batch["x"]), ref["x"])
            assert np.array_equal(np.asarray(batch["id"]), ref["id"])


def test_a_wrong_field_name_says_what_the_batch_has(server) -> None:
    with Client(server.address, batch_size=64) as c:
        for format in ("numpy", "torch"):
            batch = next(iter(c.epoch(0, format=format)))
            with pytest.raises(KeyError, match=r"no field 'z' in this batch; it has: id, x"):
                batch["z"]
            assert batch.get("z") is None and "z" not in batch  # a dict for everything else
    from batchfeed.client.adapters import converter

    out = converter("torch")({"x": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="it has: x"):
        out["y"]
