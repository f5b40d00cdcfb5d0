"""``batchfeed stats ADDRESS``: a running server's sessions and counters, as a live table.

Each refresh asks the server with one STATS message on a fresh DEALER socket (linger 0, the
answer awaited for at most ``timeout`` seconds, so a late answer can never be read as the next
one) and renders its REPORT.  On a terminal the table is redrawn in place with ANSI cursor
movement; otherwise each refresh is printed as a new block.  ``--once`` prints one table.

What a server says is not trusted (``batchfeed probe`` reads it the same way):

- ``check_report`` checks the REPORT's shape where it is read: every key the table or the probe
  reads is there with its type, numbers are finite and in 0 .. 2**63-1, maps are maps; anything
  else is one ProtocolError naming the key, what it should be and what came.
- ``printable`` shows every control or invisible character of a server-supplied string as an
  escape (``\\x1b``, ``\\u202e``; a backslash as two), so a client named
  ``"\\x1b[2J\\x1b[H evil"`` cannot clear or rewrite the operator's screen: names, datasets, the
  version, the address, error kinds, and an ERROR reply's message.

Exit codes: 0 (``--once`` done, or Ctrl-C), 2 (no server answered the first query, a malformed
answer, or bad keys).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import zmq

from batchfeed.shared import protocol
from batchfeed.shared.batches import MAX_INT
from batchfeed.shared.errors import (
    InvalidRequest,
    ProtocolError,
    ServerUnavailable,
    error_from_code,
)
from batchfeed.shared.shm import human_bytes

COLUMNS = ("SESSION", "CLIENT", "DATASET", "EPOCH", "POSITION", "RATE/s", "CREDIT", "QUEUED",
           "LEASED", "BYTES", "IDLE s")
RIGHT_ALIGNED = frozenset(COLUMNS[3:])
MAX_TEXT = 24  # widest client or dataset name shown


@dataclass(frozen=True)
class StatsOptions:
    address: str
    interval: float = 1.0
    once: bool = False
    timeout: float = 3.0
    curve: tuple[str, str] | None = None  # (client secret key file, server public key file)

    def __post_init__(self) -> None:
        if not self.address.startswith(("tcp://", "ipc://")):
            raise InvalidRequest(
                f"address {self.address!r} must be tcp://HOST:PORT or ipc://PATH"
            )
        if self.interval <= 0:
            raise InvalidRequest(f"--interval must be positive, got {self.interval:g}")
        if self.timeout <= 0:
            raise InvalidRequest(f"--timeout must be positive, got {self.timeout:g}")


class StatsQuery:
    """Asks one server for its REPORT; owns a ZeroMQ context (``close()`` is safe twice)."""

    def __init__(self, address: str, timeout: float, curve: tuple[str, str] | None = None):
        self.address = address
        self.timeout = timeout
        self.keys: tuple[bytes, bytes, bytes] | None = None
        if curve is not None:
            from batchfeed.shared.curve_keys import check_libzmq, load_public, load_secret

            check_libzmq()
            self.keys = (*load_secret(curve[0]), load_public(curve[1]))
        self.ctx: zmq.Context | None = zmq.Context()

    def fetch(self) -> dict:
        """The REPORT header: {"server": {...}, "sessions": [...]}."""
        assert self.ctx is not None
        with self.ctx.socket(zmq.DEALER) as sock:
            sock.linger = 0
            sock.maxmsgsize = 2 * protocol.MAX_HEADER_BYTES
            if self.keys is not None:
                sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.keys
            sock.connect(self.address)
            sock.send_multipart(protocol.stats())
            if not sock.poll(int(self.timeout * 1000)):
                hint = "; check the CURVE keys" if self.keys is not None else \
                    " (a server with CURVE needs --curve)"
                raise ServerUnavailable(
                    f"no answer from {self.address} within {self.timeout:g} s; is a batchfeed "
                    f"server running there{hint}?"
                )
            msg = protocol.decode(sock.recv_multipart())
        if msg.kind == protocol.ERROR:
            raise error_from_code(msg.header["code"], printable(msg.header["message"]))
        if msg.kind != protocol.REPORT:
            raise ProtocolError(f"the server answered STATS with a {msg.kind} message")
        return check_report(msg.header, self.address)

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def __enter__(self) -> StatsQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# What the server said: checked, then shown harmlessly.


def printable(text: str) -> str:
    """``text`` with every character that is not printable (controls such as ESC, line and
    paragraph separators, bidi overrides) written as its Python escape.  (A server of this
    release escapes client names the same way before anyone sees them.)"""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


_COUNT, _NUMBER, _TEXT, _OPT_TEXT = "a whole number", "a number", "a string", "a string or nil"

SERVER_KEYS = {"version": _TEXT, "address": _TEXT, "uptime_s": _NUMBER, "workers": _COUNT,
               "sessions": _COUNT, "slots": _COUNT, "slots_free": _COUNT, "slots_busy": _COUNT,
               "slots_leased": _COUNT}
SESSION_KEYS = {"id": _TEXT, "name": _OPT_TEXT, "dataset": _TEXT, "epoch": _COUNT,
                "next": _COUNT, "batches_per_epoch": _COUNT, "rate": _NUMBER, "credit": _COUNT,
                "queued": _COUNT, "leased": _COUNT, "bytes": _COUNT, "idle_s": _NUMBER}
COUNTED_MAPS = ("counters", "errors")  # optional maps of name -> count in the server map


def _fits(value: object, kind: str) -> bool:
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _OPT_TEXT:
        return value is None or isinstance(value, str)
    if type(value) is int:
        return 0 <= value <= MAX_INT
    return kind == _NUMBER and type(value) is float and math.isfinite(value) and \
        0 <= value <= MAX_INT


def _checked(table: dict, keys: dict[str, str], where: str, source: str) -> None:
    for key, kind in keys.items():
        if key not in table:
            raise _malformed(f"{where} has no {key!r}", source)
        if not _fits(table[key], kind):
            bounds = "" if kind in (_TEXT, _OPT_TEXT) else " from 0 to 2**63-1"
            raise _malformed(f"{where}[{key!r}] must be {kind}{bounds}, got "
                             f"{table[key]!r:.60}", source)


def _malformed(what: str, source: str) -> ProtocolError:
    return ProtocolError(f"malformed REPORT from {source}: {what}; is it a batchfeed server of "
                         "this release? (install the same batchfeed on both sides)")


def check_report(report: Any, source: str = "the server") -> dict:
    """``report`` if it is a REPORT header this module can show, else ProtocolError naming
    the first thing wrong (keys it does not read may be anything)."""
    if not isinstance(report, dict):
        raise _malformed(f"it is {type(report).__name__}, not a map", source)
    server, sessions = report.get("server"), report.get("sessions")
    if not isinstance(server, dict):
        raise _malformed(f"'server' must be a map, got {server!r:.60}", source)
    if not isinstance(sessions, list):
        raise _malformed(f"'sessions' must be a list, got {sessions!r:.60}", source)
    _checked(server, SERVER_KEYS, "server", source)
    for name in COUNTED_MAPS:
        table = server.get(name, {})
        if not isinstance(table, dict):
            raise _malformed(f"server[{name!r}] must be a map, got {table!r:.60}", source)
        for key, count in table.items():
            if not isinstance(key, str) or not _fits(count, _COUNT):
                raise _malformed(f"server[{name!r}] must map names to whole numbers from 0 to "
                                 f"2**63-1, got {key!r:.40}: {count!r:.40}", source)
    for i, session in enumerate(sessions):
        if not isinstance(session, dict):
            raise _malformed(f"sessions[{i}] must be a map, got {session!r:.60}", source)
        _checked(session, SESSION_KEYS, f"sessions[{i}]", source)
    return report


# ---------------------------------------------------------------------------------------------
# Rendering.


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def summary(server: dict) -> str:
    counters, errors = server.get("counters", {}), server.get("errors", {})
    errs = ", ".join(f"{printable(kind)} {n:,}" for kind, n in sorted(errors.items())) or "none"
    return (
        f"batchfeed {printable(server['version'])} at {printable(server['address'])}, "
        f"up {duration(server['uptime_s'])}"
        f" | {_count(server['sessions'], 'session')}, {_count(server['workers'], 'worker')}"
        f" | slots: {server['slots_free']} free, {server['slots_busy']} busy, "
        f"{server['slots_leased']} leased of {server['slots']}"
        f" | sent {counters.get('batches', 0):,} batches (prefetch included), "
        f"{human_bytes(counters.get('bytes', 0))}"
        f" | {_count(counters.get('worker_restarts', 0), 'worker restart')} | errors: {errs}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def session_row(s: dict) -> tuple[str, ...]:
    return (
        printable(s["id"])[:8], _clip(s["name"] or "?"), _clip(s["dataset"]), str(s["epoch"]),
        f"{s['next']}/{s['batches_per_epoch']}", f"{s['rate']:.1f}", str(s["credit"]),
        str(s["queued"]), str(s["leased"]), human_bytes(s["bytes"]), f"{s['idle_s']:.1f}",
    )


def _clip(text: str) -> str:
    """``text`` made printable, then cut to ``MAX_TEXT`` characters (a cut one ends in ``~``)."""
    text = printable(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "~"


def render(report: dict) -> list[str]:
    """The summary line, then the session table (header and one row per session)."""
    server, sessions = report["server"], report["sessions"]
    rows = [COLUMNS, *(session_row(s) for s in sessions)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    lines = [summary(server)]
    for r in rows:
        cells = [cell.rjust(w) if name in RIGHT_ALIGNED else cell.ljust(w)
                 for cell, w, name in zip(r, widths, COLUMNS)]
        lines.append("  ".join(cells).rstrip())
    if not sessions:
        lines.append("(no sessions)")
    elif len(sessions) < server["sessions"]:
        lines.append(f"(showing {len(sessions)} of {server['sessions']} sessions)")
    return lines


# ---------------------------------------------------------------------------------------------
# The command.


class _Screen:
    """Writes blocks of lines: in place on a terminal, one after another otherwise."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty()
        self.rows = 0  # terminal rows the block on screen takes (long lines wrap)
        self.shown = False

    def show(self, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n"
        if self.tty:
            up = f"\x1b[{self.rows}F" if self.rows else ""
            text = up + "\x1b[J" + text  # back to the block's first row, clear to the end
            width = max(1, shutil.get_terminal_size().columns)
            self.rows = sum(max(1, -(-len(line) // width)) for line in lines)
        elif self.shown:
            text = "\n" + text
        self.shown = True
        self.out.write(text)
        self.out.flush()


def run(options: StatsOptions, out: TextIO | None = None) -> int:
    screen = _Screen(out or sys.stdout)
    try:
        with StatsQuery(options.address, options.timeout, options.curve) as query:
            screen.show(render(query.fetch()))  # a first failure is the command's error (exit 2)
            while not options.once:
                time.sleep(options.interval)
                try:
                    lines = render(query.fetch())
                except ServerUnavailable as exc:  # a restart or a hiccup: keep asking
                    lines = [f"{time.strftime('%H:%M:%S')} {exc} (retrying)"]
                screen.show(lines)
    except KeyboardInterrupt:
        pass
    return 0
