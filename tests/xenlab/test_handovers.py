"""tests/xenlab/handovers.py: the guest's slow requests lined up with the serves' hand-overs."""

from __future__ import annotations

from pathlib import Path

from .handovers import format_handover_stalls, handover_stalls
from .results import format_summary

SERVE_51712 = """\
2026-12-01 02:06:29,496 blkpy[409] vbd-1-51712 INFO /local/domain/0/backend/vbd/1/51712: serve pid 373 handed over in 34 ms (released)
2026-12-01 02:06:30,597 blkpy[409] vbd-1-51712 INFO /local/domain/0/backend/vbd/1/51712: hand-over window 67 ms (02:06:29.380 to 02:06:29.447 UTC): no request taken from serve pid 373 stopping to our rings served
2026-12-01 23:59:59,990 blkpy[509] vbd-1-51712 INFO /local/domain/0/backend/vbd/1/51712: hand-over window 50 ms (23:59:59.980 to 00:00:00.030 UTC): no request taken from serve pid 409 stopping to our rings served
"""
SERVE_51728 = """\
2026-12-01 02:06:31,943 blkpy[408] vbd-1-51728 INFO /local/domain/0/backend/vbd/1/51728: hand-over window 101 ms (02:06:30.700 to 02:06:30.801 UTC): no request taken from serve pid 372 stopping to our rings served
"""
#: the guest's clock 200 ms behind dom0's, as lcio measured it (its times below are its own)
CONSOLE = """\
lcio clock: dom0 is 200.0 ms ahead of the guest, within 3.5 ms (best of 16 round trips)
lcio s0 xvda: write of block 3 took 150.0 ms, done at 80.000 s (02:06:29.300 UTC) (request 12)
lcio s1 xvda: read of block 4 took 120.5 ms, done at 80.100 s (02:06:29.200 UTC) (request 13)
lcio s3 xvdb: read of block 8 took 305.9 ms, done at 82.277 s (02:06:29.491 UTC) (request 5102)
lcio s2 xvdb: read of block 1 took 100.2 ms, done at 83.000 s (02:06:34.800 UTC) (request 7)
lcio s0 xvda: write of block 5 took 110.0 ms, done at 90.000 s (23:59:59.860 UTC) (request 99)
noise from the kernel
"""


def _run(tmp_path: Path) -> Path:
    (tmp_path / "serve-1-51712.log").write_text(SERVE_51712)
    (tmp_path / "serve-1-51728.log").write_text(SERVE_51728)
    (tmp_path / "serve-1-51744.log").write_text("nothing handed over here\n")
    (tmp_path / "console-lifecycle-lc.log").write_text(CONSOLE)
    return tmp_path


def test_each_window_is_held_by_the_longest_request_on_its_own_disk_that_overlapped_it(
        tmp_path):
    stalls = handover_stalls(_run(tmp_path))
    assert stalls is not None
    assert [(w.devid, round((w.end - w.start) * 1000) % 86400000) for w in stalls.windows] \
        == [(51712, 67), (51712, 50), (51728, 101)]
    held = [(r.stream, r.ms) if r is not None else None for r in stalls.held]
    # the raw disk's first window: both of its streams' requests overlapped it, the longer
    # one counts; the window across midnight: the request that ended just after it; the
    # qcow2 disk's window came after xvdb's 305.9 ms request ended, and before the next
    assert held == [(0, 150.0), (0, 110.0), None]
    assert stalls.longest is not None and stalls.longest.ms == 150.0


def test_the_summary_says_how_many_windows_held_a_request_and_the_longest_against_the_target(
        tmp_path):
    lines = format_handover_stalls(handover_stalls(_run(tmp_path)), 200)
    assert lines == ["  upgrade hand-overs: 3 windows, 2 overlapped by a guest request of "
                     "100 ms or more on their disk; the longest 150.0 ms (target <= 200 ms met; "
                     "guest's clock moved +200.0 ms, within 3.5)"]
    assert lines[0] in format_summary({}, {}, handover_stalls(tmp_path)).splitlines()
    assert "short" in format_handover_stalls(handover_stalls(tmp_path), 120)[0]


def test_a_run_without_windows_adds_nothing_and_windows_without_slow_requests_say_so(tmp_path):
    (tmp_path / "serve-1-51712.log").write_text("hand-over window 67 ms: an older serve\n")
    assert handover_stalls(tmp_path) is None
    assert format_handover_stalls(None, 200) == []
    (tmp_path / "serve-1-51728.log").write_text(SERVE_51728)
    assert format_handover_stalls(handover_stalls(tmp_path), 200) == [
        "  upgrade hand-overs: 1 windows, none overlapped by a guest request of 100 ms or more "
        "(guest's clock not measured, taken as dom0's)"]


def test_without_the_guest_s_clock_its_times_are_taken_as_dom0_s(tmp_path):
    """The same run without the clock line: every request 200 ms early on dom0's clock, so
    none overlaps a window any more (the lab's first runs with windows on the wall clock
    read so: the guest's requests ended 60-190 ms before the windows they waited for)."""
    _run(tmp_path)
    console = tmp_path / "console-lifecycle-lc.log"
    console.write_text(CONSOLE.split("\n", 1)[1])
    stalls = handover_stalls(tmp_path)
    assert stalls is not None and stalls.clock is None
    assert [(r.stream, r.ms) if r is not None else None for r in stalls.held] \
        == [None, None, None]
