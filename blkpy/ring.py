"""The blkif shared ring as numpy structured arrays (sans-IO).

A ring is a run of 2**order 4 KiB pages: a 64-byte header (req_prod, req_event, rsp_prod,
rsp_event) and then fixed-size slots. Requests and responses share the slots (a union), so
every slot dtype here has ``itemsize == abi.entry_size`` and one copied batch can be viewed
as a plain, discard or indirect request without copying again.

The rules follow Xen's ring.h (spec blkif.md §6-7): indices are free-running uint32, the
backend copies slots before parsing them (the guest may rewrite a slot concurrently),
``req_prod - rsp_prod_pvt > RING_SIZE`` marks a broken frontend, and notifications follow
the req_event/rsp_event hold-off. Index loads/stores and fences go through the native
helper so the ordering holds on weakly ordered CPUs too.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from blkpy.gntdev.native import ffi, lib
from blkpy.journal import Recovery, RingJournal

PAGE_SIZE = 4096
SRING_HEADER_SIZE = 64
MAX_RING_PAGE_ORDER = 4
_IDX_MASK = 0xFFFFFFFF

# Operations (blkif.md §1).
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_RSP_OKAY = 0
BLKIF_RSP_ERROR = -1
BLKIF_RSP_EOPNOTSUPP = -2

BLKIF_DISCARD_SECURE = 0x01
BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SECTOR_SHIFT = 9
SECTORS_PER_PAGE = PAGE_SIZE >> SECTOR_SHIFT

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

SEGMENT_DTYPE = np.dtype(
    {
        "names": ["gref", "first_sect", "last_sect"],
        "formats": ["<u4", "u1", "u1"],
        "offsets": [0, 4, 5],
        "itemsize": 8,
    }
)
SEGS_PER_INDIRECT_FRAME = PAGE_SIZE // SEGMENT_DTYPE.itemsize

RESPONSE_FIELDS = ("id", "operation", "status")


class RingOverflow(Exception):
    """The other end published an index that cannot be true: the ring is broken."""


@dataclasses.dataclass(frozen=True)
class Abi:
    """One guest ABI's slot layouts (x86_64 and ARM align uint64 to 8, x86_32 to 4)."""

    name: str
    entry_size: int
    request: np.dtype
    discard: np.dtype
    indirect: np.dtype
    response: np.dtype

    @property
    def raw(self) -> np.dtype:
        """An opaque slot, for copying whole slots."""
        return np.dtype((np.void, self.entry_size))


def _struct(itemsize: int, **fields: tuple[object, int]) -> np.dtype:
    return np.dtype(
        {
            "names": list(fields),
            "formats": [f[0] for f in fields.values()],
            "offsets": [f[1] for f in fields.values()],
            "itemsize": itemsize,
        }
    )


def _make_abi(name: str, u64_align: int) -> Abi:
    # Offsets of the fields after the 4 leading bytes shift by the uint64 alignment
    # (blkif.md §3): id sits at 8 on x86_64/arm and at 4 on x86_32.
    id_off = 8 if u64_align == 8 else 4
    sector_off = id_off + 8
    after = sector_off + 8
    entry = after + BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT_DTYPE.itemsize
    entry = max(entry, 16 if u64_align == 8 else 12)
    request = _struct(
        entry,
        operation=("u1", 0),
        nr_segments=("u1", 1),
        handle=("<u2", 2),
        id=("<u8", id_off),
        sector_number=("<u8", sector_off),
        seg=((SEGMENT_DTYPE, BLKIF_MAX_SEGMENTS_PER_REQUEST), after),
    )
    discard = _struct(
        entry,
        operation=("u1", 0),
        flag=("u1", 1),
        handle=("<u2", 2),
        id=("<u8", id_off),
        sector_number=("<u8", sector_off),
        nr_sectors=("<u8", after),
    )
    indirect = _struct(
        entry,
        operation=("u1", 0),
        indirect_op=("u1", 1),
        nr_segments=("<u2", 2),
        id=("<u8", id_off),
        sector_number=("<u8", sector_off),
        handle=("<u2", after),
        indirect_grefs=(("<u4", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST), after + 4),
    )
    response = _struct(entry, id=("<u8", 0), operation=("u1", 8), status=("<i2", 10))
    return Abi(name, entry, request, discard, indirect, response)


ABIS: dict[str, Abi] = {
    "x86_64-abi": _make_abi("x86_64-abi", 8),
    "x86_32-abi": _make_abi("x86_32-abi", 4),
    "arm-abi": _make_abi("arm-abi", 8),
}
# Linux blkback (and tapdisk) assume x86_32 when an x86 frontend writes no "protocol"
# node: only old 32-bit PV guests omit it (blkif.md §3.6).
DEFAULT_PROTOCOL = "x86_32-abi"


