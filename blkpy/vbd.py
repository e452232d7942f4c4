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
import select
import threading
import time
from collections.abc import Callable

import numpy as np

from blkpy import engine as io
from blkpy import fastpath, ring
from blkpy.backends.base import Disk
from blkpy.defaults import MAX_PERSISTENT_GRANTS
from blkpy.engine import IoEngine, IoVector
from blkpy.fastpath import STAT_FIELDS, RingLoop, add_counters
from blkpy.gntdev.native import ffi, lib
from blkpy.grants import (
    Acquired,
    GrantCopier,
    GrantMapper,
    fetch_indirect,
)
from blkpy.platform import EventChannel, Platform
from blkpy.qos import QosState
from blkpy.ratelimit import RateLimitedLog
from blkpy.requests import (
    FLUSHING_OPS,
    INLINE_OPS,
    PENDING,
    DiskGeometry,
    Verdict,
    indirect_pages,
    validate_batch,
    validate_indirect,
)
from blkpy.ring import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTOR_SHIFT,
    BackRing,
    RingOverflow,
)

log = logging.getLogger("blkpy.vbd")

#: Requests taken off the ring per batch. Bounds what one batch can cost us whatever the
#: guest queues: with 256-segment indirect requests, 64 requests are 16384 pages for one map
#: call (gntdev allows 65536) or 64 MiB of grant-copy bounce buffer.
MAX_BATCH = 64
#: Batches handed to an asynchronous engine and not yet answered; beyond this the ring is
#: left alone until a completion arrives (back-pressure, as blkback's request pool).
MAX_BATCHES_IN_FLIGHT = 4


# A run of touching writes mapped at once stays below this (a format maps a bounded
# number of clusters per call).
MAP_RUN_LIMIT = 1 << 20


def _touching_runs(sectors: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """(byte offset, length) of the runs that writes starting at ``sectors`` cover, writes
    that overlap or touch merged (up to MAP_RUN_LIMIT): a sequential writer's queue is
    one or two runs, so mapping it costs one call per run, not one per request."""
    runs: list[tuple[int, int]] = []
    start = end = -1
    for sector, length in sorted(zip(sectors, lengths, strict=True)):
        off = sector << SECTOR_SHIFT
        if off <= end and max(end, off + length) - start <= MAP_RUN_LIMIT:  # sorted
            end = max(end, off + length)
            continue
        if start >= 0:
            runs.append((start, end - start))
        start, end = off, off + length
    if start >= 0:
        runs.append((start, end - start))
    return runs


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
    oo_req: int = 0  # blkback's "out of requests": requests left waiting for a free slot
    batches: int = 0
    max_batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# engine kind of the (last) entry of each effective operation
_KIND = np.full(256, io.WRITE, dtype=np.int32)
_KIND[BLKIF_OP_READ] = io.READ
_KIND[BLKIF_OP_DISCARD] = io.DISCARD


@dataclasses.dataclass
class _Batch:
    """A dispatched batch waiting for its I/O."""

    ids: np.ndarray
    rsp_ops: np.ndarray
    status: np.ndarray
    pages: Acquired
    members: np.ndarray  # indices of the requests that went to I/O
    reads: np.ndarray  # indices of the READ requests among them
    slots: np.ndarray  # each request's restart-journal entry


class ReadyThread:
    """A ring thread started ahead, parked until it is given what to run: a takeover's
    thread start (a clone, a fresh stack) took 3-28 ms of the guest's wait under the lab's
    emulation. ``cancel`` lets a thread that is not needed end."""

    def __init__(self, name: str = "blkpy-ring") -> None:
        self._go = threading.Event()
        self._target: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._park, name=name, daemon=True)
        self.thread.start()

    def _park(self) -> None:
        self._go.wait()
        if self._target is not None:
            self._target()

    def run(self, target: Callable[[], None]) -> threading.Thread:
        """Have the thread run ``target`` (once); the thread, to join."""
        if self._go.is_set():
            raise RuntimeError("a ready thread runs one target")
        self._target = target
        self._go.set()
        return self.thread

    def cancel(self) -> None:
        """End the thread without running anything (idempotent; after ``run``, a no-op)."""
        self._go.set()


