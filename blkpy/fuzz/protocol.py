"""Campaign 2: attacks on the ring protocol itself rather than on single requests.

- **index jumps**: req_prod beyond the ring, backwards, anywhere: the backend halts the
  ring (Linux's "bogus ring requests") or answers no more than a ring's worth, never crashes;
- **index wrap**: a ring whose free-running indices start just below 2**32, fuzzed like
  campaign 1 across the wrap;
- **event games**: the guest scribbles over req_event (the backend's field) and rsp_event
  and notifies at random, against a backend serving on its own thread: every request is
  still answered exactly once;
- **double fetch**: another thread flips a request's sector, segment bounds and grant refs
  (inline, and the descriptors of indirect pages) between a valid and a hostile value while
  the backend consumes it: the answer must fit one of the two values as a whole (a read
  returns the image at one of the two places, a write changes only one of them), never a
  mix, and nothing outside the disk is touched;
- **grant revocation**: the guest ends its grants while its requests are in flight (grant
  copy and transient maps): each request is answered once, OKAY or ERROR, and nothing breaks;
- **event storm** (blkpy.fuzz.storm): a guest notifying in a tight loop with an empty ring
  costs the backend a bounded share of a core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from blkpy.fuzz import CampaignResult, FindingLog, Progress
from blkpy.fuzz.oracle import LAYOUTS, OP_INDIRECT, OP_READ, OP_WRITE, parse_responses
from blkpy.fuzz.ring_requests import GRANT_MODES, Config, _LogWatch, _run_config

DISK_BYTES = 2 << 20
SECTORS = DISK_BYTES // 512
#: cases per attack at scale 1
CASES_PER_SCALE = {"jump": 12, "wrap": 2, "events": 6, "double-fetch": 40, "revoke": 8}
ANSWER_TIMEOUT = 5.0


def run(seed: int, scale: float, progress: Progress) -> CampaignResult:
    from blkpy.fuzz.storm import event_storm  # a serve process; kept apart

    started = time.monotonic()
    rng = random.Random(seed)
    findings = FindingLog("protocol", seed)
    attacks: dict[str, Callable[[random.Random, FindingLog], None]] = {
        "jump": _jump, "wrap": _wrap, "events": _events, "double-fetch": _double_fetch,
        "revoke": _revoke,
    }
    cases = 0
    for name, attack in attacks.items():
        n = max(1, int(CASES_PER_SCALE[name] * scale))
        for _ in range(n):
            attack(random.Random(rng.getrandbits(32)), findings)
        cases += n
        progress(f"protocol: {name}: {n} cases, {findings.total} finding(s) so far")
    figures: dict[str, float | int | str] = {"violations": findings.total}
    storm = event_storm(seed, findings, seconds=2.0 if scale < 10 else 10.0)
    figures.update(storm)
    cases += 1
    progress(f"protocol: event storm: {storm}")
    return CampaignResult("protocol", "cases", cases, time.monotonic() - started,
                          findings.findings, figures)


# ---- a device and a guest that talks to its ring directly ------------------------------------

@contextlib.contextmanager
def _device(rng: random.Random, findings: FindingLog, what: str, *, threaded: bool,
            grant_mode: str | None = None, engine: str | None = None
            ) -> Iterator[_Frontend]:
    from blkpy.sim.inprocess import InProcessDevice

    mode = grant_mode or rng.choice(GRANT_MODES)
    abi = rng.choice(sorted(LAYOUTS))
    order = rng.choice((0, 1, 2))
    engine = engine or rng.choice(("sync", "uring", "thread"))
    label = f"{what}: {abi} order {order} {mode} {engine}"
    fd, image = tempfile.mkstemp(prefix="blkpy-fuzz-", suffix=".img")
    watch = _LogWatch()
    import logging

    log = logging.getLogger("blkpy")
    log.addHandler(watch)
    log.propagate = False
    try:
        os.pwrite(fd, np.random.default_rng(rng.getrandbits(32)).integers(
            0, 256, DISK_BYTES, dtype=np.uint8).tobytes(), 0)
        dev = InProcessDevice(image, abi=abi, order=order,
                              persistent=mode == "persistent",
                              grant_mode="copy" if mode == "copy" else "map",
                              engine=engine, poll_us=rng.choice((0, 50)))
        front = _Frontend(dev, label, findings, fd, threaded)
        if threaded:
            dev.vbd.start()
        try:
            yield front
        finally:
            front.close()
        if os.fstat(fd).st_size != DISK_BYTES:
            findings.add(label, "image size changed")
    finally:
        log.removeHandler(watch)
        log.propagate = True
        os.close(fd)
        os.unlink(image)
    expected_halt = front.expect_halt
    for line in watch.bad:
        if expected_halt and "ring halted" in line:
            continue
        findings.add(label, f"backend logged {line}", kind="logged error")


@dataclasses.dataclass
class _Request:
    rid: int
    op: int
    sector: int
    frames: list[int]


class _Frontend:
    def __init__(self, dev, label: str, findings: FindingLog, fd: int,  # noqa: ANN001
                 threaded: bool) -> None:
        self.dev = dev
        self.threaded = threaded
        self.label = label
        self.findings = findings
        self.fd = fd
        self.layout = LAYOUTS[dev.abi.name]
        self.expect_halt = False
        self.next_id = 1000
        self.refs: dict[int, int] = {}  # frame -> gref

    def close(self) -> None:
        from blkpy.sim.guest import GTF_READING, GTF_WRITING

        dev = self.dev
        dev.vbd.close()
        dev.ring_map.unmap()
        mapped = [r for r in self.refs.values()
                  if dev.guest.grant_entry(r)[0] & (GTF_READING | GTF_WRITING)]
        if mapped:
            self.findings.add(self.label, f"grants still mapped after close: {mapped[:8]}")
        dev.close()

    def page(self, frame: int) -> np.ndarray:
        return self.dev.guest.memory[frame * 4096 : (frame + 1) * 4096]

    def data_page(self, readonly: bool = False) -> tuple[int, int]:
        frame = self.dev.guest.alloc_pages(1)[0]
        ref = self.dev.guest.grant_access(frame, 0, readonly=readonly)
        self.refs[frame] = ref
        return frame, ref

    def slot(self, op: int, sector: int, segs: list[tuple[int, int, int]]) -> bytearray:
        lay = self.layout
        slot = bytearray(lay.entry_size)
        slot[0], slot[1] = op, len(segs)
        self.next_id += 1
        struct.pack_into("<Q", slot, lay.id_off, self.next_id)
        struct.pack_into("<Q", slot, lay.sector_off, sector)
        for k, seg in enumerate(segs):
            struct.pack_into("<IBB", slot, lay.after + 8 * k, *seg)
        return slot

    def slot_view(self, index: int) -> np.ndarray:
        """The guest's view of ring slot ``index`` (free-running)."""
        front = self.dev.front
        k = index & (front.size - 1)
        raw = front._slots_raw  # the guest owns the ring memory: writing it is its right
        return raw[k : k + 1].view(np.uint8)

    def push(self, slots: list[bytes], notify: bool = True) -> int:
        """Put slots on the ring and publish them; returns the index of the first."""
        front = self.dev.front
        first = front.req_prod_pvt
        front.put_requests(np.frombuffer(b"".join(slots), dtype=self.dev.abi.raw))
        front.push_requests()
        if notify:
            self.dev.port.notify()
        return first

    def collect(self, ids: set[int], timeout: float = ANSWER_TIMEOUT,
                poke: Callable[[], None] | None = None) -> dict[int, int]:
        """Responses for ``ids`` (id -> status); duplicates and strangers are findings."""
        got: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        front = self.dev.front
        while len(got) < len(ids) and time.monotonic() < deadline and not self.dev.broken:
            rsp = front.consume_responses()
            for rid, _, status in parse_responses(self.layout,
                                                  rsp.view(self.dev.abi.raw).tobytes()):
                if rid not in ids:
                    self.findings.add(self.label, f"response for unknown id {rid}")
                elif rid in got:
                    self.findings.add(self.label, f"id {rid} answered twice")
                got[rid] = status
            if len(got) < len(ids):
                if not self.threaded:  # the caller's thread serves the ring
                    self.dev.vbd.kick()
                    self.dev.vbd.drain()
                elif poke:
                    poke()
                time.sleep(0.0005)
        missing = ids - set(got)
        if missing and not self.dev.broken:
            self.findings.add(self.label, f"{len(missing)} request(s) never answered")
        return got

    def image(self, sector: int, count: int = 8) -> bytes:
        return os.pread(self.fd, count * 512, sector * 512)


