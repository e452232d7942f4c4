"""The metadata only a serve's memory holds, kept where its successor finds it.

A qcow2 serve writes its L2 tables and refcount blocks back at the guest's flush (each
phase synced before the next: the crash-safe order). Between flushes, a guest write that
allocated a cluster is answered with the cluster's mapping only in the serve's memory:
after a power failure that is allowed (the guest did not flush), but a serve killed and
taken over by a successor (the guest does not notice) must not lose it, or the guest
reads its old bytes back. So after every metadata change the serve records what a
write-back would write now, phase by phase, in a file of the run directory (memory, not
disk: it matters only while the host is up); the successor applies it to the image, each
phase synced, before it reads the metadata.

A record is a whole snapshot (the latest one supersedes every earlier one), written
alternately into two slot files so that a serve killed while writing one leaves the
other, older one intact: the change it was recording had not been answered yet.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Sequence

from blkpy.qcow2.plan import Op, Resize, Write

MAGIC = b"BLKPYQRL"
VERSION = 1
# magic, version, generation, image st_dev, image st_ino, phases, payload bytes; then crc32
_HEAD = struct.Struct("<8sIQQQIQ")
_CRC = struct.Struct("<I")
_PHASE = struct.Struct("<I")
_OP = struct.Struct("<BQI")  # kind, offset, data length (Resize: size, 0)
_WRITE, _RESIZE = 1, 2
# a record names at most this much (a write-back of a few thousand tables): anything
# bigger in a slot file is damage, not a record
MAX_PAYLOAD = 1 << 30


def encode(generation: int, image_id: tuple[int, int], phases: Sequence[Sequence[Op]]) -> bytes:
    """One record: the write-back's operations, phase by phase, for one image file."""
    parts: list[bytes] = []
    for phase in phases:
        parts.append(_PHASE.pack(len(phase)))
        for op in phase:
            if isinstance(op, Write):
                parts += (_OP.pack(_WRITE, op.offset, len(op.data)), op.data)
            elif isinstance(op, Resize):
                parts.append(_OP.pack(_RESIZE, op.size, 0))
            else:
                raise ValueError(f"a restart record holds writes and resizes, not {op!r}")
    head = _HEAD.pack(MAGIC, VERSION, generation, image_id[0], image_id[1], len(phases),
                      sum(len(b) for b in parts))
    crc = zlib.crc32(head)
    for b in parts:  # no copy of the tables just to checksum them
        crc = zlib.crc32(b, crc)
    return b"".join([head, _CRC.pack(crc), *parts])


def decode(buf: bytes) -> tuple[int, tuple[int, int], list[list[Op]]] | None:
    """(generation, image id, phases) of a record, or None for anything that is not a
    whole, intact record (a torn write, another file, garbage)."""
    hs = _HEAD.size + _CRC.size
    if len(buf) < hs:
        return None
    magic, version, gen, dev, ino, nphases, nbody = _HEAD.unpack_from(buf)
    if magic != MAGIC or version != VERSION or nbody > MAX_PAYLOAD or len(buf) != hs + nbody:
        return None
    (crc,) = _CRC.unpack_from(buf, _HEAD.size)
    if zlib.crc32(buf[:_HEAD.size] + buf[hs:]) != crc:
        return None
    phases: list[list[Op]] = []
    pos = hs
    try:
        for _ in range(nphases):
            (nops,) = _PHASE.unpack_from(buf, pos)
            pos += _PHASE.size
            ops: list[Op] = []
            for _ in range(nops):
                kind, offset, length = _OP.unpack_from(buf, pos)
                pos += _OP.size
                if kind == _WRITE and pos + length <= len(buf):
                    ops.append(Write(offset, bytes(buf[pos:pos + length])))
                    pos += length
                elif kind == _RESIZE and length == 0:
                    ops.append(Resize(offset))
                else:
                    return None
            phases.append(ops)
    except struct.error:  # counts that run past the end
        return None
    if pos != len(buf):
        return None
    return gen, (dev, ino), phases


class RestartLog:
    """The two slot files ``<path>.0`` and ``<path>.1`` of one image's record."""

    def __init__(self, path: str, image_id: tuple[int, int]) -> None:
        self.path = path
        self.image_id = image_id
        self._generation = 0
        self.live = False  # a record may be on file (cleared only when there is none)

    def _slot(self, generation: int) -> str:
        return f"{self.path}.{generation % 2}"

    def latest(self) -> list[list[Op]] | None:
        """The phases of the newest intact record of this image, if any."""
        best: tuple[int, list[list[Op]]] | None = None
        for k in (0, 1):
            try:
                with open(self._slot(k), "rb") as f:
                    # never a buffer as big as the limit, whatever the file claims
                    if os.fstat(f.fileno()).st_size > MAX_PAYLOAD + _HEAD.size + _CRC.size:
                        continue
                    rec = decode(f.read())
            except OSError:
                continue
            if rec is None or rec[1] != self.image_id:
                continue
            if best is None or rec[0] > best[0]:
                best = (rec[0], rec[2])
        if best is not None:
            self._generation = best[0]
        return None if best is None else best[1]

    def record(self, phases: Sequence[Sequence[Op]]) -> None:
        """Keep ``phases`` as the newest record (the other slot keeps the one before)."""
        self._generation += 1
        blob = encode(self._generation, self.image_id, phases)
        slot = self._slot(self._generation)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(slot, flags, 0o600)
        except FileNotFoundError:  # the first record: its directory too
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(slot, flags, 0o600)
        try:
            if os.pwrite(fd, blob, 0) != len(blob):
                raise OSError(f"short write of {slot}")
            os.ftruncate(fd, len(blob))
        finally:
            os.close(fd)
        self.live = True

    def clear(self) -> None:
        """Nothing is owed any more (a write-back made the image hold it all)."""
        for k in (0, 1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._slot(k))
        self.live = False
