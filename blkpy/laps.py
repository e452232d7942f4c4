"""Where a hand-over's milliseconds go: named laps of one stopwatch, for the timing lines
a takeover logs once the rings are served (the guest waits for every lap, and under
emulation each step's cost differs by an order of magnitude from a real host's)."""

from __future__ import annotations

import resource
import time


class Laps:
    """``lap(name)`` ends the current lap under ``name``; ``str()`` lists them in order."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self._faults = _minor_faults()
        # this thread's CPU time: a lap far longer than its share waited for a CPU
        # (under emulation, the guest's vCPUs and other serves compete for dom0's)
        self._cpu = time.thread_time()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> float:
        """End the lap running since the last one (or the start); its seconds."""
        now = time.monotonic()
        took, self._last = now - self._last, now
        self.laps.append((name, took))
        return took

    @property
    def total(self) -> float:
        return sum(took for _, took in self.laps)

    @property
    def cpu(self) -> float:
        """Seconds this thread ran on a CPU since the start."""
        return time.thread_time() - self._cpu

    def __str__(self) -> str:
        # the process's fresh pages meanwhile (each cost ~0.2 ms under the lab's emulation)
        return (", ".join(f"{name} {took * 1000:.0f}" for name, took in self.laps)
                + f" ms; {_minor_faults() - self._faults} page faults,"
                f" {self.cpu * 1000:.0f} ms on CPU")


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
