"""What a takeover's new process runs once on throwaway objects before its predecessor lets
go: a fresh interpreter pays for first touches (code pages, numpy's and cffi's lazy
set-ups, fresh heap and stacks) on the first run of each path, and under the lab's
emulation those first runs were tens of milliseconds each of a hand-over the guest waits
for. Nothing here touches a guest's ring, grant or event channel."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from blkpy import ring
from blkpy.backends.base import Disk
from blkpy.engine import READ, IoEngine, IoVector
from blkpy.platform import EventChannel, Platform
from blkpy.requests import DiskGeometry
from blkpy.vbd import Vbd

#: how long a rehearsal waits for its reads of the image (its predecessor is busy)
READ_TIMEOUT_S = 5.0


def rehearse_reads(engine: IoEngine, size: int) -> bool:
    """Two page reads through ``engine`` (the image's start and middle), waited for at most
    READ_TIMEOUT_S: a format's request path in Python (a qcow2 image's table lookups, its
    extent map), which is what a fresh process's first requests after a takeover take
    until it has learnt where the guest's clusters live. Whether both read."""
    page = ring.PAGE_SIZE
    if size < 2 * page:
        return False
    buf = np.zeros(3 * page, dtype=np.uint8)
    base = (buf.ctypes.data + page - 1) & ~(page - 1)  # O_DIRECT's alignment
    vec = IoVector(kind=np.full(2, READ, dtype=np.int32),
                   offset=np.array([0, (size // 2) & ~(page - 1)], dtype=np.uint64),
                   length=np.full(2, page, dtype=np.int64),
                   iov_first=np.arange(2, dtype=np.uint32), iov_count=np.ones(2, dtype=np.uint32),
                   iov=np.array([(base, page), (base + page, page)], dtype=np.uint64),
                   owner=np.arange(2))
    engine.submit(vec)
    deadline = time.monotonic() + READ_TIMEOUT_S
    done: list[IoVector] = []
    while not done and time.monotonic() < deadline:
        done = engine.wait(0.1)
    return bool(done) and not vec.result.any()


class IdleChannel(EventChannel):
    """An event channel to nobody: it polls readable never, and notifies no one.
    ``waited`` is set once a queue's thread asks for its fd (to sleep on it)."""

    local_port = 0

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.waited = threading.Event()

    def fileno(self) -> int:
        self.waited.set()
        return self._fd

    def notify(self) -> None:
        pass

    def ack(self) -> bool:
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def rehearse_queue(platform: Platform, domid: int, disk: Disk, engine: IoEngine, *,
                   grant_mode: str, poll_us: int, max_persistent_grants: int) -> bool:
    """A queue's whole life on an empty one-page ring of our own: its native loop made on
    ``disk`` and ``engine`` (an io_uring, the extent map attached), its thread started
    until it sleeps for want of requests, then stopped and closed. ``engine`` stays open
    (its owner closes it); nothing is read or written. Whether the thread got to sleep."""
    abi = ring.ABIS[ring.DEFAULT_PROTOCOL]
    back = ring.BackRing(memoryview(bytearray(ring.PAGE_SIZE)), abi, 1)
    geometry = DiskGeometry(sectors=disk.size >> ring.SECTOR_SHIFT,
                            sector_size=disk.sector_size, readonly=True)
    channel = IdleChannel()
    vbd = Vbd(platform, domid, back, channel, disk, engine, geometry,
              persistent=True, grant_mode=grant_mode, poll_us=poll_us,
              max_persistent_grants=max_persistent_grants)
    try:
        vbd.start()
        return channel.waited.wait(READ_TIMEOUT_S)
    finally:
        vbd.close()
