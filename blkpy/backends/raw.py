"""Raw images: a regular file or a block device, byte for byte the virtual disk."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence

from blkpy.backends.base import Disk, DiskError
from blkpy.gntdev.native import ffi

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
_BLKDISCARD = 0x1277  # _IO(0x12, 119)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range of a file; it reads back as zeros (FALLOC_FL_PUNCH_HOLE)."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class RawDisk(Disk):
    """A raw image. ``sector_size`` is the logical block size advertised to the guest."""

    def __init__(
        self, path: str, readonly: bool = False, sector_size: int = 512, direct: bool = False
    ) -> None:
        if sector_size not in (512, 4096):
            raise DiskError(f"sector size {sector_size} not supported (512 or 4096)")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self._fd = os.open(path, flags)
        except OSError as exc:
            raise DiskError(f"cannot open {path}: {exc.strerror}") from None
        self.path = path
        self.readonly = readonly
        self.sector_size = sector_size
        self.o_direct = direct
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        if not (self._is_block or stat.S_ISREG(st.st_mode)):
            os.close(self._fd)
            raise DiskError(f"{path} is neither a regular file nor a block device")
        self.refresh_size()
        self.can_discard = not readonly
        self.discard_granularity = max(4096, sector_size)
        self._closed = False
        #: set once a sync failed; shared with the ring loops (int32_t, see ringloop.h)
        self.sync_lost = ffi.new("int32_t *")

    @property
    def direct_fd(self) -> int | None:
        return self._fd

    def refresh_size(self) -> int:
        if self._is_block:
            buf = fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8)
            nbytes = struct.unpack("=Q", buf)[0]
        else:
            nbytes = os.fstat(self._fd).st_size
        # A tail shorter than one logical sector is not addressable by the guest.
        self.size = nbytes - nbytes % self.sector_size
        return self.size

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.check_range(offset, sum(len(b) for b in bufs))
        views = [memoryview(b).cast("B") for b in bufs]
        n = preadv_full(self._fd, views, offset)
        for v in _advance(views, n):  # shrunk under us: the rest reads as zeros
            v[:] = bytes(len(v))

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, "disk is read-only")
        self.check_range(offset, sum(len(b) for b in bufs))
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            n = os.pwritev(self._fd, views, offset)
            offset += n
            views = _advance(views, n)

    def flush(self) -> None:
        if self.readonly:
            return
        if self.sync_lost[0]:
            raise OSError(errno.EIO, f"{self.path}: an earlier sync failed; written data "
                          "may be lost, no flush can succeed")
        try:
            os.fdatasync(self._fd)
        except OSError:
            # The kernel may have dropped the pages it could not write and will not
            # report it again: every later flush must fail too.
            self.sync_lost[0] = 1
            raise

    def discard(self, offset: int, length: int) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, "disk is read-only")
        self.check_range(offset, length)
        if length == 0:
            return
        if self._is_block:
            fcntl.ioctl(self._fd, _BLKDISCARD, struct.pack("=QQ", offset, length))
        else:
            punch_hole(self._fd, offset, length)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def preadv_full(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """preadv until every byte is read or the file ends; returns the bytes read. A short
    read is retried, never taken for the end of the file: the kernel returns one when an
    I/O error strikes after some bytes were copied, and the retry raises that error."""
    done = 0
    views = list(views)
    while views:
        n = os.preadv(fd, views, offset + done)
        if n == 0:
            break
        done += n
        views = _advance(views, n)
    return done


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop ``n`` transferred bytes from the front of an iovec list."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views