class Vbd:
    """Serves one ring (one queue of a virtual block device).

    The native ring loop (blkpy.fastpath) serves the common case; this class owns the ring
    thread, the grants and the reference path that takes every request the loop leaves
    (``_slow_batch``): refusals, discards, grants not yet persistent, what an image format
    must decide (qcow2 allocation, flushes)."""

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
        max_persistent_grants: int = MAX_PERSISTENT_GRANTS,
        on_broken: Callable[[str], None] | None = None,
        bad_request_log: RateLimitedLog | None = None,
        qos: QosState | None = None,
        pages: GrantMapper | None = None,
    ) -> None:
        """``pages``: a persistent grant cache mapped ahead (an upgrade's successor), used
        if this queue maps persistent grants; else one is made."""
        self.platform = platform
        self.domid = domid
        self.ring = back_ring
        self.evtchn = evtchn
        self.disk = disk
        self.engine = engine
        self.on_broken = on_broken
        self.broken = False
        self.closed = False
        self._stats = VbdStats()
        self._log = bad_request_log or RateLimitedLog(log)
        if grant_mode == "copy":
            self.pages: GrantMapper | GrantCopier = GrantCopier(platform, domid)
        elif grant_mode == "map" and persistent and pages is not None and pages.persistent:
            self.pages = pages
        elif grant_mode == "map":
            self.pages = GrantMapper(platform, domid, persistent, max_persistent_grants)
        else:
            raise ValueError(f"unknown grant mode {grant_mode!r}")
        if pages is not None and pages is not self.pages:
            pages.close()  # mapped ahead for a mode this queue does not use
        self._batches: dict[int, _Batch] = {}
        self._next_batch = 0
        self._geometry = geometry
        self._poll_us = poll_us
        self._io_errors_logged = 0
        self._thread: threading.Thread | None = None
        #: when the ring's thread last started serving (time.monotonic(): a takeover's
        #: hand-over window ends there)
        self.serving_since: float | None = None
        # The disk's I/O limits, shared with its other queues: the loop charges what it
        # serves, the reference path what the loop did not (one request at a time then).
        self.qos = qos
        self._last_miss: tuple[int, int, int] | None = None
        self._ahead: tuple[int, int] | None = None  # what to map when the ring is idle
        self._retired: dict[str, int] = {}  # counters of the loops of earlier images
        self.paused = False  # between pause() and resume(): no loop, no engine
        self.released = False  # handed over (release_ring): the ring is not ours any more
        self._make_loop()

    def _make_loop(self) -> None:
        # The engine says how the loop does I/O (synchronous, io_uring, or both).
        table = self.pages.table if isinstance(self.pages, GrantMapper) else None
        target = self.disk.native_io()
        fd, extents = target if target is not None else (None, None)
        io_mode = self.engine.loop_io
        queue = self.disk.loop_queue() if target is None and table is not None else None
        self.loop = RingLoop(self.ring, self._geometry, self.evtchn, disk_fd=fd, grants=table,
                             poll_us=self._poll_us, max_batch=MAX_BATCH,
                             io_fd=self.engine.fileno(), io_mode=io_mode, extents=extents,
                             queue=queue)
        if (io_mode != fastpath.SYNC and extents is None and queue is None
                and not self.loop.uses_uring):
            log.warning("io_uring unavailable: the ring loop does synchronous I/O")
        self.loop.native.qos = self.qos.native if self.qos is not None else ffi.NULL
        self.loop.native.sync_lost = getattr(self.disk, "sync_lost", ffi.NULL)

    # ---- pause and resume (tap-ctl's semantics) ----------------------------------------

    def pause(self) -> None:
        """Take no more requests, finish and answer those in flight, and let go of the
        image; the ring stays mapped and the channel bound, so the guest's requests wait
        in the ring until ``resume``."""
        self.stop()
        self.drain()
        self.paused = True
        self._retired = self.loop_counters()
        self.loop.close()
        self.engine.close()

    def resume(self, disk: Disk, engine: IoEngine) -> None:
        """Serve again, from ``disk`` (the same size as before, checked by the caller)."""
        self.disk, self.engine = disk, engine
        self._make_loop()
        self.paused = False
        self.start()

    @property
    def geometry(self) -> DiskGeometry:
        return self._geometry

    @geometry.setter
    def geometry(self, geometry: DiskGeometry) -> None:
        """A resized disk: both paths see the new size from their next request on."""
        self._geometry = geometry
        self.loop.set_geometry(geometry)

    @property
    def stats(self) -> VbdStats:
        """Counters of both paths."""
        native = self.loop_counters()
        st = dataclasses.replace(self._stats)
        for name in STAT_FIELDS:
            setattr(st, name, getattr(st, name) + native[name])
        st.max_batch = max(st.max_batch, native["max_batch_seen"])
        return st

    def loop_counters(self) -> dict[str, int]:
        """What the native loop served itself, and its notifications, wake-ups and sleeps."""
        return add_counters(self._retired, self.loop.counters())

    # ---- running ----------------------------------------------------------------------

    def start(self, ready: ReadyThread | None = None) -> None:
        """Serve the ring on its own thread until close(): the control plane's event loop
        never sits between the event channel and the ring. ``ready``: a thread started
        ahead to serve on, else one is started now."""
        self._thread = (ready or ReadyThread()).run(self._thread_main)

    def _thread_main(self) -> None:
        self.serving_since = time.monotonic()
        try:
            self._serve(may_sleep=True)
        except Exception as exc:  # a bug must close the device, never hang the guest
            log.exception("ring thread failed")
            self._halt(f"internal error: {exc}")

    def kick(self) -> bool:
        """Serve the ring until it is empty and req_event is re-armed, without sleeping.
        True if any request was taken."""
        return self._serve(may_sleep=False)

    def _serve(self, may_sleep: bool) -> bool:
        if self.ring.replay is not None:
            self._replay()
        start = self.ring.req_cons
        loop = self.loop
        while not (self.broken or self.closed or loop.stopped):
            why = loop.run(may_sleep, self.engine.in_flight)
            if loop.take_notify():
                self.evtchn.notify()
            if why == fastpath.SLOW:
                self._slow_batch()
            elif why == fastpath.EXTENT:
                self._extent_miss()
            elif why == fastpath.IDLE_WORK:
                self._idle_work()
            elif why == fastpath.WAKE:
                loop.clear_wake()
                self.complete()
            elif why == fastpath.OVERFLOW:
                self._halt(f"frontend req_prod is more than {self.ring.size} ahead of "
                           f"rsp_prod {self.ring.rsp_prod_pvt}")
            elif why == fastpath.EVTCHN:
                self._wait_event(may_sleep)
            elif why == fastpath.IDLE:
                self.complete()
                break
            self._log_io_errors()
        return self.ring.req_cons != start

    def _replay(self) -> None:
        """Taking the ring over from a dead predecessor: publish the responses it wrote
        but did not push, then serve the requests it consumed and never answered, in ring
        order, through the reference path (their grants are still valid: the guest waits
        for the answers)."""
        recovery, self.ring.replay = self.ring.replay, None
        assert recovery is not None
        n = len(recovery.replay_indices)
        if n:
            log.info("taking the ring over: %d request(s) to serve again", n)
            batch = recovery.replay_slots.view(self.ring.abi.raw).reshape(n).view(
                self.ring.abi.request)
            for k in range(0, n, MAX_BATCH):
                self._dispatch(batch[k:k + MAX_BATCH], recovery.replay_entries[k:k + MAX_BATCH])
            self.drain()
        self._push()
        self.evtchn.notify()  # events sent while nobody was bound were dropped

    def _wait_event(self, may_sleep: bool) -> None:
        """The event channel in Python: a channel the loop cannot drive, or an ack the
        platform must repair (a Linux evtchn queue overflow)."""
        if may_sleep and not self.loop.drives_evtchn:
            fds = [self.evtchn.fileno(), self.loop.wake_fd]
            if self.engine.fileno() is not None:
                fds.append(self.engine.fileno())
            select.select(fds, [], [])
        self.evtchn.ack()

    def _log_io_errors(self) -> None:
        count, err = self.loop.io_errors()
        if count != self._io_errors_logged:
            self._log.warning("%d I/O error(s) on the image (last: %s)",
                              count - self._io_errors_logged, errno.errorcode.get(err, err))
            self._io_errors_logged = count

    def _extent_miss(self) -> None:
        """A valid write to clusters the loop cannot place: let the format map them
        (qcow2 allocates, as its own write would) and hand the request back to the loop,
        which then writes the guest's data in place; anything else takes the reference
        path. A miss on the same request twice goes to the reference path too."""
        off, length, write = self.loop.extent_miss()
        miss = (self.ring.req_cons, off, length)
        mapped = False
        if write and miss != self._last_miss:
            with self.disk.mapping_batch():
                mapped = self.disk.map_for_write(off, length)
                if mapped:
                    self._map_ahead()
        if mapped:
            self._last_miss = miss
            self._ahead = self.disk.allocation_ahead(off, length)
            if self._ahead is not None:
                self.loop.want_idle_work()
            return
        self._last_miss = None
        self._slow_batch()

    def _idle_work(self) -> None:
        """The guest has its answer: map the clusters a sequential writer comes to next,
        so its next allocating write costs no hand-back."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self.disk.map_for_write(*ahead)

    def _map_ahead(self) -> None:
        """Map the clusters of the other writes already on the ring too, so a deep queue
        of allocating writes costs one hand-back per batch, not one per request. Only a
        hint: the slots are read without consuming them (the guest may still rewrite
        them; the loop validates what it serves), and mapping keeps what the guest reads."""
        ring = self.ring
        n = min(ring.has_unconsumed_count(), MAX_BATCH)
        if n <= 1:
            return
        batch = ring.peek(n).view(ring.abi.request)
        v = validate_batch(batch, ring.abi, self.geometry)
        writes = np.flatnonzero((v.status == PENDING) & (v.io_op == BLKIF_OP_WRITE)
                                & (batch["operation"] == BLKIF_OP_WRITE) & (v.nbytes > 0))
        writes = writes[1:]  # the first is the request just mapped
        starts = batch["sector_number"][writes].tolist()
        for off, length in _touching_runs(starts, v.nbytes[writes].tolist()):
            if not self.disk.map_for_write(off, length):
                break

    def _slow_batch(self) -> None:
        """The reference path for the requests at req_cons that the loop left."""
        if self.engine.in_flight >= MAX_BATCHES_IN_FLIGHT:
            self._stats.oo_req += 1
        while self.engine.in_flight >= MAX_BATCHES_IN_FLIGHT:
            done = self.engine.wait(timeout=1.0)
            if done:
                self._account(done)
        limited = self.qos is not None and self.qos.active
        try:
            batch = self.ring.consume(limit=1 if limited else MAX_BATCH)
        except RingOverflow as exc:
            self._halt(str(exc))
            return
        if len(batch):
            self._dispatch(batch, self.ring.consumed_entries)
        self.complete()

    def _qos_wait(self, write: bool, nbytes: int) -> None:
        """Hold the request just consumed until the disk's limits admit it, unless the
        loop already charged it (then it handed it over for another reason)."""
        assert self.qos is not None
        if self.loop.native.charged == self.ring.req_cons:  # req_cons + 1 before consume
            return
        while not (self.closed or self.loop.stopped):
            wait = self.qos.admit(write, nbytes)
            if not wait:
                return
            time.sleep(wait / 1e9)

    def stop(self) -> None:
        """Stop the ring thread (any thread may call this) and wait for it."""
        self.loop.stop()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

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

    def close(self, release_grants: bool = True) -> None:
        """Stop the thread, drain, then release the event channel and every grant
        (idempotent); ``release_grants`` False leaves the grants mapped, for a hand-over
        whose process exits next (the exit unmaps them, after the successor is told).
        The ring must not be touched afterwards: its pages are about to be unmapped."""
        if self.closed:
            return
        if not self.released:
            self.stop()
            self.drain()
        self.closed = True
        self.evtchn.close()
        if release_grants:
            self.pages.close()
        self.loop.close()

    def release_ring(self) -> None:
        """A hand-over: stop, answer what is in flight and unbind the channel; from now
        on the ring is a successor's, and nothing of this queue touches it again
        (``close`` then frees the rest: the loop, the grants, without a push)."""
        self.stop()
        self.drain()
        self.released = True
        self.evtchn.close()

    # ---- the batch pipeline -------------------------------------------------------

    def _halt(self, message: str) -> None:
        self.broken = True
        log.error("ring halted: %s", message)
        if self.on_broken:
            self.on_broken(message)

    def _dispatch(self, batch: np.ndarray, slots: np.ndarray) -> None:
        """Validate, map and submit one batch; ``slots`` are the requests' restart-journal
        entries (-1 without a journal)."""
        st = self._stats
        st.batches += 1
        st.max_batch = max(st.max_batch, len(batch))
        n = len(batch)
        v = validate_batch(batch, self.ring.abi, self.geometry)
        ops = v.io_op
        op = batch["operation"]

        # Every data segment of the batch, flattened: inline ones first (in request
        # order), then the fetched descriptors of indirect requests.
        nseg = np.where((v.status == PENDING) & INLINE_OPS[op], batch["nr_segments"], 0)
        used = np.arange(ring.BLKIF_MAX_SEGMENTS_PER_REQUEST)[None, :] < nseg[:, None]
        seg_parts = [batch["seg"][used]]
        owner_parts = [np.repeat(np.arange(n), nseg)]
        seg_first = np.concatenate(([0], np.cumsum(nseg)[:-1])).astype(np.int64)
        seg_count = nseg.astype(np.int64)
        total = int(nseg.sum())
        for i, descs in self._fetch_indirect(batch, v).items():
            seg_parts.append(descs)
            owner_parts.append(np.full(len(descs), i))
            seg_first[i], seg_count[i] = total, len(descs)
            total += len(descs)
        segs = np.concatenate(seg_parts) if len(seg_parts) > 1 else seg_parts[0]
        owner = np.concatenate(owner_parts) if len(owner_parts) > 1 else owner_parts[0]

        held = self.pages.acquire(segs, owner, ops[owner] == BLKIF_OP_READ)
        for i in held.failed:
            v.refuse(i, BLKIF_RSP_ERROR, "bad grant reference")

        refused = v.status != PENDING
        if refused.any():
            for i in np.flatnonzero(refused):
                self._log.warning(
                    "request id=%d op=%d refused: %s",
                    int(batch["id"][i]), int(op[i]), v.reason(i),
                )
        go = np.flatnonzero(~refused)
        moves_data = n == 1 and len(go) == 1 and v.nbytes[0] > 0 and (
            ops[0] in (BLKIF_OP_READ, BLKIF_OP_WRITE) or FLUSHING_OPS[ops[0] & 0xFF])
        if moves_data and self.qos is not None and self.qos.active:
            self._qos_wait(ops[0] != BLKIF_OP_READ, int(v.nbytes[0]))
        if not len(go):
            held.release()
            self._answer(batch["id"], v.rsp_operation, v.status, slots)
            return
        # Refused requests hold no grants: answer them now, the rest when their I/O ends.
        if refused.any():
            self._answer(batch["id"][refused], v.rsp_operation[refused], v.status[refused],
                         slots[refused])

        # One engine entry per request, two for a flush/barrier carrying data (flush
        # first: QEMU's presync, Linux's PREFLUSH write), all in ring order.
        gop = ops[go]
        flushing = FLUSHING_OPS[gop]
        nbytes = v.nbytes[go]
        count = 1 + (flushing & (nbytes > 0))
        owner_e = np.repeat(go, count)
        first_entry = np.repeat(np.cumsum(count) - count, count)
        lead = np.arange(len(owner_e)) == first_entry
        kind = _KIND[ops[owner_e]]
        kind = np.where(FLUSHING_OPS[ops[owner_e]] & lead, io.FLUSH, kind)
        has_data = (kind == io.READ) | (kind == io.WRITE)
        vec = IoVector(
            kind=kind,
            offset=np.where(kind == io.FLUSH, 0,
                            batch["sector_number"][owner_e].astype(np.uint64) << SECTOR_SHIFT),
            length=np.where(kind == io.FLUSH, 0, v.nbytes[owner_e]),
            iov_first=np.where(has_data, seg_first[owner_e], 0),
            iov_count=np.where(has_data, seg_count[owner_e], 0),
            iov=held.iov,
            owner=owner_e,
        )
        reads = go[gop == BLKIF_OP_READ]
        st.rd_req += len(reads)
        st.rd_sect += int(v.nbytes[reads].sum()) >> SECTOR_SHIFT
        writes = go[(gop == BLKIF_OP_WRITE) | flushing]
        st.wr_req += int(np.count_nonzero(gop == BLKIF_OP_WRITE))
        st.wr_sect += int(v.nbytes[writes].sum()) >> SECTOR_SHIFT
        st.f_req += int(np.count_nonzero(flushing))
        st.ds_req += int(np.count_nonzero(gop == BLKIF_OP_DISCARD))
        bid = self._next_batch
        self._next_batch += 1
        vec.tag = bid
        self._batches[bid] = _Batch(batch["id"], v.rsp_operation, v.status, held, go, reads,
                                    slots)
        self.engine.submit(vec)
        lib.blkpy_crash_point(1)

    def _fetch_indirect(self, batch: np.ndarray, v: Verdict) -> dict[int, np.ndarray]:
        """Validated descriptors of the batch's indirect requests (bad ones refused)."""
        ind = batch.view(self.ring.abi.indirect)
        todo = np.flatnonzero((v.status == PENDING) & (batch["operation"] == BLKIF_OP_INDIRECT))
        good: dict[int, np.ndarray] = {}
        if not len(todo):
            return good
        grefs, counts = {}, {}
        for i in todo.tolist():
            n = int(ind["nr_segments"][i])
            grefs[i] = ind["indirect_grefs"][i, : indirect_pages(n)].copy()
            counts[i] = n
        mapper = self.pages if isinstance(self.pages, GrantMapper) else None
        fetched = fetch_indirect(self.platform, self.domid, grefs, counts, mapper)
        for i in todo.tolist():
            descs = fetched.get(i)
            if descs is None:  # bad page, or (defensively) never fetched: never I/O without it
                v.refuse(i, BLKIF_RSP_ERROR, "bad indirect grant reference")
                continue
            nbytes, reason = validate_indirect(descs, int(ind["sector_number"][i]), self.geometry)
            if reason:
                v.refuse(i, BLKIF_RSP_ERROR, reason)
            else:
                v.nbytes[i] = nbytes
                good[i] = descs
        return good

    def _account(self, done: list[IoVector]) -> None:
        if done:
            lib.blkpy_crash_point(2)
        for vec in done:
            b = self._batches.pop(vec.tag)
            res = vec.result
            if res.any():
                for k in np.flatnonzero(res):
                    i = int(vec.owner[k])
                    if b.status[i] != PENDING:
                        continue
                    if res[k] == -errno.EOPNOTSUPP:
                        b.status[i] = BLKIF_RSP_EOPNOTSUPP
                    else:
                        b.status[i] = BLKIF_RSP_ERROR
                        self._log.warning("I/O error on request id=%d: %s", int(b.ids[i]),
                                          errno.errorcode.get(int(-res[k]), int(res[k])))
            self._finish(b)

    def _finish(self, b: _Batch) -> None:
        ok_reads = b.reads[b.status[b.reads] == PENDING]
        for i in b.pages.finish(ok_reads):
            b.status[i] = BLKIF_RSP_ERROR
        b.pages.release()  # grants dropped before the guest can see any response
        status = b.status[b.members]
        status[status == PENDING] = BLKIF_RSP_OKAY
        self._answer(b.ids[b.members], b.rsp_ops[b.members], status, b.slots[b.members])

    def _answer(self, ids: np.ndarray, ops: np.ndarray, status: np.ndarray,
                slots: np.ndarray) -> None:
        st = self._stats
        st.errors += int(np.count_nonzero(status == BLKIF_RSP_ERROR))
        st.eopnotsupp += int(np.count_nonzero(status == BLKIF_RSP_EOPNOTSUPP))
        self.ring.produce(ids, ops, status, slots)

    def _push(self) -> None:
        if self.ring.push_responses():
            self.evtchn.notify()
