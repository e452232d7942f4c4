"""Campaign 1: fuzzed ring requests against an in-process device, judged by the oracle.

For each configuration (ABI x ring order x grant mode x read-only x sector size x engine)
a simulated guest fills batches of request slots: valid requests, valid requests with one
field mutated (operation, segment count, sector incl. u64 wrap, segment bounds, grant refs
never granted / ended / read-only / the ring's own page / duplicated, indirect counts,
descriptors, pages and indirect_op) and raw random slots. The oracle (blkpy.fuzz.oracle)
classifies each slot from its bytes; the campaign then checks every answer and every byte:

- each request answered exactly once, with its id and (indirect_)operation; status in
  {OKAY, ERROR, EOPNOTSUPP}; invalid never OKAY; valid never refused;
- reads return the image's bytes; only the sectors of accepted writes and discards change
  (a refused request touches nothing); the image never grows; a read-only one never changes;
- no grant is still mapped after the device closes; nothing logged a traceback; the ring
  never halted.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import struct
import tempfile
import time

import numpy as np

from blkpy.fuzz import CampaignResult, FindingLog, Progress
from blkpy.fuzz.oracle import (
    LAYOUTS,
    OP_BARRIER,
    OP_DISCARD,
    OP_FLUSH,
    OP_INDIRECT,
    OP_READ,
    OP_WRITE,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    Class,
    Disk,
    Expectation,
    Grants,
    SlotLayout,
    judge,
    parse_responses,
)

DISK_BYTES = 4 << 20
#: requests at scale 1 (the CI version); --full (scale 100) is 10**6
REQUESTS_PER_SCALE = 10_000
ENGINES = ("sync", "uring", "thread")
GRANT_MODES = ("persistent", "map", "copy")


@dataclasses.dataclass(frozen=True)
class Config:
    abi: str
    order: int
    grant_mode: str
    readonly: bool
    sector_size: int
    engine: str

    def label(self) -> str:
        ro = " ro" if self.readonly else ""
        return (f"{self.abi} order {self.order} {self.grant_mode}{ro} "
                f"{self.sector_size}B {self.engine}")


def all_configs() -> list[Config]:
    return [Config(*c) for c in itertools.product(
        sorted(LAYOUTS), (0, 2), GRANT_MODES, (False, True), (512, 4096), ENGINES)]


def run(seed: int, scale: float, progress: Progress) -> CampaignResult:
    started = time.monotonic()
    rng = random.Random(seed)
    configs = all_configs()
    total = int(REQUESTS_PER_SCALE * scale)
    if scale < 10:  # the short version: a seeded sample of the matrix
        configs = rng.sample(configs, max(8, min(len(configs), int(24 * scale))))
    per_config = max(200, total // len(configs))
    findings = FindingLog("ring", seed)
    done = 0
    for k, config in enumerate(configs):
        cseed = rng.getrandbits(32)
        done += _run_config(config, cseed, per_config, findings)
        if k % 8 == 7 or k == len(configs) - 1:
            progress(f"ring: {k + 1}/{len(configs)} configurations, {done} requests, "
                     f"{findings.total} finding(s)")
    return CampaignResult("ring", "requests", done, time.monotonic() - started,
                          findings.findings, {"configurations": len(configs),
                                              "violations": findings.total})


class _LogWatch(logging.Handler):
    """Tracebacks and errors logged by the backend are findings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(f"{record.levelname}: {record.getMessage()}")


