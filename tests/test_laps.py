"""blkpy.laps: the stopwatch behind a hand-over's timing lines."""

from __future__ import annotations

import mmap
import re
import time

from blkpy.laps import Laps


def test_laps_are_listed_in_order_with_their_milliseconds() -> None:
    laps = Laps()
    time.sleep(0.02)
    first = laps.lap("slept")
    laps.lap("nothing")
    assert first >= 0.02
    assert [name for name, _ in laps.laps] == ["slept", "nothing"]
    assert laps.total >= first
    assert re.fullmatch(r"slept \d+, nothing \d+ ms; \d+ page faults, \d+ ms on CPU",
                        str(laps)), str(laps)


def test_waiting_is_not_counted_as_cpu_time_and_working_is() -> None:
    laps = Laps()
    time.sleep(0.05)
    assert laps.cpu < 0.03
    end = time.thread_time() + 0.05
    while time.thread_time() < end:
        pass
    assert laps.cpu >= 0.05


def test_fresh_pages_touched_between_laps_are_counted() -> None:
    laps = Laps()
    # (an anonymous mapping of its own: a heap allocation may reuse pages touched before)
    block = mmap.mmap(-1, 64 * 4096)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    faults = int(re.search(r"(\d+) page faults", str(laps)).group(1))  # type: ignore[union-attr]
    assert faults >= 32
