"""A trainer never gets wrong rows silently: servers of other data, a server replaced by one of
other data, a checkpoint restored on other data, and a forked child are each refused or
harmless, the way careful users and attackers on one host meet them.

(Damaged files and links out of a data folder: tests/test_wrong_data_files.py.)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rows, server_report, wait_until

import batchfeed
from batchfeed import Client, DataMismatch, ForkError
from batchfeed.launch import ServerProcess

N = 1000


def export(path: Path, seed: int, n: int = N) -> Path:
    """One 'export' of a dataset: same name, rows and schema for every seed, other values."""
    rows = make_rows(n, seed=seed)
    rows["x"] = rows["x"] + np.float32(seed)
    np.savez(path, **rows)
    return path


@pytest.fixture
def exports(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return export(tmp_path / "a" / "data.npz", 1), export(tmp_path / "b" / "data.npz", 2)


def fingerprint_of(srv: ServerProcess) -> str:
    line = srv.ready_line
    return line[line.index("fingerprint ") + len("fingerprint "):].rstrip(")")


# ---------------------------------------------------------------------------------------------
# Servers of other data


def test_shards_of_two_exports_are_refused_naming_both_fingerprints(serve, exports) -> None:
    a = serve("--data", exports[0], "--workers", 1, "--shard", "0/2")
    b = serve("--data", exports[1], "--workers", 1, "--shard", "1/2")
    with pytest.raises(DataMismatch) as err:
        Client([a.address, b.address], batch_size=10)
    assert fingerprint_of(a) in str(err.value) and fingerprint_of(b) in str(err.value)
    assert fingerprint_of(a) != fingerprint_of(b)


def test_replicas_of_two_exports_are_refused(serve, exports) -> None:
    a = serve("--data", exports[0], "--workers", 1)
    b = serve("--data", exports[1], "--workers", 1)
    with pytest.raises(DataMismatch, match="fingerprint"), \
            Client([a.address, b.address], batch_size=10) as client:
        list(client.epoch(0))


def test_every_server_of_one_export_agrees_however_it_holds_it(serve, exports, tmp_path) -> None:
    copy = tmp_path / "copy.npz"
    copy.write_bytes(exports[0].read_bytes())  # the same files on another host, say
    whole = serve("--data", exports[0], "--workers", 1)
    shard = serve("--data", copy, "--workers", 1, "--shard", "1/2")
    assert fingerprint_of(whole) == fingerprint_of(shard)
    with Client([whole.address], batch_size=10, shuffle="none") as client:
        ids = [int(i) for b in client.epoch(0) for i in b["id"]]
    assert ids == list(range(N))


def test_a_mapped_server_and_a_loaded_one_of_the_same_files_agree(serve, tmp_path) -> None:
    folder = tmp_path / "npy"
    folder.mkdir()
    for name, array in make_rows(N).items():
        np.save(folder / f"{name}.npy", array)
    loaded = serve("--data", folder, "--workers", 1)
    mapped = serve("--data", folder, "--workers", 1, "--mmap")  # sampled only
    assert fingerprint_of(mapped).startswith("sampled:")
    with Client([loaded.address, mapped.address], batch_size=10, shuffle="none") as client:
        ids = sorted(int(i) for b in client.epoch(0) for i in b["id"])
    assert ids == list(range(N))


def test_a_server_replaced_by_one_of_other_data_is_refused_not_mixed(exports) -> None:
    first = ServerProcess(["--data", str(exports[0]), "--workers", "1"]).start()
    address = first.address
    assert address is not None
    second = None
    try:
        with Client(address, batch_size=10, shuffle="none", prefetch=4,
                    reconnect_timeout=30) as client:
            it = client.epoch(0)
            got = [next(it)["x"][0, 0] for _ in range(5)]
            first.stop()
            second = ServerProcess(["--data", str(exports[1]), "--workers", "1"],
                                   bind=address).start()
            with pytest.raises(DataMismatch, match="came back serving"):
                for batch in it:
                    got.append(batch["x"][0, 0])
        # Every row the trainer got is the first export's: x[:, 0] == id + 1.
        assert all(float(v) == float(i * 10) + 1 for i, v in enumerate(got[:5]))
        assert all(float(v) % 10 == 1 for v in got)
    finally:
        first.stop()
        if second is not None:
            second.stop()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_a_restore_on_other_data_of_the_same_size_is_refused(serve, exports) -> None:
    a = serve("--data", exports[0], "--workers", 1)
    b = serve("--data", exports[1], "--workers", 1)
    with Client(a.address, batch_size=10, seed=3) as client:
        it = client.epoch(1)
        for _ in range(4):
            next(it)
        state = client.state_dict()
    assert state["fingerprint"]["full"] and state["next_batch"] == 4
    with pytest.raises(DataMismatch) as err:
        Client.from_state_dict(b.address, state)
    assert fingerprint_of(a) in str(err.value) and fingerprint_of(b) in str(err.value)
    with Client.from_state_dict(a.address, state) as again:  # the right data resumes
        assert len(list(again.epoch(1, start_batch=4))) == again.batches_per_epoch - 4


def test_a_dataset_state_restored_on_other_data_is_refused(serve, exports) -> None:
    from batchfeed.client.torch_data import BatchfeedDataset

    a = serve("--data", exports[0], "--workers", 1)
    b = serve("--data", exports[1], "--workers", 1)
    with BatchfeedDataset(a.address, batch_size=10) as ds:
        next(iter(ds))
        state = ds.state_dict()
    with BatchfeedDataset(b.address, batch_size=10) as other:  # not connected yet
        other.load_state_dict(state)
        with pytest.raises(DataMismatch, match="fingerprint"):
            next(iter(other))  # checked as it connects
    with BatchfeedDataset(b.address, batch_size=10) as other:
        assert other.client.rows == N  # connected
        with pytest.raises(DataMismatch, match="fingerprint"):
            other.load_state_dict(state)


def test_a_restore_through_another_transform_is_refused(serve, exports) -> None:
    repo = str(Path(__file__).resolve().parents[1])
    a = serve("--data", exports[0], "--workers", 1)
    b = serve("--data", exports[0], "--workers", 1, "--transform",
              "tests.transforms.basic:sleepy", env={"PYTHONPATH": repo, "SLEEPY_MS": "0"})
    with Client(a.address, batch_size=10) as client:
        state = client.state_dict()
    with pytest.raises(DataMismatch, match="transform"):
        Client.from_state_dict(b.address, state)


# ---------------------------------------------------------------------------------------------
# Fork


@pytest.fixture
def ipc_server(serve, dataset_path, ipc_address):
    return serve("--data", dataset_path(N), "--workers", 2, "--slots", 12, bind=ipc_address)


def churn(address: str, epochs: int = 3) -> None:
    """Another client reads epochs, so that any slot given back is rewritten."""
    with Client(address, batch_size=50, seed=5) as other:
        for e in range(epochs):
            assert sorted(int(i) for b in other.epoch(e) for i in b["id"]) == list(range(N))


FORK_AND_EXIT = """
import gc, os, sys
import numpy as np
from batchfeed import Client

