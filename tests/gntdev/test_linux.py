"""LinuxPlatform against a fake gntdev/evtchn pair that follows the driver rules of
linux-xen-devices.md (it parses arguments at the spec's offsets, independently of abi.py)."""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import socket
import struct

import numpy as np
import pytest

from blkpy.gntdev import linux
from blkpy.gntdev.linux import DeviceCalls, LinuxPlatform, find_xenstore_path
from blkpy.gntdev.native import ffi, lib
from blkpy.platform import (
    COPY_SEGMENT_DTYPE,
    GNTST_BAD_GNTREF,
    GNTST_OKAY,
    GNTST_PERMISSION_DENIED,
    GrantError,
    PlatformError,
    open_platform,
)

GUEST = 3
PAGES = 16
GNTDEV, EVTCHN = linux.GNTDEV_PATH, linux.EVTCHN_PATH


class FakeXen(DeviceCalls):
    """A pretend dom0: guest ``GUEST`` has PAGES pages in a memfd and grants some of them."""

    def __init__(self, devices: tuple[str, ...] = (GNTDEV, EVTCHN)) -> None:
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

    def grant(self, ref: int, frame: int, readonly: bool = False, domid: int = GUEST) -> None:
        self.grants[(domid, ref)] = (frame, readonly)
        self.memory[frame * 4096 : (frame + 1) * 4096] = bytes([frame + 1]) * 4096

    def fire(self, port: int) -> None:
        fd = next(fd for fd, p in self.bound.items() if p == port)
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
        handler = {
            0x00184700: self._map_grant_ref,
            0x00104701: self._unmap_grant_ref,
            0x00104707: self._unmap_notify,
            0x00104708: self._grant_copy,
            0x00084501: self._bind_interdomain,
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
        if remote not in self.offered:
            raise OSError(errno.EINVAL, "not an unbound port for us")
        self.offered.discard(remote)
        port = next(self._next_port)
        self.bound[fd] = port
        return port

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
        self.log.append(("sent", self._port_of(fd, raw)))
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
        grants = self.registrations.get(offset // 4096)
        if grants is None or len(grants) * 4096 != length:
            raise OSError(errno.EINVAL, "no such range")
        writable = bool(prot & mmap.PROT_WRITE)
        frames = []
        for grant in grants:
            if grant not in self.grants or (writable and self.grants[grant][1]):
                raise OSError(errno.EINVAL, "bad grant")
            frames.append(self.grants[grant][0])
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


@pytest.fixture
def xen():
    fake = FakeXen()
    for ref in range(8, 8 + 6):
        fake.grant(ref, ref - 8)
    fake.grant(20, 10, readonly=True)
    return fake


@pytest.fixture
def platform(xen):
    p = LinuxPlatform(calls=xen)
    xen.log.clear()
    yield p
    p.close()


def _gntdev_fd(xen: FakeXen) -> int:
    return next(fd for fd, path in xen.fds.items() if path == GNTDEV)


# ---- opening ----


@pytest.mark.parametrize(("missing", "module"), [(GNTDEV, "xen-gntdev"), (EVTCHN, "xen-evtchn")])
def test_missing_device_is_one_clear_line(missing, module):
    present = tuple(p for p in (GNTDEV, EVTCHN) if p != missing)
    with pytest.raises(PlatformError) as info:
        LinuxPlatform(calls=FakeXen(devices=present))
    message = str(info.value)
    assert info.value.errno == errno.ENOENT
    assert f"{missing} not found" in message and module in message and "\n" not in message


def test_real_devices_missing_here(tmp_path):
    with pytest.raises(PlatformError, match="not found: is this a Xen dom0"):
        open_platform("linux", gntdev_path=str(tmp_path / "gntdev"), evtchn_path=str(tmp_path / "evtchn"))


def test_permission_denied_message():
    class Denied(FakeXen):
        def open(self, path, flags):
            raise PermissionError(errno.EACCES, "Permission denied", path)

    with pytest.raises(PlatformError, match="permission denied"):
        LinuxPlatform(calls=Denied())


def test_opening_keeps_gntdev_and_probes_evtchn():
    xen = FakeXen()
    p = LinuxPlatform(calls=xen)
    assert list(xen.fds.values()) == [GNTDEV]
    assert p.name == "linux" and p.backend_domid == 0
    p.close()
    p.close()
    assert xen.fds == {}


# ---- grant maps ----


def test_a_batch_is_one_ioctl_and_one_mmap(xen, platform):
    refs = [10, 8, 13]
    mapping = platform.map_grants(GUEST, refs, writable=True)
    assert xen.names() == ["ioctl", "mmap"]
    _, fd, request = xen.log[0]
    assert (fd, request) == (_gntdev_fd(xen), 0x00184700)
    _, fd, length, prot, offset = xen.log[1]
    assert (length, prot, offset) == (3 * 4096, mmap.PROT_READ | mmap.PROT_WRITE, mapping.index)
    assert xen.registrations[mapping.index // 4096] == [(GUEST, r) for r in refs]
    assert bytes(mapping.buffer[::4096]) == bytes([3, 1, 6])
    assert ctypes.string_at(mapping.address + 4096, 1) == b"\x01"
    mapping.buffer[0] = 0xAB  # shared with the guest page
    assert xen.memory[2 * 4096] == 0xAB
    mapping.unmap()
    mapping.unmap()
    assert xen.names() == ["ioctl", "mmap", "munmap", "ioctl"]
    assert xen.log[3][2] == 0x00104701
    assert xen.registrations == {}


def test_readonly_map_uses_prot_read(xen, platform):
    with platform.map_grants(GUEST, [20], writable=False) as m:
        assert xen.log[1][3] == mmap.PROT_READ
        assert m.buffer.readonly and m.buffer[0] == 11


def test_second_range_gets_its_own_index(xen, platform):
    a = platform.map_grants(GUEST, [8, 9], writable=True)
    b = platform.map_grants(GUEST, [10], writable=True)
    assert a.index != b.index
    a.unmap()
    assert list(xen.registrations) == [b.index // 4096]
    b.unmap()


@pytest.mark.parametrize(
    ("refs", "writable"), [([8, 99], True), ([8, 20], True), ([8, 9], "other-domain")]
)
def test_failed_mmap_unregisters_and_raises(xen, platform, refs, writable):
    domid = GUEST + 1 if writable == "other-domain" else GUEST
    with pytest.raises(GrantError) as info:
        platform.map_grants(domid, refs, writable=bool(writable))
    assert info.value.errno == errno.EINVAL
    assert xen.names() == ["ioctl", "mmap", "ioctl"]
    assert xen.registrations == {}
    assert platform.stats.pages_mapped == 0 and platform.stats.map_calls == 1


def test_eagain_is_retried_every_millisecond(xen, platform):
    xen.mmap_errors = [errno.EAGAIN, errno.EAGAIN]
    with platform.map_grants(GUEST, [8], writable=True) as m:
        assert m.buffer[0] == 1
    assert xen.names()[:6] == ["ioctl", "mmap", "sleep", "mmap", "sleep", "mmap"]
    assert ("sleep", 0.001) in xen.log


def test_eagain_retries_are_bounded(xen, platform, monkeypatch):
    monkeypatch.setattr(linux, "EAGAIN_RETRIES", 3)
    xen.mmap_errors = [errno.EAGAIN] * 5
    with pytest.raises(GrantError) as info:
        platform.map_grants(GUEST, [8], writable=True)
    assert info.value.errno == errno.EAGAIN
    assert xen.names().count("mmap") == 3
    assert xen.registrations == {}


@pytest.mark.parametrize("refs", [[], [-1], [2**40]])
def test_malformed_ref_lists_make_no_syscall(xen, platform, refs):
    with pytest.raises(GrantError):
        platform.map_grants(GUEST, refs, writable=False)
    assert xen.log == []


def test_set_unmap_notify(xen, platform):
    m = platform.map_grants(GUEST, [8, 9], writable=True)
    platform.set_unmap_notify(m, 4097, linux.abi.UNMAP_NOTIFY_CLEAR_BYTE | linux.abi.UNMAP_NOTIFY_SEND_EVENT, 7)
    assert ("notify-on-unmap", m.index + 4097, 3, 7) in xen.log
    with pytest.raises(PlatformError):
        platform.set_unmap_notify(m, 0, 4, 0)
    with pytest.raises(PlatformError):
        platform.set_unmap_notify(m, 2 * 4096, 1, 0)
    m.unmap()


def test_map_counters(xen, platform):
    m = platform.map_grants(GUEST, [8, 9, 10], writable=True)
    with pytest.raises(GrantError):
        platform.map_grants(GUEST, [99], writable=True)
    m.unmap()
    assert platform.stats.as_dict() == {
        "map_calls": 2, "pages_mapped": 3, "unmap_calls": 1, "pages_unmapped": 3,
        "copy_calls": 0, "copy_segments": 0, "notifies": 0, "wakeups": 0,
    }


def test_unmap_after_close_only_munmaps(xen, platform):
    m = platform.map_grants(GUEST, [8], writable=True)
    platform.close()
    m.unmap()
    assert xen.names()[-1] == "munmap"


# ---- grant copy ----


def test_grant_copy_is_one_ioctl_with_statuses(xen, platform):
    local = np.arange(64, dtype=np.uint8)
    out = np.zeros(16, dtype=np.uint8)
    segs = np.zeros(4, dtype=COPY_SEGMENT_DTYPE)
    segs[0] = (local.ctypes.data, 8, GUEST, 100, 32, 1, 0, 0, 0)  # to the guest
    segs[1] = (out.ctypes.data, 9, GUEST, 0, 16, 0, 0, 0, 0)  # from the guest
    segs[2] = (local.ctypes.data, 20, GUEST, 0, 4, 1, 0, 0, 0)  # to a read-only grant
    segs[3] = (local.ctypes.data, 99, GUEST, 0, 4, 0, 0, 0, 0)  # unknown ref
    platform.grant_copy(segs)
    assert xen.names() == ["ioctl"] and xen.log[0][2] == 0x00104708
    assert segs["status"].tolist() == [GNTST_OKAY, GNTST_OKAY, GNTST_PERMISSION_DENIED, GNTST_BAD_GNTREF]
    assert xen.memory[100:132] == local[:32].tobytes()
    assert out.tobytes() == bytes([2]) * 16
    assert platform.stats.copy_calls == 1 and platform.stats.copy_segments == 4


def test_grant_copy_whole_batch_failure(xen, platform):
    segs = np.zeros(1, dtype=COPY_SEGMENT_DTYPE)
    segs[0] = (0, 8, GUEST, 4000, 200, 0, 0, 0, 0)
    with pytest.raises(PlatformError) as info:
        platform.grant_copy(segs)
    assert info.value.errno == errno.EINVAL


def test_grant_copy_empty_and_malformed_batches(xen, platform):
    platform.grant_copy(np.zeros(0, dtype=COPY_SEGMENT_DTYPE))
    with pytest.raises(PlatformError):
        platform.grant_copy(np.zeros(3, dtype=np.uint64))
    assert xen.log == [] and platform.stats.copy_calls == 0


def test_supports_grant_copy_probes_with_an_empty_batch(xen, platform):
    assert platform.supports_grant_copy()
    xen.copy_supported = False
    assert not platform.supports_grant_copy()


# ---- event channels ----


def test_each_port_gets_its_own_fd(xen, platform):
    xen.offered |= {(GUEST, 5), (GUEST, 6)}
    a = platform.bind_interdomain(GUEST, 5)
    b = platform.bind_interdomain(GUEST, 6)
    assert a.fileno() != b.fileno() and a.local_port != b.local_port
    opens = [e for e in xen.log if e[0] == "open"]
    assert all(e[1] == EVTCHN and e[2] & os.O_NONBLOCK for e in opens) and len(opens) == 2
    assert ("ioctl", a.fileno(), 0x00084501) in xen.log


def test_bind_failure_closes_the_fd(xen, platform):
    with pytest.raises(PlatformError) as info:
        platform.bind_interdomain(GUEST, 9)
    assert info.value.errno == errno.EINVAL
    assert list(xen.fds.values()) == [GNTDEV]


def test_notify_ack_and_close(xen, platform):
    xen.offered.add((GUEST, 5))
    ch = platform.bind_interdomain(GUEST, 5)
    ch.notify()
    assert ("sent", ch.local_port) in xen.log
    assert not ch.ack()
    assert not any(e[0] == "unmask" for e in xen.log)
    xen.fire(ch.local_port)
    assert ch.ack()
    assert ("unmask", ch.fileno(), struct.pack("=I", ch.local_port)) in xen.log
    fd = ch.fileno()
    ch.close()
    ch.close()
    assert ("ioctl", fd, 0x00044503) in xen.log and fd not in xen.fds
    assert platform.stats.notifies == 1 and platform.stats.wakeups == 1


def test_overflow_resets_and_reports_an_event(xen, platform):
    xen.offered.add((GUEST, 5))
    ch = platform.bind_interdomain(GUEST, 5)
    xen.overflowed.add(ch.fileno())
    assert ch.ack()
    assert ("ioctl", ch.fileno(), 0x00004505) in xen.log
    assert not ch.ack()


def test_close_unbinds_every_port(xen, platform):
    xen.offered |= {(GUEST, 5), (GUEST, 6)}
    platform.bind_interdomain(GUEST, 5)
    platform.bind_interdomain(GUEST, 6)
    platform.close()
    assert xen.fds == {} and xen.bound == {}


# ---- xenstore location ----


def test_xenstore_path_order(tmp_path, monkeypatch):
    sock_path = tmp_path / "socket"
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    assert find_xenstore_path("/explicit", {"XENSTORED_PATH": "/env"}) == "/explicit"
    assert find_xenstore_path(None, {"XENSTORED_PATH": "/env"}) == "/env"
    monkeypatch.setattr(linux, "XENSTORED_SOCKETS", (str(not_a_socket), str(sock_path)))
    assert find_xenstore_path(None, {}) == "/dev/xen/xenbus"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock_path))
        assert find_xenstore_path(None, {}) == str(sock_path)


def test_platform_xenstore_path(xen):
    assert LinuxPlatform(xenstore_path="/x/socket", calls=xen).xenstore_path() == "/x/socket"


# ---- the real system-call layer, without Xen ----


def test_device_calls_ioctl_and_mmap_on_ordinary_files(tmp_path):
    calls = DeviceCalls()
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = calls.open(str(path), os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            calls.ioctl(fd, 0x00184700, np.zeros(24, np.uint8))
        assert info.value.errno == errno.ENOTTY
        address = calls.mmap(fd, 8192, mmap.PROT_READ, 4096 * 0)
        assert ctypes.string_at(address + 4096, 2) == b"xx"
        calls.munmap(address, 8192)
        with pytest.raises(OSError):
            calls.mmap(fd, 4096, mmap.PROT_READ, 123)  # unaligned offset
    finally:
        calls.close(fd)
