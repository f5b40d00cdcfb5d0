"""``batchfeed probe ADDRESS``: is a loader server up and answering?  Exit 0 if yes, 1 if not.

Made for container health checks (a Kubernetes exec readiness/liveness probe, a compose
healthcheck): one STATS round trip over the real protocol, on a fresh DEALER socket with linger 0,
the answer awaited for at most ``timeout`` seconds (``batchfeed.stats.StatsQuery``).  A server
answers STATS only once its data is loaded, its workers started and its socket bound, and only
while its main loop turns, so one answer means "ready" and "alive" alike.

It prints one line: on stdout when the server answered, on stderr with the reason when not
(Kubernetes keeps the line in the pod's events).  The answer is read as ``batchfeed stats``
reads it (``StatsQuery.fetch``): a REPORT of the wrong shape (missing keys, wrong types, a list
for a map, numbers out of range) is a ProtocolError naming what was wrong, an ERROR reply's
message is shown with its control characters escaped, and neither ever prints a traceback.
It holds nothing between runs; its ZeroMQ context is closed before it returns.

Exit codes: 0 answered; 1 no answer within ``timeout``, an error reply, a garbled or malformed
answer, or unreadable CURVE keys; 2 bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from batchfeed.shared.errors import BatchfeedError

DEFAULT_TIMEOUT = 3.0  # seconds; keep it below the probe's timeoutSeconds

EXAMPLES = """examples:
  batchfeed probe tcp://127.0.0.1:5555
  batchfeed probe tcp://127.0.0.1:5555 --timeout 2 \\
      --curve /keys/server/probe.key_secret /keys/server/server.key
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's arguments, for this module's ``main`` and for ``batchfeed probe``."""
    parser.add_argument("address", help="the server's address, tcp://HOST:PORT or ipc://PATH")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for the answer (default: %(default)s)")
    parser.add_argument("--curve", nargs=2, metavar=("CLIENT_SECRET_FILE", "SERVER_PUBLIC_FILE"),
                        help="CURVE keys for a server started with --curve-secret-key (the "
                             "client key must be in the server's --authorized-keys)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchfeed probe",
        description="Ask a loader server for its STATS report once: exit 0 if it answered, "
                    "1 if not (for readiness and liveness probes).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def run(address: str, timeout: float = DEFAULT_TIMEOUT,
        curve: tuple[str, str] | None = None) -> int:
    """One STATS round trip to ``address``: 0 if the server answered within ``timeout`` s, else 1.

    ``curve`` is (client secret key file, server public key file).  Never raises for a
    server that is down, slow, refusing or misconfigured: that is what exit code 1 is for.
    """
    if not address.startswith(("tcp://", "ipc://")):
        return _failed(address, f"address {address!r} must be tcp://HOST:PORT or ipc://PATH")
    if not timeout > 0:
        return _failed(address, f"--timeout must be positive, got {timeout:g}")
    from batchfeed.stats import StatsQuery  # zmq and the protocol: only when actually probing

    started = time.monotonic()
    try:
        with StatsQuery(address, timeout, curve) as query:
            report = query.fetch()
        server = report["server"]
        summary = (f"{server['workers']} workers, {server['sessions']} sessions, "
                   f"up {server['uptime_s']:g} s")
    except (BatchfeedError, OSError) as exc:
        # BatchfeedError: no answer (ServerUnavailable), an ERROR reply, a bad key file
        # (AuthenticationError), a garbled or malformed reply (ProtocolError, the REPORT's
        # shape checked by fetch); zmq.ZMQError is an OSError.
        return _failed(address, str(exc) or type(exc).__name__)
    ms = (time.monotonic() - started) * 1000
    print(f"batchfeed probe: ok: {address} answered in {ms:.0f} ms ({summary})", flush=True)
    return 0


def _failed(address: str, reason: str) -> int:
    print(f"batchfeed probe: failed: {address}: {reason}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.address, args.timeout, tuple(args.curve) if args.curve else None)


if __name__ == "__main__":  # pragma: no cover - ``python -m batchfeed.probe``
    sys.exit(main())
