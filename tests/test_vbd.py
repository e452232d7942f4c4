"""The dispatcher (blkpy.vbd) driven in-process by a test frontend on the sim platform:
every operation, and every hostile field answered with an error while the device keeps
serving."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkpy import ring
from blkpy.ring import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from blkpy.sim.inprocess import InProcessDevice as VbdHarness
from blkpy.vbd import MAP_RUN_LIMIT, ReadyThread, _touching_runs

OK, ERR, NOTSUPP = BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP


@pytest.fixture(params=["map", "persistent", "copy"])
def dev(request, raw_image):
    mode = request.param
    h = VbdHarness(raw_image, persistent=mode == "persistent",
                   grant_mode="copy" if mode == "copy" else "map")
    yield h
    h.close()


def _read_back(h, sector, nbytes=4096):
    frame, g = h.data_page(0)
    assert h.status_of(h.request(BLKIF_OP_READ, sector, [(g, 0, nbytes // 512 - 1)], rid=99)) == [OK]
    return bytes(h.guest.page(frame)[:nbytes])


def test_write_then_read_every_grant_mode(dev):
    frames, segs = [], []
    for k in range(11):
        f, g = dev.data_page(k + 1)
        frames.append(f)
        segs.append((g, 0, 7))
    assert dev.status_of(dev.request(BLKIF_OP_WRITE, 16, segs)) == [OK]
    with open(dev.disk.path, "rb") as f:
        f.seek(16 * 512)
        data = f.read(11 * 4096)
    assert data == b"".join(bytes([k + 1]) * 4096 for k in range(11))
    assert _read_back(dev, 16 + 8 * 5) == bytes([6]) * 4096
    # partial-page segments: sectors 2..4 of a page
    f, g = dev.data_page(0xEE)
    assert dev.status_of(dev.request(BLKIF_OP_WRITE, 1000, [(g, 2, 4)])) == [OK]
    assert _read_back(dev, 1000, 1536) == b"\xee" * 1536


def test_responses_release_grants_unless_persistent(dev):
    f, g = dev.data_page(1)
    assert dev.status_of(dev.request(BLKIF_OP_WRITE, 0, [(g, 0, 7)])) == [OK]
    # blkfront revokes the grant on completion: only persistent mode may keep it mapped
    assert dev.guest.end_access(g) is (not dev.vbd.pages.persistent)


def test_persistent_grants_map_each_page_once(raw_image):
    h = VbdHarness(raw_image, persistent=True)
    try:
        f, g = h.data_page(7)
        for rid in range(5):
            assert h.status_of(h.request(BLKIF_OP_WRITE, rid * 8, [(g, 0, 7)], rid=rid)) == [OK]
        assert h.platform.stats.map_calls == 2  # the ring + one persistent grant
        assert h.vbd.pages.persistent_grants == 1
    finally:
        h.close()


def test_batch_maps_all_new_grants_in_one_call(raw_image):
    h = VbdHarness(raw_image)
    try:
        reqs = []
        for k in range(20):
            f, g = h.data_page(k)
            reqs.append(h.request(BLKIF_OP_WRITE, k * 8, [(g, 0, 7)], rid=k))
        before = h.platform.stats.map_calls
        assert h.status_of(ring.concat_slots(h.abi, reqs)) == [OK] * 20
        assert h.platform.stats.map_calls - before == 1
    finally:
        h.close()


def test_flush_barrier_and_discard(dev):
    f, g = dev.data_page(0x55)
    assert dev.status_of(dev.request(BLKIF_OP_FLUSH_DISKCACHE, 0, [])) == [OK]
    assert dev.status_of(dev.request(BLKIF_OP_WRITE_BARRIER, 0, [])) == [OK]
    assert dev.status_of(dev.request(BLKIF_OP_FLUSH_DISKCACHE, 64, [(g, 0, 7)], rid=2)) == [OK]
    assert dev.status_of(dev.request(BLKIF_OP_WRITE_BARRIER, 72, [(g, 0, 7)], rid=3)) == [OK]
    assert _read_back(dev, 64) == b"\x55" * 4096
    assert _read_back(dev, 72) == b"\x55" * 4096
    d = np.zeros(1, dtype=dev.abi.discard)
    d["operation"], d["id"], d["sector_number"], d["nr_sectors"] = BLKIF_OP_DISCARD, 9, 64, 16
    assert dev.status_of(d.view(dev.abi.request)) == [OK]
    assert _read_back(dev, 64) == bytes(4096)
    assert _read_back(dev, 72) == bytes(4096)


def test_indirect_request_256_segments(dev):
    n = 256
    frames, descs = [], np.zeros(512, dtype=ring.SEGMENT_DTYPE)
    for k in range(n):
        f, g = dev.data_page(k & 0xFF)
        frames.append(f)
        descs[k] = (g, 0, 7)
    ind_frame, ind_gref = dev.data_page(0)
    dev.guest.page(ind_frame)[:] = descs.tobytes()
    r = np.zeros(1, dtype=dev.abi.indirect)
    r["operation"], r["indirect_op"], r["nr_segments"] = BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, n
    r["id"], r["sector_number"] = 5, 0
    r["indirect_grefs"][0, 0] = ind_gref
    rsp = dev.run(r.view(dev.abi.request))
    assert rsp["status"].tolist() == [OK]
    assert rsp["operation"].tolist() == [BLKIF_OP_WRITE]  # indirect answered as indirect_op
    assert _read_back(dev, 8 * 200) == bytes([200]) * 4096
    # and read it back through an indirect READ
    for k in range(n):
        dev.guest.page(frames[k])[:] = bytes(4096)
    r["indirect_op"] = BLKIF_OP_READ
    assert dev.status_of(r.view(dev.abi.request)) == [OK]
    assert bytes(dev.guest.page(frames[77])[:8]) == bytes([77]) * 8


HOSTILE = {
    "unknown op": (lambda h, g: h.request(99, 0, [(g, 0, 7)]), NOTSUPP),
    "reserved op 4": (lambda h, g: h.request(ring.BLKIF_OP_RESERVED_1, 0, [(g, 0, 7)]), NOTSUPP),
    "zero segments": (lambda h, g: h.request(BLKIF_OP_READ, 0, [], nr_segments=0), ERR),
    "12 segments": (lambda h, g: h.request(BLKIF_OP_READ, 0, [(g, 0, 7)] * 11, nr_segments=12), ERR),
    "255 segments": (lambda h, g: h.request(BLKIF_OP_WRITE, 0, [(g, 0, 7)], nr_segments=255), ERR),
    "first > last": (lambda h, g: h.request(BLKIF_OP_READ, 0, [(g, 5, 4)]), ERR),
    "last > 7": (lambda h, g: h.request(BLKIF_OP_READ, 0, [(g, 0, 8)]), ERR),
    "first 255": (lambda h, g: h.request(BLKIF_OP_WRITE, 0, [(g, 255, 255)]), ERR),
    "past the end": (lambda h, g: h.request(BLKIF_OP_READ, (4 << 20) // 512 - 4, [(g, 0, 7)]), ERR),
    "sector u64 wrap": (lambda h, g: h.request(BLKIF_OP_WRITE, 2**64 - 4, [(g, 0, 7)]), ERR),
    "bad gref": (lambda h, g: h.request(BLKIF_OP_READ, 0, [(0xFFFFFFF0, 0, 7)]), ERR),
    "reserved gref": (lambda h, g: h.request(BLKIF_OP_WRITE, 0, [(1, 0, 7)]), ERR),
    "flush with 12 segments": (lambda h, g: h.request(BLKIF_OP_FLUSH_DISKCACHE, 0, [], nr_segments=12), ERR),
}


def _discard(h, sector, nsec, flag=0):
    d = np.zeros(1, dtype=h.abi.discard)
    d["operation"], d["id"], d["sector_number"], d["nr_sectors"], d["flag"] = (
        BLKIF_OP_DISCARD, 1, sector, nsec, flag)
    return d.view(h.abi.request)


def _indirect(h, g, nseg, op=BLKIF_OP_READ, grefs=None):
    r = np.zeros(1, dtype=h.abi.indirect)
    r["operation"], r["indirect_op"], r["nr_segments"], r["id"] = BLKIF_OP_INDIRECT, op, nseg, 1
    r["indirect_grefs"][0, :] = grefs if grefs is not None else g
    return r.view(h.abi.request)


HOSTILE.update({
    "discard past the end": (lambda h, g: _discard(h, 8, 2**63), ERR),
    "discard u64 wrap": (lambda h, g: _discard(h, 2**64 - 1, 2), ERR),
    "secure discard": (lambda h, g: _discard(h, 0, 8, flag=1), NOTSUPP),
    "indirect op flush": (lambda h, g: _indirect(h, g, 1, op=BLKIF_OP_FLUSH_DISKCACHE), ERR),
    "indirect 0 segments": (lambda h, g: _indirect(h, g, 0), ERR),
    "indirect 4096 segments": (lambda h, g: _indirect(h, g, 4096), ERR),
    "indirect 257 segments": (lambda h, g: _indirect(h, g, 257), ERR),
    "indirect bad page gref": (lambda h, g: _indirect(h, g, 3, grefs=0xDEAD), ERR),
})


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_field_gets_error_and_device_keeps_serving(dev, case):
    build, expected = HOSTILE[case]
    f, g = dev.data_page(0x11)
    before = os.path.getsize(dev.disk.path), Path(dev.disk.path).read_bytes()
    ok_frame, ok_gref = dev.data_page(0x22)
    good = dev.request(BLKIF_OP_WRITE, 8, [(ok_gref, 0, 7)], rid=7)
    bad = build(dev, g)
    rsp = dev.run(ring.concat_slots(dev.abi, [bad, good]))
    got = dict(zip(rsp["id"].tolist(), rsp["status"].tolist(), strict=True))
    assert got[7] == OK
    bad_id = int(bad["id"][0])
    assert got[bad_id] == expected
    after = Path(dev.disk.path).read_bytes()
    assert os.path.getsize(dev.disk.path) == before[0]
    # only the good request's 4 KiB at sector 8 changed
    assert after[:4096] == before[1][:4096] and after[8192:] == before[1][8192:]
    assert not dev.broken


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_refusal_leaves_an_indirect_neighbour_alone(dev, case):
    # An outside fuzzer found a bad indirect page (persistent grants) failing the valid
    # indirect request after it in the same batch; every refusal must leave its batch alone.
    with open(dev.disk.path, "r+b") as f:
        f.seek(100 * 512)
        f.write(bytes(range(256)) * 64)
    _, g = dev.data_page(0x11)
    ind_frame, ind_gref = dev.data_page(0)
    pages = [dev.data_page(0) for _ in range(4)]
    descs = np.zeros(512, dtype=ring.SEGMENT_DTYPE)
    for k, (_, pg) in enumerate(pages):
        descs[k] = (pg, 0, 7)
    dev.guest.page(ind_frame)[:] = descs.tobytes()
    good = _indirect(dev, ind_gref, 4, grefs=ind_gref).copy()
    good["id"], good["sector_number"] = 7, 100
    bad = HOSTILE[case][0](dev, g)
    rsp = dev.run(ring.concat_slots(dev.abi, [bad, good]))
    got = dict(zip(rsp["id"].tolist(), rsp["status"].tolist(), strict=True))
    assert got[7] == OK, case
    data = b"".join(bytes(dev.guest.page(fr)) for fr, _ in pages)
    assert data == bytes(range(256)) * 64
    assert not dev.broken


def test_bad_indirect_page_before_a_good_one_in_one_batch(dev):
    # The outside fuzzer's minimal case: two indirect READs of 4 segments at sector 100,
    # the first naming a never-granted indirect page.
    ind_frame, ind_gref = dev.data_page(0)
    descs = np.zeros(512, dtype=ring.SEGMENT_DTYPE)
    for k in range(4):
        descs[k] = (dev.data_page(0)[1], 0, 7)
    dev.guest.page(ind_frame)[:] = descs.tobytes()
    first = _indirect(dev, 0, 4, grefs=99999).copy()
    second = _indirect(dev, 0, 4, grefs=ind_gref).copy()
    first["id"], second["id"] = 1, 2
    first["sector_number"] = second["sector_number"] = 100
    rsp = dev.run(ring.concat_slots(dev.abi, [first, second]))
    assert rsp["id"].tolist() == [1, 2]
    assert rsp["status"].tolist() == [ERR, OK]


def test_indirect_descriptors_are_validated(dev):
    f, g = dev.data_page(0)
    ind_frame, ind_gref = dev.data_page(0)
    descs = np.zeros(512, dtype=ring.SEGMENT_DTYPE)
    descs[0] = (g, 0, 7)
    descs[1] = (g, 6, 2)  # first > last in the second descriptor
    dev.guest.page(ind_frame)[:] = descs.tobytes()
    assert dev.status_of(_indirect(dev, ind_gref, 2, grefs=ind_gref)) == [ERR]


def test_read_only_disk_refuses_writes(raw_image):
    with open(raw_image, "r+b") as f:
        f.write(b"\x77" * 4096)
    h = VbdHarness(raw_image, readonly=True)
    try:
        f, g = h.data_page(0x33)
        assert h.status_of(h.request(BLKIF_OP_WRITE, 0, [(g, 0, 7)])) == [ERR]
        assert h.status_of(h.request(BLKIF_OP_WRITE_BARRIER, 0, [(g, 0, 7)])) == [ERR]
        assert h.status_of(_discard(h, 0, 8)) == [NOTSUPP]  # not advertised when read-only
        assert _read_back(h, 0) == b"\x77" * 4096
    finally:
        h.close()
    assert Path(raw_image).read_bytes()[:4096] == b"\x77" * 4096


def test_4k_sector_disk_refuses_misaligned_io(raw_image):
    h = VbdHarness(raw_image, sector_size=4096)
    try:
        f, g = h.data_page(1)
        assert h.status_of(h.request(BLKIF_OP_WRITE, 8, [(g, 0, 7)])) == [OK]
        assert h.status_of(h.request(BLKIF_OP_WRITE, 4, [(g, 0, 7)])) == [ERR]
        assert h.status_of(h.request(BLKIF_OP_WRITE, 8, [(g, 0, 3)])) == [ERR]
        assert h.status_of(_discard(h, 8, 4)) == [ERR]
    finally:
        h.close()


def test_bogus_producer_index_halts_the_ring(raw_image):
    h = VbdHarness(raw_image)
    try:
        np.frombuffer(h._ring_view(), dtype="<u4", count=1)[0] = 1000
        h.vbd.kick()
        assert h.broken and "ahead" in h.broken[0]
        assert h.vbd.kick() is False  # nothing more is read from a halted ring
    finally:
        h.close()


@pytest.mark.parametrize("engine", ["thread", "uring"])
def test_async_engines_complete_and_answer(raw_image, engine):
    h = VbdHarness(raw_image, engine=engine)
    try:
        reqs = []
        for k in range(32):
            f, g = h.data_page(k)
            reqs.append(h.request(BLKIF_OP_WRITE, k * 8, [(g, 0, 7)], rid=k))
        rsp = h.run(ring.concat_slots(h.abi, reqs))
        assert sorted(rsp["id"].tolist()) == list(range(32))
        assert set(rsp["status"].tolist()) == {OK}
        assert _read_back(h, 8 * 31) == bytes([31]) * 4096
        # flushes and barriers in the middle of a batch, and a discard
        f, g = h.data_page(0x44)
        mixed = [h.request(BLKIF_OP_WRITE, 0, [(g, 0, 7)], rid=1),
                 h.request(BLKIF_OP_FLUSH_DISKCACHE, 0, [], rid=2),
                 h.request(BLKIF_OP_WRITE_BARRIER, 8, [(g, 0, 7)], rid=3),
                 _discard(h, 16, 8)]
        mixed[3]["id"] = 4
        assert sorted(h.status_of(ring.concat_slots(h.abi, mixed))) == [OK] * 4
        assert _read_back(h, 0) == _read_back(h, 8) == b"\x44" * 4096
        assert _read_back(h, 16) == bytes(4096)
    finally:
        h.close()


@pytest.mark.parametrize("abi", ["x86_32-abi", "arm-abi"])
@pytest.mark.parametrize("order", [0, 2])
def test_other_abis_and_ring_orders(raw_image, abi, order):
    h = VbdHarness(raw_image, abi=abi, order=order)
    try:
        for _round in range(3):  # wrap the ring a few times with full batches
            reqs = []
            for k in range(h.front.size):
                f, g = h.data_page(k & 0xFF)
                reqs.append(h.request(BLKIF_OP_WRITE, (k % 64) * 8, [(g, 0, 7)], rid=k))
            assert h.status_of(ring.concat_slots(h.abi, reqs)) == [OK] * h.front.size
    finally:
        h.close()


@given(st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(1, 1 << 17)), max_size=40))
def test_touching_writes_are_mapped_as_runs_covering_exactly_their_bytes(writes):
    sectors = [s for s, _ in writes]
    lengths = [n for _, n in writes]
    runs = _touching_runs(sectors, lengths)
    covered = set()
    for off, n in runs:
        covered |= set(range(off // 512, (off + n + 511) // 512))
    wanted = set()
    for s, n in writes:
        wanted |= set(range(s, s + (n + 511) // 512))
    assert covered == wanted  # every byte written, nothing else
    for (a, n), (b, _) in zip(runs, runs[1:], strict=False):
        assert a + n <= b  # in order, apart
    assert all(n <= MAP_RUN_LIMIT or n in lengths for _, n in runs)


def test_a_sequential_queue_is_one_run():
    assert _touching_runs([8 * i for i in range(31, 0, -1)], [4096] * 31) == [(4096, 31 * 4096)]


def test_a_ready_thread_runs_its_one_target_when_given_it_and_can_be_let_go():
    ran = []
    ready = ReadyThread()
    assert ready.thread.is_alive() and not ran  # started ahead, parked
    thread = ready.run(lambda: ran.append(threading.current_thread().name))
    thread.join(5)
    assert ran == ["blkpy-ring"] and not thread.is_alive()
    with pytest.raises(RuntimeError):
        ready.run(lambda: ran.append("again"))
    idle = ReadyThread()
    idle.cancel()
    idle.cancel()
    idle.thread.join(5)
    assert not idle.thread.is_alive() and ran == ["blkpy-ring"]
    with pytest.raises(RuntimeError):
        idle.run(lambda: ran.append("late"))


def test_a_device_serves_on_a_ring_thread_started_ahead(raw_image):
    h = VbdHarness(raw_image, persistent=True)
    try:
        frame, gref = h.data_page(fill=0x3C)
        h.front.put_requests(h.request(BLKIF_OP_WRITE, 8, [(gref, 0, 7)]))
        h.front.push_requests()  # waiting when the thread comes: its first run takes it
        ready = ReadyThread()
        h.vbd.start(ready)
        assert h.vbd._thread is ready.thread
        deadline = time.monotonic() + 10
        while not len(rsp := h.front.consume_responses()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [int(s) for s in rsp["status"]] == [OK]
        h.vbd.stop()
        assert not ready.thread.is_alive()
        with open(raw_image, "rb") as f:
            f.seek(8 * 512)
            assert f.read(4096) == bytes([0x3C]) * 4096
    finally:
        h.close()
