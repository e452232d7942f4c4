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

The file is a log: one record per change, appended. A record holds only what changed
since the record before it (a new allocation touches a few 8-byte entries of a 64 KiB L2
table and refcount block: writing the tables whole each time cost 100-250 us per
hand-back), and a region's first record since the log began holds it whole. Replaying
every record in order, phase by phase, therefore writes exactly what the last record
stood for. A serve killed while appending leaves a torn last record, which a successor
ignores: the change it was recording had not been answered yet. When the log has grown
to several times what it stands for, it is rewritten as one whole record into a new file
that replaces it by rename (never half there).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from blkpy.qcow2.plan import Op, Resize, Write

MAGIC = b"BLKPYQRL"
VERSION = 2
# magic, version, image st_dev, image st_ino; then crc32 of those
_FILE_HEAD = struct.Struct("<8sIQQ")
_CRC = struct.Struct("<I")
# payload bytes, crc32 of the payload
_RECORD_HEAD = struct.Struct("<II")
_OP = struct.Struct("<BBQI")  # phase, kind, offset (Resize: size), data length
_WRITE, _RESIZE = 1, 2
# nothing a serve records is bigger (a write-back of a few thousand tables): more in a
# file is damage, not a log
MAX_FILE = 1 << 30
# unchanged 8-byte entries between two changed ones that still go into one write
# (a write costs an op header of 14 bytes)
_GAP = 2
# a log longer than this many times what it stands for (and than _COMPACT_MIN) is
# rewritten whole
_COMPACT_FACTOR = 4
_COMPACT_MIN = 4 << 20

Phases = Sequence[Sequence[Op]]


def file_head(image_id: tuple[int, int]) -> bytes:
    head = _FILE_HEAD.pack(MAGIC, VERSION, image_id[0], image_id[1])
    return head + _CRC.pack(zlib.crc32(head))


def encode_record(phases: Phases) -> bytes:
    """One record: operations tagged with the index of their write-back phase."""
    parts: list[bytes] = []
    for k, phase in enumerate(phases):
        for op in phase:
            if isinstance(op, Write):
                parts += (_OP.pack(k, _WRITE, op.offset, len(op.data)), op.data)
            elif isinstance(op, Resize):
                parts.append(_OP.pack(k, _RESIZE, op.size, 0))
            else:
                raise ValueError(f"a restart record holds writes and resizes, not {op!r}")
    crc = 0
    for b in parts:  # no copy of the tables just to checksum them
        crc = zlib.crc32(b, crc)
    return b"".join([_RECORD_HEAD.pack(sum(len(b) for b in parts), crc), *parts])


def decode(buf: bytes) -> tuple[tuple[int, int], list[list[Op]]] | None:
    """(image id, phases) of a log: every intact record's operations in order, per phase.
    None for anything that is not a log (another file, garbage, a torn head). Reading
    stops at the first torn or damaged record: no later one was acknowledged after it."""
    hs = _FILE_HEAD.size + _CRC.size
    if len(buf) < hs or len(buf) > MAX_FILE:
        return None
    magic, version, dev, ino = _FILE_HEAD.unpack_from(buf)
    (crc,) = _CRC.unpack_from(buf, _FILE_HEAD.size)
    if magic != MAGIC or version != VERSION or zlib.crc32(buf[:_FILE_HEAD.size]) != crc:
        return None
    phases: list[list[Op]] = []
    pos = hs
    while pos + _RECORD_HEAD.size <= len(buf):
        nbody, crc = _RECORD_HEAD.unpack_from(buf, pos)
        body = memoryview(buf)[pos + _RECORD_HEAD.size:pos + _RECORD_HEAD.size + nbody]
        if len(body) != nbody or zlib.crc32(body) != crc:
            break
        ops = _decode_ops(body)
        if ops is None:
            break
        for k, op in ops:
            phases.extend([] for _ in range(k + 1 - len(phases)))
            phases[k].append(op)
        pos += _RECORD_HEAD.size + nbody
    return (dev, ino), phases


def _decode_ops(body: memoryview) -> list[tuple[int, Op]] | None:
    ops: list[tuple[int, Op]] = []
    pos = 0
    while pos < len(body):
        if pos + _OP.size > len(body):
            return None
        phase, kind, offset, length = _OP.unpack_from(body, pos)
        pos += _OP.size
        if kind == _WRITE and pos + length <= len(body):
            ops.append((phase, Write(offset, bytes(body[pos:pos + length]))))
            pos += length
        elif kind == _RESIZE and length == 0:
            ops.append((phase, Resize(offset)))
        else:
            return None
    return ops