# ---- the attacks ---------------------------------------------------------------------------

def _jump(rng: random.Random, findings: FindingLog) -> None:
    with _device(rng, findings, "index jump", threaded=rng.random() < 0.5) as fe:
        frame, ref = fe.data_page()
        # Some honest traffic first, so the indices are somewhere.
        for _ in range(rng.randrange(0, 3)):
            slot = fe.slot(OP_READ, rng.randrange(SECTORS - 8), [(ref, 0, 7)])
            fe.push([bytes(slot)])
            fe.collect({fe.next_id})
        front = fe.dev.front
        size = front.size
        rsp_before = front.rsp_prod
        kind = rng.choice(("beyond", "backwards", "anywhere"))
        cons = fe.dev.vbd.ring.req_cons
        jump = {
            "beyond": rsp_before + size + 1 + rng.randrange(2**31),
            "backwards": cons - 1 - rng.randrange(size),
            "anywhere": rng.getrandbits(32),
        }[kind] & 0xFFFFFFFF
        fe.expect_halt = True
        np.frombuffer(fe.dev._ring_view(), dtype="<u4", count=1)[0] = jump
        fe.dev.port.notify()
        if not fe.threaded:
            fe.dev.vbd.kick()
            fe.dev.vbd.kick()
        else:
            time.sleep(0.02)
        answered = (front.rsp_prod - rsp_before) & 0xFFFFFFFF
        if answered > size:
            findings.add(fe.label, f"req_prod {kind} ({jump:#x}): {answered} responses "
                         f"on a ring of {size}")
        # Whatever happened, the device must still close cleanly (checked on exit).


