"""The native ring loop (blkpy.fastpath, blkpy/gntdev/ringloop.c): its verdicts equal the
numpy reference on arbitrary slot bytes, and a Vbd serving through it answers exactly as
the reference path would."""

import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy import ring
from blkpy.fastpath import validate_native
from blkpy.requests import DiskGeometry, validate_batch
from blkpy.ring import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY
from blkpy.sim.inprocess import InProcessDevice

SECTOR_CHOICES = [0, 1, 8, 8192, 2**40, 2**63, 2**64 - 1]


@settings(max_examples=400, deadline=None)
@given(
    abi=st.sampled_from(sorted(ring.ABIS)),
    raw=st.lists(st.binary(min_size=112, max_size=112), min_size=1, max_size=32),
    sectors=st.sampled_from(SECTOR_CHOICES),
    sector_size=st.sampled_from([512, 4096]),
    readonly=st.booleans(),
    discard=st.booleans(),
    secure=st.booleans(),
    flush=st.booleans(),
    barrier=st.booleans(),
    max_indirect=st.sampled_from([0, 1, 32, 256, 1024]),
    bias=st.booleans(),
)
def test_native_verdicts_equal_numpy_on_any_bytes(abi, raw, sectors, sector_size, readonly,
                                                  discard, secure, flush, barrier,
                                                  max_indirect, bias):
    a = ring.ABIS[abi]
    slots = np.frombuffer(b"".join(r[: a.entry_size] for r in raw), dtype=a.raw).copy()
    req = slots.view(a.request)
    if bias:  # steer towards real operations and in-range sectors so acceptance is explored
        req["operation"][::2] %= 8
        req["nr_segments"][::3] %= 12
        req["sector_number"][::2] %= max(sectors, 1)
        req["seg"]["last_sect"][1::2] %= 8
        req["seg"]["first_sect"][1::2] %= 8
    geom = DiskGeometry(sectors=sectors, sector_size=sector_size, readonly=readonly,
                        discard=discard, secure_discard=secure, flush=flush, barrier=barrier,
                        max_indirect_segments=max_indirect)
    ref = validate_batch(req, a, geom)
    got = validate_native(req, a, geom)
    np.testing.assert_array_equal(got.code, ref.code)
    np.testing.assert_array_equal(got.rsp_operation, ref.rsp_operation)
    np.testing.assert_array_equal(got.io_op, ref.io_op)
    np.testing.assert_array_equal(got.nbytes, ref.nbytes)


@pytest.fixture
def fast(raw_image):
    h = InProcessDevice(raw_image, persistent=True)
    yield h
    h.close()


def _warm(h, pages, fills=None):
    """First use of a grant goes through Python (it maps it persistently); the warming
    reads overwrite the pages, so ``fills`` are put back afterwards."""
    reqs = np.concatenate([h.request(BLKIF_OP_READ, 0, [(g, 0, 7)], rid=k)
                           for k, (_f, g) in enumerate(pages)])
    assert set(h.status_of(reqs)) == {BLKIF_RSP_OKAY}
    for (frame, _g), fill in zip(pages, fills or [], strict=False):
        h.guest.page(frame)[:] = bytes([fill]) * 4096


def test_warm_requests_are_served_natively(fast):
    pages = [fast.data_page() for k in range(4)]
    _warm(fast, pages, fills=range(4))
    before = fast.vbd.loop.counters()
    py_batches = fast.vbd._stats.batches
    segs = [(g, 0, 7) for _f, g in pages]
    assert fast.status_of(fast.request(BLKIF_OP_WRITE, 64, segs, rid=7)) == [BLKIF_RSP_OKAY]
    assert fast.status_of(fast.request(BLKIF_OP_READ, 64, segs[:1], rid=8)) == [BLKIF_RSP_OKAY]
    after = fast.vbd.loop.counters()
    assert after["wr_req"] - before["wr_req"] == 1 and after["rd_req"] - before["rd_req"] == 1
    assert fast.vbd._stats.batches == py_batches  # Python never saw them
    with open(fast.disk.path, "rb") as f:
        f.seek(64 * 512)
        assert f.read(4 * 4096) == b"".join(bytes([k]) * 4096 for k in range(4))
    assert fast.vbd.stats.wr_req >= 1 and fast.vbd.stats.wr_sect >= 32


