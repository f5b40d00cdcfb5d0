"""Rate-limited logging, so that a flood of bad messages (or one bug hit in a loop) cannot fill
the disk: each kind of line is written at most ``burst`` times per ``period`` seconds, and the
first line after a quiet spell says how many were left out."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0):
        self.logger = logger
        self.burst = burst
        self.period = period
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (start, logged, left out)

    def log(self, level: int, kind: str, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        start, logged, skipped = self._windows.get(kind, (now, 0, 0))
        if now - start > self.period:
            if skipped:
                self.logger.log(level, "(%d more %s lines were left out in %.0f s)", skipped,
                                kind, now - start)
            start, logged, skipped = now, 0, 0
        if logged < self.burst:
            self.logger.log(level, msg, *args, exc_info=exc_info)
            logged += 1
        else:
            skipped += 1
        self._windows[kind] = (start, logged, skipped)
