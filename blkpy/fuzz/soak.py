"""`blkpy fuzz soak`: the long life of one `blkpy serve` process.

One real serve on the simulated host (``SimHost``) serves one raw disk to the simulated
guest for the whole campaign, in two phases:

1. **Requests.** Rounds of the C load generator (``run_load``: 4 KiB to 64 KiB random
   writes, then reads, at queue depth 32: the native loop's path) alternate with the
   Python-driven ``randrw`` workload (reads, writes, flushes, barriers, discards, indirect
   requests at depth 32; discards always, and every grant seen for the first time, go to
   the reference path). Nothing here trusts the backend: ``randrw`` checks every read
   against a ``DiskModel``; after each C write burst the guest reads the whole region back
   and every page must hold either what the model had or the generator's fill byte (the
   C loop's writes landed whole and nowhere else); the model then adopts it.
2. **Connect/disconnect cycles.** The frontend closes (Closing, Closed) and reconnects
   (Initialising ... Connected) as Linux blkfront does on an unbind/rebind, against the
   same serve, with fresh rings and grants each time, and does a little verified I/O on
   both paths each time.

After every round and every cycle the serve is sampled: its own resident memory
(anonymous + file pages: guest pages it maps are the guest's, see ``procinfo``), open
fds, /proc maps entries, grant pages still mapped (simulated grant table counters), and
its live Python objects (from its SIGUSR1 counters). Findings: any I/O or protocol
error, a mismatch, the serve dying or failing the handshake, grants still mapped after
the frontend closed, and growth after warm-up: own RSS by more than 1 MiB in either
phase, any extra fd, more than a few extra mappings, live Python objects rising steadily.

Scale 1 (CI): 10^5 requests and 20 cycles; scale 100 (``--full``): 10^7 and 1000.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from blkpy import ring as blkif
from blkpy.fuzz import CampaignResult, FindingLog, Progress
from blkpy.sim import procinfo
from blkpy.sim.disk_model import DiskModel
from blkpy.sim.frontend import Frontend, NegotiationError, ProtocolError
from blkpy.sim.host import BackendProcess, SimHost
from blkpy.sim.load_generator import run_load
from blkpy.sim.run import remove_and_check
from blkpy.sim.toolstack import DiskSpec
from blkpy.sim.workloads import run_workload
from blkpy.xenbus import XenbusState

NAME = "soak"
REQUESTS_PER_SCALE = 100_000
CYCLES_PER_SCALE = 10
MIN_CYCLES = 20  # fewer cycles cannot show a trend
#: the issue's budget for the serve's own memory after warm-up, in either phase
RSS_BUDGET_KIB = 1024
#: /proc maps entries may come and go with malloc arenas and thread stacks; a leak of
#: mappings per cycle exceeds this within a few cycles
MAPS_SLACK = 8
GUEST_DOMID = 1
DEVID = 51712  # xvda
IMAGE_SIZE = 64 << 20
#: the region the load works on and each verification reads back whole (small enough
#: that a read-back costs about as much as a burst of C requests)
SPAN = 4 << 20
FILL = 0xC3  # what the C generator writes: the model's "either old or FILL" oracle
C_SIZES = (4096, 16384, 65536)  # 65536: 16 segments, an indirect request
DEPTH = 32
PY_SHARE = 0.1  # of each round's requests, through the Python-driven workload
WARMUP_SHARE = 0.2  # of rounds and cycles, before the baseline sample
READ_CHUNK = 32 * 4096  # one indirect read at the 32 segments the frontend asks for
_BURST_SECONDS = 600.0  # a generous bound: bursts end by count, this only stops a hang


@dataclasses.dataclass(frozen=True)
class Sample:
    """The serve after a round or a cycle."""

    proc: procinfo.ProcessFigures
    grant_pages: int  # mapped and not yet unmapped
    objects: int  # live Python objects in the serve (gc-tracked)


class SoakError(Exception):
    """The serve cannot be soaked further (it died, or the guest lost its disk)."""


def plan(scale: float) -> tuple[int, int, int]:
    """(requests, rounds, cycles) for ``scale``: 10^5 requests in 10 rounds and 20
    cycles at 1, 10^7 requests in 200 rounds and 1000 cycles at the full scale."""
    requests = max(1000, round(REQUESTS_PER_SCALE * scale))
    rounds = min(200, max(10, round(2 * scale)))
    cycles = max(MIN_CYCLES, round(CYCLES_PER_SCALE * scale))
    return requests, rounds, cycles


def growth(values: list[int], warmup: int) -> int:
    """How much a series rose after warm-up: its last value against the value at the end
    of the warm-up (both plain samples: a page-granular figure needs no smoothing to show
    a 1 MiB trend)."""
    if len(values) <= warmup:
        return 0
    return values[-1] - values[max(warmup - 1, 0)]


#: live objects that come and go with what the serve is doing when it is sampled
TRANSIENT_OBJECTS = 64


def rising(values: list[int], warmup: int) -> bool:
    """Whether a noisy series (live objects) climbs steadily after warm-up: the lowest
    value of its last third is above the highest of its first third by at least half a
    step per sample, and by more than the transient objects of the moment (timers,
    status dicts, a batch in flight: a few dozen either way on a busy host)."""
    tail = values[warmup:]
    third = len(tail) // 3
    if third < 2:
        return False
    return min(tail[-third:]) - max(tail[:third]) >= max(len(tail) // 2, TRANSIENT_OBJECTS)


@contextlib.contextmanager
def served_disk() -> Iterator[tuple[SimHost, DiskSpec, BackendProcess, Frontend, str]]:
    """A fresh sparse raw disk served by one `blkpy serve` to a guest's frontend (not yet
    connected); yields the host, the disk, its serve, the frontend and the image path."""
    with tempfile.TemporaryDirectory(prefix="blkpy-soak-") as tmp, SimHost() as host:
        image = os.path.join(tmp, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)  # sparse: reads as zeros, as the model assumes
        guest = host.create_guest(GUEST_DOMID)
        spec = DiskSpec(GUEST_DOMID, DEVID, "xvda", f"raw:{image}")
        backend = host.add_disk(spec)
        assert backend is not None
        fe = Frontend(guest, host.guest_xenstore(GUEST_DOMID), DEVID,
                      max_indirect_segments=32)
        yield host, spec, backend, fe, image


class Soak:
    """One campaign run: the served disk, the guest's model of it, the samples."""

    def __init__(self, seed: int, log: FindingLog, host: SimHost, spec: DiskSpec,
                 backend: BackendProcess, fe: Frontend) -> None:
        self.seed = seed
        self.log = log
        self.host = host
        self.spec = spec
        self.backend = backend
        self.fe = fe
        self.model = DiskModel(IMAGE_SIZE, zeroed=True)
        self.requests = 0  # completed, whichever path served them
        self.fill_page = np.full(4096, FILL, dtype=np.uint8)

    # ---- what the serve holds -------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        self.alive()
        return self.backend.stats()

    def sample(self) -> Sample:
        stats = self.stats()
        platform = stats.get("platform", {})
        proc = procinfo.sample(self.backend.proc.pid, self.host.sim_dir)
        return Sample(proc, platform.get("pages_mapped", 0) - platform.get("pages_unmapped", 0),
                      int(stats.get("process", {}).get("python_objects", 0)))

    def alive(self) -> None:
        status = self.backend.proc.poll()
        if status is not None:
            raise SoakError(f"serve exited with status {status}: {self.backend.log()[-1500:]}")

    # ---- I/O ------------------------------------------------------------------------

    def c_burst(self, case: str, op: int, nbytes: int, count: int, seed: int) -> None:
        """``count`` requests from the C generator (the native loop's path)."""
        try:
            result = run_load(self.fe, op=op, nbytes=nbytes, depth=DEPTH,
                              seconds=_BURST_SECONDS, random=True, span=SPAN, seed=seed,
                              latency=False, fill_byte=FILL, count=count)
        except Exception as exc:  # ProtocolError, or a ring the generator left broken
            self.log.add(case, f"C generator: {type(exc).__name__}: {exc}", kind="protocol")
            raise SoakError(str(exc)) from exc
        self.requests += result.completed
        if result.errors:
            self.log.add(case, f"C generator: {result.errors} error responses to "
                               f"{result.completed} requests", kind="io error")
        if result.completed != count:
            self.log.add(case, f"C generator: {result.completed} of {count} requests "
                               "completed", kind="lost requests")

    def check_c_writes(self, case: str) -> None:
        """Read the region back: every page holds what the model had or FILL."""
        bad = 0
        for offset in range(0, SPAN, READ_CHUNK):
            done = self.fe.read(offset >> blkif.SECTOR_SHIFT, READ_CHUNK)
            self.requests += 1
            if done.status != blkif.BLKIF_RSP_OKAY:
                self.log.add(case, f"read-back at {offset}: status {done.status}",
                             kind="io error")
                continue
            got = np.asarray(done.data, dtype=np.uint8).reshape(-1, 4096)
            want = self.model.expected(offset, READ_CHUNK).reshape(-1, 4096)
            ok = (got == want).all(axis=1) | (got == self.fill_page).all(axis=1)
            bad += int(np.count_nonzero(~ok))
            self.model.write(offset, got.reshape(-1))
        if bad:
            self.log.add(case, f"{bad} page(s) hold neither the old data nor the C "
                               "generator's writes", kind="mismatch")

    def randrw(self, case: str, requests: int, seed: int) -> None:
        """The Python-driven mix, every read checked against the model."""
        summary = run_workload(self.fe, "randrw", requests=requests, seed=seed, span=SPAN,
                               queue_depth=DEPTH, model=self.model)
        self.requests += summary.total_requests
        if not summary.ok:
            self.log.add(case, "randrw: " + summary.to_text().replace("\n", "; "),
                         kind="mismatch" if summary.mismatches else "io error")
            if summary.protocol_errors:
                raise SoakError(summary.protocol_errors[0])

    def round(self, index: int, requests: int) -> None:
        case = f"round {index}"
        py = max(1, round(requests * PY_SHARE))
        c = max(2, requests - py - SPAN // READ_CHUNK)
        nbytes = C_SIZES[index % len(C_SIZES)]
        seed = self.seed * 100_003 + index
        self.c_burst(case, blkif.BLKIF_OP_WRITE, nbytes, c // 2, seed)
        self.check_c_writes(case)
        self.c_burst(case, blkif.BLKIF_OP_READ, nbytes, c - c // 2, seed + 1)
        self.randrw(case, py, seed)

    def cycle(self, index: int) -> None:
        """Close as blkfront does on unbind, reconnect, a little verified I/O."""
        case = f"cycle {index}"
        errors = self.fe.close(timeout=15)
        for error in errors:
            self.log.add(case, f"close: {error}", kind="protocol")
        self.alive()
        state = self.host.backend_state(self.spec)
        if state != XenbusState.CLOSED:
            self.log.add(case, f"backend in state {state} after the frontend closed",
                         kind="handshake")
        held = self.sample().grant_pages
        if held:
            self.log.add(case, f"{held} grant page(s) still mapped after the frontend "
                               "closed", kind="grants held")
        try:
            self.fe.connect(timeout=15)
        except Exception as exc:  # NegotiationError: the disk is gone for the guest
            self.log.add(case, f"reconnect: {type(exc).__name__}: {exc}", kind="handshake")
            raise SoakError(str(exc)) from exc
        seed = self.seed * 100_003 + 1_000_000 + index
        self.c_burst(case, blkif.BLKIF_OP_WRITE, 4096, 64, seed)
        self.check_c_writes(case)
        self.randrw(case, 32, seed)


def judge(log: FindingLog, phase: str, samples: list[Sample], warmup: int) -> dict[str, int]:
    """Findings for what grew over ``samples`` after the first ``warmup`` of them; the
    growth figures, prefixed with ``phase``."""
    own = [s.proc.own_kib for s in samples]
    fds = [s.proc.fds for s in samples]
    maps = [s.proc.maps for s in samples]
    objects = [s.objects for s in samples]
    figures = {
        "rss_growth_kib": growth(own, warmup),
        "fd_growth": growth(fds, warmup),
        "maps_growth": growth(maps, warmup),
        "objects_growth": growth(objects, warmup),
    }
    base = max(warmup - 1, 0)
    case = f"{phase}, {len(samples)} samples, warm-up {warmup}"
    if figures["rss_growth_kib"] > RSS_BUDGET_KIB:
        log.add(case, f"own RSS grew {figures['rss_growth_kib']} KiB after warm-up "
                      f"(budget {RSS_BUDGET_KIB}; {own[base]} -> {own[-1]})", kind="rss growth")
    if figures["fd_growth"] > 0:
        log.add(case, f"open fds grew by {figures['fd_growth']} ({fds[base]} -> {fds[-1]})",
                kind="fd growth")
    if figures["maps_growth"] > MAPS_SLACK:
        log.add(case, f"mappings grew by {figures['maps_growth']} ({maps[base]} -> "
                      f"{maps[-1]})", kind="maps growth")
    if rising(objects, warmup):
        log.add(case, f"live Python objects keep rising ({objects[base]} -> {objects[-1]})",
                kind="object growth")
    return {f"{phase}_{k}": v for k, v in figures.items()}


def _served(queues: list[dict[str, int]]) -> int:
    return sum(q.get("rd_req", 0) + q.get("wr_req", 0) + q.get("f_req", 0)
               + q.get("ds_req", 0) for q in queues)


def run(seed: int, scale: float, progress: Progress) -> CampaignResult:
    started = time.monotonic()
    log = FindingLog(NAME, seed)
    requests, rounds, cycles = plan(scale)
    figures: dict[str, float | int | str] = {}
    done_cycles = 0
    with served_disk() as (host, spec, backend, fe, _image):
        soak = Soak(seed, log, host, spec, backend, fe)
        try:
            if not host.wait_backend_state(spec, XenbusState.INIT_WAIT, timeout=30):
                raise SoakError("backend never reached InitWait: " + backend.log()[-1500:])
            fe.connect(timeout=30)
            warm_rounds = max(2, math.ceil(rounds * WARMUP_SHARE))
            samples: list[Sample] = []
            for i in range(rounds):
                soak.round(i, requests // rounds)
                samples.append(soak.sample())
                if i % max(1, rounds // 10) == 0 or i == rounds - 1:
                    progress(f"soak: round {i + 1}/{rounds}, {soak.requests} requests, "
                             f"own RSS {samples[-1].proc.own_kib} KiB")
            figures.update(judge(log, "requests", samples, warm_rounds))
            warm_cycles = max(2, math.ceil(cycles * WARMUP_SHARE))
            samples = []
            for i in range(cycles):
                soak.cycle(i)
                done_cycles += 1
                samples.append(soak.sample())
                if i % max(1, cycles // 10) == 0 or i == cycles - 1:
                    s = samples[-1]
                    progress(f"soak: cycle {i + 1}/{cycles}, own RSS {s.proc.own_kib} KiB, "
                             f"{s.proc.fds} fds, {s.proc.maps} maps")
            figures.update(judge(log, "cycles", samples, warm_cycles))
            last = samples[-1].proc
            figures.update(own_rss_mib=round(procinfo.mib(last.own_kib), 1), fds=last.fds,
                           maps=last.maps)
            for error in fe.close(timeout=15):
                log.add("end", f"close: {error}", kind="protocol")
        except (SoakError, ProtocolError, NegotiationError, OSError) as exc:
            # the serve died or the guest lost its disk: nothing more to learn from it
            log.add(f"after {soak.requests} requests, {done_cycles} cycles",
                    f"soak stopped: {type(exc).__name__}: {exc}", kind="stopped")
        stats = backend.stats()
        for problem in remove_and_check(host, spec, backend):
            log.add("removal", problem, kind="removal")
    # A queue's counters include what its native loop served; discards never go there.
    native = _served(stats.get("loops", []))
    reference = _served(stats.get("queues", [])) - native
    if soak.requests and not (native and reference):
        log.add("paths", f"a path was not soaked: native loop {native}, reference path "
                         f"{reference} requests", kind="coverage")
    figures.update(cycles=done_cycles, native_requests=native, reference_requests=reference)
    return CampaignResult(NAME, "requests", soak.requests, time.monotonic() - started,
                          log.findings, figures)
