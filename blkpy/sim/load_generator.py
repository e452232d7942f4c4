"""Benchmark load from the simulated guest: READ requests kept in flight by the C loop in
simfront.c, so the generator is never what limits the backend.

    result = run_reads(frontend, nbytes=4096, depth=32, seconds=5, random=True)

The frontend must be connected and idle; with persistent grants the pages of each
request id keep their grants, without them the C loop grants them at submission and
revokes them at completion (a grant still mapped then is a protocol error). The loop borrows its
ring for the run (Python keeps the event channel: it notifies and sleeps when the loop
says so) and hands the ring indices back afterwards, so the frontend keeps working.
"""

from __future__ import annotations

import dataclasses
import resource
import select
import time
from typing import Any

import numpy as np

from blkpy import ring as blkif
from blkpy.gntdev.native import ffi, lib
from blkpy.sim.blkfront_ring import PAGE_SIZE, SECTOR, BlkfrontRing, ProtocolError

_HANG_TIMEOUT = 10.0  # no response for this long while requests are in flight: give up


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

    @property
    def iops(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_reads(
    frontend: Any,
    *,
    nbytes: int,
    depth: int,
    seconds: float,
    random: bool,
    span: int | None = None,
    poll_us: int = 50,
    seed: int = 1,
) -> LoadResult:
    """Keep ``depth`` reads of ``nbytes`` (page multiple) in flight for ``seconds``, at
    random aligned offsets or sequentially over the first ``span`` bytes of the disk."""
    ring: BlkfrontRing = getattr(frontend, "ring", frontend)
    if ring is None or ring.info is None:
        raise RuntimeError("the frontend is not connected")
    if nbytes <= 0 or nbytes % PAGE_SIZE:
        raise ValueError("request size must be a multiple of 4096")
    span = min(span or ring.info.size, ring.info.size)
    slots = span // nbytes
    if slots == 0:
        raise ValueError(f"disk of {span} bytes is smaller than one request")
    depth = max(1, min(depth, ring.size))
    templates, held = ring.request_templates(blkif.BLKIF_OP_READ, nbytes, depth)
    free_ids = np.zeros(ring.size, dtype=np.uint32)
    pending = np.zeros(ring.size, dtype=np.uint8)
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
    f.response_op = blkif.BLKIF_OP_READ
    f.random = int(random)
    f.sectors_per_req = nbytes // SECTOR
    f.slots_in_disk = slots
    f.rng = (seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF or 1
    f.limit = 0
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
            if not f.limit and time.monotonic() >= stop_at:
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
    )
