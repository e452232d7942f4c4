"""Campaign 2 (ring protocol attacks) and the event-storm defence."""

from blkpy.fuzz import FindingLog, protocol
from blkpy.fuzz.storm import STORM_CPU_CAP, event_storm


def test_short_campaign_finds_nothing():
    result = protocol.run(seed=11, scale=0.5, progress=lambda _: None)
    assert [f.line() for f in result.findings] == []
    assert result.figures["storm backend CPU %"] <= STORM_CPU_CAP


def test_event_storm_costs_a_bounded_share_of_a_core():
    # Without the late-acknowledge defence in the ring loop the backend spent ~40% of a
    # core on a guest notifying in a loop; the storm check fails above STORM_CPU_CAP.
    findings = FindingLog("protocol", 1)
    figures = event_storm(1, findings, seconds=1.0)
    assert figures["storm notifies/s"] > 1000
    assert [f.line() for f in findings.findings] == []
