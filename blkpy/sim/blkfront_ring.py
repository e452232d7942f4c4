"""One blkif ring as Linux xen-blkfront drives it: ring pages, event channel, grants,
shadow requests, request building and response checking (blkfront_ring_info).

The xenbus handshake lives in ``frontend.py``; this class only needs a guest (memory,
grant table, event channels), the backend's domid and, once connected, the negotiated
``DiskInfo``. Behaviour mirrors blkfront:

* request ids are shadow slots ``0..RING_SIZE-1``; a response whose id is out of range or
  not pending, or whose operation differs from the request's (INDIRECT: its indirect_op),
  is a protocol error that disables the ring;
* data pages come from a pool; with persistent grants each pool page keeps one writable
  grant for the life of the ring, otherwise every request grants its pages afresh and
  ends the grants on completion, and a grant the backend still has mapped is the protocol
  error "backend has not unmapped grant";
* requests of more than 11 segments go out as BLKIF_OP_INDIRECT with descriptor pages;
* EOPNOTSUPP on flush/barrier/discard turns that feature off, as blkfront does.

``submit_raw`` bypasses all of this for hostile-input tests.
"""

from __future__ import annotations

import dataclasses
import select
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from blkpy import ring as blkif
from blkpy.ring import Abi, FrontRing, RingOverflow, ring_size
from blkpy.sim.blkfront_negotiation import DiskInfo

PAGE_SIZE = blkif.PAGE_SIZE
SECTOR = 512
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR
_POOL_GROWTH = 64  # guest pages allocated at a time for the data page pool

OP_NAMES = {
    blkif.BLKIF_OP_READ: "read",
    blkif.BLKIF_OP_WRITE: "write",
    blkif.BLKIF_OP_WRITE_BARRIER: "barrier",
    blkif.BLKIF_OP_FLUSH_DISKCACHE: "flush",
    blkif.BLKIF_OP_DISCARD: "discard",
    blkif.BLKIF_OP_INDIRECT: "indirect",
}

# A buffer layout: per segment (first_sect, last_sect) inside its own guest page.
Layout = Sequence[tuple[int, int]]


class ProtocolError(Exception):
    """The backend broke the blkif protocol; blkfront would disable the disk."""


class RingBusy(Exception):
    """No free ring slot, shadow id or guest page for another request right now."""


def contiguous_layout(nbytes: int, first_sect: int = 0) -> list[tuple[int, int]]:
    """The segments of one buffer of ``nbytes`` starting ``first_sect`` sectors into a page
    (a buffer that does not start on a page boundary crosses pages)."""
    if nbytes <= 0 or nbytes % SECTOR or not 0 <= first_sect < SECTORS_PER_PAGE:
        raise ValueError(f"bad buffer: {nbytes} bytes at sector {first_sect} of a page")
    sectors = nbytes // SECTOR
    layout = []
    first = first_sect
    while sectors:
        n = min(SECTORS_PER_PAGE - first, sectors)
        layout.append((first, first + n - 1))
        sectors -= n
        first = 0
    return layout


def layout_bytes(layout: Layout) -> int:
    return sum((last - first + 1) * SECTOR for first, last in layout)


@dataclasses.dataclass
class Completion:
    """A finished request as the submitter sees it."""

    id: int
    op: int  # the request's operation (READ/WRITE/FLUSH/BARRIER/DISCARD; never INDIRECT)
    sector: int
    nbytes: int  # data bytes, or for a discard the discarded bytes
    status: int
    data: np.ndarray | None  # a READ's bytes when status is OKAY
    tag: Any = None
    indirect: bool = False


@dataclasses.dataclass
class _Shadow:
    """What blkfront remembers of a request in flight (its shadow entry)."""

    op: int
    response_op: int
    sector: int
    nbytes: int
    pages: list[tuple[int, int]]  # (frame, gref) of data pages, in segment order
    layout: Layout
    indirect_pages: list[tuple[int, int]]
    tag: Any
    indirect: bool


@dataclasses.dataclass
class RingStats:
    """Counters of one ring's life (frontend side)."""

    requests: Counter = dataclasses.field(default_factory=Counter)  # by op name
    indirect_requests: int = 0
    raw_requests: int = 0
    notifies: int = 0
    wakeups: int = 0
    grants_issued: int = 0
    grants_ended: int = 0
    disabled_features: list[str] = dataclasses.field(default_factory=list)


