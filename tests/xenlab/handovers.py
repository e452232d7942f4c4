"""Which of the guest's slow requests an upgrade's hand-overs held (phase lifecycle).

The guest's longest request in the upgrade window is not all the upgrade's doing: under
the lab's emulation requests of 250-450 ms come with nothing happening to the disks (the
warmup window's figure). Each successor serve logs its hand-over window with the wall
clock it began and ended at (dom0's), and the guest's lcio prints every slow request with
the wall clock it ended at (the guest's). Before its streams start, the guest measures how
far dom0's clock is ahead of its own (``lcio clock``: pings on the control disk that dom0
answers with its time, as NTP does; a PV guest's clock was found ~0.2 s behind), and its
times are moved by that. A request held by a hand-over is one on that serve's disk whose
time overlaps the window."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

#: a successor serve's log line (blkpy.serve's log_handover_window)
WINDOW_LINE = re.compile(
    r"backend/vbd3?/\d+/(?P<devid>\d+): hand-over window (?P<ms>\d+) ms "
    r"\((?P<start>\d\d:\d\d:\d\d\.\d{3}) to (?P<end>\d\d:\d\d:\d\d\.\d{3}) UTC\)")
#: a slow request on the guest's console (domU/lcio.c)
SLOW_LINE = re.compile(
    r"lcio s(?P<stream>\d+) (?P<disk>xvd[a-z]): (?P<op>read|write) of block \d+ took "
    r"(?P<ms>[0-9.]+) ms, done at [0-9.]+ s \((?P<end>\d\d:\d\d:\d\d\.\d{3}) UTC\)")
#: the guest's clock measurement (domU/lcio.c's clock_sync)
CLOCK_LINE = re.compile(r"lcio clock: dom0 is (?P<ms>-?[0-9.]+) ms ahead of the guest, within "
                        r"(?P<within>[0-9.]+) ms")
DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class Window:
    devid: int
    start: float  # seconds of the day, UTC
    end: float


@dataclasses.dataclass(frozen=True)
class SlowRequest:
    devid: int
    stream: int
    start: float
    end: float

    @property
    def ms(self) -> float:
        return round((self.end - self.start) * 1000, 1)


@dataclasses.dataclass(frozen=True)
class Clock:
    """How far dom0's wall clock is ahead of the guest's, and within how much."""

    ahead_ms: float
    within_ms: float


@dataclasses.dataclass(frozen=True)
class HandoverStalls:
    windows: list[Window]
    #: per window, the longest guest request on its disk that overlapped it (None: no
    #: request of 100 ms or more did)
    held: list[SlowRequest | None]
    #: the guest's clock as measured (None: not measured, its times taken as dom0's)
    clock: Clock | None = None

    @property
    def longest(self) -> SlowRequest | None:
        return _longest([r for r in self.held if r is not None])


def _longest(requests: list[SlowRequest]) -> SlowRequest | None:
    return max(requests, key=lambda r: r.end - r.start) if requests else None


def _seconds(clock: str) -> float:
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _devid(disk: str) -> int:
    """Linux's xvdX as a vbd's device number (202 << 8, 16 minors a disk)."""
    return (202 << 8) + (ord(disk[3]) - ord("a")) * 16


def parse_windows(serve_log: str) -> list[Window]:
    out = []
    for m in WINDOW_LINE.finditer(serve_log):
        start, end = _seconds(m["start"]), _seconds(m["end"])
        out.append(Window(int(m["devid"]), start, end + DAY if end < start else end))
    return out


def parse_clock(console: str) -> Clock | None:
    m = CLOCK_LINE.search(console)
    return Clock(float(m["ms"]), float(m["within"])) if m else None


def parse_slow_requests(console: str, clock: Clock | None = None) -> list[SlowRequest]:
    """The guest's slow requests, on dom0's clock where ``clock`` says how far it is ahead."""
    shift = clock.ahead_ms / 1000 if clock is not None else 0.0
    out = []
    for m in SLOW_LINE.finditer(console):
        end = _seconds(m["end"]) + shift
        out.append(SlowRequest(_devid(m["disk"]), int(m["stream"]), end - float(m["ms"]) / 1000,
                               end))
    return out


def _overlaps(request: SlowRequest, window: Window) -> bool:
    # times of day: a window and a request a day apart never meet, one across midnight does
    shift = round((window.start - request.start) / DAY) * DAY
    return request.start + shift <= window.end and window.start <= request.end + shift


def attribute(windows: list[Window], requests: list[SlowRequest],
              clock: Clock | None = None) -> HandoverStalls:
    held = []
    for window in windows:
        mine = [r for r in requests if r.devid == window.devid and _overlaps(r, window)]
        held.append(_longest(mine))
    return HandoverStalls(windows, held, clock)


def handover_stalls(run_dir: Path) -> HandoverStalls | None:
    """From a run's serve logs and the lifecycle guest's console logs; None if no serve
    logged a hand-over window with its wall clock."""
    windows = [w for log in sorted(run_dir.glob("serve-*.log"))
               for w in parse_windows(log.read_text(errors="replace"))]
    if not windows:
        return None
    consoles = [log.read_text(errors="replace")
                for log in sorted(run_dir.glob("console-lifecycle-*.log"))]
    # (measured once, at the guest's start: a restored or migrated guest's log has none)
    clock = next((c for c in map(parse_clock, consoles) if c is not None), None)
    requests = [r for text in consoles for r in parse_slow_requests(text, clock)]
    return attribute(windows, requests, clock)


def format_handover_stalls(stalls: HandoverStalls | None, target_ms: float) -> list[str]:
    if stalls is None:
        return []
    n, held = len(stalls.windows), [r for r in stalls.held if r is not None]
    longest = stalls.longest
    clock = (f"guest's clock moved {stalls.clock.ahead_ms:+.1f} ms, within "
             f"{stalls.clock.within_ms:.1f}" if stalls.clock is not None
             else "guest's clock not measured, taken as dom0's")
    if longest is None:
        return [f"  upgrade hand-overs: {n} windows, none overlapped by a guest request of "
                f"100 ms or more ({clock})"]
    goal = f"target <= {target_ms:g} ms {'met' if longest.ms <= target_ms else 'short'}"
    return [f"  upgrade hand-overs: {n} windows, {len(held)} overlapped by a guest request of "
            f"100 ms or more on their disk; the longest {longest.ms:.1f} ms ({goal}; {clock})"]
