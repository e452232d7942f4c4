"""One ring's request life cycle: consume a batch, validate it, get at the guest pages,
submit the I/O, and answer on the ring when it completes.

A batch is the unit of mapping and answering: its data grants are mapped together (or
copied together) and released together before its responses are pushed, because a Linux
frontend revokes the grants as soon as it sees a response. Bad requests are answered at
once and never reach the disk.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import Callable

import numpy as np

from blkpy import engine as io
from blkpy.backends.base import Disk
from blkpy.engine import IoEngine, IoOp
from blkpy.grants import GrantCopier, GrantMapper, PageRequest, fetch_indirect
from blkpy.platform import EventChannel, Platform
from blkpy.ratelimit import RateLimitedLog
from blkpy.requests import PENDING, DiskGeometry, indirect_pages, validate_batch, validate_indirect
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
    BackRing,
    RingOverflow,
)

log = logging.getLogger("blkpy.vbd")


@dataclasses.dataclass
class VbdStats:
    """Per-ring counters in the spirit of blkback's sysfs statistics."""

    rd_req: int = 0
    wr_req: int = 0
    f_req: int = 0
    ds_req: int = 0
    rd_sect: int = 0
    wr_sect: int = 0
    errors: int = 0
    eopnotsupp: int = 0
    batches: int = 0
    max_batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Batch:
    """Requests of one consumed batch that are waiting for I/O."""

    ids: np.ndarray
    rsp_ops: np.ndarray
    status: np.ndarray
    pages: object  # Acquired
    members: np.ndarray  # indices of the requests that went to I/O
    waiting: int  # ops not yet completed
    reads: list[int]