def _alloc_contiguous(guest: Any, n: int) -> list[int]:
    """``n`` consecutive guest frames (one ring buffer must be contiguous memory)."""
    spare: list[int] = []
    try:
        for _ in range(64):
            frames = sorted(int(f) for f in guest.alloc_pages(n))
            if frames == list(range(frames[0], frames[0] + n)):
                return frames
            spare.extend(frames)
        raise MemoryError(f"no {n} contiguous free guest pages")
    finally:
        _free(guest, spare)


def _free(guest: Any, frames: list[int]) -> None:
    """Free frames highest first: the guest hands freed frames back out in reverse order,
    so the next allocation gets them ascending (and contiguous if they were)."""
    if frames:
        guest.free_pages(sorted(frames, reverse=True))


class BlkfrontRing:
    """One ring + event channel of a simulated blkfront, ready once ``attach`` ran."""

    def __init__(
        self,
        guest: Any,
        backend_domid: int,
        abi: Abi,
        order: int,
        *,
        handle: int = 0,
        readonly_write_grants: bool = False,
    ) -> None:
        """Allocate and grant the 2**order ring pages and an unbound event channel."""
        self.guest = guest
        self.backend_domid = backend_domid
        self.abi = abi
        self.order = order
        self.size = ring_size(abi, order)
        self.handle = handle & 0xFFFF
        # Linux grants every page writable; this option exercises a backend's read-only
        # mapping of WRITE data (only without persistent grants).
        self.readonly_write_grants = readonly_write_grants
        self.stats = RingStats()
        self.info: DiskInfo | None = None
        self.failed: str | None = None

        npages = 1 << order
        self._ring_frames = _alloc_contiguous(guest, npages)
        f0 = self._ring_frames[0]
        mem = guest.memory
        self._mem = mem
        self.front = FrontRing(
            memoryview(mem[f0 * PAGE_SIZE : (f0 + npages) * PAGE_SIZE]), abi, npages
        )
        self.ring_refs = [
            guest.grant_access(f, backend_domid, readonly=False) for f in self._ring_frames
        ]
        self.port = guest.alloc_unbound_port(backend_domid)

        self._free_ids = list(range(self.size - 1, -1, -1))
        self._shadow: list[_Shadow | None] = [None] * self.size
        self._pool: list[tuple[int, int]] = []  # (frame, persistent gref or -1)
        self._all_frames: list[int] = []
        self._leaked_frames: list[int] = []
        self._raw_outstanding = 0
        self._disabled: set[int] = set()  # ops turned off after EOPNOTSUPP

    # ---- set-up and teardown -------------------------------------------------------

    @property
    def front_address(self) -> int:
        """Address of the shared ring (header first) in this process, for C code."""
        return self._mem.ctypes.data + self._ring_frames[0] * PAGE_SIZE

    @property
    def guest_grant_table_address(self) -> int:
        """Address of the guest's v1 grant table in this process, for C code that
        grants and revokes per request (the load generator)."""
        return int(self.guest.grant_table_address)

    @property
    def event_channel(self) -> int:
        return self.port.port

    def attach(self, info: DiskInfo) -> None:
        """Start the data path with the features negotiated at Connected."""
        self.info = info

    @property
    def persistent(self) -> bool:
        return bool(self.info and self.info.persistent)

    def close(self) -> list[str]:
        """Revoke every grant (call after the backend reached Closed) and free the pages.

        Returns the grants the backend still had mapped, as protocol error messages."""
        errors = []
        # Requests still in flight (the backend died or stopped answering) give their
        # pages back too, as blkif_free() does.
        owed = [p for sh in self._shadow if sh for p in sh.pages + sh.indirect_pages]
        self._shadow = [None] * self.size
        self._free_ids = list(range(self.size - 1, -1, -1))
        for frame, ref in self._pool + owed:
            if ref >= 0 and not self._end(ref):
                errors.append(f"backend has not unmapped grant {ref}")
                self._leaked_frames.append(frame)
        ring_released = True
        for ref in self.ring_refs:
            if not self._end(ref):
                errors.append(f"backend has not unmapped ring grant {ref}")
                ring_released = False
        self.port.close()
        leaked = set(self._leaked_frames)
        _free(self.guest, [f for f in self._all_frames if f not in leaked])
        if ring_released:
            _free(self.guest, self._ring_frames)
        self._pool = []
        self._all_frames = []
        return errors

    # ---- page pool -----------------------------------------------------------------

    def _end(self, ref: int) -> bool:
        ok = bool(self.guest.end_access(ref))
        if ok:
            self.stats.grants_ended += 1
        return ok

    def _take_pages(self, n: int, readonly: bool) -> list[tuple[int, int]]:
        """``n`` pool pages with grants; ``readonly``: the backend only reads them (the
        grant is read-only only with ``readonly_write_grants``; Linux grants writable)."""
        if n == 0:
            return []  # (a [-0:] slice would take the whole pool)
        while len(self._pool) < n:
            try:
                frames = [int(f) for f in self.guest.alloc_pages(_POOL_GROWTH)]
            except MemoryError as exc:  # the caller must wait for completions
                raise RingBusy("no free guest pages for request data") from exc
            self._all_frames.extend(frames)
            self._pool.extend((f, -1) for f in frames)
        taken = self._pool[-n:]
        del self._pool[-n:]
        out = []
        for frame, ref in taken:
            if ref < 0:
                # Persistent grants are always writable (the page may serve a read next).
                readonly = readonly and self.readonly_write_grants and not self.persistent
                ref = self.guest.grant_access(frame, self.backend_domid, readonly=readonly)
                self.stats.grants_issued += 1
            out.append((frame, ref))
        return out

    def _give_back(self, pages: list[tuple[int, int]]) -> str | None:
        """Return pages to the pool, ending their grants unless they are persistent."""
        error = None
        for frame, ref in pages:
            if self.persistent:
                self._pool.append((frame, ref))
            elif self._end(ref):
                self._pool.append((frame, -1))
            else:
                error = error or f"backend has not unmapped grant: {ref}"
                self._leaked_frames.append(frame)
        return error

    # ---- submitting ----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.size - len(self._free_ids)

    def can_submit(self) -> bool:
        return bool(self._free_ids) and self.front.free_slots() > 0 and not self.failed

    def supports(self, op: int) -> bool:
        """Whether the negotiated features (minus those turned off since) allow ``op``."""
        info = self.info
        if info is None or op in self._disabled:
            return False
        if op == blkif.BLKIF_OP_FLUSH_DISKCACHE:
            return info.flush
        if op == blkif.BLKIF_OP_WRITE_BARRIER:
            return info.barrier
        if op == blkif.BLKIF_OP_DISCARD:
            return info.discard
        return op in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE)

    def submit(
        self,
        op: int,
        sector: int,
        *,
        data: bytes | np.ndarray | None = None,
        nbytes: int = 0,
        layout: Layout | None = None,
        first_sect: int = 0,
        nr_sectors: int = 0,
        secure: bool = False,
        tag: Any = None,
    ) -> int:
        """Queue one request (not yet pushed); returns its id.

        READ: ``nbytes`` (or ``layout``); WRITE/FLUSH/BARRIER: ``data`` (optional for
        FLUSH/BARRIER). The buffer occupies guest pages as ``layout`` says, by default one
        contiguous buffer starting ``first_sect`` sectors into its first page. DISCARD:
        ``nr_sectors`` (512-byte units) and ``secure``. Raises RingBusy when full."""
        if self.failed:
            raise ProtocolError(self.failed)
        if self.info is None:
            raise RuntimeError("ring not attached to a connected backend")
        if self._raw_outstanding:
            raise RingBusy("raw requests in flight")
        if not self.can_submit():
            raise RingBusy("ring full")
        if op == blkif.BLKIF_OP_DISCARD:
            return self._submit_discard(sector, nr_sectors, secure, tag)
        payload = None
        if data is not None:
            payload = (
                np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
            )
            nbytes = len(payload)
        if layout is None:
            layout = contiguous_layout(nbytes, first_sect) if nbytes else []
        if payload is None and op == blkif.BLKIF_OP_READ:
            nbytes = layout_bytes(layout)
        elif layout_bytes(layout) != nbytes:
            raise ValueError("layout does not match the data length")
        req_id = self._free_ids[-1]
        rec, data_pages, ind_pages = self._build(op, sector, layout, req_id)
        if payload is not None:
            self._scatter(payload, data_pages, layout)
        self._free_ids.pop()
        indirect = bool(ind_pages)
        if indirect:
            self.stats.indirect_requests += 1
        self._shadow[req_id] = _Shadow(
            op, op, sector, nbytes, data_pages, list(layout), ind_pages, tag, indirect
        )
        self.front.put_requests(rec)
        self.stats.requests[OP_NAMES[op]] += 1
        return req_id

    def _build(
        self, op: int, sector: int, layout: Layout, req_id: int
    ) -> tuple[np.ndarray, list[tuple[int, int]], list[tuple[int, int]]]:
        """One request slot (as a 1-record array) for a READ/WRITE/FLUSH/BARRIER over
        ``layout``, with its data pages and indirect pages taken from the pool."""
        nseg = len(layout)
        if op in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE):
            if nseg == 0:
                raise ValueError("a read or write needs data")
        elif op in (blkif.BLKIF_OP_FLUSH_DISKCACHE, blkif.BLKIF_OP_WRITE_BARRIER):
            if nseg > blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST:
                raise ValueError("flush/barrier with data carries at most 11 segments")
        else:
            raise ValueError(f"op {op} is not built by submit(); use submit_raw")
        indirect = nseg > blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST
        if indirect and nseg > self.info.max_indirect_segments:
            raise ValueError(
                f"{nseg} segments: backend allows {self.info.max_segments} per request"
            )
        n_ind = -(-nseg // blkif.SEGS_PER_INDIRECT_FRAME) if indirect else 0
        pages = self._take_pages(nseg + n_ind, readonly=op != blkif.BLKIF_OP_READ)
        data_pages, ind_pages = pages[:nseg], pages[nseg:]

        segs = np.zeros(nseg, dtype=blkif.SEGMENT_DTYPE)
        segs["gref"] = [ref for _f, ref in data_pages]
        segs["first_sect"] = [f for f, _l in layout]
        segs["last_sect"] = [last for _f, last in layout]
        if indirect:
            rec = np.zeros(1, dtype=self.abi.indirect)
            rec["operation"] = blkif.BLKIF_OP_INDIRECT
            rec["indirect_op"] = op
            rec["nr_segments"] = nseg
            rec["handle"] = self.handle
            per_page = blkif.SEGS_PER_INDIRECT_FRAME
            for i, (frame, ref) in enumerate(ind_pages):
                chunk = segs[i * per_page : (i + 1) * per_page]
                page = self._mem[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE]
                page[: chunk.nbytes] = chunk.view(np.uint8)
                rec["indirect_grefs"][0, i] = ref
        else:
            rec = np.zeros(1, dtype=self.abi.request)
            rec["operation"] = op
            rec["nr_segments"] = nseg
            rec["handle"] = self.handle
            rec["seg"][0, :nseg] = segs
        rec["id"] = req_id
        rec["sector_number"] = sector
        return rec, data_pages, ind_pages

    def request_templates(
        self, op: int, nbytes: int, count: int
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """One ready slot for each request id below ``count`` (abi.raw records) for ``op`` over
        a page-aligned buffer of ``nbytes``, for a load generator that only fills in
        sector numbers; their pages stay taken until ``release_templates``. The pages of
        id i are ``held[i * per_id : (i + 1) * per_id]`` (data pages, then indirect
        pages); without persistent grants the generator must grant and revoke them per
        request itself. Needs an idle ring."""
        if self.in_flight:
            raise RingBusy("the frontend's own requests are in flight")
        layout = contiguous_layout(nbytes)
        if not 0 < count <= self.size:
            raise ValueError(f"{count} templates for a ring of {self.size}")
        templates = np.zeros(count, dtype=self.abi.raw)
        held: list[tuple[int, int]] = []
        try:
            for req_id in range(count):
                rec, data_pages, ind_pages = self._build(op, 0, layout, req_id)
                held += data_pages + ind_pages
                templates[req_id] = rec.view(self.abi.raw)[0]
        except BaseException:
            self._give_back(held)
            raise
        return templates, held

    def release_templates(self, held: list[tuple[int, int]]) -> None:
        self._give_back(held)

    def _submit_discard(self, sector: int, nr_sectors: int, secure: bool, tag: Any) -> int:
        req_id = self._free_ids.pop()
        rec = np.zeros(1, dtype=self.abi.discard)
        rec["operation"] = blkif.BLKIF_OP_DISCARD
        rec["flag"] = blkif.BLKIF_DISCARD_SECURE if secure else 0
        rec["handle"] = self.handle
        rec["id"] = req_id
        rec["sector_number"] = sector
        rec["nr_sectors"] = nr_sectors
        op = blkif.BLKIF_OP_DISCARD
        self._shadow[req_id] = _Shadow(op, op, sector, nr_sectors * SECTOR, [], [], [], tag, False)
        self.front.put_requests(rec)
        self.stats.requests["discard"] += 1
        return req_id

    def _scatter(self, payload: np.ndarray, pages: list[tuple[int, int]], layout: Layout) -> None:
        pos = 0
        mem = self._mem
        for (frame, _ref), (first, last) in zip(pages, layout, strict=True):
            n = (last - first + 1) * SECTOR
            start = frame * PAGE_SIZE + first * SECTOR
            mem[start : start + n] = payload[pos : pos + n]
            pos += n

    def _gather(self, shadow: _Shadow) -> np.ndarray:
        out = np.empty(shadow.nbytes, dtype=np.uint8)
        pos = 0
        mem = self._mem
        for (frame, _ref), (first, last) in zip(shadow.pages, shadow.layout, strict=True):
            n = (last - first + 1) * SECTOR
            start = frame * PAGE_SIZE + first * SECTOR
            out[pos : pos + n] = mem[start : start + n]
            pos += n
        return out

    def push(self) -> None:
        """Publish queued requests and kick the backend if ring.h's rule says so."""
        if self.front.push_requests():
            self.port.notify()
            self.stats.notifies += 1

    # ---- completing ----------------------------------------------------------------

    def _fail(self, message: str) -> ProtocolError:
        self.failed = self.failed or message
        return ProtocolError(message)

    def _wait_event(self, timeout: float) -> None:
        ready, _, _ = select.select([self.port], [], [], max(timeout, 0.0))
        if ready:
            self.port.ack()
            self.stats.wakeups += 1

    def _consume(self) -> np.ndarray:
        """Every response available now, with blkif_interrupt's final check."""
        batches = []
        while True:
            try:
                batches.append(self.front.consume_responses())
            except RingOverflow as exc:
                raise self._fail(f"illegal number of responses: {exc}") from exc
            if not self.front.final_check_for_responses():
                break
        return self._join(batches)

    def _join(self, batches: list[np.ndarray]) -> np.ndarray:
        """One abi.response array (np.concatenate would pack the padded dtype)."""
        if len(batches) == 1:
            return batches[0]
        if not batches:
            return np.zeros(0, dtype=self.abi.response)
        return np.concatenate([b.view(self.abi.raw) for b in batches]).view(self.abi.response)

    def poll(self, timeout: float = 0.0) -> list[Completion]:
        """Completions available now, or the first ones to arrive within ``timeout``."""
        if self.failed:
            raise ProtocolError(self.failed)
        deadline = time.monotonic() + timeout
        while True:
            rsps = self._consume()
            if len(rsps):
                return self._complete(rsps)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.in_flight == 0:
                return []
            self._wait_event(remaining)

    def _complete(self, rsps: np.ndarray) -> list[Completion]:
        done = []
        error = None
        for rsp in rsps:
            rid, rop, status = int(rsp["id"]), int(rsp["operation"]), int(rsp["status"])
            if rid >= self.size:
                error = error or f"response has incorrect id ({rid})"
                continue
            shadow = self._shadow[rid]
            if shadow is None:
                error = error or f"response references no pending request (id {rid})"
                continue
            if rop != shadow.response_op:
                error = error or (
                    f"response has wrong operation ({rop} instead of {shadow.response_op})"
                )
                continue
            self._shadow[rid] = None
            data = None
            if status == blkif.BLKIF_RSP_OKAY and shadow.op == blkif.BLKIF_OP_READ:
                data = self._gather(shadow)
            self._react_to_status(shadow, status)
            unmapped = self._give_back(shadow.pages + shadow.indirect_pages)
            self._free_ids.append(rid)
            if unmapped:
                error = error or unmapped
                continue
            done.append(
                Completion(
                    rid,
                    shadow.op,
                    shadow.sector,
                    shadow.nbytes,
                    status,
                    data,
                    shadow.tag,
                    shadow.indirect,
                )
            )
        if error:
            raise self._fail(error)
        return done

    def _react_to_status(self, shadow: _Shadow, status: int) -> None:
        """blkfront turns flush/barrier or discard off when the backend refuses them."""
        op = shadow.op
        flushy = op in (blkif.BLKIF_OP_FLUSH_DISKCACHE, blkif.BLKIF_OP_WRITE_BARRIER)
        refused = status == blkif.BLKIF_RSP_EOPNOTSUPP or (
            status == blkif.BLKIF_RSP_ERROR and flushy and not shadow.pages
        )
        if refused and (flushy or op == blkif.BLKIF_OP_DISCARD) and op not in self._disabled:
            self._disabled.add(op)
            self.stats.disabled_features.append(OP_NAMES[op])

    def wait_all(self, timeout: float) -> list[Completion]:
        """Collect completions until nothing is in flight; ProtocolError on timeout."""
        deadline = time.monotonic() + timeout
        done: list[Completion] = []
        while self.in_flight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"backend did not answer {self.in_flight} requests in {timeout}s")
            done.extend(self.poll(remaining))
        return done

    # ---- hostile-input access ------------------------------------------------------

    def grant_pages(self, n: int, *, readonly: bool = False) -> list[tuple[int, int]]:
        """(frame, gref) of ``n`` fresh guest pages granted to the backend, for building
        raw requests; give them back with ``release_pages``."""
        frames = [int(f) for f in self.guest.alloc_pages(n)]
        refs = [self.guest.grant_access(f, self.backend_domid, readonly=readonly) for f in frames]
        return list(zip(frames, refs, strict=True))

    def release_pages(self, pages: list[tuple[int, int]]) -> bool:
        """End the grants and free the pages; False if the backend still maps one."""
        ok = all([self._end(ref) for _f, ref in pages])
        if ok:
            _free(self.guest, [f for f, _r in pages])
        return ok

    def submit_raw(
        self, slots: np.ndarray | bytes, *, timeout: float = 5.0, notify: bool = True
    ) -> np.ndarray:
        """Put arbitrary request slots on the ring, push, and return the responses
        (abi.response records, in arrival order) that arrive within ``timeout``.

        ``slots`` are records of any dtype whose itemsize is the ABI's slot size (e.g.
        abi.request with any field values), or raw bytes of whole slots. The frontend's own
        checks are bypassed; its own requests must not be in flight. Responses are not
        validated: the test judges them. Missing responses leave the ring busy until they
        arrive (``collect_raw``)."""
        if self.in_flight:
            raise RingBusy("the frontend's own requests are in flight")
        if isinstance(slots, bytes | bytearray | memoryview):
            slots = np.frombuffer(bytes(slots), dtype=self.abi.raw)
        if len(slots) > self.front.free_slots():
            raise RingBusy(f"{len(slots)} slots for {self.front.free_slots()} free")
        self.front.put_requests(slots)
        self._raw_outstanding += len(slots)
        self.stats.raw_requests += len(slots)
        if notify:
            self.push()
        return self.collect_raw(timeout)

    def force_req_prod(self, value: int, *, notify: bool = True) -> None:
        """Publish an arbitrary shared req_prod (e.g. more requests than the ring holds,
        which a backend must treat as a broken frontend). The ring is unusable after."""
        f0 = self._ring_frames[0] * PAGE_SIZE
        self._mem[f0 : f0 + 4].view("<u4")[0] = value & 0xFFFFFFFF
        self.failed = self.failed or f"req_prod forced to {value}"
        if notify:
            self.port.notify()

    def collect_raw(self, timeout: float) -> np.ndarray:
        """Responses to raw requests that arrive within ``timeout`` (see submit_raw)."""
        deadline = time.monotonic() + timeout
        got = []
        while self._raw_outstanding:
            try:
                rsps = self.front.consume_responses()
            except RingOverflow as exc:
                raise self._fail(f"illegal number of responses: {exc}") from exc
            if len(rsps):
                got.append(rsps)
                self._raw_outstanding -= len(rsps)
                continue
            if self.front.final_check_for_responses():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wait_event(remaining)
        return self._join(got)
