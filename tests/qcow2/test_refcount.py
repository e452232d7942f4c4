import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.backends.base import CorruptImage
from blkpy.qcow2 import refcount as rc

WIDTHS = [1, 2, 4, 8, 16, 32, 64]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(WIDTHS), st.integers(0, 2**32 - 1))
def test_encode_decode_round_trip(bits, seed):
    cs = 512
    n = rc.entries_per_block(cs, bits)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, rc.max_refcount(bits), size=n, dtype=np.uint64, endpoint=True)
    arr[0], arr[-1] = 0, rc.max_refcount(bits)
    values = [int(v) for v in arr]
    raw = rc.encode_block(arr, bits)
    assert len(raw) == cs
    assert list(rc.decode_block(raw, bits)) == values


@pytest.mark.parametrize("bits,raw,expected", [
    (1, b"\x05", [1, 0, 1, 0, 0, 0, 0, 0]),  # LSB first inside a byte
    (2, b"\x1b", [3, 2, 1, 0]),
    (4, b"\x21", [1, 2]),
    (16, b"\x00\x01\x01\x00", [1, 256]),  # big-endian
])
def test_bit_order(bits, raw, expected):
    assert list(rc.decode_block(raw, bits)) == expected


def test_reftable_entry_checks():
    assert rc.check_reftable_entry(0x20000, 0x10000, 0x30000) == 0x20000
    with pytest.raises(CorruptImage):
        rc.check_reftable_entry(0x20001, 0x10000, 0x30000)
    with pytest.raises(CorruptImage):
        rc.check_reftable_entry(0x30000, 0x10000, 0x30000)
