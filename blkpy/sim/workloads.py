"""Workloads the simulated guest runs on a connected Frontend, checked against a DiskModel.

    summary = run_workload(frontend, "verify" | "randrw", requests=N, seed=S,
                           queue_depth=None, span=None, zeroed=False, timeout=10.0,
                           model=None)
    print(summary.to_text())   # or json.dumps(summary.as_dict())
    summary.ok                 # no mismatch, no unexpected error, no protocol error

* ``verify`` writes patterns over the first ``span`` bytes of the disk in mixed shapes --
  single sectors, buffers crossing a page, scattered segments, exactly 11 segments, and
  indirect requests when negotiated -- interleaves flushes, barriers (with and without
  data) and aligned discards, then reads everything back in different shapes and checks
  every byte (discarded ranges must read as zeros).
* ``randrw`` issues a random mix of reads, writes, flushes, barriers and discards at
  ``queue_depth`` requests in flight, never two overlapping ones at once, and checks every
  read against the model.

On a read-only disk every write, discard and flush with data must come back
BLKIF_RSP_ERROR (counted as ``expected_errors``), and later reads must show the old data.
Requests stay inside the first ``span`` bytes (default: the whole disk, but at most 64 MiB
for verify and 256 MiB for randrw, since the model holds every byte written), aligned to
the disk's sector-size; discards also to discard-granularity/alignment. With several
queues, requests go round-robin to all of them.
"""

from __future__ import annotations

import dataclasses
import select
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from blkpy import ring as blkif
from blkpy.sim.blkfront_ring import (
    OP_NAMES,
    SECTOR,
    SECTORS_PER_PAGE,
    BlkfrontRing,
    Completion,
    ProtocolError,
    contiguous_layout,
    layout_bytes,
)
from blkpy.sim.disk_model import DiskModel

WORKLOADS = ("verify", "randrw")
# Default spans: the model holds every byte written, so these bound its memory.
DEFAULT_SPANS = {"verify": 64 << 20, "randrw": 256 << 20}
PAGE = SECTORS_PER_PAGE * SECTOR

READ = blkif.BLKIF_OP_READ
WRITE = blkif.BLKIF_OP_WRITE
FLUSH = blkif.BLKIF_OP_FLUSH_DISKCACHE
BARRIER = blkif.BLKIF_OP_WRITE_BARRIER
DISCARD = blkif.BLKIF_OP_DISCARD
_WRITING_OPS = (WRITE, FLUSH, BARRIER)


def free_ring(rings: Sequence[Any], start: int) -> int | None:
    """The first queue from ``start`` on (round robin) that can take a request, or None."""
    for k in range(len(rings)):
        q = (start + k) % len(rings)
        if rings[q].can_submit():
            return q
    return None


