"""`blkpy fuzz crashes`: the backend killed mid-storm, and the host's storage failing under it.

Kills. A real `blkpy serve` process serves a fresh qcow2 or raw image to the simulated
blkfront of a SimHost; a seeded guest write storm (allocating and overwriting writes,
reads, flushes, discards, up to 32 requests in flight) runs for a random number of
requests, and the backend gets SIGKILL while requests are in flight. The judge is a
:class:`WriteOracle`: the campaign's own record of every request the guest made and when
each completion and flush arrived. After the kill ``qemu-img check`` must report no
corruption (leaks are counted, not findings) and every sector must hold its last write
acknowledged before a completed flush, or a later write (in flight, unflushed or failed
requests may or may not have landed, a sector at a time).

Host faults. The image lives on a real storage layer that fails on demand: nbdkit (with
this package's small fault plugin, ``nbdkit_faults.py``) behind nbdfuse, i.e. a file in a
kernel FUSE mount whose reads, writes, trims and flushes return EIO for the byte ranges or
time windows the campaign chooses. Device-mapper ``error``/``flakey`` would be the
classic layer but needs the kernel's dm driver, which containers usually lack; FUSE only
needs /dev/fuse. The invariants: requests untouched by a fault are answered OKAY (a read
is touched when its host pages are: the host's page cache reads whole pages), data
requests inside a fault are answered ERROR (never OKAY for data that was not stored),
the serve process stays alive, flushes succeed again once the faults stop, every read
and the final image agree with the oracle, and ``qemu-img check`` is clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from blkpy import ring as blkif
from blkpy.fuzz import CampaignResult, FindingLog, Progress
from blkpy.sim.blkfront_ring import OP_NAMES, BlkfrontRing, Completion, ProtocolError
from blkpy.sim.frontend import Frontend
from blkpy.sim.host import BackendProcess, SimHost
from blkpy.sim.toolstack import DiskSpec
from blkpy.sim.workloads import free_ring
from blkpy.xenbus import XenbusState

SECTOR = 512
READ = blkif.BLKIF_OP_READ
WRITE = blkif.BLKIF_OP_WRITE
FLUSH = blkif.BLKIF_OP_FLUSH_DISKCACHE
DISCARD = blkif.BLKIF_OP_DISCARD
OKAY = blkif.BLKIF_RSP_OKAY
ERROR = blkif.BLKIF_RSP_ERROR

#: the guest's disk: small enough that a storm revisits clusters (overwrites, COW of
#: partly written clusters) and large enough for several L2 tables at 4 KiB clusters
DISK_SIZE = 16 << 20
#: kills per unit of scale: the full campaign (scale 100) kills qcow2 serves 120 times
#: and raw serves 40 times; the CI version at least QCOW2_MIN/RAW_MIN
QCOW2_KILLS_PER_SCALE, QCOW2_MIN = 1.2, 4
RAW_KILLS_PER_SCALE, RAW_MIN = 0.4, 2
FAULT_CASES_PER_SCALE, FAULT_MIN = 0.3, 2
#: host file of a qcow2 image under the fault layer: nbdfuse exposes a fixed-size file,
#: so the image gets room to grow into (zeros past its end are free clusters to qcow2)
QCOW2_HOST_SIZE = DISK_SIZE * 2
GUEST_BASE_DOMID = 10
DEVID = 51712  # xvda
_TIMEOUT = 20.0  # a request or handshake the backend does not answer in this long is a finding
_PLUGIN = os.path.join(os.path.dirname(__file__), "nbdkit_faults.py")
#: the unit in which the host's page cache reads the fault layer's file: a read from the
#: FUSE file fetches whole pages, so it fails when its pages touch failing bytes, even if
#: the bytes it asked for do not (writes, trims and zeroes reach the layer byte for byte)
HOST_PAGE = mmap.PAGESIZE


# ---- the oracle ----------------------------------------------------------------------


@dataclasses.dataclass
class Version:
    """One write (or discard: zeros) as the guest issued it."""

    number: int
    offset: int
    data: bytes
    submitted: int  # event counter at submission
    acked: int | None = None  # event counter when its completion arrived
    ok: bool = False


class WriteOracle:
    """What the guest wrote, in which order, and when its completions and flushes arrived.

    The caller never has two requests on one sector in flight at once, so each sector's
    versions are totally ordered. A version acknowledged OKAY before a flush was
    *submitted*, where that flush later completed OKAY, is durable; a sector may hold its
    newest durable version or any version after it (in flight, unflushed or failed)."""

    def __init__(self, initial: bytes) -> None:
        self.initial = initial  # the disk before the first write (zeros, or a backing file)
        self.clock = 0
        self.versions: list[Version] = []
        self.sectors: dict[int, list[int]] = {}  # sector -> version numbers, oldest first
        self.durable_before = 0  # versions acked before this event are durable
        self.flushes = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def write(self, offset: int, data: bytes) -> Version:
        v = Version(len(self.versions), offset, data, self.tick())
        self.versions.append(v)
        for s in range(offset // SECTOR, (offset + len(data)) // SECTOR):
            self.sectors.setdefault(s, []).append(v.number)
        return v

    def discard(self, offset: int, length: int) -> Version:
        return self.write(offset, bytes(length))

    def complete(self, v: Version, ok: bool) -> None:
        v.acked = self.tick()
        v.ok = ok

    def flush_submitted(self) -> int:
        return self.tick()

    def flush_completed(self, submitted: int, ok: bool) -> None:
        self.tick()
        if ok:
            self.flushes += 1
            self.durable_before = max(self.durable_before, submitted)

    def _sector(self, v: Version | None, s: int) -> bytes:
        if v is None:
            return self.initial[s * SECTOR:(s + 1) * SECTOR]
        pos = s * SECTOR - v.offset
        return v.data[pos:pos + SECTOR]

    def allowed(self, s: int, durable_only: bool) -> list[bytes]:
        """What sector ``s`` may hold: after a crash (``durable_only``), from its newest
        durable version on; on a live disk, from its newest version acknowledged OKAY on."""
        chain = [self.versions[n] for n in self.sectors.get(s, [])]
        base = -1
        for i, v in enumerate(chain):
            if v.ok and v.acked is not None and (
                    not durable_only or v.acked < self.durable_before):
                base = i
        out = [self._sector(chain[base] if base >= 0 else None, s)]
        out += [self._sector(v, s) for v in chain[base + 1:]]
        return out

    def mismatches(self, image: bytes, offset: int = 0, *, durable_only: bool) -> list[int]:
        """Sectors of ``image`` (the disk's bytes from ``offset``) no version explains."""
        bad = []
        first = offset // SECTOR
        for i in range(len(image) // SECTOR):
            s = first + i
            got = image[i * SECTOR:(i + 1) * SECTOR]
            if s not in self.sectors:
                if got != self._sector(None, s):
                    bad.append(s)
            elif got not in self.allowed(s, durable_only):
                bad.append(s)
        return bad


def describe_sectors(sectors: list[int]) -> str:
    return f"{len(sectors)} sector(s), first at byte 0x{sectors[0] * SECTOR:x}"


# ---- qemu-img as the image oracle --------------------------------------------------------


@dataclasses.dataclass
class CheckResult:
    corruptions: int
    leaks: int
    text: str


def qemu_check(path: str) -> CheckResult:
    """``qemu-img check`` of a qcow2 image: its corruption and leak counts."""
    r = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", path],
                       capture_output=True, text=True)
    try:
        report = json.loads(r.stdout)
    except json.JSONDecodeError:  # qemu-img could not even open it
        return CheckResult(1, 0, (r.stdout + r.stderr).strip())
    corruptions = int(report.get("corruptions", 0)) + int(report.get("check-errors", 0))
    return CheckResult(corruptions, int(report.get("leaks", 0)), r.stdout)


def guest_view(path: str, fmt: str) -> bytes:
    """The guest's disk as qemu-img reads it (raw images: the file itself)."""
    if fmt == "raw":
        with open(path, "rb") as f:
            return f.read()
    with tempfile.TemporaryDirectory(prefix="blkpy-view-") as tmp:
        out = os.path.join(tmp, "disk.raw")
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out],
                       check=True, capture_output=True)
        with open(out, "rb") as f:
            return f.read()


