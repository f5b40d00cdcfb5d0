"""A transform is run once at start, on sample batches, before the server says it is ready
(issue 21).

- a transform that cannot serve stops the start with exit code 2 and one line: a factory named
  without its call, one that raises on the dataset (a field it lacks), an output that cannot be
  served, a declared ``output_schema`` that is not what it returns;
- what it returns is the schema clients are told at HELLO (no longer learned from the first
  batch; a ``str`` field passed through stays ``str``), and what the slots are sized from: a
  batch of 256 rows of the output fits one slot by default;
- a packed session whose rows the transform cannot take is refused at HELLO;
- a ``batch_size`` larger than the dataset is one batch of all of it, or says that it is
  larger than the dataset (never "restart with --slot-mb 68665").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rows

import batchfeed
from batchfeed import Client, DatasetError, InvalidRequest

REPO = Path(__file__).resolve().parents[1]
N = 1003

TRANSFORMS = '''
import numpy as np
from batchfeed import Ragged

def missing_field(batch, rng):
    return {"y": batch["nope"]}

def objects(batch, rng):
    return {"y": np.array([object()] * len(batch["id"]))}

def lies(batch, rng):
    return {"id": batch["id"], "x": batch["x"].astype(np.float64)}

lies.output_schema = {"id": "same", "x": ("float32", (3,))}

def text_and_lengths(batch, rng):
    text = batch["text"]
    return {"text": text, "n": np.diff(text.offsets)}

def shift_ragged(batch, rng):
    tokens = batch["tokens"]
    return {"tokens": Ragged(tokens.values + 1, tokens.offsets)}

def make_double(factor=2):
    def double(batch, rng):
        return {"x": batch["x"] * factor}
    return double
'''


@pytest.fixture
def helpers(tmp_path: Path) -> Path:
    (tmp_path / "starttx.py").write_text(TRANSFORMS)
    return tmp_path


def start(data: Path, transform: str,
          pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env_path = ":".join(str(p) for p in (pythonpath, REPO) if p is not None)
    return subprocess.run([sys.executable, "-m", "batchfeed", "serve", "--data", str(data),
                           "--transform", transform, "--bind", "tcp://127.0.0.1:0",
                           "--workers", "1"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path})


def refused_in_one_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "ready" not in out.stdout
    return lines[0]


def image_folder(root: Path, n: int = 12, size: tuple[int, int] = (40, 30)) -> Path:
    image = pytest.importorskip("PIL.Image", reason="the image transforms need Pillow")
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i:03d}.jpg", quality=90)
    return root


def test_a_factory_named_without_its_call_stops_the_start(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images")
    line = refused_in_one_line(start(folder, "batchfeed.transforms:decode_image"))
    assert "names a factory without its call" in line and "write decode_image(size=224)" in line


def test_a_transform_that_fails_on_the_dataset_stops_the_start(dataset_path, helpers) -> None:
    line = refused_in_one_line(start(dataset_path(N), "starttx:missing_field", helpers))
    assert line.startswith("batchfeed serve: error: transform starttx:missing_field raised on "
                           "a sample batch of dataset 'data' (rows 0..3) at start: KeyError: "
                           "'nope' (the batch has id, x, img, flag)"), line


def test_an_output_that_cannot_be_served_stops_the_start(dataset_path, helpers) -> None:
    line = refused_in_one_line(start(dataset_path(N), "starttx:objects", helpers))
    assert "field 'y' has dtype object, which batchfeed cannot serve" in line, line


def test_a_declared_schema_is_checked_against_the_output(dataset_path, helpers) -> None:
    line = refused_in_one_line(start(dataset_path(N), "starttx:lies", helpers))
    assert "declares output_schema [id: int64[], x: float32[3]] but returned [id: int64[], " \
           "x: float64[3]]" in line, line


def test_the_derived_schema_is_told_at_hello(serve, dataset_path, helpers) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1, "--transform",
                "starttx:make_double(factor=3)", env={"PYTHONPATH": f"{helpers}:{REPO}"})
    assert "transform starttx:make_double(factor=3) -> [x: float32[3]]" in srv.ready_line
    with Client(srv.address, batch_size=100, shuffle="none") as client:
        assert [(f.name, f.dtype.name, f.shape) for f in client.fields] == [
            ("x", "float32", (3,))]  # before any batch
        batch = next(iter(client.epoch(0)))
    assert np.array_equal(batch["x"], make_rows(N)["x"][:100] * 3)


def test_a_str_field_passed_through_stays_str_without_a_declaration(helpers) -> None:
    sys.path.insert(0, str(helpers))
    try:
        data = {"text": ["ab", "c", "déf", ""], "y": np.arange(4)}
        with batchfeed.serve(data, workers=1, transforms=("starttx:text_and_lengths",)) as srv, \
                Client(srv.address, batch_size=4, shuffle="none") as client:
            assert [(f.name, f.kind) for f in client.fields] == [("text", "str"),
                                                                 ("n", "fixed")]
            [batch] = list(client.epoch(0))
        assert batch["text"] == ["ab", "c", "déf", ""]
        assert batch["n"].tolist() == [2, 1, 4, 0]
    finally:
        sys.path.remove(str(helpers))
        sys.modules.pop("starttx", None)


def test_a_packed_session_the_transform_cannot_take_is_refused_at_hello(helpers) -> None:
    sys.path.insert(0, str(helpers))
    try:
        docs = {"tokens": [np.arange(n, dtype=np.int32) for n in range(1, 40)]}
        with batchfeed.serve(docs, workers=1, transforms=("starttx:shift_ragged",)) as srv:
            with Client(srv.address, batch_size=4, shuffle="none") as client:  # rows: fine
                assert next(iter(client.epoch(0)))["tokens"][0, 0] == 1
            with pytest.raises(InvalidRequest, match=r"transform starttx:shift_ragged raised on "
                               r"a sample of packed rows .*AttributeError.* sees packed rows: "
                               r"tokens, tokens_segment_ids, tokens_positions"):
                Client(srv.address, batch_size=4, pack={"tokens": 16})
    finally:
        sys.path.remove(str(helpers))
        sys.modules.pop("starttx", None)


def test_slots_hold_256_rows_of_the_transforms_output(serve, tmp_path: Path) -> None:
    pytest.importorskip("simplejpeg", reason="the image transforms need simplejpeg")
    folder = image_folder(tmp_path / "images", n=300)
    srv = serve("--data", folder, "--workers", 1, "--transform",
                "batchfeed.transforms:train_images(size=64)")
    # 256 x (3 x 64 x 64 float32 + an int64 label) = 12.0 MiB, over the 8 MiB default
    assert "slots of 13.0 MiB" in srv.ready_line, srv.ready_line
    with Client(srv.address, batch_size=256) as client:
        sizes = [len(b["label"]) for b in client.epoch(0)]
        assert sizes == [256, 44] and client.fields[0].shape == (3, 64, 64)


def test_a_batch_larger_than_the_dataset_is_one_batch_or_says_so(serve, dataset_path) -> None:
    srv = serve("--data", dataset_path(N), "--workers", 1)
    with Client(srv.address, batch_size=10**9, shuffle="none") as client:
        [batch] = list(client.epoch(0))
        assert len(batch["id"]) == N
    small = serve("--data", dataset_path(N, name="small.npz"), "--workers", 1,
                  "--slot-mb", 1 / 16)  # 64 KiB: not all of the 1,003 rows (81 kB)
    with pytest.raises(InvalidRequest) as info:
        Client(small.address, batch_size=10**9)
    message = str(info.value)
    assert "batch_size=1,000,000,000 is larger than the dataset (1,003 rows)" in message
    assert "ask for a batch_size of at most 1,003" in message and "--slot-mb" not in message
    with Client(small.address, batch_size=10**9, world_size=2, rank=1) as client:  # 502 rows
        assert [len(b["id"]) for b in client.epoch(0)] == [502]


def test_serve_from_python_refuses_a_bad_transform_in_the_caller(helpers) -> None:
    sys.path.insert(0, str(helpers))
    try:
        with pytest.raises(DatasetError, match="KeyError: 'nope'"):
            batchfeed.serve({"id": np.arange(10)}, workers=1,
                            transforms=("starttx:missing_field",))
    finally:
        sys.path.remove(str(helpers))
        sys.modules.pop("starttx", None)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readmes_image_command_serves_batches_of_256(serve, tmp_path: Path) -> None:
    """README: ``batchfeed serve --data imagenet/train --transform
    "batchfeed.transforms:train_images(size=224)"``, then ``Client(..., batch_size=256)``
    (on an ephemeral port, one worker: 10 slots of 148 MiB, 1.4 GiB of /dev/shm)."""
    pytest.importorskip("simplejpeg", reason="the image transforms need simplejpeg")
    folder = image_folder(tmp_path / "imagenet" / "train", n=300, size=(256, 300))
    srv = serve("--data", folder, "--transform", "batchfeed.transforms:train_images(size=224)",
                "--workers", 1)
    assert "slots of 148.0 MiB" in srv.ready_line, srv.ready_line
    with Client(srv.address, batch_size=256) as client:
        batches = [(b["image"].shape, b["image"].dtype.name) for b in client.epoch(0)]
    assert batches == [((256, 3, 224, 224), "float32"), ((44, 3, 224, 224), "float32")]