@dataclasses.dataclass
class WorkloadSummary:
    """What a workload did and found."""

    workload: str
    requests: dict[str, int] = dataclasses.field(default_factory=dict)  # by op name
    indirect_requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_discarded: int = 0
    errors: int = 0  # error statuses nothing justified
    expected_errors: int = 0  # refusals that were required (read-only disk)
    unsupported: int = 0  # EOPNOTSUPP answers (the feature is then turned off)
    mismatches: int = 0  # completed reads whose bytes differ from the model
    mismatched_bytes: int = 0
    protocol_errors: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def ok(self) -> bool:
        return not (self.errors or self.mismatches or self.protocol_errors)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_requests": self.total_requests, "ok": self.ok}

    def to_text(self) -> str:
        ops = ", ".join(f"{name} {n}" for name, n in sorted(self.requests.items()))
        lines = [
            f"workload {self.workload}: {self.total_requests} requests in {self.seconds:.2f}s"
            f" ({ops}; {self.indirect_requests} indirect)",
            f"  bytes: read {self.bytes_read}, written {self.bytes_written},"
            f" discarded {self.bytes_discarded}",
            f"  errors {self.errors}, expected errors {self.expected_errors},"
            f" unsupported {self.unsupported}, mismatches {self.mismatches}"
            f" ({self.mismatched_bytes} bytes)",
        ]
        lines += [f"  protocol error: {e}" for e in self.protocol_errors]
        lines.append("  result: " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Tag:
    """What the workload needs to check a request's completion."""

    offset: int
    nbytes: int
    payload: np.ndarray | None


class _Driver:
    """Keeps up to ``depth`` non-overlapping requests in flight, spread round-robin over
    the frontend's queues, and checks completions."""

    def __init__(
        self,
        rings: list[BlkfrontRing],
        model: DiskModel,
        summary: WorkloadSummary,
        depth: int,
        timeout: float,
    ) -> None:
        self.rings = rings
        self.ring = rings[0]  # every queue shares the disk's info
        self.info = self.ring.info
        self.model = model
        self.summary = summary
        self.depth = max(1, min(depth, sum(r.size for r in rings)))
        self.timeout = timeout
        self.busy: dict[tuple[int, int], tuple[int, int]] = {}  # (queue, id) -> byte range
        self.ops: Counter = Counter()
        self._next = 0

    def supports(self, op: int) -> bool:
        return all(r.supports(op) for r in self.rings)

    def _slot_for(self, start: int, end: int) -> int | None:
        """A queue that can take a request on [start, end) now, or None."""
        if len(self.busy) >= self.depth:
            return None
        if end > start and any(s < end and start < e for s, e in self.busy.values()):
            return None
        q = free_ring(self.rings, self._next)
        if q is not None:
            self._next = q + 1
        return q

    def _submit(self, start: int, end: int, op: int, **kw: Any) -> None:
        while (q := self._slot_for(start, end)) is None:
            self._reap(wait=True)
        ring = self.rings[q]
        rid = ring.submit(op, start // SECTOR, **kw)
        self.busy[(q, rid)] = (start, end)
        self.ops[OP_NAMES[op]] += 1
        ring.push()

    def issue(
        self, op: int, offset: int, *, payload: np.ndarray | None = None, nbytes: int = 0, **kw: Any
    ) -> None:
        if payload is not None:
            nbytes = len(payload)
        elif op == READ:
            nbytes = nbytes or layout_bytes(kw["layout"])
        self._submit(
            offset,
            offset + nbytes,
            op,
            data=payload,
            nbytes=nbytes if op == READ else 0,
            tag=_Tag(offset, nbytes, payload),
            **kw,
        )

    def discard(self, offset: int, nbytes: int) -> None:
        # Every other discard asks for a secure erase when the backend offers it.
        secure = self.info.discard_secure and self.ops["discard"] % 2 == 1
        self._submit(
            offset,
            offset + nbytes,
            DISCARD,
            nr_sectors=nbytes // SECTOR,
            secure=secure,
            tag=_Tag(offset, nbytes, None),
        )

    def drain(self) -> None:
        while self.busy:
            self._reap(wait=True)

    def _poll_all(self) -> list[tuple[int, Completion]]:
        return [(q, c) for q, ring in enumerate(self.rings) for c in ring.poll(0.0)]

    def _reap(self, wait: bool) -> None:
        done = self._poll_all()
        deadline = time.monotonic() + self.timeout
        while wait and not done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError(
                    f"backend answered none of {len(self.busy)} requests within {self.timeout}s"
                )
            ports = [r.port for r in self.rings if r.in_flight]
            ready, _, _ = select.select(ports, [], [], remaining)
            for port in ready:  # may be stale events: the rings say what really arrived
                port.ack()
            done = self._poll_all()
        for q, c in done:
            del self.busy[(q, c.id)]
            self._check(c)

    def _check(self, c: Completion) -> None:
        s = self.summary
        tag: _Tag = c.tag
        if c.indirect:
            s.indirect_requests += 1
        if c.status == blkif.BLKIF_RSP_EOPNOTSUPP:
            s.unsupported += 1
            return
        readonly = self.info.readonly
        modifies = c.op == DISCARD or (c.op in _WRITING_OPS and tag.nbytes)
        if c.status != blkif.BLKIF_RSP_OKAY:
            # A read-only disk must refuse anything that modifies it; an empty flush may
            # go either way.
            if readonly and (modifies or c.op in (FLUSH, BARRIER)):
                s.expected_errors += 1
            else:
                s.errors += 1
            return
        if readonly and modifies:
            s.errors += 1  # a read-only disk accepted a write: the model no longer holds
            return
        if c.op == READ:
            s.bytes_read += tag.nbytes
            bad = self.model.check(tag.offset, c.data)
            if bad:
                s.mismatches += 1
                s.mismatched_bytes += bad
        elif c.op == DISCARD:
            s.bytes_discarded += tag.nbytes
            self.model.discard(tag.offset, tag.nbytes, reads_zero=True)
        elif tag.payload is not None:
            s.bytes_written += tag.nbytes
            self.model.write(tag.offset, tag.payload)


class _Shapes:
    """Random request shapes (byte length + segment layout) the negotiated disk accepts."""

    def __init__(self, ring: BlkfrontRing, rng: np.random.Generator) -> None:
        info = ring.info
        self.rng = rng
        self.unit = info.sector_size // SECTOR  # sectors per logical block
        self.max_segments = info.max_segments
        self.indirect = info.max_indirect_segments > 0

    def _first(self) -> int:
        return int(self.rng.integers(0, SECTORS_PER_PAGE // self.unit)) * self.unit

    def single(self) -> list[tuple[int, int]]:
        first = self._first()
        return [(first, first + self.unit - 1)]

    def cross_page(self) -> list[tuple[int, int]]:
        first = self._first() or (SECTORS_PER_PAGE - self.unit)
        if first == 0:  # 4096-byte sectors cannot start mid-page: two whole pages then
            return contiguous_layout(2 * PAGE)
        sectors = SECTORS_PER_PAGE - first + self.unit * int(self.rng.integers(1, 9))
        return contiguous_layout(sectors * SECTOR, first)

    def scattered(self, nseg: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(nseg):
            a = self._first()
            b = a + self.unit * int(self.rng.integers(0, (SECTORS_PER_PAGE - a) // self.unit))
            out.append((a, b + self.unit - 1))
        return out

    def full(self, nseg: int) -> list[tuple[int, int]]:
        return contiguous_layout(nseg * PAGE)

    def random(self) -> list[tuple[int, int]]:
        """Any of the shapes, indirect-sized ones included when negotiated."""
        kind = int(self.rng.integers(0, 6 if self.indirect else 4))
        if kind == 0:
            return self.single()
        if kind == 1:
            return self.cross_page()
        if kind == 2:
            return self.scattered(
                int(self.rng.integers(1, blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST + 1))
            )
        if kind == 3:
            return self.full(blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST)
        nseg = int(
            self.rng.integers(blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST + 1, self.max_segments + 1)
        )
        return self.full(nseg) if kind == 4 else self.scattered(nseg)


def _pattern(rng: np.random.Generator, offset: int, nbytes: int) -> np.ndarray:
    """Random bytes with each sector's disk offset stamped in its first 8 bytes, so data
    landing in the wrong place is recognisable in a mismatch."""
    data = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy()
    stamps = data.reshape(-1, SECTOR)[:, :8].view("<u8")
    stamps[:, 0] = offset + np.arange(nbytes // SECTOR, dtype=np.uint64) * SECTOR
    return data


def _discard_range(
    ring: BlkfrontRing, span: int, rng: np.random.Generator, max_units: int = 8
) -> tuple[int, int] | None:
    """An aligned discard inside [0, span), or None if the disk offers none."""
    info = ring.info
    gran = max(info.discard_granularity, info.sector_size)
    first = info.discard_alignment % gran
    units = (span - first) // gran
    if units <= 0:
        return None
    n = int(rng.integers(1, min(max_units, units) + 1))
    start = first + int(rng.integers(0, units - n + 1)) * gran
    return start, n * gran


def _verify(drv: _Driver, rng: np.random.Generator, requests: int, span: int) -> None:
    ring = drv.ring
    shapes = _Shapes(ring, rng)
    readonly = ring.info.readonly
    budget = max(requests // 2, 8)
    # Every shape appears early, whatever the budget.
    cycle = [
        shapes.single,
        shapes.cross_page,
        lambda: shapes.scattered(5),
        lambda: shapes.full(blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST),
    ]
    if shapes.indirect:
        cycle += [
            lambda: shapes.full(shapes.max_segments),
            lambda: shapes.scattered(shapes.max_segments),
        ]
    if readonly:
        # Learn the disk first, so refused writes can be shown to change nothing.
        span = min(span, budget * PAGE)
        _read_back(drv, shapes, rng, 0, span)
    # Write passes over [0, span) until the budget is spent (later passes overwrite).
    pos = covered = 0
    for n in range(budget):
        layout = cycle[n % len(cycle)]() if n < 2 * len(cycle) else shapes.random()
        if pos + layout_bytes(layout) > span:
            layout = contiguous_layout(min(span - pos, shapes.max_segments * PAGE))
        nbytes = layout_bytes(layout)
        small = len(layout) <= blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST
        if n % 50 == 7 and small and drv.supports(FLUSH):
            op = FLUSH  # flush with data
        elif n % 50 == 19 and small and drv.supports(BARRIER):
            op = BARRIER  # barrier with data
        else:
            op = WRITE
        drv.issue(op, pos, payload=_pattern(rng, pos, nbytes), layout=layout)
        pos += nbytes
        covered = max(covered, pos)
        if pos >= span:
            pos = 0
        if n % 40 == 13:
            for empty in (FLUSH, BARRIER):
                if drv.supports(empty):
                    drv.issue(empty, 0)
        if n % 32 == 31 and drv.supports(DISCARD):
            rng_range = _discard_range(ring, covered, rng)
            if rng_range:
                drv.discard(*rng_range)
    for empty in (FLUSH, BARRIER):
        if drv.supports(empty):
            drv.issue(empty, 0)
    drv.drain()
    # Read everything written back, in other shapes, at least once and about as often as
    # it was written.
    reads_before = drv.ops["read"]
    while True:
        _read_back(drv, shapes, rng, 0, covered)
        if drv.ops["read"] - reads_before >= budget:
            break
    drv.drain()


def _read_back(
    drv: _Driver, shapes: _Shapes, rng: np.random.Generator, start: int, end: int
) -> None:
    pos = start
    while pos < end:
        layout = shapes.random()
        if pos + layout_bytes(layout) > end:
            layout = contiguous_layout(min(end - pos, shapes.max_segments * PAGE))
        drv.issue(READ, pos, layout=layout)
        pos += layout_bytes(layout)


def _randrw(drv: _Driver, rng: np.random.Generator, requests: int, span: int) -> None:
    ring = drv.ring
    shapes = _Shapes(ring, rng)
    block = ring.info.sector_size
    for _ in range(requests):
        roll = rng.random()
        if roll < 0.04 and drv.supports(FLUSH):
            drv.issue(FLUSH, 0)
            continue
        if roll < 0.06 and drv.supports(BARRIER):
            drv.issue(BARRIER, 0)
            continue
        if roll < 0.11 and drv.supports(DISCARD):
            rng_range = _discard_range(ring, span, rng)
            if rng_range:
                drv.discard(*rng_range)
                continue
        layout = shapes.random()
        nbytes = layout_bytes(layout)
        if nbytes > span:
            layout = shapes.single()
            nbytes = layout_bytes(layout)
        offset = int(rng.integers(0, (span - nbytes) // block + 1)) * block
        if roll < 0.55:
            drv.issue(READ, offset, layout=layout)
        else:
            drv.issue(WRITE, offset, payload=_pattern(rng, offset, nbytes), layout=layout)
    drv.drain()


def run_workload(
    frontend: Any,
    name: str,
    *,
    requests: int = 1000,
    seed: int = 0,
    queue_depth: int | None = None,
    span: int | None = None,
    zeroed: bool = False,
    timeout: float = 10.0,
    model: DiskModel | None = None,
) -> WorkloadSummary:
    """Run workload ``name`` on a connected Frontend (or a BlkfrontRing) and summarise.

    Requests go round-robin to every queue. ``queue_depth`` (total in flight) defaults to
    the sum of the ring sizes; ``zeroed`` says the disk is known to start
    as zeros; ``model`` carries expectations across runs (e.g. over a reconnect)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (expected one of {', '.join(WORKLOADS)})")
    rings: list[BlkfrontRing] = getattr(frontend, "rings", None) or [frontend]
    if rings[0] is None or rings[0].info is None:
        raise RuntimeError("the frontend is not connected")
    info = rings[0].info
    size = info.sectors * SECTOR
    span = min(size, span or DEFAULT_SPANS[name])
    span -= span % max(info.sector_size, PAGE)
    model = model or DiskModel(size, zeroed=zeroed)
    summary = WorkloadSummary(name)
    depth = queue_depth or sum(r.size for r in rings)
    drv = _Driver(rings, model, summary, depth, timeout)
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    try:
        if span <= 0:
            raise ValueError(f"disk of {size} bytes is too small for a workload")
        (_verify if name == "verify" else _randrw)(drv, rng, requests, span)
    except ProtocolError as exc:
        summary.protocol_errors.append(str(exc))
    summary.seconds = time.monotonic() - started
    summary.requests = dict(drv.ops)
    errors = getattr(frontend, "protocol_errors", None)
    if errors is not None:
        errors.extend(e for e in summary.protocol_errors if e not in errors)
    return summary
