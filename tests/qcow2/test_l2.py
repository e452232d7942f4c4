import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.backends.base import CorruptImage
from blkpy.qcow2 import l2
from blkpy.qcow2.l2 import Geometry, Kind

STD = Geometry(16, False, 3)
EXT = Geometry(16, True, 3)
V2 = Geometry(16, False, 2)
FILE = 1 << 30


def test_standard_kinds():
    assert l2.decode(STD, 0, 0, FILE).kind is Kind.UNALLOCATED
    e = l2.decode(STD, 0x50000 | l2.OFLAG_COPIED, 0, FILE)
    assert (e.kind, e.host, e.copied) == (Kind.NORMAL, 0x50000, True)
    assert l2.decode(STD, l2.OFLAG_ZERO, 0, FILE).kind is Kind.ZERO
    e = l2.decode(STD, 0x50000 | l2.OFLAG_ZERO, 0, FILE)
    assert (e.kind, e.host) == (Kind.ZERO, 0x50000)  # preallocated zero cluster


def test_compressed_descriptor():
    x = STD.compressed_offset_bits  # 54 for 64 KiB clusters
    entry = l2.OFLAG_COMPRESSED | (3 << x) | 0x12345
    e = l2.decode(STD, entry, 0, FILE)
    assert e.kind is Kind.COMPRESSED and e.host == 0x12345
    assert e.compressed_len == 4 * 512 - 0x145
    assert list(l2.compressed_host_clusters(e, 0x10000)) == [0x10000]


@pytest.mark.parametrize("geo,value,bitmap", [
    (STD, 0x50001 & ~1 | 0x100, 0),  # unaligned host offset
    (STD, 0x50000 | (1 << 57), 0),  # reserved bits
    (STD, FILE, 0),  # past the end of the file
    (STD, l2.OFLAG_COPIED, 0),  # COPIED without a cluster
    (V2, l2.OFLAG_ZERO, 0),  # zero flag in a v2 image
    (EXT, 0x50000, 1 | 1 << 32),  # subcluster both allocated and zero
    (EXT, 0, 1),  # allocated subcluster in an unallocated cluster
    (EXT, l2.OFLAG_ZERO, 0),
    (STD, l2.OFLAG_COMPRESSED | FILE, 0),
])
def test_invalid_entries_are_corruption(geo, value, bitmap):
    with pytest.raises(CorruptImage):
        l2.decode(geo, value, bitmap, FILE)


def test_subcluster_kinds():
    e = l2.decode(EXT, 0x50000 | l2.OFLAG_COPIED, 0b101 | (0b10 << 32), FILE)
    assert [e.subcluster_kind(x) for x in range(4)] == [
        Kind.NORMAL, Kind.ZERO, Kind.NORMAL, Kind.UNALLOCATED]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 0x3FF), st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1))
def test_encode_decode_round_trip(cluster, alloc, zero):
    zero &= ~alloc
    host = cluster * 0x10000 if alloc else 0
    value, bitmap = l2.encode(EXT, host, alloc, zero)
    e = l2.decode(EXT, value, bitmap, FILE)
    assert (e.host, e.alloc, e.zero) == (host, alloc, zero)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([STD, EXT, V2]), st.integers(0, (1 << 64) - 1),
       st.integers(0, (1 << 64) - 1))
def test_any_entry_decodes_inside_the_file_or_raises(geo, value, bitmap):
    try:
        e = l2.decode(geo, value, bitmap if geo.extended_l2 else 0, FILE)
    except CorruptImage:
        return
    if e.kind is Kind.COMPRESSED:
        assert 0 < e.host < FILE
    elif e.host:
        assert e.host % geo.cluster_size == 0 and e.host < FILE