def _wrap(rng: random.Random, findings: FindingLog) -> None:
    config = Config(rng.choice(sorted(LAYOUTS)), rng.choice((0, 2)), rng.choice(GRANT_MODES),
                    False, 512, rng.choice(("sync", "uring")))
    start = (2**32 - rng.randrange(1, 300)) & 0xFFFFFFFF
    _run_config(config, rng.getrandbits(32), 1500, findings, start_index=start)


def _events(rng: random.Random, findings: FindingLog) -> None:
    with _device(rng, findings, "event games", threaded=True) as fe:
        pages = [fe.data_page() for _ in range(16)]
        hdr = np.frombuffer(fe.dev._ring_view(), dtype="<u4", count=4)
        for _ in range(40):
            n = rng.randrange(1, fe.dev.front.size + 1)
            n = min(n, fe.dev.front.free_slots())
            slots, ids = [], set()
            for _ in range(n):
                _, ref = rng.choice(pages)
                op = rng.choice((OP_READ, OP_WRITE))
                slots.append(bytes(fe.slot(op, rng.randrange(SECTORS - 8), [(ref, 0, 7)])))
                ids.add(fe.next_id)
            if rng.random() < 0.5:
                hdr[1] = rng.getrandbits(32)  # req_event belongs to the backend
            if rng.random() < 0.5:
                hdr[3] = rng.getrandbits(32)  # rsp_event: the guest's own hold-off
            fe.push(slots, notify=rng.random() < 0.8)
            # A guest that skipped its notify or broke req_event kicks again later.
            fe.collect(ids, poke=fe.dev.port.notify)


def _double_fetch(rng: random.Random, findings: FindingLog) -> None:
    """Flip one request's fields between two values while the backend consumes it."""
    with _device(rng, findings, "double fetch", threaded=True) as fe:
        fe.expect_halt = False
        for _ in range(20):
            _flip_one(fe, rng)


