"""A fake /dev/xen/{gntdev,evtchn,gntalloc} for the linux platform's tests. It follows the
driver rules of linux-xen-devices.md and parses every argument at the spec's offsets, never
through blkpy.gntdev.abi, so layout mistakes there show up as test failures."""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import struct

import numpy as np

from blkpy.gntdev import linux
from blkpy.gntdev.linux import DeviceCalls
from blkpy.gntdev.native import ffi, lib
from blkpy.platform import GNTST_BAD_GNTREF, GNTST_OKAY, GNTST_PERMISSION_DENIED

GUEST = 3
PAGES = 32
GNTDEV, EVTCHN, GNTALLOC = linux.GNTDEV_PATH, linux.EVTCHN_PATH, linux.GNTALLOC_PATH


class FakeXen(DeviceCalls):
    """A pretend dom0: guest ``GUEST`` has PAGES pages in a memfd and grants some of them;
    pages allocated through gntalloc come from the top of the same memfd, granted by dom0."""

    def __init__(self, devices: tuple[str, ...] = (GNTDEV, EVTCHN, GNTALLOC)) -> None:
        self.devices = set(devices)
        self.log: list[tuple] = []
        self.fds: dict[int, str] = {}
        self._next_fd = itertools.count(100)
        self.memfd = os.memfd_create("fake-guest")
        os.ftruncate(self.memfd, PAGES * 4096)
        self.memory = mmap.mmap(self.memfd, PAGES * 4096)
        self.grants: dict[tuple[int, int], tuple[int, bool]] = {}  # (domid, ref) -> frame, ro
        self.registrations: dict[int, list[tuple[int, int]]] = {}  # page slot -> grants
        self.mmap_errors: list[int] = []
        self.copy_supported = True
        self.offered: set[tuple[int, int]] = set()  # unbound remote ports offered to us
        self._next_port = itertools.count(40)
        self.bound: dict[int, int] = {}  # fd -> local port
        self.pending: dict[int, list[int]] = {}
        self.overflowed: set[int] = set()
        self.unbound: dict[int, int] = {}  # local port -> domain allowed to bind it
        self.peers: dict[int, int] = {}  # loopback channels inside dom0: port -> other end
        self._alloc_frames = itertools.count(PAGES - 1, -1)
        self._alloc_refs = itertools.count(100)
        self.allocated: dict[int, list[int]] = {}  # gntalloc index -> refs
        self.alloc_frames_of: dict[int, int] = {}

    def grant(self, ref: int, frame: int, readonly: bool = False, domid: int = GUEST) -> None:
        self.grants[(domid, ref)] = (frame, readonly)
        self.memory[frame * 4096 : (frame + 1) * 4096] = bytes([frame + 1]) * 4096

    def fire(self, port: int) -> None:
        for fd, bound_port in self.bound.items():
            if bound_port == port:
                self.pending.setdefault(fd, []).append(port)

    def names(self) -> list[str]:
        return [entry[0] for entry in self.log]

    # ---- DeviceCalls ----

    def open(self, path: str, flags: int) -> int:
        if path not in self.devices:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        fd = next(self._next_fd)
        self.fds[fd] = path
        self.log.append(("open", path, flags))
        return fd

    def close(self, fd: int) -> None:
        self.log.append(("close", fd))
        del self.fds[fd]
        self.bound.pop(fd, None)

    def ioctl(self, fd: int, request: int, arg: np.ndarray | None = None) -> int:
        self.log.append(("ioctl", fd, request))
        raw = bytearray(arg.tobytes()) if arg is not None else bytearray()
        if self.fds.get(fd) == GNTALLOC:
            handler = {
                0x00184705: self._alloc_gref,
                0x00104706: self._dealloc_gref,
                0x00104707: self._unmap_notify,
            }.get(request)
            if handler is None:
                raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
            result = handler(fd, raw)
            assert arg is not None
            arg[:] = np.frombuffer(bytes(raw), np.uint8)
            return result
        handler = {
            0x00184700: self._map_grant_ref,
            0x00104701: self._unmap_grant_ref,
            0x00104707: self._unmap_notify,
            0x00104708: self._grant_copy,
            0x00084501: self._bind_interdomain,
            0x00044502: self._bind_unbound_port,
            0x00044503: self._unbind,
            0x00044504: self._notify,
            0x00004505: self._reset,
        }.get(request)
        if handler is None:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        result = handler(fd, raw)
        if arg is not None:
            arg[:] = np.frombuffer(bytes(raw), np.uint8)
        return result

    def _map_grant_ref(self, fd: int, raw: bytearray) -> int:
        (count,) = struct.unpack_from("<I", raw, 0)
        if count == 0:
            raise OSError(errno.EINVAL, "count 0")
        grants = [struct.unpack_from("<II", raw, 16 + 8 * i) for i in range(count)]
        slot = 0  # first fit in the per-fd page-index space
        while any(s < slot + count and slot < s + len(g) for s, g in self.registrations.items()):
            slot += 1
        self.registrations[slot] = grants
        struct.pack_into("<Q", raw, 8, slot * 4096)
        return 0

    def _unmap_grant_ref(self, fd: int, raw: bytearray) -> int:
        index, count = struct.unpack_from("<QI", raw, 0)
        if len(self.registrations.get(index // 4096, ())) != count:
            raise OSError(errno.ENOENT, "no such range")
        del self.registrations[index // 4096]
        return 0

    def _unmap_notify(self, fd: int, raw: bytearray) -> int:
        index, action, port = struct.unpack_from("<QII", raw, 0)
        self.log.append(("notify-on-unmap", index, action, port))
        return 0

    def _grant_copy(self, fd: int, raw: bytearray) -> int:
        count, pointer = struct.unpack_from("<IxxxxQ", raw, 0)
        if not self.copy_supported:
            raise OSError(errno.ENOTTY, "no grant copy")
        segs = (ctypes.c_char * (24 * count)).from_address(pointer) if count else bytearray()
        for i in range(count):
            source, dest, length, flags = struct.unpack_from("<QQHH", segs, 24 * i)
            if flags not in (1, 2):
                raise OSError(errno.EINVAL, "both sides local")
            foreign = source if flags == 1 else dest
            ref, offset, domid = foreign & 0xFFFFFFFF, (foreign >> 32) & 0xFFFF, foreign >> 48
            if offset + length > 4096:
                raise OSError(errno.EINVAL, "crosses a page")
            status = GNTST_OKAY
            if (domid, ref) not in self.grants:
                status = GNTST_BAD_GNTREF
            elif flags == 2 and self.grants[(domid, ref)][1]:
                status = GNTST_PERMISSION_DENIED
            else:
                frame = self.grants[(domid, ref)][0]
                page = ffi.cast("uintptr_t", ffi.from_buffer(self.memory))
                guest = int(page) + frame * 4096 + offset
                src, dst = (guest, dest) if flags == 1 else (source, guest)
                ctypes.memmove(dst, src, length)
            struct.pack_into("<h", segs, 24 * i + 20, status)
        return 0

    def _bind_interdomain(self, fd: int, raw: bytearray) -> int:
        remote = struct.unpack_from("<II", raw, 0)
        local_loop = remote[0] == 0 and self.unbound.get(remote[1]) == 0
        if remote not in self.offered and not local_loop:
            raise OSError(errno.EINVAL, "not an unbound port for us")
        self.offered.discard(remote)
        port = next(self._next_port)
        self.bound[fd] = port
        if local_loop:  # dom0 bound its own unbound port: events loop back
            del self.unbound[remote[1]]
            self.peers[port], self.peers[remote[1]] = remote[1], port
        return port

    def _bind_unbound_port(self, fd: int, raw: bytearray) -> int:
        (remote,) = struct.unpack_from("<I", raw, 0)
        port = next(self._next_port)
        self.bound[fd] = port
        self.unbound[port] = remote
        return port

    def _alloc_gref(self, fd: int, raw: bytearray) -> int:
        domid, flags, count = struct.unpack_from("<HHI", raw, 0)
        refs = []
        for i in range(count):
            ref = next(self._alloc_refs)
            frame = next(self._alloc_frames)
            self.memory[frame * 4096 : (frame + 1) * 4096] = bytes(4096)
            self.grants[(domid, ref)] = (frame, not flags & 1)
            self.alloc_frames_of[ref] = frame
            struct.pack_into("<I", raw, 16 + 4 * i, ref)
            refs.append(ref)
        index = (1000 + len(self.allocated)) * 4096
        self.allocated[index] = refs
        struct.pack_into("<Q", raw, 8, index)
        return 0

    def _dealloc_gref(self, fd: int, raw: bytearray) -> int:
        index, count = struct.unpack_from("<QI", raw, 0)
        refs = self.allocated.pop(index)
        assert len(refs) == count
        for key in [k for k in self.grants if k[1] in refs]:
            del self.grants[key]
        return 0

    def _port_of(self, fd: int, raw: bytearray) -> int:
        (port,) = struct.unpack_from("<I", raw, 0)
        if self.bound.get(fd) != port:
            raise OSError(errno.ENOTCONN, "not bound here")
        return port

    def _unbind(self, fd: int, raw: bytearray) -> int:
        self._port_of(fd, raw)
        del self.bound[fd]
        return 0

    def _notify(self, fd: int, raw: bytearray) -> int:
        port = self._port_of(fd, raw)
        self.log.append(("sent", port))
        if port in self.peers:
            self.fire(self.peers[port])
        return 0

    def _reset(self, fd: int, raw: bytearray) -> int:
        self.overflowed.discard(fd)
        self.pending.pop(fd, None)
        return 0

    def mmap(self, fd: int, length: int, prot: int, offset: int) -> int:
        self.log.append(("mmap", fd, length, prot, offset))
        if self.mmap_errors:
            err = self.mmap_errors.pop(0)
            raise OSError(err, os.strerror(err))
        if self.fds.get(fd) == GNTALLOC:
            refs = self.allocated[offset]
            assert len(refs) * 4096 == length
            return self._map_frames([self.alloc_frames_of[r] for r in refs], True)
        grants = self.registrations.get(offset // 4096)
        if grants is None or len(grants) * 4096 != length:
            raise OSError(errno.EINVAL, "no such range")
        writable = bool(prot & mmap.PROT_WRITE)
        frames = []
        for grant in grants:
            if grant not in self.grants or (writable and self.grants[grant][1]):
                raise OSError(errno.EINVAL, "bad grant")
            frames.append(self.grants[grant][0])
        return self._map_frames(frames, writable)

    def _map_frames(self, frames: list[int], writable: bool) -> int:
        frame_array = np.array(frames, dtype=np.uint32)
        address = lib.blkpy_sim_map_frames(
            self.memfd, ffi.cast("uint32_t *", frame_array.ctypes.data), len(frames), writable
        )
        assert address > 0
        return address

    def munmap(self, address: int, length: int) -> None:
        self.log.append(("munmap", address, length))
        super().munmap(address, length)

    def read(self, fd: int, size: int) -> bytes:
        if fd in self.overflowed:
            raise OSError(errno.EFBIG, "File too large")
        ports = self.pending.pop(fd, [])
        if not ports:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return struct.pack(f"={len(ports)}I", *ports)

    def write(self, fd: int, data: bytes) -> int:
        self.log.append(("unmask", fd, data))
        return len(data)

    def sleep(self, seconds: float) -> None:
        self.log.append(("sleep", seconds))
