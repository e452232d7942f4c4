"""Lookup tables that Python fills and the native ring loop reads without locks
(``struct blkpy_table`` in blkpy/gntdev/ringloop.c): the persistent grants of a ring, and
the extents of an image format that the loop may use for data I/O.

A value of 0 means "unknown, ask Python", so forgetting an entry is zeroing its value;
a table is sized to stay at most half full and is cleared when it fills up.
"""

from __future__ import annotations

import threading

import numpy as np

from blkpy.gntdev.native import ffi, lib

EXTENT_READ = lib.BLKPY_EXTENT_READ
EXTENT_WRITE = lib.BLKPY_EXTENT_WRITE


#: tables made ahead per slot count (``reserve``), at most RESERVE_MAX of each
_reserved: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
_reserved_lock = threading.Lock()
RESERVE_MAX = 4


def _slots(capacity: int) -> int:
    return 1 << max(4, (2 * max(capacity, 1) - 1).bit_length())


def reserve(capacity: int) -> None:
    """Make the arrays of one table of ``capacity`` now, every page of them touched, for
    the next table of that size to take. A table's arrays are fresh zero pages, each
    faulted in by the first entry put there: an image's extent map takes 256 faults to
    learn one L2 table (1.3-1.9 ms on a host, 40-60 ms of an upgrade's stall under the
    lab's emulation); a successor reserves its own before it takes over."""
    slots = _slots(capacity)
    keys, vals = np.empty(slots, dtype=np.uint64), np.empty(slots, dtype=np.uint64)
    keys.fill(0)  # (np.zeros would leave the pages untouched)
    vals.fill(0)
    with _reserved_lock:
        ready = _reserved.setdefault(slots, [])
        if len(ready) < RESERVE_MAX:
            ready.append((keys, vals))


def reserved(capacity: int) -> int:
    """How many tables of ``capacity`` are made ahead."""
    with _reserved_lock:
        return len(_reserved.get(_slots(capacity), []))


def _arrays(slots: int) -> tuple[np.ndarray, np.ndarray]:
    with _reserved_lock:
        ready = _reserved.get(slots)
        if ready:
            return ready.pop()
    return np.zeros(slots, dtype=np.uint64), np.zeros(slots, dtype=np.uint64)


class NativeTable:
    """64-bit key -> non-zero 64-bit value, for ``capacity`` keys."""

    def __init__(self, capacity: int) -> None:
        slots = _slots(capacity)
        self._keys, self._vals = _arrays(slots)
        self.native = ffi.new("struct blkpy_table *")
        self.native.keys = ffi.cast("uint64_t *", self._keys.ctypes.data)
        self.native.vals = ffi.cast("uint64_t *", self._vals.ctypes.data)
        self.native.mask = slots - 1
        self.capacity = capacity
        self.count = 0  # keys ever put since the last clear (forgotten ones included)

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def put(self, key: int, value: int) -> None:
        if self.full:
            raise OverflowError("native table full")
        if key == 0xFFFFFFFFFFFFFFFF:  # the one key without a slot: stays unknown
            return
        lib.blkpy_table_put(self.native, key, value)
        self.count += 1

    def put_many(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Several entries in one call (no more than the room left)."""
        k = np.ascontiguousarray(keys, dtype=np.uint64)
        v = np.ascontiguousarray(values, dtype=np.uint64)
        if len(k) > self.capacity - self.count:
            raise OverflowError("native table full")
        if len(k):
            lib.blkpy_table_put_many(self.native, ffi.cast("uint64_t *", k.ctypes.data),
                                     ffi.cast("uint64_t *", v.ctypes.data), len(k))
            self.count += len(k)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Value per key, 0 where unknown."""
        wanted = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.zeros(len(wanted), dtype=np.uint64)
        if len(wanted):
            lib.blkpy_table_get(self.native, ffi.cast("uint64_t *", wanted.ctypes.data),
                                len(wanted), ffi.cast("uint64_t *", out.ctypes.data))
        return out

    def held_keys(self) -> np.ndarray:
        """Every key with a value now (the C side stores each key plus one; 0 is an empty
        slot, and a forgotten key keeps its slot with value 0)."""
        held = (self._keys != 0) & (self._vals != 0)
        return self._keys[held] - np.uint64(1)

    def _wipe(self) -> None:
        self._vals[:] = 0
        self._keys[:] = 0
        self.count = 0


class PersistentGrantTable(NativeTable):
    """gref -> address of its persistently mapped page."""

    def clear(self) -> None:
        self._wipe()

    def grefs(self) -> list[int]:
        """Every gref with a mapped page."""
        return sorted(self.held_keys().tolist())


class ExtentMap(NativeTable):
    """Guest cluster -> host offset | EXTENT_READ | EXTENT_WRITE of an image format, for
    clusters whose bytes are plain host data. The format learns entries as it serves
    requests and forgets them before it changes where a cluster lives; forgetting waits
    until no ring loop still uses an entry it looked up before (the host cluster may be
    reused right after)."""

    def __init__(self, capacity: int, cluster_bits: int) -> None:
        super().__init__(capacity)
        self.cluster_bits = cluster_bits
        self._loops: list[object] = []
        self._lock = threading.Lock()
        self.generation = 0  # counts clears: what was learnt before one is gone

    def attach(self, loop: object) -> None:
        """A ring loop (``struct blkpy_ringloop *``) starts using the map."""
        with self._lock:
            self._loops.append(loop)

    def detach(self, loop: object) -> None:
        with self._lock:
            self._loops = [x for x in self._loops if x != loop]

    def _quiesce(self) -> None:
        with self._lock:
            loops = list(self._loops)
        if loops:
            lib.blkpy_ringloop_quiesce(ffi.new("struct blkpy_ringloop *[]", loops), len(loops))

    def learn(self, cluster: int, host: int, writable: bool) -> None:
        """Cluster ``cluster`` reads as the host cluster at ``host`` (and may be written in
        place if ``writable``)."""
        if self.full:
            self.clear()
        self.put(cluster, host | EXTENT_READ | (EXTENT_WRITE if writable else 0))

    def learn_many(self, clusters: np.ndarray, hosts: np.ndarray, writable: np.ndarray) -> None:
        """``learn`` for arrays of clusters (hosts 0 are skipped)."""
        known = hosts != 0
        values = (hosts[known] | np.uint64(EXTENT_READ)
                  | np.where(writable[known], np.uint64(EXTENT_WRITE), np.uint64(0)))
        if known.sum() > self.capacity - self.count:
            self.clear()
            if known.sum() > self.capacity:
                return
        self.put_many(clusters[known], values)

    def forget(self, offset: int, length: int) -> None:
        """Drop the clusters of guest bytes [offset, offset + length)."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        lib.blkpy_table_forget(self.native, first, last - first + 1)
        self._quiesce()

    def clear(self) -> None:
        self._vals[:] = 0  # unknown at once for every loop ...
        self._quiesce()  # ... and none still using an old entry when the keys go
        self._wipe()
        self.generation += 1
