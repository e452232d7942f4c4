"""Refcount blocks of any width (1..64 bits): decode to / encode from uint64 arrays."""

from __future__ import annotations

import numpy as np

from blkpy.backends.base import CorruptImage

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

_WIDE = {8: np.dtype("u1"), 16: np.dtype(">u2"), 32: np.dtype(">u4"), 64: np.dtype(">u8")}


def entries_per_block(cluster_size: int, refcount_bits: int) -> int:
    return cluster_size * 8 // refcount_bits


def max_refcount(refcount_bits: int) -> int:
    return (1 << refcount_bits) - 1


def decode_block(data: bytes, refcount_bits: int) -> np.ndarray:
    """One refcount block's entries as a writable uint64 array."""
    if refcount_bits in _WIDE:
        return np.frombuffer(data, dtype=_WIDE[refcount_bits]).astype(np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8)
    per_byte = 8 // refcount_bits
    shifts = np.arange(per_byte, dtype=np.uint8) * refcount_bits  # LSB first
    mask = (1 << refcount_bits) - 1
    return ((raw[:, None] >> shifts[None, :]) & mask).reshape(-1).astype(np.uint64)


def encode_block(entries: np.ndarray, refcount_bits: int) -> bytes:
    """Inverse of decode_block."""
    if refcount_bits in _WIDE:
        return entries.astype(_WIDE[refcount_bits]).tobytes()
    per_byte = 8 // refcount_bits
    shifts = np.arange(per_byte, dtype=np.uint64) * np.uint64(refcount_bits)
    grouped = entries.reshape(-1, per_byte) << shifts[None, :]
    return np.bitwise_or.reduce(grouped, axis=1).astype(np.uint8).tobytes()


def check_reftable_entry(value: int, cluster_size: int, file_size: int) -> int:
    """Return the refcount block offset named by a refcount table entry (0 = none)."""
    offset = value & REFT_OFFSET_MASK
    if value & REFT_RESERVED_MASK or offset % cluster_size:
        raise CorruptImage(f"refcount table entry 0x{value:x} is misaligned")
    if offset and offset + cluster_size > file_size:
        raise CorruptImage(f"refcount block outside the image (0x{offset:x})")
    return offset
