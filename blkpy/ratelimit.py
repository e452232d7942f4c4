"""Rate-limited logging: a hostile guest must not be able to flood the host's logs."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Passes at most ``burst`` messages per ``interval`` seconds to ``logger``; counts the
    rest and reports how many were suppressed when the next window opens."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 5.0,
                 clock=time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._window_start = clock()
        self._emitted = 0
        self.suppressed = 0

    def _allow(self) -> bool:
        now = self._clock()
        if now - self._window_start >= self.interval:
            if self.suppressed:
                self.logger.warning("%d similar messages suppressed", self.suppressed)
            self._window_start = now
            self._emitted = 0
            self.suppressed = 0
        if self._emitted < self.burst:
            self._emitted += 1
            return True
        self.suppressed += 1
        return False

    def info(self, msg: str, *args: object) -> None:
        if self._allow():
            self.logger.info(msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        if self._allow():
            self.logger.warning(msg, *args)

    def error(self, msg: str, *args: object) -> None:
        if self._allow():
            self.logger.error(msg, *args)
