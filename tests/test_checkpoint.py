"""Checkpoint and resume: a trainer killed mid-epoch continues exactly where it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchfeed import Client, InvalidArgument, InvalidRequest

N = 5003
EPOCHS = 3

TRAINER = r"""
import json, os, sys, time
from batchfeed import Client

address, path, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
epochs = int(sys.argv[4])
if os.path.exists(path):                      # resume from the checkpoint
    saved = json.load(open(path))
    client = Client.from_state_dict(address, saved["loader"])
    seen = saved["seen"]
else:
    client = Client(address, batch_size=64, seed=7, shuffle="buffer", buffer_size=300,
                    drop_last=False)
    seen = []
    saved = {"loader": client.state_dict()}
epoch, start = saved["loader"]["epoch"], saved["loader"]["next_batch"]
for e in range(epoch, epochs):
    for batch in client.epoch(e, start_batch=start if e == epoch else 0):
        seen.append([e] + batch["id"].tolist())   # "train" on it ...
        time.sleep(pause)
        tmp = path + ".tmp"                       # ... then checkpoint model + loader atomically
        json.dump({"loader": client.state_dict(), "seen": seen}, open(tmp, "w"))
        os.replace(tmp, path)
print("done", flush=True)
"""


def run_trainer(address: str, path: Path, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAINER, address, str(path), str(pause),
                             str(EPOCHS)], stdout=subprocess.PIPE, text=True)


@pytest.mark.slow  # a trainer killed and restarted several times: ~5 s
def test_a_killed_trainer_resumes_row_for_row(serve, dataset_path, tmp_path: Path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 2)
    reference = tmp_path / "reference.json"
    ref = run_trainer(srv.address, reference, 0.0)
    assert ref.wait(120) == 0
    expected = json.loads(reference.read_text())["seen"]

    ckpt = tmp_path / "ckpt.json"
    kills = 0
    for _ in range(20):
        proc = run_trainer(srv.address, ckpt, 0.003)
        time.sleep(0.4 + 0.3 * kills)  # die somewhere in the middle of an epoch
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = run_trainer(srv.address, ckpt, 0.0)
    assert proc.wait(120) == 0
    assert kills >= 2
    resumed = json.loads(ckpt.read_text())["seen"]
    assert resumed == expected  # every batch, in order, exactly once across the restarts


def test_state_dict_is_small_plain_json(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    with Client(srv.address, batch_size=100, seed=3, rank=1, world_size=2) as c:
        it = c.epoch(4, start_batch=2)
        next(it)
        state = c.state_dict()
        assert json.loads(json.dumps(state)) == state
        assert state["epoch"] == 4 and state["next_batch"] == 3
        assert state["batch_size"] == 100 and state["rank"] == 1 and state["seed"] == 3
        rest = [b["id"].tolist() for b in it]
    with Client.from_state_dict(srv.address, state) as d:
        assert d.params == c.params
        assert [b["id"].tolist() for b in d.epoch(state["epoch"], state["next_batch"])] == rest


def test_a_foreign_state_is_refused(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    with pytest.raises(InvalidArgument, match="not a batchfeed client state"):
        Client.from_state_dict(srv.address, {"epoch": 1})


def test_a_state_restored_against_another_dataset_is_refused(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    other = serve("--data", dataset_path(N - 700, name="smaller.npz"), "--workers", 1)
    with Client(srv.address, batch_size=100, seed=3) as c:
        next(iter(c.epoch(1)))
        state = c.state_dict()
    assert state["rows"] == N and state["batches_per_epoch"] == 51
    with pytest.raises(InvalidRequest, match=r"taken on a dataset with 5,003 rows, 51 batches "
                                             r"per epoch, but .* has 4,303 rows, 44 batches"):
        Client.from_state_dict(other.address, state)


def test_a_state_restored_against_the_same_data_elsewhere_resumes(serve, dataset_path) -> None:
    first = serve("--data", dataset_path(N), "--workers", 1)
    second = serve("--data", dataset_path(N, name="copy.npz"), "--workers", 1)
    with Client(first.address, batch_size=100, seed=3) as c:
        it = c.epoch(0)
        next(it)
        state = c.state_dict()
        rest = [b["id"].tolist() for b in it]
    with Client.from_state_dict(second.address, state) as d:
        assert [b["id"].tolist() for b in d.epoch(0, state["next_batch"])] == rest


def test_a_state_from_before_sizes_were_recorded_still_loads(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    with Client(srv.address, batch_size=100, seed=3) as c:
        state = c.state_dict()
    older = {k: v for k, v in state.items() if k not in ("rows", "batches_per_epoch")}
    with Client.from_state_dict(srv.address, older) as d:
        assert d.rows == N and d.params == c.params