def _flip_one(fe: _Frontend, rng: random.Random) -> None:
    lay = fe.layout
    frame, ref = fe.data_page()
    fe.page(frame)[:] = np.frombuffer(rng.randbytes(4096), np.uint8)
    written = fe.page(frame).tobytes()
    op = rng.choice((OP_READ, OP_WRITE))
    a = rng.randrange(SECTORS - 8)
    b_valid = rng.random() < 0.5
    b = rng.randrange(SECTORS - 8) if b_valid else rng.choice(
        (SECTORS, SECTORS - 4, 2**64 - 8, 2**63))
    indirect = rng.random() < 0.4
    field = rng.choice(("sector", "bounds", "gref"))
    before = os.pread(fe.fd, DISK_BYTES, 0)
    if indirect:
        ind_frame, ind_ref = fe.data_page()
        desc = fe.page(ind_frame)
        desc[:] = 0
        desc[:8] = np.frombuffer(struct.pack("<IBBH", ref, 0, 7, 0), np.uint8)
        slot = bytearray(lay.entry_size)
        slot[0], slot[1] = OP_INDIRECT, op
        struct.pack_into("<H", slot, 2, 1)
        fe.next_id += 1
        struct.pack_into("<Q", slot, lay.id_off, fe.next_id)
        struct.pack_into("<Q", slot, lay.sector_off, a)
        struct.pack_into("<I", slot, lay.indirect_grefs_off, ind_ref)
        target, seg_at = desc, 0
    else:
        slot = fe.slot(op, a, [(ref, 0, 7)])
        target, seg_at = None, lay.after
    rid = fe.next_id
    stop = threading.Event()

    def flipper() -> None:
        view = fe.slot_view(first) if target is None else target
        if field == "sector":
            if target is not None:  # the sector lives in the slot even for indirect
                view = fe.slot_view(first)
            off = lay.sector_off
            va, vb = struct.pack("<Q", a), struct.pack("<Q", b & (2**64 - 1))
        elif field == "bounds":
            off = seg_at + 5
            va, vb = b"\x07", bytes([rng.choice((8, 200, 255))])
        else:
            off = seg_at
            va, vb = struct.pack("<I", ref), struct.pack("<I", rng.choice(
                (0xFFFFFFFF, 5, ref + 10_000)))
        bufa, bufb = np.frombuffer(va, np.uint8), np.frombuffer(vb, np.uint8)
        end = off + len(va)
        while not stop.is_set():
            view[off:end] = bufb
            view[off:end] = bufa

    first = fe.dev.front.req_prod_pvt
    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        fe.push([bytes(slot)])
        got = fe.collect({rid})
    finally:
        stop.set()
        thread.join()
    status = got.get(rid)
    after = os.pread(fe.fd, DISK_BYTES, 0)
    places = {a} | ({b} if field == "sector" and b_valid else set())
    if status == 0 and op == OP_READ:
        data = fe.page(frame).tobytes()
        if data not in {before[s * 512 : s * 512 + 4096] for s in places}:
            fe.findings.add(fe.label, f"double fetch ({field}, indirect={indirect}): read "
                            f"answered OKAY with bytes from neither value", kind="double fetch")
    if op == OP_WRITE:
        changed = {i // 512 for i in range(0, DISK_BYTES, 512)
                   if after[i : i + 512] != before[i : i + 512]}
        # A refused write changes nothing; an accepted one only the place it was checked at.
        allowed = {s + k for s in places for k in range(8)} if status == 0 else set()
        if not changed <= allowed:
            fe.findings.add(fe.label, f"double fetch ({field}, indirect={indirect}): write "
                            f"changed sectors {sorted(changed - allowed)[:4]}",
                            kind="double fetch")
        if status == 0 and not any(after[s * 512 : s * 512 + 4096] == written for s in places):
            fe.findings.add(fe.label, f"double fetch ({field}, indirect={indirect}): write "
                            f"answered OKAY but its data is at neither place", kind="double fetch")
    if status is not None and status not in (0, -1, -2):
        fe.findings.add(fe.label, f"status {status}")


def _revoke(rng: random.Random, findings: FindingLog) -> None:
    """The guest ends grants of requests in flight (it may: Xen refuses only while mapped)."""
    mode = rng.choice(("copy", "map"))
    with _device(rng, findings, "grant revocation", threaded=True, grant_mode=mode,
                 engine="thread") as fe:
        guest = fe.dev.guest
        for _ in range(10):
            pages = [fe.data_page() for _ in range(rng.randrange(1, 12))]
            slots, ids = [], set()
            for _, ref in pages:
                op = rng.choice((OP_READ, OP_WRITE))
                slots.append(bytes(fe.slot(op, rng.randrange(SECTORS - 8), [(ref, 0, 7)])))
                ids.add(fe.next_id)
            fe.push(slots)
            ended = [ref for _, ref in pages if guest.end_access(ref)]
            fe.collect(ids)
            for frame, ref in pages:
                if ref in ended:
                    del fe.refs[frame]
                else:
                    deadline = time.monotonic() + ANSWER_TIMEOUT
                    while not guest.end_access(ref):  # answered: the backend let go
                        if time.monotonic() > deadline:
                            findings.add(fe.label, f"grant {ref} still mapped after its "
                                         f"request was answered")
                            break
                        time.sleep(0.001)
                    del fe.refs[frame]
                guest.free_pages([frame])
