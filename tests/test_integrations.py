"""The framework examples: Lightning DDP, Keras 3 (torch backend) and the pytorch/examples loop.

Each script serves scikit-learn's digits itself with ``batchfeed.serve`` and is run here as a
subprocess with a timeout, at its own small size.  The promises: the loss falls, every epoch
comes in a new order, and (Lightning, two DDP ranks, half of each epoch) each pass over the
loader starts the next epoch and the ranks' rows are exactly their share of the plan.  A
Lightning run resumed from a checkpoint (one process) trains on exactly the batches, and to
the same losses, as the run that was not stopped.  A test skips, naming the package, where
lightning, torchdata, keras or scikit-learn is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import conftest
import numpy as np
import pytest

from batchfeed import Client
from batchfeed.shared.params import PlanParams
from batchfeed.shared.plan import BatchPlan

DIGITS = 1797  # rows of sklearn.datasets.load_digits()


def needs(*modules: str) -> None:
    """Skip unless every module is installed (found, not imported: they are slow to import)."""
    for name in ["torch", "sklearn", *modules]:
        if importlib.util.find_spec(name) is None:
            package = {"sklearn": "scikit-learn"}.get(name, name)
            pytest.skip(f"{name} is not installed (pip install {package})")


def run_example(script: str, *args: object, timeout: float) -> str:
    """Run ``examples/<script>``; its stdout, after asserting it exited 0."""
    code, out, err = conftest.run_example(script, *args, timeout=timeout)
    assert code == 0, out + err
    return out


def line(out: str, name: str) -> list[str]:
    found = re.findall(rf"^{name}: (.+)$", out, re.M)
    assert len(found) == 1, out
    return found[0].split()


def assert_loss_falls(out: str, epochs: int, by: float) -> None:
    losses = [float(v) for v in line(out, "losses")]
    assert len(losses) == epochs, out
    assert losses[-1] < by * losses[0], f"the loss did not fall enough: {losses}\n{out}"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, conftest.EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ Lightning


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_ddp_ranks_get_their_share_and_each_epoch_a_new_order(tmp_path):
    needs("lightning")
    record = tmp_path / "rows.json"
    out = run_example("train_lightning.py", "--devices", 2, "--epochs", 3,
                      "--limit-train-batches", 0.5, "--no-progress", "--record", record,
                      timeout=240)
    assert_loss_falls(out, 3, by=0.7)
    assert re.search(r"^epoch 0 .* [0-9,]+ samples/s, waiting on data [0-9.]+%$", out, re.M), out
    epochs = json.loads(record.read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2], out
    # Lightning stops each pass half-way; the next pass is still the next epoch.
    assert [e["batchfeed_epoch"] for e in epochs] == [0, 1, 2], out
    plans = [BatchPlan(DIGITS, PlanParams(batch_size=64, seed=0, rank=r, world_size=2))
             for r in range(2)]
    steps = int(plans[0].batches_per_epoch * 0.5)  # Lightning's limit_train_batches=0.5
    for e in epochs:
        for rank, rows in enumerate(e["rows"]):  # exactly the plan's first batches of the epoch
            expected = np.concatenate([plans[rank].indices(e["epoch"], k) for k in range(steps)])
            assert rows == expected.tolist(), (e["epoch"], rank)
        shared = set(e["rows"][0]) & set(e["rows"][1])
        assert len(shared) <= plans[0].padded_rows, shared  # disjoint but for padding
    seen = [tuple(r for rows in e["rows"] for r in rows) for e in epochs]
    assert len(set(seen)) == 3  # three orders
    assert len({frozenset(s) for s in seen}) == 3  # and, half an epoch each, three row sets


# ------------------------------------------------------------------------ Lightning: resuming

STEPS = 14  # one rank: 29 batches of 64 per epoch, limit_train_batches=0.5 takes 14
EVERY = 7  # checkpoints at steps 7, 14 (epoch 0's last), 21 (epoch 1, batch 7), 28, ...


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """A run of 3 epochs in one process, not stopped, with a checkpoint at each epoch's end
    and every 7 steps: its recorded epochs, and the folder of its checkpoints (those a run
    stopped there would have left)."""
    needs("lightning", "torchdata")
    folder = tmp_path_factory.mktemp("lightning")
    record = folder / "rows.json"
    run_example("train_lightning.py", "--devices", 1, "--epochs", 3, "--no-progress",
                "--record", record, "--ckpt-dir", folder / "ckpt", "--ckpt-every", EVERY,
                timeout=120)
    return json.loads(record.read_text())["epochs"], folder / "ckpt"


def resume(checkpoint: Path, tmp_path: Path) -> list[dict]:
    """The epochs recorded by a new process that resumes ``checkpoint`` and runs to epoch 3."""
    record = tmp_path / "resumed.json"
    run_example("train_lightning.py", "--devices", 1, "--epochs", 3, "--no-progress",
                "--record", record, "--resume", checkpoint, timeout=120)
    return json.loads(record.read_text())["epochs"]


def plan_rows(epoch: int, first_batch: int = 0) -> list[int]:
    """The plan's rows for batches ``first_batch`` to ``STEPS - 1`` of ``epoch`` (one rank)."""
    plan = BatchPlan(DIGITS, PlanParams(batch_size=64, seed=0))
    return np.concatenate([plan.indices(epoch, k) for k in range(first_batch, STEPS)]).tolist()


