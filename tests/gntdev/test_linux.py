"""LinuxPlatform against a fake gntdev/evtchn pair (tests/gntdev/fake_xen.py)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import termios

import numpy as np
import pytest

from blkpy.gntdev import linux
from blkpy.gntdev.linux import DeviceCalls, LinuxPlatform, find_xenstore_path
from blkpy.platform import (
    COPY_SEGMENT_DTYPE,
    GNTST_BAD_GNTREF,
    GNTST_OKAY,
    GNTST_PERMISSION_DENIED,
    GrantError,
    PlatformError,
    open_platform,
)

from .fake_xen import EVTCHN, GNTDEV, GUEST, FakeXen


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


@pytest.mark.parametrize(("domid", "refs"), [(GUEST, []), (GUEST, [-1]), (GUEST, [2**40]),
                                            (-1, [8]), (0x10000, [8])])
def test_malformed_requests_make_no_syscall(xen, platform, domid, refs):
    with pytest.raises(GrantError):
        platform.map_grants(domid, refs, writable=False)
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


def test_device_calls_ioctl_writes_results_back():
    calls = DeviceCalls()
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"abc")
        arg = np.zeros(4, np.uint8)
        assert calls.ioctl(read_end, termios.FIONREAD, arg) == 0
        assert int(arg.view("<u4")[0]) == 3
    finally:
        os.close(read_end)
        os.close(write_end)


def test_bind_unbound_port(xen, platform):
    ch = platform.bind_unbound_port(7)
    assert xen.unbound[ch.local_port] == 7
    assert ("ioctl", ch.fileno(), 0x00044502) in xen.log
    ch.close()
