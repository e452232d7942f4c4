"""A minimal in-process blkif backend for testing the simulated frontend without `serve`.

It maps grants through the sim platform, keeps the disk in a bytearray, and can be told to
misbehave (wrong operation, unknown id, keeping grants mapped, refusing flushes) so the
frontend's protocol checks can be seen to fire.
"""

from __future__ import annotations

import select
import threading

import numpy as np

from blkpy import ring as blkif
from blkpy.ring import BackRing
from blkpy.sim.blkfront_negotiation import DiskInfo
from blkpy.sim.platform import SimPlatform

SECTOR = 512


def disk_info(sectors: int = 4096, **overrides) -> DiskInfo:
    fields = dict(
        sectors=sectors, info=0, sector_size=512, physical_sector_size=512, flush=True,
        barrier=True, discard=True, discard_granularity=4096, discard_alignment=0,
        discard_secure=False, persistent=False, max_indirect_segments=64,
    )
    fields.update(overrides)
    return DiskInfo(**fields)


class ToyBackend:
    """Serves one ring of ``guest_domid`` from a thread until ``stop``."""

    def __init__(self, sim_dir: str, guest_domid: int, ring_refs, port: int, abi, order: int,
                 disk_bytes: int, readonly: bool = False) -> None:
        self.platform = SimPlatform(sim_dir=sim_dir, domid=0)
        self.domid = guest_domid
        self.ring_map = self.platform.map_grants(guest_domid, ring_refs, writable=True)
        self.ring = BackRing(self.ring_map.buffer, abi, 1 << order)
        self.channel = self.platform.bind_interdomain(guest_domid, port)
        self.disk = bytearray(disk_bytes)
        self.readonly = readonly
        self.abi = abi
        # misbehaviour knobs
        self.wrong_operation = False
        self.bogus_id: int | None = None
        self.keep_mapped = False
        self.refuse_flush = False
        self.held: list = []
        self.seen: list[np.ndarray] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for m in self.held:
            m.unmap()
        self.held.clear()
        self.ring_map.unmap()
        self.channel.close()
        self.platform.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            select.select([self.channel], [], [], 0.05)
            self.channel.ack()
            while True:
                reqs = self.ring.consume()
                if len(reqs):
                    self.seen.append(reqs)
                    views = (reqs, reqs.view(self.abi.discard), reqs.view(self.abi.indirect))
                    ids, ops, sts = zip(*(self._serve(views, i) for i in range(len(reqs))),
                                        strict=True)
                    self.ring.produce(np.array(ids, np.uint64), np.array(ops, np.uint8),
                                      np.array(sts, np.int16))
                    if self.ring.push_responses():
                        self.channel.notify()
                if not self.ring.final_check_for_requests():
                    break

    def _segments(self, views, i) -> tuple[int, np.ndarray]:
        """(data op, segment descriptors) of a read/write/flush/barrier/indirect slot."""
        req = views[0][i]
        if req["operation"] == blkif.BLKIF_OP_INDIRECT:
            ind = views[2][i]
            n = int(ind["nr_segments"])
            npages = -(-n // blkif.SEGS_PER_INDIRECT_FRAME)
            with self.platform.map_grants(self.domid, ind["indirect_grefs"][:npages], False) as m:
                segs = np.frombuffer(bytes(m.buffer), dtype=blkif.SEGMENT_DTYPE)[:n].copy()
            return int(ind["indirect_op"]), segs
        return int(req["operation"]), req["seg"][: int(req["nr_segments"])]

    def _serve(self, views, i) -> tuple[int, int, int]:
        req = views[0][i]
        op = int(req["operation"])
        rid = int(req["id"]) if self.bogus_id is None else self.bogus_id
        if op == blkif.BLKIF_OP_DISCARD:
            d = views[1][i]
            start, n = int(d["sector_number"]) * SECTOR, int(d["nr_sectors"]) * SECTOR
            if self.readonly:
                return rid, op, blkif.BLKIF_RSP_ERROR
            self.disk[start : start + n] = bytes(n)
            return rid, op, blkif.BLKIF_RSP_OKAY
        data_op, segs = self._segments(views, i)
        answer_op = data_op + 1 if self.wrong_operation else data_op
        if op in (blkif.BLKIF_OP_FLUSH_DISKCACHE, blkif.BLKIF_OP_WRITE_BARRIER) and self.refuse_flush:
            return rid, answer_op, blkif.BLKIF_RSP_EOPNOTSUPP
        if self.readonly and data_op != blkif.BLKIF_OP_READ:
            return rid, answer_op, blkif.BLKIF_RSP_ERROR
        if len(segs) == 0:
            return rid, answer_op, blkif.BLKIF_RSP_OKAY
        writable = data_op == blkif.BLKIF_OP_READ
        m = self.platform.map_grants(self.domid, segs["gref"], writable)
        buf = m.buffer
        pos = int(req["sector_number"]) * SECTOR
        for i, seg in enumerate(segs):
            a = i * 4096 + int(seg["first_sect"]) * SECTOR
            n = (int(seg["last_sect"]) - int(seg["first_sect"]) + 1) * SECTOR
            if writable:
                buf[a : a + n] = self.disk[pos : pos + n]
            else:
                self.disk[pos : pos + n] = buf[a : a + n]
            pos += n
        if self.keep_mapped:
            self.held.append(m)
        else:
            m.unmap()
        return rid, answer_op, blkif.BLKIF_RSP_OKAY
