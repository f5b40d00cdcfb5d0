"""Packaging: the folder layout maps onto batchfeed.* both installed and editable."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import batchfeed

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_distribution_version() -> None:
    assert importlib.metadata.version("batchfeed") == batchfeed.__version__


def test_public_api_and_package_layout() -> None:
    from batchfeed import Client
    from batchfeed.client import Client as Client2
    from batchfeed.server import frontend
    from batchfeed.shared import protocol

    assert Client is Client2
    assert Path(protocol.__file__).parent.name == "shared"
    assert Path(frontend.__file__).parent.name == "server"


def test_console_script_and_module_entry_point() -> None:
    for cmd in (["batchfeed", "--version"], [sys.executable, "-m", "batchfeed", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"batchfeed {batchfeed.__version__}"


def test_server_code_never_imports_the_client() -> None:
    code = ("import sys, batchfeed.server.main, batchfeed.server.worker; "
            "print([m for m in sys.modules if m.startswith('batchfeed.client')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_plain_pip_install_into_a_fresh_venv(tmp_path: Path) -> None:
    """``pip install .`` (not editable): the same packages, the script, a working service."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=500,
                   env=env, cwd=tmp_path)
    check = (
        "import batchfeed, batchfeed.client, batchfeed.server, batchfeed.shared.protocol as p;"
        "from batchfeed import Client;"
        "assert 'site-packages' in batchfeed.server.__file__, batchfeed.server.__file__;"
        "from batchfeed.launch import ServerProcess;"
        "srv = ServerProcess(['--synthetic-rows', '3000', '--workers', '1']).start();"
        "c = Client(srv.address, batch_size=1000);"
        "n = sum(len(b['y']) for b in c.epoch(0)); c.close(); code = srv.stop();"
        "print(n, code)"
    )
    out = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3000", "0"]
    version = subprocess.run([str(venv / "bin" / "batchfeed"), "--version"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert version.stdout.strip() == f"batchfeed {batchfeed.__version__}"


@pytest.mark.parametrize("command", ["serve", "demo", "keygen", "stats", "bench"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "batchfeed", command, "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "examples:" in out.stdout and f"batchfeed {command}" in out.stdout.split("examples:")[1]


def test_the_package_is_typed() -> None:
    assert (Path(batchfeed.__file__).parent / "py.typed").exists()
