"""Getting at the guest's data pages: batched grant mapping (with a persistent-grant cache)
or grant copy through a bounce buffer.

Both strategies take every data segment of a batch at once and turn it into local
(address, length) iovecs for the I/O engine. A grant failure fails only the requests that
used the bad grant: a failed batch map is retried request by request to isolate them
(gntdev fails the whole mmap), and grant copy reports a status per segment.
"""

from __future__ import annotations

import abc

import numpy as np

from blkpy.defaults import MAX_PERSISTENT_GRANTS
from blkpy.gntdev.native import ffi
from blkpy.native_table import PersistentGrantTable
from blkpy.platform import COPY_SEGMENT_DTYPE, GNTST_OKAY, GrantError, GrantMapping, Platform
from blkpy.ring import PAGE_SIZE, SECTOR_SHIFT, SEGMENT_DTYPE, SEGS_PER_INDIRECT_FRAME


class Acquired(abc.ABC):
    """Data pages of a batch, held until release(). ``iov`` has one (address, length) row
    per segment given to acquire(), in the same order."""

    def __init__(self, nsegs: int) -> None:
        self.iov = np.zeros((nsegs, 2), dtype=np.uint64)
        self.failed: set[int] = set()  # owners (requests) whose grants were bad

    def finish(self, ok_reads: np.ndarray) -> set[int]:
        """After I/O: deliver READ data to the guest where needed; returns the owners whose
        delivery failed."""
        return set()

    @abc.abstractmethod
    def release(self) -> None:
        """Drop transient mappings (must happen before the responses are pushed)."""


def segment_lengths(segs: np.ndarray) -> np.ndarray:
    first = segs["first_sect"].astype(np.uint64)
    return (segs["last_sect"].astype(np.uint64) - first + np.uint64(1)) << np.uint64(SECTOR_SHIFT)


def _fill_iov(iov: np.ndarray, sel: np.ndarray, page_addr: np.ndarray, segs: np.ndarray) -> None:
    """iovec rows ``sel`` for segments whose pages start at ``page_addr``."""
    first = segs["first_sect"].astype(np.uint64)
    iov[sel, 0] = page_addr + (first << np.uint64(SECTOR_SHIFT))
    iov[sel, 1] = segment_lengths(segs)


class _Mapped(Acquired):
    def __init__(self, nsegs: int) -> None:
        super().__init__(nsegs)
        self.transient: list[GrantMapping] = []

    def release(self) -> None:
        for mapping in self.transient:
            mapping.unmap()
        self.transient.clear()


class GrantMapper:
    """Batched mapping: one map call for every new grant of a batch (per access mode),
    and with persistent grants a cache that keeps the frontend's pages mapped."""

    def __init__(self, platform: Platform, domid: int, persistent: bool,
                 max_persistent: int = MAX_PERSISTENT_GRANTS) -> None:
        self.platform = platform
        self.domid = domid
        self.persistent = persistent
        self.max_persistent = max_persistent
        # gref -> address of its mapped page, in C so the native ring loop reads it too
        self.table = PersistentGrantTable(max_persistent) if persistent else None
        self._cached_maps: list[GrantMapping] = []

    @property
    def persistent_grants(self) -> int:
        return self.table.count if self.table is not None else 0

    def persistent_grefs(self) -> list[int]:
        """The grefs kept mapped (what a successor maps before it takes over)."""
        return self.table.grefs() if self.table is not None else []

    def map_persistent(self, grefs: list[int]) -> None:
        """Map ``grefs`` now, as far as the cache has room (a successor's head start:
        its loop then serves the first requests without leaving C). A gref the guest no
        longer grants is skipped, as on first use."""
        assert self.table is not None
        wanted = [g for g in dict.fromkeys(grefs) if 0 <= g < 2**32]
        room = self.max_persistent - self.table.count
        if wanted and room > 0:
            self._map_persistent(wanted[:room])

    def acquire(self, segs: np.ndarray, owner: np.ndarray, to_guest: np.ndarray) -> Acquired:
        """Map the pages of ``segs`` (one row per segment, ``owner`` its request,
        ``to_guest`` whether data flows into the guest page)."""
        held = _Mapped(len(segs))
        need = np.ones(len(segs), dtype=bool)
        if self.persistent and len(segs):
            addr = self.cache_addresses(segs["gref"])
            cached = addr != 0
            _fill_iov(held.iov, cached, addr[cached], segs[cached])
            need = ~cached
        for direction in (True, False):
            sel = np.flatnonzero(need & (to_guest == direction))
            if len(sel):
                self._map_transient(segs, owner, sel, held, writable=direction)
        return held

    def cache_addresses(self, grefs: np.ndarray) -> np.ndarray:
        """Page address of each gref from the persistent cache (0 where it cannot be
        cached); new grants are mapped in one call while the cache has room."""
        assert self.table is not None
        addr = self.table.lookup(grefs)
        missing = addr == 0
        room = self.max_persistent - self.table.count
        if missing.any() and room > 0:
            self._map_persistent(np.unique(grefs[missing])[:room].tolist())
            addr = self.table.lookup(grefs)
        return addr

    def _map_persistent(self, grefs: list[int]) -> None:
        assert self.table is not None
        # Persistent grants are granted writable by the frontend (blkif.h note 7).
        try:
            mapping = self.platform.map_grants(self.domid, grefs, writable=True)
        except GrantError:
            # A bad gref poisons the batch; map one by one so the good ones still persist.
            for g in grefs:
                try:
                    single = self.platform.map_grants(self.domid, [g], writable=True)
                except GrantError:
                    continue
                self._cached_maps.append(single)
                self.table.put(g, single.address)
            return
        self._cached_maps.append(mapping)
        for page, g in enumerate(grefs):
            self.table.put(g, mapping.address + page * PAGE_SIZE)

    def _map_transient(self, segs: np.ndarray, owner: np.ndarray, sel: np.ndarray,
                       held: _Mapped, writable: bool) -> None:
        try:
            mapping = self.platform.map_grants(self.domid, segs["gref"][sel], writable=writable)
        except GrantError:
            owners = np.unique(owner[sel])
            if len(owners) > 1:  # isolate the request(s) carrying the bad grant
                for o in owners:
                    self._map_transient(segs, owner, sel[owner[sel] == o], held, writable)
            else:
                held.failed.add(int(owners[0]))
            return
        held.transient.append(mapping)
        pages = mapping.address + np.arange(len(sel), dtype=np.uint64) * np.uint64(PAGE_SIZE)
        _fill_iov(held.iov, sel, pages, segs[sel])

    def close(self) -> None:
        for mapping in self._cached_maps:
            mapping.unmap()
        self._cached_maps.clear()
        if self.table is not None:
            self.table.clear()