class Vbd:
    """Serves one ring (one queue of a virtual block device)."""

    def __init__(
        self,
        platform: Platform,
        domid: int,
        back_ring: BackRing,
        evtchn: EventChannel,
        disk: Disk,
        engine: IoEngine,
        geometry: DiskGeometry,
        *,
        persistent: bool = False,
        grant_mode: str = "map",
        poll_us: int = 0,
        on_broken: Callable[[str], None] | None = None,
        bad_request_log: RateLimitedLog | None = None,
    ) -> None:
        self.platform = platform
        self.domid = domid
        self.ring = back_ring
        self.evtchn = evtchn
        self.disk = disk
        self.engine = engine
        self.geometry = geometry
        self.poll_s = poll_us / 1e6
        self.on_broken = on_broken
        self.broken = False
        self.closed = False
        self.stats = VbdStats()
        self._log = bad_request_log or RateLimitedLog(log)
        if grant_mode == "copy":
            self.pages: GrantMapper | GrantCopier = GrantCopier(platform, domid)
        elif grant_mode == "map":
            self.pages = GrantMapper(platform, domid, persistent)
        else:
            raise ValueError(f"unknown grant mode {grant_mode!r}")
        self._batches: dict[int, _Batch] = {}
        self._next_batch = 0

    # ---- event entry points -------------------------------------------------------

    def kick(self) -> bool:
        """Process the ring until it is empty (then re-arm req_event). True if any
        request was seen."""
        did = False
        while not (self.broken or self.closed):
            try:
                batch = self.ring.consume()
            except RingOverflow as exc:
                self._halt(str(exc))
                break
            if len(batch):
                did = True
                self._dispatch(batch)
            self.complete()
            if len(batch):
                continue
            if self.poll_s and did and self._poll():
                continue
            if not self.ring.final_check_for_requests():
                break
        return did

    def _poll(self) -> bool:
        """Bounded busy-poll for more requests before sleeping: waking a sleeping process
        costs far more than a short spin when the guest keeps the queue busy."""
        deadline = time.perf_counter() + self.poll_s
        while time.perf_counter() < deadline:
            if self.ring.has_unconsumed():
                return True
        return False

    def complete(self) -> None:
        """Answer every batch whose I/O has finished."""
        if self.closed:
            return
        done = self.engine.completions()
        if done:
            self._account(done)
        self._push()

    def drain(self) -> None:
        """Wait for all in-flight I/O and answer it (disconnect, barrier)."""
        while self.engine.in_flight:
            done = self.engine.wait(timeout=1.0)
            if done:
                self._account(done)
        self._push()

    def close(self) -> None:
        """Drain, then release every grant and the event channel (idempotent). The ring
        must not be touched afterwards: its pages are about to be unmapped."""
        if self.closed:
            return
        self.drain()
        self.closed = True
        self.pages.close()
        self.evtchn.close()

    # ---- the batch pipeline -------------------------------------------------------

    def _halt(self, message: str) -> None:
        self.broken = True
        log.error("ring halted: %s", message)
        if self.on_broken:
            self.on_broken(message)

    def _dispatch(self, batch: np.ndarray) -> None:
        st = self.stats
        st.batches += 1
        st.max_batch = max(st.max_batch, len(batch))
        abi = self.ring.abi
        v = validate_batch(batch, abi, self.geometry)
        segs: dict[int, np.ndarray] = {}
        ops = v.io_op
        pend = v.status == PENDING
        inline = pend & np.isin(batch["operation"], (BLKIF_OP_READ, BLKIF_OP_WRITE,
                                                     BLKIF_OP_WRITE_BARRIER,
                                                     BLKIF_OP_FLUSH_DISKCACHE))
        for i in np.flatnonzero(inline):
            n = int(batch["nr_segments"][i])
            if n:
                segs[int(i)] = batch["seg"][i, :n]
        self._fetch_indirect(batch, v, segs)

        page_reqs = [
            PageRequest(i, bool(ops[i] == BLKIF_OP_READ), s)
            for i, s in segs.items()
            if v.status[i] == PENDING
        ]
        held = self.pages.acquire(page_reqs)
        for i in held.failed:
            v.refuse(i, BLKIF_RSP_ERROR, "bad grant reference")

        io_ops: list[IoOp] = []
        reads: list[int] = []
        bid = self._next_batch
        self._next_batch += 1
        for i in np.flatnonzero(v.status == PENDING):
            i = int(i)
            op = int(ops[i])
            offset = int(batch["sector_number"][i]) << SECTOR_SHIFT
            nbytes = int(v.nbytes[i])
            tag = (bid, i)
            if op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
                # Flush first, then the data (QEMU's presync, Linux's PREFLUSH write). A
                # barrier's drain is implied: engines complete ops in submission order
                # relative to flushes.
                st.f_req += 1
                io_ops.append(IoOp(io.FLUSH, 0, 0, None, tag))
                if nbytes:
                    io_ops.append(IoOp(io.WRITE, offset, nbytes, held.iov[i], tag))
                    st.wr_sect += nbytes >> SECTOR_SHIFT
            elif op == BLKIF_OP_DISCARD:
                st.ds_req += 1
                io_ops.append(IoOp(io.DISCARD, offset, nbytes, None, tag))
            elif op == BLKIF_OP_READ:
                st.rd_req += 1
                st.rd_sect += nbytes >> SECTOR_SHIFT
                reads.append(i)
                io_ops.append(IoOp(io.READ, offset, nbytes, held.iov[i], tag))
            else:
                st.wr_req += 1
                st.wr_sect += nbytes >> SECTOR_SHIFT
                io_ops.append(IoOp(io.WRITE, offset, nbytes, held.iov[i], tag))

        refused = v.status != PENDING
        for i in np.flatnonzero(refused):
            self._log.warning(
                "request id=%d op=%d refused: %s",
                int(batch["id"][i]), int(batch["operation"][i]), v.reason[i],
            )
        if not io_ops:
            held.release()
            self._answer(batch["id"], v.rsp_operation, v.status)
            return
        # Refused requests need no grants: answer them now, the rest when their I/O ends.
        if refused.any():
            self._answer(batch["id"][refused], v.rsp_operation[refused], v.status[refused])
        members = np.unique(np.array([op.tag[1] for op in io_ops], dtype=np.int64))
        self._batches[bid] = _Batch(batch["id"], v.rsp_operation, v.status, held, members,
                                    len(io_ops), reads)
        self.engine.submit(io_ops)

    def _fetch_indirect(self, batch: np.ndarray, v, segs: dict[int, np.ndarray]) -> None:
        ind = batch.view(self.ring.abi.indirect)
        todo = np.flatnonzero((v.status == PENDING) & (batch["operation"] == BLKIF_OP_INDIRECT))
        if not len(todo):
            return
        grefs, counts = {}, {}
        for i in todo:
            n = int(ind["nr_segments"][i])
            grefs[int(i)] = ind["indirect_grefs"][i, : indirect_pages(n)].copy()
            counts[int(i)] = n
        mapper = self.pages if isinstance(self.pages, GrantMapper) else None
        fetched = fetch_indirect(self.platform, self.domid, grefs, counts, mapper)
        for i, descs in fetched.items():
            if descs is None:
                v.refuse(i, BLKIF_RSP_ERROR, "bad indirect grant reference")
                continue
            nbytes, reason = validate_indirect(descs, int(ind["sector_number"][i]), self.geometry)
            if reason:
                v.refuse(i, BLKIF_RSP_ERROR, reason)
            else:
                v.nbytes[i] = nbytes
                segs[i] = descs

    def _account(self, done: list[IoOp]) -> None:
        for op in done:
            bid, i = op.tag
            b = self._batches[bid]
            if op.result and b.status[i] == PENDING:
                if op.result == -errno.EOPNOTSUPP:
                    b.status[i] = BLKIF_RSP_EOPNOTSUPP
                else:
                    b.status[i] = BLKIF_RSP_ERROR
                    self._log.warning("I/O error on request id=%d: %s", int(b.ids[i]),
                                      errno.errorcode.get(-op.result, op.result))
            b.waiting -= 1
            if b.waiting == 0:
                self._finish(bid)

    def _finish(self, bid: int) -> None:
        b = self._batches.pop(bid)
        ok_reads = [i for i in b.reads if b.status[i] == PENDING]
        for i in b.pages.finish(ok_reads):
            b.status[i] = BLKIF_RSP_ERROR
        b.pages.release()  # grants dropped before the guest can see any response
        status = b.status[b.members]
        status[status == PENDING] = BLKIF_RSP_OKAY
        self._answer(b.ids[b.members], b.rsp_ops[b.members], status)

    def _answer(self, ids: np.ndarray, ops: np.ndarray, status: np.ndarray) -> None:
        st = self.stats
        st.errors += int(np.count_nonzero(status == BLKIF_RSP_ERROR))
        st.eopnotsupp += int(np.count_nonzero(status == BLKIF_RSP_EOPNOTSUPP))
        self.ring.produce(ids, ops, status)

    def _push(self) -> None:
        if self.ring.push_responses():
            self.evtchn.notify()
