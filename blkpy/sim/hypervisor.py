"""The simulated hypervisor's shared state: one directory (the "sim dir") that the backend
process and the simulated guests map, laid out so both sides see what Xen would show them.

Layout, per domain ``dom<N>/``:

* ``info`` - a small header: magic, life state, memory size, grant-table size, owner pid.
* ``memory`` - the guest's RAM, ``memory_pages`` * 4096 bytes; frame number = page index.
* ``grant-table`` - ``grant_entries`` v1 entries (flags u16, domid u16, frame u32), written by
  the guest exactly like a Linux frontend writes Xen's table; refs 0..7 are reserved.
* ``evtchn`` - one u64 per port: state (bits 0-7), remote domid (16-31), remote port (32-63).

Events travel as datagrams between abstract unix sockets named after the sim dir, the domain and
the port: a pending event is a queued datagram, ``ack`` drains the queue. A domain "dies" when
its state leaves ALIVE; its directory is then removed.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np

from blkpy.gntdev.abi import (  # noqa: F401 - re-exported: the guest side's vocabulary
    GNTTAB_NR_RESERVED_ENTRIES,
    GRANT_ENTRY_V1_DTYPE,
    GTF_INVALID,
    GTF_PERMIT_ACCESS,
    GTF_READING,
    GTF_READONLY,
    GTF_TYPE_MASK,
    GTF_WRITING,
)
from blkpy.gntdev.native import ffi, lib
from blkpy.platform import (
    PAGE_SIZE,
    EventChannel,
    NativeEventChannel,
    PlatformError,
    PlatformStats,
)
from blkpy.status import pid_alive

GRANT_ENTRY_DTYPE = GRANT_ENTRY_V1_DTYPE

# Event channels: Xen's 2-level ABI has 4096 ports on 64-bit guests; port 0 is never valid.
NR_EVTCHN_PORTS = 4096
ECS_FREE = 0
ECS_UNBOUND = 1
ECS_INTERDOMAIN = 2

# Domain header (dom<N>/info), u32 words.
INFO_MAGIC = 0x4D53_4B42  # "BKSM"
INFO_WORDS = 8
_MAGIC, _STATE, _MEMORY_PAGES, _GRANT_ENTRIES, _OWNER_PID = range(5)
STATE_ALIVE = 1
STATE_DYING = 2

SIM_DIR_ENV = "BLKPY_SIM_DIR"


def create_sim_dir() -> str:
    """A fresh, empty sim dir (in /dev/shm when it exists, so guest RAM stays in memory)."""
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix="blkpy-sim-", dir=parent)


def remove_sim_dir(path: str) -> None:
    """Remove a sim dir and everything in it (processes still mapping it keep their pages)."""
    shutil.rmtree(path, ignore_errors=True)


def evtchn_entry(state: int, remote_domid: int = 0, remote_port: int = 0) -> int:
    return state | (remote_domid << 16) | (remote_port << 32)


def evtchn_fields(entry: int) -> tuple[int, int, int]:
    """(state, remote domid, remote port) of a packed event-channel entry."""
    return entry & 0xFF, (entry >> 16) & 0xFFFF, entry >> 32


def _addr(array: np.ndarray, index: int = 0) -> object:
    return ffi.cast("void *", array.ctypes.data + index * array.itemsize)


def _map_file(path: Path, size: int) -> tuple[int, mmap.mmap | None]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    return fd, (mmap.mmap(fd, size, mmap.MAP_SHARED) if size else None)


def _owner_alive(pid: int) -> bool:
    # a backend domain's table (pid 0) has no single owner process
    return pid == 0 or pid_alive(pid)


class Domain:
    """One domain's files in the sim dir, mapped into this process."""

    def __init__(self, sim_dir: str, domid: int) -> None:
        self.sim_dir = sim_dir
        self.domid = domid
        self.path = Path(sim_dir) / f"dom{domid}"
        self._maps: list[mmap.mmap] = []
        info_fd, info_map = _map_file(self.path / "info", INFO_WORDS * 4)
        os.close(info_fd)
        self._maps.append(info_map)
        self.info = np.frombuffer(info_map, dtype="<u4")
        if self.info[_MAGIC] != INFO_MAGIC:
            raise PlatformError(errno.EINVAL, f"{self.path}/info is not a sim domain header")
        self.memory_pages = int(self.info[_MEMORY_PAGES])
        self.grant_entries = int(self.info[_GRANT_ENTRIES])
        self.memory_fd, memory_map = _map_file(self.path / "memory", self.memory_pages * PAGE_SIZE)
        self.memory = self._array(memory_map, np.uint8)
        fd, table_map = _map_file(self.path / "grant-table", self.grant_entries * 8)
        os.close(fd)
        self.grant_table = self._array(table_map, GRANT_ENTRY_DTYPE)
        fd, evtchn_map = _map_file(self.path / "evtchn", NR_EVTCHN_PORTS * 8)
        os.close(fd)
        self.evtchn = self._array(evtchn_map, "<u8")

    def _array(self, mapping: mmap.mmap | None, dtype: object) -> np.ndarray:
        if mapping is None:
            return np.zeros(0, dtype=dtype)
        self._maps.append(mapping)
        return np.frombuffer(mapping, dtype=dtype)

    @classmethod
    def create(
        cls, sim_dir: str, domid: int, memory_pages: int, grant_entries: int, owner_pid: int
    ) -> Domain:
        """Create dom<domid> atomically (built aside, then renamed into place).

        Raises FileExistsError if a live domain with that id exists; a dead one is replaced."""
        final = Path(sim_dir) / f"dom{domid}"
        staging = Path(tempfile.mkdtemp(prefix=f".dom{domid}-", dir=sim_dir))
        info = np.zeros(INFO_WORDS, dtype="<u4")
        info[[_MAGIC, _STATE, _MEMORY_PAGES, _GRANT_ENTRIES, _OWNER_PID]] = [
            INFO_MAGIC, STATE_ALIVE, memory_pages, grant_entries, owner_pid,
        ]
        (staging / "info").write_bytes(info.tobytes())
        for name, size in (
            ("memory", memory_pages * PAGE_SIZE),
            ("grant-table", grant_entries * 8),
            ("evtchn", NR_EVTCHN_PORTS * 8),
        ):
            with open(staging / name, "wb") as f:
                f.truncate(size)
        for _attempt in range(3):
            try:
                os.rename(staging, final)
                return cls(sim_dir, domid)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
            existing = cls.open(sim_dir, domid)
            if existing is not None and _owner_alive(int(existing.info[_OWNER_PID])):
                existing.release()
                shutil.rmtree(staging, ignore_errors=True)
                raise FileExistsError(errno.EEXIST, f"sim domain {domid} already exists", str(final))
            if existing is not None:
                existing.release()
            shutil.rmtree(final, ignore_errors=True)  # a dead domain's leftovers
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(errno.EEXIST, f"sim domain {domid} keeps reappearing", str(final))

    @classmethod
    def open(cls, sim_dir: str, domid: int) -> Domain | None:
        """The live domain ``domid``, or None if it does not exist or is dead."""
        try:
            domain = cls(sim_dir, domid)
        except (OSError, ValueError):  # absent, or being removed right now
            return None
        if not domain.alive:
            domain.release()
            return None
        return domain

    @classmethod
    def open_or_create_backend(cls, sim_dir: str, domid: int) -> Domain:
        """A backend domain (no RAM, no grants, only event channels), shared by every
        backend process of that domid."""
        domain = cls.open(sim_dir, domid)
        if domain is not None:
            return domain
        try:
            return cls.create(sim_dir, domid, 0, 0, owner_pid=0)
        except FileExistsError:
            domain = cls.open(sim_dir, domid)
            if domain is None:
                raise
            return domain

    @property
    def alive(self) -> bool:
        return self.info.size > 0 and int(self.info[_STATE]) == STATE_ALIVE

    def kill(self) -> None:
        """Mark the domain dead (mappers see it at their next map) and remove its files."""
        lib.blkpy_store32(_addr(self.info, _STATE), STATE_DYING)
        shutil.rmtree(self.path, ignore_errors=True)

    def release(self) -> None:
        """Drop this process's mappings of the domain (views handed out keep theirs alive)."""
        if self.memory_fd >= 0:
            os.close(self.memory_fd)
            self.memory_fd = -1
        empty = np.zeros(0, dtype=np.uint8)
        self.info = self.memory = self.grant_table = self.evtchn = empty
        for mapping in self._maps:
            with contextlib.suppress(BufferError):
                mapping.close()
        self._maps.clear()

    # ---- event-channel table ----

    def load_port(self, port: int) -> int:
        if not 0 <= port < self.evtchn.size:  # also after release()
            return ECS_FREE
        return int(lib.blkpy_load64(_addr(self.evtchn, port)))

    def cas_port(self, port: int, expected: int, desired: int) -> bool:
        if not 0 <= port < self.evtchn.size:
            return False
        return bool(lib.blkpy_cas64(_addr(self.evtchn, port), expected, desired))

    def alloc_port(self, entry: int) -> int:
        """Claim a free port with ``entry`` as its state; raises PlatformError(ENOSPC)."""
        while True:
            free = np.flatnonzero(self.evtchn[1:] == ECS_FREE)
            if free.size == 0:
                raise PlatformError(errno.ENOSPC, f"domain {self.domid}: no free event channel")
            for port in (free[:8] + 1).tolist():
                if self.cas_port(port, ECS_FREE, entry):
                    return port


