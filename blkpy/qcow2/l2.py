"""L1/L2 table entries: decoding into cluster/subcluster states, encoding new entries."""

from __future__ import annotations

import dataclasses
import enum

from blkpy.backends.base import CorruptImage

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0

SUBCLUSTERS = 32  # per cluster with extended L2 entries
BITMAP_ALL_ALLOC = (1 << 32) - 1
BITMAP_ALL_ZERO = BITMAP_ALL_ALLOC << 32


class Kind(enum.Enum):
    """What a guest (sub)cluster reads as."""

    UNALLOCATED = "unallocated"  # backing file, else zeros
    ZERO = "zero"
    NORMAL = "normal"  # host data at an offset
    COMPRESSED = "compressed"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Sizes derived from the header that every table computation needs."""

    cluster_bits: int
    extended_l2: bool
    version: int = 3

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def subclusters(self) -> int:
        return SUBCLUSTERS if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters

    def l1_index(self, guest: int) -> int:
        return guest >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, guest: int) -> int:
        return (guest >> self.cluster_bits) & (self.l2_entries - 1)

    @property
    def compressed_offset_bits(self) -> int:
        return 62 - (self.cluster_bits - 8)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A decoded L2 entry. ``alloc``/``zero`` are subcluster bitmaps (bit x = subcluster x);
    for standard entries the single "subcluster" is the whole cluster."""

    kind: Kind  # COMPRESSED, or the cluster-level kind for standard entries
    host: int = 0  # host cluster offset (NORMAL/ZERO-with-preallocation), or compressed byte offset
    copied: bool = False
    alloc: int = 0
    zero: int = 0
    compressed_len: int = 0  # bytes to read for a compressed cluster

    def subcluster_kind(self, x: int) -> Kind:
        if self.kind is Kind.COMPRESSED:
            return Kind.COMPRESSED
        if self.zero >> x & 1:
            return Kind.ZERO
        if self.alloc >> x & 1:
            return Kind.NORMAL
        return Kind.UNALLOCATED


def check_l1_entry(value: int, cluster_size: int, file_size: int) -> int:
    """Return the L2 table offset named by an L1 entry (0 = none); CorruptImage if bad."""
    offset = value & L1E_OFFSET_MASK
    if offset == 0:
        return 0
    if offset % cluster_size or value & L1E_RESERVED_MASK:
        raise CorruptImage(f"L1 entry 0x{value:x} is misaligned or has reserved bits")
    if offset + cluster_size > file_size:
        raise CorruptImage(f"L1 entry points outside the image (0x{offset:x})")
    return offset


def decode(geo: Geometry, value: int, bitmap: int, file_size: int) -> Entry:
    """Decode one L2 entry (and its bitmap for extended L2); CorruptImage if invalid or
    if any byte it names lies outside ``file_size``."""
    cs = geo.cluster_size
    if value & OFLAG_COMPRESSED:
        xbits = geo.compressed_offset_bits
        coffset = value & ((1 << xbits) - 1)
        nb_sectors = ((value >> xbits) & ((1 << (geo.cluster_bits - 8)) - 1)) + 1
        length = nb_sectors * 512 - (coffset & 511)
        if geo.extended_l2 and bitmap:
            raise CorruptImage("compressed cluster with a subcluster bitmap")
        if coffset == 0 or coffset >= 1 << 56 or coffset >= file_size:
            raise CorruptImage(f"compressed cluster outside the image (0x{coffset:x})")
        # the last sectors may be absent from the file (QEMU writes only what it compressed):
        # the reader clips at the end of the file
        return Entry(Kind.COMPRESSED, host=coffset, compressed_len=length)
    host = value & L2E_OFFSET_MASK
    copied = bool(value & OFLAG_COPIED)
    if value & L2E_STD_RESERVED_MASK or host % cs:
        raise CorruptImage(f"L2 entry 0x{value:x} is misaligned or has reserved bits")
    # QEMU may leave the file ending inside the last data cluster (subcluster
    # allocation): its start must be inside the file, the rest reads as zeros
    if host and host >= file_size:
        raise CorruptImage(f"L2 entry points outside the image (0x{host:x})")
    if not host and copied:
        raise CorruptImage("L2 entry with COPIED flag but no host cluster")
    if geo.extended_l2:
        alloc, zero = bitmap & BITMAP_ALL_ALLOC, bitmap >> 32
        if value & OFLAG_ZERO or alloc & zero:
            raise CorruptImage(f"invalid extended L2 entry 0x{value:x}/0x{bitmap:x}")
        if not host and alloc:
            raise CorruptImage("subclusters allocated in an unallocated cluster")
        kind = Kind.NORMAL if host else Kind.UNALLOCATED
        return Entry(kind, host=host, copied=copied, alloc=alloc, zero=zero)
    if value & OFLAG_ZERO:
        if geo.version < 3:
            raise CorruptImage("zero cluster in a version 2 image")
        return Entry(Kind.ZERO, host=host, copied=copied, zero=1)
    if host:
        return Entry(Kind.NORMAL, host=host, copied=copied, alloc=1)
    return Entry(Kind.UNALLOCATED)


def encode(geo: Geometry, host: int, alloc: int, zero: int) -> tuple[int, int]:
    """Encode a (non-compressed) entry from its host cluster and subcluster bitmaps.

    Returns (entry, bitmap); bitmap is 0 for standard entries. A host cluster we write
    is always ours alone, so it carries COPIED."""
    value = host | OFLAG_COPIED if host else 0
    if geo.extended_l2:
        return value, (zero << 32) | alloc
    if zero:
        value |= OFLAG_ZERO
    return value, 0


def compressed_host_clusters(entry: Entry, cluster_size: int) -> range:
    """Host cluster offsets a compressed cluster's data touches (each holds one reference)."""
    first = entry.host // cluster_size
    last = (entry.host + max(entry.compressed_len, 1) - 1) // cluster_size
    return range(first * cluster_size, (last + 1) * cluster_size, cluster_size)


def subcluster_mask(first: int, end: int) -> int:
    """Bitmap with bits [first, end) set."""
    return ((1 << end) - 1) & ~((1 << first) - 1)
