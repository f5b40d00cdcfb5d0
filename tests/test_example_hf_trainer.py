"""examples/train_hf_trainer.py: Hugging Face ``Trainer`` over a BatchfeedDataset (issue 21).

A tiny GPT-2 (built from a config: nothing is downloaded) on packed rows: its loss falls, and a
run resumed from a mid-run checkpoint trains on exactly the batches the uninterrupted run did
from there.
"""

from __future__ import annotations

import re

import pytest
from conftest import run_example

pytest.importorskip("torch", reason="the example trains with torch")
pytest.importorskip("transformers", reason="the example needs transformers: pip install "
                                           "transformers accelerate (after torch)")
pytest.importorskip("accelerate", reason="Trainer needs accelerate: pip install accelerate")

LOSSES_RE = re.compile(r"^losses: ([0-9. ]+)$", re.M)
TINY = ("--files", 40, "--batch-size", 8, "--seq-len", 128, "--logging-steps", 10,
        "--save-steps", 20, "--max-steps", 50, "--seed", 1)


@pytest.mark.slow
def test_trainer_loss_falls_and_a_resumed_run_continues_the_batches_exactly(tmp_path) -> None:
    whole = tmp_path / "whole.log"
    code, out, err = run_example("train_hf_trainer.py", *TINY, "--out-dir", tmp_path / "a",
                                 "--log-batches", whole, timeout=240)
    assert code == 0, out + err
    [found] = LOSSES_RE.findall(out)
    curve = [float(v) for v in found.split()]
    assert len(curve) == 5 and curve[-1] < 0.85 * curve[0], out
    assert (tmp_path / "a" / "checkpoint-20").is_dir()

    resumed = tmp_path / "resumed.log"
    code, out, err = run_example("train_hf_trainer.py", *TINY, "--out-dir", tmp_path / "b",
                                 "--resume", tmp_path / "a" / "checkpoint-20",
                                 "--log-batches", resumed, timeout=240)
    assert code == 0, out + err
    lines = whole.read_text().splitlines()
    assert [line.split()[0] for line in lines] == [str(s) for s in range(1, 51)]
    assert resumed.read_text().splitlines() == lines[20:]