def have_qemu_img() -> bool:
    return shutil.which("qemu-img") is not None


# ---- the guest's storm -------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    op: int
    offset: int
    nbytes: int
    submitted: int
    version: Version | None = None
    expect: bool | None = False  # whether it must fail (see Storm.expect)


@dataclasses.dataclass
class StormStats:
    requests: int = 0
    errors: int = 0  # ERROR answers where the fault allowed them


class Storm:
    """A seeded guest workload on one ring that keeps the oracle up to date and judges
    every answer: its status against what the host's storage is doing (``expect``), a
    read's bytes against the oracle."""

    def __init__(self, rings: list[BlkfrontRing], oracle: WriteOracle,
                 rng: np.random.Generator, log: FindingLog, case: str, depth: int = 32) -> None:
        self.rings = rings  # requests go round-robin over the queues
        ring = rings[0]  # every queue shares the disk's info
        self.oracle = oracle
        self.rng = rng
        self.log = log
        self.case = case
        self.depth = min(depth, sum(r.size for r in rings))
        self.pending: dict[tuple[int, int], _Pending] = {}  # (queue, id) -> request
        self._next = 0
        self.stats = StormStats()
        self.size = ring.info.size
        info = ring.info
        self.discard_unit = max(info.discard_granularity, info.sector_size, SECTOR)
        #: the host fault now: None, "ranges" (I/O touching fault_ranges fails), "writes"
        #: (every write, trim and zeroing fails) or "every" (flushes and reads too)
        self.fault: str | None = None
        self.fault_ranges: list[tuple[int, int]] = []
        #: a sync failed at some point: flushes may fail for good (the kernel may have
        #: dropped what it could not write, so no later flush may claim it durable), and
        #: a qcow2 image stops taking writes (its metadata order is no longer known)
        self.sync_lost = False
        self.raw = True  # raw images map guest bytes to host bytes one to one
        self.written: list[tuple[int, int]] = []  # ranges written so far, for overwrites

    # -- fault expectations --

    def expect(self, op: int, offset: int, nbytes: int) -> bool | None:
        """Whether a request submitted now must fail (True), must succeed (False) or may do
        either (None). A write always moves data, so on failing storage it must fail. A
        read may come from the page cache, or fail beside failing bytes (the host reads the
        whole page, HOST_PAGE), a qcow2 read may be a hole or need to write dirty metadata
        back (cache eviction), a discard may change metadata only."""
        stops = self.sync_lost and (op == FLUSH or (op != READ and not self.raw))
        if self.fault is None:
            return None if stops else False
        if self.fault == "ranges":
            if any(offset < e and s < offset + nbytes for s, e in self.fault_ranges):
                return True if op == WRITE else None
            if op == READ and nbytes:  # the host reads whole pages: a shared one fails it
                start = offset - offset % HOST_PAGE
                end = -(-(offset + nbytes) // HOST_PAGE) * HOST_PAGE
                if any(start < e and s < end for s, e in self.fault_ranges):
                    return None
            return False  # a raw image: host bytes are guest bytes
        if op == WRITE:
            return True
        if self.fault == "writes" and self.raw and op in (READ, FLUSH):
            return False  # reads and syncs still work
        return None

    # -- submitting --

    def _busy(self, offset: int, nbytes: int) -> bool:
        return any(p.nbytes and p.offset < offset + nbytes and offset < p.offset + p.nbytes
                   for p in self.pending.values())

    def _range(self) -> tuple[int, int]:
        """A write's byte range: fresh space (allocating) or space written before."""
        rng = self.rng
        nbytes = SECTOR * int(rng.choice([1, 7, 8, 16, 24, 64, 128, 256],
                                         p=[.15, .1, .25, .15, .1, .1, .1, .05]))
        if self.fault == "ranges" and rng.random() < 0.3:  # aim at the failing bytes
            start, end = self.fault_ranges[int(rng.integers(len(self.fault_ranges)))]
            offset = start + SECTOR * int(rng.integers(0, (end - start) // SECTOR))
            offset -= min(offset, SECTOR * int(rng.integers(0, 8)))  # some straddle it
        elif self.written and rng.random() < 0.45:
            start, end = self.written[int(rng.integers(len(self.written)))]
            offset = start + SECTOR * int(rng.integers(0, max((end - start) // SECTOR, 1)))
        else:
            offset = SECTOR * int(rng.integers(0, self.size // SECTOR))
        offset = min(offset, self.size - nbytes)
        return offset, nbytes

    def _submit(self, op: int, offset: int, nbytes: int, **kw: object) -> bool:
        """Submit unless the range is busy; False when it is."""
        if nbytes and self._busy(offset, nbytes):
            return False
        while (q := self._queue()) is None:
            self.reap(wait=True)
        ring = self.rings[q]
        p = _Pending(op, offset, nbytes, 0, expect=self.expect(op, offset, nbytes))
        if op == WRITE:
            data = bytes(kw["data"])  # type: ignore[arg-type]
            p.version = self.oracle.write(offset, data)
            p.submitted = p.version.submitted
        elif op == DISCARD:
            p.version = self.oracle.discard(offset, nbytes)
            p.submitted = p.version.submitted
        elif op == FLUSH:
            p.submitted = self.oracle.flush_submitted()
        else:
            p.submitted = self.oracle.tick()
        if op == DISCARD:
            rid = ring.submit(op, offset // SECTOR, nr_sectors=nbytes // SECTOR)
        elif op == READ:
            rid = ring.submit(op, offset // SECTOR, nbytes=nbytes,
                                   first_sect=int(kw.get("first_sect", 0)))
        elif op == WRITE:
            rid = ring.submit(op, offset // SECTOR, data=kw["data"],
                                   first_sect=int(kw.get("first_sect", 0)))
        else:
            rid = ring.submit(op, 0)
        self.pending[(q, rid)] = p
        ring.push()
        self.stats.requests += 1
        return True

    def step(self) -> None:
        """Submit one random request (retrying on busy ranges)."""
        rng = self.rng
        for _ in range(8):
            r = rng.random()
            # buffers starting inside a page cross pages (one segment more: not at the
            # 32-segment maximum)
            first_sect = int(rng.integers(0, 8)) if rng.random() < 0.3 else 0
            if r < 0.6:
                offset, nbytes = self._range()
                first_sect = first_sect if nbytes < 256 * SECTOR else 0
                data = rng.bytes(nbytes)
                if self._submit(WRITE, offset, nbytes, data=data, first_sect=first_sect):
                    self.written.append((offset, offset + nbytes))
                    return
            elif r < 0.75:
                offset, nbytes = self._range()
                first_sect = first_sect if nbytes < 256 * SECTOR else 0
                if self._submit(READ, offset, nbytes, first_sect=first_sect):
                    return
            elif r < 0.88:
                self._submit(FLUSH, 0, 0)
                return
            elif all(r.supports(DISCARD) for r in self.rings):
                unit = self.discard_unit
                n = int(rng.integers(1, 9))
                offset = unit * int(rng.integers(0, self.size // unit - n + 1))
                if self._submit(DISCARD, offset, n * unit):
                    return

    def flush(self) -> bool:
        """A flush with everything before it answered; whether it succeeded."""
        self.drain()
        self._submit(FLUSH, 0, 0)
        before = self.oracle.flushes
        self.drain()
        return self.oracle.flushes > before

    def read_all(self, chunk: int = 128 << 10) -> None:
        """Read the whole disk back and check it against the oracle (live view)."""
        self.drain()
        for offset in range(0, self.size, chunk):
            self._submit(READ, offset, min(chunk, self.size - offset))
            self.drain()

    # -- completing --

    def reap(self, wait: bool) -> None:
        done = self._poll()
        deadline = time.monotonic() + _TIMEOUT
        while wait and not done and self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError(f"backend answered none of {len(self.pending)} "
                                    f"requests within {_TIMEOUT:g}s")
            ports = [r.port for r in self.rings if r.in_flight]
            ready, _, _ = select.select(ports, [], [], remaining)
            for port in ready:  # maybe stale events: the rings say what really arrived
                port.ack()
            done = self._poll()
        for q, c in done:
            self._complete(c, self.pending.pop((q, c.id)))

    def _poll(self) -> list[tuple[int, Completion]]:
        return [(q, c) for q, ring in enumerate(self.rings) for c in ring.poll(0.0)]

    def _queue(self) -> int | None:
        """A queue that can take one more request now, or None."""
        if len(self.pending) >= self.depth:
            return None
        q = free_ring(self.rings, self._next)
        if q is not None:
            self._next = q + 1
        return q

    def drain(self) -> None:
        while self.pending:
            self.reap(wait=True)

    def _complete(self, c: Completion, p: _Pending) -> None:
        ok = c.status == OKAY
        where = f"{OP_NAMES[p.op]} of {p.nbytes} bytes at 0x{p.offset:x}"
        if self.fault == "ranges":  # the ranges are drawn anew each run: say which
            where += " (host failing " + ", ".join(f"0x{s:x}-0x{e:x}"
                                                    for s, e in self.fault_ranges) + ")"
        if c.status == blkif.BLKIF_RSP_EOPNOTSUPP and p.op == DISCARD:
            pass  # the storage cannot punch holes: blkfront turns discard off
        elif c.status not in (OKAY, ERROR):
            self.log.add(self.case, f"bad status: {where} answered {c.status}")
        elif not ok:
            if p.expect is False:
                self.log.add(self.case, f"spurious error: {where} failed with no host fault")
            else:
                self.stats.errors += 1
        elif p.expect is True:
            # its I/O met failing storage: OKAY would claim data that was never moved
            self.log.add(self.case, f"lost error: {where} answered OKAY on failing storage")
        if p.op in (WRITE, DISCARD):
            assert p.version is not None
            self.oracle.complete(p.version, ok)
        elif p.op == FLUSH:
            self.oracle.flush_completed(p.submitted, ok)
        elif p.op == READ and ok:
            assert c.data is not None
            bad = self.oracle.mismatches(c.data.tobytes(), p.offset, durable_only=False)
            if bad:
                self.log.add(self.case, f"wrong data: {where} returned {describe_sectors(bad)} "
                                        "that no write explains")


# ---- one served disk ---------------------------------------------------------------------


class Attached:
    """One disk of a fresh guest on ``host``, served by a new `blkpy serve` process."""

    def __init__(self, host: SimHost, domid: int, target: str, queues: int = 1) -> None:
        assert host.xs is not None
        self.host = host
        self.domid = domid
        self.guest = host.create_guest(domid)
        self.spec = DiskSpec(domid, DEVID, "xvda", target)
        backend = host.add_disk(self.spec)
        assert backend is not None
        self.backend: BackendProcess = backend
        self.xs = host.guest_xenstore(domid)
        self.frontend = Frontend(self.guest, self.xs, DEVID, max_ring_page_order=1,
                                 max_indirect_segments=32, num_queues=queues)

    def connect(self) -> list[BlkfrontRing]:
        if not self.host.wait_backend_state(self.spec, XenbusState.INIT_WAIT, timeout=_TIMEOUT):
            raise RuntimeError("backend never reached InitWait: " + self.backend.log()[-800:])
        self.frontend.connect(timeout=_TIMEOUT)
        return self.frontend.rings

    def kill(self) -> None:
        self.backend.proc.send_signal(signal.SIGKILL)
        self.backend.proc.wait()

    def detach(self) -> list[str]:
        """A clean removal (frontend close, libxl's removal); the problems it showed."""
        problems = [f"protocol: {e}" for e in self.frontend.close(timeout=_TIMEOUT)]
        if not self.host.remove_disk(self.spec, timeout=_TIMEOUT):
            problems.append("backend did not reach Closed")
        status = self.backend.wait(_TIMEOUT)
        if status != 0:
            problems.append(f"serve exited with status {status}: {self.backend.log()[-800:]}")
        elif "Traceback" in self.backend.log():
            problems.append("serve logged a traceback: " + self.backend.log()[-800:])
        return problems

    def discard_guest(self) -> None:
        """Forget the guest and its nodes after a kill (no handshake left to run)."""
        assert self.host.xs is not None
        with contextlib.suppress(Exception):
            self.xs.close()
        for path in (self.spec.frontend_path, self.spec.backend_path):
            with contextlib.suppress(Exception):
                self.host.xs.rm(path)
        self.host.destroy_guest(self.domid)


def _serve_args(rng: np.random.Generator, fmt: str) -> list[str]:
    """A random but valid serve configuration, so kills land in every engine."""
    args = ["--engine", str(rng.choice(["auto", "sync", "thread", "uring"]))]
    if fmt == "qcow2":
        args += ["--qcow2-cache-mb", str(rng.choice([1, 4]))]
    if rng.random() < 0.25:
        args += ["--grant-mode", "copy"]
    return args


def _new_image(tmp: str, name: str, fmt: str, rng: np.random.Generator,
               host_size: int | None = None) -> tuple[str, bytes, str]:
    """A fresh image: (path, the guest's initial bytes, description)."""
    path = os.path.join(tmp, f"{name}.{fmt}")
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(DISK_SIZE)
        return path, bytes(DISK_SIZE), "raw"
    cluster = int(rng.choice([4096, 65536]))
    opts = [f"cluster_size={cluster}"]
    initial = bytes(DISK_SIZE)
    backing = rng.random() < 0.3
    if backing:
        base = os.path.join(tmp, f"{name}.base.raw")
        initial = rng.bytes(DISK_SIZE * 3 // 4) + bytes(DISK_SIZE // 4)
        with open(base, "wb") as f:
            f.write(initial[:DISK_SIZE * 3 // 4])
        opts += [f"backing_file={base}", "backing_fmt=raw"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts), path,
                    str(DISK_SIZE)], check=True, capture_output=True)
    if host_size is not None:
        os.truncate(path, host_size)
    return path, initial, f"qcow2 cluster {cluster}{' backing' if backing else ''}"


@dataclasses.dataclass
class _Tally:
    kills: dict[str, int] = dataclasses.field(default_factory=lambda: {"qcow2": 0, "raw": 0})
    requests: int = 0
    in_flight_at_kill: int = 0
    leaks: int = 0
    leaky_images: int = 0
    flushes: int = 0
    fault_cases: int = 0
    fault_errors: int = 0


def kill_case(host: SimHost, tmp: str, fmt: str, index: int, seed: int, log: FindingLog,
              tally: _Tally) -> None:
    """One storm and one SIGKILL; findings go to ``log``."""
    rng = np.random.default_rng([seed, index, 1 if fmt == "qcow2" else 2])
    path, initial, what = _new_image(tmp, f"kill{index}", fmt, rng)
    args = _serve_args(rng, fmt)
    queues = int(rng.choice([1, 1, 2]))  # two queues: two ring threads in the serve
    case = f"kill {index}: {what}, {queues} queue(s), serve {' '.join(args)}"
    host.serve_args = args
    disk = Attached(host, GUEST_BASE_DOMID + index % 1000, f"{fmt}:{path}", queues)
    oracle = WriteOracle(initial)
    try:
        try:
            storm = Storm(disk.connect(), oracle, rng, log, case)
            for _ in range(int(rng.integers(10, 600))):
                storm.step()
                storm.reap(wait=False)
            if rng.random() < 0.5:  # let the backend get some way into what is in flight
                time.sleep(float(rng.random()) * 0.003)
            if disk.backend.proc.poll() is not None:
                log.add(case, "serve died: before the kill: " + disk.backend.log()[-800:])
            tally.in_flight_at_kill += len(storm.pending)
            disk.kill()
            storm.reap(wait=False)  # answers pushed before the kill count as acknowledged
            tally.requests += storm.stats.requests
            tally.flushes += oracle.flushes
        except (ProtocolError, RuntimeError) as exc:
            log.add(case, f"storm failed: {exc}; serve log: {disk.backend.log()[-800:]}")
            disk.kill()
            return
    finally:
        disk.discard_guest()
    tally.kills[fmt] += 1
    if fmt == "qcow2":
        check = qemu_check(path)
        if check.corruptions:
            log.add(case, f"corrupt image: qemu-img check found {check.corruptions} "
                          f"corruption(s): {check.text[-600:]}")
            return
        tally.leaks += check.leaks
        tally.leaky_images += bool(check.leaks)
    elif os.path.getsize(path) != DISK_SIZE:
        log.add(case, f"wrote outside the disk: the raw image is now {os.path.getsize(path)} "
                      f"bytes, not {DISK_SIZE}")
    bad = oracle.mismatches(guest_view(path, fmt), durable_only=True)
    if bad:
        log.add(case, f"lost flushed data: {describe_sectors(bad)} hold neither their "
                      "flushed write nor a later one")
    os.unlink(path)


# ---- host faults -------------------------------------------------------------------------


def fault_layer_missing() -> str | None:
    """Why the nbdkit/nbdfuse fault layer cannot run here, or None if it can."""
    for tool, package in (("nbdkit", "nbdkit"), ("nbdfuse", "libnbd-bin"),
                          ("fusermount3", "fuse3")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian {package}; setup.sh installs it)"
    plugins = subprocess.run(["nbdkit", "--dump-config"], capture_output=True, text=True)
    plugindir = next((line.split("=", 1)[1] for line in plugins.stdout.splitlines()
                      if line.startswith("plugindir=")), "")
    if not os.path.exists(os.path.join(plugindir, "nbdkit-python-plugin.so")):
        return "nbdkit's python plugin not installed (Debian nbdkit-plugin-python)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not available"
    return None


class FaultyStorage:
    """A file on nbdkit (fault plugin) behind nbdfuse: a real kernel FUSE file whose I/O
    fails with EIO where ``set_faults`` says."""

    def __init__(self, image: str, workdir: str) -> None:
        self.image = image
        self.mount = os.path.join(workdir, "mnt")
        self.control = os.path.join(workdir, "faults")
        self.path = os.path.join(self.mount, "disk")
        os.makedirs(self.mount, exist_ok=True)
        self.set_faults(None)
        self._log = open(os.path.join(workdir, "nbd.log"), "wb")  # noqa: SIM115 - closed in stop()
        # nbdkit's embedded Python must not pick up the virtualenv's packages
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.proc = subprocess.Popen(
            ["nbdfuse", self.path, "--command", "nbdkit", "-s", "--exit-with-parent",
             "python", _PLUGIN, f"file={image}", f"control={self.control}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env)
        deadline = time.monotonic() + _TIMEOUT
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nbdfuse did not come up: {self.log()[-500:]}")
            time.sleep(0.02)

    def log(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()

    def set_faults(self, mode: str | None, ranges: list[tuple[int, int]] | None = None) -> None:
        """None: a healthy host; "ranges": I/O touching ``ranges`` (host bytes) fails;
        "writes": every write, trim and zeroing; "every": all I/O and flushes. Written
        atomically: the plugin rereads it when it changes."""
        spec = {"every": mode == "every", "writes": mode == "writes",
                "ranges": ranges if mode == "ranges" else []}
        tmp = self.control + ".new"
        with open(tmp, "w") as f:
            json.dump(spec, f)
        os.replace(tmp, self.control)

    def stop(self) -> None:
        # lazily: a serve that was killed may not have let go of the file yet
        subprocess.run(["fusermount3", "-u", "-z", self.mount], capture_output=True)
        try:
            self.proc.wait(_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def fault_case(host: SimHost, tmp: str, fmt: str, index: int, seed: int, log: FindingLog,
               tally: _Tally, mode: str | None = None) -> None:
    """A storm on failing storage: healthy, then faults (ranges or everything), then
    healthy again; the serve must answer exactly, live on, and leave a clean image."""
    rng = np.random.default_rng([seed, index, 3 if fmt == "qcow2" else 4])
    workdir = os.path.join(tmp, f"fault{index}")
    os.makedirs(workdir)
    path, initial, what = _new_image(workdir, "image", fmt, rng, host_size=QCOW2_HOST_SIZE)
    # qcow2 host offsets are not guest offsets: byte ranges only for raw images
    modes = ["writes", "every"] if fmt == "qcow2" else ["ranges", "writes", "every"]
    mode = mode or str(rng.choice(modes))
    args = ["--engine", str(rng.choice(["auto", "sync", "thread"]))]
    case = f"fault {index}: {what}, failing {mode}, serve {' '.join(args)}"
    host.serve_args = args
    storage = FaultyStorage(path, workdir)
    disk = Attached(host, GUEST_BASE_DOMID + 1000 + index % 1000, f"{fmt}:{storage.path}")
    oracle = WriteOracle(initial)
    detached = False
    try:
        storm = Storm(disk.connect(), oracle, rng, log, case)
        storm.raw = fmt == "raw"
        for phase in ("before", "fault", "after"):
            storm.drain()  # nothing in flight may meet the next phase's storage
            if phase == "fault":
                ranges = []
                if mode == "ranges":
                    for _ in range(int(rng.integers(1, 4))):
                        start = SECTOR * int(rng.integers(0, DISK_SIZE // SECTOR))
                        ranges.append((start, min(start + SECTOR * int(rng.integers(1, 512)),
                                                  DISK_SIZE)))
                storm.fault, storm.fault_ranges = mode, ranges
                storage.set_faults(mode, ranges)
            elif phase == "after":
                storage.set_faults(None)
                storm.fault = None
                storm.sync_lost = mode == "every"
            for _ in range(int(rng.integers(50, 250))):
                storm.step()
                storm.reap(wait=False)
            if disk.backend.proc.poll() is not None:
                log.add(case, f"serve died during the {phase} phase: "
                              + disk.backend.log()[-800:])
                return
        flushed = storm.flush()
        if not flushed and not storm.sync_lost:
            log.add(case, "no recovery: a flush after the faults stopped failed")
        storm.read_all()
        tally.requests += storm.stats.requests
        tally.fault_errors += storm.stats.errors
        tally.flushes += oracle.flushes
        for problem in disk.detach():
            log.add(case, problem)
        detached = True
    except (ProtocolError, RuntimeError) as exc:
        log.add(case, f"storm failed: {exc}; serve log: {disk.backend.log()[-800:]}")
        return
    finally:
        if not detached:
            disk.kill()
        disk.discard_guest()
        storage.stop()
    tally.fault_cases += 1
    if fmt == "qcow2":
        check = qemu_check(path)
        if check.corruptions or check.leaks:
            log.add(case, f"unclean image after the faults: {check.corruptions} corruption(s), "
                          f"{check.leaks} leak(s): {check.text[-600:]}")
            return
    if flushed:  # everything acknowledged before the last flush is on the image
        oracle.durable_before = oracle.tick()
    bad = oracle.mismatches(guest_view(path, fmt)[:DISK_SIZE], durable_only=True)
    if bad:
        log.add(case, f"lost data: the image holds {describe_sectors(bad)} no write explains")


# ---- the campaign ------------------------------------------------------------------------


def _count(per_scale: float, minimum: int, scale: float) -> int:
    return max(minimum, round(per_scale * scale))


@contextlib.contextmanager
def _workspace() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="blkpy-crashes-") as tmp:
        yield tmp


def run(seed: int, scale: float, progress: Progress) -> CampaignResult:
    start = time.monotonic()
    log = FindingLog("crashes", seed)
    tally = _Tally()
    figures: dict[str, float | int | str] = {}
    if not have_qemu_img():
        raise RuntimeError("qemu-img is needed (Debian qemu-utils; setup.sh installs it)")
    plan = ([("qcow2", i) for i in range(_count(QCOW2_KILLS_PER_SCALE, QCOW2_MIN, scale))]
            + [("raw", i) for i in range(_count(RAW_KILLS_PER_SCALE, RAW_MIN, scale))])
    order = np.random.default_rng(seed).permutation(len(plan))
    missing = fault_layer_missing()
    with _workspace() as tmp, SimHost() as host:
        for n, k in enumerate(order):
            fmt, index = plan[int(k)]
            kill_case(host, tmp, fmt, index + (0 if fmt == "qcow2" else 100_000), seed, log,
                      tally)
            if n % 10 == 9:
                progress(f"crashes: {n + 1}/{len(plan)} kills, {log.total} finding(s)")
        faults = _count(FAULT_CASES_PER_SCALE, FAULT_MIN, scale)
        if missing is None:
            for i in range(faults):
                fault_case(host, tmp, "qcow2" if i % 2 == 0 else "raw", i, seed, log, tally)
            progress(f"crashes: {faults} host-fault cases, {log.total} finding(s)")
        else:
            progress(f"crashes: host faults skipped: {missing}")
            figures["faults_skipped"] = missing
    figures.update({
        "qcow2_kills": tally.kills["qcow2"], "raw_kills": tally.kills["raw"],
        "requests": tally.requests, "in_flight_at_kill": tally.in_flight_at_kill,
        "completed_flushes": tally.flushes, "leaked_clusters": tally.leaks,
        "leaky_images": tally.leaky_images, "fault_cases": tally.fault_cases,
        "fault_errors": tally.fault_errors,
    })
    return CampaignResult("crashes", "kills", sum(tally.kills.values()),
                          time.monotonic() - start, log.findings, figures)

