"""examples/train_jpeg.py: a CNN trains on a folder of JPEG files that a real server decodes.

The script's ``--make-data`` writes an ImageFolder of JPEGs and prints the serve command; the
test serves the folder with exactly that command (on an ephemeral port, stopped by the
``serve`` fixture), trains 3 epochs in a subprocess, and reads the per-epoch mean losses from
the script's ``losses:`` line.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import run_example

pytest.importorskip("torch", reason="the example trains with torch (pip install '.[examples]')")
pytest.importorskip("tqdm", reason="the example shows a tqdm progress bar (pip install tqdm)")
pytest.importorskip("PIL", reason="the example writes JPEG files with Pillow (pip install pillow)")

LOSSES_RE = re.compile(r"^losses: ([0-9. ]+)$", re.M)
TRANSFORM = "batchfeed.transforms:train_images(size=32)"
CLASSES = ["checks-green-on-purple", "checks-orange-on-blue", "diagonals-green-on-purple",
           "diagonals-orange-on-blue", "disc-green-on-purple", "disc-orange-on-blue",
           "stripes-across-green-on-purple", "stripes-across-orange-on-blue",
           "stripes-down-green-on-purple", "stripes-down-orange-on-blue"]


def run_script(*args: object, timeout: float = 90.0) -> tuple[int, str, str]:
    return run_example("train_jpeg.py", *args, timeout=timeout)


def make_folder(path: Path, images: int) -> list[str]:
    """Run ``--make-data``; the arguments of the ``batchfeed serve`` command it prints."""
    code, out, err = run_script("--make-data", path, "--images", images, "--seed", 1)
    assert code == 0, out + err
    command = shlex.split(out.strip().splitlines()[-1])
    assert command == ["batchfeed", "serve", "--data", str(path), "--transform", TRANSFORM], out
    return command[2:]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cnn_learns_from_jpegs_the_server_decodes_and_augments(serve, tmp_path):
    folder = tmp_path / "jpegs"
    serve_args = make_folder(folder, 600)
    assert sorted(p.name for p in folder.iterdir()) == CLASSES
    files = sorted(folder.glob("*/*.jpg"))
    assert len(files) == 600 and all(f.read_bytes()[:2] == b"\xff\xd8" for f in files[:20])

    server = serve(*serve_args, "--workers", 2)
    code, out, err = run_script("--address", server.address, "--epochs", 3, "--batch-size", 32,
                                "--width", 8, "--seed", 1, timeout=120)
    assert code == 0, out + err
    assert f"600 images of 'jpegs' from {server.address}" in out, out
    assert f"classes: {', '.join(CLASSES)}" in out, out
    for epoch in range(3):
        assert re.search(rf"^epoch {epoch}: mean loss [0-9.]+, accuracy [0-9.]+%, [0-9,]+ "
                         r"samples/s, waiting on data [0-9.]+%$", out, re.M), out
    assert re.search(r"[0-9,]+ samples/s, waiting on data [0-9.]+%", err), err  # the bar
    [found] = LOSSES_RE.findall(out)
    curve = [float(v) for v in found.split()]
    assert len(curve) == 3, out
    assert curve[-1] < 0.8 * curve[0], f"the loss did not fall enough: {curve}\n{out}"


@pytest.mark.slow
def test_it_asks_for_the_transform_when_the_server_runs_none(serve, tmp_path):
    folder = tmp_path / "jpegs"
    make_folder(folder, 40)
    server = serve("--data", folder, "--workers", 1)
    code, out, err = run_script("--address", server.address, "--epochs", 1, "--no-progress")
    assert code != 0, out + err
    assert f'start the server with --transform "{TRANSFORM}"' in err, out + err
