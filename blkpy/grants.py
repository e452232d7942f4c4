"""Getting at the guest's data pages: batched grant mapping (with a persistent-grant cache)
or grant copy through a bounce buffer.

Both strategies take every data segment of a batch at once and turn it into local
(address, length) iovecs for the I/O engine. A grant failure fails only the requests that
used the bad grant: a failed batch map is retried request by request to isolate them
(gntdev fails the whole mmap), and grant copy reports a status per segment.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import numpy as np

from blkpy.gntdev.native import ffi
from blkpy.platform import COPY_SEGMENT_DTYPE, GNTST_OKAY, GrantError, GrantMapping, Platform
from blkpy.ring import PAGE_SIZE, SECTOR_SHIFT, SEGMENT_DTYPE, SEGS_PER_INDIRECT_FRAME

#: Linux blkback's default cap on persistent grants per ring (max_persistent_grants).
MAX_PERSISTENT_GRANTS = 1056


@dataclasses.dataclass
class PageRequest:
    """The data segments of one request: ``index`` is the request's position in the batch."""

    index: int
    to_guest: bool  # a READ: data flows from the disk into the guest's pages
    segs: np.ndarray  # SEGMENT_DTYPE records, all already validated


class Acquired(abc.ABC):
    """Data pages of a batch, held until release()."""

    def __init__(self) -> None:
        self.iov: dict[int, np.ndarray] = {}  # request index -> (k, 2) uint64 addr/len
        self.failed: set[int] = set()

    def finish(self, ok_reads: Sequence[int]) -> set[int]:
        """After I/O: deliver READ data to the guest where needed; returns requests whose
        delivery failed."""
        return set()

    @abc.abstractmethod
    def release(self) -> None:
        """Drop transient mappings (must happen before the responses are pushed)."""