def _socket_name(sim_dir: str, domid: int, port: int) -> bytes:
    st = os.stat(sim_dir)
    return f"\0blkpy-sim-{st.st_dev:x}-{st.st_ino:x}/dom{domid}/port{port}".encode()


class SimEventPort(EventChannel):
    """One end of a simulated event channel, usable by the backend and the guest alike."""

    def __init__(self, domain: Domain, port: int, stats: PlatformStats | None = None) -> None:
        self._domain = domain
        self.local_port = port
        self._stats = stats
        self._sock: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            self._sock.bind(_socket_name(domain.sim_dir, domain.domid, port))
        except OSError:
            self._sock.close()
            raise

    @property
    def port(self) -> int:
        return self.local_port

    def fileno(self) -> int:
        if self._sock is None:
            raise ValueError("event channel is closed")
        return self._sock.fileno()

    def native(self) -> NativeEventChannel | None:
        if self._sock is None or not 0 < self.local_port < self._domain.evtchn.size:
            return None
        name = _socket_name(self._domain.sim_dir, 0, 0)
        return NativeEventChannel(
            2, self._sock.fileno(), self.local_port,
            port_entry=self._domain.evtchn.ctypes.data + 8 * self.local_port,
            name_prefix=name[1 : name.rindex(b"dom") + 3],
        )

    def notify(self) -> None:
        if self._stats is not None:
            self._stats.notifies += 1
        if self._sock is None:
            return
        state, remote_domid, remote_port = evtchn_fields(self._domain.load_port(self.local_port))
        if state != ECS_INTERDOMAIN:
            return  # Xen: sending on an unbound port does nothing
        # A full queue means the event is already pending; a dead peer drops it.
        with contextlib.suppress(OSError):
            self._sock.sendto(
                b"\1", _socket_name(self._domain.sim_dir, remote_domid, remote_port)
            )

    def ack(self) -> bool:
        if self._sock is None:
            return False
        found = False
        while True:
            try:
                self._sock.recv(16)
            except BlockingIOError:
                break
            found = True
        if found and self._stats is not None:
            self._stats.wakeups += 1
        return found

    def close(self) -> None:
        """Like Xen's evtchn_close: an interdomain peer falls back to unbound (so it can be
        bound again), then the port is freed."""
        if self._sock is None:
            return
        entry = self._domain.load_port(self.local_port)
        state, remote_domid, remote_port = evtchn_fields(entry)
        if state == ECS_INTERDOMAIN:
            remote = Domain.open(self._domain.sim_dir, remote_domid)
            if remote is not None:
                remote.cas_port(
                    remote_port,
                    evtchn_entry(ECS_INTERDOMAIN, self._domain.domid, self.local_port),
                    evtchn_entry(ECS_UNBOUND, self._domain.domid),
                )
                remote.release()
        self._domain.cas_port(self.local_port, entry, ECS_FREE)
        self._sock.close()
        self._sock = None


