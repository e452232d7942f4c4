"""`blkpy fuzz soak`: its plan, its trend judge, its data oracle's power to see a lost
write, and the short campaign CI runs (which must find nothing)."""

from blkpy import ring as blkif
from blkpy.fuzz import FindingLog, soak
from blkpy.sim.procinfo import ProcessFigures
from blkpy.xenbus import XenbusState


def test_plan_gives_the_issue_figures():
    assert soak.plan(1.0) == (100_000, 10, 20)
    assert soak.plan(100.0) == (10**7, 200, 1000)


def test_growth_is_measured_from_the_end_of_warm_up():
    assert soak.growth([100, 900, 1000, 1000, 1010], warmup=2) == 110
    assert soak.growth([5, 4, 3], warmup=3) == 0  # nothing after warm-up yet


def test_rising_needs_a_steady_climb_not_noise():
    noise = [29590 + (i * 7) % 9 for i in range(24)]
    assert not soak.rising(noise, warmup=4)
    leak = [29590 + 8 * i + (i * 7) % 9 for i in range(24)]  # eight objects per cycle
    assert not soak.rising([29590 + 2 * i for i in range(24)], warmup=4)  # under transients
    assert soak.rising(leak, warmup=4)


def _samples(own=(), fds=(), maps=(), objects=()):
    n = max(len(own), len(fds), len(maps), len(objects))
    def at(series, i, default):
        return series[i] if series else default
    return [soak.Sample(ProcessFigures(rss_anon=at(own, i, 30000), rss_file=0, rss_shmem=0,
                                       pss=0, fds=at(fds, i, 21), maps=at(maps, i, 270),
                                       guest_maps=0),
                        grant_pages=0, objects=at(objects, i, 29590))
            for i in range(n)]


def test_judge_flags_each_kind_of_growth():
    log = FindingLog("soak", 1)
    flat = soak.judge(log, "cycles", _samples(own=[30000] * 10), warmup=2)
    assert log.findings == [] and flat["cycles_rss_growth_kib"] == 0
    rss = [30000, 30500] + [30500 + 200 * i for i in range(8)]  # 1.4 MiB after warm-up
    fds = [21] * 9 + [22]
    maps = [270] * 9 + [270 + soak.MAPS_SLACK + 1]
    objects = [29590 + 30 * i for i in range(10)]
    for kind, samples in [("rss growth", _samples(own=rss)), ("fd growth", _samples(fds=fds)),
                          ("maps growth", _samples(maps=maps)),
                          ("object growth", _samples(objects=objects))]:
        log = FindingLog("soak", 1)
        soak.judge(log, "cycles", samples, warmup=2)
        assert list(log.counts) == [kind], (kind, log.findings)


def test_read_back_oracle_sees_a_write_that_went_astray():
    """After a C write burst every page must hold the old data or the fill byte: a page
    that holds anything else (here: written behind the serve's back) is a finding, and
    the C generator's own writes are not."""
    with soak.served_disk() as (host, spec, backend, fe, image):
        assert host.wait_backend_state(spec, XenbusState.INIT_WAIT, 30), backend.log()
        fe.connect(timeout=30)
        log = FindingLog("soak", 1)
        s = soak.Soak(1, log, host, spec, backend, fe)
        s.c_burst("burst", blkif.BLKIF_OP_WRITE, 4096, 200, seed=3)
        s.check_c_writes("clean")
        assert log.findings == [] and s.requests == 200 + soak.SPAN // soak.READ_CHUNK
        written = s.model.expected(0, soak.SPAN).reshape(-1, 4096)
        assert (written == soak.FILL).all(axis=1).sum() > 100  # the burst landed
        with open(image, "r+b") as f:
            f.seek(5 * 4096 + 512)
            f.write(b"\x11" * 512)
        s.check_c_writes("corrupted")
        assert [f.case for f in log.findings] == ["corrupted"]
        assert "1 page(s)" in log.findings[0].problem
        fe.close(timeout=10)


def test_short_campaign_finds_nothing():
    lines: list[str] = []
    result = soak.run(seed=1, scale=1.0, progress=lines.append)
    assert [f.line() for f in result.findings] == []
    assert result.count >= 100_000 and result.figures["cycles"] == 20
    # both paths soaked: the native loop most, the reference path a real share
    assert result.figures["native_requests"] > 50_000
    assert result.figures["reference_requests"] > 500
    assert any("cycle 20/20" in line for line in lines)
