"""examples/train_mlp.py, train_cnn.py and train_text.py against real servers: the loss falls.

Each example test makes the data with the script's ``--make-data`` mode, serves it with the very
command that mode prints, trains a few epochs at a small size, and reads the per-epoch mean
losses from the script's last ``losses:`` line.  ``batchfeed.transforms.trim_padding``, which the
text example relies on, is tested on its own and through a server.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, run_example

pytest.importorskip("torch", reason="the examples train with torch (pip install '.[examples]')")
pytest.importorskip("tqdm", reason="the examples show a tqdm progress bar (pip install tqdm)")

from batchfeed import Client
from batchfeed.server.dataset import synthetic_arrays
from batchfeed.transforms import trim_padding

LOSSES_RE = re.compile(r"^losses: ([0-9. ]+)$", re.M)
WIDTH_RE = re.compile(r"^epoch \d+: .*batch width (\d+) on average", re.M)


def make_data(script: str, path: Path, *args: object) -> list[str]:
    """Run ``--make-data``; returns the arguments of the ``batchfeed serve`` command it prints."""
    code, out, err = run_example(script, "--make-data", path, *args)
    assert code == 0, out + err
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:2] == ["batchfeed", "serve"], out
    assert command[command.index("--data") + 1] == str(path), out
    return command[2:]


def losses(out: str) -> list[float]:
    found = LOSSES_RE.findall(out)
    assert len(found) == 1, out
    return [float(v) for v in found[0].split()]


def assert_loss_falls(out: str, epochs: int, by: float) -> list[float]:
    """The last epoch's mean loss is below ``by`` times the first's."""
    curve = losses(out)
    assert len(curve) == epochs, out
    assert curve[-1] < by * curve[0], f"the loss did not fall enough: {curve}\n{out}"
    return curve


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- the MLP


@pytest.mark.slow
def test_mlp_learns_the_builtin_synthetic_data_and_shows_its_progress(serve):
    server = serve("--synthetic-rows", 20000, "--workers", 1)
    code, out, err = run_example("train_mlp.py", "--address", server.address, "--epochs", 3,
                                 "--batch-size", 128, "--hidden", 32)
    assert code == 0, out + err
    assert "20,000 rows of 'synthetic'" in out, out
    for epoch in range(3):
        assert re.search(rf"^epoch {epoch}: mean loss [0-9.]+, accuracy [0-9.]+%, [0-9,]+ "
                         r"samples/s, waiting on data [0-9.]+%$", out, re.M), out
    assert re.search(r"samples/s, waiting on data [0-9.]+%", err), err  # the progress bar
    assert_loss_falls(out, 3, by=0.7)


@pytest.mark.slow
def test_mlp_make_data_writes_the_builtin_dataset_for_several_loaders(serve, tmp_path):
    path = tmp_path / "mlp.npz"
    serve_args = make_data("train_mlp.py", path, "--rows", 5000)
    with np.load(path) as saved:
        expected = synthetic_arrays(5000)
        assert sorted(saved.files) == ["x", "y"]
        assert np.array_equal(saved["x"], expected["x"])
        assert np.array_equal(saved["y"], expected["y"])
    loaders = [serve(*serve_args, "--workers", 1) for _ in range(2)]
    code, out, err = run_example("train_mlp.py", "--address",
                                 ",".join(srv.address for srv in loaders), "--epochs", 3,
                                 "--batch-size", 64, "--hidden", 32, "--no-progress")
    assert code == 0, out + err
    assert f"from {loaders[0].address}, {loaders[1].address}," in out, out
    assert_loss_falls(out, 3, by=0.8)


# --------------------------------------------------------------------------------- the CNN


@pytest.mark.slow
def test_cnn_learns_images_augmented_by_the_server(serve, tmp_path):
    path = tmp_path / "images.npz"
    serve_args = make_data("train_cnn.py", path, "--rows", 1000)
    assert serve_args[-2:] == ["--transform", "batchfeed.transforms:augment"]
    with np.load(path) as saved:
        assert saved["x"].dtype == np.uint8 and saved["x"].shape == (1000, 3, 32, 32)
        assert saved["y"].dtype == np.int64 and set(np.unique(saved["y"])) == set(range(10))
    server = serve(*serve_args, "--workers", 1)
    code, out, err = run_example("train_cnn.py", "--address", server.address, "--epochs", 4,
                                 "--batch-size", 32, "--width", 8, "--no-progress")
    assert code == 0, out + err
    assert "1,000 images of 'images'" in out, out
    assert_loss_falls(out, 4, by=0.6)


@pytest.mark.slow
def test_cnn_asks_for_the_augment_transform_when_the_server_runs_none(serve, tmp_path):
    path = tmp_path / "images.npz"
    make_data("train_cnn.py", path, "--rows", 100)
    server = serve("--data", path, "--workers", 1)
    code, out, err = run_example("train_cnn.py", "--address", server.address, "--epochs", 1,
                                 "--no-progress")
    assert code != 0, out + err
    assert "start the server with --transform batchfeed.transforms:augment" in err, err


# --------------------------------------------------------------------------------- the text model


@pytest.mark.slow
def test_text_learns_from_batches_the_server_trims(serve, tmp_path):
    path = tmp_path / "text"  # a directory of .npy files, this time
    serve_args = make_data("train_text.py", path, "--rows", 2000, "--max-len", 64)
    assert sorted(p.name for p in path.iterdir()) == ["label.npy", "length.npy", "tokens.npy"]
    assert serve_args[-2:] == ["--transform", "batchfeed.transforms:trim_padding"]
    server = serve(*serve_args, "--workers", 1)
    code, out, err = run_example("train_text.py", "--address", server.address, "--epochs", 3,
                                 "--batch-size", 32, "--no-progress")
    assert code == 0, out + err
    widths = [int(w) for w in WIDTH_RE.findall(out)]
    assert len(widths) == 3 and max(widths) < 64, out  # batches came trimmed
    assert_loss_falls(out, 3, by=0.8)


def test_text_make_data_pads_with_zeros_past_each_length():
    example = load_example("train_text")
    data = example.make_sequences(500, max_len=40, vocab=300, classes=4, seed=1)
    tokens, length, label = data["tokens"], data["length"], data["label"]
    assert tokens.dtype == np.int32 and tokens.shape == (500, 40)
    assert length.dtype == np.int64 and label.dtype == np.int64
    assert length.min() >= example.MIN_LEN and length.max() <= 40
    assert len(np.unique(length)) > 10  # variable lengths
    valid = np.arange(40) < length[:, None]
    assert np.all(tokens[~valid] == 0) and np.all(tokens[valid] > 0)
    assert tokens.max() < 300 and set(np.unique(label)) == set(range(4))
    own = (tokens - 1) // 8 == label[:, None]  # keywords 1..32: class c owns 8c+1 .. 8c+8
    assert np.all((own & (tokens >= 1) & (tokens <= 32)).sum(1) >= 1)


# --------------------------------------------------------------------------------- trim_padding


def padded(lengths: list[int], width: int) -> dict[str, np.ndarray]:
    length = np.array(lengths, np.int64)
    tokens = np.arange(1, len(lengths) * width + 1, dtype=np.int32).reshape(len(lengths), width)
    tokens[np.arange(width) >= length[:, None]] = 0
    return {"tokens": tokens, "length": length, "label": np.arange(len(lengths))}


def test_trim_padding_cuts_tokens_to_the_longest_length_in_the_batch():
    batch = padded([3, 7, 1, 5], width=12)
    out = trim_padding({k: v.copy() for k, v in batch.items()}, np.random.default_rng(0))
    assert out["tokens"].shape == (4, 7) and out["tokens"].dtype == np.int32
    assert np.array_equal(out["tokens"], batch["tokens"][:, :7])
    assert np.array_equal(out["length"], batch["length"])
    assert np.array_equal(out["label"], batch["label"])
    assert np.all(batch["tokens"][:, 7:] == 0)  # only padding was cut


def test_trim_padding_keeps_a_full_batch_and_one_column_of_an_empty_one():
    full = padded([12, 2], width=12)
    assert trim_padding(full, np.random.default_rng(0))["tokens"].shape == (2, 12)
    empty = padded([0, 0, 0], width=12)
    assert trim_padding(empty, np.random.default_rng(0))["tokens"].shape == (3, 1)


def test_trim_padding_refuses_lengths_that_do_not_fit_the_tokens():
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 12\]"):
        trim_padding(padded([3, 13], width=12), np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs tokens"):
        trim_padding({"tokens": np.zeros((2, 5)), "length": np.zeros(3)},
                     np.random.default_rng(0))


def test_trim_padding_through_a_server_gives_each_batch_its_own_width(serve, dataset_path):
    rng = np.random.default_rng(0)
    n, width = 500, 48
    data = padded(rng.integers(0, width + 1, n).tolist(), width)
    data["id"] = np.arange(n, dtype=np.int64)
    server = serve("--data", dataset_path(arrays=data), "--workers", 1,
                   "--transform", "batchfeed.transforms:trim_padding")
    seen, widths = [], set()
    with Client(server.address, batch_size=16, seed=2) as client:
        for batch in client.epoch(0):
            ids = batch["id"]
            longest = int(data["length"][ids].max())
            assert batch["tokens"].shape == (len(ids), max(longest, 1))
            assert np.array_equal(batch["tokens"], data["tokens"][ids, : max(longest, 1)])
            assert np.array_equal(batch["length"], data["length"][ids])
            seen.append(ids.copy())
            widths.add(batch["tokens"].shape[1])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))
    assert len(widths) > 1, widths
