"""The ``linux`` platform: a real Xen host through /dev/xen/gntdev and /dev/xen/evtchn.

A batch of grants costs one MAP_GRANT_REF ioctl and one mmap (the hypercall happens inside the
mmap); teardown is munmap then UNMAP_GRANT_REF, as libxengnttab does. Each bound event channel
gets its own evtchn fd, so its fileno() polls readable exactly when that port fired.
All system calls go through a DeviceCalls object so tests can put a fake device behind them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import time
from collections.abc import Mapping, Sequence

import numpy as np

from blkpy.gntdev import abi
from blkpy.gntdev.copy_batch import check_copy_batch
from blkpy.gntdev.mapping import MappedPages
from blkpy.gntdev.native import lib
from blkpy.platform import (
    PAGE_SIZE,
    EventChannel,
    GrantError,
    NativeEventChannel,
    Platform,
    PlatformError,
    grant_ref_array,
)

GNTDEV_PATH = "/dev/xen/gntdev"
EVTCHN_PATH = "/dev/xen/evtchn"
GNTALLOC_PATH = "/dev/xen/gntalloc"
XENBUS_PATH = "/dev/xen/xenbus"
XENSTORED_SOCKETS = ("/run/xenstored/socket", "/var/run/xenstored/socket")
XENSTORED_PATH_ENV = "XENSTORED_PATH"

# libxengnttab retries a mmap that failed with EAGAIN (a paged-out guest page) every 1 ms;
# we give up after a second rather than spin forever on a guest that never pages it in.
EAGAIN_RETRY_S = 0.001
EAGAIN_RETRIES = 1000

_MODULES = {GNTDEV_PATH: "xen-gntdev", EVTCHN_PATH: "xen-evtchn", GNTALLOC_PATH: "xen-gntalloc"}


class DeviceCalls:
    """The system calls of the linux platform, one method each (raise OSError on failure)."""

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: np.ndarray | None = None) -> int:
        """The ioctl's return value; ``arg`` (bytes the kernel reads and writes) is updated."""
        if arg is None:
            return fcntl.ioctl(fd, request, 0)
        return fcntl.ioctl(fd, request, memoryview(arg).cast("B"), True)

    def mmap(self, fd: int, length: int, prot: int, offset: int) -> int:
        address = lib.blkpy_mmap(fd, length, prot, mmap.MAP_SHARED, offset)
        if address < 0:
            raise OSError(-address, os.strerror(-address))
        return address

    def munmap(self, address: int, length: int) -> None:
        result = lib.blkpy_munmap(address, length)
        if result < 0:
            raise OSError(-result, os.strerror(-result))

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def find_xenstore_path(
    explicit: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """Explicit path, else $XENSTORED_PATH, else the xenstored socket, else /dev/xen/xenbus."""
    if explicit:
        return explicit
    env = os.environ if environ is None else environ
    if env.get(XENSTORED_PATH_ENV):
        return env[XENSTORED_PATH_ENV]
    for path in XENSTORED_SOCKETS:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
    return XENBUS_PATH


def device_error(path: str, exc: OSError) -> PlatformError:
    if exc.errno == errno.ENOENT:
        module = _MODULES.get(path, "xen")
        why = f"is this a Xen dom0 with the {module} module loaded?"
        return PlatformError(errno.ENOENT, f"{path} not found: {why}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PlatformError(exc.errno, f"{path}: permission denied (the backend must run as root)")
    return PlatformError(exc.errno, f"{path}: {os.strerror(exc.errno or 0)}")


def _port_arg(port: int) -> np.ndarray:
    return np.array([port], dtype=abi.EVTCHN_PORT_DTYPE).view(np.uint8)


class LinuxGrantMapping(MappedPages):
    def __init__(
        self, platform: LinuxPlatform, index: int, count: int, writable: bool, address: int
    ) -> None:
        super().__init__(count, writable, address)
        self._platform = platform
        self.index = index  # gntdev's offset of the registered range

    def _release(self, address: int) -> None:
        self._platform._unmap(self, address)


class LinuxEventChannel(EventChannel):
    """One port bound through its own /dev/xen/evtchn fd."""

    def __init__(self, platform: LinuxPlatform, fd: int, local_port: int) -> None:
        self._platform = platform
        self._fd: int | None = fd
        self.local_port = local_port

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("event channel is closed")
        return self._fd

    def native(self) -> NativeEventChannel | None:
        if type(self._platform.calls) is not DeviceCalls:
            return None  # calls are intercepted (tests): only Python goes through them
        return NativeEventChannel(1, self.fileno(), self.local_port,
                                  notify_ioctl=abi.IOCTL_EVTCHN_NOTIFY)

    def notify(self) -> None:
        self._platform.stats.notifies += 1
        try:
            self._platform.calls.ioctl(self.fileno(), abi.IOCTL_EVTCHN_NOTIFY, _port_arg(self.local_port))
        except OSError as exc:
            raise PlatformError(exc.errno, f"notify on port {self.local_port}: {exc.strerror}") from None

    def ack(self) -> bool:
        calls = self._platform.calls
        fd = self.fileno()
        try:
            pending = calls.read(fd, PAGE_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise PlatformError(exc.errno, f"reading port {self.local_port}: {exc.strerror}") from None
            # The pending queue overflowed: events were lost, so report one and re-arm.
            calls.ioctl(fd, abi.IOCTL_EVTCHN_RESET)
            pending = _port_arg(self.local_port).tobytes()
        if not pending:
            return False
        calls.write(fd, pending)  # unmask what fired
        self._platform.stats.wakeups += 1
        return True

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        calls = self._platform.calls
        with contextlib.suppress(OSError):  # closing the fd unbinds anyway
            calls.ioctl(fd, abi.IOCTL_EVTCHN_UNBIND, _port_arg(self.local_port))
        calls.close(fd)


class LinuxPlatform(Platform):
    """Xen services of the domain this process runs in (dom0 or a driver domain)."""

    name = "linux"

    def __init__(
        self,
        gntdev_path: str = GNTDEV_PATH,
        evtchn_path: str = EVTCHN_PATH,
        xenstore_path: str | None = None,
        calls: DeviceCalls | None = None,
    ) -> None:
        super().__init__()
        self.calls = calls or DeviceCalls()
        self._evtchn_path = evtchn_path
        self._xenstore_path = xenstore_path
        self._gntdev_fd: int | None = self._open(gntdev_path)
        # Probe evtchn now so a missing device is reported at start, not at first connect.
        self.calls.close(self._open(evtchn_path))
        self._channels: list[LinuxEventChannel] = []

    def _open(self, path: str, flags: int = os.O_RDWR) -> int:
        try:
            return self.calls.open(path, flags)
        except OSError as exc:
            raise device_error(path, exc) from None

    @property
    def _gntdev(self) -> int:
        if self._gntdev_fd is None:
            raise PlatformError(errno.EBADF, "the linux platform is closed")
        return self._gntdev_fd

    # ---- grants ----

    def map_grants(
        self, domid: int, refs: Sequence[int] | np.ndarray, writable: bool
    ) -> LinuxGrantMapping:
        self.stats.map_calls += 1
        ref_array = grant_ref_array(refs)
        count = int(ref_array.size)
        if not 0 <= domid <= 0xFFFF:
            raise GrantError(errno.EINVAL, f"bad domain id {domid}")
        arg = abi.map_grant_ref_arg(domid, ref_array)
        try:
            self.calls.ioctl(self._gntdev, abi.IOCTL_GNTDEV_MAP_GRANT_REF, arg)
        except OSError as exc:
            raise GrantError(exc.errno, f"registering {count} grants: {exc.strerror}") from None
        index = abi.map_grant_ref_index(arg)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        for attempt in range(EAGAIN_RETRIES):
            try:
                address = self.calls.mmap(self._gntdev, count * PAGE_SIZE, prot, index)
                break
            except OSError as exc:
                if exc.errno == errno.EAGAIN and attempt + 1 < EAGAIN_RETRIES:
                    self.calls.sleep(EAGAIN_RETRY_S)
                    continue
                self._unregister(index, count)
                raise GrantError(
                    exc.errno,
                    f"mapping {count} grants of domain {domid}: {os.strerror(exc.errno or 0)}",
                ) from None
        self.stats.pages_mapped += count
        return LinuxGrantMapping(self, index, count, writable, address)

    def _unregister(self, index: int, count: int) -> None:
        arg = np.array([(index, count, 0)], dtype=abi.UNMAP_GRANT_REF_DTYPE).view(np.uint8)
        try:
            self.calls.ioctl(self._gntdev, abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, arg)
        except OSError as exc:
            raise PlatformError(exc.errno, f"UNMAP_GRANT_REF({index}, {count}): {exc.strerror}") from None

    def _unmap(self, mapping: LinuxGrantMapping, address: int) -> None:
        self.stats.unmap_calls += 1
        self.stats.pages_unmapped += mapping.count
        try:
            self.calls.munmap(address, mapping.count * PAGE_SIZE)
        except OSError as exc:
            raise PlatformError(exc.errno, f"munmap of a grant mapping: {exc.strerror}") from None
        if self._gntdev_fd is not None:  # a closed fd already dropped the registration
            self._unregister(mapping.index, mapping.count)

    def set_unmap_notify(
        self, mapping: LinuxGrantMapping, offset: int, action: int, port: int = 0
    ) -> None:
        """When ``mapping`` finally goes away, clear the byte at ``offset`` (CLEAR_BYTE,
        writable mappings only) and/or send an event on ``port`` (SEND_EVENT)."""
        if action & ~(abi.UNMAP_NOTIFY_CLEAR_BYTE | abi.UNMAP_NOTIFY_SEND_EVENT):
            raise PlatformError(errno.EINVAL, f"unknown unmap-notify action {action:#x}")
        if not 0 <= offset < mapping.count * PAGE_SIZE:
            raise PlatformError(errno.EINVAL, f"offset {offset} outside the mapping")
        arg = np.array(
            [(mapping.index + offset, action, port)], dtype=abi.UNMAP_NOTIFY_DTYPE
        ).view(np.uint8)
        try:
            self.calls.ioctl(self._gntdev, abi.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, arg)
        except OSError as exc:
            raise PlatformError(exc.errno, f"SET_UNMAP_NOTIFY: {exc.strerror}") from None

    def grant_copy(self, segments: np.ndarray) -> None:
        check_copy_batch(segments)
        if len(segments) == 0:
            return
        self.stats.copy_calls += 1
        self.stats.copy_segments += len(segments)
        native = abi.native_copy_segments(segments)
        arg = abi.grant_copy_arg(len(native), native.ctypes.data)
        try:
            self.calls.ioctl(self._gntdev, abi.NATIVE.IOCTL_GNTDEV_GRANT_COPY, arg)
        except OSError as exc:
            raise PlatformError(exc.errno, f"GRANT_COPY of {len(segments)} segments: {exc.strerror}") from None
        segments["status"] = native["status"]

    def supports_grant_copy(self) -> bool:
        """Whether the kernel has GRANT_COPY (an empty batch succeeds iff it does)."""
        try:
            self.calls.ioctl(self._gntdev, abi.NATIVE.IOCTL_GNTDEV_GRANT_COPY, abi.grant_copy_arg(0, 0))
        except OSError:
            return False
        return True

    # ---- event channels ----

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> LinuxEventChannel:
        arg = np.array([(remote_domid, remote_port)], dtype=abi.EVTCHN_BIND_INTERDOMAIN_DTYPE)
        return self._bind(
            abi.IOCTL_EVTCHN_BIND_INTERDOMAIN, arg,
            f"binding port {remote_port} of domain {remote_domid}",
        )

    def bind_unbound_port(self, remote_domid: int) -> LinuxEventChannel:
        """A new port that ``remote_domid`` may bind (the frontend side, for real-Xen tests)."""
        arg = np.array([(remote_domid,)], dtype=abi.EVTCHN_BIND_UNBOUND_PORT_DTYPE)
        return self._bind(
            abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT, arg, f"allocating a port for domain {remote_domid}"
        )

    def _bind(self, request: int, arg: np.ndarray, what: str) -> LinuxEventChannel:
        """One fresh evtchn fd per port, so each channel's fileno() wakes for it alone."""
        fd = self._open(self._evtchn_path, os.O_RDWR | os.O_NONBLOCK)
        try:
            port = self.calls.ioctl(fd, request, arg.view(np.uint8))
        except OSError as exc:
            self.calls.close(fd)
            raise PlatformError(exc.errno, f"{what}: {exc.strerror}") from None
        channel = LinuxEventChannel(self, fd, port)
        self._channels = [c for c in self._channels if c._fd is not None]
        self._channels.append(channel)
        return channel

    def xenstore_path(self) -> str:
        return find_xenstore_path(self._xenstore_path)

    def close(self) -> None:
        """Unbind every port and drop every grant registration (mappings stay until
        unmapped, as with gntdev)."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self._gntdev_fd is not None:
            fd, self._gntdev_fd = self._gntdev_fd, None
            self.calls.close(fd)
