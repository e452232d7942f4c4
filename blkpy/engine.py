"""I/O engines: how a batch of disk operations reaches the image.

The dispatcher hands an engine a whole batch as one ``IoVector`` (entries in ring order)
and later collects completed vectors; entries may finish out of order, but FLUSH and
DISCARD stay ordered after every entry submitted before them. ``SyncEngine`` runs a batch
at submit time (raw images: one call into C that loops over preadv/pwritev with the GIL
released); ``ThreadEngine`` runs the same work on one worker thread so the event loop keeps
consuming the ring meanwhile; ``UringEngine`` submits the batch to io_uring.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import errno
import os
import threading

import numpy as np

from blkpy.backends.base import Disk
from blkpy.gntdev.native import ffi, lib

READ, WRITE, FLUSH, DISCARD = 0, 1, 2, 3

_IO_DTYPE = np.dtype(
    {
        "names": ["fd", "op", "offset", "iov_first", "iov_count", "result"],
        "formats": ["<i4", "<i4", "<u8", "<u4", "<u4", "<i8"],
        "offsets": [0, 4, 8, 16, 20, 24],
        "itemsize": 32,
    }
)
IOVEC_DTYPE = np.dtype([("base", "<u8"), ("len", "<u8")])
_MAX_IOV = 1024


@dataclasses.dataclass(eq=False)
class IoVector:
    """The disk operations of one dispatched batch, as parallel arrays in ring order.

    Entry k is ``kind[k]`` (READ/WRITE/FLUSH/DISCARD) at byte ``offset[k]`` for
    ``length[k]`` bytes; a READ/WRITE moves data through the iovec rows
    ``iov[iov_first[k] : iov_first[k] + iov_count[k]]`` (address, length) of local memory.
    ``owner[k]`` is the request it belongs to. Engines fill ``result`` (0 or -errno)."""

    kind: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    iov_first: np.ndarray
    iov_count: np.ndarray
    iov: np.ndarray
    owner: np.ndarray
    tag: object = None
    result: np.ndarray = dataclasses.field(init=False)
    pending: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.result = np.zeros(len(self.kind), dtype=np.int64)
        self.pending = len(self.kind)
        self.iov = np.ascontiguousarray(self.iov, dtype=np.uint64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.kind)

    def views(self, k: int) -> list[memoryview]:
        first = int(self.iov_first[k])
        rows = self.iov[first : first + int(self.iov_count[k])]
        return [memoryview(ffi.buffer(ffi.cast("char *", int(a)), int(n))) for a, n in rows]


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def run_vector(disk: Disk, vec: IoVector, start: int = 0) -> None:
    """Execute entries ``start:`` in order, filling ``result``. Runs of reads/writes on a
    raw disk cross into C once; everything else goes through the Disk interface."""
    fd = disk.direct_fd
    rw = vec.kind[start:] <= WRITE
    n = len(vec)
    if fd is not None and rw.all():
        _run_direct(fd, vec, start, n)
        return
    k = start
    while k < n:
        if fd is not None and vec.kind[k] <= WRITE:
            end = k
            while end < n and vec.kind[end] <= WRITE:
                end += 1
            _run_direct(fd, vec, k, end)
            k = end
            continue
        vec.result[k] = _run_one(disk, vec, k)
        k += 1


def _run_one(disk: Disk, vec: IoVector, k: int) -> int:
    kind = int(vec.kind[k])
    try:
        if kind == READ:
            disk.readv(int(vec.offset[k]), vec.views(k))
        elif kind == WRITE:
            disk.writev(int(vec.offset[k]), vec.views(k))
        elif kind == FLUSH:
            disk.flush()
        else:
            disk.discard(int(vec.offset[k]), int(vec.length[k]))
    except NotImplementedError:
        return -errno.EOPNOTSUPP
    except Exception as exc:  # an image error fails this request, never the loop
        return -_errno_of(exc)
    return 0


def _run_direct(fd: int, vec: IoVector, start: int, end: int) -> None:
    """One blkpy_io_batch call for entries start:end (all reads/writes) on a raw file."""
    n = end - start
    ios = np.zeros(n, dtype=_IO_DTYPE)
    ios["fd"] = fd
    ios["op"] = vec.kind[start:end]
    ios["offset"] = vec.offset[start:end]
    ios["iov_first"] = vec.iov_first[start:end]
    ios["iov_count"] = vec.iov_count[start:end]
    lib.blkpy_io_batch(
        ffi.cast("struct blkpy_io *", ios.ctypes.data),
        n,
        ffi.cast("const struct iovec *", vec.iov.ctypes.data),
    )
    res = ios["result"]
    vec.result[start:end] = np.where(res < 0, res, np.where(res == vec.length[start:end], 0,
                                                             -errno.EIO))


class IoEngine(abc.ABC):
    """Submit batches, collect completions."""

    #: how the native ring loop does its own I/O alongside this engine (blkpy.fastpath:
    #: "sync", "hybrid" or "async")
    loop_io = "sync"

    def __init__(self, disk: Disk) -> None:
        self.disk = disk

    @abc.abstractmethod
    def submit(self, vec: IoVector) -> None:
        """Queue a batch (kept in order relative to earlier batches' flushes)."""

    @abc.abstractmethod
    def completions(self) -> list[IoVector]:
        """Vectors whose every entry finished since the last call (never blocks)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> list[IoVector]:
        """Block until at least one vector completes (or timeout); returns completions."""

    def fileno(self) -> int | None:
        """Readable when completions are waiting; None for engines that finish in submit."""
        return None

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Vectors submitted and not yet returned by completions()."""

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing
        """Stop; pending work is finished first."""


class SyncEngine(IoEngine):
    """Runs each batch inside submit()."""

    def __init__(self, disk: Disk) -> None:
        super().__init__(disk)
        self._done: list[IoVector] = []

    def submit(self, vec: IoVector) -> None:
        run_vector(self.disk, vec)
        vec.pending = 0
        self._done.append(vec)

    def completions(self) -> list[IoVector]:
        done, self._done = self._done, []
        return done

    def wait(self, timeout: float | None = None) -> list[IoVector]:
        return self.completions()

    @property
    def in_flight(self) -> int:
        return len(self._done)


class ThreadEngine(IoEngine):
    """One worker thread executes batches in FIFO order (so flush ordering holds); the
    native batch call releases the GIL, so the ring loop keeps running meanwhile."""

    def __init__(self, disk: Disk) -> None:
        super().__init__(disk)
        self._queue: collections.deque[IoVector] = collections.deque()
        self._done: list[IoVector] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._submitted = 0
        self._returned = 0
        self._stop = False
        self._thread = threading.Thread(target=self._worker, name="blkpy-io", daemon=True)
        self._thread.start()

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                vec = self._queue.popleft()
            run_vector(self.disk, vec)
            vec.pending = 0
            with self._cond:
                self._done.append(vec)
                self._cond.notify_all()
            os.eventfd_write(self._efd, 1)

    def submit(self, vec: IoVector) -> None:
        with self._cond:
            self._queue.append(vec)
            self._submitted += 1
            self._cond.notify_all()

    def completions(self) -> list[IoVector]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        with self._lock:
            done, self._done = self._done, []
        self._returned += len(done)
        return done

    def wait(self, timeout: float | None = None) -> list[IoVector]:
        with self._cond:
            if not self._done and self._submitted > self._returned:
                self._cond.wait_for(lambda: bool(self._done), timeout)
        return self.completions()

    def fileno(self) -> int | None:
        return self._efd

    @property
    def in_flight(self) -> int:
        return self._submitted - self._returned

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        os.close(self._efd)


_UIO_DTYPE = np.dtype(
    {
        "names": ["fd", "op", "offset", "iov_addr", "iov_count", "user_data"],
        "formats": ["<i4", "<i4", "<u8", "<u8", "<u4", "<u8"],
        "offsets": [0, 4, 8, 16, 24, 32],
        "itemsize": 40,
    }
)


def _sync_result(disk: Disk, res: int) -> int:
    """A flush's result: once one sync of the disk failed, none may succeed again."""
    lost = getattr(disk, "sync_lost", None)
    if lost is None:
        return min(res, 0)
    if res < 0:
        lost[0] = 1
    return -errno.EIO if lost[0] else min(res, 0)


class UringEngine(IoEngine):
    """io_uring: a whole batch in one io_uring_enter, entries completing out of order as
    the device finishes them, so the guest's queue depth reaches the storage (O_DIRECT and
    real disks). Flushes carry IOSQE_IO_DRAIN, which orders them after every earlier op.
    Vectors with discards, and disks without a direct fd (qcow2), run synchronously once
    the ring has drained."""

    loop_io = "async"

    def __init__(self, disk: Disk, entries: int = 256) -> None:
        super().__init__(disk)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = ffi.new("int *")
        self._ring = lib.blkpy_uring_new(entries, self._efd, err)
        if self._ring == ffi.NULL:
            os.close(self._efd)
            raise OSError(err[0], f"io_uring unavailable: {os.strerror(err[0])}")
        self._entries = entries
        self._vectors: dict[int, IoVector] = {}
        self._backlog: collections.deque[tuple[int, int]] = collections.deque()  # (vid, next)
        self._done: list[IoVector] = []
        self._in_ring = 0
        self._next_vid = 0
        self._ud = np.zeros(entries, dtype=np.uint64)
        self._res = np.zeros(entries, dtype=np.int64)

    def submit(self, vec: IoVector) -> None:
        vid = self._next_vid
        self._next_vid = (self._next_vid + 1) & 0xFFFFFFFF
        self._vectors[vid] = vec
        self._backlog.append((vid, 0))
        self._pump()

    def _pump(self) -> None:
        fd = self.disk.direct_fd
        while self._backlog:
            vid, first = self._backlog[0]
            vec = self._vectors[vid]
            if fd is None or (vec.kind == DISCARD).any():
                if self._in_ring:
                    return  # ordered after everything before it: wait for a drain
                self._backlog.popleft()
                run_vector(self.disk, vec)
                self._complete(vid, len(vec))
                continue
            room = self._entries - self._in_ring
            if room == 0:
                return
            last = min(len(vec), first + room)
            nxt = first + self._queue(vid, vec, fd, first, last)
            if nxt == len(vec):
                self._backlog.popleft()
            else:
                self._backlog[0] = (vid, nxt)
            if nxt < last:
                return  # the kernel took fewer: retry after completions

    def _queue(self, vid: int, vec: IoVector, fd: int, first: int, last: int) -> int:
        """Submit entries first:last; returns how many the ring took."""
        n = last - first
        uio = np.zeros(n, dtype=_UIO_DTYPE)
        kind = vec.kind[first:last]
        uio["fd"] = fd
        uio["op"] = np.where(kind == FLUSH, 2, kind)
        uio["offset"] = vec.offset[first:last]
        uio["iov_addr"] = vec.iov.ctypes.data + vec.iov_first[first:last].astype(np.uint64) * 16
        uio["iov_count"] = vec.iov_count[first:last]
        uio["user_data"] = (np.uint64(vid) << np.uint64(32)) | np.arange(first, last,
                                                                          dtype=np.uint64)
        queued = lib.blkpy_uring_submit(self._ring, ffi.cast("struct blkpy_uio *",
                                                             uio.ctypes.data), n)
        if queued < 0:  # the ring refused the batch: fail it rather than hang
            vec.result[first:last] = queued
            self._complete(vid, n)
            return n
        self._in_ring += queued
        return queued

    def _complete(self, vid: int, count: int) -> None:
        vec = self._vectors[vid]
        vec.pending -= count
        if vec.pending <= 0:
            vec.pending = 0
            del self._vectors[vid]
            self._done.append(vec)

    def _reap(self, min_complete: int) -> None:
        n = lib.blkpy_uring_reap(self._ring, ffi.cast("uint64_t *", self._ud.ctypes.data),
                                 ffi.cast("int64_t *", self._res.ctypes.data), self._entries,
                                 min_complete)
        for k in range(max(n, 0)):
            ud, res = int(self._ud[k]), int(self._res[k])
            vid, entry = ud >> 32, ud & 0xFFFFFFFF
            vec = self._vectors[vid]
            kind = int(vec.kind[entry])
            if kind == FLUSH:
                vec.result[entry] = _sync_result(self.disk, res)
            elif res < 0:
                vec.result[entry] = res
            elif res == vec.length[entry]:
                vec.result[entry] = 0
            elif kind == READ:
                # Short: the end of the file, or an I/O error after the first pages (the
                # kernel returns what it copied). Read again synchronously, which retries
                # and tells the two apart (zeros past the end, the error otherwise).
                fd = self.disk.direct_fd
                assert fd is not None  # only raw files' entries go to the ring
                _run_direct(fd, vec, entry, entry + 1)
            else:
                vec.result[entry] = -errno.EIO
            self._in_ring -= 1
            self._complete(vid, 1)
        self._pump()

    def completions(self) -> list[IoVector]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        if self._in_ring:
            self._reap(0)
        done, self._done = self._done, []
        return done

    def wait(self, timeout: float | None = None) -> list[IoVector]:
        if not self._done and self._in_ring:
            self._reap(1)
        return self.completions()

    def fileno(self) -> int | None:
        return self._efd

    @property
    def in_flight(self) -> int:
        return len(self._vectors) + len(self._done)

    def close(self) -> None:
        while self._vectors:
            self._reap(1 if self._in_ring else 0)
        lib.blkpy_uring_free(self._ring)
        os.close(self._efd)


ENGINES = {"sync": SyncEngine, "thread": ThreadEngine, "uring": UringEngine}


def make_engine(name: str, disk: Disk) -> IoEngine:
    """``auto``: io_uring where it pays. An O_DIRECT image goes through io_uring (the
    guest's queue depth must reach the device; ``sync`` where the kernel refuses io_uring).
    On the page cache the reference path stays ``sync`` and the native loop is hybrid:
    io_uring for the reads of deep batches, preadv/pwritev for the rest (`blkpy bench`
    measured each; README design notes). A disk that only its own client library can reach
    (NBD) brings its engine."""
    own_engine = getattr(disk, "engine", None)
    if name == "auto" and own_engine is not None:
        return own_engine()
    if name == "auto":
        if disk.o_direct:
            try:
                return UringEngine(disk)
            except OSError:
                pass
        engine = SyncEngine(disk)
        engine.loop_io = "sync" if disk.o_direct else "hybrid"
        return engine
    try:
        return ENGINES[name](disk)
    except KeyError:
        raise ValueError(f"unknown I/O engine {name!r} (one of auto, {', '.join(ENGINES)})") from None
