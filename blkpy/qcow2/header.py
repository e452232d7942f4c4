"""The qcow2 header (cluster 0): parse, validate, serialize. Pure bytes in, objects out."""

from __future__ import annotations

import dataclasses
import struct

from blkpy.backends.base import CorruptImage, UnsupportedImage

MAGIC = 0x514649FB
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # minimum for v3; QEMU writes 112 (with compression_type + padding)
FULL_HEADER_LENGTH = 112

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
# compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header field offsets that are rewritten in place (never the whole header: unknown
# trailing fields and extensions must survive)
OFF_REFCOUNT_TABLE = 48  # u64 offset + u32 clusters, contiguous
OFF_INCOMPATIBLE = 72
OFF_AUTOCLEAR = 88

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_HOST_OFFSET = 1 << 56

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")

# (type byte in the feature name table, bit) -> name, for the features QEMU names itself
FEATURE_NAMES: list[tuple[int, int, str]] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


@dataclasses.dataclass
class Extension:
    type: int
    data: bytes


@dataclasses.dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    extensions: list[Extension] = dataclasses.field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    def extension(self, ext_type: int) -> bytes | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext.data
        return None

    @property
    def backing_format(self) -> str | None:
        data = self.extension(EXT_BACKING_FORMAT)
        return None if data is None else data.decode("utf-8", "replace")

    def check_supported(self) -> None:
        """Raise UnsupportedImage for features blkpy refuses to serve."""
        if self.crypt_method != 0:
            raise UnsupportedImage("encrypted qcow2 images are not supported")
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedImage(f"unknown incompatible qcow2 features 0x{unknown:x}")
        if self.incompatible_features & INCOMPAT_DATA_FILE:
            raise UnsupportedImage("qcow2 images with an external data file are not supported")


def l1_entries_needed(size: int, cluster_bits: int, extended_l2: bool) -> int:
    l2_bits = cluster_bits - (4 if extended_l2 else 3)
    span = 1 << (cluster_bits + l2_bits)
    return (size + span - 1) // span


