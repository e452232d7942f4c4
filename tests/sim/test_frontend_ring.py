"""The simulated blkfront's data path against a toy in-process backend."""

import numpy as np
import pytest
from frontend_fakes import ring_pair

from blkpy import ring as blkif
from blkpy.sim.blkfront_ring import (
    ProtocolError,
    RingBusy,
    contiguous_layout,
    layout_bytes,
)
from blkpy.sim.guest import create_sim_dir, remove_sim_dir

DOMID = 5
SECTORS = 4096


@pytest.fixture
def sim_dir():
    path = create_sim_dir()
    yield path
    remove_sim_dir(path)


def make_pair(sim_dir, **options):
    return ring_pair(sim_dir, DOMID, sectors=SECTORS, **options)


@pytest.fixture
def pair(sim_dir, request):
    guest, fr, be = make_pair(sim_dir, **getattr(request, "param", {}))
    yield guest, fr, be
    be.stop()
    guest.close()


def pattern(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def roundtrip(fr, sector, data, **kw):
    fr.submit(blkif.BLKIF_OP_WRITE, sector, data=data, **kw)
    fr.push()
    (w,) = fr.wait_all(5)
    assert w.status == blkif.BLKIF_RSP_OKAY
    fr.submit(blkif.BLKIF_OP_READ, sector, nbytes=len(data), **kw)
    fr.push()
    (r,) = fr.wait_all(5)
    assert r.status == blkif.BLKIF_RSP_OKAY
    return r


def test_layouts():
    assert contiguous_layout(512) == [(0, 0)]
    assert contiguous_layout(4096, 4) == [(4, 7), (0, 3)]
    assert len(contiguous_layout(11 * 4096)) == 11
    assert layout_bytes(contiguous_layout(8192, 7)) == 8192
    with pytest.raises(ValueError):
        contiguous_layout(100)


@pytest.mark.parametrize(
    "pair",
    [{"abi": a, "order": o, "persistent": p} for a in ("x86_64-abi", "x86_32-abi")
     for o in (0, 2) for p in (False, True)],
    indirect=True,
)
@pytest.mark.parametrize(
    ("nbytes", "first_sect"),
    [(512, 0), (512, 7), (4096, 4), (11 * 4096, 0), (40 * 4096, 3)],
)
def test_write_then_read_returns_the_data(pair, nbytes, first_sect):
    _guest, fr, be = pair
    data = pattern(nbytes, nbytes + first_sect)
    r = roundtrip(fr, 8, data, first_sect=first_sect)
    assert np.array_equal(r.data, data)
    assert bytes(be.disk[8 * 512 : 8 * 512 + nbytes]) == data.tobytes()
    assert r.indirect == (len(contiguous_layout(nbytes, first_sect)) > 11)


def test_scattered_layout(pair):
    _guest, fr, _be = pair
    layout = [(3, 3), (0, 7), (5, 6)]
    data = pattern(layout_bytes(layout), 1)
    r = roundtrip(fr, 100, data, layout=layout)
    assert np.array_equal(r.data, data)


def test_requests_carry_handle_and_ids_below_ring_size(pair):
    _guest, fr, be = pair
    for i in range(fr.size):
        fr.submit(blkif.BLKIF_OP_READ, i, nbytes=512)
    assert not fr.can_submit()
    with pytest.raises(RingBusy):
        fr.submit(blkif.BLKIF_OP_READ, 0, nbytes=512)
    fr.push()
    done = fr.wait_all(5)
    assert sorted(c.id for c in done) == list(range(fr.size))
    reqs = np.concatenate(be.seen)
    assert set(reqs["handle"].tolist()) == {51712}
    assert fr.stats.notifies >= 1


def test_without_persistent_grants_every_grant_is_ended(pair):
    guest, fr, _be = pair
    roundtrip(fr, 0, pattern(8192, 3))
    assert fr.stats.grants_issued == fr.stats.grants_ended > 0
    refs_in_pool = [ref for _f, ref in fr._pool if ref >= 0]
    assert refs_in_pool == []


@pytest.mark.parametrize("pair", [{"persistent": True}], indirect=True)
def test_persistent_grants_are_reused(pair):
    _guest, fr, be = pair
    roundtrip(fr, 0, pattern(4096, 1))
    issued = fr.stats.grants_issued
    roundtrip(fr, 16, pattern(4096, 2))
    assert fr.stats.grants_issued == issued and fr.stats.grants_ended == 0
    grefs = [r["seg"][0]["gref"] for r in np.concatenate(be.seen)]
    assert len(set(grefs)) == 1


def test_flush_barrier_discard(pair):
    _guest, fr, be = pair
    be.disk[0:8192] = b"\xff" * 8192
    fr.submit(blkif.BLKIF_OP_FLUSH_DISKCACHE, 0)
    fr.submit(blkif.BLKIF_OP_WRITE_BARRIER, 0)
    fr.submit(blkif.BLKIF_OP_FLUSH_DISKCACHE, 64, data=pattern(1024, 5))
    fr.submit(blkif.BLKIF_OP_DISCARD, 0, nr_sectors=16)
    fr.push()
    done = fr.wait_all(5)
    assert [c.status for c in done] == [0, 0, 0, 0]
    assert bytes(be.disk[0:8192]) == bytes(8192)
    assert bytes(be.disk[64 * 512 : 64 * 512 + 1024]) == pattern(1024, 5).tobytes()
    disc = be.seen[-1][-1:].view(fr.abi.discard)[0]
    assert (int(disc["nr_sectors"]), int(disc["flag"])) == (16, 0)


def test_refused_flush_turns_the_feature_off(pair):
    _guest, fr, be = pair
    be.refuse_flush = True
    assert fr.supports(blkif.BLKIF_OP_FLUSH_DISKCACHE)
    fr.submit(blkif.BLKIF_OP_FLUSH_DISKCACHE, 0)
    fr.push()
    (c,) = fr.wait_all(5)
    assert c.status == blkif.BLKIF_RSP_EOPNOTSUPP
    assert not fr.supports(blkif.BLKIF_OP_FLUSH_DISKCACHE)
    assert fr.stats.disabled_features == ["flush"]


@pytest.mark.parametrize("pair", [{"readonly": True}], indirect=True)
def test_readonly_backend_errors_reach_the_caller(pair):
    _guest, fr, _be = pair
    fr.submit(blkif.BLKIF_OP_WRITE, 0, data=pattern(512, 1))
    fr.push()
    (c,) = fr.wait_all(5)
    assert c.status == blkif.BLKIF_RSP_ERROR and not fr.failed


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("wrong_operation", True, "wrong operation"),
        ("bogus_id", 1000, "incorrect id"),
        ("bogus_id", 7, "no pending request"),
        ("keep_mapped", True, "has not unmapped grant"),
    ],
)
def test_protocol_errors_disable_the_ring(pair, knob, value, message):
    _guest, fr, be = pair
    setattr(be, knob, value)
    fr.submit(blkif.BLKIF_OP_WRITE, 0, data=pattern(512, 1))
    fr.push()
    with pytest.raises(ProtocolError, match=message):
        fr.wait_all(5)
    assert message in fr.failed
    with pytest.raises(ProtocolError):
        fr.submit(blkif.BLKIF_OP_READ, 0, nbytes=512)


