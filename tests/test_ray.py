"""batchfeed on Ray, on a Ray cluster of 3 nodes on this host (``ray_cluster.local_cluster``):
loaders placed over nodes and found through their handle, Ray Train ranks reading them exactly
once, a node removed and a loader killed mid-epoch with the epoch still exact, a replica added
while trainers wait, and no segment or process left behind."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray_cluster  # before ray: it keeps Ray's addresses on loopback
from conftest import shm_segments, wait_until

from batchfeed import Client
from batchfeed.shared.plan import BatchPlan, PlanParams

ray = pytest.importorskip("ray", reason="pip install 'batchfeed[ray]'")
bfray = pytest.importorskip("batchfeed.ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N = 20_000


def rows(n: int = N) -> dict[str, np.ndarray]:
    ids = np.arange(n, dtype=np.int64)
    return {"id": ids, "x": (ids[:, None] * np.array([1.0, -0.5], np.float32))}


def expected(epoch: int, n: int = N, **kw: Any) -> list[list[int]]:
    plan = BatchPlan(n, PlanParams(**kw))
    return [plan.indices(epoch, k).tolist() for k in range(plan.batches_per_epoch)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with ray_cluster.local_cluster(3) as c:
        yield c


def live_keys(handle: Any) -> dict[str, dict[str, Any]]:
    return {info["key"]: info for info in handle.loaders()}


# ------------------------------------------------------------------------------ Ray Train


def read_one_epoch(config: dict[str, Any]) -> None:
    """A Ray Train worker: its rank's epoch from the handle, and which links took the fast
    path, written to a file per rank."""
    import ray.train

    handle = config["handle"]
    with handle.client(batch_size=config["batch_size"], seed=config["seed"]) as client:
        ids = [batch["id"].tolist() for batch in client.epoch(0)]
        fast = {server["address"]: server["in_place"] for server in client.servers()}
    rank = ray.train.get_context().get_world_rank()
    local = [info["ipc"] for info in handle.local_loaders()]
    Path(config["out"], f"rank{rank}.json").write_text(
        json.dumps({"ids": ids, "fast": fast, "local": local,
                    "world": ray.train.get_context().get_world_size()}))


def test_two_shard_loaders_on_two_nodes_feed_two_train_ranks_exactly_once(cluster, tmp_path,
                                                                           serve) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    with bfray.start_loaders(rows(), shards=2, workers=1) as loaders:
        placed = live_keys(loaders.handle)
        assert sorted(placed) == ["r0s0", "r0s1"]
        assert placed["r0s0"]["node_id"] != placed["r0s1"]["node_id"]  # spread over nodes
        assert all(info["address"].startswith("tcp://127.0.0.1:") for info in placed.values())
        assert all(info["ipc"].startswith("ipc://") for info in placed.values())
        trainer = DataParallelTrainer(
            read_one_epoch,
            train_loop_config={"handle": loaders.handle, "batch_size": 500, "seed": 7,
                               "out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="read"))
        trainer.fit()
    got = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    np.savez(tmp_path / "data.npz", **rows())
    # One local server, as a subprocess: a fork of this Ray driver (batchfeed.serve) after Ray
    # Train ran left the driver's GCS client hanging (Ray 2.60).
    one = serve("--data", tmp_path / "data.npz", "--workers", 1)
    if True:
        for r in range(2):
            with Client(one.address, batch_size=500, seed=7, rank=r, world_size=2) as c:
                assert got[r]["ids"] == [b["id"].tolist() for b in c.epoch(0)]
            assert got[r]["world"] == 2
            for address in got[r]["local"]:  # a loader on the rank's node: ipc, shared memory
                assert got[r]["fast"][address], f"rank {r} did not read {address} in place"
            others = set(got[r]["fast"]) - set(got[r]["local"])
            assert all(a.startswith("tcp://") for a in others)  # the other node's: tcp
    every = sorted(i for r in range(2) for batch in got[r]["ids"] for i in batch)
    assert every == list(range(N))  # every row once, over both ranks


def read_through_a_dataset(handle: Any) -> list[int]:
    """A Ray task: a BatchfeedDataset of the handle, pickled on (as a DataLoader would), then
    one pass through a DataLoader."""
    import pickle

    from torch.utils.data import DataLoader

    dataset = pickle.loads(pickle.dumps(handle.dataset(batch_size=100, shuffle="none")))
    with dataset:
        return [int(i) for batch in DataLoader(dataset, batch_size=None) for i in batch["id"]]


def test_a_ray_task_reads_an_epoch_through_a_batchfeed_dataset_of_the_handle(cluster) -> None:
    pytest.importorskip("torch", reason="BatchfeedDataset is a torch IterableDataset")
    with bfray.start_loaders(rows(1000), workers=1) as loaders:
        task = ray.remote(num_cpus=1)(read_through_a_dataset)
        assert ray.get(task.remote(loaders.handle), timeout=120) == list(range(1000))


def read_and_tell(handle: Any) -> tuple[list[int], dict[str, bool]]:
    """A Ray task: one epoch from a client of the handle, and which links read in place."""
    with handle.client(batch_size=100, shuffle="none", rank=0, world_size=1) as client:
        ids = [int(i) for batch in client.epoch(0) for i in batch["id"]]
        return ids, {server["address"]: server["in_place"] for server in client.servers()}


def test_a_trainer_on_a_loaders_node_reads_it_over_ipc_in_place_others_over_tcp(
        cluster) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with bfray.start_loaders(rows(1000), workers=1) as loaders:
        (info,) = loaders.handle.loaders()
        other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and
                     n["NodeID"] != info["node_id"])
        seen = {}
        for node in (info["node_id"], other):
            task = ray.remote(num_cpus=1)(read_and_tell).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            seen[node] = ray.get(task.remote(loaders.handle), timeout=120)
    assert seen[info["node_id"]] == (list(range(1000)), {info["ipc"]: True})
    assert seen[other][0] == list(range(1000))
    assert list(seen[other][1]) == [info["address"]]  # tcp (in place too: one host here)


# ------------------------------------------------------------------------------ faults


def test_a_node_removed_mid_epoch_restarts_its_loader_elsewhere_and_the_epoch_is_exact(
        cluster) -> None:
    with bfray.start_loaders(rows(), shards=2, workers=1) as loaders:
        handle = loaders.handle
        head = cluster.head_node.node_id
        before = live_keys(handle)
        victim_key = next(k for k, info in before.items() if info["node_id"] != head)
        victim = before[victim_key]
        with handle.client(batch_size=200, seed=3, prefetch=4, reconnect_timeout=120) as c:
            it = c.epoch(1)
            got = [next(it)["id"].tolist() for _ in range(15)]
            removed_at = time.monotonic()
            cluster.remove_node(ray_cluster.node_of(cluster, victim["node_id"]))
            moved = wait_until(lambda: (info := live_keys(handle).get(victim_key)) and
                               info["node_id"] != victim["node_id"] and info,
                               timeout=90, what="the loader to restart on another node")
            back_s = time.monotonic() - removed_at
            got += [batch["id"].tolist() for batch in it]
        print(f"node removed: loader {victim_key} serving again on another node after "
              f"{back_s:.1f} s")
        assert got == expected(1, batch_size=200, seed=3)
        assert moved["address"] != victim["address"]
        # A removed node's processes on this one host end when they notice (a dead host's
        # would be gone with its /dev/shm); what its server left, the live loaders sweep.
        wait_until(lambda: not os.path.exists(f"/proc/{victim['pid']}"), timeout=90,
                   what="the removed node's server to end")
        gone_at = time.monotonic()
        wait_until(lambda: not {s for s in shm_segments()
                                if s.split("_")[1] == str(victim["pid"])},
                   timeout=20, what="the dead loader's segments to be removed")
        print(f"node removed: its server ended {gone_at - removed_at:.1f} s after the "
              f"removal, its segments were gone {time.monotonic() - gone_at:.1f} s later")
    cluster.add_node(**ray_cluster.NODE)  # back to 3 nodes for the next test


def test_a_killed_loader_comes_back_leaves_no_segment_and_the_epoch_is_exact(cluster) -> None:
    with bfray.start_loaders(rows(), replicas=2, workers=1) as loaders:
        handle = loaders.handle
        first = live_keys(handle)["r0s0"]
        with handle.client(batch_size=200, seed=5, prefetch=4) as c:
            it = c.epoch(0)
            got = [next(it)["id"].tolist() for _ in range(10)]
            ray.kill(loaders.actors["r0s0"], no_restart=False)
            wait_until(lambda: not {s for s in shm_segments()
                                    if s.split("_")[1] == str(first["pid"])},
                       timeout=20, what="the killed loader's segments to be removed")
            back = wait_until(lambda: (info := live_keys(handle).get("r0s0")) and
                              info["pid"] != first["pid"] and info,
                              timeout=60, what="the killed loader to come back")
            got += [batch["id"].tolist() for batch in it]
        assert got == expected(0, batch_size=200, seed=5)
        assert back["address"] != first["address"]


def test_a_loader_whose_server_dies_exits_and_ray_restarts_it(cluster) -> None:
    import signal

    with bfray.start_loaders(rows(), workers=1) as loaders:
        handle = loaders.handle
        first = live_keys(handle)["r0s0"]
        with handle.client(batch_size=200, seed=6, prefetch=4, reconnect_timeout=60) as c:
            it = c.epoch(2)
            got = [next(it)["id"].tolist() for _ in range(10)]
            os.kill(first["pid"], signal.SIGKILL)  # the server, not the actor
            back = wait_until(lambda: (info := live_keys(handle).get("r0s0")) and
                              info["actor_pid"] != first["actor_pid"] and info,
                              timeout=60, what="Ray to restart the loader")
            got += [batch["id"].tolist() for batch in it]
        assert got == expected(2, batch_size=200, seed=6)
        assert back["address"] != first["address"]
        # the restarted server removed what the SIGKILLed one left on this host
        assert not {s for s in shm_segments() if s.split("_")[1] == str(first["pid"])}


def test_no_segment_or_loader_is_left_after_stop(cluster) -> None:
    before = shm_segments()
    loaders = bfray.start_loaders(rows(), shards=2, workers=1)
    pids = [info["pid"] for info in loaders.handle.loaders()]
    assert {s for s in shm_segments() - before if int(s.split("_")[1]) in pids}
    loaders.stop()
    loaders.stop()  # twice is fine
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=20,
               what="the servers to exit")
    assert not {s for s in shm_segments() - before if int(s.split("_")[1]) in pids}


# ------------------------------------------------------------------------------ security


def test_loaders_need_the_jobs_keys(cluster) -> None:
    from batchfeed import AuthenticationError
    from batchfeed.ray_loader import JobKeys

    with bfray.start_loaders(rows(1000), workers=1) as loaders:
        handle = loaders.handle
        with handle.client(batch_size=100, shuffle="none", rank=0, world_size=1) as c:
            assert [i for b in c.epoch(0) for i in b["id"]] == list(range(1000))
        with pytest.raises(AuthenticationError, match="requires CURVE"):
            Client(handle.addresses(), batch_size=100, connect_timeout=5)
        other = bfray.LoaderSet(handle.registry, JobKeys.make(), "another job")
        with pytest.raises(AuthenticationError):  # another job's keys
            Client(handle.addresses(), batch_size=100, connect_timeout=5, curve=other.curve())


def test_bad_data_fails_the_start_with_one_line(cluster) -> None:
    from batchfeed import DatasetError

    with pytest.raises(DatasetError):
        bfray.start_loaders({"a": np.zeros(10), "b": np.zeros(11)}, workers=1)


# ------------------------------------------------------------------------------ elastic


def test_a_waiting_trainer_gets_a_second_replica_and_waits_less(cluster) -> None:
    from batchfeed.ray_elastic import WaitShareScaler

    n, bs, step = 48_000, 64, 0.016  # the trainer's step; a loader takes ~24 ms a batch
    sleepy = ("tests.transforms.basic:sleepy",)
    got: list[list[int]] = []
    marks: list[tuple[float, float, int]] = []  # (waited, wall time, replicas) per step
    with bfray.start_loaders(rows(n), workers=1, transforms=sleepy) as loaders, \
            WaitShareScaler(loaders, threshold=0.15, max_replicas=2, period_s=1.0) as scaler, \
            loaders.handle.client(batch_size=bs, seed=9, prefetch=8) as client:
        for batch in client.epoch(0):
            got.append(batch["id"].tolist())
            time.sleep(step)
            s = client.stats()
            marks.append((s["wait_s"], s["wall_s"], loaders.replicas))
    assert got == expected(0, n, batch_size=bs, seed=9)  # as one loader would serve them
    assert [e["replicas"] for e in scaler.history] == [2], scaler.history
    one = [m for m in marks if m[2] == 1]
    two = [m for m in marks if m[2] == 2][20:]  # once the new replica is in use
    share_one = (one[-1][0] - one[0][0]) / (one[-1][1] - one[0][1])
    share_two = (two[-1][0] - two[0][0]) / (two[-1][1] - two[0][1])
    print(f"elastic: wait share {share_one:.0%} with one loader, {share_two:.0%} with two; "
          f"replica added {scaler.history[0]['took_s']:.1f} s after the decision")
    assert share_one > 0.15 and share_two < share_one / 2, (share_one, share_two)
