"""Vectorised validation of a batch of blkif requests (sans-IO).

Every field of a request slot is hostile. This module turns a copied batch into a verdict
per request: an error status for the bad ones (answered without touching the disk) and,
for the good ones, the byte ranges and segment lists the I/O stage needs. The checks are
Linux blkback's (blkif.md §4): segment counts, first_sect <= last_sect <= 7, the sector
range inside the disk without u64 wrap-around, alignment to the logical block size,
read-only refusal, and EOPNOTSUPP for operations that were not advertised.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from blkpy import ring
from blkpy.ring import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTOR_SHIFT,
)

#: status placeholder for requests that passed validation and still need I/O
PENDING = 1


@dataclasses.dataclass(frozen=True)
class DiskGeometry:
    """What the validation needs to know about the disk and the negotiated features."""

    sectors: int  # disk size in 512-byte units
    sector_size: int = 512
    readonly: bool = False
    discard: bool = False
    secure_discard: bool = False
    flush: bool = True
    barrier: bool = True
    max_indirect_segments: int = 256


@dataclasses.dataclass
class Verdict:
    """Per-request result of validating one batch (arrays of len(batch))."""

    status: np.ndarray  # int16: BLKIF_RSP_* for refused requests, PENDING for good ones
    reason: list[str | None]  # why a request was refused (for the rate-limited log)
    rsp_operation: np.ndarray  # operation to echo (indirect -> indirect_op)
    io_op: np.ndarray  # effective op: READ/WRITE/FLUSH/BARRIER/DISCARD/INDIRECT
    nbytes: np.ndarray  # int64 data bytes (0 for pure flush/barrier; discard length)

    def refuse(self, i: int, status: int, reason: str) -> None:
        self.status[i] = status
        self.reason[i] = reason


def segment_totals(
    segs: np.ndarray, counts: np.ndarray, sector_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """For a (n, k) segment array with counts[i] used entries per row, return the bytes
    per row and a mask of rows whose used segments are all valid."""
    k = segs.shape[1]
    used = np.arange(k)[None, :] < counts[:, None]
    first = segs["first_sect"].astype(np.int64)
    last = segs["last_sect"].astype(np.int64)
    bad = (first > last) | (last >= ring.SECTORS_PER_PAGE)
    if sector_size > 512:
        # Every segment must cover whole logical blocks at block-aligned page offsets.
        per = sector_size >> SECTOR_SHIFT
        bad |= (first % per != 0) | ((last + 1) % per != 0)
    ok = ~np.any(bad & used, axis=1)
    nbytes = np.sum(np.where(used & ~bad, (last - first + 1) << SECTOR_SHIFT, 0), axis=1)
    return nbytes, ok


def range_ok(start: np.ndarray, nbytes: np.ndarray, geom: DiskGeometry) -> np.ndarray:
    """Sector ranges inside the disk (no u64 overflow) and aligned to the block size."""
    start = start.astype(np.uint64)
    nsec = (nbytes.astype(np.uint64) >> np.uint64(SECTOR_SHIFT))
    total = np.uint64(geom.sectors)
    inside = (start <= total) & (nsec <= total - np.minimum(start, total))
    per = np.uint64(geom.sector_size >> SECTOR_SHIFT)
    return inside & (start % per == 0)


def validate_batch(batch: np.ndarray, abi: ring.Abi, geom: DiskGeometry) -> Verdict:
    """First-stage verdict for a batch (indirect requests are checked up to their header;
    their segments are checked by ``validate_indirect_segments`` once fetched)."""
    n = len(batch)
    op = batch["operation"].astype(np.int64)
    status = np.full(n, PENDING, dtype=np.int16)
    verdict = Verdict(status, [None] * n, batch["operation"].copy(), op.copy(), np.zeros(n, np.int64))

    def refuse(mask: np.ndarray, code: int, reason: str) -> None:
        for i in np.flatnonzero(mask & (verdict.status == PENDING)):
            verdict.refuse(int(i), code, reason)

    known = np.isin(op, (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
                         BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT))
    refuse(~known, BLKIF_RSP_EOPNOTSUPP, "unknown operation")
    refuse((op == BLKIF_OP_WRITE_BARRIER) & (not geom.barrier), BLKIF_RSP_EOPNOTSUPP,
           "barrier not supported")
    refuse((op == BLKIF_OP_FLUSH_DISKCACHE) & (not geom.flush), BLKIF_RSP_EOPNOTSUPP,
           "flush not supported")
    refuse((op == BLKIF_OP_DISCARD) & (not geom.discard), BLKIF_RSP_EOPNOTSUPP,
           "discard not advertised")

    # Inline-segment requests: read, write, flush, barrier.
    inline = np.isin(op, (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
                          BLKIF_OP_FLUSH_DISKCACHE))
    nseg = batch["nr_segments"].astype(np.int64)
    min_seg = np.where(np.isin(op, (BLKIF_OP_READ, BLKIF_OP_WRITE)), 1, 0)
    refuse(inline & ((nseg < min_seg) | (nseg > ring.BLKIF_MAX_SEGMENTS_PER_REQUEST)),
           BLKIF_RSP_ERROR, "bad segment count")
    counts = np.clip(nseg, 0, ring.BLKIF_MAX_SEGMENTS_PER_REQUEST)
    nbytes, segs_ok = segment_totals(batch["seg"], counts, geom.sector_size)
    refuse(inline & ~segs_ok, BLKIF_RSP_ERROR, "bad segment bounds")
    refuse(inline & ~range_ok(batch["sector_number"], nbytes, geom), BLKIF_RSP_ERROR,
           "sector range outside the disk")
    verdict.nbytes[inline] = nbytes[inline]

    # Discard.
    disc = batch.view(abi.discard)
    is_disc = op == BLKIF_OP_DISCARD
    secure = (disc["flag"] & ring.BLKIF_DISCARD_SECURE) != 0
    refuse(is_disc & secure & (not geom.secure_discard), BLKIF_RSP_EOPNOTSUPP,
           "secure discard not supported")
    dsec = disc["nr_sectors"].astype(np.uint64)
    too_big = dsec > np.uint64(geom.sectors)
    dbytes = np.where(too_big, 0, dsec).astype(np.int64) << SECTOR_SHIFT
    refuse(is_disc & (too_big | ~range_ok(disc["sector_number"], dbytes, geom)),
           BLKIF_RSP_ERROR, "discard range outside the disk")
    per = geom.sector_size >> SECTOR_SHIFT
    refuse(is_disc & (dsec % np.uint64(per) != 0), BLKIF_RSP_ERROR, "misaligned discard")
    verdict.nbytes[is_disc] = dbytes[is_disc]

    # Indirect header.
    ind = batch.view(abi.indirect)
    is_ind = op == BLKIF_OP_INDIRECT
    iop = ind["indirect_op"].astype(np.int64)
    refuse(is_ind & ~np.isin(iop, (BLKIF_OP_READ, BLKIF_OP_WRITE)), BLKIF_RSP_ERROR,
           "indirect_op not read/write")
    inseg = ind["nr_segments"].astype(np.int64)
    refuse(is_ind & ((inseg < 1) | (inseg > geom.max_indirect_segments)), BLKIF_RSP_ERROR,
           "bad indirect segment count")
    verdict.rsp_operation[is_ind] = ind["indirect_op"][is_ind]
    verdict.io_op[is_ind] = np.where(np.isin(iop[is_ind], (BLKIF_OP_READ, BLKIF_OP_WRITE)),
                                     iop[is_ind], BLKIF_OP_INDIRECT)

    writes = np.isin(verdict.io_op, (BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
                                     BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD))
    refuse(writes & geom.readonly, BLKIF_RSP_ERROR, "write to a read-only disk")
    return verdict


def indirect_pages(nr_segments: int) -> int:
    """Indirect descriptor pages used by a request of nr_segments."""
    return -(-nr_segments // ring.SEGS_PER_INDIRECT_FRAME)


def validate_indirect(
    segs: np.ndarray, sector_number: int, geom: DiskGeometry
) -> tuple[int, str | None]:
    """Check an indirect request's fetched descriptors: (bytes, None) or (0, reason)."""
    nbytes, ok = segment_totals(segs[None, :], np.array([len(segs)]), geom.sector_size)
    if not ok[0]:
        return 0, "bad indirect segment bounds"
    if not range_ok(np.array([sector_number], np.uint64), nbytes, geom)[0]:
        return 0, "sector range outside the disk"
    return int(nbytes[0]), None


__all__ = [
    "BLKIF_RSP_OKAY",
    "PENDING",
    "DiskGeometry",
    "Verdict",
    "indirect_pages",
    "range_ok",
    "segment_totals",
    "validate_batch",
    "validate_indirect",
]
