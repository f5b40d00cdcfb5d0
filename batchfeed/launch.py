"""Start a ``batchfeed serve`` process and wait for its ready line (demo, bench and tests).

``ServerProcess`` owns the child: ``start()`` returns once the server printed its ready line
(and gives its bound address, so ``--bind tcp://127.0.0.1:0`` picks a free port); ``stop()``
sends SIGTERM, waits, then kills (``shared.procs.stop_process``).  Both are safe to call twice.
The ready line is read for the address only: what the server runs with (workers, ring, pids,
counters) comes from its STATS report, ``server_report()`` or ``ServerProcess.report()``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence

from batchfeed.shared.procs import stop_process

READY_RE = re.compile(r"^batchfeed serve: ready: .* at (\S+) \(")


class ServerProcess:
    def __init__(self, args: Sequence[str] = (), *, bind: str = "tcp://127.0.0.1:0",
                 log_level: str = "WARNING", env: dict | None = None,
                 nofile: int | None = None):
        self.args = ["--log-level", log_level, "serve", "--bind", bind, *map(str, args)]
        self.env = env
        self.nofile = nofile  # a descriptor limit (soft and hard) to start the server under
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.ready_line = ""
        self.output: list[str] = []
        self._drainer: threading.Thread | None = None
        self._settled = threading.Event()  # the ready line came, or the output ended

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchfeed", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(self.env or {})},
            preexec_fn=_limit_fds(self.nofile) if self.nofile else None,
        )
        # One thread reads every line from the start (a select() on the pipe would miss lines
        # already in the file object's buffer), and says when the ready line or the end came.
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        if self._settled.wait(timeout) and self.address is not None:
            return self
        self.stop()
        raise RuntimeError("batchfeed serve did not become ready:\n" + "\n".join(self.output))

    def _drain(self) -> None:
        """Read the server's output (so that it never blocks on a full pipe), noting the ready
        line's address."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))
                m = READY_RE.match(line) if self.address is None else None
                if m:
                    self.ready_line = line.strip()
                    self.address = m.group(1)
                    self._settled.set()
        except ValueError:  # closed under us by stop()
            pass
        finally:
            self._settled.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def report(self, timeout: float = 5.0, curve: tuple[str, str] | None = None) -> dict:
        """This server's STATS report (see ``server_report``)."""
        assert self.address is not None, "the server is not started"
        return server_report(self.address, timeout, curve)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait ``timeout``, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        # SIGTERM is the server's own orderly shutdown, so the ladder starts with it.
        stop_process(self.proc, 0.0, terminate_wait=timeout)
        if self._drainer is not None:
            self._drainer.join(5)
        elif self.proc.stdout is not None and not self.proc.stdout.closed:
            self.output += self.proc.stdout.read().splitlines()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _limit_fds(n: int):
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return limit


def server_report(address: str, timeout: float = 5.0,
                  curve: tuple[str, str] | None = None) -> dict:
    """A running server's STATS report: ``{"server": {...}, "sessions": [...]}``.

    ``server`` has ``workers``, ``worker_pids``, ``slots``, ``slot_bytes``, ``address``,
    ``datasets``, ``counters`` and ``errors`` (see ``Frontend.describe``).  ``curve`` is
    (client secret key file, server public key file) for a server with CURVE.  Raises
    ServerUnavailable if no answer came within ``timeout`` seconds.
    """
    from batchfeed.stats import StatsQuery

    with StatsQuery(address, timeout, curve) as query:
        return query.fetch()