def _run_config(config: Config, seed: int, count: int, findings: FindingLog,
                start_index: int = 0) -> int:
    """Fuzz one configuration with ``count`` requests; ``start_index`` is where the
    ring's free-running indices start (near 2**32 they wrap during the run)."""
    # Imported here: `blkpy fuzz --help` should not pay for the simulator.
    from blkpy.sim.inprocess import InProcessDevice

    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    fd, image = tempfile.mkstemp(prefix="blkpy-fuzz-", suffix=".img")
    watch = _LogWatch()
    root = logging.getLogger("blkpy")
    root.addHandler(watch)
    previous_level = root.level
    root.setLevel(logging.WARNING)
    logging.getLogger("blkpy").propagate = False
    served = 0
    try:
        # Some data, some holes: reads of both must return the image's bytes.
        content = nprng.integers(0, 256, DISK_BYTES, dtype=np.uint8)
        content[DISK_BYTES // 2 :] = 0
        os.pwrite(fd, content.tobytes(), 0)
        dev = InProcessDevice(
            image, abi=config.abi, order=config.order, readonly=config.readonly,
            persistent=config.grant_mode == "persistent",
            grant_mode="copy" if config.grant_mode == "copy" else "map",
            engine=config.engine, sector_size=config.sector_size, start_index=start_index,
        )
        guest = _Guest(dev, config, rng, nprng, content)
        try:
            while served < count and not _halted(dev, findings, config, seed):
                served += guest.batch(findings, seed)
        finally:
            leftover = _close(dev, guest.all_refs)
            if leftover:
                findings.add(f"{config.label()} seed {seed}",
                             f"grants still mapped after close: {leftover[:8]}")
        if os.fstat(fd).st_size != DISK_BYTES:
            findings.add(config.label(), f"image size changed to {os.fstat(fd).st_size}")
    finally:
        root.removeHandler(watch)
        root.setLevel(previous_level)
        logging.getLogger("blkpy").propagate = True
        os.close(fd)
        os.unlink(image)
    for line in watch.bad[:3]:
        findings.add(config.label(), f"backend logged {line}", kind="logged error")
    return served


def _halted(dev, findings: FindingLog, config: Config, seed: int) -> bool:  # noqa: ANN001
    if dev.broken:
        findings.add(f"{config.label()} seed {seed}", f"ring halted: {dev.broken[-1]}")
        return True
    return False


def _close(dev, refs: list[int]) -> list[int]:  # noqa: ANN001 - InProcessDevice
    """Close the device, then list the guest's grants the backend still maps."""
    from blkpy.sim.guest import GTF_READING, GTF_WRITING

    dev.vbd.close()
    dev.ring_map.unmap()
    still = [r for r in refs if dev.guest.grant_entry(r)[0] & (GTF_READING | GTF_WRITING)]
    dev.close()
    return still


def _whence(data: bytes, image: np.ndarray) -> str:
    """Where wrong bytes came from, if they are some other sector of the image."""
    if data == bytes(len(data)):
        return " (zeros)"
    hits = np.flatnonzero(np.all(image == np.frombuffer(data, np.uint8), axis=1))
    return f" (those of sector {int(hits[0])})" if len(hits) else " (not from the image)"


class _Guest:
    """The hostile frontend of one configuration: its pages, grants and disk model."""

    def __init__(self, dev, config: Config, rng: random.Random,  # noqa: ANN001
                 nprng: np.random.Generator, content: np.ndarray) -> None:
        self.dev = dev
        self.config = config
        self.rng = rng
        self.nprng = nprng
        self.layout: SlotLayout = LAYOUTS[config.abi]
        self.model = content.reshape(-1, 512).copy()
        self.disk = Disk(sectors=DISK_BYTES // 512, sector_size=config.sector_size,
                         readonly=config.readonly, discard=dev.geometry.discard,
                         max_indirect_segments=dev.geometry.max_indirect_segments)
        self.ring_size = dev.front.size
        g = dev.guest
        self.frame_of: dict[int, int] = {}

        def grant(n: int, readonly: bool = False) -> list[int]:
            refs = []
            for frame in g.alloc_pages(n):
                ref = g.grant_access(frame, 0, readonly=readonly)
                self.frame_of[ref] = frame
                refs.append(ref)
            return refs

        self.data = grant(160)
        self.ro = grant(12, readonly=True)
        self.indirect = grant(40) + grant(4, readonly=True)
        ended = grant(12)
        for ref in ended:
            g.end_access(ref)
            del self.frame_of[ref]
        # Refs the guest never granted: the reserved ones, free table entries, beyond it.
        self.bogus = [0, 1, 7, g.grant_entries - 1, g.grant_entries, 0xFFFFFFFF, 0x7FFFFFFF]
        self.ended = ended
        self.ring_refs = list(dev.ring_refs)
        self.grants = Grants(frozenset(self.data + self.indirect),
                             frozenset(self.ro), frozenset(self.ring_refs))
        self.all_refs = self.data + self.ro + self.indirect + self.ring_refs
        self.next_id = rng.getrandbits(40) << 16

    # ---- building a batch -------------------------------------------------------------

    def batch(self, findings: FindingLog, seed: int) -> int:
        rng = self.rng
        n = rng.choice((1, 2, 3, 5, 8, 16, self.ring_size // 2, self.ring_size))
        n = min(n, self.ring_size)
        pages = self.data[:]
        rng.shuffle(pages)
        half = len(pages) // 2
        self.src, self.dst = pages[:half], pages[half:]
        self.indirect_free = self.indirect[:]
        rng.shuffle(self.indirect_free)
        for ref in self.indirect:  # no stale descriptors naming this batch's pages
            self._page(ref)[:] = 0
        for ref in self.src:  # fresh data: every write is distinguishable
            self._page(ref)[:] = self.nprng.integers(0, 256, 4096, dtype=np.uint8)
        for ref in self.dst:  # garbage: a read that did not happen shows
            self._page(ref)[:] = self.nprng.integers(0, 256, 4096, dtype=np.uint8)
        slots = [self._request() for _ in range(n)]
        expect = [judge(self.layout, s, self.disk, self.grants, self._read_granted)
                  for s in slots]
        before = self.model.copy()
        raw = np.frombuffer(b"".join(slots), dtype=self.dev.abi.raw)
        rsp = self.dev.run(raw)
        got = parse_responses(self.layout, rsp.view(self.dev.abi.raw).tobytes())
        self._check(expect, got, before, findings, seed)
        return n

    def _page(self, ref: int) -> np.ndarray:
        f = self.frame_of[ref]
        return self.dev.guest.memory[f * 4096 : (f + 1) * 4096]

    def _read_granted(self, ref: int) -> bytes | None:
        if ref not in self.frame_of:
            return None
        return bytes(self._page(ref))

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _request(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.04:
            slot = bytearray(rng.randbytes(self.layout.entry_size))
            struct.pack_into("<Q", slot, self.layout.id_off, self._new_id())
            return bytes(slot)
        if roll < 0.08:
            return self._semi_random()
        if roll < 0.43:
            slot = self._inline(OP_READ)
        elif roll < 0.70:
            slot = self._inline(OP_WRITE)
        elif roll < 0.84:
            slot = self._indirect(rng.choice((OP_READ, OP_WRITE)))
        elif roll < 0.91:
            slot = self._inline(rng.choice((OP_FLUSH, OP_BARRIER)), allow_empty=True)
        else:
            slot = self._discard()
        if rng.random() < 0.45:
            self._mutate(slot)
        return bytes(slot)

    def _slot(self, op: int, byte1: int, sector: int) -> bytearray:
        slot = bytearray(self.layout.entry_size)
        slot[0], slot[1] = op, byte1
        struct.pack_into("<H", slot, 2, self.rng.getrandbits(16))  # handle: ignored
        struct.pack_into("<Q", slot, self.layout.id_off, self._new_id())
        struct.pack_into("<Q", slot, self.layout.sector_off, sector)
        return slot

    def _sector(self, nsec: int) -> int:
        per = self.config.sector_size // 512
        last = max(0, self.disk.sectors - nsec)
        if self.rng.random() < 0.1:
            return last - last % per  # at the very end
        s = self.rng.randrange(0, last + 1)
        return s - s % per

    def _segment(self, pool: list[int]) -> tuple[int, int, int]:
        if self.config.sector_size > 512 or self.rng.random() < 0.6:
            return self.rng.choice(pool), 0, 7
        first = self.rng.randrange(0, 8)
        return self.rng.choice(pool), first, self.rng.randrange(first, 8)

    def _inline(self, op: int, allow_empty: bool = False) -> bytearray:
        n = self.rng.randrange(0 if allow_empty else 1, 12)
        pool = self.dst if op == OP_READ else self.src
        segs = [self._segment(pool) for _ in range(n)]
        nsec = sum(last - first + 1 for _, first, last in segs)
        slot = self._slot(op, n, self._sector(nsec) if n else self.rng.getrandbits(64))
        for k, seg in enumerate(segs):
            struct.pack_into("<IBB", slot, self.layout.after + 8 * k, *seg)
        return slot

    def _indirect(self, iop: int) -> bytearray:
        n = self.rng.choice((12, 17, 32, 64, 100, 256, self.rng.randrange(1, 257)))
        pool = self.dst if iop == OP_READ else self.src
        segs = [self._segment(pool) for _ in range(n)]
        nsec = sum(last - first + 1 for _, first, last in segs)
        slot = self._slot(OP_INDIRECT, iop, self._sector(nsec))
        struct.pack_into("<H", slot, 2, n)
        page_ref = self.indirect_free.pop() if self.indirect_free else self.rng.choice(
            self.indirect)
        page = self._page(page_ref)
        page[:] = 0
        desc = b"".join(struct.pack("<IBBH", *seg, 0) for seg in segs)
        page[: len(desc)] = np.frombuffer(desc, np.uint8)
        struct.pack_into("<I", slot, self.layout.indirect_grefs_off, page_ref)
        # Unused indirect_grefs entries are noise the backend must ignore.
        for k in range(1, 8):
            struct.pack_into("<I", slot, self.layout.indirect_grefs_off + 4 * k,
                             self.rng.getrandbits(32))
        return slot

    def _discard(self) -> bytearray:
        per = self.config.sector_size // 512
        nsec = self.rng.randrange(1, 512) * per
        slot = self._slot(OP_DISCARD, 0, self._sector(nsec))
        struct.pack_into("<Q", slot, self.layout.after, nsec)
        return slot

    def _semi_random(self) -> bytes:
        """Random bytes under a known operation with plausible grant refs."""
        rng = self.rng
        slot = bytearray(rng.randbytes(self.layout.entry_size))
        op = rng.choice((OP_READ, OP_WRITE, OP_FLUSH, OP_BARRIER, OP_DISCARD, OP_INDIRECT, 4,
                         rng.randrange(7, 256)))
        slot[0] = op
        struct.pack_into("<Q", slot, self.layout.id_off, self._new_id())
        pool = self.dst if op == OP_READ else self.src + self.ro
        for k in range(11):
            if op == OP_INDIRECT:
                break
            struct.pack_into("<I", slot, self.layout.after + 8 * k, rng.choice(
                pool + self.bogus + self.ended))
        if op == OP_INDIRECT and rng.random() < 0.5:
            struct.pack_into("<I", slot, self.layout.indirect_grefs_off,
                             rng.choice(self.indirect))
        return bytes(slot)

    def _bad_gref(self, into_guest: bool) -> int:
        choices = [self.rng.choice(self.bogus), self.rng.choice(self.ended)]
        if into_guest:
            choices.append(self.rng.choice(self.ro))  # a read-only grant to read into
        else:
            choices.append(self.rng.choice(self.ring_refs))  # the ring's own page
        return self.rng.choice(choices)

    def _mutate(self, slot: bytearray) -> None:
        rng, lay = self.rng, self.layout
        op = slot[0]
        field = rng.choice(("op", "count", "sector", "bounds", "gref", "dup", "byte1"))
        if field == "op":
            slot[0] = rng.randrange(256)
        elif field == "count":
            if op == OP_INDIRECT:
                struct.pack_into("<H", slot, 2, rng.choice(
                    (0, 257, 512, 4096, 4097, 0xFFFF, rng.getrandbits(16))))
            elif op == OP_DISCARD:
                struct.pack_into("<Q", slot, lay.after, rng.choice(
                    (0, 1, 2**63, 2**64 - 1, self.disk.sectors + 1, rng.getrandbits(64))))
            else:
                slot[1] = rng.choice((0, 12, 255, rng.randrange(256)))
        elif field == "sector":
            struct.pack_into("<Q", slot, lay.sector_off, rng.choice((
                self.disk.sectors, self.disk.sectors - 1, self.disk.sectors - 8,
                2**64 - 1, 2**64 - 8, 2**63, rng.getrandbits(64),
                struct.unpack_from("<Q", slot, lay.sector_off)[0] + 1)))
        elif field == "byte1":
            slot[1] = rng.randrange(256)  # indirect_op, discard flag, inline count
        elif op == OP_INDIRECT:
            self._mutate_indirect(slot, field)
        elif op in (OP_READ, OP_WRITE, OP_FLUSH, OP_BARRIER) and 0 < slot[1] <= 11:
            k = rng.randrange(slot[1])
            at = lay.after + 8 * k
            if field == "bounds":
                slot[at + 4 + rng.randrange(2)] = rng.randrange(256)
            elif field == "gref":
                struct.pack_into("<I", slot, at, self._bad_gref(op == OP_READ))
            elif slot[1] > 1:  # dup: another segment's page (same direction)
                other = lay.after + 8 * rng.randrange(slot[1])
                slot[at : at + 4] = slot[other : other + 4]

    def _mutate_indirect(self, slot: bytearray, field: str) -> None:
        rng, lay = self.rng, self.layout
        iop = slot[1]
        page_ref = struct.unpack_from("<I", slot, lay.indirect_grefs_off)[0]
        n = struct.unpack_from("<H", slot, 2)[0]
        if field == "gref" and rng.random() < 0.5:  # the descriptor page itself
            struct.pack_into("<I", slot, lay.indirect_grefs_off,
                             rng.choice(self.bogus + self.ended))
            return
        page = self._page(page_ref)
        k = rng.randrange(max(1, min(n, 512)))
        if field == "bounds":
            page[8 * k + 4 + rng.randrange(2)] = rng.randrange(256)
        elif field == "gref":
            page[8 * k : 8 * k + 4] = np.frombuffer(
                struct.pack("<I", self._bad_gref(iop == OP_READ)), np.uint8)
        elif n > 1:  # dup
            j = 8 * rng.randrange(min(n, 512))
            page[8 * k : 8 * k + 4] = page[j : j + 4].copy()

    # ---- judging a batch --------------------------------------------------------------

    def _check(self, expect: list[Expectation], got: list[tuple[int, int, int]],
               before: np.ndarray, findings: FindingLog, seed: int) -> None:
        label = self.config.label()
        where = f"{label} seed {seed}"
        by_id = {e.rid: e for e in expect}
        status: dict[int, int] = {}
        for rid, rop, st in got:
            e = by_id.get(rid)
            if e is None:
                findings.add(where, f"response for unknown id {rid:#x}")
                continue
            if rid in status:
                findings.add(where, f"id {rid:#x} answered twice ({e.why})")
            status[rid] = st
            if rop != e.rsp_op:
                findings.add(where, f"wrong operation: {rop} for {e.why} (want {e.rsp_op})")
            if st not in (RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP):
                findings.add(where, f"status {st} is not a blkif status")
            if e.klass is Class.VALID and st != RSP_OKAY:
                findings.add(where, f"valid {e.why} refused: status {st}", kind=f"valid {e.why} refused")
            if e.klass is Class.INVALID and st == RSP_OKAY:
                findings.add(where, f"invalid request ({e.why}) answered OKAY",
                             kind=f"invalid {e.why} accepted")
        for e in expect:
            if e.rid not in status:
                findings.add(where, f"request ({e.why}) never answered")
        self._check_disk(expect, status, before, findings, where)

    def _check_disk(self, expect: list[Expectation], status: dict[int, int],
                    before: np.ndarray, findings: FindingLog, where: str) -> None:
        # What each sector may hold now: its old bytes (unless an accepted write covered
        # it), any write of the batch that was not refused, zeros after a discard.
        writes: dict[int, list[bytes]] = {}
        unknown: set[int] = set()
        # A mutated operation can turn a write into a read of the same pages: what a
        # write of this batch read from such a page is then open.
        read_into = {(p.gref, p.offset) for e in expect if e.op == OP_READ
                     for p in e.pieces}
        must_change: set[int] = set()
        zeroable: set[int] = set()
        for e in expect:
            st = status.get(e.rid)
            landed = st == RSP_OKAY or e.klass is Class.EITHER
            if e.op in (OP_WRITE, OP_FLUSH, OP_BARRIER) and e.pieces and landed \
                    and e.klass is not Class.INVALID:
                for p in e.pieces:
                    if e.data_unknown or (p.gref, p.offset) in read_into:
                        unknown.add(p.sector)
                    else:
                        writes.setdefault(p.sector, []).append(self._piece(p))
                        must_change.add(p.sector)
            if e.discard and landed:
                zeroable.update(range(e.discard[0], e.discard[0] + e.discard[1]))
        actual = np.fromfile(self.dev.disk.path, dtype=np.uint8).reshape(-1, 512)
        if actual.shape != before.shape:
            findings.add(where, f"image is {actual.size} bytes, was {before.size}")
            return
        changed = np.flatnonzero(np.any(actual != before, axis=1))
        zero = bytes(512)
        for s in changed.tolist():
            now = actual[s].tobytes()
            if s in unknown:
                continue
            if now in writes.get(s, ()) or (s in zeroable and now == zero):
                continue
            findings.add(where, f"sector {s} changed to bytes no accepted request wrote",
                         kind="stray write")
            break
        for s in must_change:
            now = actual[s].tobytes()
            if now not in writes[s] and s not in unknown and not (s in zeroable and now == zero):
                findings.add(where, f"accepted write to sector {s} is not on the image",
                             kind="lost write")
                break
        # Reads: each page region read by exactly one accepted segment shows the sector's
        # old bytes, or a write/discard of the same batch (requests run in any order).
        targets: dict[tuple[int, int], int] = {}
        for e in expect:
            if e.op == OP_READ:
                for p in e.pieces:
                    targets[(p.gref, p.offset)] = targets.get((p.gref, p.offset), 0) + 1
        for e in expect:
            if e.op != OP_READ or status.get(e.rid) != RSP_OKAY or e.klass is Class.INVALID:
                continue
            for p in e.pieces:
                if targets[(p.gref, p.offset)] != 1 or p.sector in unknown:
                    continue
                got = self._piece(p)
                if got == before[p.sector].tobytes() or got in writes.get(p.sector, ()) or (
                        p.sector in zeroable and got == zero):
                    continue
                findings.add(where, f"read of sector {p.sector} (request of {len(e.pieces)} "
                             f"sectors from {e.pieces[0].sector}, gref {p.gref}+{p.offset}) "
                             f"returned wrong bytes{_whence(got, before)}", kind="bad read")
                break
        self.model = actual.copy()

    def _piece(self, p) -> bytes:  # noqa: ANN001 - Piece
        return self._page(p.gref)[p.offset : p.offset + 512].tobytes()
