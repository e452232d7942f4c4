"""A ring's restart journal: what a successor process needs to take the ring over after
this one dies, without the guest seeing more than a pause.

The shared ring alone cannot tell: responses go into the oldest consumed slots in
completion order, overwriting requests that may still be in flight. So each ring keeps,
in a small file mapping that outlives the process (``struct blkpy_ring_journal`` in
blkpy/gntdev/ringloop.h, written by the native loop and by BackRing alike), its private
indices and a private copy of every request consumed but not answered. The store order
makes every crash point recoverable (a killed process's stores are all in the file):

- consume: the copy is recorded live, then ``req_cons`` moves past it, then the I/O starts;
- answer: the response position is recorded (``rsp_pos`` = position + 1), then the
  response slot written, then ``rsp_prod_pvt`` moved past it, then the entry cleared.

On takeover (``recover``): responses below the journal's ``rsp_prod_pvt`` are complete
and only need publishing; a live entry whose ``rsp_pos`` lies below it was answered; every
other live entry is replayed, and answered, exactly once. Writes of the dead process may
still land after the replay; they carry the same bytes to the same place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
from pathlib import Path

import numpy as np

from blkpy.gntdev.native import ffi

MAGIC = 0x4A4B4C42
SLOT_BYTES = 112
HEADER = np.dtype([("magic", "<u4"), ("size", "<u4"), ("entry_size", "<u4"),
                   ("generation", "<u4"), ("req_cons", "<u4"), ("rsp_prod_pvt", "<u4"),
                   ("cursor", "<u4"), ("_pad", "<u4", 9)])
ENTRY = np.dtype([("live", "<u4"), ("rsp_pos", "<u4"), ("index", "<u4"), ("_pad", "<u4"),
                  ("slot", "u1", SLOT_BYTES)])
_MASK = 0xFFFFFFFF


class JournalError(Exception):
    """The journal cannot be used to take the ring over (wrong ring, damaged)."""


@dataclasses.dataclass
class Recovery:
    """What a successor found: where to resume, and the requests to serve again."""

    req_cons: int
    rsp_prod_pvt: int
    replay_entries: np.ndarray  # journal entries of the requests to serve again, oldest first
    replay_indices: np.ndarray  # their ring indices
    replay_slots: np.ndarray  # their private copies (entry_size bytes each)


class RingJournal:
    def __init__(self, path: str | os.PathLike[str], size: int, entry_size: int,
                 create: bool = True) -> None:
        """``create`` False: only a journal of this ring's size already on file (a
        running predecessor's, mapped ahead of its hand-over: its stores show through the
        shared mapping), else JournalError; it is never created or resized."""
        if entry_size > SLOT_BYTES:
            raise ValueError(f"slots of {entry_size} bytes do not fit the journal")
        self.path = Path(path)
        self.size = size
        self.entry_size = entry_size
        nbytes = HEADER.itemsize + ENTRY.itemsize * size
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0),
                         0o600)
        except FileNotFoundError:
            if create:
                raise
            raise JournalError(f"{self.path}: no journal on file") from None
        try:
            existed = os.fstat(fd).st_size
            if existed != nbytes and not create:
                raise JournalError(f"{self.path}: {existed} bytes, not a journal of a ring "
                                   f"of {size}")
            if existed != nbytes:
                os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.had_state = existed == nbytes
        self.header = np.frombuffer(self._map, dtype=HEADER, count=1)
        self.entries = np.frombuffer(self._map, dtype=ENTRY, count=size,
                                     offset=HEADER.itemsize)
        self._slots = self.entries["slot"]
        self.native = ffi.cast("struct blkpy_ring_journal *",
                               np.frombuffer(self._map, np.uint8).ctypes.data)

    # ---- starting ----------------------------------------------------------------------

    def start(self, rsp_prod: int, generation: int = 0) -> None:
        """A fresh connection: nothing in flight, indices where the ring attaches."""
        self.entries["live"] = 0
        h = self.header[0]
        h["size"], h["entry_size"], h["generation"] = self.size, self.entry_size, generation
        h["req_cons"] = h["rsp_prod_pvt"] = rsp_prod & _MASK
        h["magic"] = MAGIC  # last: a half-written journal is never taken for a valid one

    def recover(self) -> Recovery:
        """Take over from a dead predecessor (raises JournalError if that cannot be done
        safely: then the ring must not be touched)."""
        h = self.header[0]
        if not self.had_state or int(h["magic"]) != MAGIC:
            raise JournalError(f"{self.path}: no journal of a previous serve")
        if int(h["size"]) != self.size or int(h["entry_size"]) != self.entry_size:
            raise JournalError(f"{self.path}: journal of a ring of {int(h['size'])} slots of "
                               f"{int(h['entry_size'])} bytes, not {self.size} of "
                               f"{self.entry_size}")
        req_cons, rsp_prod_pvt = int(h["req_cons"]), int(h["rsp_prod_pvt"])
        outstanding = (req_cons - rsp_prod_pvt) & _MASK
        if outstanding > self.size:
            raise JournalError(f"{self.path}: {outstanding} requests in flight on a ring of "
                               f"{self.size}")
        e = self.entries
        live = e["live"] != 0
        # Answered: a response position was taken below rsp_prod_pvt (mod 2**32).
        ahead = (rsp_prod_pvt - (e["rsp_pos"].astype(np.int64) - 1)) & _MASK
        answered = live & (e["rsp_pos"] != 0) & (ahead >= 1) & (ahead < (1 << 31))
        e["live"][answered] = 0
        live &= ~answered
        # Every other live entry is owed an answer (their ring indices may span more
        # than the ring: answers go out in completion order).
        if int(np.count_nonzero(live)) != outstanding:
            raise JournalError(f"{self.path}: {int(np.count_nonzero(live))} requests recorded "
                               f"in flight, the indices say {outstanding}")
        age = (req_cons - e["index"].astype(np.int64)) & _MASK
        idx = np.flatnonzero(live)
        idx = idx[np.argsort(-age[idx], kind="stable")]
        return Recovery(req_cons, rsp_prod_pvt, idx.astype(np.int64),
                        e["index"][idx].astype(np.uint32),
                        self._slots[idx, : self.entry_size].copy())

    # ---- the reference path's records (the loop does the same in C) ------------------

    def consumed(self, first: int, slots: np.ndarray) -> np.ndarray:
        """``slots`` (raw entry_size records) were consumed at ring indices first..;
        returns the entries that hold them (free ones from the cursor on, as the loop
        takes them)."""
        n = len(slots)
        e = self.entries
        free = np.flatnonzero(e["live"] == 0)
        cursor = int(self.header["cursor"][0]) & (self.size - 1)
        free = np.concatenate((free[free >= cursor], free[free < cursor]))
        if len(free) < n:
            raise JournalError(f"{self.path}: {n} requests consumed, {len(free)} entries free")
        k = free[:n]
        self._slots[k, : self.entry_size] = slots.view(np.uint8).reshape(n, self.entry_size)
        e["index"][k] = (first + np.arange(n, dtype=np.int64)) & _MASK
        e["rsp_pos"][k] = 0
        e["live"][k] = 1
        self.header["req_cons"] = (first + n) & _MASK
        self.header["cursor"] = (int(k[-1]) + 1) & (self.size - 1)
        return k.astype(np.int64)

    def answering(self, entries: np.ndarray, first_pos: int) -> None:
        self.entries["rsp_pos"][entries] = (first_pos + 1 + np.arange(len(entries))) & _MASK

    def answered(self, entries: np.ndarray, rsp_prod_pvt: int) -> None:
        self.header["rsp_prod_pvt"] = rsp_prod_pvt & _MASK
        self.entries["live"][entries] = 0

    def close(self) -> None:
        """Unmap (the file stays for a successor)."""
        self.header = self.entries = self._slots = None  # type: ignore[assignment]
        self.native = ffi.NULL
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when it goes
            self._map.close()

    def remove(self) -> None:
        """The device is gone for good: nothing to take over."""
        self.path.unlink(missing_ok=True)