def alloc_unbound_port(domain: Domain, remote_domid: int) -> SimEventPort:
    """EVTCHNOP_alloc_unbound: a port of ``domain`` that ``remote_domid`` may bind."""
    port = domain.alloc_port(evtchn_entry(ECS_UNBOUND, remote_domid))
    try:
        return SimEventPort(domain, port)
    except OSError:
        domain.cas_port(port, evtchn_entry(ECS_UNBOUND, remote_domid), ECS_FREE)
        raise


def _reclaim_abandoned(local: Domain, remote: Domain, remote_port: int, offered: int) -> None:
    """If the remote port is bound to a port of ``local`` whose process died, close that
    end as Xen does when a process exits (evtchn_close): the remote port falls back to
    unbound, offered to ``local`` again. A live owner still has its socket."""
    state, peer_domid, peer_port = evtchn_fields(remote.load_port(remote_port))
    if state != ECS_INTERDOMAIN or peer_domid != local.domid:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(_socket_name(local.sim_dir, local.domid, peer_port))
        return  # somebody holds it
    except OSError:
        pass
    finally:
        probe.close()
    bound = evtchn_entry(ECS_INTERDOMAIN, local.domid, peer_port)
    if remote.cas_port(remote_port, bound, offered):
        local.cas_port(peer_port, evtchn_entry(ECS_INTERDOMAIN, remote.domid, remote_port),
                       ECS_FREE)


