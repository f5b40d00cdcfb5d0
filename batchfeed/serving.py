"""``batchfeed.serve(data)``: a server for data already in memory, for notebooks and tests.

    with batchfeed.serve({"tokens": list_of_arrays, "label": labels}) as server:
        with Client(server.address, batch_size=32) as client:
            ...

``data`` is a dict of columns (numpy arrays; lists of arrays, str or bytes for ragged fields),
a pyarrow Table, a Hugging Face ``Dataset``, or a path as ``batchfeed serve --data`` takes.  Its
columns, and the options (the bind address's security among them), are checked here, in the
caller, so a bad one raises at once, naming the Python argument (``insecure=True``, not the
command line's ``--insecure``): ``DatasetError`` for the data, ``InvalidArgument`` for an
option; a transform that cannot serve (run on sample batches) raises ``DatasetError``.  Then a
child process is forked that inherits the objects as they are (nothing is pickled or written to
disk), loads them into shared memory and serves them.  ``ServerHandle.stop()`` (also on
``with`` exit, and at interpreter exit) stops it: SIGTERM, then the usual ladder.  The child
also stops when this process dies.

Fork before starting threads of your own where you can (as with any fork): a process that
already runs clients or framework thread pools may hold locks the child would inherit.  A
server belongs to the process that started it: a child forked from that process never stops
it, not even at its exit.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import shutil
import signal
import tempfile
import weakref
from pathlib import Path
from typing import Any

from batchfeed.shared.errors import (
    BatchfeedError,
    InvalidArgument,
    InvalidRequest,
    ResourceError,
    error_from_code,
)
from batchfeed.shared.procs import stop_process

_PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 120.0
_LIVE: weakref.WeakSet[ServerHandle] = weakref.WeakSet()  # stopped at interpreter exit
_atexit_registered = False


def _stop_live_servers() -> None:
    for handle in list(_LIVE):
        handle.stop()


class ServerHandle:
    """A server started by ``serve``: its ``address``, and ``stop()`` (safe to call twice)."""

    def __init__(self, process: multiprocessing.process.BaseProcess, address: str,
                 ready_line: str, tmpdir: str | None):
        self.process = process
        self.address = address
        self.ready_line = ready_line
        self._finalizer = weakref.finalize(self, _stop, process, tmpdir, os.getpid())
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def stop(self) -> int | None:
        """Stop the server; its exit code (0 for a clean stop)."""
        self._finalizer()
        return self.process.exitcode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.address}, pid {self.process.pid})"


def _stop(process: multiprocessing.process.BaseProcess,
          tmpdir: str | None, owner: int) -> None:
    if os.getpid() != owner:
        return  # a child forked from the owner exits: the server and its files are the owner's
    if process.pid is not None and process.exitcode is None:
        os.kill(process.pid, signal.SIGTERM)  # the server's own clean shutdown
        stop_process(process, 15.0)
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def serve(data: Any, *, bind: str | None = None, name: str = "data", workers: int = 0,
          **options: Any) -> ServerHandle:
    """Serve ``data`` from a child process; returns once it is ready.

    ``bind`` defaults to an ``ipc://`` socket in a fresh temporary directory (same-host clients
    then get the fast path); ``options`` are ``ServerConfig`` fields (``slots``,
    ``chunk_bytes``, ``transforms``, ...).
    """
    from batchfeed.launch import READY_RE
    from batchfeed.server.config import ServerConfig
    from batchfeed.server.security import ServerSecurity
    from batchfeed.server.sources import check_fields, inspect_source
    from batchfeed.server.sources.memory import memory_sources

    datasets: dict | None
    if isinstance(data, (str, Path)):
        inspect_source(str(data))  # a bad file raises here, in the caller
        options["data"] = (f"{name}={data}",)  # read (and fingerprinted) as its files
        datasets = None
    else:
        sources = memory_sources(data)
        check_fields(sources, "the data passed to batchfeed.serve")
        datasets = {name: sources}
    tmpdir = None
    if bind is None:
        # Not a TemporaryDirectory: its finalizer would also run in a forked child's exit.
        tmpdir = tempfile.mkdtemp(prefix="batchfeed-")
        bind = f"ipc://{tmpdir}/server.sock"
    try:
        config = ServerConfig(bind=bind, workers=workers, **options)
        ServerSecurity(config.bind, config.curve_secret_key, config.authorized_keys,
                       config.insecure).check()
    except BatchfeedError as exc:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        kind = InvalidArgument if isinstance(exc, InvalidRequest) else type(exc)
        raise kind(python_words(str(exc))) from None
    read_fd, write_fd = os.pipe()
    ctx = multiprocessing.get_context("fork")
    process = ctx.Process(target=_child, args=(config, datasets, write_fd),
                          name="batchfeed-serve", daemon=False)
    process.start()
    _stop_at_exit()
    os.close(write_fd)
    line = _read_line(read_fd, process)
    m = READY_RE.match(line)
    if m is None:
        stop_process(process, 5.0)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        code, sep, message = line.partition("\t")
        if sep:  # the child's typed error, as the server would have printed it
            raise error_from_code(code, python_words(message))
        raise ResourceError(f"the server did not start: {line or 'it exited'} (its error is "
                            "printed above)")
    return ServerHandle(process, m.group(1), line, tmpdir)


# The command line's words for serve()'s arguments, as the server's messages name them.
_PYTHON_WORDS = (
    ("--curve-secret-key and --authorized-keys", "curve_secret_key= and authorized_keys="),
    ("--curve-secret-key", "curve_secret_key="),
    ("--authorized-keys", "authorized_keys="),
    ("pass --insecure", "pass insecure=True"),
    ("--insecure", "insecure=True"),
    ("--metrics-bind", "metrics_bind="),
    ("--metrics-port", "metrics_port="),
    ("another --bind address", "another bind= address"),
    ("--bind", "bind="),
    ("--workers", "workers="),
    ("--slots/--slot-mb", "slots=/slot_bytes="),
    ("--slots", "slots="),
    ("--slot-mb", "slot_bytes="),
    ("--max-sessions-per-connection", "max_sessions_per_connection="),
    ("--max-sessions", "max_sessions="),
    ("--max-unsent-mb", "max_unsent_bytes="),
    ("--max-order-mb", "max_order_bytes="),
    ("--max-image-pixels", "max_image_pixels="),
    ("--fingerprint", "fingerprint="),
    ("--shard", "shard="),
)


def python_words(message: str) -> str:
    """A server's message with its command-line flags named as ``serve()``'s arguments."""
    for flag, argument in _PYTHON_WORDS:
        message = message.replace(flag, argument)
    return message


def _stop_at_exit() -> None:
    """Stop live servers at interpreter exit, before multiprocessing's own exit handler joins
    its children (which would wait forever for a server nobody stopped).  atexit runs the last
    registered first, and multiprocessing registered its handler by the first start()."""
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_stop_live_servers)
        _atexit_registered = True


def _read_line(fd: int, process: multiprocessing.process.BaseProcess) -> str:
    import select

    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], READY_TIMEOUT_S)
            if not ready:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\n" in chunk:
                break
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace").strip()


def _child(config: Any, sources: dict | None, write_fd: int) -> None:
    """The server process: dies with its parent, announces its ready line on the pipe."""
    from batchfeed.server.main import serve as run

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass

    def announce(line: str) -> None:
        os.write(write_fd, (line + "\n").encode())
        os.close(write_fd)

    code = 1
    try:
        code = run(config, announce=announce, sources=sources)
    except Exception as exc:  # startup errors reach the parent as (code, message)
        code_name = exc.code if isinstance(exc, BatchfeedError) else BatchfeedError.code
        try:
            os.write(write_fd, f"{code_name}\t{exc}\n".encode())
        except OSError:
            pass
        code = 2
    finally:
        os._exit(code)