address, ending = sys.argv[1], sys.argv[2]
client = Client(address, batch_size=100, shuffle="none")
it = client.epoch(0)
held = next(it)["id"]
assert client.servers()[0]["in_place"], "not the fast path"
pid = os.fork()
if pid == 0:  # the child: its copies of the views and finalizers die with it
    del held, it
    gc.collect()
    if ending == "os._exit":
        os._exit(0)
    if ending == "sys.exit":
        sys.exit(0)
else:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with Client(address, batch_size=50, seed=5) as other:  # rewrites any slot given back
        for e in range(3):
            assert sorted(int(i) for b in other.epoch(e) for i in b["id"]) == list(range(%d))
    assert np.array_equal(held, np.arange(100)), "the parent's view was rewritten"
    client.close()
    print("intact")
"""  # the child of "fall off the end" runs the script's end: the interpreter's exit handlers


@pytest.mark.parametrize("ending", ["sys.exit", "fall off the end", "os._exit"])
def test_a_forked_child_that_exits_leaves_the_parents_views_intact(ipc_server, ending,
                                                                    tmp_path) -> None:
    script = tmp_path / "fork_and_exit.py"
    script.write_text(FORK_AND_EXIT % N)
    out = subprocess.run([sys.executable, str(script), ipc_server.address, ending],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "intact", out.stderr


def test_a_client_used_in_a_forked_child_says_fork(ipc_server) -> None:
    with Client(ipc_server.address, batch_size=100) as client:
        it = client.epoch(0)
        next(it)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                next(it)
            except ForkError as exc:
                code = 0 if "fork" in str(exc) and "new Client" in str(exc) else 2
            except BaseException:
                code = 3
            try:
                client.epoch(1)
            except ForkError:
                pass
            else:
                code = 4
            os.write(write, bytes([code]))
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        assert os.read(read, 1) == b"\0"
        os.close(read)
        assert len(list(it)) == client.batches_per_epoch - 1  # the parent reads on


def _read_in_child(address: str, queue: multiprocessing.Queue) -> None:
    with Client(address, batch_size=100, seed=7) as own:
        queue.put(sorted(int(i) for b in own.epoch(0) for i in b["id"]))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_children_with_their_own_clients(ipc_server, method) -> None:
    ctx = multiprocessing.get_context(method)
    with Client(ipc_server.address, batch_size=100, shuffle="none") as client:
        it = client.epoch(0)
        held = next(it)["id"]
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(ipc_server.address, queue))
        child.start()
        assert queue.get(timeout=60) == list(range(N))
        child.join(30)
        assert child.exitcode == 0
        churn(ipc_server.address)
        assert np.array_equal(held, np.arange(100))
        assert len(list(it)) == client.batches_per_epoch - 1


def test_a_dataloader_worker_that_touches_the_dataset_gets_its_own_client(ipc_server) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Dataset

    from batchfeed.client.torch_data import BatchfeedDataset

    feed = BatchfeedDataset(ipc_server.address, batch_size=100, shuffle="none")
    parent_rows = feed.client.rows  # connected in the parent

    class Touches(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> int:
            return feed.client.rows + feed.client.batches_per_epoch  # in a worker process

    try:
        first = next(iter(DataLoader(feed, batch_size=None)))["id"]
        got = list(DataLoader(Touches(), batch_size=None, num_workers=2,
                              multiprocessing_context="fork"))
        assert [int(v) for v in got] == [parent_rows + 10] * 4
        churn(ipc_server.address)
        assert torch.equal(first, torch.arange(100))
    finally:
        feed.close()


def test_a_forked_child_never_stops_the_parents_server(tmp_path) -> None:
    script = tmp_path / "fork_serve.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import numpy as np
        import batchfeed
        from batchfeed import Client
        with batchfeed.serve({"id": np.arange(100)}) as server:
            if os.fork() == 0:
                sys.exit(0)  # the child's exit handlers run here
            os.wait()
            with Client(server.address, batch_size=10) as client:
                print(sum(len(b["id"]) for b in client.epoch(0)))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "100"


def test_a_fast_path_client_killed_gives_its_slots_back_at_once(ipc_server, tmp_path) -> None:
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from batchfeed import Client
        client = Client({ipc_server.address!r}, batch_size=100)
        kept = [b for b in client.epoch(0)]
        print("holding", flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        assert server_report(ipc_server.address)["server"]["slots_leased"] > 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # Its lock is gone with it: the slots come back within a tick, not a session timeout.
        wait_until(lambda: server_report(ipc_server.address)["server"]["slots_leased"] == 0,
                   timeout=2.0, what="the killed client's slots back")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_version_and_fingerprint_are_in_the_ready_line(serve, exports) -> None:
    srv = serve("--data", exports[0], "--workers", 1)
    assert fingerprint_of(srv).startswith("full:") and batchfeed.__version__
