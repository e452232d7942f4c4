"""Rate limits: a hostile guest must not be able to flood the host's logs, nor a failing
process keep the host busy restarting it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


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


class WindowBudget:
    """At most ``limit`` events per key within any ``window`` seconds: what the hotplug
    daemon allows a device's serve (restarts) and its standby (failed starts) before it
    stops starting them.

    A sliding window, unlike RateLimitedLog's fixed one: a crash loop is judged on its last
    ``window`` seconds, so one that straddles a window's start cannot get twice the limit."""

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: dict[str, list[float]] = {}

    def used(self, key: str) -> int:
        """How many of ``key``'s events are within the window."""
        now = self._clock()
        recent = [t for t in self._events.get(key, ()) if now - t < self.window]
        if recent:
            self._events[key] = recent
        else:  # a key that stays quiet costs nothing (devices come and go)
            self._events.pop(key, None)
        return len(recent)

    def spent(self, key: str) -> bool:
        return self.used(key) >= self.limit

    def charge(self, key: str) -> None:
        """Count one event of ``key`` now (also past the limit: the caller decides)."""
        self.used(key)
        self._events.setdefault(key, []).append(self._clock())

    def reopens_in(self, key: str) -> float:
        """Seconds until ``key`` is within its limit again (0 if it is now)."""
        if not self.spent(key):
            return 0.0
        events = self._events[key]
        # the limit-th newest event must leave the window for one more to fit
        return events[-self.limit] + self.window - self._clock()
