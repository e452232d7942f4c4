"""Persistent dirty bitmaps: only what ``check`` needs to count their clusters.

blkpy keeps no bitmaps up to date; opening an image for writing clears the bitmaps
autoclear bit, which is the format's way of saying "a program lacking bitmap support
modified this file" (QEMU then drops the bitmaps and reports their clusters as leaks).
"""

from __future__ import annotations

import dataclasses
import struct

from blkpy.backends.base import CorruptImage

_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
# table offset, table size (entries), flags, type, granularity bits, name size, extra size
_ENTRY = struct.Struct(">QIIBBHI")
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
MAX_DIRECTORY_SIZE = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class BitmapsExtension:
    count: int
    directory_size: int
    directory_offset: int


@dataclasses.dataclass(frozen=True)
class BitmapTable:
    offset: int
    entries: int  # u64 entries


def parse_extension(data: bytes) -> BitmapsExtension:
    if len(data) < _EXT.size:
        raise CorruptImage("bitmaps extension is truncated")
    count, _, size, offset = _EXT.unpack_from(data)
    if size > MAX_DIRECTORY_SIZE:
        raise CorruptImage("bitmap directory is too large")
    return BitmapsExtension(count, size, offset)


def parse_directory(data: bytes, count: int) -> list[BitmapTable]:
    """The bitmap tables named by a directory of ``count`` entries."""
    tables = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > len(data):
            raise CorruptImage("bitmap directory is truncated")
        offset, size, _flags, _type, _gran, name_size, extra = _ENTRY.unpack_from(data, pos)
        tables.append(BitmapTable(offset, size))
        pos += _ENTRY.size + extra + name_size
        pos = (pos + 7) // 8 * 8
    if pos > len(data):
        raise CorruptImage("bitmap directory is truncated")
    return tables


def data_clusters(table: bytes) -> list[int]:
    """Host offsets of the data clusters a bitmap table points to (0: all zeros, and bit 0
    alone: all ones, need none)."""
    out = []
    for (value,) in struct.iter_unpack(">Q", table):
        offset = value & BME_TABLE_ENTRY_OFFSET_MASK
        if offset:
            out.append(offset)
    return out