def assert_same_epochs(resumed: list[dict], run: list[dict]) -> None:
    """Whole resumed epochs are the run's: the same rows, and the same loss on them."""
    for epoch in resumed:
        then = run[epoch["epoch"]]
        assert epoch["rows"] == then["rows"], epoch["epoch"]
        assert epoch["loss"] == pytest.approx(then["loss"], abs=1e-6), epoch["epoch"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_resumed_after_epoch_1_trains_epoch_2_not_epoch_0(lightning_run, tmp_path):
    run, checkpoints = lightning_run
    assert [(e["epoch"], e["batchfeed_epoch"]) for e in run] == [(0, 0), (1, 1), (2, 2)]
    assert [e["rows"] for e in run] == [[plan_rows(e)] for e in range(3)]
    resumed = resume(checkpoints / "epoch1-end.ckpt", tmp_path)
    assert [(e["epoch"], e["batchfeed_epoch"]) for e in resumed] == [(2, 2)]
    assert resumed[0]["rows"] != run[0]["rows"]  # the bug: epoch 0's order again
    assert_same_epochs(resumed, run)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_resumed_mid_epoch_gets_exactly_the_rest_of_that_epoch(lightning_run,
                                                                         tmp_path):
    run, checkpoints = lightning_run
    done = 3 * EVERY - STEPS  # step 21: 7 of epoch 1's 14 batches were trained on
    resumed = resume(checkpoints / f"step{3 * EVERY}.ckpt", tmp_path)
    assert [(e["epoch"], e["batchfeed_epoch"]) for e in resumed] == [(1, 1), (2, 2)]
    assert resumed[0]["rows"] == [plan_rows(1, done)]
    assert resumed[0]["rows"][0] == run[1]["rows"][0][done * 64:]
    assert_same_epochs(resumed[1:], run)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_resumed_from_an_epochs_last_step_starts_the_next_epoch(lightning_run,
                                                                          tmp_path):
    run, checkpoints = lightning_run
    # step 14 is epoch 0's last: Lightning resumes with epoch 1 but makes no new pass
    resumed = resume(checkpoints / f"step{STEPS}.ckpt", tmp_path)
    assert [(e["epoch"], e["batchfeed_epoch"]) for e in resumed] == [(1, 1), (2, 2)]
    assert_same_epochs(resumed, run)


# ------------------------------------------------------------------------ Keras


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_keras_fit_on_a_pydataset_learns_and_reads_a_new_order_each_epoch():
    needs("keras")
    out = run_example("train_keras.py", "--epochs", 3, "--verbose", 2, timeout=150)
    assert_loss_falls(out, 3, by=0.7)
    for epoch in range(3):  # every row once per epoch
        assert re.search(rf"^epoch {epoch} \(batchfeed epoch \d+\): loss [0-9.]+, [0-9,]+ "
                         rf"samples/s, waiting on data [0-9.]+%, 1,797 rows \(1,797 distinct\)",
                         out, re.M), out
    orders = line(out, "orders")
    assert len(orders) == 3 and len(set(orders)) == 3, out
    assert "0 out-of-order reads" in out, out


@pytest.mark.slow
def test_keras_pydataset_serves_batch_i_of_the_plan_in_any_order(serve, dataset_path,
                                                                monkeypatch):
    needs("keras")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    example = load_example("train_keras")
    server = serve("--data", dataset_path(300), "--workers", 1)  # field "id" = the row number
    plan = BatchPlan(300, PlanParams(batch_size=32, seed=3))
    with Client(server.address, batch_size=32, seed=3) as client:
        dataset = example.BatchfeedPyDataset(client, x="x", y="id")
        assert len(dataset) == plan.batches_per_epoch == 10
        for i, seeks in [(0, 0), (1, 0), (2, 0), (6, 1), (3, 2), (3, 3), (4, 3), (9, 4)]:
            assert dataset[i][1].tolist() == plan.indices(0, i).tolist(), i
            assert dataset.seeks == seeks, i
        with pytest.raises(IndexError):
            dataset[10]
        dataset.on_epoch_end()
        assert dataset[0][1].tolist() == plan.indices(1, 0).tolist()
        assert not np.array_equal(plan.indices(1, 0), plan.indices(0, 0))


# ------------------------------------------------------------------------ pytorch/examples


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mnist_loop_on_digits_reaches_90_percent_and_reshuffles_every_epoch():
    needs()
    out = run_example("mnist_digits.py", "--epochs", 3, timeout=150)
    assert_loss_falls(out, 3, by=0.5)
    assert float(line(out, "test accuracy")[0]) > 0.9, out
    orders = line(out, "orders")
    assert len(orders) == 3 and len(set(orders)) == 3, out
    assert re.search(r"^Test set: Average loss: [0-9.]+, Accuracy: \d+/360", out, re.M), out
    assert re.search(r"^epoch 1: .* [0-9,]+ samples/s, waiting on data [0-9.]+%", out, re.M), out
