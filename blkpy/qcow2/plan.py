"""Ordered storage operations the metadata core asks the I/O layer to carry out.

The core never touches a file: it hands out plans, and the order inside a plan is the
crash-consistency argument (see Metadata.writeback_plan)."""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Write:
    offset: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class Sync:
    """Everything written before this point is durable before anything after it starts."""


@dataclasses.dataclass(frozen=True)
class Resize:
    """Grow the file to at least ``size`` bytes (newly allocated clusters lie inside it)."""

    size: int


@dataclasses.dataclass(frozen=True)
class Punch:
    """Release the space of a free cluster (it reads as zeros afterwards); best effort."""

    offset: int
    length: int


Op = Write | Sync | Resize | Punch


class SyncLost(OSError):
    """A Sync failed. The kernel may have dropped the pages it could not write back (a
    later fsync would succeed without them: QEMU's ``page_cache_inconsistent``), so what
    the file holds is unknown and the ordering a Sync stands for is gone: no metadata may
    be written after it. A failed Write, by contrast, is retried by the next write-back."""


class Storage(Protocol):
    """What the core needs from the image file."""

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes (zeros past the end of the file)."""

    def execute(self, plan: list[Op]) -> None:
        """Carry out ``plan`` in order; raise OSError on failure."""


class MemoryStorage:
    """A Storage over a bytearray, recording the plans it ran (for tests and builders)."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.log: list[Op] = []

    def read(self, offset: int, length: int) -> bytes:
        chunk = bytes(self.data[offset:offset + length])
        return chunk + bytes(length - len(chunk))

    def execute(self, plan: list[Op]) -> None:
        for op in plan:
            self.log.append(op)
            if isinstance(op, Write):
                end = op.offset + len(op.data)
                if end > len(self.data):
                    self.data.extend(bytes(end - len(self.data)))
                self.data[op.offset:end] = op.data
            elif isinstance(op, Resize) and op.size > len(self.data):
                self.data.extend(bytes(op.size - len(self.data)))
            elif isinstance(op, Punch):
                end = min(op.offset + op.length, len(self.data))
                self.data[op.offset:end] = bytes(max(0, end - op.offset))
