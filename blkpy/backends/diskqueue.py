"""A network disk's asynchronous queue (``blkpy/backends/diskq.h``) seen from Python, and
the I/O engine on one.

NBD and Ceph RBD disks lend such queues: the native ring loop drives one itself
(``Disk.loop_queue``), and each ring's Python engine has one of its own (``QueueEngine``),
so the two never consume each other's completions. A queue takes a batch of ops in one
call and hands completions back on an eventfd the ring thread sleeps on, like io_uring's.
"""

from __future__ import annotations

import errno
import select
from typing import Any

import numpy as np

from blkpy.backends.base import Disk
from blkpy.engine import IoEngine, IoVector
from blkpy.gntdev.native import ffi, lib

#: struct blkpy_queue_op; kinds READ/WRITE/FLUSH/DISCARD are the engine's (a DISCARD is a
#: write of zeros that may release the space: what Disk.discard promises), then TRIM
OP_DTYPE = np.dtype(
    {
        "names": ["kind", "iov_count", "offset", "length", "iov_addr", "user_data"],
        "formats": ["<u4", "<u4", "<u8", "<u8", "<u8", "<u8"],
        "offsets": [0, 4, 8, 16, 24, 32],
        "itemsize": 40,
    }
)
TRIM = lib.BLKPY_QOP_TRIM
_IOVEC_SIZE = 16
_REAP_MAX = 256


class DiskQueue:
    """One C queue: ops in, (user_data, 0 or -errno) out."""

    def __init__(self, native: Any, what: str) -> None:
        if native == ffi.NULL:
            raise OSError(errno.ENOMEM, f"cannot create {what}")
        self._q = native
        self._ud = np.zeros(_REAP_MAX, dtype=np.uint64)
        self._res = np.zeros(_REAP_MAX, dtype=np.int64)

    def fileno(self) -> int:
        return int(lib.blkpy_queue_fd(self._q))

    @property
    def native(self) -> Any:
        """The C queue, for the native ring loop (blkpy/gntdev/ringloop.c)."""
        return self._q

    def submit(self, ops: np.ndarray) -> int:
        """0 or -errno (nothing was queued)."""
        return int(lib.blkpy_queue_submit(
            self._q, ffi.cast("struct blkpy_queue_op *", ops.ctypes.data), len(ops)))

    def reap(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while True:
            n = lib.blkpy_queue_reap(self._q, ffi.cast("uint64_t *", self._ud.ctypes.data),
                                     ffi.cast("int64_t *", self._res.ctypes.data), _REAP_MAX)
            out += zip(self._ud[:n].tolist(), self._res[:n].tolist(), strict=True)
            if n < _REAP_MAX:
                return out

    def wait(self, timeout: float | None) -> None:
        select.select([self.fileno()], [], [], timeout)

    def close(self) -> None:
        """Waits for what is still in flight, then frees the queue."""
        if self._q != ffi.NULL:
            lib.blkpy_queue_free(self._q)
            self._q = ffi.NULL


class QueueEngine(IoEngine):
    """A ring's requests to a disk's queue: a batch is handed over in one call, and
    completions come back on the queue's eventfd, which the ring loop sleeps on
    (``fileno``). Flushes and discards wait for everything before them (the queue's
    ordering)."""

    def __init__(self, disk: Disk, queue: DiskQueue) -> None:
        super().__init__(disk)
        self._q = queue
        self._vectors: dict[int, IoVector] = {}
        self._done: list[IoVector] = []
        self._next_vid = 0

    def submit(self, vec: IoVector) -> None:
        n = len(vec)
        if not n:  # nothing would ever complete it
            vec.pending = 0
            self._done.append(vec)
            return
        vid = self._next_vid
        self._next_vid = (vid + 1) & 0xFFFFFFFF
        ops = np.zeros(n, dtype=OP_DTYPE)
        ops["kind"] = vec.kind
        ops["offset"] = vec.offset
        ops["length"] = vec.length
        # the iovec rows stay in vec.iov, alive until the vector is returned
        ops["iov_addr"] = vec.iov.ctypes.data + vec.iov_first.astype(np.uint64) * _IOVEC_SIZE
        ops["iov_count"] = vec.iov_count
        ops["user_data"] = (np.uint64(vid) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
        self._vectors[vid] = vec
        err = self._q.submit(ops)
        if err:  # nothing was queued (out of memory): fail the batch, never hang it
            vec.result[:] = err
            vec.pending = 0
            del self._vectors[vid]
            self._done.append(vec)

    def completions(self) -> list[IoVector]:
        for ud, res in self._q.reap():
            vid = ud >> 32
            vec = self._vectors[vid]
            vec.result[ud & 0xFFFFFFFF] = res
            vec.pending -= 1
            if vec.pending == 0:
                del self._vectors[vid]
                self._done.append(vec)
        done, self._done = self._done, []
        return done

    def wait(self, timeout: float | None = None) -> list[IoVector]:
        if not self._done and self._vectors:
            self._q.wait(timeout)
        return self.completions()

    def fileno(self) -> int | None:
        return self._q.fileno()

    @property
    def in_flight(self) -> int:
        return len(self._vectors) + len(self._done)

    def close(self) -> None:
        """Waits for what is in flight (an NBD disk: bounded by its reconnect delay)."""
        while self._vectors:
            self.wait(1.0)
        self._q.close()