@pytest.mark.parametrize("pair", [{"persistent": True}], indirect=True)
def test_persistent_grants_may_stay_mapped(pair):
    _guest, fr, be = pair
    be.keep_mapped = True
    roundtrip(fr, 0, pattern(512, 1))
    assert not fr.failed


def test_raw_slots_bypass_the_frontend_and_it_keeps_working(pair):
    _guest, fr, _be = pair
    slots = np.zeros(3, dtype=fr.abi.request)
    slots["operation"] = [blkif.BLKIF_OP_READ, 200, blkif.BLKIF_OP_WRITE]
    slots["id"] = [2**64 - 1, 12345, 0]
    slots["nr_segments"] = [0, 0, 0]
    rsps = fr.submit_raw(slots, timeout=5)
    assert sorted(rsps["id"].tolist()) == [0, 12345, 2**64 - 1]
    r = roundtrip(fr, 0, pattern(1024, 9))
    assert np.array_equal(r.data, pattern(1024, 9))
    # raw bytes work too
    rsps = fr.submit_raw(slots[:1].tobytes(), timeout=5)
    assert rsps["id"].tolist() == [2**64 - 1]


def test_raw_requests_with_granted_pages(pair):
    _guest, fr, be = pair
    pages = fr.grant_pages(1)
    slot = np.zeros(1, dtype=fr.abi.request)
    slot["operation"] = blkif.BLKIF_OP_READ
    slot["nr_segments"] = 1
    slot["id"] = 99
    slot["seg"][0, 0] = (pages[0][1], 0, 7)
    be.disk[0:4096] = b"\x5a" * 4096
    (rsp,) = fr.submit_raw(slot, timeout=5)
    assert (int(rsp["id"]), int(rsp["status"])) == (99, 0)
    frame = pages[0][0]
    assert bytes(fr.guest.memory[frame * 4096 : frame * 4096 + 4096]) == b"\x5a" * 4096
    assert fr.release_pages(pages)


def test_close_ends_every_grant(sim_dir):
    guest, fr, be = make_pair(sim_dir, persistent=True)
    try:
        roundtrip(fr, 0, pattern(4096, 1))
        be.stop()
        assert fr.close() == []
    finally:
        guest.close()


def test_close_reports_grants_the_backend_still_maps(sim_dir):
    guest, fr, be = make_pair(sim_dir, persistent=True)
    try:
        be.keep_mapped = True
        roundtrip(fr, 0, pattern(4096, 1))
        errors = fr.close()
        assert errors and all("has not unmapped" in e for e in errors)
    finally:
        be.stop()
        guest.close()


def test_close_ends_the_grants_of_requests_never_answered(sim_dir):
    guest, fr, be = make_pair(sim_dir)
    try:
        be.paused = True
        for sector in (0, 8, 16):
            fr.submit(blkif.BLKIF_OP_WRITE, sector, data=pattern(8192, sector))
        fr.push()
        assert fr.poll(0.1) == [] and fr.in_flight == 3
        be.stop()  # the backend goes away without answering
        assert fr.close() == []
        # 6 data pages + the ring page
        assert fr.stats.grants_issued + 1 == fr.stats.grants_ended == 7
    finally:
        guest.close()


@pytest.mark.parametrize("readonly_grants", [False, True])
def test_write_grants_are_writable_unless_asked(sim_dir, readonly_grants):
    guest, fr, be = make_pair(sim_dir)
    fr.readonly_write_grants = readonly_grants
    try:
        be.paused = True
        ids = [fr.submit(blkif.BLKIF_OP_WRITE, 0, data=pattern(512, 1)),
               fr.submit(blkif.BLKIF_OP_READ, 8, nbytes=512)]
        fr.push()
        refs = [fr._shadow[i].pages[0][1] for i in ids]
        write_ro, read_ro = (bool(guest.grant_entry(r)[0] & 0x4) for r in refs)  # GTF_readonly
        assert write_ro == readonly_grants and not read_ro
        be.paused = False  # the toy polls its ring: it picks the requests up now
        assert [c.status for c in fr.wait_all(5)] == [0, 0]
    finally:
        be.stop()
        guest.close()