def parse_header(data: bytes, file_size: int) -> Header:
    """Parse and validate the header in ``data`` (the start of the file, at least one
    cluster if the file has one). Raises CorruptImage/UnsupportedImage with one line."""
    if len(data) < V2_HEADER_LENGTH:
        raise CorruptImage("qcow2 header is truncated")
    (magic, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
     rt_clusters, nb_snap, snap_off) = _V2.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptImage("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise UnsupportedImage(f"qcow2 version {version} is not supported")
    h = Header(version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
               rt_clusters, nb_snap, snap_off)
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise CorruptImage("qcow2 v3 header is truncated")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(data, V2_HEADER_LENGTH)
        if h.header_length < V3_HEADER_LENGTH or h.header_length % 8:
            raise CorruptImage(f"invalid qcow2 header length {h.header_length}")
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = data[104] if len(data) > 104 else 0
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(f"unsupported cluster size 2^{cluster_bits}")
    cs = 1 << cluster_bits
    if h.header_length > cs or len(data) < min(cs, file_size):
        raise CorruptImage("qcow2 header is truncated")
    h.check_supported()
    if h.refcount_order > 6:
        raise CorruptImage(f"invalid refcount order {h.refcount_order}")
    if bool(h.incompatible_features & INCOMPAT_COMPRESSION) != (h.compression_type != 0):
        raise CorruptImage("compression type field and feature bit disagree")
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedImage(f"unknown qcow2 compression type {h.compression_type}")
    if h.extended_l2 and cluster_bits < 14:
        raise CorruptImage("extended L2 entries need clusters of at least 16 KiB")
    if size >= MAX_HOST_OFFSET or size % 512:
        raise CorruptImage(f"invalid virtual size {size}")
    _check_table("L1 table", l1_off, l1_size * 8, cs, file_size, MAX_L1_BYTES)
    if l1_size < l1_entries_needed(size, cluster_bits, h.extended_l2):
        raise CorruptImage("L1 table is too small for the virtual size")
    _check_table("refcount table", rt_off, rt_clusters * cs, cs, file_size, MAX_REFTABLE_BYTES)
    if rt_clusters == 0:
        raise CorruptImage("refcount table is empty")
    if nb_snap > MAX_SNAPSHOTS:
        raise CorruptImage("too many snapshots")
    if nb_snap:
        _check_table("snapshot table", snap_off, nb_snap * 40, cs, file_size, None)
    h.extensions = _parse_extensions(data, h.header_length, cs)
    if bf_off:
        if bf_size > MAX_BACKING_NAME or bf_size == 0 or bf_off + bf_size > min(cs, len(data)):
            raise CorruptImage("invalid backing file name location")
        name = bytes(data[bf_off:bf_off + bf_size])
        if b"\0" in name:
            raise CorruptImage("backing file name contains a NUL byte")
        h.backing_file = name.decode("utf-8", "surrogateescape")
    if h.extension(EXT_DATA_FILE) is not None:
        raise UnsupportedImage("qcow2 images with an external data file are not supported")
    return h


def _check_table(what: str, offset: int, length: int, cs: int, file_size: int,
                 limit: int | None) -> None:
    if offset % cs:
        raise CorruptImage(f"{what} offset 0x{offset:x} is not cluster aligned")
    if limit is not None and length > limit:
        raise CorruptImage(f"{what} is too large")
    if length and (offset == 0 or offset + length > file_size):
        raise CorruptImage(f"{what} lies outside the image file")


def _parse_extensions(data: bytes, start: int, cs: int) -> list[Extension]:
    exts: list[Extension] = []
    seen: set[int] = set()
    pos = start
    end = min(cs, len(data))
    while True:
        if pos + 8 > end:
            raise CorruptImage("header extension area is truncated")
        ext_type, length = struct.unpack_from(">II", data, pos)
        if ext_type == EXT_END:
            return exts
        if pos + 8 + length > end:
            raise CorruptImage(f"header extension 0x{ext_type:08x} overflows cluster 0")
        if ext_type in seen:
            raise CorruptImage(f"duplicate header extension 0x{ext_type:08x}")
        seen.add(ext_type)
        exts.append(Extension(ext_type, bytes(data[pos + 8:pos + 8 + length])))
        pos += 8 + (length + 7) // 8 * 8


def serialize_header(h: Header) -> bytes:
    """The header, its extensions and the backing name, as laid out at offset 0.

    Sets header_length and backing_file_offset/size to match the layout."""
    if h.version == 2:
        h.header_length = V2_HEADER_LENGTH
    elif h.header_length < FULL_HEADER_LENGTH:
        h.header_length = FULL_HEADER_LENGTH
    ext_area = bytearray()
    for ext in h.extensions:
        ext_area += struct.pack(">II", ext.type, len(ext.data)) + ext.data
        ext_area += bytes(-len(ext.data) % 8)
    ext_area += bytes(8)  # end-of-extensions marker
    name = (h.backing_file or "").encode("utf-8", "surrogateescape")
    if h.backing_file:
        h.backing_file_offset = h.header_length + len(ext_area)
        h.backing_file_size = len(name)
    else:
        h.backing_file_offset = h.backing_file_size = 0
    out = bytearray(_V2.pack(MAGIC, h.version, h.backing_file_offset, h.backing_file_size,
                             h.cluster_bits, h.size, h.crypt_method, h.l1_size,
                             h.l1_table_offset, h.refcount_table_offset,
                             h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset))
    if h.version == 3:
        out += _V3.pack(h.incompatible_features, h.compatible_features,
                        h.autoclear_features, h.refcount_order, h.header_length)
        out += bytes([h.compression_type]) + bytes(h.header_length - V3_HEADER_LENGTH - 1)
    out += ext_area + name
    if len(out) > h.cluster_size:
        raise ValueError("header does not fit in cluster 0")
    return bytes(out)


def feature_table() -> bytes:
    """The feature name table extension data (48 bytes per known feature)."""
    return b"".join(struct.pack(">BB46s", t, b, name.encode()) for t, b, name in FEATURE_NAMES)
