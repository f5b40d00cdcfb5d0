"""examples/train_lm.py: a byte-level language model on packed rows of the stdlib's own source.

The script serves a sample of the standard library's ``*.py`` files itself (or trains against a
``batchfeed serve --data`` of the Parquet file its ``--make-data`` writes), and its loss falls.
Its attention mask never lets a document see another one packed into the same row.
"""

from __future__ import annotations

import importlib.util
import re
import shlex

import numpy as np
import pytest
from conftest import EXAMPLES, run_example

torch = pytest.importorskip("torch", reason="the example trains with torch")
pytest.importorskip("tqdm", reason="the example shows a tqdm progress bar")

SCRIPT = EXAMPLES / "train_lm.py"
LOSSES_RE = re.compile(r"^losses: ([0-9. ]+)$", re.M)
TINY = ("--files", 40, "--seq-len", 128, "--batch-size", 8, "--dim", 64, "--steps", 25,
        "--epochs", 3, "--seed", 1)


def run_script(*args: object, timeout: float = 60.0) -> tuple[int, str, str]:
    return run_example("train_lm.py", *args, timeout=timeout)


def falling_losses(out: str, epochs: int) -> list[float]:
    [found] = LOSSES_RE.findall(out)
    curve = [float(v) for v in found.split()]
    assert len(curve) == epochs, out
    assert curve[-1] < 0.85 * curve[0], f"the loss did not fall enough: {curve}\n{out}"
    return curve


def load_script():
    spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_loss_falls_on_stdlib_files_it_serves_itself():
    code, out, err = run_script(*TINY)
    assert code == 0, out + err
    assert re.search(r"^serving [0-9]+ stdlib files \([0-9.]+ MB\) at ipc://", out, re.M), out
    for epoch in range(3):
        assert re.search(rf"^epoch {epoch}: mean loss [0-9.]+ \([0-9.]+ bits per byte\) over "
                         r"[0-9,]+ predictions, [0-9,]+ tokens/s, waiting on data [0-9.]+%$",
                         out, re.M), out
    assert re.search(r"tokens/s, waiting on data [0-9.]+%", err), err  # the progress bar
    curve = falling_losses(out, 3)
    assert curve[0] < np.log(256) + 0.1  # a mean per-token cross-entropy over 256 byte ids


@pytest.mark.slow
def test_a_served_parquet_file_trains_the_same_way(serve, tmp_path):
    path = tmp_path / "stdlib.parquet"
    code, out, err = run_script("--make-data", path, "--files", 40, "--seed", 1)
    assert code == 0, out + err
    command = shlex.split(out.strip().splitlines()[-1])
    assert command == ["batchfeed", "serve", "--data", str(path)], out
    server = serve(*command[2:], "--workers", 1)
    assert "tokens: uint8[*]" in server.ready_line, server.ready_line
    code, out, err = run_script("--address", server.address, *TINY, "--no-progress")
    assert code == 0, out + err
    assert re.search(r"^[0-9,]+ documents of 'stdlib' from tcp://", out, re.M), out
    falling_losses(out, 3)


def test_attention_never_crosses_a_document_boundary():
    lm = load_script()
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]])
    mask = lm.document_mask(seg)[:, 0]
    for b in range(2):
        for i in range(8):
            for j in range(8):
                expected = j <= i and seg[b, i] == seg[b, j]
                assert bool(mask[b, i, j]) == expected, (b, i, j)
    assert mask.any(-1).all()  # every query, padding too, attends to something (no NaNs)

    torch.manual_seed(0)
    model = lm.ByteLM(dim=32, layers=2, heads=4)
    tokens = torch.randint(0, 256, (1, 8))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    seg1 = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    changed = tokens.clone()
    changed[0, :3] = (changed[0, :3] + 1) % 256  # another first document
    with torch.no_grad():
        a, b = model(tokens, seg1, positions), model(changed, seg1, positions)
    assert not torch.isnan(a).any()
    assert torch.allclose(a[0, 3:6], b[0, 3:6], atol=1e-6)  # the later documents never saw it
    assert not torch.allclose(a[0, :3], b[0, :3])


def test_the_loss_skips_padding_and_predictions_across_documents():
    lm = load_script()
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    tokens = torch.tensor([[10, 11, 20, 21, 22, 0]])
    logits = torch.zeros(1, 6, 256)
    logits[0, 0, 11] = logits[0, 2, 21] = logits[0, 3, 22] = 50.0  # right about every real one
    logits[0, 1, 99] = logits[0, 4, 99] = 50.0  # wrong across the boundary and into padding
    loss, n = lm.next_token_loss(logits, tokens, seg)
    assert n == 3 and float(loss) < 1e-6


def test_stdlib_files_leave_out_site_packages_and_sample_by_seed():
    lm = load_script()
    files = lm.stdlib_files()
    assert files and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    assert lm.stdlib_files(10, seed=3) == lm.stdlib_files(10, seed=3) != lm.stdlib_files(10, 4)
    docs = lm.read_documents(lm.stdlib_files(5, seed=3))
    assert all(d.dtype == np.uint8 and len(d) for d in docs)
