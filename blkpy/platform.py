"""The platform interface: what the code above the device layer may ask of a Xen host.

Two implementations exist: ``linux`` (``blkpy.gntdev.linux``: /dev/xen/gntdev,
/dev/xen/evtchn and the xenstored socket) and ``sim`` (``blkpy.sim.platform``: a simulated
hypervisor in shared memory). Ring, dispatcher, xenbus and CLI code only use this module's
names, so both platforms run the same code above this line.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
from collections.abc import Sequence

import numpy as np

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# Grant status codes (GNTST_*), linux-xen-devices.md 4.3.
GNTST_OKAY = 0
GNTST_GENERAL_ERROR = -1
GNTST_BAD_DOMAIN = -2
GNTST_BAD_GNTREF = -3
GNTST_PERMISSION_DENIED = -8
GNTST_BAD_COPY_ARG = -10

# One grant-copy segment, the platform-neutral form of gntdev_grant_copy_segment:
# `to_guest` 1 copies local -> guest page (a READ's data), 0 copies guest -> local.
COPY_SEGMENT_DTYPE = np.dtype(
    [
        ("local_addr", "<u8"),  # address of local memory (any alignment, may cross pages)
        ("ref", "<u4"),  # grant ref of the guest page
        ("domid", "<u2"),  # guest domid
        ("offset", "<u2"),  # byte offset inside the guest page
        ("length", "<u2"),  # bytes; offset + length <= PAGE_SIZE
        ("to_guest", "u1"),
        ("_pad", "u1"),
        ("status", "<i2"),  # out: GNTST_*
        ("_pad2", "<u2"),
    ]
)


#: gntdev's default per-call limit (module parameter ``limit``); both platforms refuse more.
MAX_GRANTS_PER_MAP = 65536


class PlatformError(OSError):
    """A platform operation failed (carries errno like the real device would)."""


class GrantError(PlatformError):
    """A grant mapping failed as a whole (gntdev: the mmap fails with EINVAL)."""


@dataclasses.dataclass
class PlatformStats:
    """Hardware-independent figures of merit: on real Xen each map/unmap is a hypercall
    and each unmap a TLB flush, so fewer per request is better."""

    map_calls: int = 0
    pages_mapped: int = 0
    unmap_calls: int = 0
    pages_unmapped: int = 0
    copy_calls: int = 0
    copy_segments: int = 0
    notifies: int = 0
    wakeups: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class GrantMapping(abc.ABC):
    """``count`` guest pages mapped contiguously, in the order of the refs given."""

    count: int
    writable: bool

    @property
    @abc.abstractmethod
    def address(self) -> int:
        """Virtual address of the first page (for C code doing I/O into the pages)."""

    @property
    @abc.abstractmethod
    def buffer(self) -> memoryview:
        """A view of the count*PAGE_SIZE bytes (read-only unless ``writable``)."""

    @abc.abstractmethod
    def unmap(self) -> None:
        """Release the mapping; idempotent. After this the guest may revoke the grants."""

    def __enter__(self) -> GrantMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmap()


@dataclasses.dataclass(frozen=True)
class NativeEventChannel:
    """How C code (the native ring loop) notifies and acknowledges a channel by itself:
    ``kind`` 1 is an /dev/xen/evtchn fd (``notify_ioctl``), 2 a sim datagram socket whose
    peer is found through the shared port entry at ``port_entry`` and the socket names
    that start with ``name_prefix``."""

    kind: int
    fd: int
    local_port: int
    notify_ioctl: int = 0
    port_entry: int = 0
    name_prefix: bytes = b""


class EventChannel(abc.ABC):
    """A bound interdomain event channel (the evtchn device's view of one port)."""

    local_port: int

    def native(self) -> NativeEventChannel | None:
        """What native code needs to drive this channel, or None if only Python can."""
        return None

    @abc.abstractmethod
    def fileno(self) -> int:
        """A file descriptor that polls readable while an event is pending."""

    @abc.abstractmethod
    def notify(self) -> None:
        """Send an event to the remote end."""

    @abc.abstractmethod
    def ack(self) -> bool:
        """Consume a pending event and unmask the port; True if one was pending.

        Never blocks."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unbind; idempotent."""


class Platform(abc.ABC):
    """The Xen services a backend domain uses."""

    name: str

    def __init__(self) -> None:
        self.stats = PlatformStats()

    @abc.abstractmethod
    def map_grants(
        self, domid: int, refs: Sequence[int] | np.ndarray, writable: bool
    ) -> GrantMapping:
        """Map ``refs`` granted by ``domid`` as one contiguous range (one ioctl + one mmap).

        Raises GrantError if any ref is bad (not permitted for us, wrong domid, read-only
        grant mapped writable, out of the table); nothing stays mapped then."""

    @abc.abstractmethod
    def grant_copy(self, segments: np.ndarray) -> None:
        """Run a batch of copy segments (COPY_SEGMENT_DTYPE); fills ``status`` per segment.

        Raises PlatformError only when the batch as a whole is malformed."""

    @abc.abstractmethod
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> EventChannel:
        """Bind the remote domain's unbound port; raises PlatformError if it cannot."""

    @abc.abstractmethod
    def xenstore_path(self) -> str:
        """Where the xenstore client connects (a unix socket or /dev/xen/xenbus)."""

    @property
    def backend_domid(self) -> int:
        """The domain this backend runs in (0 for dom0)."""
        return 0

    def state_dirs(self) -> tuple[str, str]:
        """Where a serve publishes its status (`blkpy list`) and its xentop statistics
        page (tapdisk3's shared-memory directory)."""
        return "/run/blkpy", "/dev/shm"

    def close(self) -> None:  # noqa: B027 - platforms without handles need nothing
        """Release device handles; idempotent."""


def grant_ref_array(refs: Sequence[int] | np.ndarray) -> np.ndarray:
    """The refs of one map call as uint32, refusing what gntdev would refuse."""
    try:
        ref_array = np.array(refs, dtype=np.uint32).reshape(-1)
    except (OverflowError, ValueError, TypeError) as exc:
        raise GrantError(errno.EINVAL, f"bad grant refs: {exc}") from None
    if not 0 < ref_array.size <= MAX_GRANTS_PER_MAP:
        raise GrantError(errno.EINVAL, f"cannot map {ref_array.size} grants at once")
    return ref_array


def open_platform(name: str, **options: object) -> Platform:
    """Instantiate the platform called ``name`` (``linux`` or ``sim``)."""
    if name == "linux":
        from blkpy.gntdev.linux import LinuxPlatform

        return LinuxPlatform(**options)  # type: ignore[arg-type]
    if name == "sim":
        from blkpy.sim.platform import SimPlatform

        return SimPlatform(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown platform {name!r} (expected 'linux' or 'sim')")
