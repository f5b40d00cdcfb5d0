"""The Docker image and docker-compose.yml: a loader and two DDP trainer ranks, end to end.

Runs only where a Docker engine answers (``.ci/docker.sh`` starts one; this test never does).
It needs no registry: the base image is made locally by ``docker/base-image.sh`` (cached by
tag), the Python wheels are fetched on the host into ``docker/wheels/`` (cached: skipped when
they are all there), and the image is built with ``--network none``.  The compose run uses
``docker/compose.hostnet.yml``: host networking, every socket on 127.0.0.1, free ports.

The app image stays tagged (``$BATCHFEED_TEST_IMAGE``, default ``batchfeed:test``) so the next
run reuses its torch layer; each rebuild removes the image it replaces.  Containers are removed
in every case.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "docker" / "wheels"
BASE_IMAGE = os.environ.get("BATCHFEED_BASE_IMAGE", "batchfeed-base:bookworm")
IMAGE = os.environ.get("BATCHFEED_TEST_IMAGE", "batchfeed:test")
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; never a CUDA build
EPOCHS = 3  # as in docker-compose.yml


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def docker_engine() -> str | None:
    """Why the test cannot run, or None."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if info.returncode != 0:
        return f"no Docker engine reachable ({info.stderr.strip()[:200]}); .ci/docker.sh starts one"
    return None


def compose_command() -> list[str] | None:
    if run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checked(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    result = run(cmd, timeout, **kw)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited with {result.returncode}:\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-4000:]}"
    )
    return result


def ensure_base_image() -> None:
    checked(["bash", "docker/base-image.sh", BASE_IMAGE], timeout=600)


def ensure_wheels() -> None:
    """pip download the dependencies into docker/wheels, unless they are all there already."""
    with open(ROOT / "pyproject.toml", "rb") as fp:
        deps = tomllib.load(fp)["project"]["dependencies"]
    requirements = [TORCH, "tqdm", *deps, "setuptools>=68", "wheel"]
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELS),
                "--only-binary=:all:", "--python-version", "3.11", *requirements]
    WHEELS.mkdir(parents=True, exist_ok=True)
    offline = run([*download, "--no-index", "--find-links", str(WHEELS)], timeout=300)
    if offline.returncode != 0:
        checked(download, timeout=600)


def image_id(tag: str) -> str | None:
    result = run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], timeout=30)
    return result.stdout.strip() if result.returncode == 0 else None


def build_image() -> None:
    before = image_id(IMAGE)
    checked(["docker", "build", "--force-rm", "--network", "none",
             "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", IMAGE, "."], timeout=900)
    if before is not None and before != image_id(IMAGE):
        run(["docker", "rmi", before], timeout=60)  # the replaced image; best effort


def without_progress_bars(logs: str) -> str:
    return "\n".join(line for line in logs.splitlines() if "batch/s" not in line)


def compose_job(files: list[str], loaders: list[str], ports: list[str]) -> str:
    """Build what is needed, run the compose job, check both trainers and the loaders' clean
    stop; returns the logs."""
    reason = docker_engine()
    if reason:
        pytest.skip(reason)
    compose = compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")

    timings: dict[str, float] = {}
    for step in (ensure_base_image, ensure_wheels, build_image):
        t0 = time.monotonic()
        step()
        timings[step.__name__] = time.monotonic() - t0

    project = f"bftest{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BATCHFEED_IMAGE": IMAGE, "BATCHFEED_BASE_IMAGE": BASE_IMAGE,
           "BATCHFEED_MASTER_PORT": str(free_port()), **{p: str(free_port()) for p in ports}}
    dc = [*compose, "-p", project, *(a for f in files for a in ("-f", f))]
    logs = ""
    t0 = time.monotonic()
    try:
        checked([*dc, "up", "-d", "--no-build"], timeout=300, env=env)
        trainers = [checked([*dc, "ps", "-q", name], timeout=60, env=env).stdout.strip()
                    for name in ("trainer0", "trainer1")]
        assert all(trainers), f"trainer containers not found: {trainers}"
        waited = run(["docker", "wait", *trainers], timeout=600)
        logs = run([*dc, "logs", "--no-color"], timeout=60, env=env).stdout
        assert waited.returncode == 0, waited.stderr
        codes = [int(line) for line in waited.stdout.split()]
        assert codes == [0, 0], f"trainer exit codes {codes}:\n{without_progress_bars(logs)}"
        for loader in loaders:  # each loader shuts down cleanly on SIGTERM
            cid = checked([*dc, "ps", "-q", loader], timeout=60, env=env).stdout.strip()
            checked([*dc, "stop", "-t", "20", loader], timeout=120, env=env)
            code = checked(["docker", "inspect", "--format", "{{.State.ExitCode}}", cid],
                           timeout=30).stdout.strip()
            assert code == "0", f"{loader} exited with {code}:\n{without_progress_bars(logs)}"
        return without_progress_bars(logs)
    finally:
        down = run([*dc, "down", "--volumes", "--remove-orphans", "-t", "10"], timeout=180,
                   env=env)
        if down.returncode != 0:  # do not hide the test's own failure behind this one
            print(f"compose down failed:\n{down.stderr}", file=sys.stderr)
        timings["compose run"] = time.monotonic() - t0
        print("docker test timings:", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def check_ranks(logs: str, rows_per_rank: int) -> None:
    for rank in (0, 1):
        for epoch in range(EPOCHS):
            assert f"rank {rank}: epoch {epoch}: {rows_per_rank:,} rows exactly once" in logs, \
                logs
    for epoch in range(EPOCHS):
        assert (f"all ranks: epoch {epoch}: 200,000 rows across 2 ranks as the plan gives "
                "them, 0 padded, 0 in the dropped tail") in logs, logs


@pytest.mark.timeout(900)
def test_compose_runs_a_loader_and_two_ranks_that_see_every_row_once():
    logs = compose_job(["docker-compose.yml", "docker/compose.hostnet.yml"], ["loader"],
                       ["BATCHFEED_PORT"])
    check_ranks(logs, 100_000)


@pytest.mark.timeout(900)
def test_sharded_compose_three_shard_loaders_and_two_ranks():
    logs = compose_job(["docker-compose.sharded.yml", "docker/compose.sharded.hostnet.yml"],
                       ["loader0", "loader1", "loader2"],
                       ["BATCHFEED_PORT", "BATCHFEED_PORT1", "BATCHFEED_PORT2"])
    check_ranks(logs, 100_000)
    for i in range(3):
        assert f"(shard {i}/3: rows" in logs, logs