def test_refused_request_leaves_the_rest_of_its_batch_to_the_fast_path(fast):
    pages = [fast.data_page() for k in range(3)]
    _warm(fast, pages, fills=[0x40, 0x41, 0x42])
    good0 = fast.request(BLKIF_OP_WRITE, 8, [(pages[0][1], 0, 7)], rid=1)
    bad = fast.request(BLKIF_OP_WRITE, 16, [(pages[1][1], 5, 2)], rid=2)  # first > last
    good2 = fast.request(BLKIF_OP_WRITE, 24, [(pages[2][1], 0, 7)], rid=3)
    rsp = fast.run(np.concatenate([good0, bad, good2]))
    assert dict(zip(rsp["id"].tolist(), rsp["status"].tolist(), strict=True)) == {
        1: BLKIF_RSP_OKAY, 2: BLKIF_RSP_ERROR, 3: BLKIF_RSP_OKAY}
    with open(fast.disk.path, "rb") as f:
        data = f.read(32 * 512)
    assert data[8 * 512:16 * 512] == b"\x40" * 4096
    assert data[16 * 512:24 * 512] != b"\x41" * 4096  # the refused write touched nothing
    assert data[24 * 512:32 * 512] == b"\x42" * 4096


def test_uncached_grant_goes_through_python_and_is_cached(fast):
    f, g = fast.data_page(9)
    assert fast.vbd.pages.persistent_grants == 0
    assert fast.status_of(fast.request(BLKIF_OP_WRITE, 0, [(g, 0, 7)])) == [BLKIF_RSP_OKAY]
    assert fast.vbd.pages.persistent_grants == 1
    assert int(fast.vbd.pages.table.lookup(np.array([g], np.uint32))[0]) != 0


