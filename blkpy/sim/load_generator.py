"""Benchmark load from the simulated guest: READ or WRITE requests kept in flight by the C
loop in simfront.c, so the generator is never what limits the backend.

    result = run_load(frontend, op=BLKIF_OP_READ, nbytes=4096, depth=32, seconds=5,
                      random=True)
    result.latency_us()          # {"p50": ..., "p99": ..., "p99.9": ...}

The frontend must be connected and idle; with persistent grants the pages of each
request id keep their grants, without them the C loop grants them at submission and
revokes them at completion (a grant still mapped then is a protocol error). The loop borrows its
ring for the run (Python keeps the event channel: it notifies and sleeps when the loop
says so) and hands the ring indices back afterwards, so the frontend keeps working.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import select
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from blkpy import ring as blkif
from blkpy.gntdev.native import ffi, lib
from blkpy.sim.blkfront_ring import PAGE_SIZE, SECTOR, BlkfrontRing, ProtocolError

_HANG_TIMEOUT = 10.0  # no response for this long while requests are in flight: give up
HIST_BINS = int(lib.SIMFRONT_HIST_BINS)
LATENCY_PERCENTILES = (50.0, 99.0, 99.9)
# Smallest latency (ns) of each histogram bin and the midpoint reported for it: the C
# bucketing is the single definition, these only mirror it.
_BIN_LOWER = np.array([lib.simfront_hist_lower(i) for i in range(HIST_BINS)], dtype=np.float64)
_BIN_MID = np.append((_BIN_LOWER[:-1] + _BIN_LOWER[1:] - 1) / 2, _BIN_LOWER[-1])


def percentile_key(p: float) -> str:
    """``p50``, ``p99``, ``p99.9``: how reports name a percentile."""
    return f"p{p:g}"


def percentiles(hist: np.ndarray, ps: Iterable[float] = LATENCY_PERCENTILES) -> dict[float, float]:
    """Percentiles (nearest rank, like numpy's ``inverted_cdf``) of the values counted in a
    simfront histogram, each as the midpoint of the bin holding it: within 1/128 of the
    true value (exact below 128). Empty histogram: no percentiles."""
    cum = np.cumsum(hist, dtype=np.uint64)
    total = int(cum[-1]) if len(cum) else 0
    if total == 0:
        return {}
    out = {}
    for p in ps:
        # the same float steps as numpy (q = p / 100, then n * q) so ranks agree exactly
        rank = min(max(math.ceil(total * (p / 100)), 1), total)
        out[p] = float(_BIN_MID[int(np.searchsorted(cum, rank))])
    return out


@dataclasses.dataclass
class LoadResult:
    """What one generator run did, and what it cost the generator."""

    completed: int
    errors: int
    bytes: int
    seconds: float
    cpu_seconds: float  # the generator process (user + system) during the run
    notifies: int  # events sent to the backend
    sleeps: int  # times the generator slept on its event channel
    grants_ended: int = 0  # transient grants revoked (0 with persistent grants)
    next_offset: int = 0  # byte offset the next sequential request would have used
    latency_hist: np.ndarray | None = None  # simfront histogram of completion latency (ns)

    def latency_us(self) -> dict[str, float]:
        """p50/p99/p99.9 completion latency in microseconds (empty if not recorded)."""
        if self.latency_hist is None:
            return {}
        return {percentile_key(p): v / 1000 for p, v in percentiles(self.latency_hist).items()}

    @property
    def iops(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_load(
    frontend: Any,
    *,
    op: int = blkif.BLKIF_OP_READ,
    nbytes: int,
    depth: int,
    seconds: float,
    random: bool,
    span: int | None = None,
    start: int = 0,
    step: int | None = None,
    poll_us: int = 50,
    seed: int = 1,
    latency: bool = True,
    fill_byte: int = 0x5A,
    count: int = 0,
) -> LoadResult:
    """Keep ``depth`` requests ``op`` (READ or WRITE) of ``nbytes`` (page multiple) in
    flight for ``seconds``, at random offsets or sequentially over the first ``span``
    bytes of the disk. Offsets are multiples of ``step`` (default ``nbytes``; a larger
    step spreads requests out, e.g. one per qcow2 cluster); a sequential run begins at
    ``start`` and wraps at the end of the span. ``latency``: record completion latency.
    ``count``: stop after that many requests (a reproducible amount of work; ``seconds``
    still bounds the run)."""
    if op not in (blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE):
        raise ValueError(f"the load generator issues READ or WRITE, not operation {op}")
    ring: BlkfrontRing = getattr(frontend, "ring", frontend)
    if ring is None or ring.info is None:
        raise RuntimeError("the frontend is not connected")
    if nbytes <= 0 or nbytes % PAGE_SIZE:
        raise ValueError("request size must be a multiple of 4096")
    step = step or nbytes
    if step % SECTOR:
        raise ValueError("the step must be a multiple of 512")
    if op == blkif.BLKIF_OP_WRITE and ring.info.readonly:
        raise ValueError("the disk is read-only")  # blkfront would not issue the write
    span = min(span or ring.info.size, ring.info.size)
    if span < nbytes:
        raise ValueError(f"disk of {span} bytes is smaller than one request")
    slots = (span - nbytes) // step + 1  # start positions where a whole request fits
    depth = max(1, min(depth, ring.size))
    templates, held = ring.request_templates(op, nbytes, depth)
    if op == blkif.BLKIF_OP_WRITE:
        # Each id's data pages come first in its share of ``held`` (then indirect pages,
        # which must keep their segment lists).
        per_id, data_pages = len(held) // depth, nbytes // PAGE_SIZE
        payload = bytes([fill_byte]) * PAGE_SIZE
        for i in range(depth):
            for frame, _ref in held[i * per_id : i * per_id + data_pages]:
                ring.guest.page(frame)[:] = payload
    free_ids = np.zeros(ring.size, dtype=np.uint32)
    pending = np.zeros(ring.size, dtype=np.uint8)
    submit_ns = np.zeros(ring.size, dtype=np.uint64)
    hist = np.zeros(HIST_BINS, dtype=np.uint64) if latency else None
    f = ffi.new("struct simfront *")
    f.ring = ffi.cast("uint8_t *", ring.front_address)
    f.templates = ffi.cast("uint8_t *", templates.ctypes.data)
    f.free_ids = ffi.cast("uint32_t *", free_ids.ctypes.data)
    f.pending = ffi.cast("uint8_t *", pending.ctypes.data)
    f.size = ring.size
    f.entry_size = ring.abi.entry_size
    f.id_off = ring.abi.request.fields["id"][1]
    f.sector_off = ring.abi.request.fields["sector_number"][1]
    f.depth = depth
    f.response_op = op
    f.random = int(random)
    f.sectors_per_req = nbytes // SECTOR
    f.step_sectors = step // SECTOR
    f.slots_in_disk = slots
    f.next_slot = start // step
    f.rng = (seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF or 1
    f.limit = count
    f.submit_ns = ffi.cast("uint64_t *", submit_ns.ctypes.data)
    f.lat_hist = ffi.cast("uint64_t *", hist.ctypes.data) if hist is not None else ffi.NULL
    grefs = np.array([ref for _frame, ref in held], dtype=np.uint32)
    if not ring.persistent:
        # Transient grants: the C loop validates and revokes each request's entries in
        # the guest's grant table, as blkfront does per request.
        f.grant_table = ffi.cast("uint8_t *", ring.guest_grant_table_address)
        f.id_grefs = ffi.cast("uint32_t *", grefs.ctypes.data)
        f.grefs_per_id = len(grefs) // depth
    poll_ns = poll_us * 1000
    port = ring.port
    notifies = sleeps = 0
    lib.simfront_init(f)
    cpu0, t0 = _cpu_seconds(), time.monotonic()
    stop_at = t0 + seconds
    try:
        while True:
            flags = lib.simfront_step(f, poll_ns)
            if flags & lib.SIMFRONT_BROKEN:
                if f.still_mapped:
                    raise ProtocolError("load generator: backend has not unmapped grant")
                raise ProtocolError(
                    f"load generator: {f.bad_responses} bad response(s) (id, operation or count)"
                )
            if flags & lib.SIMFRONT_NOTIFY:
                port.notify()
                notifies += 1
            if flags & lib.SIMFRONT_DONE:
                break
            if flags & lib.SIMFRONT_WAIT:
                sleeps += 1
                ready, _, _ = select.select([port], [], [], _HANG_TIMEOUT)
                if not ready:
                    raise ProtocolError(
                        f"load generator: no response in {_HANG_TIMEOUT}s with "
                        f"{f.in_flight} requests in flight"
                    )
                port.ack()
            if time.monotonic() >= stop_at and not (f.limit and f.submitted >= f.limit):
                f.limit = max(f.submitted, 1)  # stop submitting; drain what is in flight
    finally:
        elapsed = time.monotonic() - t0
        cpu = _cpu_seconds() - cpu0
        # Hand the ring back to the Python frontend where the C loop left it.
        ring.front.req_prod_pvt = f.req_prod_pvt
        ring.front.rsp_cons = f.rsp_cons
        if f.in_flight == 0:
            ring.release_templates(held)
        else:  # responses still owed: their pages must not be reused
            ring.failed = ring.failed or "load generator stopped with requests in flight"
    return LoadResult(
        completed=int(f.completed),
        errors=int(f.errors),
        bytes=int(f.completed) * nbytes,
        seconds=elapsed,
        cpu_seconds=cpu,
        notifies=notifies,
        sleeps=sleeps,
        grants_ended=int(f.grants_ended),
        next_offset=int(f.next_slot) * step,
        latency_hist=hist,
    )


def run_reads(frontend: Any, **kwargs: Any) -> LoadResult:
    """``run_load`` with READ requests (see there for the arguments)."""
    return run_load(frontend, op=blkif.BLKIF_OP_READ, **kwargs)
