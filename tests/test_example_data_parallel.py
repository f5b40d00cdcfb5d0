"""examples/train_data_parallel.py: two DDP ranks (gloo on loopback) against a real server.

The example's ``--verify`` checks every batch against the plan, that each rank saw its rows
once, and across ranks that every row the plan serves came as often as it serves it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the example trains with torch (pip install '.[torch]')")
pytest.importorskip("tqdm", reason="the example shows a tqdm progress bar (pip install tqdm)")

from batchfeed import Client
from batchfeed.shared.plan import PlanParams

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_data_parallel.py"
LOSS_RE = re.compile(r"^rank (\d+): epoch (\d+): mean loss ([0-9.]+)", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_example():
    spec = importlib.util.spec_from_file_location("train_data_parallel", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ranks(addresses: list[str], world: int, *args: str,
              timeout: float = 150.0) -> list[tuple[int, str]]:
    """Run the example as ``world`` processes; returns (exit code, output) per rank."""
    address_args = [a for address in addresses for a in ("--address", address)]
    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE), *address_args, "--rank", str(rank),
             "--world-size", str(world), "--master-addr", "127.0.0.1",
             "--master-port", str(port), "--no-progress", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for rank in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.mark.slow
def test_two_ranks_see_their_rows_exactly_once_and_the_loss_falls(serve):
    server = serve("--synthetic-rows", 20000, "--workers", 1)
    # 20,000 rows in batches of 128 over 2 ranks: 10,000 rows each, in 78 batches of 128 and
    # one of 16; nothing padded, nothing dropped.
    results = run_ranks([server.address], 2, "--epochs", "3", "--batch-size", "128", "--verify")
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{out}"
        for epoch in range(3):
            assert f"rank {rank}: epoch {epoch}: 10,000 rows exactly once" in out, out
        losses = [float(m[2]) for m in LOSS_RE.findall(out) if int(m[0]) == rank]
        assert len(losses) == 3, out
        assert losses[-1] < losses[0], f"rank {rank}: the loss did not fall: {losses}\n{out}"
    out0 = results[0][1]
    for epoch in range(3):
        assert (f"all ranks: epoch {epoch}: 20,000 rows across 2 ranks as the plan gives them, "
                "0 padded, 0 in the dropped tail") in out0, out0


@pytest.mark.slow
def test_ranks_spread_over_two_loaders_still_see_every_row_once(serve):
    loaders = [serve("--synthetic-rows", 10000, "--workers", 1) for _ in range(2)]
    # rank r uses loader r; 10,000 rows in batches of 100: 50 per rank, no dropped tail.
    results = run_ranks([srv.address for srv in loaders], 2, "--epochs", "2",
                        "--batch-size", "100", "--verify")
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{out}"
        assert f"rows from {loaders[rank].address}," in out, out
    assert ("all ranks: epoch 1: 10,000 rows across 2 ranks as the plan gives them, 0 padded, "
            "0 in the dropped tail") in results[0][1], results[0][1]


@pytest.mark.slow
def test_one_rank_runs_without_torch_distributed(serve):
    server = serve("--synthetic-rows", 5000, "--workers", 1)
    [(code, out)] = run_ranks([server.address], 1, "--epochs", "2", "--verify")
    assert code == 0, out
    assert "rank 0: epoch 1: 5,000 rows exactly once" in out, out


@pytest.mark.slow
def test_verify_refuses_a_dataset_other_than_the_synthetic_one(serve, dataset_path):
    server = serve("--data", dataset_path(1000), "--workers", 1)
    [(code, out)] = run_ranks([server.address], 1, "--epochs", "1", "--verify")
    assert code == 1, out
    assert "verify failed: --verify needs the server's built-in synthetic dataset" in out, out


def test_verify_catches_wrong_batches_repeated_rows_and_gaps(serve):
    example = load_example()
    server = serve("--synthetic-rows", 3000, "--workers", 1)
    with Client(server.address, batch_size=100, seed=3) as client:
        checker = example.RowChecker(client, PlanParams(batch_size=100, seed=3))
        first, second = [
            {name: np.array(a) for name, a in batch.items()}
            for batch, _ in zip(client.epoch(0), range(2))
        ]
    checker.check_batch(0, 0, first)
    with pytest.raises(example.VerifyError, match="epoch 0 batch 0: got rows"):
        checker.check_batch(0, 0, second)
    tampered = {"x": first["x"].copy(), "y": first["y"].copy()}
    tampered["y"][5] = (tampered["y"][5] + 1) % 10
    with pytest.raises(example.VerifyError, match="y differs"):
        checker.check_batch(0, 0, tampered)
    tampered["x"][5, 7] += 1.0
    with pytest.raises(example.VerifyError, match="not rows of the dataset|x differs"):
        checker.check_batch(0, 0, tampered)
    checker.check_batch(0, 1, second)

    with pytest.raises(example.VerifyError, match="got 200 rows, the plan gives this rank 3000"):
        checker.end_epoch(0)
    plan = checker.plan
    checker._seen = [plan.indices(0, k) for k in range(29)] + [plan.indices(0, 0)]
    with pytest.raises(example.VerifyError, match="100 rows came more often than the plan "
                                                  "gives them, 100 less often"):
        checker.end_epoch(0)
    everything = plan.order(0)
    assert checker.check_ranks(0, [everything]) == (3000, 0, 0)
    with pytest.raises(example.VerifyError, match="100 rows went to ranks more often"):
        checker.check_ranks(0, [everything, everything[:100]])
    with pytest.raises(example.VerifyError, match="0 rows went .* 1 less often"):
        checker.check_ranks(0, [everything[1:]])