def _segment_iov(base: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """iovec rows for segments whose pages start at the addresses in ``base``."""
    first = segs["first_sect"].astype(np.uint64)
    last = segs["last_sect"].astype(np.uint64)
    iov = np.empty((len(segs), 2), dtype=np.uint64)
    iov[:, 0] = base + (first << np.uint64(SECTOR_SHIFT))
    iov[:, 1] = (last - first + np.uint64(1)) << np.uint64(SECTOR_SHIFT)
    return iov


class _Mapped(Acquired):
    def __init__(self) -> None:
        super().__init__()
        self.transient: list[GrantMapping] = []

    def release(self) -> None:
        for mapping in self.transient:
            mapping.unmap()
        self.transient.clear()


class GrantMapper:
    """Batched mapping: one map call for every new grant of a batch (per access mode),
    and with persistent grants a cache that keeps the frontend's pages mapped."""

    def __init__(self, platform: Platform, domid: int, persistent: bool) -> None:
        self.platform = platform
        self.domid = domid
        self.persistent = persistent
        self._cache: dict[int, tuple[GrantMapping, int]] = {}
        self._cached_maps: list[GrantMapping] = []

    @property
    def persistent_grants(self) -> int:
        return len(self._cache)

    def acquire(self, reqs: Sequence[PageRequest]) -> Acquired:
        held = _Mapped()
        if self.persistent:
            reqs = self._from_cache(reqs, held)
        for to_guest in (True, False):
            group = [r for r in reqs if r.to_guest == to_guest]
            if group:
                self._map_transient(group, held, writable=to_guest)
        return held

    def cache_pages(self, grefs: np.ndarray) -> np.ndarray | None:
        """Addresses of persistently mapped pages for ``grefs``, mapping new ones while
        the cache has room; None if any of them cannot be served from the cache."""
        new = sorted({int(g) for g in grefs} - self._cache.keys())
        room = MAX_PERSISTENT_GRANTS - len(self._cache)
        if new and room > 0:
            self._map_persistent(new[:room])
        try:
            entries = [self._cache[int(g)] for g in grefs]
        except KeyError:
            return None
        return np.array([m.address + page * PAGE_SIZE for m, page in entries], np.uint64)

    def _from_cache(self, reqs: Sequence[PageRequest], held: _Mapped) -> list[PageRequest]:
        """Serve what the cache has (one map call for the batch's new grants); returns
        the requests left for transient mapping."""
        self.cache_pages(np.concatenate([r.segs["gref"] for r in reqs]) if reqs
                         else np.zeros(0, np.uint32))
        rest = []
        for r in reqs:
            base = self.cache_pages(r.segs["gref"])
            if base is None:
                rest.append(r)
            else:
                held.iov[r.index] = _segment_iov(base, r.segs)
        return rest

    def _map_persistent(self, grefs: list[int]) -> None:
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
                self._cache[g] = (single, 0)
            return
        self._cached_maps.append(mapping)
        for page, g in enumerate(grefs):
            self._cache[g] = (mapping, page)

    def _map_transient(self, group: list[PageRequest], held: _Mapped, writable: bool) -> None:
        grefs = np.concatenate([r.segs["gref"] for r in group])
        try:
            mapping = self.platform.map_grants(self.domid, grefs, writable=writable)
        except GrantError:
            if len(group) > 1:  # isolate the request(s) carrying the bad grant
                for r in group:
                    self._map_transient([r], held, writable)
            else:
                held.failed.add(group[0].index)
            return
        held.transient.append(mapping)
        page = 0
        for r in group:
            n = len(r.segs)
            base = mapping.address + (np.arange(page, page + n, dtype=np.uint64) * PAGE_SIZE)
            held.iov[r.index] = _segment_iov(base, r.segs)
            page += n

    def close(self) -> None:
        for mapping in self._cached_maps:
            mapping.unmap()
        self._cached_maps.clear()
        self._cache.clear()


class _Copied(Acquired):
    def __init__(self, platform: Platform, segments: np.ndarray, owner: np.ndarray,
                 bounce: np.ndarray) -> None:
        super().__init__()
        self._platform = platform
        self._segments = segments
        self._owner = owner  # request index of each copy segment
        self._bounce = bounce  # kept alive while the engine writes into it

    def finish(self, ok_reads: Sequence[int]) -> set[int]:
        if not ok_reads:
            return set()
        mask = np.isin(self._owner, np.asarray(ok_reads)) & (self._segments["to_guest"] == 1)
        segs = self._segments[mask]
        if not len(segs):
            return set()
        self._platform.grant_copy(segs)
        return {int(i) for i in self._owner[mask][segs["status"] != GNTST_OKAY]}

    def release(self) -> None:
        self._bounce = np.empty(0, np.uint8)


class GrantCopier:
    """Grant copy (QEMU's and tapdisk3's choice): data moves through a local bounce buffer
    with one copy call per direction per batch; no guest page is ever mapped."""

    def __init__(self, platform: Platform, domid: int) -> None:
        self.platform = platform
        self.domid = domid
        self.persistent = False
        self.persistent_grants = 0

    def acquire(self, reqs: Sequence[PageRequest]) -> Acquired:
        total = sum(len(r.segs) for r in reqs)
        segments = np.zeros(total, dtype=COPY_SEGMENT_DTYPE)
        owner = np.empty(total, dtype=np.int64)
        lengths = np.concatenate([
            ((r.segs["last_sect"].astype(np.int64) - r.segs["first_sect"] + 1) << SECTOR_SHIFT)
            for r in reqs
        ]) if reqs else np.zeros(0, np.int64)
        bounce = np.empty(int(lengths.sum()), dtype=np.uint8)
        base = bounce.ctypes.data
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])) if total else lengths
        k = 0
        for r in reqs:
            n = len(r.segs)
            sl = slice(k, k + n)
            segments["local_addr"][sl] = base + offsets[sl]
            segments["ref"][sl] = r.segs["gref"]
            segments["domid"][sl] = self.domid
            segments["offset"][sl] = r.segs["first_sect"].astype(np.uint16) << SECTOR_SHIFT
            segments["length"][sl] = lengths[sl]
            segments["to_guest"][sl] = 1 if r.to_guest else 0
            owner[sl] = r.index
            k += n
        held = _Copied(self.platform, segments, owner, bounce)
        # WRITE data comes in before the I/O; READ data goes out in finish().
        inbound = segments["to_guest"] == 0
        if inbound.any():
            incoming = segments[inbound]
            self.platform.grant_copy(incoming)
            segments["status"][inbound] = incoming["status"]
            held.failed |= {int(i) for i in owner[inbound][incoming["status"] != GNTST_OKAY]}
        k = 0
        for r in reqs:
            n = len(r.segs)
            iov = np.empty((n, 2), dtype=np.uint64)
            iov[:, 0] = segments["local_addr"][k : k + n]
            iov[:, 1] = lengths[k : k + n]
            held.iov[r.index] = iov
            k += n
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
            addresses = mapper.cache_pages(grefs[i])
            if addresses is not None:
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
            return {order[0]: None}
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
