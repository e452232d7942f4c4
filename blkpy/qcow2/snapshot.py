"""The internal snapshot table (listed by ``image info``; the active layer is what we serve)."""

from __future__ import annotations

import dataclasses
import struct

from blkpy.backends.base import CorruptImage

_FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes


@dataclasses.dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None  # from the extra data, when present


def table_length(data: bytes, count: int) -> int:
    """Byte length of ``count`` entries at the start of ``data`` (CorruptImage if short)."""
    return _walk(data, count)[1]


def parse_snapshots(data: bytes, count: int) -> list[Snapshot]:
    return _walk(data, count)[0]


def _walk(data: bytes, count: int) -> tuple[list[Snapshot], int]:
    snaps: list[Snapshot] = []
    pos = 0
    for _ in range(count):
        if pos + _FIXED.size > len(data):
            raise CorruptImage("snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmstate,
         extra_len) = _FIXED.unpack_from(data, pos)
        extra_start = pos + _FIXED.size
        id_start = extra_start + extra_len
        end = id_start + id_len + name_len
        if end > len(data):
            raise CorruptImage("snapshot table is truncated")
        extra = data[extra_start:id_start]
        disk_size = None
        if len(extra) >= 8:
            vmstate = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        snaps.append(Snapshot(
            l1_off, l1_size,
            data[id_start:id_start + id_len].decode("utf-8", "replace"),
            data[id_start + id_len:end].decode("utf-8", "replace"),
            dsec, dnsec, clock, vmstate, disk_size))
        pos = (end + 7) // 8 * 8
    return snaps, pos
