"""examples/train_nanogpt_style.py: a nanoGPT-style loop over ``client.stream()`` (issue 21).

Its loss falls over iterations that run across epochs, and a run resumed from its checkpoint
(``client.state_dict()`` saved beside the model) reads exactly the batches the uninterrupted
run read next.
"""

from __future__ import annotations

import re

import pytest
from conftest import run_example

pytest.importorskip("torch", reason="the example trains with torch")

LOSSES_RE = re.compile(r"^losses: ([0-9. ]+)$", re.M)
TINY = ("--files", 6, "--max-bytes", 2000, "--batch-size", 8, "--block-size", 32,
        "--eval-interval", 20, "--seed", 1)


def digests(path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.slow
def test_loss_falls_across_epochs_and_a_resumed_run_reads_the_same_batches(tmp_path) -> None:
    whole = tmp_path / "whole.log"
    code, out, err = run_example("train_nanogpt_style.py", *TINY, "--max-iters", 160,
                                 "--log-batches", whole, timeout=150)
    assert code == 0, out + err
    [found] = LOSSES_RE.findall(out)
    curve = [float(v) for v in found.split()]
    assert len(curve) == 8 and curve[-1] < 0.8 * curve[0], out
    epochs = {int(m) for m in re.findall(r"at epoch (\d+) batch", out)}
    assert len(epochs) > 1, f"the run stayed in one epoch: {out}"  # the stream ran on

    first = tmp_path / "first.log"
    code, out, err = run_example("train_nanogpt_style.py", *TINY, "--max-iters", 60,
                                 "--out-dir", tmp_path / "ckpt", "--log-batches", first,
                                 timeout=150)
    assert code == 0, out + err
    resumed = tmp_path / "resumed.log"
    code, out, err = run_example("train_nanogpt_style.py", *TINY, "--max-iters", 160,
                                 "--out-dir", tmp_path / "ckpt", "--resume",
                                 "--log-batches", resumed, timeout=150)
    assert code == 0, out + err
    assert "resumed at iteration 60" in out, out
    assert digests(first) + digests(resumed) == digests(whole)
