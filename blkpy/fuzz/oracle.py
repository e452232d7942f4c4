"""The fuzzers' judge: what a correct backend must answer to one request slot.

Written from the protocol (blkif.h as summarised in the project's spec notes, Linux blkback's
checks) in plain scalar Python, reading slot bytes with ``struct`` at the offsets of each
ABI: it shares no code with the backend's vectorised validator (blkpy.requests), its numpy
ring layouts (blkpy.ring) or the native loop's C validator, so a bug there cannot hide
behind the same bug here."""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable

OP_READ, OP_WRITE, OP_BARRIER, OP_FLUSH, OP_DISCARD, OP_INDIRECT = 0, 1, 2, 3, 5, 6
RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP = 0, -1, -2
MAX_INLINE_SEGMENTS = 11
MAX_INDIRECT_PAGES = 8
DESCRIPTORS_PER_PAGE = 512
SECTORS_PER_PAGE = 8
DISCARD_SECURE = 1


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Byte offsets of one guest ABI (x86_64/arm align u64 to 8, x86_32 to 4)."""

    name: str
    entry_size: int
    id_off: int
    sector_off: int
    after: int  # seg[] / nr_sectors / indirect handle
    response_size: int

    @property
    def indirect_grefs_off(self) -> int:
        return self.after + 4


LAYOUTS = {
    "x86_64-abi": SlotLayout("x86_64-abi", 112, 8, 16, 24, 16),
    "arm-abi": SlotLayout("arm-abi", 112, 8, 16, 24, 16),
    "x86_32-abi": SlotLayout("x86_32-abi", 108, 4, 12, 20, 12),
}


@dataclasses.dataclass(frozen=True)
class Disk:
    """What the guest was told: size in 512-byte sectors, logical sector size, and the
    features the backend advertised."""

    sectors: int
    sector_size: int
    readonly: bool
    discard: bool
    max_indirect_segments: int = 256


class Class(enum.Enum):
    VALID = "valid"  # must be answered OKAY (and do exactly its I/O)
    INVALID = "invalid"  # must not be answered OKAY and must not touch the disk
    EITHER = "either"  # the protocol leaves it open (any status; data checked loosely)


@dataclasses.dataclass
class Piece:
    """One 512-byte sector of a request's data: disk sector <-> guest page bytes."""

    sector: int
    gref: int
    offset: int  # byte offset in the page


@dataclasses.dataclass
class Expectation:
    """The verdict on one request. ``pieces`` are its data sectors in order (for an invalid
    request only their page regions mean anything): the I/O may run in any order, so a
    guest page region named by two requests of one batch may end up with either's data,
    even when one of them is refused part way (grant copy finds a bad destination page
    only after the read)."""

    klass: Class
    why: str
    rsp_op: int
    rid: int
    op: int  # effective operation: READ/WRITE/FLUSH/BARRIER/DISCARD, or the raw op
    pieces: list[Piece] = dataclasses.field(default_factory=list)
    discard: tuple[int, int] | None = None  # (first sector, count)
    data_unknown: bool = False  # the source page may change under the write (ring page)


@dataclasses.dataclass(frozen=True)
class Grants:
    """The guest's grant state as the fuzzer arranged it."""

    writable: frozenset[int]
    readonly: frozenset[int]
    ring: frozenset[int]  # the ring's own pages (granted writable, contents moving)

    def usable(self, gref: int, into_guest: bool) -> bool:
        if gref in self.writable or gref in self.ring:
            return True
        return not into_guest and gref in self.readonly


def parse_slot(layout: SlotLayout, slot: bytes) -> dict[str, int]:
    op, byte1 = slot[0], slot[1]
    return {
        "op": op,
        "byte1": byte1,
        "nr_segments_inline": byte1,
        "nr_segments_indirect": struct.unpack_from("<H", slot, 2)[0],
        "id": struct.unpack_from("<Q", slot, layout.id_off)[0],
        "sector": struct.unpack_from("<Q", slot, layout.sector_off)[0],
        "nr_sectors": struct.unpack_from("<Q", slot, layout.after)[0],
    }


def segments(raw: bytes, count: int, offset: int = 0) -> list[tuple[int, int, int]]:
    return [struct.unpack_from("<IBB", raw, offset + 8 * k) for k in range(count)]


