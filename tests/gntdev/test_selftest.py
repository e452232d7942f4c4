"""The real-Xen self-test, run against the fake devices (it must pass there, and notice a
host that misbehaves)."""

from __future__ import annotations

from blkpy.gntdev import selftest

from .fake_xen import EVTCHN, GNTDEV, FakeXen


def test_passes_on_a_well_behaved_host():
    xen = FakeXen()
    report = selftest.run(calls=xen)
    assert report["ok"], report
    assert report["checks"] == {"map": "ok", "bad-ref": "ok", "copy": "ok", "events": "ok"}
    assert report["stats"]["map_calls"] == report["stats"]["unmap_calls"] + 1  # the bad batch
    assert xen.fds == {} and xen.allocated == {}


def test_notices_lost_events(monkeypatch):
    class Deaf(FakeXen):
        def fire(self, port):
            pass

    monkeypatch.setattr(selftest, "EVENT_WAIT_S", 0.01)
    report = selftest.run(calls=Deaf())
    assert not report["ok"]
    assert report["checks"]["events"].startswith("FAILED")
    assert report["checks"]["map"] == "ok"


def test_notices_pages_mapped_out_of_order():
    class Shuffled(FakeXen):
        def _map_frames(self, frames, writable):
            return super()._map_frames(sorted(frames), writable)

    report = selftest.run(calls=Shuffled())
    assert report["checks"]["map"].startswith("FAILED")


def test_reports_missing_devices():
    report = selftest.run(calls=FakeXen(devices=(GNTDEV, EVTCHN)))
    assert not report["ok"] and "xen-gntalloc" in report["error"]
