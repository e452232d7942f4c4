"""The storage interface every image format implements (raw, qcow2, ...).

A Disk knows nothing of rings or grants: it takes byte offsets in the virtual disk and
buffers (memoryviews, usually views of mapped guest pages) and moves bytes. The dispatcher
validates every request against ``size``/``readonly`` before calling in, but a Disk still
checks its own bounds: it is the last line before the host file.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blkpy.native_table import ExtentMap


class DiskError(Exception):
    """An operator-facing problem opening or using an image (one clear line)."""


class CorruptImage(DiskError):
    """The image's metadata is inconsistent or points outside the file."""


class UnsupportedImage(DiskError):
    """The image uses a feature blkpy refuses (encryption, unknown incompatible bits...)."""


class Disk(abc.ABC):
    """A virtual disk of ``size`` bytes."""

    #: virtual size in bytes (a multiple of 512)
    size: int
    #: opened read-only: writev/discard raise PermissionError
    readonly: bool
    #: logical sector size advertised to the guest (512 or 4096)
    sector_size: int = 512
    #: whether discard() does something (else the op is not advertised)
    can_discard: bool = False
    #: discard granularity in bytes (advertised as discard-granularity)
    discard_granularity: int = 4096
    #: opened with O_DIRECT: synchronous I/O would hold the guest's queue at depth 1
    o_direct: bool = False

    @property
    def direct_fd(self) -> int | None:
        """If not None, virtual offset X lives at offset X of this fd (raw images), so an
        I/O engine may run preadv/pwritev on it directly, batched in C."""
        return None

    def native_io(self) -> tuple[int, ExtentMap | None] | None:
        """What the native ring loop needs to move guest data itself: the fd holding it
        and the format's extents (None: guest offset X is offset X of the fd), or None if
        only this object can do the I/O."""
        fd = self.direct_fd
        return None if fd is None else (fd, None)

    def loop_queue(self) -> Any:
        """For disks the native loop cannot reach through an fd (network disks): an
        asynchronous queue of their own it can send requests to and reap completions from
        (an object with ``native``, the C queue, and ``close``); None: none."""
        return None

    def allocation_ahead(self, offset: int, length: int) -> tuple[int, int] | None:
        """After ``map_for_write(offset, length)``: the range worth mapping before the
        guest asks (a sequential writer's next cluster), or None."""
        return None

    def map_for_write(self, offset: int, length: int) -> bool:
        """Make the clusters of a write the native loop could not place writable in its
        extent map (allocate them, keeping what the guest reads there), so the loop can
        serve the write itself. False: this request needs the format's own write path."""
        return False

    def learnt_regions(self) -> list[int]:
        """The regions this disk's extent map knows places in (a qcow2 image: its L2
        tables, by L1 index), for a successor to learn before it serves."""
        return []

    def learn_regions(self, regions: list[object]) -> int:
        """Learn the places of ``regions`` (a predecessor's ``learnt_regions``; anything
        else is skipped) now, so the native loop serves their first requests itself. How
        many were learnt."""
        return 0

    def mapping_batch(self) -> contextlib.AbstractContextManager[None]:
        """Around several ``map_for_write`` calls of one hand-back: a format may defer
        what each would do once (qcow2 records its metadata for a successor once, at the
        end). The loop writes nothing into the mapped clusters before it is left."""
        return contextlib.nullcontext()

    def refresh_size(self) -> int:
        """Re-read the virtual size (an operator grew the image); returns it."""
        return self.size

    @abc.abstractmethod
    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order with the bytes at ``offset``. Raises OSError/DiskError."""

    @abc.abstractmethod
    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write ``bufs`` in order at ``offset``. Raises OSError/DiskError."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> None:
        """Make the range read as zeros and release its space if possible."""
        raise NotImplementedError

    def write_back(self) -> None:
        """Write what only this process's memory holds (a format's metadata) to the image
        now, as the close will, without ending anything: a hand-over does it before its
        word, so that the close its guest waits for has little left to write."""
        return None  # a raw image's memory holds nothing of its own

    def give_up(self) -> None:
        """The process is going away (SIGTERM): a network disk stops waiting for a lost
        server, so what waits for it fails now and closing does not wait either."""
        return None  # a local disk never waits for anyone

    @abc.abstractmethod
    def close(self) -> None:
        """Flush metadata and release the file(s); idempotent."""

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_range(self, offset: int, length: int) -> None:
        """Raise ValueError unless [offset, offset+length) lies inside the disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside disk of {self.size} bytes")
