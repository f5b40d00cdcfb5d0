"""Elastic loaders: add a replica while the trainers wait on data, up to a maximum.

This is the policy Cachew (ATC'22) runs for the tf.data service, with one difference: adding a
replica changes no batch and no order, since every batch is a pure function of the plan (a
client hands a new replica part of what is still to come, in plan order).

- ``wait_share(before, now)``: the trainers' share of time spent waiting on data between two
  sets of their reports (``Client.stats()``, sent to the job's registry by clients made with
  ``LoaderSet.client()``): their summed waiting over their summed wall time; None when no
  trainer reported twice.
- ``WaitShareRule``: the decision, a pure function: add a replica when the share stayed above
  ``threshold`` for ``patience`` periods in a row, fewer than ``max_replicas`` run, and
  ``settle`` periods have passed since the last one was added (it must come into use first).
- ``WaitShareScaler(group, ...)``: a thread on the driver that applies the rule every
  ``period_s`` and calls ``group.add_replica()``; ``history`` lists what it did.  ``stop()``
  (or leaving its ``with`` block) stops it (bounded); stop it before its group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchfeed.shared.errors import BatchfeedError, InvalidRequest

log = logging.getLogger("batchfeed.ray")

Reports = Mapping[str, Mapping[str, float]]  # trainer -> its Client.stats()


def wait_share(before: Reports, now: Reports) -> float | None:
    """Summed waiting over summed wall time of the trainers between the two reports."""
    waited = wall = 0.0
    for trainer, stats in now.items():
        prev = before.get(trainer)
        if prev is None:
            continue
        d_wall = stats["wall_s"] - prev["wall_s"]
        if d_wall > 0:
            waited += max(0.0, stats["wait_s"] - prev["wait_s"])
            wall += d_wall
    return waited / wall if wall > 0 else None


@dataclass(frozen=True)
class WaitShareRule:
    """When to add a replica (see the module's docstring)."""

    threshold: float = 0.2
    max_replicas: int = 4
    patience: int = 2
    settle: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise InvalidRequest(f"threshold is a share of time, in (0, 1): got "
                                 f"{self.threshold!r}")
        for what in ("max_replicas", "patience", "settle"):
            value = getattr(self, what)
            if type(value) is not int or value < 1:
                raise InvalidRequest(f"{what} must be an int >= 1, got {value!r}")

    def should_add(self, shares: list[float | None], replicas: int, since_added: int) -> bool:
        """``shares``: one per period, the last is now; ``since_added``: periods since a
        replica was last added (or since the start)."""
        recent = shares[-self.patience:]
        return (replicas < self.max_replicas and since_added >= self.settle
                and len(recent) == self.patience
                and all(s is not None and s > self.threshold for s in recent))


class WaitShareScaler:
    """Adds replicas to a ``LoaderGroup`` while its trainers wait (a thread on the driver)."""

    def __init__(self, group: Any, *, threshold: float = 0.2, max_replicas: int = 4,
                 patience: int = 2, settle: int = 3, period_s: float = 1.0):
        if not period_s > 0:
            raise InvalidRequest(f"period_s must be positive, got {period_s!r}")
        self.group = group
        self.rule = WaitShareRule(threshold, max_replicas, patience, settle)
        self.period_s = period_s
        self.shares: list[float | None] = []
        self.history: list[dict[str, Any]] = []  # each replica added (or refused)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchfeed-scaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        before: Reports = {}
        since_added = self.rule.settle  # nothing to wait for at the start
        while not self._stop.wait(self.period_s):
            try:
                now = self.group.handle.trainer_reports()
            except Exception as exc:  # the registry is busy or restarting: next period
                log.warning("scaler: no trainer reports this period (%s)", exc)
                continue
            share = wait_share(before, now)
            before = now
            self.shares.append(share)
            since_added += 1
            if self._stop.is_set() or not self.rule.should_add(
                    self.shares, self.group.replicas, since_added):
                continue
            started = time.monotonic()
            entry: dict[str, Any] = {"at": time.time(), "share": share,
                                     "replicas": self.group.replicas + 1}
            try:
                entry["loaders"] = self.group.add_replica()
            except BatchfeedError as exc:
                entry["error"] = str(exc)
                log.warning("scaler: could not add a replica: %s", exc)
            entry["took_s"] = time.monotonic() - started
            self.history.append(entry)
            since_added = 0

    def stop(self) -> None:
        """Stop the thread (it finishes a replica it is adding).  Safe to call twice."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(60.0)

    def __enter__(self) -> WaitShareScaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
