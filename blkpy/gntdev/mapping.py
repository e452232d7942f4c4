"""What every platform's grant mapping shares: a contiguous range of pages at an address."""

from __future__ import annotations

import abc

from blkpy.gntdev.native import ffi
from blkpy.platform import PAGE_SIZE, GrantMapping


class MappedPages(GrantMapping):
    """``count`` pages at ``address`` until unmap() hands the address to ``_release``."""

    def __init__(self, count: int, writable: bool, address: int) -> None:
        self.count = count
        self.writable = writable
        self._address: int | None = address
        self._buffer: memoryview | None = None

    @property
    def address(self) -> int:
        if self._address is None:
            raise ValueError("grant mapping is unmapped")
        return self._address

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            view = memoryview(ffi.buffer(ffi.cast("char *", self.address), self.count * PAGE_SIZE))
            self._buffer = view if self.writable else view.toreadonly()
        return self._buffer

    @property
    def mapped(self) -> bool:
        return self._address is not None

    def unmap(self) -> None:
        if self._address is None:
            return
        address, self._address, self._buffer = self._address, None, None
        self._release(address)

    @abc.abstractmethod
    def _release(self, address: int) -> None:
        """Unmap the pages at ``address`` and give the grants back (called once)."""
