"""The guest side of the simulated hypervisor: what a frontend kernel can do in its own domain.

A SimGuest owns a domain in the sim dir: its RAM, its grant table (written the way Linux's
grant-table driver writes Xen's) and its event channels. The simulated frontend uses it;
the backend only ever sees the domain through ``blkpy.sim.platform``.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from blkpy.gntdev.native import ffi, lib
from blkpy.platform import PAGE_SIZE
from blkpy.sim.hypervisor import (
    GNTTAB_NR_RESERVED_ENTRIES,
    GTF_PERMIT_ACCESS,
    GTF_READING,
    GTF_READONLY,
    GTF_WRITING,
    Domain,
    SimEventPort,
    alloc_unbound_port,
    create_sim_dir,
    remove_sim_dir,
)

__all__ = ["GuestPort", "SimGuest", "create_sim_dir", "remove_sim_dir"]

#: A guest's end of an event channel: .port, fileno(), notify(), ack() -> bool, close().
GuestPort = SimEventPort


class SimGuest:
    """A simulated guest domain ``domid`` with ``memory_pages`` pages of RAM."""

    def __init__(
        self, sim_dir: str, domid: int, memory_pages: int = 16384, grant_entries: int = 8192
    ) -> None:
        if not 0 < domid < 0x7FF0:
            raise ValueError(f"domid {domid} is not a guest domain id")
        if grant_entries <= GNTTAB_NR_RESERVED_ENTRIES or memory_pages <= 0:
            raise ValueError("a guest needs some memory and more than 8 grant entries")
        self.domid = domid
        self._domain = Domain.create(sim_dir, domid, memory_pages, grant_entries, os.getpid())
        self.memory: np.ndarray = self._domain.memory
        self._table_base = self._domain.grant_table.ctypes.data
        self._lock = threading.Lock()
        self._free_frames = list(range(memory_pages - 1, -1, -1))
        self._free_refs = list(range(grant_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self._ports: list[SimEventPort] = []

    @property
    def memory_pages(self) -> int:
        return self._domain.memory_pages

    @property
    def grant_table_address(self) -> int:
        """Where this process sees the guest's grant table (for C code writing entries)."""
        return self._table_base

    @property
    def grant_entries(self) -> int:
        return self._domain.grant_entries

    # ---- memory ----

    def alloc_pages(self, n: int) -> list[int]:
        """``n`` free frames (lowest first); raises MemoryError when RAM is exhausted."""
        with self._lock:
            if n > len(self._free_frames):
                raise MemoryError(f"guest {self.domid}: {n} pages wanted, {len(self._free_frames)} free")
            frames = self._free_frames[len(self._free_frames) - n :][::-1]
            del self._free_frames[len(self._free_frames) - n :]
        return frames

    def free_pages(self, frames: list[int]) -> None:
        with self._lock:
            self._free_frames.extend(frames)

    def page(self, frame: int) -> memoryview:
        """The 4096 bytes of ``frame``, writable."""
        if not 0 <= frame < self.memory_pages:
            raise IndexError(f"frame {frame} outside guest memory")
        return memoryview(self.memory[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE])

    # ---- grant table ----

    def _entry_addr(self, ref: int) -> int:
        if not 0 <= ref < self.grant_entries:
            raise IndexError(f"grant ref {ref} outside the table")
        return self._table_base + ref * 8

    def grant_access(self, frame: int, domid: int, readonly: bool = False) -> int:
        """gnttab_grant_foreign_access: domid and frame first, a write barrier, then the
        flags that make the entry valid. Returns the grant ref."""
        with self._lock:
            if not self._free_refs:
                raise MemoryError(f"guest {self.domid}: grant table full")
            ref = self._free_refs.pop()
        entry = self._domain.grant_table[ref : ref + 1]
        entry["domid"] = domid
        entry["frame"] = frame
        lib.blkpy_wmb()
        flags = GTF_PERMIT_ACCESS | (GTF_READONLY if readonly else 0)
        lib.blkpy_store16(ffi.cast("void *", self._entry_addr(ref)), flags)
        return ref

    def end_access(self, ref: int) -> bool:
        """Revoke ``ref`` unless the backend still maps it (GTF_reading/GTF_writing set).

        True: revoked and the ref is free again; False: still in use, nothing changed."""
        word = ffi.cast("void *", self._entry_addr(ref))
        while True:
            cur = lib.blkpy_load32(word)
            if cur & (GTF_READING | GTF_WRITING):
                return False
            if lib.blkpy_cas32(word, cur, cur & 0xFFFF0000):
                break
        with self._lock:
            self._free_refs.append(ref)
        return True

    def grant_entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of ``ref`` as the hypervisor sees it now."""
        self._entry_addr(ref)
        entry = self._domain.grant_table[ref]
        return int(entry["flags"]), int(entry["domid"]), int(entry["frame"])

    # ---- event channels ----

    def alloc_unbound_port(self, remote_domid: int) -> GuestPort:
        """A port ``remote_domid`` may bind (publish ``.port`` in xenstore)."""
        port = alloc_unbound_port(self._domain, remote_domid)
        self._ports.append(port)
        return port

    def close(self) -> None:
        """The domain dies: its ports close, its files go; idempotent."""
        if self._domain is None:
            return
        for port in self._ports:
            port.close()
        self._ports.clear()
        self._domain.kill()
        self._domain.release()
        self._domain = None  # type: ignore[assignment]

    def __enter__(self) -> SimGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
