"""The bytes of a new, empty qcow2 image (``image create``): header, refcount table,
refcount blocks and an all-zero L1 table, each in its own clusters."""

from __future__ import annotations

import dataclasses

import numpy as np

from blkpy.qcow2 import refcount as rc
from blkpy.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAX_BACKING_NAME,
    Extension,
    Header,
    feature_table,
    l1_entries_needed,
    serialize_header,
)


@dataclasses.dataclass
class CreateOptions:
    size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    refcount_bits: int = 16
    extended_l2: bool = False
    lazy_refcounts: bool = False
    compression_type: str = "zlib"
    backing_file: str | None = None
    backing_format: str | None = None

    def validate(self) -> None:
        """Raise ValueError (one operator-facing line) for impossible combinations."""
        cs = self.cluster_size
        if cs & (cs - 1) or not 512 <= cs <= 2 * 1024 * 1024:
            raise ValueError("cluster size must be a power of two between 512 and 2M")
        rb = self.refcount_bits
        if rb & (rb - 1) or not 1 <= rb <= 64:
            raise ValueError("refcount_bits must be a power of two between 1 and 64")
        if self.compat not in ("0.10", "1.1"):
            raise ValueError(f"invalid compat level {self.compat!r} (expected 0.10 or 1.1)")
        if self.compression_type not in COMPRESSION_NAMES.values():
            raise ValueError(f"unknown compression type {self.compression_type!r}")
        if self.compat == "0.10" and (rb != 16 or self.extended_l2 or self.lazy_refcounts
                                      or self.compression_type != "zlib"):
            raise ValueError("compat=0.10 supports only refcount_bits=16 and zlib, "
                             "without extended_l2 or lazy_refcounts")
        if self.extended_l2 and cs < 16384:
            raise ValueError("extended_l2 needs a cluster size of at least 16K")
        if self.size < 0 or self.size % 512:
            raise ValueError("image size must be a non-negative multiple of 512")
        if self.backing_file and len(self.backing_file.encode()) > MAX_BACKING_NAME:
            raise ValueError("backing file name is too long")


def new_image(opts: CreateOptions) -> bytes:
    """The whole file content of an empty image (cluster aligned)."""
    opts.validate()
    cs = opts.cluster_size
    cluster_bits = cs.bit_length() - 1
    l1_size = l1_entries_needed(opts.size, cluster_bits, opts.extended_l2)
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    epb = rc.entries_per_block(cs, opts.refcount_bits)
    rt_clusters = rb_clusters = 1
    while True:  # metadata must cover itself
        total = 1 + rt_clusters + rb_clusters + l1_clusters
        need_rb = -(-total // epb)
        need_rt = -(-need_rb * 8 // cs)
        if (need_rb, need_rt) == (rb_clusters, rt_clusters):
            break
        rb_clusters, rt_clusters = max(need_rb, rb_clusters), max(need_rt, rt_clusters)
    version = 2 if opts.compat == "0.10" else 3
    h = Header(version=version, backing_file_offset=0, backing_file_size=0,
               cluster_bits=cluster_bits, size=opts.size, crypt_method=0, l1_size=l1_size,
               l1_table_offset=(1 + rt_clusters + rb_clusters) * cs,
               refcount_table_offset=cs, refcount_table_clusters=rt_clusters,
               nb_snapshots=0, snapshots_offset=0,
               refcount_order=opts.refcount_bits.bit_length() - 1,
               backing_file=opts.backing_file)
    if version == 3:
        if opts.extended_l2:
            h.incompatible_features |= INCOMPAT_EXTL2
        if opts.compression_type == "zstd":
            h.incompatible_features |= INCOMPAT_COMPRESSION
            h.compression_type = 1
        if opts.lazy_refcounts:
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS
    if opts.backing_file and opts.backing_format:
        h.extensions.append(Extension(EXT_BACKING_FORMAT, opts.backing_format.encode()))
    if version == 3:
        h.extensions.append(Extension(EXT_FEATURE_TABLE, feature_table()))
    image = bytearray(total * cs)
    head = serialize_header(h)
    image[:len(head)] = head
    reftable = np.zeros(rt_clusters * cs // 8, dtype=">u8")
    reftable[:rb_clusters] = [(1 + rt_clusters + i) * cs for i in range(rb_clusters)]
    image[cs:cs + len(reftable) * 8] = reftable.tobytes()
    counts = np.zeros(rb_clusters * epb, dtype=np.uint64)
    counts[:total] = 1
    for i in range(rb_clusters):
        block = rc.encode_block(counts[i * epb:(i + 1) * epb], opts.refcount_bits)
        at = (1 + rt_clusters + i) * cs
        image[at:at + cs] = block
    return bytes(image)
