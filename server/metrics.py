"""What ``batchfeed serve --metrics-port`` exposes: ``SnapshotCollector`` turns the front end's
snapshot into Prometheus metric families.  It reads ``Frontend.snapshot`` at scrape time: the
event loop replaces that dict every 0.25 s and never mutates it afterwards, so the scraping
thread reads a consistent picture without locks and never touches the live state.  The HTTP
endpoint that serves it is ``metrics_http.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BUSY_WINDOW_S = 1.0  # the busy fraction is measured over at least this much server time


class SnapshotCollector(Collector):
    """Turns the front end's latest snapshot into metric families, one scrape at a time.

    ``source`` is any object with a ``snapshot`` attribute (the Frontend): ``describe()``'s keys
    plus ``session_list``.  Before the event loop's first tick the snapshot is empty and a scrape
    returns no batchfeed metrics.
    """

    def __init__(self, source: Any):
        self.source = source
        self._lock = threading.Lock()  # guards the busy marks below (scrapes may overlap)
        self._busy_mark: dict[str, tuple[float, float]] = {}  # worker -> (uptime, busy seconds)
        self._busy_fraction: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.source.snapshot  # one read of the reference: everything below is consistent
        if not snap:
            return
        yield from self._server(snap)
        yield from self._ring(snap)
        yield from self._workers(snap)
        yield from self._sessions(snap)
        yield from self._errors(snap)

    def _server(self, snap: dict) -> Iterator[Metric]:
        counters = snap["counters"]
        info = GaugeMetricFamily("batchfeed_info", "The server's version and address (always 1).",
                                 labels=["version", "address", "datasets"])
        info.add_metric([snap["version"], snap["address"], snap["datasets"]], 1)
        yield info
        yield GaugeMetricFamily("batchfeed_uptime_seconds",
                                "Seconds since the server started.", value=snap["uptime_s"])
        yield CounterMetricFamily("batchfeed_batches_served",
                                  "Batches sent to clients, all sessions.",
                                  value=counters.get("batches", 0))
        yield CounterMetricFamily("batchfeed_bytes_served",
                                  "Batch data bytes sent to clients (or leased on the fast path).",
                                  value=counters.get("bytes", 0))
        yield CounterMetricFamily("batchfeed_messages_received",
                                  "Messages received from clients, valid or not.",
                                  value=counters.get("messages", 0))
        yield CounterMetricFamily("batchfeed_sessions_opened",
                                  "Sessions opened since the server started (HELLOs accepted).",
                                  value=counters.get("sessions", 0))

    def _ring(self, snap: dict) -> Iterator[Metric]:
        yield GaugeMetricFamily("batchfeed_slots", "Slots in the shared slot ring.",
                                value=snap["slots"])
        yield GaugeMetricFamily("batchfeed_slots_free", "Ring slots free for a new task.",
                                value=snap["slots_free"])
        yield GaugeMetricFamily("batchfeed_slots_busy",
                                "Ring slots being gathered by a worker or being sent.",
                                value=snap["slots_busy"])
        yield GaugeMetricFamily("batchfeed_slots_leased",
                                "Ring slots held by same-host (fast path) clients.",
                                value=snap["slots_leased"])

    def _workers(self, snap: dict) -> Iterator[Metric]:
        counters = snap["counters"]
        yield GaugeMetricFamily("batchfeed_workers", "Worker processes.", value=snap["workers"])
        yield CounterMetricFamily("batchfeed_worker_restarts",
                                  "Workers that died (or were killed) and were replaced.",
                                  value=counters.get("worker_restarts", 0))
        yield CounterMetricFamily("batchfeed_worker_timeouts",
                                  "Workers killed for making no progress within --task-timeout.",
                                  value=counters.get("worker_timeouts", 0))
        busy_s = {str(i): 0.0 for i in range(snap["workers"])}
        busy_s.update(snap["worker_busy_s"])
        seconds = CounterMetricFamily("batchfeed_worker_busy_seconds",
                                      "Seconds each worker index spent on tasks (its "
                                      "replacements included).", labels=["worker"])
        fraction = GaugeMetricFamily("batchfeed_worker_busy_fraction",
                                     "Fraction of time each worker index spent on tasks, since "
                                     "the previous scrape (at least 1 s of server time).",
                                     labels=["worker"])
        now = snap["uptime_s"]
        for worker, value in sorted(busy_s.items(), key=lambda kv: int(kv[0])):
            seconds.add_metric([worker], value)
            fraction.add_metric([worker], self._fraction(worker, now, value))
        yield seconds
        yield fraction

    def _fraction(self, worker: str, now: float, busy: float) -> float:
        """Busy seconds gained per second of server time since the last mark, in [0, 1].

        Busy time is credited when a task finishes, so over a short window a long task can read
        above 1: the mark moves only once ``BUSY_WINDOW_S`` has passed, and the result is clamped.
        The first scrape reports the average since the server started.
        """
        with self._lock:
            mark = self._busy_mark.get(worker)
            if mark is None:
                self._busy_mark[worker] = (now, busy)
                value = busy / now if now > 0 else 0.0
            elif now - mark[0] >= BUSY_WINDOW_S:
                self._busy_mark[worker] = (now, busy)
                value = (busy - mark[1]) / (now - mark[0])
            else:
                return self._busy_fraction.get(worker, 0.0)
            value = min(1.0, max(0.0, value))
            self._busy_fraction[worker] = value
            return value

    def _sessions(self, snap: dict) -> Iterator[Metric]:
        yield GaugeMetricFamily("batchfeed_sessions", "Open client sessions.",
                                value=snap["sessions"])
        rate = GaugeMetricFamily("batchfeed_session_batch_rate",
                                 "Batches per second sent to each open session (smoothed).",
                                 labels=["session", "client", "dataset"])
        for s in snap.get("session_list", ()):
            rate.add_metric([s["id"], s["name"], s["dataset"]], s["rate"])
        yield rate

    def _errors(self, snap: dict) -> Iterator[Metric]:
        errors = CounterMetricFamily("batchfeed_errors",
                                     "Errors by kind: client errors answered with an ERROR "
                                     "message (protocol, invalid_request, credit, ...), worker "
                                     "errors, and internal errors of the front end.",
                                     labels=["kind"])
        for kind, count in sorted(snap["errors"].items()):
            errors.add_metric([kind], count)
        yield errors

