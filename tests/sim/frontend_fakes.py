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
                 disk_bytes: int | bytearray, readonly: bool = False) -> None:
        self.platform = SimPlatform(sim_dir=sim_dir, domid=0)
        self.domid = guest_domid
        self.ring_map = self.platform.map_grants(guest_domid, ring_refs, writable=True)
        self.ring = BackRing(self.ring_map.buffer, abi, 1 << order)
        self.channel = self.platform.bind_interdomain(guest_domid, port)
        self.disk = disk_bytes if isinstance(disk_bytes, bytearray) else bytearray(disk_bytes)
        self.readonly = readonly
        self.abi = abi
        # misbehaviour knobs
        self.wrong_operation = False
        self.bogus_id: int | None = None
        self.keep_mapped = False
        self.refuse_flush = False
        self.corrupt_reads = False  # flip one byte of every read
        self.ignore_discard = False  # answer OKAY without zeroing
        self.fail_all = False  # answer every request BLKIF_RSP_ERROR
        self.paused = False  # consume nothing (a hung backend)
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
            if self.paused:
                continue
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
            if not self.ignore_discard:
                self.disk[start : start + n] = bytes(n)
            return rid, op, blkif.BLKIF_RSP_OKAY
        data_op, segs = self._segments(views, i)
        answer_op = data_op + 1 if self.wrong_operation else data_op
        if self.fail_all:
            return rid, answer_op, blkif.BLKIF_RSP_ERROR
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
                if self.corrupt_reads and i == 0:
                    buf[a] ^= 0xFF
            else:
                self.disk[pos : pos + n] = buf[a : a + n]
            pos += n
        if self.keep_mapped:
            self.held.append(m)
        else:
            m.unmap()
        return rid, answer_op, blkif.BLKIF_RSP_OKAY


def ring_pair(sim_dir: str, domid: int = 5, abi: str = "x86_64-abi", order: int = 0,
              readonly: bool = False, sectors: int = 4096, **info):
    """(guest, attached BlkfrontRing, ToyBackend serving it) without any xenstore."""
    from blkpy.sim.blkfront_ring import BlkfrontRing
    from blkpy.sim.guest import SimGuest

    guest = SimGuest(sim_dir, domid, memory_pages=4096, grant_entries=4096)
    fr = BlkfrontRing(guest, 0, blkif.ABIS[abi], order, handle=51712)
    be = ToyBackend(sim_dir, domid, fr.ring_refs, fr.event_channel, blkif.ABIS[abi], order,
                    sectors * SECTOR, readonly=readonly)
    if readonly:
        info["info"] = info.get("info", 0) | blkif.VDISK_READONLY
    fr.attach(disk_info(sectors, **info))
    return guest, fr, be


class ToyXenbusBackend:
    """The backend half of the vbd handshake (like blkback, much simplified), serving
    one device through a ToyBackend once the frontend published its ring."""

    def __init__(self, sim_dir: str, xs_path: str, guest_domid: int, devid: int,
                 init_nodes: dict[str, str], connected_nodes: dict[str, str],
                 disk_bytes: int, **toy_options) -> None:
        from blkpy.xenstore.client import XenstoreClient

        self.sim_dir = sim_dir
        self.domid = guest_domid
        self.xs = XenstoreClient.connect(xs_path)
        self.path = f"/local/domain/0/backend/vbd/{guest_domid}/{devid}"
        self.fpath = f"/local/domain/{guest_domid}/device/vbd/{devid}"
        self.init_nodes = init_nodes
        self.connected_nodes = connected_nodes
        self.disk = bytearray(disk_bytes)  # survives reconnects
        self.toy_options = toy_options
        self.toy: ToyBackend | None = None
        self.frontend_nodes: list[dict[str, str]] = []  # what each connection read
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.toy:
            self.toy.stop()
        self.xs.close()

    def _state(self, base: str) -> int:
        raw = self.xs.read_str(f"{base}/state")
        return int(raw) if raw else 0

    def _run(self) -> None:
        try:
            def publish(tx):
                for k, v in self.init_nodes.items():
                    self.xs.write(f"{self.path}/{k}", v, tx)
                self.xs.write(f"{self.path}/state", "2", tx)

            self.xs.run_transaction(publish)
            self.xs.watch(f"{self.fpath}/state", "fe")
            while not self._stop.is_set():
                self.xs.wait_event(0.1)
                self.xs.events()
                self._step(self._state(self.fpath), self._state(self.path))
        except Exception as exc:  # surfaced through .errors in the test
            self.errors.append(repr(exc))

    def _step(self, fe: int, be: int) -> None:
        if fe in (3, 4) and be == 2:
            nodes = {k: self.xs.read_str(f"{self.fpath}/{k}") for k in self.xs.directory(self.fpath)}
            self.frontend_nodes.append(nodes)
            order = int(nodes.get("ring-page-order") or 0)
            refs = ([int(nodes["ring-ref"])] if "ring-page-order" not in nodes
                    else [int(nodes[f"ring-ref{i}"]) for i in range(1 << order)])
            abi = blkif.ABIS[nodes.get("protocol") or blkif.DEFAULT_PROTOCOL]
            self.toy = ToyBackend(self.sim_dir, self.domid, refs, int(nodes["event-channel"]),
                                  abi, order, self.disk, **self.toy_options)

            def connect(tx):
                for k, v in self.connected_nodes.items():
                    self.xs.write(f"{self.path}/{k}", v, tx)
                self.xs.write(f"{self.path}/state", "4", tx)

            self.xs.run_transaction(connect)
        elif fe == 5 and be not in (5, 6):
            self.xs.write(f"{self.path}/state", "5")
        elif fe == 6 and be != 6:
            if self.toy:
                self.toy.stop()
                self.toy = None
            self.xs.write(f"{self.path}/state", "6")
        elif fe == 1 and be == 6:
            self.xs.write(f"{self.path}/state", "2")


def toolstack_add(xs, guest_domid: int, devid: int) -> None:
    """Create the frontend and backend directories as libxl does (state 1 on both)."""
    bpath = f"/local/domain/0/backend/vbd/{guest_domid}/{devid}"
    fpath = f"/local/domain/{guest_domid}/device/vbd/{devid}"

    def create(tx):
        for k, v in {"frontend": fpath, "frontend-id": str(guest_domid), "state": "1",
                     "online": "1", "mode": "w"}.items():
            xs.write(f"{bpath}/{k}", v, tx)
        for k, v in {"backend": bpath, "backend-id": "0", "state": "1",
                     "virtual-device": str(devid)}.items():
            xs.write(f"{fpath}/{k}", v, tx)
        xs.set_perms(bpath, ["n0", f"r{guest_domid}"], tx)
        xs.set_perms(fpath, [f"n{guest_domid}", "r0"], tx)
        for k in ("state", "backend", "backend-id", "virtual-device"):
            xs.set_perms(f"{fpath}/{k}", [f"n{guest_domid}", "r0"], tx)
        for k in ("state", "frontend", "frontend-id", "online", "mode"):
            xs.set_perms(f"{bpath}/{k}", ["n0", f"r{guest_domid}"], tx)

    xs.run_transaction(create)
