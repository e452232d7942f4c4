"""Consistency check (what ``qemu-img check`` reports) and refcount rebuild (dirty images).

Both start from the same walk: count, per host cluster, how many metadata structures and
L2 entries reference it, then compare with (or overwrite) the stored refcounts."""

from __future__ import annotations

import dataclasses

import numpy as np

from blkpy.backends.base import CorruptImage
from blkpy.qcow2 import bitmaps, l2
from blkpy.qcow2 import refcount as rc
from blkpy.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, MAX_L1_BYTES
from blkpy.qcow2.l2 import Kind
from blkpy.qcow2.metadata import Metadata
from blkpy.qcow2.snapshot import table_length

# check exit statuses, as qemu-img check
CHECK_OK = 0
CHECK_INCOMPLETE = 1
CHECK_CORRUPT = 2
CHECK_LEAKS = 3


@dataclasses.dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)
    image_end: int = 0

    @property
    def status(self) -> int:
        if self.corruptions:
            return CHECK_CORRUPT
        return CHECK_LEAKS if self.leaks else CHECK_OK

    def error(self, message: str) -> None:
        self.corruptions += 1
        self.messages.append(f"ERROR {message}")


class _Walker:
    """References per host cluster."""

    def __init__(self, meta: Metadata, result: CheckResult, check_copied: bool) -> None:
        self.meta = meta
        self.cs = meta.geo.cluster_size
        self.file_end = meta.file_end
        self.refs = np.zeros(-(-self.file_end // self.cs), dtype=np.int64)
        self.result = result
        self.check_copied = check_copied
        #: (host offset, COPIED flag) of everything the active L1 reaches
        self.copied_flags: list[tuple[int, bool]] = []

    def add(self, offset: int, length: int, what: str) -> None:
        if length <= 0:
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        if last >= len(self.refs):
            self.result.error(f"{what} at 0x{offset:x} lies beyond the end of the image")
            return
        self.refs[first:last + 1] += 1

    def walk(self) -> np.ndarray:
        meta, h = self.meta, self.meta.header
        a = meta.alloc
        self.add(0, self.cs, "header")
        self.add(h.l1_table_offset, h.l1_size * 8, "L1 table")
        self.add(a.reftable_offset, a.reftable_clusters * self.cs, "refcount table")
        for r, value in enumerate(a.reftable):
            try:
                off = rc.check_reftable_entry(int(value), self.cs, self.file_end)
            except CorruptImage as exc:
                self.result.error(f"refcount table entry {r}: {exc}")
                continue
            if off:
                self.add(off, self.cs, "refcount block")
        self.walk_l1(meta.l1, active=True)
        ext = h.extension(EXT_BITMAPS)
        if ext is not None and h.autoclear_features & AUTOCLEAR_BITMAPS:
            # consistent bitmaps own their clusters; inconsistent ones leak (as in QEMU)
            try:
                self.walk_bitmaps(bitmaps.parse_extension(ext))
            except CorruptImage as exc:
                self.result.error(f"bitmaps: {exc}")
        if h.nb_snapshots:
            try:
                snaps = meta.snapshots()
                raw = meta.storage.read(h.snapshots_offset, self.file_end - h.snapshots_offset)
                self.add(h.snapshots_offset, table_length(raw, h.nb_snapshots), "snapshot table")
            except CorruptImage as exc:
                self.result.error(f"snapshot table: {exc}")
                snaps = []
            for s in snaps:
                if (s.l1_table_offset % self.cs or s.l1_size * 8 > MAX_L1_BYTES
                        or s.l1_table_offset + s.l1_size * 8 > self.file_end):
                    self.result.error(f"snapshot {s.id} has an invalid L1 table")
                    continue
                self.add(s.l1_table_offset, s.l1_size * 8, f"snapshot {s.id} L1 table")
                raw = meta.storage.read(s.l1_table_offset, s.l1_size * 8)
                self.walk_l1(np.frombuffer(raw, ">u8"), active=False)
        return self.refs

    def walk_bitmaps(self, ext: bitmaps.BitmapsExtension) -> None:
        storage = self.meta.storage
        self.add(ext.directory_offset, ext.directory_size, "bitmap directory")
        directory = storage.read(ext.directory_offset,
                                 min(ext.directory_size, max(0, self.file_end - ext.directory_offset)))
        for table in bitmaps.parse_directory(directory, ext.count):
            self.add(table.offset, table.entries * 8, "bitmap table")
            if table.offset + table.entries * 8 > self.file_end:
                continue
            for off in bitmaps.data_clusters(storage.read(table.offset, table.entries * 8)):
                self.add(off, self.cs, "bitmap data")

    def walk_l1(self, l1_table: np.ndarray, active: bool) -> None:
        meta = self.meta
        for i in np.flatnonzero(l1_table):
            value = int(l1_table[i])
            try:
                off = l2.check_l1_entry(value, self.cs, self.file_end)
            except CorruptImage as exc:
                self.result.error(f"L1 entry {i}: {exc}")
                continue
            if not off:
                continue
            self.add(off, self.cs, "L2 table")
            if active and self.check_copied:
                self.copied_flags.append((off, bool(value & l2.OFLAG_COPIED)))
            table = meta.storage.read(off, self.cs)
            self.walk_l2(np.frombuffer(table, ">u8"), active)

    def walk_l2(self, table: np.ndarray, active: bool) -> None:
        geo = self.meta.geo
        wide = 2 if geo.extended_l2 else 1
        words = table.reshape(-1, wide)
        for i in np.flatnonzero(words.any(axis=1)):
            value = int(words[i, 0])
            bitmap = int(words[i, 1]) if wide == 2 else 0
            try:
                e = l2.decode(geo, value, bitmap, self.file_end)
            except CorruptImage as exc:
                self.result.error(f"L2 entry: {exc}")
                continue
            if e.kind is Kind.COMPRESSED:
                for off in l2.compressed_host_clusters(e, self.cs):
                    self.add(off, self.cs, "compressed cluster")
            elif e.host:
                self.add(e.host, self.cs, "data cluster")
                if active and self.check_copied:
                    self.copied_flags.append((e.host, e.copied))


def _stored_refcounts(meta: Metadata, count: int) -> tuple[np.ndarray, int]:
    """Stored refcounts of clusters [0, count), and how many clusters past that (past
    the end of the file) have a non-zero refcount."""
    a = meta.alloc
    out = np.zeros(count, dtype=np.int64)
    beyond = 0
    for r in np.flatnonzero(a.reftable):
        try:
            off = rc.check_reftable_entry(int(a.reftable[r]), a.cluster_size, a.file_end)
        except CorruptImage:
            continue
        block = rc.decode_block(meta.storage.read(off, a.cluster_size), a.refcount_bits)
        lo = int(r) * a.epb
        n = max(0, min(a.epb, count - lo))
        out[lo:lo + n] = block[:n].astype(np.int64)
        beyond += int(np.count_nonzero(block[n:]))
    return out, beyond


def check_image(meta: Metadata) -> CheckResult:
    """Compare references with stored refcounts, like ``qemu-img check`` (no repair)."""
    result = CheckResult()
    walker = _Walker(meta, result, check_copied=True)
    refs = walker.walk()
    stored, beyond = _stored_refcounts(meta, len(refs))
    result.leaks += beyond
    used = np.flatnonzero(stored)
    # as qemu-img: the end of the last cluster in use
    result.image_end = (int(used[-1]) + 1) * walker.cs if len(used) else 0
    for c in np.flatnonzero(stored != refs):
        have, want = int(stored[c]), int(refs[c])
        if have < want:
            result.error(f"cluster {c} refcount={have} reference={want}")
        else:
            result.leaks += 1
            result.messages.append(f"Leaked cluster {c} refcount={have} reference={want}")
    for off, copied in walker.copied_flags:
        c = off // walker.cs
        if c < len(stored) and (stored[c] == 1) != copied:
            result.error(f"OFLAG_COPIED at 0x{off:x}: refcount={int(stored[c])} "
                         f"copied={int(copied)}")
    return result


def rebuild_refcounts(meta: Metadata) -> None:
    """Set every refcount to the number of references (QEMU does this when opening a
    dirty image with lazy refcounts), then write it all back."""
    result = CheckResult()
    walker = _Walker(meta, result, check_copied=False)
    refs = walker.walk()
    if result.corruptions:
        raise CorruptImage(f"cannot repair dirty image: {result.messages[0]}")
    a = meta.alloc
    a.reserved = refs
    try:
        stored, _ = _stored_refcounts(meta, len(refs))
        for c in np.flatnonzero(stored != refs):
            a.set_refcount(int(c) * a.cluster_size, int(refs[c]))
    finally:
        a.reserved = None
    meta.writeback()
