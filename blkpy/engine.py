"""I/O engines: how a batch of disk operations reaches the image.

The dispatcher hands an engine a whole batch of ``IoOp`` in ring order and later collects
completed ops, possibly out of order. Engines must keep FLUSH/DISCARD ordered after every op
submitted before them. ``SyncEngine`` runs a batch at submit time (raw images: one call into
C that loops over preadv/pwritev with the GIL released); ``ThreadEngine`` runs the same
work on one worker thread so the event loop keeps consuming the ring while I/O is under
way, signalling completions through an eventfd.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import errno
import os
import threading
from collections.abc import Sequence

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


@dataclasses.dataclass(slots=True)
class IoOp:
    """One disk operation. ``iov`` holds (address, length) rows of local memory (mapped
    guest pages or a bounce buffer) for READ/WRITE. ``result`` is 0 or -errno when done."""

    kind: int
    offset: int
    length: int
    iov: np.ndarray | None = None
    tag: object = None
    result: int | None = None


def _views(iov: np.ndarray) -> list[memoryview]:
    return [memoryview(ffi.buffer(ffi.cast("char *", int(a)), int(n))) for a, n in iov]


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def run_ops(disk: Disk, ops: Sequence[IoOp]) -> None:
    """Execute ops in order, setting each ``result``. Runs of reads/writes on a raw disk
    cross into C once; everything else goes through the Disk interface."""
    fd = disk.direct_fd
    i = 0
    while i < len(ops):
        op = ops[i]
        if fd is not None and op.kind in (READ, WRITE):
            j = i
            while j < len(ops) and ops[j].kind in (READ, WRITE):
                j += 1
            _run_direct(fd, ops[i:j])
            i = j
            continue
        try:
            if op.kind == READ:
                disk.readv(op.offset, _views(op.iov))
            elif op.kind == WRITE:
                disk.writev(op.offset, _views(op.iov))
            elif op.kind == FLUSH:
                disk.flush()
            elif op.kind == DISCARD:
                disk.discard(op.offset, op.length)
            op.result = 0
        except NotImplementedError:
            op.result = -errno.EOPNOTSUPP
        except Exception as exc:  # an image error fails this request, never the loop
            op.result = -_errno_of(exc)
        i += 1


def _run_direct(fd: int, ops: Sequence[IoOp]) -> None:
    """One blkpy_io_batch call for a run of reads/writes on a raw file."""
    ios = np.zeros(len(ops), dtype=_IO_DTYPE)
    iovs = np.concatenate([op.iov for op in ops]).astype(np.uint64, copy=False)
    first = 0
    for k, op in enumerate(ops):
        count = len(op.iov)
        ios[k] = (fd, op.kind, op.offset, first, count, 0)
        first += count
    iov_arr = np.ascontiguousarray(iovs.reshape(-1, 2)).view(IOVEC_DTYPE)
    if any(len(op.iov) > _MAX_IOV for op in ops):
        for op in ops:
            op.result = -errno.EINVAL
        return
    lib.blkpy_io_batch(
        ffi.cast("struct blkpy_io *", ios.ctypes.data),
        len(ops),
        ffi.cast("const struct iovec *", iov_arr.ctypes.data),
    )
    for k, op in enumerate(ops):
        res = int(ios["result"][k])
        op.result = res if res < 0 else (0 if res == op.length else -errno.EIO)


class IoEngine(abc.ABC):
    """Submit batches, collect completions."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk

    @abc.abstractmethod
    def submit(self, ops: Sequence[IoOp]) -> None:
        """Queue a batch (kept in order relative to earlier batches' flushes)."""

    @abc.abstractmethod
    def completions(self) -> list[IoOp]:
        """Ops finished since the last call (never blocks)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> list[IoOp]:
        """Block until at least one op completes (or timeout); returns completions."""

    def fileno(self) -> int | None:
        """Readable when completions are waiting; None for engines that finish in submit."""
        return None

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Ops submitted and not yet returned by completions()."""

    def close(self) -> None:  # noqa: B027 - engines without resources need nothing
        """Stop; pending work is finished first."""


class SyncEngine(IoEngine):
    """Runs each batch inside submit()."""

    def __init__(self, disk: Disk) -> None:
        super().__init__(disk)
        self._done: list[IoOp] = []

    def submit(self, ops: Sequence[IoOp]) -> None:
        run_ops(self.disk, ops)
        self._done.extend(ops)

    def completions(self) -> list[IoOp]:
        done, self._done = self._done, []
        return done

    def wait(self, timeout: float | None = None) -> list[IoOp]:
        return self.completions()

    @property
    def in_flight(self) -> int:
        return len(self._done)


