"""An in-memory model of what the guest expects the virtual disk to contain.

Workloads record every completed write and discard here and check every completed read
against it. Content the guest never wrote is unknown until first read: the first read of
an unknown sector defines it (the image's prior content is not the guest's business), and
from then on it must not change. Storage is allocated lazily in chunks, so a model of a
large disk costs only what the workload touches.
"""

from __future__ import annotations

import numpy as np

SECTOR = 512
CHUNK = 1 << 20  # bytes per lazily allocated chunk
_SECTORS_PER_CHUNK = CHUNK // SECTOR


class DiskModel:
    """Expected bytes of a disk of ``size`` bytes (a multiple of 512)."""

    def __init__(self, size: int, *, zeroed: bool = False) -> None:
        """``zeroed``: the disk is known to start as zeros (a fresh sparse image)."""
        if size % SECTOR:
            raise ValueError("disk size must be a multiple of 512")
        self.size = size
        self._zeroed = zeroed
        # chunk index -> (data bytes, known flag per 512-byte sector)
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chunk = self._chunks.get(index)
        if chunk is None:
            known = np.full(_SECTORS_PER_CHUNK, self._zeroed, dtype=bool)
            chunk = (np.zeros(CHUNK, dtype=np.uint8), known)
            self._chunks[index] = chunk
        return chunk

    def _pieces(self, offset: int, length: int):
        """(chunk index, start in chunk, start in caller's buffer, length) for a range."""
        if offset % SECTOR or length % SECTOR or offset < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} not sector-aligned inside {self.size}")
        pos = 0
        while pos < length:
            index, start = divmod(offset + pos, CHUNK)
            n = min(CHUNK - start, length - pos)
            yield index, start, pos, n
            pos += n

    def write(self, offset: int, data: bytes | np.ndarray) -> None:
        """Record a completed write."""
        buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        for index, start, pos, n in self._pieces(offset, len(buf)):
            chunk, known = self._chunk(index)
            chunk[start : start + n] = buf[pos : pos + n]
            known[start // SECTOR : (start + n) // SECTOR] = True

    def discard(self, offset: int, length: int, *, reads_zero: bool) -> None:
        """Record a completed discard: the range now reads as zeros, or (if the backend
        does not promise that) as whatever it reads next."""
        for index, start, _pos, n in self._pieces(offset, length):
            chunk, known = self._chunk(index)
            chunk[start : start + n] = 0
            known[start // SECTOR : (start + n) // SECTOR] = reads_zero

    def check(self, offset: int, data: bytes | np.ndarray) -> int:
        """Compare a completed read with the model; returns the number of differing bytes.

        Unknown sectors adopt the data read."""
        buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        bad = 0
        for index, start, pos, n in self._pieces(offset, len(buf)):
            if index not in self._chunks and not self._zeroed:
                self.write(offset + pos, buf[pos : pos + n])
                continue
            chunk, known = self._chunk(index)
            got = buf[pos : pos + n]
            expected = chunk[start : start + n]
            mask = np.repeat(known[start // SECTOR : (start + n) // SECTOR], SECTOR)
            bad += int(np.count_nonzero((got != expected) & mask))
            unknown = ~mask
            if unknown.any():
                expected[unknown] = got[unknown]
                known[start // SECTOR : (start + n) // SECTOR] = True
        return bad

    def expected(self, offset: int, length: int) -> np.ndarray:
        """The model's bytes for a range (unknown sectors read as zeros)."""
        out = np.zeros(length, dtype=np.uint8)
        for index, start, pos, n in self._pieces(offset, length):
            if index in self._chunks:
                out[pos : pos + n] = self._chunks[index][0][start : start + n]
        return out