def bind_interdomain(
    local: Domain, remote_domid: int, remote_port: int, stats: PlatformStats | None = None
) -> SimEventPort:
    """EVTCHNOP_bind_interdomain: connect a new local port to the remote's unbound port."""
    bad = PlatformError(
        errno.EINVAL,
        f"cannot bind to port {remote_port} of domain {remote_domid}: "
        f"not an unbound port offered to domain {local.domid}",
    )
    if not 0 < remote_port < NR_EVTCHN_PORTS:
        raise bad
    remote = Domain.open(local.sim_dir, remote_domid)
    if remote is None:
        raise bad
    try:
        offered = evtchn_entry(ECS_UNBOUND, local.domid)
        _reclaim_abandoned(local, remote, remote_port, offered)
        if remote.load_port(remote_port) != offered:
            raise bad
        entry = evtchn_entry(ECS_INTERDOMAIN, remote_domid, remote_port)
        port = local.alloc_port(entry)
        try:
            channel = SimEventPort(local, port, stats)
        except OSError:
            local.cas_port(port, entry, ECS_FREE)
            raise
        # The socket exists before the remote can see the port, so no event is lost.
        if not remote.cas_port(remote_port, offered, evtchn_entry(ECS_INTERDOMAIN, local.domid, port)):
            channel._domain.cas_port(port, entry, ECS_FREE)
            channel._sock.close()  # type: ignore[union-attr]
            channel._sock = None
            raise bad
        # Xen marks the new port pending: events sent while the remote port was unbound
        # were dropped, so the binder must look at whatever it serves at once.
        with contextlib.suppress(OSError):
            channel._sock.sendto(b"\1", _socket_name(local.sim_dir, local.domid, port))  # type: ignore[union-attr]
        return channel
    finally:
        remote.release()
