"""Validation of hostile request batches (blkpy.requests): property tests over arbitrary
slot bytes, plus the accepted requests' invariants."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy import ring
from blkpy.requests import PENDING, REASONS, DiskGeometry, validate_batch, validate_indirect

SECTORS = 8192


@settings(max_examples=300, deadline=None)
@given(
    abi=st.sampled_from(sorted(ring.ABIS)),
    raw=st.lists(st.binary(min_size=112, max_size=112), min_size=1, max_size=40),
    readonly=st.booleans(),
    sector_size=st.sampled_from([512, 4096]),
    discard=st.booleans(),
)
def test_any_slot_bytes_get_a_verdict_and_accepted_ones_are_safe(abi, raw, readonly,
                                                                 sector_size, discard):
    a = ring.ABIS[abi]
    slots = np.frombuffer(b"".join(r[: a.entry_size] for r in raw), dtype=a.raw).view(a.request)
    # bias some slots towards real operations so the accepting paths are explored too
    slots = slots.copy()
    slots["operation"][::2] %= 8
    slots["nr_segments"][::3] %= 12
    slots["sector_number"][::2] %= SECTORS
    geom = DiskGeometry(sectors=SECTORS, sector_size=sector_size, readonly=readonly,
                        discard=discard)
    v = validate_batch(slots, a, geom)
    assert set(np.unique(v.status)) <= {PENDING, ring.BLKIF_RSP_ERROR, ring.BLKIF_RSP_EOPNOTSUPP}
    for i in range(len(slots)):
        if v.status[i] != PENDING:
            assert v.reason(i) in REASONS[1:]
            continue
        op = int(v.io_op[i])
        start = int(slots["sector_number"][i])
        if op == ring.BLKIF_OP_DISCARD:
            assert discard and not readonly
            nsec = int(slots.view(a.discard)["nr_sectors"][i])
            assert start + nsec <= SECTORS
        elif op == ring.BLKIF_OP_INDIRECT:
            raise AssertionError("indirect_op must be read or write to be accepted")
        elif int(slots["operation"][i]) != ring.BLKIF_OP_INDIRECT:
            n = int(slots["nr_segments"][i])
            segs = slots["seg"][i, :n]
            assert 0 <= n <= 11
            assert np.all(segs["first_sect"] <= segs["last_sect"])
            assert np.all(segs["last_sect"] <= 7)
            if v.nbytes[i]:  # a pure flush/barrier moves no data: its sector is moot
                assert start + (int(v.nbytes[i]) >> 9) <= SECTORS
                assert start % (sector_size // 512) == 0
        if readonly:
            assert op == ring.BLKIF_OP_READ
        # indirect requests are answered with their indirect_op
        if int(slots["operation"][i]) == ring.BLKIF_OP_INDIRECT:
            assert v.rsp_operation[i] in (ring.BLKIF_OP_READ, ring.BLKIF_OP_WRITE)


@settings(max_examples=200, deadline=None)
@given(
    descs=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255),
                             st.integers(0, 255)), min_size=1, max_size=600),
    sector=st.integers(0, 2**64 - 1),
)
def test_indirect_descriptors(descs, sector):
    segs = np.array(descs, dtype=ring.SEGMENT_DTYPE)
    nbytes, reason = validate_indirect(segs, sector, DiskGeometry(sectors=SECTORS))
    valid = all(f <= last <= 7 for _, f, last in descs)
    total = sum(last - f + 1 for _, f, last in descs) * 512 if valid else 0
    if valid and sector + total // 512 <= SECTORS:
        assert reason is None and nbytes == total
    else:
        assert reason is not None and nbytes == 0


def test_u64_wrap_is_refused():
    a = ring.ABIS["x86_64-abi"]
    r = np.zeros(1, dtype=a.request)
    r["operation"], r["nr_segments"], r["sector_number"] = ring.BLKIF_OP_READ, 1, 2**64 - 1
    r["seg"][0, 0] = (8, 0, 7)
    v = validate_batch(r, a, DiskGeometry(sectors=SECTORS))
    assert v.status[0] == ring.BLKIF_RSP_ERROR and v.reason(0) == "sector range outside the disk"


def test_data_less_flush_with_any_sector_is_accepted():
    """Linux blkfront sends flushes without segments carrying an arbitrary sector number
    (seen on a real Xen); refusing them would make it turn flushes off."""
    a = ring.ABIS["x86_64-abi"]
    r = np.zeros(2, dtype=a.request)
    r["operation"] = [ring.BLKIF_OP_FLUSH_DISKCACHE, ring.BLKIF_OP_WRITE_BARRIER]
    r["sector_number"] = [2**64 - 1, SECTORS * 10 + 3]
    v = validate_batch(r, a, DiskGeometry(sectors=SECTORS, sector_size=4096))
    assert v.status.tolist() == [PENDING, PENDING]