class _Copied(Acquired):
    def __init__(self, platform: Platform, segments: np.ndarray, owner: np.ndarray,
                 bounce: np.ndarray) -> None:
        super().__init__(len(segments))
        self._platform = platform
        self._segments = segments
        self._owner = owner
        self._bounce = bounce  # kept alive while the engine writes into it

    def finish(self, ok_reads: np.ndarray) -> set[int]:
        mask = np.isin(self._owner, ok_reads) & (self._segments["to_guest"] == 1)
        if not mask.any():
            return set()
        segs = self._segments[mask]
        self._platform.grant_copy(segs)
        return {int(i) for i in self._owner[mask][segs["status"] != GNTST_OKAY]}

    def release(self) -> None:
        self._bounce = np.empty(0, np.uint8)


class GrantCopier:
    """Grant copy (QEMU's and tapdisk3's choice): data moves through a local bounce buffer
    with one copy call per direction per batch; no guest page is ever mapped."""

    persistent = False
    persistent_grants = 0

    def __init__(self, platform: Platform, domid: int) -> None:
        self.platform = platform
        self.domid = domid

    def acquire(self, segs: np.ndarray, owner: np.ndarray, to_guest: np.ndarray) -> Acquired:
        lengths = segment_lengths(segs)
        bounce = np.empty(int(lengths.sum()), dtype=np.uint8)
        offsets = np.cumsum(lengths) - lengths
        segments = np.zeros(len(segs), dtype=COPY_SEGMENT_DTYPE)
        segments["local_addr"] = np.uint64(bounce.ctypes.data) + offsets
        segments["ref"] = segs["gref"]
        segments["domid"] = self.domid
        segments["offset"] = segs["first_sect"].astype(np.uint16) << SECTOR_SHIFT
        segments["length"] = lengths
        segments["to_guest"] = to_guest
        held = _Copied(self.platform, segments, owner, bounce)
        held.iov[:, 0] = segments["local_addr"]
        held.iov[:, 1] = lengths
        # WRITE data comes in before the I/O; READ data goes out in finish().
        inbound = ~to_guest
        if inbound.any():
            incoming = segments[inbound]
            self.platform.grant_copy(incoming)
            held.failed |= {int(i) for i in owner[inbound][incoming["status"] != GNTST_OKAY]}
        return held

    def close(self) -> None:
        pass


def _copy_descriptors(addresses: np.ndarray, count: int) -> np.ndarray:
    """Private copy of ``count`` descriptors spread over pages at ``addresses``."""
    raw = b"".join(ffi.buffer(ffi.cast("char *", int(a)), PAGE_SIZE) for a in addresses)
    return np.frombuffer(raw, dtype=SEGMENT_DTYPE, count=count).copy()


def fetch_indirect(
    platform: Platform, domid: int, grefs: dict[int, np.ndarray], counts: dict[int, int],
    mapper: GrantMapper | None = None,
) -> dict[int, np.ndarray | None]:
    """Copy the segment descriptors of indirect requests out of their indirect pages.

    With persistent grants the pages come from ``mapper``'s cache (as in Linux blkback);
    otherwise the pages of every indirect request of the batch are mapped read-only in one
    call and released at once. The descriptors are copied so the guest cannot change them
    under us. None marks a request whose pages were bad."""
    out: dict[int, np.ndarray | None] = {}
    if mapper is not None and mapper.persistent:
        for i in list(grefs):
            addresses = mapper.cache_addresses(grefs[i])
            if addresses.all():
                out[i] = _copy_descriptors(addresses, counts[i])
                del grefs[i]
    if not grefs:
        return out
    order = list(grefs)
    flat = np.concatenate([grefs[i] for i in order])
    try:
        mapping = platform.map_grants(domid, flat, writable=False)
    except GrantError:
        if len(order) == 1:
            out[order[0]] = None  # keep what the cache already fetched for the others
            return out
        for i in order:
            out.update(fetch_indirect(platform, domid, {i: grefs[i]}, {i: counts[i]}))
        return out
    with mapping:
        descs = np.frombuffer(mapping.buffer, dtype=SEGMENT_DTYPE)
        page = 0
        for i in order:
            start = page * SEGS_PER_INDIRECT_FRAME
            out[i] = descs[start : start + counts[i]].copy()
            page += len(grefs[i])
    return out
