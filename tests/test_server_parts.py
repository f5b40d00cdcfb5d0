"""The server's catalog and supervisor, driven in this process: a catalog over columns of the
test's making (which dataset, what a session's plan may ask, data that changed under it), and a
supervisor over fake worker handles (timeouts, describing itself).  No server process.
"""

from __future__ import annotations

import numpy as np
import pytest

from batchfeed.server import supervisor as sup
from batchfeed.server.catalog import Catalog
from batchfeed.server.dataset import DatasetSpec, FieldStorage
from batchfeed.shared.errors import DatasetError, InvalidRequest
from batchfeed.shared.plan import PlanParams
from batchfeed.shared.schema import RAGGED, Field, Ragged

ROWS = 100


def spec(name: str = "d") -> DatasetSpec:
    fields = (Field("x", np.dtype(np.float32), (4,)), Field("label", np.dtype(np.int64), ()),
              Field("tokens", np.dtype(np.uint8), (), RAGGED))
    return DatasetSpec(name, ROWS, fields, (FieldStorage(),) * 3)


def columns() -> dict:
    offsets = np.arange(ROWS + 1, dtype=np.int64) * 3
    return {"x": np.zeros((ROWS, 4), np.float32), "label": np.arange(ROWS) % 4,
            "tokens": Ragged(np.ones(3 * ROWS, np.uint8), offsets)}


class Changing:
    """A dataset whose held files change when the test says."""

    def __init__(self, d: DatasetSpec):
        self.spec = d
        self.why: str | None = None

    def changed(self) -> str | None:
        return self.why


def catalog(*names: str, held: list | None = None) -> Catalog:
    specs = {n: spec(n) for n in names or ("d",)}
    return Catalog(specs, {}, {n: columns() for n in specs}, held or [])


def test_the_catalog_names_the_choices_when_a_dataset_is_not_said_or_unknown() -> None:
    assert catalog("d").dataset(None).name == "d"
    with pytest.raises(InvalidRequest, match="serves several datasets .a, b.; pick one"):
        catalog("a", "b").dataset(None)
    with pytest.raises(InvalidRequest, match="unknown dataset 'c'; this server serves: a, b"):
        catalog("a", "b").dataset("c")


def test_a_plan_is_checked_against_the_data_and_the_servers_limits() -> None:
    c = catalog()
    d = c.dataset(None)
    plan = c.plan(d, PlanParams(batch_size=10, sampling="balanced", label="label"), 2**20)
    assert plan.batches_per_epoch == 10
    with pytest.raises(InvalidRequest, match="'tokens' holds variable-length rows"):
        c.plan(d, PlanParams(batch_size=10, sampling="balanced", label="tokens"), 2**20)
    with pytest.raises(InvalidRequest, match="label field 'x' must hold one integer per row"):
        c.plan(d, PlanParams(batch_size=10, sampling="balanced", label="x"), 2**20)
    with pytest.raises(InvalidRequest, match="pad_value=256 does not fit field 'tokens'"):
        c.plan(d, PlanParams(batch_size=10, pad_value=256), 2**20)
    with pytest.raises(InvalidRequest, match="--max-order-mb"):
        c.plan(d, PlanParams(batch_size=10, sampling="weighted", weights="label",
                             epoch_rows=10**7), 1024)


def test_a_dataset_whose_files_changed_is_served_no_more_saying_why() -> None:
    changing = Changing(spec())
    c = Catalog({"d": changing.spec}, {}, {"d": columns()}, [changing])
    assert c.changed() == [] and c.dataset("d").name == "d"
    changing.spec = DatasetSpec("d", ROWS, changing.spec.fields, changing.spec.storage,
                                files=(object(),))  # type: ignore[arg-type]
    c = Catalog({"d": changing.spec}, {}, {"d": columns()}, [changing])
    changing.why = "x.npy changed in place"
    assert c.changed() == [("d", "x.npy changed in place")]
    assert c.changed() == []  # once
    with pytest.raises(DatasetError, match="served no more: x.npy changed in place"):
        c.dataset("d")


class FakeProcess:
    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class Handle:
    """What the supervisor reads of a worker (supervisor.WorkerHandle)."""

    def __init__(self, index: int, tasks: dict[int, float], progress_at: float):
        self.index, self.tasks, self.progress_at = index, tasks, progress_at
        self.process = FakeProcess()
        self.timed_out, self.pid = False, 100 + index

    def alive(self) -> bool:
        return not self.process.killed


def test_a_worker_without_progress_for_the_task_timeout_is_killed_and_marked() -> None:
    s = sup.Supervisor(lambda i: None, 2, 5.0, None)  # type: ignore[arg-type]
    busy, idle = Handle(0, {1: 0.0}, progress_at=0.0), Handle(1, {}, progress_at=0.0)
    s.workers = [busy, idle]  # type: ignore[list-item]
    s.kill_stuck(4.0)
    assert not busy.process.killed  # not yet
    s.kill_stuck(6.0)
    assert busy.process.killed and busy.timed_out and not idle.process.killed
    assert s.counters() == {"worker_restarts": 0, "worker_timeouts": 1}
    assert s.describe() == {"workers": 2, "worker_pids": [100, 101]}
