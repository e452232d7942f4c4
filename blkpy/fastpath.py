"""The native ring loop (blkpy/gntdev/ringloop.c) seen from Python: its C structures built
from the Python objects they mirror, and one object per ring to run it.

The loop serves the common case (valid READ/WRITE/FLUSH/BARRIER and indirect READ/WRITE
on persistent grants, of a raw image or the known clusters of a qcow2 image) with one call
that releases the GIL and returns only when something needs
Python: a request it does not serve, a wake-up from the control plane, a broken ring. The
numpy validator in blkpy.requests stays the reference; ``validate_native`` exposes the C
verdicts so a property test can hold the two equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import numpy as np

from blkpy import ring
from blkpy.gntdev.native import ffi, lib
from blkpy.native_table import ExtentMap, PersistentGrantTable
from blkpy.platform import EventChannel, NativeEventChannel
from blkpy.requests import DiskGeometry

IDLE = lib.BLKPY_LOOP_IDLE
SLOW = lib.BLKPY_LOOP_SLOW
WAKE = lib.BLKPY_LOOP_WAKE
OVERFLOW = lib.BLKPY_LOOP_OVERFLOW
EVTCHN = lib.BLKPY_LOOP_EVTCHN
NOTIFY = lib.BLKPY_LOOP_NOTIFY
EXTENT = lib.BLKPY_LOOP_EXTENT
IDLE_WORK = lib.BLKPY_LOOP_IDLE_WORK

#: How the loop does data I/O: all synchronous (preadv/pwritev), all through io_uring
#: (O_DIRECT: the guest's queue depth must reach the device), or hybrid: the reads of
#: batches of at least ASYNC_READS_MIN requests through io_uring (one system call for the
#: batch beats one preadv each on the page cache), single reads and every buffered write
#: synchronous (io_uring punts buffered writes to a worker thread). `blkpy bench` measured
#: the three (README, design notes).
SYNC, HYBRID, ASYNC = "sync", "hybrid", "async"
ASYNC_READS_MIN = 2

#: counters the loop keeps that mean the same as VbdStats fields
STAT_FIELDS = ("rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "errors",
               "batches")
#: the loop's own figures of merit (notifications, sleeps, polling)
LOOP_FIELDS = ("notifies", "wakeups", "sleeps", "polls_hit", "polls_missed", "io_errors",
               "spurious_wakeups", "late_acks", "c_in_flight", "submits")


def add_counters(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Counters of ``a`` and ``b`` together (a ``max_`` figure stays the maximum); a new
    dict, the inputs are left alone."""
    out = dict(a)
    for name, value in b.items():
        old = out.get(name, 0)
        out[name] = max(old, value) if name.startswith("max_") else old + value
    return out


def fill_geometry(target: object, geom: DiskGeometry) -> None:
    """Copy a DiskGeometry into a ``struct blkpy_geometry``."""
    target.sectors = geom.sectors  # type: ignore[attr-defined]
    target.sector_size = geom.sector_size  # type: ignore[attr-defined]
    target.max_indirect_segments = geom.max_indirect_segments  # type: ignore[attr-defined]
    target.readonly = geom.readonly  # type: ignore[attr-defined]
    target.discard = geom.discard  # type: ignore[attr-defined]
    target.secure_discard = geom.secure_discard  # type: ignore[attr-defined]
    target.flush = geom.flush  # type: ignore[attr-defined]
    target.barrier = geom.barrier  # type: ignore[attr-defined]


@dataclasses.dataclass
class NativeVerdict:
    code: np.ndarray
    nbytes: np.ndarray
    rsp_operation: np.ndarray
    io_op: np.ndarray


def validate_native(batch: np.ndarray, abi: ring.Abi, geom: DiskGeometry) -> NativeVerdict:
    """The C loop's first-stage verdicts of a batch of slots (for the differential test)."""
    n = len(batch)
    slots = np.ascontiguousarray(batch).view(abi.raw)
    out = NativeVerdict(np.zeros(n, np.int8), np.zeros(n, np.int64), np.zeros(n, np.uint8),
                        np.zeros(n, np.int64))
    g = ffi.new("struct blkpy_geometry *")
    fill_geometry(g, geom)
    lib.blkpy_validate_slots(
        ffi.cast("uint8_t *", slots.ctypes.data), n, ring.slot_layout(abi), g,
        ffi.cast("int8_t *", out.code.ctypes.data), ffi.cast("int64_t *", out.nbytes.ctypes.data),
        ffi.cast("uint8_t *", out.rsp_operation.ctypes.data),
        ffi.cast("int64_t *", out.io_op.ctypes.data),
    )
    return out


def _fill_evtchn(target: object, spec: NativeEventChannel | None) -> None:
    if spec is None:
        target.kind = lib.BLKPY_EVTCHN_PYTHON  # type: ignore[attr-defined]
        target.fd = -1  # type: ignore[attr-defined]
        return
    target.kind = spec.kind  # type: ignore[attr-defined]
    target.fd = spec.fd  # type: ignore[attr-defined]
    target.local_port = spec.local_port  # type: ignore[attr-defined]
    target.notify_ioctl = spec.notify_ioctl  # type: ignore[attr-defined]
    target.port_entry = ffi.cast("uint64_t *", spec.port_entry)  # type: ignore[attr-defined]
    prefix = spec.name_prefix
    if len(prefix) > len(target.name_prefix):  # type: ignore[attr-defined]
        raise ValueError("event-channel socket name too long")
    target.name_prefix = prefix  # type: ignore[attr-defined]
    target.name_prefix_len = len(prefix)  # type: ignore[attr-defined]


