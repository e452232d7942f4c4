"""Host cluster refcounts: lookup, allocation, deferred frees, refcount table growth.

Invariant that makes the refcount cache safe to write back at any moment: increments are
applied at once (a crash then leaks, never double-owns), decrements only after the
reference removal they account for is durable (``free_later`` + ``apply_pending_frees``).
"""

from __future__ import annotations

import errno
import struct

import numpy as np

from blkpy.backends.base import CorruptImage
from blkpy.qcow2 import refcount as rc
from blkpy.qcow2.cache import TableCache
from blkpy.qcow2.header import MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE
from blkpy.qcow2.plan import Op, Resize, Storage, Sync, SyncLost, Write


class RefcountOverflow(CorruptImage):
    pass


class Allocator:
    def __init__(self, storage: Storage, cluster_bits: int, refcount_bits: int,
                 reftable_offset: int, reftable_clusters: int, file_size: int,
                 cache_bytes: int) -> None:
        self.storage = storage
        self.cluster_bits = cluster_bits
        self.cluster_size = cs = 1 << cluster_bits
        self.refcount_bits = refcount_bits
        self.max_refcount = rc.max_refcount(refcount_bits)
        self.epb = rc.entries_per_block(cs, refcount_bits)
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        raw = storage.read(reftable_offset, reftable_clusters * cs)
        self.reftable = np.frombuffer(raw, dtype=">u8").copy()
        self._reftable_dirty: set[int] = set()
        #: end of the file including clusters allocated but not yet written (bounds checks)
        self.file_end = file_size
        self._real_end = file_size
        #: a refcount table move failed half-way: see plan.SyncLost
        self.lost = False
        self.cache = TableCache(cache_bytes, cs)
        self.pending_frees: list[int] = []
        self._hint = 0  # no free cluster below this index
        #: while rebuilding refcounts: references per cluster, which count as in use
        self.reserved: np.ndarray | None = None

    # ---- lookup -------------------------------------------------------------------------

    def _block_offset(self, r: int) -> int:
        if r >= len(self.reftable):
            return 0
        return rc.check_reftable_entry(int(self.reftable[r]), self.cluster_size, self.file_end)

    def _block(self, r: int) -> np.ndarray | None:
        off = self._block_offset(r)
        if not off:
            return None
        block = self.cache.get(off)
        if block is None:
            block = rc.decode_block(self.storage.read(off, self.cluster_size), self.refcount_bits)
            self.cache.put(off, block)
            self._shrink_cache()
        return block

    def get(self, cluster: int) -> int:
        block = self._block(cluster // self.epb)
        return 0 if block is None else int(block[cluster % self.epb])

    # ---- updates ------------------------------------------------------------------------

    def _set(self, cluster: int, value: int) -> None:
        r = cluster // self.epb
        block = self._block(r)
        if block is None:
            block = self._new_block(r, exclude=cluster)
        block[cluster % self.epb] = value
        self.cache.mark_dirty(int(self.reftable[r]) & rc.REFT_OFFSET_MASK)

    def _new_block(self, r: int, exclude: int) -> np.ndarray:
        """A refcount block for range r, placed inside that range so it describes itself
        (every cluster of a range without a block is free)."""
        if r >= len(self.reftable):
            self._grow_reftable(r + 1, exclude)
            block = self._block(r)
            if block is not None:  # growth placed a block for r already
                return block
        first = r * self.epb
        where = first
        while where == exclude or self._reserved(where):
            where += 1
        if where >= first + self.epb:
            raise CorruptImage("no room for a refcount block")
        if self.reserved is not None and where < len(self.reserved):
            self.reserved[where] += 1
        off = where << self.cluster_bits
        block = np.zeros(self.epb, dtype=np.uint64)
        block[where - first] = 1
        self._note_allocated(where, 1)
        self.reftable[r] = off
        self._reftable_dirty.add(r)
        self.cache.put(off, block, dirty=True)
        self._shrink_cache()
        return block

    def increment(self, offset: int) -> None:
        c = offset >> self.cluster_bits
        value = self.get(c)
        if value >= self.max_refcount:
            raise RefcountOverflow(f"refcount overflow at host cluster 0x{offset:x}")
        self._set(c, value + 1)

    def decrement(self, offset: int) -> None:
        c = offset >> self.cluster_bits
        value = self.get(c)
        if value == 0:
            raise CorruptImage(f"refcount underflow at host cluster 0x{offset:x}")
        self._set(c, value - 1)
        if value == 1:
            self._hint = min(self._hint, c)

    def set_refcount(self, offset: int, value: int) -> None:
        """Overwrite one refcount (refcount rebuild only)."""
        self._set(offset >> self.cluster_bits, value)
        if value == 0:
            self._hint = min(self._hint, offset >> self.cluster_bits)

    def free_later(self, offset: int) -> None:
        """Drop one reference once the metadata change that removed it is durable."""
        self.pending_frees.append(offset)

    def apply_pending_frees(self) -> list[int]:
        """Apply deferred decrements; returns the host clusters that became free."""
        freed = []
        pending, self.pending_frees = self.pending_frees, []
        for off in pending:
            self.decrement(off)
            if self.get(off >> self.cluster_bits) == 0:
                freed.append(off)
        return freed

    def alloc(self) -> int:
        """Allocate one host cluster (refcount 0 -> 1); returns its offset."""
        c = self._find_free(self._hint)
        if (c + 1) << self.cluster_bits > MAX_HOST_OFFSET:
            raise CorruptImage("image file would exceed the qcow2 size limit")
        self._set(c, 1)
        self._hint = c + 1
        self._note_allocated(c, 1)
        return c << self.cluster_bits

    def _note_allocated(self, first: int, count: int) -> None:
        self.file_end = max(self.file_end, (first + count) << self.cluster_bits)

    def _reserved(self, c: int) -> bool:
        return self.reserved is not None and c < len(self.reserved) and self.reserved[c] > 0

    def _find_free(self, start: int) -> int:
        c = start
        while True:
            r = c // self.epb
            block = self._block(r)
            if block is None:
                if not self._reserved(c):
                    return c
                c += 1
                continue
            if block[c % self.epb] == 0 and not self._reserved(c):
                return c  # the hint is usually free (appending): no scan of the block
            zeros = np.flatnonzero(block[c % self.epb:] == 0)
            for z in zeros:
                if not self._reserved(c + int(z)):
                    return c + int(z)
            c = (r + 1) * self.epb

    # ---- refcount table growth ----------------------------------------------------------

    def _grow_reftable(self, min_entries: int, exclude: int) -> None:
        """Move the refcount table to a larger one at the end of the file.

        Order: new refcount blocks and the new table are written and synced, then one
        header write switches to it, synced; only then is the old table freed."""
        cs, epb = self.cluster_size, self.epb
        per_cluster = cs // 8
        # first cluster past everything in use (and past the cluster being allocated)
        start = max(-(-self.file_end // cs), exclude + 1)
        want = max(min_entries, len(self.reftable) * 3 // 2 + 1)
        while True:
            tclusters = -(-want // per_cluster)
            # ranges the new area touches that have no block yet get one right after it
            new_ranges: list[int] = []
            end = start + tclusters
            while True:
                needed = [r for r in range(start // epb, (end - 1) // epb + 1)
                          if not self._block_offset(r)]
                if needed == new_ranges:
                    break
                new_ranges = needed
                end = start + tclusters + len(new_ranges)
            if (end - 1) // epb < tclusters * per_cluster:
                break  # the new table covers its own area
            want = (end - 1) // epb + 1
        if tclusters * cs > MAX_REFTABLE_BYTES:
            raise CorruptImage("refcount table would exceed its size limit")
        table = np.zeros(tclusters * per_cluster, dtype=">u8")
        table[:len(self.reftable)] = self.reftable
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable = table
        block_at = start + tclusters
        for i, r in enumerate(new_ranges):
            off = (block_at + i) * cs
            self.reftable[r] = off
            self.cache.put(off, np.zeros(epb, dtype=np.uint64), dirty=True)
        self._note_allocated(start, end - start)
        for c in range(start, end):
            self._set(c, self.get(c) + 1)
        self.reftable_offset, self.reftable_clusters = start * cs, tclusters
        plan: list[Op] = [Resize(self.file_end)]
        plan += self.block_writes()
        plan += [Write(self.reftable_offset, self.reftable.tobytes()), Sync(),
                 Write(OFF_REFCOUNT_TABLE, struct.pack(">QI", self.reftable_offset, tclusters)),
                 Sync()]
        try:
            self.storage.execute(plan)
        except OSError as exc:
            # the header may or may not point at the new table now: nothing written from
            # here on could be trusted, as after a lost sync
            self.lost = True
            raise SyncLost(exc.errno or errno.EIO, f"refcount table move: {exc}") from exc
        self.blocks_written()
        self.resized(self.file_end)
        self._reftable_dirty.clear()
        for i in range(old_clusters):  # nothing points at the old table any more
            self.decrement(old_offset + i * cs)

    # ---- write-back ---------------------------------------------------------------------

    @property
    def blocks_dirty(self) -> bool:
        return self.cache.dirty

    @property
    def reftable_dirty(self) -> bool:
        return bool(self._reftable_dirty)

    def block_writes(self, changed_only: bool = False) -> list[Op]:
        """Writes of every dirty refcount block (safe at any time, see module doc), or of
        those changed since the last ``changed_only`` call. They stay dirty until
        ``blocks_written`` (a failed write is retried next time)."""
        tables = self.cache.take_changed() if changed_only else self.cache.dirty_tables()
        return [Write(off, rc.encode_block(b, self.refcount_bits)) for off, b in tables]

    def blocks_written(self) -> None:
        self.cache.mark_all_clean()

    def reftable_writes(self) -> list[Op]:
        """Writes of the refcount table sectors holding changed entries (after the blocks
        they point to are durable); dirty until ``reftable_written``."""
        ops: list[Op] = []
        per_sector = 512 // 8
        for s in sorted({r // per_sector for r in self._reftable_dirty}):
            chunk = self.reftable[s * per_sector:(s + 1) * per_sector]
            ops.append(Write(self.reftable_offset + s * 512, chunk.tobytes()))
        return ops

    def reftable_written(self) -> None:
        self._reftable_dirty.clear()

    @property
    def real_end(self) -> int:
        """Size of the file as last extended by us: clusters at or past it read as zeros."""
        return self._real_end

    def resize_op(self) -> list[Op]:
        """A Resize if allocations went past the end of the file (``resized`` once done)."""
        return [Resize(self.file_end)] if self.file_end > self._real_end else []

    def resized(self, size: int) -> None:
        self._real_end = max(self._real_end, size)

    def _shrink_cache(self) -> None:
        if not self.cache.shrink():
            self.storage.execute(self.block_writes())
            self.blocks_written()
            self.cache.shrink()