def judge(layout: SlotLayout, slot: bytes, disk: Disk, grants: Grants,
          read_page: Callable[[int], bytes | None]) -> Expectation:
    """The expected answer to ``slot``. ``read_page(gref)`` returns the current bytes of a
    granted page (an indirect descriptor page) or None if the gref is not granted."""
    f = parse_slot(layout, slot)
    op, rid = f["op"], f["id"]

    def bad(why: str, rsp_op: int = op, eff: int = op) -> Expectation:
        return Expectation(Class.INVALID, why, rsp_op, rid, eff)

    if op in (OP_READ, OP_WRITE, OP_BARRIER, OP_FLUSH):
        n = f["nr_segments_inline"]
        if n > MAX_INLINE_SEGMENTS or (n == 0 and op in (OP_READ, OP_WRITE)):
            return bad("segment count")
        if disk.readonly and op != OP_READ:
            return bad("modifies a read-only disk")
        segs = segments(slot, n, layout.after)
        return _data_request(op, op, rid, f["sector"], segs, disk, grants, inline=True)
    if op == OP_INDIRECT:
        iop, n = f["byte1"], f["nr_segments_indirect"]
        if iop not in (OP_READ, OP_WRITE):
            return bad("indirect_op", rsp_op=iop)
        if not 1 <= n <= disk.max_indirect_segments:
            return bad("indirect segment count", rsp_op=iop)
        if disk.readonly and iop == OP_WRITE:
            return bad("modifies a read-only disk", rsp_op=iop)
        npages = -(-n // DESCRIPTORS_PER_PAGE)
        refs = struct.unpack_from(f"<{npages}I", slot, layout.indirect_grefs_off)
        raw = b""
        for ref in refs:
            # Indirect pages are mapped read-only: any live grant will do.
            page = read_page(ref) if ref not in grants.ring else None
            if page is None:
                return bad("indirect page not granted", rsp_op=iop)
            raw += page
        segs = segments(raw, n)
        return _data_request(iop, iop, rid, f["sector"], segs, disk, grants, inline=False)
    if op == OP_DISCARD:
        if not disk.discard or disk.readonly:
            return bad("discard not advertised")
        if f["byte1"] & DISCARD_SECURE:
            return bad("secure discard not advertised")
        start, count = f["sector"], f["nr_sectors"]
        per = disk.sector_size // 512
        if start + count > disk.sectors or start % per or count % per:
            return bad("discard range")
        if count == 0:  # an empty range: nothing to do, nothing wrong either
            return Expectation(Class.EITHER, "empty discard", op, rid, op)
        return Expectation(Class.VALID, "discard", op, rid, op, discard=(start, count))
    return bad("unknown operation")


def _data_request(op: int, rsp_op: int, rid: int, sector: int,
                  segs: list[tuple[int, int, int]], disk: Disk, grants: Grants,
                  inline: bool) -> Expectation:
    per = disk.sector_size // 512
    # The page regions the request names are kept even when it is invalid: concurrent
    # requests naming the same guest page leave its contents open (see Expectation.pieces).
    pieces = [Piece(0, gref, s * 512) for gref, first, last in segs
              for s in range(first, min(last, SECTORS_PER_PAGE - 1) + 1)]

    def verdict(klass: Class, why: str) -> Expectation:
        return Expectation(klass, why, rsp_op, rid, op, pieces)

    for _, first, last in segs:
        if not first <= last <= SECTORS_PER_PAGE - 1:
            return verdict(Class.INVALID, "segment bounds")
        if first % per or (last + 1) % per:
            return verdict(Class.INVALID, "segment not in whole blocks")
    for k, p in enumerate(pieces):
        p.sector = sector + k
    total = len(pieces)
    if total and (sector % per or sector + total > disk.sectors):
        return verdict(Class.INVALID, "sector range")
    into_guest = op == OP_READ
    if not all(grants.usable(gref, into_guest) for gref, _, _ in segs):
        return verdict(Class.INVALID, "grant")
    e = verdict(Class.VALID, "read" if into_guest else "write" if total else "flush")
    e.data_unknown = any(gref in grants.ring for gref, _, _ in segs)
    return e


def parse_responses(layout: SlotLayout, raw: bytes) -> list[tuple[int, int, int]]:
    """(id, operation, status) of each response slot in ``raw``."""
    out = []
    for k in range(len(raw) // layout.entry_size):
        base = k * layout.entry_size
        rid = struct.unpack_from("<Q", raw, base)[0]
        rop = raw[base + 8]
        status = struct.unpack_from("<h", raw, base + 10)[0]
        out.append((rid, rop, status))
    return out