class RingLoop:
    """One ring's native loop. ``run`` is called without holding anything: cffi releases
    the GIL for the call, so a loop sleeping or polling never blocks other threads."""

    def __init__(self, back: ring.BackRing, geom: DiskGeometry, evtchn: EventChannel, *,
                 disk_fd: int | None, grants: PersistentGrantTable | None, poll_us: int,
                 max_batch: int, io_fd: int | None = None, io_mode: str = SYNC,
                 extents: ExtentMap | None = None, queue: Any = None) -> None:
        self._back = back  # keeps the ring struct alive
        self._grants = grants
        self._extents = extents
        self._uring = ffi.NULL
        self._uring_efd = -1
        self.native = ffi.new("struct blkpy_ringloop *")
        n = self.native
        n.ring = back.native
        layout = ring.slot_layout(back.abi)  # kept alive while its struct is copied
        n.abi = layout[0]
        fill_geometry(n.geom, geom)
        n.pgrants = grants.native if grants is not None else ffi.NULL
        if extents is not None:
            n.extents = extents.native
            n.cluster_bits = extents.cluster_bits
            io_mode = SYNC  # translated I/O is synchronous (formats are buffered)
        self.evtchn_spec = evtchn.native()
        _fill_evtchn(n.evtchn, self.evtchn_spec)
        n.disk_fd = -1 if disk_fd is None else disk_fd
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        n.wake_fd = self.wake_fd
        n.io_fd = -1 if io_fd is None else io_fd
        n.max_batch = max_batch
        n.poll_max_ns = n.poll_ns = max(poll_us, 0) * 1000
        if io_mode not in (SYNC, HYBRID, ASYNC):
            raise ValueError(f"unknown ring loop I/O mode {io_mode!r}")
        self._queue = queue  # a network disk's own completion queue (Disk.loop_queue)
        if queue is not None:
            n.diskq = queue.native
            n.uring_efd = lib.blkpy_queue_fd(queue.native)
            n.iov_per_slot = min(max(geom.max_indirect_segments, 11),
                                 lib.BLKPY_RL_MAX_INDIRECT_SEGS)
            n.async_all = 1
        elif io_mode != SYNC and disk_fd is not None and self._open_uring(
                back.size, geom.max_indirect_segments):
            n.async_all = io_mode == ASYNC
            n.async_reads_min = ASYNC_READS_MIN
        err = lib.blkpy_ringloop_open(n)
        if err < 0:
            self.close()
            raise OSError(-err, f"ring loop: {os.strerror(-err)}")
        if extents is not None:
            extents.attach(n)

    def _open_uring(self, entries: int, max_segments: int) -> bool:
        """io_uring for the loop; False where the kernel refuses it (the loop then stays
        synchronous: the caller reads ``uses_uring`` and says so)."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = ffi.new("int *")
        uring = lib.blkpy_uring_new(entries, efd, err)
        if uring == ffi.NULL:
            os.close(efd)
            return False
        self._uring, self._uring_efd = uring, efd
        self.native.uring = uring
        self.native.uring_efd = efd
        self.native.iov_per_slot = min(max(max_segments, 11), lib.BLKPY_RL_MAX_INDIRECT_SEGS)
        return True

    @property
    def uses_uring(self) -> bool:
        """Some requests go to io_uring and are answered as they complete."""
        return self._uring != ffi.NULL

    @property
    def drives_evtchn(self) -> bool:
        """The loop notifies and sleeps on its event channel by itself."""
        return self.evtchn_spec is not None

    def set_geometry(self, geom: DiskGeometry) -> None:
        fill_geometry(self.native.geom, geom)

    def run(self, may_sleep: bool, py_in_flight: int) -> int:
        self.native.py_in_flight = py_in_flight
        return int(lib.blkpy_ringloop_run(self.native, int(may_sleep)))

    def take_notify(self) -> bool:
        """A notification the loop could not send itself (Python event channel)."""
        pending = bool(self.native.notify_pending)
        self.native.notify_pending = 0
        return pending

    def want_idle_work(self) -> None:
        """Hand back IDLE_WORK the next time the ring is empty."""
        self.native.idle_work = 1

    def extent_miss(self) -> tuple[int, int, bool]:
        """After EXTENT: the request's guest byte range and whether it writes."""
        n = self.native
        return int(n.miss_off), int(n.miss_len), bool(n.miss_write)

    def stop(self) -> None:
        """Make a running (or the next) ``run`` return WAKE; callable from any thread."""
        self.native.stop = 1
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wake_fd, 1)

    def clear_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake_fd)

    @property
    def stopped(self) -> bool:
        return bool(self.native.stop)

    def counters(self) -> dict[str, int]:
        n = self.native
        return {k: int(getattr(n, k)) for k in STAT_FIELDS + LOOP_FIELDS + ("max_batch_seen",)}

    def io_errors(self) -> tuple[int, int]:
        """(I/O errors so far, the last one's errno) for the log."""
        return int(self.native.io_errors), int(self.native.last_io_errno)

    def close(self) -> None:
        """Release the loop (it must not be running; it has nothing in flight between
        calls, since it answers everything before it returns)."""
        if self._extents is not None:
            self._extents.detach(self.native)
            self._extents = None
        if self.wake_fd >= 0:
            lib.blkpy_ringloop_close(self.native)
            os.close(self.wake_fd)
            self.wake_fd = -1
        if self._queue is not None:  # after the loop: it answered all it sent
            self.native.diskq = ffi.NULL
            self._queue.close()
            self._queue = None
        if self._uring != ffi.NULL:
            lib.blkpy_uring_free(self._uring)
            os.close(self._uring_efd)
            self._uring, self._uring_efd = ffi.NULL, -1
            self.native.uring = ffi.NULL