def changed_writes(offset: int, old: bytes, new: bytes) -> list[Write]:
    """The writes that turn ``old`` (what was recorded at ``offset``) into ``new``: runs
    of changed 8-byte entries (tables are arrays of them), or ``new`` whole."""
    if len(old) != len(new) or len(new) % 8:
        return [] if old == new else [Write(offset, new)]
    changed = np.flatnonzero(np.frombuffer(old, np.uint64) != np.frombuffer(new, np.uint64))
    if not changed.size:
        return []
    cut = np.flatnonzero(np.diff(changed) > _GAP + 1)
    firsts = changed[np.concatenate(([0], cut + 1))].tolist()
    lasts = changed[np.concatenate((cut, [changed.size - 1]))].tolist()
    return [Write(offset + 8 * a, new[8 * a:8 * (b + 1)]) for a, b in zip(firsts, lasts, strict=True)]


class RestartLog:
    """The log file ``path`` of one image (identified by its st_dev, st_ino)."""

    def __init__(self, path: str, image_id: tuple[int, int]) -> None:
        self.path = path
        self.image_id = image_id
        self.live = False  # a log may be on file (cleared only when there is none)
        self._fd = -1
        self._recorded: dict[int, bytes] = {}  # offset -> what the log holds there now
        self._recorded_bytes = 0  # their total length
        self._size = 0  # the largest Resize recorded
        self._length = 0  # bytes in the file
        self._whole = False  # the next record must be a whole one (file torn or none)

    def latest(self) -> list[list[Op]] | None:
        """The phases the log stands for, if it is this image's log."""
        try:
            with open(self.path, "rb") as f:
                # never a buffer as big as the limit, whatever the file claims
                if os.fstat(f.fileno()).st_size > MAX_FILE:
                    return None
                log = decode(f.read())
        except OSError:
            return None
        if log is None or log[0] != self.image_id:
            return None
        return log[1]

    def record(self, changes: Phases, everything: Callable[[], Phases]) -> None:
        """Append what changed since the last record. ``changes``: what a write-back would
        write now of the regions changed since then (others may be left out: the log holds
        them), in its phase order, each phase's index the same every time;
        ``everything()``: all a write-back would write now, for a log written whole."""
        if self._fd < 0 or self._whole:
            self._rewrite(everything())
            return
        self._whole = True  # until this record is known appended whole
        delta: list[list[Op]] = []
        for phase in changes:
            ops: list[Op] = []
            for op in phase:
                if isinstance(op, Write):
                    old = self._recorded.get(op.offset)
                    if old is None:
                        ops.append(op)
                        self._recorded_bytes += len(op.data)
                    else:
                        ops += changed_writes(op.offset, old, op.data)
                        self._recorded_bytes += len(op.data) - len(old)
                    self._recorded[op.offset] = op.data
                elif isinstance(op, Resize) and op.size > self._size:
                    ops.append(op)
                    self._size = op.size
            delta.append(ops)
        if self._length > max(_COMPACT_MIN, _COMPACT_FACTOR * self._recorded_bytes):
            self._rewrite(everything())
            return
        if not any(delta):
            self._whole = False
            return
        blob = encode_record(delta)
        if os.write(self._fd, blob) != len(blob):
            raise OSError(f"short write of {self.path}")
        self._length += len(blob)
        self._whole = False

    def _rewrite(self, phases: Phases) -> None:
        """A new file holding ``phases`` whole replaces the log by rename."""
        self._whole = True
        self._recorded = {op.offset: op.data for p in phases for op in p if isinstance(op, Write)}
        self._recorded_bytes = sum(len(d) for d in self._recorded.values())
        self._size = max((op.size for p in phases for op in p if isinstance(op, Resize)),
                         default=0)
        blob = file_head(self.image_id) + encode_record(phases)
        tmp = self.path + ".new"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # the first record: its directory too
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(tmp, flags, 0o600)
        try:
            if os.write(fd, blob) != len(blob):
                raise OSError(f"short write of {tmp}")
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._close_fd()
        self._fd = fd
        self._length = len(blob)
        self._whole = False
        self.live = True

    def clear(self) -> None:
        """Nothing is owed any more (a write-back made the image hold it all)."""
        self._close_fd()
        for name in (self.path, self.path + ".new"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        self._recorded.clear()
        self._recorded_bytes = 0
        self._size = 0
        self.live = False

    def close(self) -> None:
        """Stop recording, leaving the log on file (for a successor)."""
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