def slot_layout(abi: Abi) -> object:
    """The ABI's request layout as the native ring loop reads it (struct blkpy_slot_layout)."""
    layout = ffi.new("struct blkpy_slot_layout *")
    layout.entry_size = abi.entry_size
    layout.id_off = abi.request.fields["id"][1]
    layout.sector_off = abi.request.fields["sector_number"][1]
    layout.seg_off = abi.request.fields["seg"][1]
    return layout


def ring_size(abi: Abi, order: int) -> int:
    """Slots in a ring of 2**order pages: the largest power of two that fits (ring.h)."""
    if not 0 <= order <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"ring-page-order {order} outside 0..{MAX_RING_PAGE_ORDER}")
    fit = (PAGE_SIZE * (1 << order) - SRING_HEADER_SIZE) // abi.entry_size
    return 1 << (fit.bit_length() - 1)


def concat_slots(abi: Abi, parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate slot records of any of the ABI's layouts byte for byte (numpy's own
    concatenate repacks structured dtypes and would lose bytes hidden in padding)."""
    raw = np.concatenate([np.ascontiguousarray(p).view(abi.raw) for p in parts])
    return raw.view(abi.request)


def segments_bytes(segs: np.ndarray) -> np.ndarray:
    """Bytes covered by each segment (first/last_sect inclusive, 512-byte units)."""
    return (segs["last_sect"].astype(np.int64) - segs["first_sect"] + 1) << SECTOR_SHIFT


class _SharedRing:
    """Common plumbing: the header words and slot views over a mapped ring buffer."""

    _REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 4, 8, 12

    def __init__(self, buf: memoryview, abi: Abi, nr_pages: int) -> None:
        if nr_pages not in (1, 2, 4, 8, 16):
            raise ValueError(f"ring of {nr_pages} pages: must be a power of two up to 16")
        if len(buf) < nr_pages * PAGE_SIZE:
            raise ValueError("ring buffer smaller than its pages")
        self.abi = abi
        self.nr_pages = nr_pages
        self.size = ring_size(abi, nr_pages.bit_length() - 1)
        self._mask = self.size - 1
        self._bytes = np.frombuffer(buf, dtype=np.uint8, count=nr_pages * PAGE_SIZE)
        self._keepalive = buf
        base = self._bytes.ctypes.data
        self._hdr = [ffi.cast("void *", base + off) for off in range(0, 16, 4)]
        self._slots_raw = np.frombuffer(
            buf, dtype=abi.raw, count=self.size, offset=SRING_HEADER_SIZE
        )

    def _load(self, which: int) -> int:
        return lib.blkpy_load32(self._hdr[which // 4])

    def _store(self, which: int, value: int) -> None:
        lib.blkpy_store32(self._hdr[which // 4], value & _IDX_MASK)

    def _copy_out(self, start: int, n: int) -> np.ndarray:
        """Private copy of n slots from free-running index ``start`` (handles wrap)."""
        first = start & self._mask
        if first + n <= self.size:
            return self._slots_raw[first : first + n].copy()
        split = self.size - first
        return np.concatenate((self._slots_raw[first:], self._slots_raw[: n - split]))

    def _indices(self, start: int, n: int) -> np.ndarray:
        return (start + np.arange(n, dtype=np.int64)) & self._mask

    def _publish(self, prod: int, event: int, new: int) -> bool:
        """RING_PUSH_*_AND_CHECK_NOTIFY: make slots visible, then the producer index, then
        notify iff the other side's event index lies in the window (old, new]."""
        old = self._load(prod)
        if old == new:
            return False
        lib.blkpy_wmb()
        self._store(prod, new)
        lib.blkpy_mb()
        return ((new - self._load(event)) & _IDX_MASK) < ((new - old) & _IDX_MASK)

    # Header accessors, mostly for tests and diagnostics.
    @property
    def req_prod(self) -> int:
        return self._load(self._REQ_PROD)

    @property
    def rsp_prod(self) -> int:
        return self._load(self._RSP_PROD)

    @property
    def req_event(self) -> int:
        return self._load(self._REQ_EVENT)

    @property
    def rsp_event(self) -> int:
        return self._load(self._RSP_EVENT)


