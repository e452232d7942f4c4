import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkpy.backends.base import CorruptImage, DiskError, UnsupportedImage
from blkpy.qcow2 import header as hd
from blkpy.qcow2.layout import CreateOptions, new_image


def _image(**kw) -> bytes:
    return new_image(CreateOptions(size=kw.pop("size", 1 << 20), **kw))


def test_new_image_round_trips_through_parse():
    data = _image(cluster_size=4096, refcount_bits=8, extended_l2=False, lazy_refcounts=True,
                  backing_file="base.img", backing_format="raw")
    h = hd.parse_header(data, len(data))
    assert (h.version, h.cluster_size, h.refcount_bits, h.size) == (3, 4096, 8, 1 << 20)
    assert h.lazy_refcounts and not h.dirty and not h.extended_l2
    assert h.backing_file == "base.img" and h.backing_format == "raw"
    assert hd.serialize_header(h) == data[:len(hd.serialize_header(h))]


def test_v2_header_is_72_bytes_without_feature_fields():
    data = _image(compat="0.10")
    h = hd.parse_header(data, len(data))
    assert h.version == 2 and h.header_length == 72 and h.refcount_bits == 16
    assert struct.unpack_from(">I", data, 4)[0] == 2


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize("offset,fmt,value,error,words", [
    (0, ">I", 0x12345678, CorruptImage, "magic"),
    (4, ">I", 4, UnsupportedImage, "version 4"),
    (20, ">I", 8, CorruptImage, "cluster size"),
    (20, ">I", 22, CorruptImage, "cluster size"),
    (32, ">I", 2, UnsupportedImage, "encrypted"),
    (72, ">Q", 1 << 5, UnsupportedImage, "unknown incompatible"),
    (72, ">Q", hd.INCOMPAT_DATA_FILE, UnsupportedImage, "external data file"),
    (72, ">Q", hd.INCOMPAT_COMPRESSION, CorruptImage, "compression type"),
    (40, ">Q", 0x10001, CorruptImage, "L1 table"),
    (40, ">Q", 1 << 40, CorruptImage, "outside"),
    (48, ">Q", 0x200, CorruptImage, "refcount table"),
    (56, ">I", 0, CorruptImage, "refcount table is empty"),
    (36, ">I", 0, CorruptImage, "too small"),
    (96, ">I", 7, CorruptImage, "refcount order"),
    (100, ">I", 100, CorruptImage, "header length"),
])
def test_bad_fields_are_refused_with_one_clear_line(offset, fmt, value, error, words):
    data = _patched(_image(), offset, fmt, value)
    with pytest.raises(error) as info:
        hd.parse_header(data, len(data))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_truncated_header():
    with pytest.raises(CorruptImage, match="truncated"):
        hd.parse_header(_image()[:50], 50)


def test_unknown_compatible_and_autoclear_bits_are_tolerated():
    data = _patched(_patched(_image(), 80, ">Q", 1 << 40), 88, ">Q", 1 << 9)
    h = hd.parse_header(data, len(data))
    assert h.compatible_features == 1 << 40 and h.autoclear_features == 1 << 9


def test_unknown_extensions_are_kept():
    orig = _image()
    h = hd.parse_header(orig, len(orig))
    h.extensions.append(hd.Extension(0x12345678, b"abc"))
    head = hd.serialize_header(h)
    data = head + orig[len(head):]
    again = hd.parse_header(data, len(data))
    assert again.extension(0x12345678) == b"abc"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(0, 1 << 22))
def test_arbitrary_bytes_parse_or_raise_disk_error(blob, file_size):
    try:
        hd.parse_header(blob, file_size)
    except DiskError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 111), st.integers(0, 255))
def test_single_byte_corruption_of_a_real_header(pos, byte):
    data = bytearray(_image(backing_file="b.img", backing_format="qcow2"))
    data[pos] = byte
    try:
        h = hd.parse_header(bytes(data), len(data))
    except DiskError:
        return
    assert h.l1_table_offset + h.l1_size * 8 <= len(data)
    assert h.refcount_table_offset + h.refcount_table_clusters * h.cluster_size <= len(data)


def test_backing_name_with_nul_is_corrupt():
    data = bytearray(_image(backing_file="base.img"))
    h = hd.parse_header(bytes(data), len(data))
    data[h.backing_file_offset + 2] = 0
    with pytest.raises(CorruptImage, match="NUL"):
        hd.parse_header(bytes(data), len(data))
