"""The ``sim`` platform: the backend's view of the simulated hypervisor (blkpy.sim.hypervisor).

Grant maps check each v1 entry the way Xen does, mark it GTF_reading/GTF_writing in the shared
table, and map the guest frames into one contiguous range (read-only pages when not writable,
so a stray write faults as it would on Xen). Everything else matches the ``linux`` platform,
counters included.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence

import numpy as np

from blkpy.gntdev.abi import GNTST_MESSAGES
from blkpy.gntdev.copy_batch import check_copy_batch
from blkpy.gntdev.mapping import MappedPages
from blkpy.gntdev.native import ffi, lib
from blkpy.platform import (
    GNTST_BAD_DOMAIN,
    PAGE_SIZE,
    GrantError,
    Platform,
    PlatformError,
    grant_ref_array,
)
from blkpy.sim import hypervisor
from blkpy.sim.hypervisor import Domain, SimEventPort

XENSTORED_PATH_ENV = "XENSTORED_PATH"
# gntdev's `limit` module parameter (Linux >= 5.5): a bigger MAP_GRANT_REF fails with EINVAL.


def _ptr(ctype: str, array: np.ndarray) -> object:
    return ffi.cast(ctype, array.ctypes.data)


class _GuestGrants:
    """This process's hold on one live guest domain: its mapped files and the pin counts of
    the grants this process uses (Xen's active grant entries)."""

    def __init__(self, domain: Domain, backend_domid: int) -> None:
        self.domain = domain
        self.pins = np.zeros(2 * domain.grant_entries, dtype=np.uint32)
        self.frames = np.zeros(domain.grant_entries, dtype=np.uint32)
        self.live_mappings = 0
        self.retired = False
        c = ffi.new("struct blkpy_sim_grants *")
        c.table = _ptr("uint32_t *", domain.grant_table)
        c.nr_grants = domain.grant_entries
        c.nr_frames = domain.memory_pages
        c.memory = _ptr("uint8_t *", domain.memory)
        c.pins = _ptr("uint32_t *", self.pins)
        c.frames = _ptr("uint32_t *", self.frames)
        c.guest_domid = domain.domid
        c.backend_domid = backend_domid
        self.c = c

    def retire(self) -> None:
        """The domain died or the platform closed: let go once no mapping uses it."""
        self.retired = True
        if self.live_mappings == 0:
            self.domain.release()


class SimGrantMapping(MappedPages):
    def __init__(
        self, platform: SimPlatform, guest: _GuestGrants, refs: np.ndarray, writable: bool,
        address: int,
    ) -> None:
        super().__init__(int(refs.size), writable, address)
        self._platform = platform
        self._guest = guest
        self._refs = refs

    def _release(self, address: int) -> None:
        lib.blkpy_munmap(address, self.count * PAGE_SIZE)
        self._platform._release(self._guest, self._refs, self.writable)


class SimPlatform(Platform):
    """The simulated hypervisor as seen from backend domain ``domid``."""

    name = "sim"

    def __init__(
        self, sim_dir: str | None = None, xenstore_path: str | None = None, domid: int = 0
    ) -> None:
        super().__init__()
        sim_dir = sim_dir or os.environ.get(hypervisor.SIM_DIR_ENV)
        if not sim_dir:
            raise PlatformError(
                errno.EINVAL,
                f"sim platform: no sim dir (pass sim_dir or set {hypervisor.SIM_DIR_ENV})",
            )
        if not os.path.isdir(sim_dir):
            raise PlatformError(errno.ENOENT, f"sim dir {sim_dir} does not exist")
        self.sim_dir = sim_dir
        self._xenstore_path = xenstore_path or os.environ.get(XENSTORED_PATH_ENV)
        self._domid = domid
        self._self_domain = Domain.open_or_create_backend(sim_dir, domid)
        self._guests: dict[int, _GuestGrants] = {}
        self._channels: list[SimEventPort] = []
        self._lock = threading.Lock()

    @property
    def backend_domid(self) -> int:
        return self._domid

    def _guest(self, domid: int) -> _GuestGrants | None:
        """The live guest ``domid`` (lock held); reopened if the domain was recreated."""
        guest = self._guests.get(domid)
        if guest is not None:
            if guest.domain.alive:
                return guest
            del self._guests[domid]
            guest.retire()
        if domid == self._domid:
            return None
        domain = Domain.open(self.sim_dir, domid)
        if domain is None:
            return None
        if domain.grant_entries == 0:  # a backend domain grants nothing
            domain.release()
            return None
        guest = self._guests[domid] = _GuestGrants(domain, self._domid)
        return guest

    def map_grants(
        self, domid: int, refs: Sequence[int] | np.ndarray, writable: bool
    ) -> SimGrantMapping:
        self.stats.map_calls += 1
        ref_array = grant_ref_array(refs)
        count = int(ref_array.size)
        frames = np.empty(count, dtype=np.uint32)
        status = ffi.new("int16_t *")
        with self._lock:
            guest = self._guest(domid)
            if guest is None:
                raise GrantError(errno.EINVAL, f"domain {domid} does not exist or is dying")
            pinned = lib.blkpy_sim_grant_acquire(
                guest.c, _ptr("uint32_t *", ref_array), count, int(writable),
                _ptr("uint32_t *", frames), status,
            )
            if pinned < count:
                why = GNTST_MESSAGES.get(status[0], f"GNTST {status[0]}")
                raise GrantError(
                    errno.EINVAL,
                    f"grant ref {int(ref_array[pinned])} of domain {domid}: {why}",
                )
            address = lib.blkpy_sim_map_frames(
                guest.domain.memory_fd, _ptr("uint32_t *", frames), count, int(writable)
            )
            if address < 0:
                lib.blkpy_sim_grant_release(
                    guest.c, _ptr("uint32_t *", ref_array), count, int(writable)
                )
                raise GrantError(-address, f"mapping {count} guest frames: {os.strerror(-address)}")
            guest.live_mappings += 1
        self.stats.pages_mapped += count
        return SimGrantMapping(self, guest, ref_array, writable, address)

    def _release(self, guest: _GuestGrants, refs: np.ndarray, writable: bool) -> None:
        with self._lock:
            lib.blkpy_sim_grant_release(guest.c, _ptr("uint32_t *", refs), refs.size, int(writable))
            guest.live_mappings -= 1
            if guest.retired:
                guest.retire()
        self.stats.unmap_calls += 1
        self.stats.pages_unmapped += int(refs.size)

    def grant_copy(self, segments: np.ndarray) -> None:
        check_copy_batch(segments)
        if len(segments) == 0:
            return
        self.stats.copy_calls += 1
        self.stats.copy_segments += len(segments)
        segments["status"] = GNTST_BAD_DOMAIN  # what segments of unknown domains keep
        pointer = _ptr("struct blkpy_copy_segment *", segments)
        with self._lock:
            for domid in np.unique(segments["domid"]).tolist():
                guest = self._guest(domid)
                if guest is not None:
                    lib.blkpy_sim_grant_copy(guest.c, pointer, len(segments))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> SimEventPort:
        channel = hypervisor.bind_interdomain(
            self._self_domain, remote_domid, remote_port, self.stats
        )
        self._channels = [c for c in self._channels if c._sock is not None]
        self._channels.append(channel)
        return channel

    def state_dirs(self) -> tuple[str, str]:
        # A simulated host keeps everything under its own directory.
        return os.path.join(self.sim_dir, "run"), os.path.join(self.sim_dir, "shm")

    def xenstore_path(self) -> str:
        if not self._xenstore_path:
            raise PlatformError(
                errno.ENOENT,
                f"sim platform: no xenstore socket (pass xenstore_path or set {XENSTORED_PATH_ENV})",
            )
        return self._xenstore_path

    def close(self) -> None:
        """Unbind every port, let go of our own domain; guest domains are let go once their
        last mapping is unmapped."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        with self._lock:
            for guest in self._guests.values():
                guest.retire()
            self._guests.clear()
        # Our own domain's files (its memory fd stays open while mapped): a process that
        # closes one platform and opens another must not keep one fd per platform.
        self._self_domain.release()
