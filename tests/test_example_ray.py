"""examples/train_ray.py: Ray Train's TorchTrainer (2 workers, DDP on CPU) from batchfeed
loaders on a simulated 3-node Ray cluster; rank 1 fails once mid-epoch, Ray Train restarts the
workers from the last checkpoint (the model and each rank's loader state), and ``--verify``
checks every batch against the plan and every row once per epoch over both ranks."""

from __future__ import annotations

import pytest
from conftest import run_example

pytest.importorskip("ray", reason="pip install 'batchfeed[ray]'")
pytest.importorskip("torch", reason="the example trains with torch (pip install '.[torch]')")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_train_resumes_exactly_after_a_worker_failure(tmp_path) -> None:
    code, out, err = run_example("train_ray.py", "--fail-at", "1:5", "--verify",
                                 "--storage", tmp_path, timeout=360)
    both = out + err
    assert code == 0, both[-3000:]
    assert "injected failure at epoch 1, batch 5" in both
    assert "rank 1: resumed at epoch 1" in both or "rank 1: resumed at epoch 0" in both
    for epoch in (0, 1):
        assert f"verify: epoch {epoch}: 20,000 rows exactly once over 2 ranks" in out
    assert (tmp_path / "failed-once").exists()