class BackRing(_SharedRing):
    """The backend's end: consume requests, produce responses.

    The private indices live in a C ``struct blkpy_back_ring`` (``native``) so that the
    native ring loop (blkpy/gntdev/ringloop.c) and this class consume the same ring."""

    def __init__(self, buf: memoryview, abi: Abi, nr_pages: int,
                 journal: RingJournal | None = None, resume: bool = False) -> None:
        super().__init__(buf, abi, nr_pages)
        self.native = ffi.new("struct blkpy_back_ring *")
        self.native.sring = ffi.cast("uint8_t *", self._bytes.ctypes.data)
        self.native.size = self.size
        self.native.entry_size = abi.entry_size
        self.journal = journal
        #: requests a dead predecessor consumed and never answered: serve them first
        self.replay: Recovery | None = None
        #: the journal entries of the requests the last ``consume`` returned
        self.consumed_entries = np.zeros(0, dtype=np.int64)
        if resume:
            if journal is None:
                raise ValueError("resuming a ring needs its journal")
            # Take over where the journal says, not at rsp_prod: responses may be written
            # but unpublished, and requests consumed but unanswered.
            self.replay = journal.recover()
            self.rsp_prod_pvt = self.replay.rsp_prod_pvt
            self.req_cons = self.replay.req_cons
        else:
            # BACK_RING_ATTACH: start where the shared response index is (0 on a fresh ring).
            self.rsp_prod_pvt = self._load(self._RSP_PROD)
            self.req_cons = self.rsp_prod_pvt
            if journal is not None:
                journal.start(self.rsp_prod_pvt)
        if journal is not None:
            self.native.journal = journal.native
        req_prod = self._load(self._REQ_PROD)
        if (req_prod - self.rsp_prod_pvt) & _IDX_MASK > self.size:
            self.native.journal = ffi.NULL
            raise RingOverflow(
                f"frontend claims {(req_prod - self.rsp_prod_pvt) & _IDX_MASK} requests "
                f"on a ring of {self.size} at attach"
            )
        self._rsp_view = np.frombuffer(
            buf, dtype=abi.response, count=self.size, offset=SRING_HEADER_SIZE
        )

    @property
    def req_cons(self) -> int:
        return int(self.native.req_cons)

    @req_cons.setter
    def req_cons(self, value: int) -> None:
        self.native.req_cons = value & _IDX_MASK

    @property
    def rsp_prod_pvt(self) -> int:
        return int(self.native.rsp_prod_pvt)

    @rsp_prod_pvt.setter
    def rsp_prod_pvt(self, value: int) -> None:
        self.native.rsp_prod_pvt = value & _IDX_MASK

    def _unconsumed(self, req_prod: int) -> int:
        # XEN_RING_NR_UNCONSUMED_REQUESTS: bounded by the free response slots too.
        pending = (req_prod - self.req_cons) & _IDX_MASK
        room = self.size - ((self.req_cons - self.rsp_prod_pvt) & _IDX_MASK)
        return min(pending, room)

    def consume(self, limit: int | None = None) -> np.ndarray:
        """Copy every new request slot (at most ``limit``) and advance req_cons.

        Returns an array of ``abi.request`` records (view as abi.discard/abi.indirect as
        needed). Raises RingOverflow if the frontend's req_prod is impossible; the caller
        must then stop using the ring."""
        req_prod = self._load(self._REQ_PROD)  # acquire load: the rmb of ring.h
        if (req_prod - self.rsp_prod_pvt) & _IDX_MASK > self.size:
            raise RingOverflow(
                f"frontend req_prod {req_prod} is {(req_prod - self.rsp_prod_pvt) & _IDX_MASK}"
                f" ahead of rsp_prod {self.rsp_prod_pvt} on a ring of {self.size}"
            )
        n = self._unconsumed(req_prod)
        if limit is not None:
            n = min(n, limit)
        first = self.req_cons
        batch = self._copy_out(first, n)
        if self.journal is not None and n:
            self.consumed_entries = self.journal.consumed(first, batch)
        else:
            self.consumed_entries = np.full(n, -1, dtype=np.int64)
        self.req_cons = (first + n) & _IDX_MASK
        if n:
            lib.blkpy_crash_point(0)
        return batch.view(self.abi.request)

    def has_unconsumed_count(self) -> int:
        """How many requests wait at req_cons (bounded by the free response slots)."""
        req_prod = self._load(self._REQ_PROD)
        if (req_prod - self.rsp_prod_pvt) & _IDX_MASK > self.size:
            return 0
        return self._unconsumed(req_prod)

    def peek(self, n: int) -> np.ndarray:
        """Copies of the next ``n`` request slots without consuming them."""
        return self._copy_out(self.req_cons, n)

    def has_unconsumed(self) -> bool:
        """Requests are waiting (a cheap peek, no re-arming of req_event)."""
        return self._unconsumed(self._load(self._REQ_PROD)) > 0

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if requests are waiting; otherwise arm
        req_event so the frontend notifies us for the next one, and check once more."""
        if self._unconsumed(self._load(self._REQ_PROD)):
            return True
        self._store(self._REQ_EVENT, self.req_cons + 1)
        lib.blkpy_mb()
        return self._unconsumed(self._load(self._REQ_PROD)) > 0

    @property
    def in_flight(self) -> int:
        """Requests consumed but not yet answered."""
        return (self.req_cons - self.rsp_prod_pvt) & _IDX_MASK

    def produce(self, ids: np.ndarray, operations: np.ndarray, statuses: np.ndarray,
                indices: np.ndarray | None = None) -> None:
        """Fill the next len(ids) response slots (private until push_responses).
        ``indices``: the journal entries of the requests answered (``consumed_entries``
        when they were consumed; -1 without a journal)."""
        n = len(ids)
        if n == 0:
            return
        if n > self.in_flight:
            raise ValueError(f"{n} responses for {self.in_flight} requests in flight")
        first = self.rsp_prod_pvt
        if self.journal is not None:
            if indices is None or len(indices) != n or (indices < 0).any():
                raise ValueError("a journalled ring needs the entries of the requests answered")
            self.journal.answering(indices, first)
        idx = self._indices(first, n)
        view = self._rsp_view
        # Three field writes, never a whole-struct copy (an x86_32 slot is 12 bytes).
        view["id"][idx] = ids
        view["operation"][idx] = operations
        view["status"][idx] = statuses
        self.rsp_prod_pvt = (first + n) & _IDX_MASK
        if self.journal is not None:
            self.journal.answered(indices, self.rsp_prod_pvt)  # type: ignore[arg-type]
        lib.blkpy_crash_point(3)

    def push_responses(self) -> bool:
        """Publish produced responses; True if the frontend must be notified."""
        notify = self._publish(self._RSP_PROD, self._RSP_EVENT, self.rsp_prod_pvt)
        lib.blkpy_crash_point(4)
        return notify


class FrontRing(_SharedRing):
    """The frontend's end (used by the simulated guest): produce requests, consume
    responses. Initialises the shared header, as only the frontend may."""

    def __init__(self, buf: memoryview, abi: Abi, nr_pages: int, init: bool = True) -> None:
        super().__init__(buf, abi, nr_pages)
        if init:
            self._bytes[:SRING_HEADER_SIZE] = 0
            self._store(self._REQ_EVENT, 1)
            self._store(self._RSP_EVENT, 1)
        self.req_prod_pvt = self._load(self._REQ_PROD)
        self.rsp_cons = self._load(self._RSP_PROD)

    def free_slots(self) -> int:
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _IDX_MASK)

    def put_requests(self, reqs: np.ndarray) -> None:
        """Copy request records (any dtype of itemsize entry_size) into the next slots."""
        n = len(reqs)
        reqs = self._as_slots(reqs)
        if n > self.free_slots():
            raise ValueError(f"{n} requests for {self.free_slots()} free slots")
        raw = np.ascontiguousarray(reqs).view(self.abi.raw)
        self._slots_raw[self._indices(self.req_prod_pvt, n)] = raw
        self.req_prod_pvt = (self.req_prod_pvt + n) & _IDX_MASK

    def _as_slots(self, reqs: np.ndarray) -> np.ndarray:
        """Records in the ABI's slot layout: numpy's concatenate repacks structured dtypes
        (dropping the alignment holes), so match the fields by name to an ABI dtype."""
        if reqs.dtype.itemsize == self.abi.entry_size:
            return reqs
        abi = self.abi
        for dtype in (abi.request, abi.discard, abi.indirect):
            if dtype.names == reqs.dtype.names:
                slots = np.zeros(len(reqs), dtype=dtype)
                for name in dtype.names:
                    slots[name] = reqs[name]
                return slots
        raise ValueError("request records must be in one of the ABI's request layouts")

    def push_requests(self) -> bool:
        """Publish queued requests; True if the backend must be notified."""
        return self._publish(self._REQ_PROD, self._REQ_EVENT, self.req_prod_pvt)

    def consume_responses(self) -> np.ndarray:
        """Copies of every new response; raises RingOverflow on a bogus rsp_prod."""
        rsp_prod = self._load(self._RSP_PROD)
        n = (rsp_prod - self.rsp_cons) & _IDX_MASK
        if n > self.size or n > (self.req_prod_pvt - self.rsp_cons) & _IDX_MASK:
            raise RingOverflow(f"backend rsp_prod {rsp_prod} is {n} ahead of rsp_cons")
        batch = self._copy_out(self.rsp_cons, n)
        self.rsp_cons = rsp_prod
        return batch.view(self.abi.response)

    @property
    def outstanding(self) -> int:
        return (self.req_prod_pvt - self.rsp_cons) & _IDX_MASK

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: arm rsp_event, then look once more."""
        if self._load(self._RSP_PROD) != self.rsp_cons:
            return True
        self._store(self._RSP_EVENT, self.rsp_cons + 1)
        lib.blkpy_mb()
        return self._load(self._RSP_PROD) != self.rsp_cons
