"""The qcow2 metadata core: guest → host mapping, allocation decisions, crash-safe write-back.

It reads tables and runs plans through a Storage (plan.py) and never touches data
clusters: the I/O layer (blkpy.backends.qcow2) reads/writes guest data at the host offsets
this core hands out, and calls ``commit`` once a step's data is written.

Not thread-safe: one caller at a time (the dispatcher serialises a disk's requests, which
also serialises allocations of the same guest cluster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import struct
from collections.abc import Iterator

import numpy as np

from blkpy.backends.base import CorruptImage
from blkpy.qcow2 import l2
from blkpy.qcow2.allocator import Allocator
from blkpy.qcow2.cache import TableCache
from blkpy.qcow2.header import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_CLUSTER_BITS,
    OFF_AUTOCLEAR,
    OFF_INCOMPATIBLE,
    Header,
    parse_header,
)
from blkpy.qcow2.l2 import Entry, Kind
from blkpy.qcow2.plan import Op, Punch, Storage, Sync, SyncLost, Write
from blkpy.qcow2.snapshot import Snapshot, parse_snapshots

DEFAULT_CACHE_SIZE = 4 * 1024 * 1024  # bytes of L2 tables (refcount blocks get a quarter)


@dataclasses.dataclass(frozen=True)
class Extent:
    """A guest range with one way of reading it."""

    guest: int
    length: int
    kind: Kind
    host: int = 0  # NORMAL: host offset of ``guest``
    entry: Entry | None = None  # COMPRESSED: the cluster's entry


@dataclasses.dataclass(frozen=True)
class ClusterWrite:
    """Write guest bytes [guest, guest+length) at ``host``, then ``commit`` this step.

    The region covers the caller's bytes and is widened to whole (sub)clusters when a
    cluster is newly allocated: the widened parts must be filled with what the guest
    currently reads there (copy-on-write), read *before* the commit."""

    guest: int
    length: int
    host: int
    l2_table: int = 0  # host offset of the L2 table to update (0: data-only step)
    l2_index: int = 0
    value: int = 0
    bitmap: int = 0
    frees: tuple[int, ...] = ()
    #: the widened parts read as zeros and the host area lies past the end of the file
    #: (reads as zeros too): only the caller's bytes need writing
    skip_cow: bool = False
    #: ``host`` lies in a cluster allocated for this step (``abort`` gives it back)
    allocated: bool = False


#: what the first read of an image takes: its whole first cluster at the default size
HEADER_READ = 1 << 16


def read_header(storage: Storage, file_size: int) -> Header:
    """The header, read with its first cluster (where its extensions and the backing file
    name live): 64 KiB, and the rest only for an image of bigger clusters. Not the
    largest cluster size every time: a successor opens the image while its guest waits,
    and 2 MiB of fresh memory per image in its backing chain cost tens of ms under
    emulation."""
    data = storage.read(0, min(file_size, HEADER_READ))
    if len(data) >= 24:
        # (parse_header says what is wrong with a bad one)
        cluster = 1 << min(struct.unpack_from(">I", data, 20)[0], MAX_CLUSTER_BITS)
        if cluster > len(data) and file_size > len(data):
            data = storage.read(0, min(file_size, cluster))
    return parse_header(data, file_size)


class Metadata:
    def __init__(self, storage: Storage, file_size: int, writable: bool,
                 cache_size: int = DEFAULT_CACHE_SIZE, has_backing: bool | None = None) -> None:
        self.storage = storage
        self.header = h = read_header(storage, file_size)
        self.writable = writable
        self.geo = l2.Geometry(h.cluster_bits, h.extended_l2, h.version)
        self.has_backing = bool(h.backing_file) if has_backing is None else has_backing
        cs = self.geo.cluster_size
        self._wide = 2 if h.extended_l2 else 1  # u64 words per L2 entry
        self.l1 = np.frombuffer(storage.read(h.l1_table_offset, h.l1_size * 8), ">u8").copy()
        self._l1_dirty: set[int] = set()
        self.alloc = Allocator(storage, h.cluster_bits, h.refcount_bits,
                               h.refcount_table_offset, h.refcount_table_clusters,
                               file_size, max(cache_size // 4, 4 * cs))
        self.l2_cache = TableCache(cache_size, cs)
        self._data_unsynced = False
        #: a sync failed (plan.SyncLost): what is on disk is consistent but older than the
        #: cache and may miss writes the kernel dropped, so no metadata is written any more
        self._write_failed = False
        self._l1_shift = h.cluster_bits + self.geo.l2_bits
        if writable:
            self._prepare_for_writing()

    # ---- properties ---------------------------------------------------------------------

    @property
    def write_failed(self) -> bool:
        return self._write_failed or self.alloc.lost

    @write_failed.setter
    def write_failed(self, value: bool) -> None:
        self._write_failed = value

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def file_end(self) -> int:
        return self.alloc.file_end

    def snapshots(self) -> list[Snapshot]:
        h = self.header
        if not h.nb_snapshots:
            return []
        data = self.storage.read(h.snapshots_offset,
                                 min(self.file_end - h.snapshots_offset, 64 * 1024 * 1024))
        return parse_snapshots(data, h.nb_snapshots)

    # ---- opening for writes -------------------------------------------------------------

    def _prepare_for_writing(self) -> None:
        h = self.header
        if h.corrupt:
            raise CorruptImage("image is marked corrupt; repair it with 'qemu-img check -r all'")
        plan: list[Op] = []
        if h.autoclear_features:
            # we keep no bitmaps up to date: whatever the bits promised stops being true
            h.autoclear_features = 0
            plan += [Write(OFF_AUTOCLEAR, bytes(8))]
        if plan:
            self.storage.execute(plan + [Sync()])
        if h.dirty:
            from blkpy.qcow2.check import rebuild_refcounts

            rebuild_refcounts(self)
            self.set_incompatible(h.incompatible_features & ~INCOMPAT_DIRTY)

    def set_incompatible(self, bits: int) -> None:
        """Rewrite the incompatible feature field (v3 only; v2 has none) and sync."""
        self.header.incompatible_features = bits
        if self.header.version >= 3:
            self.storage.execute([Sync(), Write(OFF_INCOMPATIBLE, struct.pack(">Q", bits)),
                                  Sync()])

    def mark_corrupt(self) -> None:
        """Stop writing after detecting an inconsistency (QEMU's corrupt bit). What the
        guest wrote so far is written back first (in the usual safe order), so that
        earlier acknowledged writes survive a later flush that can no longer write."""
        if not self.writable:
            return
        try:
            self.writeback()
        except (OSError, CorruptImage):
            self.write_failed = True
        self.writable = False
        self.set_incompatible(self.header.incompatible_features | INCOMPAT_CORRUPT)

    # ---- tables -------------------------------------------------------------------------

    def _l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        return l2.check_l1_entry(int(self.l1[l1_index]), self.geo.cluster_size, self.file_end)

    def _l2_table(self, offset: int) -> np.ndarray:
        table = self.l2_cache.get(offset)
        if table is None:
            raw = self.storage.read(offset, self.geo.cluster_size)
            table = np.frombuffer(raw, ">u8").copy()
            self.l2_cache.put(offset, table)
            self._shrink_l2_cache()
        return table

    def _shrink_l2_cache(self) -> None:
        if not self.l2_cache.shrink():
            self.writeback()
            self.l2_cache.shrink()

    def entry(self, guest: int) -> Entry:
        """The decoded L2 entry of the cluster holding guest offset ``guest``."""
        geo = self.geo
        off = self._l2_offset(geo.l1_index(guest))
        if not off:
            return Entry(Kind.UNALLOCATED)
        table = self._l2_table(off)
        i = geo.l2_index(guest) * self._wide
        bitmap = int(table[i + 1]) if self._wide == 2 else 0
        return l2.decode(geo, int(table[i]), bitmap, self.file_end)

    def _writable_l2(self, l1_index: int) -> int:
        """Offset of an L2 table for ``l1_index`` that we own alone (allocating or
        copying one if needed)."""
        if l1_index >= len(self.l1):
            raise CorruptImage("guest offset beyond the L1 table")
        value = int(self.l1[l1_index])
        old = self._l2_offset(l1_index)
        if old and value & l2.OFLAG_COPIED:
            return old
        new = self.alloc.alloc()
        table = self._l2_table(old).copy() if old else np.zeros(
            self.geo.cluster_size // 8, ">u8")
        self.l2_cache.put(new, table, dirty=True)
        self.l1[l1_index] = new | l2.OFLAG_COPIED
        self._l1_dirty.add(l1_index)
        if old:
            self.alloc.free_later(old)  # the old table stays with the snapshot(s)
        self._shrink_l2_cache()
        return new

    def fast_host(self, guest: int, length: int, write: bool) -> int | None:
        """Host offset of [guest, guest+length) if it lies in one cluster whose L2 table is
        cached and whose bytes there are plain host data (for writes: ours alone, so
        writable in place). None means: take the general path. The hot path of both
        reads and in-place writes, so it works on raw entries."""
        cs = self.geo.cluster_size
        inoff = guest & (cs - 1)
        if inoff + length > cs:
            return None
        l1_index = guest >> self._l1_shift
        if l1_index >= len(self.l1):
            return None
        l1v = int(self.l1[l1_index])
        table = self.l2_cache.get(l1v & l2.L1E_OFFSET_MASK)
        if table is None or l1v & l2.L1E_RESERVED_MASK or (
                write and not l1v & l2.OFLAG_COPIED):
            return None
        i = ((guest >> self.geo.cluster_bits) & (self.geo.l2_entries - 1)) * self._wide
        v = int(table[i])
        host = v & l2.L2E_OFFSET_MASK
        if (not host or v & (l2.OFLAG_COMPRESSED | l2.L2E_STD_RESERVED_MASK | l2.OFLAG_ZERO)
                or host & (cs - 1) or host >= self.alloc.file_end
                or (write and not v & l2.OFLAG_COPIED)):
            return None
        if self._wide == 2:
            scs = self.geo.subcluster_size
            mask = l2.subcluster_mask(inoff // scs, (inoff + length + scs - 1) // scs)
            bitmap = int(table[i + 1])
            if bitmap & mask != mask or (bitmap >> 32) & mask:
                return None
        return host + inoff

    def plain_clusters(self, guest: int) -> tuple[int, np.ndarray, np.ndarray] | None:
        """``fast_host`` for every cluster of the L2 table covering guest offset ``guest``
        at once: (first guest cluster, host offset per entry or 0, writable in place per
        entry). None for images with extended L2 entries (their subclusters decide) and
        where there is no L2 table."""
        if self._wide == 2:
            return None
        geo = self.geo
        l1_index = guest >> self._l1_shift
        if l1_index >= len(self.l1):
            return None
        l1v = int(self.l1[l1_index])
        off = self._l2_offset(l1_index)
        if not off:
            return None
        v = self._l2_table(off).astype(np.uint64)
        host = v & np.uint64(l2.L2E_OFFSET_MASK)
        bad = np.uint64(l2.OFLAG_COMPRESSED | l2.L2E_STD_RESERVED_MASK | l2.OFLAG_ZERO)
        cs = np.uint64(geo.cluster_size)
        plain = ((host != 0) & ((v & bad) == 0) & (host % cs == 0)
                 & (host < np.uint64(self.alloc.file_end)))
        writable = (plain & ((v & np.uint64(l2.OFLAG_COPIED)) != 0)
                    & bool(l1v & l2.OFLAG_COPIED))
        return l1_index << geo.l2_bits, np.where(plain, host, np.uint64(0)), writable

    def fast_runs(self, guest: int, length: int, write: bool) -> list[tuple[int, int]] | None:
        """``fast_host`` over several clusters: (host offset, length) runs of physically
        contiguous clusters covering the range, or None if any piece needs the general
        path."""
        cs = self.geo.cluster_size
        runs: list[tuple[int, int]] = []
        pos, end = guest, guest + length
        while pos < end:
            n = min(end, (pos | (cs - 1)) + 1) - pos
            host = self.fast_host(pos, n, write)
            if host is None:
                return None
            if runs and runs[-1][0] + runs[-1][1] == host:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((host, n))
            pos += n
        return runs

    # ---- reads --------------------------------------------------------------------------

    def map_read(self, guest: int, length: int) -> list[Extent]:
        """Split [guest, guest+length) into extents, merging neighbours that read alike
        (contiguous host data, zeros, backing)."""
        out: list[Extent] = []
        geo = self.geo
        cs, scs = geo.cluster_size, geo.subcluster_size
        end = guest + length
        pos = guest
        while pos < end:
            cluster_start = pos & ~(cs - 1)
            e = self.entry(pos)
            if e.kind is Kind.COMPRESSED:
                n = min(end, cluster_start + cs) - pos
                out.append(Extent(pos, n, Kind.COMPRESSED, entry=e))
                pos += n
                continue
            cend = min(end, cluster_start + cs)
            while pos < cend:
                x = (pos - cluster_start) // scs
                kind = e.subcluster_kind(x)
                n = min(cend, cluster_start + (x + 1) * scs) - pos
                host = e.host + (pos - cluster_start) if kind is Kind.NORMAL else 0
                last = out[-1] if out else None
                if last is not None and last.kind is kind and (
                        kind is not Kind.NORMAL or last.host + last.length == host):
                    out[-1] = dataclasses.replace(last, length=last.length + n)
                else:
                    out.append(Extent(pos, n, kind, host))
                pos += n
        return out

    # ---- writes -------------------------------------------------------------------------

    def plan_write(self, guest: int, length: int) -> list[ClusterWrite]:
        """Decide where each cluster piece of a guest write goes, allocating as needed."""
        if not self.writable:
            raise PermissionError("image is read-only")
        steps: list[ClusterWrite] = []
        cs = self.geo.cluster_size
        pos, end = guest, guest + length
        try:
            while pos < end:
                n = min(end, (pos & ~(cs - 1)) + cs) - pos
                steps.append(self._plan_piece(pos, n))
                pos += n
        except BaseException:
            self.abort(steps)
            raise
        return steps

    def abort(self, steps: list[ClusterWrite]) -> None:
        """Give back the clusters allocated for ``steps`` that will never be committed (a
        data write or copy-on-write read failed), as QEMU's allocation abort does: no L2
        entry points at them, so they are free again instead of leaked. Best effort: a
        refcount that cannot be read here stays a leak."""
        cs = self.geo.cluster_size
        for step in steps:
            if step.allocated:
                with contextlib.suppress(OSError):
                    self.alloc.decrement(step.host & ~(cs - 1))

    def _plan_piece(self, pos: int, n: int) -> ClusterWrite:
        geo = self.geo
        cs, scs = geo.cluster_size, geo.subcluster_size
        cstart = pos & ~(cs - 1)
        e = self.entry(pos)
        inoff = pos - cstart
        a, b = inoff // scs, (inoff + n + scs - 1) // scs
        mask = l2.subcluster_mask(a, b)
        skip_cow = False
        if e.kind is not Kind.COMPRESSED and e.host and e.copied:
            if e.alloc & mask == mask and not e.zero & mask:
                return ClusterWrite(pos, n, e.host + inoff)  # in place, no metadata change
            host, frees = e.host, ()
            region = (a * scs, b * scs)
            alloc, zero = e.alloc | mask, e.zero & ~mask
        else:
            fresh_from = self.alloc.real_end
            host = self.alloc.alloc()
            if e.kind is Kind.COMPRESSED:
                frees = tuple(l2.compressed_host_clusters(e, cs))
                region, alloc, zero = (0, cs), l2.subcluster_mask(0, geo.subclusters), 0
            elif e.host:  # shared with a snapshot: copy the whole cluster
                frees = (e.host,)
                region, alloc, zero = (0, cs), e.alloc | mask, e.zero & ~mask
            else:
                frees = ()
                region, alloc, zero = (a * scs, b * scs), mask, e.zero & ~mask
                reads_zero = not self.has_backing or e.zero & mask == mask
                skip_cow = reads_zero and host >= fresh_from
        table = self._writable_l2(geo.l1_index(pos))
        value, bitmap = l2.encode(geo, host, alloc, zero)
        return ClusterWrite(cstart + region[0], region[1] - region[0], host + region[0],
                            table, geo.l2_index(pos), value, bitmap, frees, skip_cow,
                            allocated=host != e.host)

    def data_written(self) -> None:
        """The I/O layer wrote guest data (the next write-back must sync it first)."""
        self._data_unsynced = True

    def commit(self, step: ClusterWrite) -> None:
        """Point the L2 entry at the step's data (after the data was written)."""
        if not step.l2_table:
            return
        table = self._l2_table(step.l2_table)
        i = step.l2_index * self._wide
        table[i] = step.value
        if self._wide == 2:
            table[i + 1] = step.bitmap
        self.l2_cache.mark_dirty(step.l2_table)
        for off in step.frees:
            self.alloc.free_later(off)

    def discard(self, guest: int, length: int) -> None:
        """QEMU's guest discard: whole clusters only (plus a partial last cluster that ends
        the disk), which read as zeros afterwards and release their host clusters. On v2
        images with a backing file QEMU does nothing (no zero flag to hide the backing
        file), and neither do we."""
        if self.geo.version < 3 and self.has_backing:
            return
        geo = self.geo
        cs = geo.cluster_size
        first = -(-guest // cs) * cs
        end = guest + length
        stop = end if end == self.size else end & ~(cs - 1)
        for pos in range(first, stop, cs):
            e = self.entry(pos)
            allocated = e.kind is Kind.COMPRESSED or bool(e.host)
            if self.has_backing or allocated:
                if geo.extended_l2:
                    value, bitmap = 0, l2.BITMAP_ALL_ZERO
                else:
                    value, bitmap = (l2.OFLAG_ZERO if geo.version >= 3 else 0), 0
            else:
                value = bitmap = 0
            l1_index = geo.l1_index(pos)
            if not allocated and (value, bitmap) == (0, 0) and not self._l2_offset(l1_index):
                continue
            if e.kind is Kind.COMPRESSED:
                frees = tuple(l2.compressed_host_clusters(e, cs))
            else:
                frees = (e.host,) if e.host else ()
            table = self._writable_l2(l1_index)
            self.commit(ClusterWrite(pos, 0, 0, table, geo.l2_index(pos), value, bitmap,
                                     frees))

    # ---- write-back ---------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        a = self.alloc
        return bool(self.l2_cache.dirty or self._l1_dirty or a.blocks_dirty
                    or a.reftable_dirty or a.pending_frees)

    def writeback(self) -> None:
        """Write every cached change in crash-safe order, each phase synced before the
        next starts: refcount blocks (and data) → refcount table entries → L2 tables →
        L1 entries → deferred refcount decrements. A crash between phases leaves at
        worst leaked clusters, and so does a failed write: what a phase writes stays
        dirty until its sync succeeded, so the next write-back (the guest's next flush)
        writes it again, in the same order. After a failed sync (plan.SyncLost) the image
        takes no more writes."""
        if self.write_failed:
            raise OSError(errno.EIO, "an earlier metadata sync failed")
        if not self.dirty:
            return
        with self._sync_guard():
            self._writeback()

    @contextlib.contextmanager
    def _sync_guard(self) -> Iterator[None]:
        try:
            yield
        except SyncLost:
            self.writable = False
            self.write_failed = True
            raise

    def _writeback(self) -> None:
        a = self.alloc
        run = self.storage.execute
        end = a.file_end
        run(a.resize_op() + a.block_writes() + [Sync()])
        a.resized(end)
        a.blocks_written()
        self._data_unsynced = False
        if a.reftable_dirty:
            run(a.reftable_writes() + [Sync()])
            a.reftable_written()
        if self.l2_cache.dirty:
            run(self._l2_writes() + [Sync()])
            self.l2_cache.mark_all_clean()
        if self._l1_dirty:
            run(self._l1_writes() + [Sync()])
            self._l1_dirty.clear()
        if a.pending_frees:
            # applied once: if their write fails the blocks stay dirty and go out first
            # in the next write-back, after the L2/L1 changes above are already durable
            freed = a.apply_pending_frees()
            for off in freed:
                self.l2_cache.discard(off)
            cs = self.geo.cluster_size
            run(a.block_writes() + [Sync()] + [Punch(off, cs) for off in freed])
            a.blocks_written()

    def unsynced_phases(self, changed_only: bool = False) -> list[list[Op]]:
        """What a write-back would write now, phase by phase in its order, leaving every
        change dirty (a restart record, blkpy.qcow2.restart_log). Each phase keeps its
        index, empty or not. ``changed_only``: of the L2 tables and refcount blocks only
        those changed since the last call (the refcount table and L1 sectors always: they
        are small); either way none counts as changed after it. Deferred refcount
        decrements are left out: losing them only leaks clusters."""
        a = self.alloc
        if not changed_only:  # all of them are here
            a.cache.take_changed()
            self.l2_cache.take_changed()
        return [a.resize_op() + a.block_writes(changed_only), a.reftable_writes(),
                self._l2_writes(changed_only), self._l1_writes()]

    def _l2_writes(self, changed_only: bool = False) -> list[Op]:
        cache = self.l2_cache
        tables = cache.take_changed() if changed_only else cache.dirty_tables()
        return [Write(off, t.tobytes()) for off, t in tables]

    def _l1_writes(self) -> list[Op]:
        per_sector = 512 // 8
        ops: list[Op] = []
        for s in sorted({i // per_sector for i in self._l1_dirty}):
            chunk = self.l1[s * per_sector:(s + 1) * per_sector]
            ops.append(Write(self.header.l1_table_offset + s * 512, chunk.tobytes()))
        return ops

    def flush(self) -> None:
        """Make every completed write durable."""
        if self.dirty:
            self.writeback()
        else:
            if self.write_failed:
                raise OSError(errno.EIO, "an earlier metadata sync failed")
            with self._sync_guard():
                self.storage.execute([Sync()])
        self._data_unsynced = False