def _thread_cpu_seconds(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ring_thread_serves_and_stops_polling_when_idle(raw_image):
    h = InProcessDevice(raw_image, persistent=True, poll_us=200)
    try:
        f, g = h.data_page(3)
        _warm(h, [(f, g)])
        h.vbd.start()
        loop = h.vbd.loop.native
        for k in range(20):  # sparse requests, far apart compared with the poll budget
            h.front.put_requests(h.request(BLKIF_OP_READ, k * 8, [(g, 0, 7)], rid=k))
            if h.front.push_requests():
                h.port.notify()
            deadline = time.monotonic() + 5
            while not len(rsp := h.front.consume_responses()):
                assert time.monotonic() < deadline, "no response from the ring thread"
                time.sleep(0.001)
            assert rsp["status"].tolist() == [BLKIF_RSP_OKAY]
            time.sleep(0.01)
        assert loop.poll_ns == 0  # long sleeps shrank the budget to nothing
        tid = h.vbd._thread.native_id
        cpu0 = _thread_cpu_seconds(tid)
        time.sleep(0.5)
        assert _thread_cpu_seconds(tid) - cpu0 < 0.05  # an idle ring sleeps
        assert h.vbd.loop.counters()["sleeps"] >= 20
        assert h.vbd.loop.counters()["polls_missed"] >= 1  # it polled, then gave up
    finally:
        h.close()


def _indirect_write(h, pages, ind_gref, rid, sector=0):
    r = np.zeros(1, dtype=h.abi.indirect)
    r["operation"], r["indirect_op"], r["nr_segments"] = ring.BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, len(pages)
    r["id"], r["sector_number"] = rid, sector
    r["indirect_grefs"][0, 0] = ind_gref
    return r.view(h.abi.request)


def test_indirect_requests_on_cached_pages_are_served_natively(fast):
    pages = [fast.data_page() for _ in range(40)]
    ind_frame, ind_gref = fast.data_page()
    descs = np.zeros(40, dtype=ring.SEGMENT_DTYPE)
    descs["gref"] = [g for _f, g in pages]
    descs["last_sect"] = 7
    fast.guest.page(ind_frame)[:] = descs.tobytes().ljust(4096, b"\0")
    assert fast.status_of(_indirect_write(fast, pages, ind_gref, rid=1)) == [BLKIF_RSP_OKAY]
    for k, (frame, _g) in enumerate(pages):  # now every page is a persistent grant
        fast.guest.page(frame)[:] = bytes([k + 1]) * 4096
    before = fast.vbd.loop.counters()["wr_req"]
    assert fast.status_of(_indirect_write(fast, pages, ind_gref, rid=2, sector=800)) == [
        BLKIF_RSP_OKAY]
    assert fast.vbd.loop.counters()["wr_req"] == before + 1
    with open(fast.disk.path, "rb") as f:
        f.seek(800 * 512)
        assert f.read(40 * 4096) == b"".join(bytes([k + 1]) * 4096 for k in range(40))

    # Hostile descriptors on the same cached pages: the loop leaves them to Python, which
    # refuses them; nothing is written.
    descs["first_sect"][5], descs["last_sect"][5] = 6, 2
    fast.guest.page(ind_frame)[:] = descs.tobytes().ljust(4096, b"\0")
    assert fast.status_of(_indirect_write(fast, pages, ind_gref, rid=3, sector=4000)) == [
        BLKIF_RSP_ERROR]
    descs["first_sect"][5], descs["last_sect"][5] = 0, 7
    fast.guest.page(ind_frame)[:] = descs.tobytes().ljust(4096, b"\0")
    past_end = (fast.disk.size >> 9) - 8
    assert fast.status_of(_indirect_write(fast, pages, ind_gref, rid=4, sector=past_end)) == [
        BLKIF_RSP_ERROR]
    assert fast.vbd.loop.counters()["wr_req"] == before + 1
    with open(fast.disk.path, "rb") as f:
        f.seek(4000 * 512)
        assert f.read(40 * 4096) == bytes(40 * 4096)


def _written(h, sector, nbytes):
    with open(h.disk.path, "rb") as f:
        f.seek(sector * 512)
        return f.read(nbytes)


@pytest.mark.parametrize("engine", ["auto", "uring"])
def test_hybrid_and_async_modes_mix_reads_writes_and_flushes(raw_image, engine):
    h = InProcessDevice(raw_image, persistent=True, engine=engine)
    try:
        pages = [h.data_page() for _ in range(6)]
        _warm(h, pages, fills=[0x10, 0x11, 0x12, 0x13, 0x14, 0x15])
        assert h.vbd.loop.uses_uring
        reqs = [h.request(BLKIF_OP_WRITE, 8 * k, [(pages[k][1], 0, 7)], rid=10 + k)
                for k in range(3)]
        reqs.append(h.request(ring.BLKIF_OP_FLUSH_DISKCACHE, 0, [], rid=20))
        reqs += [h.request(BLKIF_OP_READ, 8 * k, [(pages[3 + k][1], 0, 7)], rid=30 + k)
                 for k in range(3)]
        first = h.run(np.concatenate(reqs[:4]))  # writes and a flush
        submits = h.vbd.loop.counters()["submits"]
        second = h.run(np.concatenate(reqs[4:]))  # a batch of reads: io_uring
        # page-cache reads complete inside the enter: one per batch is the cheapest
        assert h.vbd.loop.counters()["submits"] - submits == 1
        statuses = dict(zip(np.concatenate([first["id"], second["id"]]).tolist(),
                            np.concatenate([first["status"], second["status"]]).tolist(),
                            strict=True))
        assert set(statuses) == {10, 11, 12, 20, 30, 31, 32}
        assert set(statuses.values()) == {BLKIF_RSP_OKAY}
        for k in range(3):
            assert _written(h, 8 * k, 4096) == bytes([0x10 + k]) * 4096
            assert bytes(h.guest.page(pages[3 + k][0])) == bytes([0x10 + k]) * 4096
        c = h.vbd.loop.counters()
        assert c["rd_req"] >= 3 and c["wr_req"] >= 3 and c["f_req"] >= 1
    finally:
        h.close()


def test_o_direct_image_is_served_through_io_uring(tmp_path):
    path = tmp_path / "direct.raw"
    path.write_bytes(bytes(4 << 20))
    try:
        h = InProcessDevice(str(path), persistent=True, direct=True, engine="auto")
    except Exception as exc:  # a filesystem without O_DIRECT (tmpfs)
        pytest.skip(f"O_DIRECT unavailable here: {exc}")
    try:
        if not h.vbd.loop.uses_uring:
            pytest.skip("io_uring unavailable here")
        assert h.vbd.loop.native.async_all
        pages = [h.data_page() for _ in range(8)]
        _warm(h, pages, fills=range(1, 9))
        segs = [(g, 0, 7) for _f, g in pages]
        reqs = np.concatenate([h.request(BLKIF_OP_WRITE, 64, segs, rid=1),
                               h.request(ring.BLKIF_OP_FLUSH_DISKCACHE, 0, [], rid=2)])
        assert h.status_of(reqs) == [BLKIF_RSP_OKAY] * 2
        assert _written(h, 64, 8 * 4096) == b"".join(bytes([k]) * 4096 for k in range(1, 9))
        # a flush that carries data is two ordered operations: the reference path
        before = h.vbd.loop.counters()["f_req"]
        req = h.request(ring.BLKIF_OP_FLUSH_DISKCACHE, 128, segs[:2], rid=3)
        assert h.status_of(req) == [BLKIF_RSP_OKAY]
        assert h.vbd.loop.counters()["f_req"] == before
        assert _written(h, 128, 8192) == bytes([1]) * 4096 + bytes([2]) * 4096
        # many reads in flight at once, answered as they complete; the device gets the
        # first of them before the rest of the batch is prepared (an enter per 4)
        before = h.vbd.loop.counters()
        reqs = np.concatenate([h.request(BLKIF_OP_READ, 64 + 8 * k, [segs[k]], rid=100 + k)
                               for k in range(8)])
        assert h.status_of(reqs) == [BLKIF_RSP_OKAY] * 8
        after = h.vbd.loop.counters()
        assert after["rd_req"] - before["rd_req"] == 8
        assert after["submits"] - before["submits"] == 2
    finally:
        h.close()


def test_event_channel_only_python_can_drive(raw_image, monkeypatch):
    """A channel the loop cannot notify or sleep on (a platform whose calls are
    intercepted): the loop hands notification and sleeping back to Python."""
    from blkpy.sim.hypervisor import SimEventPort

    monkeypatch.setattr(SimEventPort, "native", lambda self: None)
    h = InProcessDevice(raw_image, persistent=True, poll_us=0)
    try:
        assert not h.vbd.loop.drives_evtchn
        f, g = h.data_page()
        _warm(h, [(f, g)])
        h.vbd.start()
        for k in range(5):
            h.front.put_requests(h.request(BLKIF_OP_READ, 8 * k, [(g, 0, 7)], rid=k))
            if h.front.push_requests():
                h.port.notify()
            deadline = time.monotonic() + 5
            got = []
            while not got:
                assert time.monotonic() < deadline, "no response"
                if h.front.final_check_for_responses():
                    got = h.front.consume_responses().tolist()
                else:
                    h.port.ack()
                    time.sleep(0.002)
        assert h.platform.stats.notifies >= 1  # Python sent them
    finally:
        h.close()
