"""Every ioctl number and struct offset against the tables of linux-xen-devices.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkpy.gntdev import abi
from blkpy.platform import COPY_SEGMENT_DTYPE

# (number, expected value) - both ABIs agree on these.
COMMON_NUMBERS = [
    (abi.IOCTL_GNTDEV_MAP_GRANT_REF, 0x00184700),
    (abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x00104701),
    (abi.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, 0x00184702),
    (abi.IOCTL_GNTDEV_SET_MAX_GRANTS, 0x00044703),
    (abi.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, 0x00104707),
    (abi.IOCTL_EVTCHN_BIND_VIRQ, 0x00044500),
    (abi.IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x00084501),
    (abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x00044502),
    (abi.IOCTL_EVTCHN_UNBIND, 0x00044503),
    (abi.IOCTL_EVTCHN_NOTIFY, 0x00044504),
    (abi.IOCTL_EVTCHN_RESET, 0x00004505),
    (abi.IOCTL_EVTCHN_RESTRICT_DOMID, 0x00024506),
    (abi.IOCTL_EVTCHN_BIND_STATIC, 0x00044507),
    (abi.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, 0x00104707),
]


@pytest.mark.parametrize(("number", "expected"), COMMON_NUMBERS)
def test_common_ioctl_numbers(number, expected):
    assert number == expected


@pytest.mark.parametrize(
    ("which", "x86_64", "i386"),
    [
        ("IOCTL_GNTDEV_GRANT_COPY", 0x00104708, 0x00084708),
        ("IOCTL_GNTALLOC_ALLOC_GREF", 0x00184705, 0x00144705),
        ("IOCTL_GNTALLOC_DEALLOC_GREF", 0x00104706, 0x000C4706),
    ],
)
def test_abi_dependent_ioctl_numbers(which, x86_64, i386):
    assert getattr(abi.X86_64, which) == x86_64
    assert getattr(abi.I386, which) == i386


def test_ioc_encoding():
    assert abi.ioc(0, "G", 0, 24) == (24 << 16) | (0x47 << 8)
    assert abi.ioc(3, "E", 0xFF, 0) == (3 << 30) | (0x45 << 8) | 0xFF
    with pytest.raises(ValueError):
        abi.ioc(0, "G", 0, 1 << 14)


def _layout(dtype):
    return {name: (dtype.fields[name][1], dtype.fields[name][0].itemsize) for name in dtype.names}


# dtype -> (declared size, {field: (offset, size)})
LAYOUTS = [
    (abi.GRANT_REF_DTYPE, 8, {"domid": (0, 4), "ref": (4, 4)}),
    (abi.MAP_GRANT_REF_DTYPE, 24, {"count": (0, 4), "pad": (4, 4), "index": (8, 8), "refs": (16, 8)}),
    (abi.UNMAP_GRANT_REF_DTYPE, 16, {"index": (0, 8), "count": (8, 4), "pad": (12, 4)}),
    (abi.GET_OFFSET_FOR_VADDR_DTYPE, 24,
     {"vaddr": (0, 8), "offset": (8, 8), "count": (16, 4), "pad": (20, 4)}),
    (abi.SET_MAX_GRANTS_DTYPE, 4, {"count": (0, 4)}),
    (abi.UNMAP_NOTIFY_DTYPE, 16, {"index": (0, 8), "action": (8, 4), "event_channel_port": (12, 4)}),
    (abi.GRANT_COPY_SEGMENT_DTYPE, 24,
     {"source": (0, 8), "dest": (8, 8), "len": (16, 2), "flags": (18, 2), "status": (20, 2),
      "pad": (22, 2)}),
    (abi.EVTCHN_BIND_VIRQ_DTYPE, 4, {"virq": (0, 4)}),
    (abi.EVTCHN_BIND_INTERDOMAIN_DTYPE, 8, {"remote_domain": (0, 4), "remote_port": (4, 4)}),
    (abi.EVTCHN_BIND_UNBOUND_PORT_DTYPE, 4, {"remote_domain": (0, 4)}),
    (abi.EVTCHN_PORT_DTYPE, 4, {"port": (0, 4)}),
    (abi.EVTCHN_RESTRICT_DOMID_DTYPE, 2, {"domid": (0, 2)}),
    (abi.GRANT_ENTRY_V1_DTYPE, 8, {"flags": (0, 2), "domid": (2, 2), "frame": (4, 4)}),
    (abi.X86_64.grant_copy_dtype, 16, {"count": (0, 4), "segments": (8, 8)}),
    (abi.I386.grant_copy_dtype, 8, {"count": (0, 4), "segments": (4, 4)}),
    (abi.X86_64.alloc_gref_dtype, 24,
     {"domid": (0, 2), "flags": (2, 2), "count": (4, 4), "index": (8, 8), "gref_ids": (16, 4)}),
    (abi.I386.alloc_gref_dtype, 20,
     {"domid": (0, 2), "flags": (2, 2), "count": (4, 4), "index": (8, 8), "gref_ids": (16, 4)}),
    (abi.X86_64.dealloc_gref_dtype, 16, {"index": (0, 8), "count": (8, 4)}),
    (abi.I386.dealloc_gref_dtype, 12, {"index": (0, 8), "count": (8, 4)}),
]


@pytest.mark.parametrize(("dtype", "size", "fields"), LAYOUTS)
def test_struct_layouts(dtype, size, fields):
    assert dtype.itemsize == size
    assert _layout(dtype) == fields


def test_grant_flags_and_status_codes():
    assert (abi.GTF_INVALID, abi.GTF_PERMIT_ACCESS, abi.GTF_ACCEPT_TRANSFER, abi.GTF_TRANSITIVE) == (0, 1, 2, 3)
    assert (abi.GTF_READONLY, abi.GTF_READING, abi.GTF_WRITING) == (0x4, 0x8, 0x10)
    assert (abi.GTF_PWT, abi.GTF_PCD, abi.GTF_PAT, abi.GTF_SUB_PAGE) == (0x20, 0x40, 0x80, 0x100)
    assert abi.GNTTAB_NR_RESERVED_ENTRIES == 8
    assert (abi.GNTCOPY_SOURCE_GREF, abi.GNTCOPY_DEST_GREF) == (1, 2)
    assert (abi.UNMAP_NOTIFY_CLEAR_BYTE, abi.UNMAP_NOTIFY_SEND_EVENT) == (1, 2)
    assert abi.GNTALLOC_FLAG_WRITABLE == 1
    codes = [abi.GNTST_OKAY, abi.GNTST_GENERAL_ERROR, abi.GNTST_BAD_DOMAIN, abi.GNTST_BAD_GNTREF,
             abi.GNTST_BAD_HANDLE, abi.GNTST_BAD_VIRT_ADDR, abi.GNTST_BAD_DEV_ADDR,
             abi.GNTST_NO_DEVICE_SPACE, abi.GNTST_PERMISSION_DENIED, abi.GNTST_BAD_PAGE,
             abi.GNTST_BAD_COPY_ARG, abi.GNTST_ADDRESS_TOO_BIG, abi.GNTST_EAGAIN, abi.GNTST_NO_SPACE]
    assert codes == list(range(0, -14, -1))
    assert sorted(abi.GNTST_MESSAGES) == sorted(codes)


def test_map_grant_ref_arg_bytes():
    arg = abi.map_grant_ref_arg(7, np.array([10, 0xFFFFFFFF], dtype=np.uint32))
    raw = arg.tobytes()
    assert len(raw) == 32
    assert raw[:4] == (2).to_bytes(4, "little")
    assert raw[16:24] == (7).to_bytes(4, "little") + (10).to_bytes(4, "little")
    assert raw[24:32] == (7).to_bytes(4, "little") + b"\xff" * 4
    arg[8:16] = np.frombuffer((0x5000).to_bytes(8, "little"), np.uint8)
    assert abi.map_grant_ref_index(arg) == 0x5000


def test_map_grant_ref_arg_is_never_shorter_than_declared():
    assert abi.map_grant_ref_arg(1, np.zeros(0, np.uint32)).size == 24


@pytest.mark.parametrize("which", [abi.X86_64, abi.I386])
def test_grant_copy_arg(which):
    raw = abi.grant_copy_arg(3, 0x12345678, which).tobytes()
    assert len(raw) == which.grant_copy_dtype.itemsize
    assert int.from_bytes(raw[:4], "little") == 3
    ptr_at, ptr_size = (8, 8) if which is abi.X86_64 else (4, 4)
    assert int.from_bytes(raw[ptr_at : ptr_at + ptr_size], "little") == 0x12345678


@given(
    st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF),
                  st.integers(0, 4096), st.integers(0, 4096), st.booleans()),
        max_size=20,
    )
)
def test_native_copy_segments_put_each_side_in_its_union(rows):
    segs = np.zeros(len(rows), dtype=COPY_SEGMENT_DTYPE)
    for seg, (addr, ref, domid, offset, length, to_guest) in zip(segs, rows, strict=True):
        seg["local_addr"], seg["ref"], seg["domid"] = addr, ref, domid
        seg["offset"], seg["length"], seg["to_guest"] = offset, length, to_guest
    native = abi.native_copy_segments(segs)
    for (addr, ref, domid, offset, length, to_guest), raw in zip(rows, [n.tobytes() for n in native], strict=True):
        foreign = ref.to_bytes(4, "little") + offset.to_bytes(2, "little") + domid.to_bytes(2, "little")
        local = addr.to_bytes(8, "little")
        assert raw[0:8] == (local if to_guest else foreign)
        assert raw[8:16] == (foreign if to_guest else local)
        assert int.from_bytes(raw[16:18], "little") == length
        assert int.from_bytes(raw[18:20], "little") == (2 if to_guest else 1)
        assert raw[20:24] == bytes(4)
