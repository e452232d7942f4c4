"""The user-space ABI of Linux's Xen devices: ioctl numbers, argument layouts, grant flags.

Facts from Linux's include/uapi/xen/{gntdev,evtchn,gntalloc}.h and Xen's public
grant_table.h. Every ioctl number is _IOC(_IOC_NONE, type, nr, sizeof(arg)), so it depends on
the declared struct size, which differs between x86_64 and i386 for a few structs (a pointer,
or a u64 aligned to 4 on i386). Layouts are numpy dtypes with explicit offsets.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

# ---- ioctl number encoding (asm-generic/ioctl.h; x86 and ARM use it) ----
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0


def ioc(direction: int, ioc_type: str, nr: int, size: int) -> int:
    """_IOC(dir, type, nr, size)."""
    if not 0 <= size < 1 << 14:
        raise ValueError(f"ioctl argument size {size} does not fit")
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (ord(ioc_type) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _struct(fields: list[tuple[str, str, int]], itemsize: int) -> np.dtype:
    names, formats, offsets = zip(*fields, strict=True)
    return np.dtype(
        {"names": list(names), "formats": list(formats), "offsets": list(offsets),
         "itemsize": itemsize}
    )


# ---- grant table v1 (xen/include/public/grant_table.h) ----
GTF_INVALID = 0
GTF_PERMIT_ACCESS = 1
GTF_ACCEPT_TRANSFER = 2
GTF_TRANSITIVE = 3
GTF_TYPE_MASK = 3
GTF_READONLY = 1 << 2
GTF_READING = 1 << 3
GTF_WRITING = 1 << 4
GTF_PWT = 1 << 5
GTF_PCD = 1 << 6
GTF_PAT = 1 << 7
GTF_SUB_PAGE = 1 << 8
GTF_TRANSFER_COMMITTED = 1 << 2
GTF_TRANSFER_COMPLETED = 1 << 3
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
GRANT_ENTRY_V1_DTYPE = _struct([("flags", "<u2", 0), ("domid", "<u2", 2), ("frame", "<u4", 4)], 8)

GNTST_OKAY = 0
GNTST_GENERAL_ERROR = -1
GNTST_BAD_DOMAIN = -2
GNTST_BAD_GNTREF = -3
GNTST_BAD_HANDLE = -4
GNTST_BAD_VIRT_ADDR = -5
GNTST_BAD_DEV_ADDR = -6
GNTST_NO_DEVICE_SPACE = -7
GNTST_PERMISSION_DENIED = -8
GNTST_BAD_PAGE = -9
GNTST_BAD_COPY_ARG = -10
GNTST_ADDRESS_TOO_BIG = -11
GNTST_EAGAIN = -12
GNTST_NO_SPACE = -13
GNTST_MESSAGES = {
    GNTST_OKAY: "okay",
    GNTST_GENERAL_ERROR: "undefined error",
    GNTST_BAD_DOMAIN: "unrecognised domain id",
    GNTST_BAD_GNTREF: "invalid grant reference",
    GNTST_BAD_HANDLE: "invalid mapping handle",
    GNTST_BAD_VIRT_ADDR: "invalid virtual address",
    GNTST_BAD_DEV_ADDR: "invalid device address",
    GNTST_NO_DEVICE_SPACE: "no space in the I/O MMU",
    GNTST_PERMISSION_DENIED: "permission denied",
    GNTST_BAD_PAGE: "invalid page",
    GNTST_BAD_COPY_ARG: "copy crosses a page boundary",
    GNTST_ADDRESS_TOO_BIG: "page address too large",
    GNTST_EAGAIN: "page paged out, try again",
    GNTST_NO_SPACE: "out of space",
}

# ---- /dev/xen/gntdev (include/uapi/xen/gntdev.h) ----
GRANT_REF_DTYPE = _struct([("domid", "<u4", 0), ("ref", "<u4", 4)], 8)
# Declared with one refs[] element; the real argument is MAP_GRANT_REF_HEADER_SIZE + 8 * count.
MAP_GRANT_REF_DTYPE = _struct(
    [("count", "<u4", 0), ("pad", "<u4", 4), ("index", "<u8", 8), ("refs", GRANT_REF_DTYPE, 16)], 24
)
MAP_GRANT_REF_HEADER_SIZE = 16
UNMAP_GRANT_REF_DTYPE = _struct([("index", "<u8", 0), ("count", "<u4", 8), ("pad", "<u4", 12)], 16)
GET_OFFSET_FOR_VADDR_DTYPE = _struct(
    [("vaddr", "<u8", 0), ("offset", "<u8", 8), ("count", "<u4", 16), ("pad", "<u4", 20)], 24
)
SET_MAX_GRANTS_DTYPE = _struct([("count", "<u4", 0)], 4)
UNMAP_NOTIFY_DTYPE = _struct(
    [("index", "<u8", 0), ("action", "<u4", 8), ("event_channel_port", "<u4", 12)], 16
)
UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2

# gntdev_grant_copy_segment: source and dest are unions of a local pointer (`virt`) and
# `foreign` = {ref u32, offset u16, domid u16}; 24 bytes on both ABIs.
GRANT_COPY_SEGMENT_DTYPE = _struct(
    [("source", "<u8", 0), ("dest", "<u8", 8), ("len", "<u2", 16), ("flags", "<u2", 18),
     ("status", "<i2", 20), ("pad", "<u2", 22)],
    24,
)
GNTCOPY_SOURCE_GREF = 0x1
GNTCOPY_DEST_GREF = 0x2

IOCTL_GNTDEV_MAP_GRANT_REF = ioc(_IOC_NONE, "G", 0, MAP_GRANT_REF_DTYPE.itemsize)
IOCTL_GNTDEV_UNMAP_GRANT_REF = ioc(_IOC_NONE, "G", 1, UNMAP_GRANT_REF_DTYPE.itemsize)
IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR = ioc(_IOC_NONE, "G", 2, GET_OFFSET_FOR_VADDR_DTYPE.itemsize)
IOCTL_GNTDEV_SET_MAX_GRANTS = ioc(_IOC_NONE, "G", 3, SET_MAX_GRANTS_DTYPE.itemsize)
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = ioc(_IOC_NONE, "G", 7, UNMAP_NOTIFY_DTYPE.itemsize)

# ---- /dev/xen/evtchn (include/uapi/xen/evtchn.h) ----
EVTCHN_BIND_VIRQ_DTYPE = _struct([("virq", "<u4", 0)], 4)
EVTCHN_BIND_INTERDOMAIN_DTYPE = _struct([("remote_domain", "<u4", 0), ("remote_port", "<u4", 4)], 8)
EVTCHN_BIND_UNBOUND_PORT_DTYPE = _struct([("remote_domain", "<u4", 0)], 4)
EVTCHN_PORT_DTYPE = _struct([("port", "<u4", 0)], 4)  # unbind, notify, bind_static
EVTCHN_RESTRICT_DOMID_DTYPE = _struct([("domid", "<u2", 0)], 2)

IOCTL_EVTCHN_BIND_VIRQ = ioc(_IOC_NONE, "E", 0, EVTCHN_BIND_VIRQ_DTYPE.itemsize)
IOCTL_EVTCHN_BIND_INTERDOMAIN = ioc(_IOC_NONE, "E", 1, EVTCHN_BIND_INTERDOMAIN_DTYPE.itemsize)
IOCTL_EVTCHN_BIND_UNBOUND_PORT = ioc(_IOC_NONE, "E", 2, EVTCHN_BIND_UNBOUND_PORT_DTYPE.itemsize)
IOCTL_EVTCHN_UNBIND = ioc(_IOC_NONE, "E", 3, EVTCHN_PORT_DTYPE.itemsize)
IOCTL_EVTCHN_NOTIFY = ioc(_IOC_NONE, "E", 4, EVTCHN_PORT_DTYPE.itemsize)
IOCTL_EVTCHN_RESET = ioc(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = ioc(_IOC_NONE, "E", 6, EVTCHN_RESTRICT_DOMID_DTYPE.itemsize)
IOCTL_EVTCHN_BIND_STATIC = ioc(_IOC_NONE, "E", 7, EVTCHN_PORT_DTYPE.itemsize)

# ---- /dev/xen/gntalloc (include/uapi/xen/gntalloc.h) ----
GNTALLOC_FLAG_WRITABLE = 1
GNTALLOC_SET_UNMAP_NOTIFY_DTYPE = UNMAP_NOTIFY_DTYPE
IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = ioc(_IOC_NONE, "G", 7, GNTALLOC_SET_UNMAP_NOTIFY_DTYPE.itemsize)


@dataclasses.dataclass(frozen=True)
class Abi:
    """The layouts and numbers that differ between x86_64 and i386 user space."""

    name: str
    grant_copy_dtype: np.dtype  # ioctl_gntdev_grant_copy: count, segments pointer
    alloc_gref_dtype: np.dtype  # ioctl_gntalloc_alloc_gref, one gref_ids[] element declared
    dealloc_gref_dtype: np.dtype

    @property
    def IOCTL_GNTDEV_GRANT_COPY(self) -> int:  # noqa: N802 - the upstream name
        return ioc(_IOC_NONE, "G", 8, self.grant_copy_dtype.itemsize)

    @property
    def IOCTL_GNTALLOC_ALLOC_GREF(self) -> int:  # noqa: N802
        return ioc(_IOC_NONE, "G", 5, self.alloc_gref_dtype.itemsize)

    @property
    def IOCTL_GNTALLOC_DEALLOC_GREF(self) -> int:  # noqa: N802
        return ioc(_IOC_NONE, "G", 6, self.dealloc_gref_dtype.itemsize)

    @property
    def alloc_gref_header_size(self) -> int:
        return self.alloc_gref_dtype.fields["gref_ids"][1]


X86_64 = Abi(
    name="x86_64",
    grant_copy_dtype=_struct([("count", "<u4", 0), ("segments", "<u8", 8)], 16),
    alloc_gref_dtype=_struct(
        [("domid", "<u2", 0), ("flags", "<u2", 2), ("count", "<u4", 4), ("index", "<u8", 8),
         ("gref_ids", "<u4", 16)],
        24,
    ),
    dealloc_gref_dtype=_struct([("index", "<u8", 0), ("count", "<u4", 8)], 16),
)
I386 = Abi(
    name="i386",
    grant_copy_dtype=_struct([("count", "<u4", 0), ("segments", "<u4", 4)], 8),
    alloc_gref_dtype=_struct(
        [("domid", "<u2", 0), ("flags", "<u2", 2), ("count", "<u4", 4), ("index", "<u8", 8),
         ("gref_ids", "<u4", 16)],
        20,
    ),
    dealloc_gref_dtype=_struct([("index", "<u8", 0), ("count", "<u4", 8)], 12),
)
# 64-bit Linux ports (x86_64, arm64) share the x86_64 layouts; 32-bit dom0 means i386.
NATIVE = X86_64 if struct.calcsize("P") == 8 else I386


# ---- argument builders ----


def map_grant_ref_arg(domid: int, refs: np.ndarray) -> np.ndarray:
    """The MAP_GRANT_REF argument for ``refs`` of ``domid``, as bytes the kernel may write."""
    # The kernel reads the declared size first, so never pass less than that.
    size = MAP_GRANT_REF_HEADER_SIZE + GRANT_REF_DTYPE.itemsize * len(refs)
    arg = np.zeros(max(size, MAP_GRANT_REF_DTYPE.itemsize), np.uint8)
    arg[:4].view("<u4")[0] = len(refs)
    pairs = arg[MAP_GRANT_REF_HEADER_SIZE:size].view(GRANT_REF_DTYPE)
    pairs["domid"] = domid
    pairs["ref"] = refs
    return arg


def map_grant_ref_index(arg: np.ndarray) -> int:
    """The mmap offset MAP_GRANT_REF wrote into ``arg``."""
    return int(arg[8:16].view("<u8")[0])


def native_copy_segments(segments: np.ndarray) -> np.ndarray:
    """gntdev_grant_copy_segments for blkpy.platform.COPY_SEGMENT_DTYPE rows, in one pass:
    the guest side is the foreign union member, the local address the virt member."""
    native = np.zeros(len(segments), dtype=GRANT_COPY_SEGMENT_DTYPE)
    foreign = (
        segments["ref"].astype(np.uint64)
        | (segments["offset"].astype(np.uint64) << np.uint64(32))
        | (segments["domid"].astype(np.uint64) << np.uint64(48))
    )
    local = segments["local_addr"]
    to_guest = segments["to_guest"] != 0
    native["source"] = np.where(to_guest, local, foreign)
    native["dest"] = np.where(to_guest, foreign, local)
    native["len"] = segments["length"]
    native["flags"] = np.where(to_guest, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF)
    return native


def grant_copy_arg(count: int, segments_address: int, abi: Abi = NATIVE) -> np.ndarray:
    """The GRANT_COPY argument: ``count`` native segments at ``segments_address``."""
    arg = np.zeros(1, dtype=abi.grant_copy_dtype)
    arg["count"] = count
    arg["segments"] = segments_address
    return arg.view(np.uint8)
