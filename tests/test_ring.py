"""blkpy.ring: layouts against the spec tables, ring arithmetic, wraparound, notify rules."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy import ring
from blkpy.ring import ABIS, BackRing, FrontRing, RingOverflow, ring_size

ABI_NAMES = sorted(ABIS)


def test_slot_layouts_match_blkif_h():
    x64, x32 = ABIS["x86_64-abi"], ABIS["x86_32-abi"]
    assert (x64.entry_size, x32.entry_size) == (112, 108)
    assert ABIS["arm-abi"].entry_size == 112
    for abi, id_off in ((x64, 8), (x32, 4)):
        req = abi.request.fields
        assert (req["operation"][1], req["nr_segments"][1], req["handle"][1]) == (0, 1, 2)
        assert req["id"][1] == id_off
        assert req["sector_number"][1] == id_off + 8
        assert req["seg"][1] == id_off + 16
        disc = abi.discard.fields
        assert (disc["flag"][1], disc["nr_sectors"][1]) == (1, id_off + 16)
        ind = abi.indirect.fields
        assert ind["nr_segments"][1] == 2 and ind["nr_segments"][0] == np.dtype("<u2")
        assert ind["handle"][1] == id_off + 16
        assert ind["indirect_grefs"][1] == id_off + 20
        rsp = abi.response.fields
        assert (rsp["id"][1], rsp["operation"][1], rsp["status"][1]) == (0, 8, 10)
    assert ring.SEGMENT_DTYPE.itemsize == 8
    assert ring.SEGS_PER_INDIRECT_FRAME == 512


@pytest.mark.parametrize("abi", ABI_NAMES)
def test_ring_sizes_per_order(abi):
    assert [ring_size(ABIS[abi], k) for k in range(5)] == [32, 64, 128, 256, 512]
    with pytest.raises(ValueError):
        ring_size(ABIS[abi], 5)


def _pages(order: int) -> memoryview:
    return memoryview(bytearray(ring.PAGE_SIZE << order))


def _preset(buf: memoryview, start: int) -> None:
    """Put all four indices at ``start`` (a ring that has already wrapped many times)."""
    hdr = np.frombuffer(buf, dtype="<u4", count=4)
    nxt = (start + 1) & 0xFFFFFFFF
    hdr[:] = [start, nxt, start, nxt]


@settings(max_examples=60, deadline=None)
@given(
    abi=st.sampled_from(ABI_NAMES),
    order=st.integers(0, 4),
    start=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 600, 2**32 - 1)),
    batches=st.lists(st.integers(1, 600), min_size=1, max_size=8),
)
def test_requests_and_responses_survive_wraparound(abi, order, start, batches):
    buf = _pages(order)
    _preset(buf, start)
    a = ABIS[abi]
    front = FrontRing(buf, a, 1 << order, init=False)
    back = BackRing(buf, a, 1 << order)
    next_id = 0
    for want in batches:
        n = min(want, front.free_slots())
        reqs = np.zeros(n, dtype=a.request)
        reqs["id"] = np.arange(next_id, next_id + n, dtype=np.uint64) * 0x1_0000_0001
        reqs["operation"] = ring.BLKIF_OP_READ
        reqs["sector_number"] = np.uint64(2**63) + np.arange(n, dtype=np.uint64)
        reqs["seg"]["gref"][:, 10] = 0xDEADBEEF
        next_id += n
        front.put_requests(reqs)
        front.push_requests()
        got = back.consume()
        assert len(got) == n
        assert np.array_equal(got["id"], reqs["id"])
        assert np.array_equal(got["sector_number"], reqs["sector_number"])
        assert np.all(got["seg"]["gref"][:, 10] == 0xDEADBEEF)
        assert back.in_flight == n
        # answer in reverse order: responses may come in any order
        back.produce(got["id"][::-1], got["operation"][::-1], np.full(n, -1, np.int16))
        back.push_responses()
        rsps = front.consume_responses()
        assert np.array_equal(rsps["id"], reqs["id"][::-1])
        assert np.all(rsps["status"] == -1)
        assert front.free_slots() == front.size
        assert not back.final_check_for_requests()


@pytest.mark.parametrize("abi", ABI_NAMES)
def test_bogus_req_prod_is_detected(abi):
    buf = _pages(0)
    a = ABIS[abi]
    FrontRing(buf, a, 1)
    back = BackRing(buf, a, 1)
    hdr = np.frombuffer(buf, dtype="<u4", count=4)
    hdr[0] = back.size + 1  # claims 33 requests on a 32-slot ring
    with pytest.raises(RingOverflow):
        back.consume()
    hdr[0] = 0xFFFFFFFF  # "negative": far ahead modulo 2**32
    with pytest.raises(RingOverflow):
        back.consume()


def test_bogus_ring_at_attach_is_refused():
    buf = _pages(0)
    a = ABIS["x86_64-abi"]
    FrontRing(buf, a, 1)
    np.frombuffer(buf, dtype="<u4", count=1)[0] = 1000
    with pytest.raises(RingOverflow):
        BackRing(buf, a, 1)


def test_consume_never_exceeds_free_response_slots():
    buf = _pages(0)
    a = ABIS["x86_64-abi"]
    front = FrontRing(buf, a, 1)
    back = BackRing(buf, a, 1)
    front.put_requests(np.zeros(32, dtype=a.request))
    front.push_requests()
    assert len(back.consume(limit=5)) == 5
    assert len(back.consume()) == 27
    assert len(back.consume()) == 0
    with pytest.raises(ValueError):
        back.produce(np.zeros(33, np.uint64), np.zeros(33, np.uint8), np.zeros(33, np.int16))


def test_notify_rules_follow_event_indices():
    buf = _pages(0)
    a = ABIS["x86_32-abi"]
    front = FrontRing(buf, a, 1)
    back = BackRing(buf, a, 1)
    # req_event starts at 1: the first request notifies, the second does not.
    front.put_requests(np.zeros(1, dtype=a.request))
    assert front.push_requests() is True
    front.put_requests(np.zeros(1, dtype=a.request))
    assert front.push_requests() is False
    got = back.consume()
    assert not back.final_check_for_requests()
    assert back.req_event == back.req_cons + 1
    front.put_requests(np.zeros(1, dtype=a.request))
    assert front.push_requests() is True
    got = np.concatenate((got, back.consume()))
    back.produce(got["id"], got["operation"], np.zeros(3, np.int16))
    assert back.push_responses() is True  # rsp_event 1 is inside (0, 3]
    assert back.push_responses() is False  # nothing new
    front.consume_responses()
    assert not front.final_check_for_responses()


def test_final_check_sees_a_request_that_raced_in():
    buf = _pages(0)
    a = ABIS["x86_64-abi"]
    front = FrontRing(buf, a, 1)
    back = BackRing(buf, a, 1)
    front.put_requests(np.zeros(2, dtype=a.request))
    front.push_requests()
    assert back.final_check_for_requests() is True
    assert len(back.consume()) == 2


def test_front_detects_bogus_rsp_prod():
    buf = _pages(0)
    a = ABIS["x86_64-abi"]
    front = FrontRing(buf, a, 1)
    np.frombuffer(buf, dtype="<u4", count=4)[2] = 5  # responses for requests never sent
    with pytest.raises(RingOverflow):
        front.consume_responses()


def test_views_share_one_copy():
    a = ABIS["x86_64-abi"]
    reqs = np.zeros(2, dtype=a.request)
    disc = reqs.view(a.discard)
    disc["nr_sectors"][1] = 77
    ind = reqs.view(a.indirect)
    ind["indirect_grefs"][0, 0] = 9
    assert ring.segments_bytes(np.array([(0, 0, 7), (0, 3, 3)], ring.SEGMENT_DTYPE)).tolist() == [4096, 512]
    assert ind["nr_segments"][1] == 0 and disc["nr_sectors"][1] == 77
