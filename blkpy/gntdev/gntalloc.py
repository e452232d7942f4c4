"""Granting pages from user space through /dev/xen/gntalloc: the frontend half of a real-Xen
test (a domain may grant pages to itself and map them back through gntdev)."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from blkpy.gntdev import abi
from blkpy.gntdev.linux import GNTALLOC_PATH, DeviceCalls, device_error
from blkpy.gntdev.mapping import MappedPages
from blkpy.platform import PAGE_SIZE, PlatformError


class GrantedPages(MappedPages):
    """``count`` zeroed local pages granted to another domain, mapped at ``address``."""

    def __init__(
        self, allocator: Gntalloc, index: int, refs: list[int], writable: bool, address: int
    ) -> None:
        super().__init__(len(refs), True, address)  # our own pages: always writable here
        self.granted_writable = writable
        self.refs = refs
        self.index = index
        self._allocator = allocator

    def _release(self, address: int) -> None:
        self._allocator._release(self, address)


class Gntalloc:
    """An open /dev/xen/gntalloc."""

    def __init__(self, path: str = GNTALLOC_PATH, calls: DeviceCalls | None = None) -> None:
        self.calls = calls or DeviceCalls()
        try:
            self._fd: int | None = self.calls.open(path, os.O_RDWR)
        except OSError as exc:
            raise device_error(path, exc) from None

    def alloc(self, domid: int, count: int, writable: bool = True) -> GrantedPages:
        """ALLOC_GREF ``count`` pages granted to ``domid``, then one mmap of them."""
        if self._fd is None:
            raise PlatformError(errno.EBADF, "gntalloc is closed")
        if count <= 0:
            raise PlatformError(errno.EINVAL, "nothing to allocate")
        native = abi.NATIVE
        header = native.alloc_gref_header_size
        arg = np.zeros(max(header + 4 * count, native.alloc_gref_dtype.itemsize), np.uint8)
        fields = arg[: native.alloc_gref_dtype.itemsize].view(native.alloc_gref_dtype)
        fields["domid"] = domid
        fields["flags"] = abi.GNTALLOC_FLAG_WRITABLE if writable else 0
        fields["count"] = count
        try:
            self.calls.ioctl(self._fd, native.IOCTL_GNTALLOC_ALLOC_GREF, arg)
        except OSError as exc:
            raise PlatformError(exc.errno, f"ALLOC_GREF of {count} pages: {exc.strerror}") from None
        index = int(arg[: native.alloc_gref_dtype.itemsize].view(native.alloc_gref_dtype)["index"][0])
        refs = arg[header : header + 4 * count].view("<u4").tolist()
        try:
            address = self.calls.mmap(
                self._fd, count * PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, index
            )
        except OSError as exc:
            self._dealloc(index, count)
            raise PlatformError(exc.errno, f"mapping {count} granted pages: {exc.strerror}") from None
        return GrantedPages(self, index, refs, writable, address)

    def _dealloc(self, index: int, count: int) -> None:
        arg = np.zeros(1, dtype=abi.NATIVE.dealloc_gref_dtype)
        arg["index"], arg["count"] = index, count
        self.calls.ioctl(self._fd, abi.NATIVE.IOCTL_GNTALLOC_DEALLOC_GREF, arg.view(np.uint8))

    def _release(self, pages: GrantedPages, address: int) -> None:
        # Deallocating ends the grants; the pages live on until unmapped everywhere.
        if self._fd is not None:
            self._dealloc(pages.index, pages.count)
        self.calls.munmap(address, pages.count * PAGE_SIZE)

    def set_unmap_notify(self, pages: GrantedPages, offset: int, action: int, port: int = 0) -> None:
        """Clear a byte / send an event when ``pages`` are finally released (libvchan style)."""
        arg = np.array([(pages.index + offset, action, port)], dtype=abi.UNMAP_NOTIFY_DTYPE)
        self.calls.ioctl(self._fd, abi.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, arg.view(np.uint8))

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self.calls.close(fd)