class ThreadEngine(IoEngine):
    """One worker thread executes batches in FIFO order (so flush ordering holds); the
    native batch call releases the GIL, so the ring loop keeps running meanwhile."""

    def __init__(self, disk: Disk) -> None:
        super().__init__(disk)
        self._queue: collections.deque[list[IoOp]] = collections.deque()
        self._done: list[IoOp] = []
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
                batch = self._queue.popleft()
            run_ops(self.disk, batch)
            with self._cond:
                self._done.extend(batch)
                self._cond.notify_all()
            os.eventfd_write(self._efd, 1)

    def submit(self, ops: Sequence[IoOp]) -> None:
        if not ops:
            return
        with self._cond:
            self._queue.append(list(ops))
            self._submitted += len(ops)
            self._cond.notify_all()

    def completions(self) -> list[IoOp]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        with self._lock:
            done, self._done = self._done, []
        self._returned += len(done)
        return done

    def wait(self, timeout: float | None = None) -> list[IoOp]:
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


def _zero_tail(iov: np.ndarray, skip: int) -> None:
    """Zero what a short read (end of file) left unfilled after ``skip`` bytes."""
    for addr, length in iov:
        addr, length = int(addr), int(length)
        if skip >= length:
            skip -= length
            continue
        ffi.memmove(ffi.cast("char *", addr + skip), bytes(length - skip), length - skip)
        skip = 0


class UringEngine(IoEngine):
    """io_uring: a whole batch in one io_uring_enter, completions out of order as the
    device finishes them, so the guest's queue depth reaches the storage (O_DIRECT and
    real disks). Flushes carry IOSQE_IO_DRAIN, which orders them after every earlier op.
    Disks without a direct fd (qcow2) and discards run synchronously once the ring has
    drained."""

    def __init__(self, disk: Disk, entries: int = 256) -> None:
        super().__init__(disk)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = ffi.new("int *")
        self._ring = lib.blkpy_uring_new(entries, self._efd, err)
        if self._ring == ffi.NULL:
            os.close(self._efd)
            raise OSError(err[0], f"io_uring unavailable: {os.strerror(err[0])}")
        self._entries = entries
        self._pending: dict[int, IoOp] = {}
        self._backlog: collections.deque[IoOp] = collections.deque()
        self._done: list[IoOp] = []
        self._next = 0
        self._ud = np.zeros(entries, dtype=np.uint64)
        self._res = np.zeros(entries, dtype=np.int64)

    def submit(self, ops: Sequence[IoOp]) -> None:
        self._backlog.extend(ops)
        self._pump()

    def _pump(self) -> None:
        fd = self.disk.direct_fd
        batch: list[IoOp] = []
        while self._backlog:
            op = self._backlog[0]
            if fd is None or op.kind == DISCARD:
                if batch or self._pending:
                    break  # ordered after everything before it: wait for a drain
                self._backlog.popleft()
                run_ops(self.disk, [op])
                self._done.append(op)
                continue
            if len(batch) + len(self._pending) >= self._entries:
                break
            batch.append(self._backlog.popleft())
        if not batch:
            return
        uio = np.zeros(len(batch), dtype=_UIO_DTYPE)
        for k, op in enumerate(batch):
            ud = self._next
            self._next += 1
            self._pending[ud] = op
            if op.kind == FLUSH:
                uio[k] = (fd, 2, 0, 0, 0, ud)
            else:
                uio[k] = (fd, op.kind, op.offset, op.iov.ctypes.data, len(op.iov), ud)
        queued = lib.blkpy_uring_submit(self._ring, ffi.cast("struct blkpy_uio *",
                                                             uio.ctypes.data), len(batch))
        if queued < 0:  # the ring refused the batch: fail it rather than hang
            for k in range(len(batch)):
                op = self._pending.pop(int(uio["user_data"][k]))
                op.result = queued
                self._done.append(op)

    def _reap(self, min_complete: int) -> None:
        n = lib.blkpy_uring_reap(self._ring, ffi.cast("uint64_t *", self._ud.ctypes.data),
                                 ffi.cast("int64_t *", self._res.ctypes.data), self._entries,
                                 min_complete)
        for k in range(max(n, 0)):
            op = self._pending.pop(int(self._ud[k]))
            res = int(self._res[k])
            if res < 0 or op.kind in (FLUSH, DISCARD):
                op.result = min(res, 0)
            elif res == op.length:
                op.result = 0
            elif op.kind == READ:
                _zero_tail(op.iov, res)
                op.result = 0
            else:
                op.result = -errno.EIO
            self._done.append(op)
        self._pump()

    def completions(self) -> list[IoOp]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        if self._pending:
            self._reap(0)
        done, self._done = self._done, []
        return done

    def wait(self, timeout: float | None = None) -> list[IoOp]:
        if not self._done and self._pending:
            self._reap(1)
        return self.completions()

    def fileno(self) -> int | None:
        return self._efd

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._backlog) + len(self._done)

    def close(self) -> None:
        while self._pending or self._backlog:
            self._reap(1 if self._pending else 0)
        lib.blkpy_uring_free(self._ring)
        os.close(self._efd)


ENGINES = {"sync": SyncEngine, "thread": ThreadEngine, "uring": UringEngine}


def make_engine(name: str, disk: Disk) -> IoEngine:
    try:
        return ENGINES[name](disk)
    except KeyError:
        raise ValueError(f"unknown I/O engine {name!r} (one of {', '.join(ENGINES)})") from None
